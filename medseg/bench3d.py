"""Throughput of the 3D U-Net on this machine, beside a PyTorch/MONAI peer (``medseg bench
--only unet3d``).

:func:`bench_unet3d` measures, in the process that calls it (``medseg bench`` runs it in a fresh
one, so TensorFlow's state and the peak memory are its own), the network of
:func:`medseg.models.unet3d.build_unet3d` with the peer's widths (16-32-64-128-256, batch norm,
ReLU; the same 5,646,419 trainable parameters as the peer's plain 3D U-Net):

* ``sw_volumes_s`` / ``sw_windows_s``: sliding-window inference over one random ``volume``^3
  volume with ``window``^3 windows (overlap, Gaussian weighting and ``sw_batch`` as MONAI's
  ``sliding_window_inference``), i.e. :func:`medseg.inference.sliding_window.
  sliding_window_inference` compiled in a ``tf.function`` with a dynamic volume shape (as the
  served :class:`medseg.inference.volumetric.VolumeModule` runs it), on the model in inference
  mode with batch norm folded (:func:`medseg.models.fold.fold_batch_norm`), in bfloat16 only on a
  CPU with AMX (:func:`medseg.config.cpu_has_amx`). The best of the paths in ``infer_paths``:

  - ``inlined``: the model called inside the sliding window's loop (its ops inlined into the
    loop body, what ``VolumeModule`` does today);
  - ``noinline``: the model wrapped in its own ``tf.function`` that is kept as a function call
    (``_noinline``), so TensorFlow's graph optimiser rewrites it as a whole (fused oneDNN
    convolutions), as it does for a model called on its own;
  - ``noinline_xla``: the same with ``jit_compile=True`` (not timed by default: on CPU it was
    measured an order of magnitude slower);

* ``model_windows_s``: the model's forward pass alone on batches of ``sw_batch`` windows (the
  same function as the best path), and ``sw_overhead``: ``1 - sw_windows_s / model_windows_s``,
  the share of the sliding window's time spent outside the model (gathering windows, weighting,
  accumulating);
* ``train_patches_s``: training steps (Adam, the ``dice_ce`` loss, batches of ``batch`` random
  ``window``^3 patches with random labels, Keras ``train_on_batch`` on the compiled step) in
  patches/s.

Every figure is the median of several timed windows after warm-up (tracing). Beside each rate,
the process's CPU seconds per unit (``sw_cpu_s_per_volume``, ``model_cpu_s_per_window``,
``train_cpu_s_per_patch``): on a machine shared with other work they move far less than the
wall-clock rates, and they show the work done whatever the scheduling.

:func:`peer_unet3d` runs the peer script (``../shared/tools/peer_unet3d_bench.py``: a plain
PyTorch 3D U-Net and MONAI's BasicUNet, MONAI's sliding window) with an interpreter that has torch
and MONAI, and :func:`compare_unet3d` gives medseg's ratio to the faster peer for each figure.
torch is never a dependency of medseg.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from medseg.config import cpu_has_amx
from medseg.errors import ConfigError, MedsegError

logger = logging.getLogger(__name__)

#: The peer benchmark script, next to the repository (``../shared/tools``).
PEER_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "tools" / "peer_unet3d_bench.py"
#: Inference paths of the sliding window (see the module docstring).
INFER_PATHS_3D = ("inlined", "noinline", "noinline_xla")
DEFAULT_INFER_PATHS_3D = ("inlined", "noinline")
#: The issue's goal: medseg at least this many times the faster peer.
GOAL = 1.2
#: Figures compared with the peer: ours -> the peer's key suffix.
FIGURES = {"sw_volumes": "sw_volumes_s", "train_patches": "train_patches_s"}

_WIDTHS = {"base_filters": 16, "depth": 4, "max_filters": 256}


# --------------------------------------------------------------------------------------------
# Timing


def _median_rate(fn: Callable[[], object], per_call: float, seconds: float, windows: int = 3):
    """``per_call`` units per second of ``fn``: warm-up call, then the median of ``windows``
    timed windows of about ``seconds / windows`` each (at least one call each).

    Returns:
        ``(median rate, [rate of each window], median CPU seconds per unit)``: the CPU time is
        this process's (all threads), a figure that other processes' load changes far less than
        the wall-clock rate.
    """
    fn()  # warm-up: tracing, oneDNN primitive creation
    t = time.perf_counter()
    fn()
    calls = max(1, round(seconds / windows / max(time.perf_counter() - t, 1e-6)))
    rates, cpu = [], []
    for _ in range(windows):
        c, t = time.process_time(), time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append(per_call * calls / (time.perf_counter() - t))
        cpu.append((time.process_time() - c) / (per_call * calls))
    return statistics.median(rates), rates, statistics.median(cpu)


def n_windows(volume: int, window: int, overlap: float) -> int:
    """Windows over a ``volume``^3 volume (the placement of the sliding window, as MONAI's)."""
    from medseg.inference.sliding_window import window_grid

    return len(window_grid((volume,) * 3, (window,) * 3, overlap))


# --------------------------------------------------------------------------------------------
# Models


def build_bench_unet3d(classes: int, policy: str = "float32", norm: str = "batch"):
    """The peer-width 3D U-Net (1 input channel, 16-32-64-128-256 filters) built under the Keras
    dtype ``policy`` (the global policy is float32 again afterwards)."""
    import keras

    from medseg.models.unet3d import build_unet3d

    keras.mixed_precision.set_global_policy(policy)
    try:
        return build_unet3d(1, classes, norm=norm, **_WIDTHS)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def inference_unet3d(model, policy: str):
    """``model`` (float32, batch norm) for inference: batch norm folded, and in ``policy``.

    Folding needs float32 layers, so for ``mixed_bfloat16`` the folded weights are loaded into
    the same network built without normalisation (its convolutions have the biases that folding
    produces, in the same order) under that policy.
    """
    from medseg.models.fold import fold_batch_norm

    folded = fold_batch_norm(model)
    if policy == "float32":
        return folded
    fast = build_bench_unet3d(int(model.output_shape[-1]), policy, norm="none")
    fast.set_weights(folded.get_weights())
    return fast


def window_predictor(model, window: int, path: str) -> Callable:
    """The ``predict_fn`` of the sliding window for inference ``path`` (module docstring)."""
    import tensorflow as tf

    if path not in INFER_PATHS_3D:
        raise ConfigError(f"infer path '{path}': expected one of {', '.join(INFER_PATHS_3D)}")
    if path == "inlined":
        return lambda x: model(x, training=False)
    channels = int(model.input_shape[-1])
    spec = [tf.TensorSpec([None, window, window, window, channels], tf.float32)]
    return tf.function(
        lambda x: model(x, training=False),
        input_signature=spec,
        jit_compile=path == "noinline_xla",
        experimental_attributes={"_noinline": True},
    )


def sliding_window_function(model, window: int, overlap: float, sw_batch: int, path: str):
    """The compiled sliding window (dynamic volume shape, Gaussian weights) of ``model``."""
    import tensorflow as tf

    from medseg.inference.sliding_window import sliding_window_inference

    predict = window_predictor(model, window, path)
    classes, channels = int(model.output_shape[-1]), int(model.input_shape[-1])

    @tf.function(input_signature=[tf.TensorSpec([1, None, None, None, channels], tf.float32)])
    def run(volume):
        return sliding_window_inference(
            volume, predict, (window,) * 3, overlap, sw_batch, True, num_classes=classes
        )

    return run, predict


# --------------------------------------------------------------------------------------------
# Measurements


def sliding_window_rates(
    model, volume: int, window: int, overlap: float, sw_batch: int, seconds: float, paths
) -> dict:
    """Volumes/s of each inference path, and the model-alone rate of the best path."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    vol = tf.constant(rng.random((1, volume, volume, volume, 1), np.float32))
    windows = tf.constant(rng.random((sw_batch, window, window, window, 1), np.float32))
    per_path = seconds / max(len(paths), 1)
    rates, cpu, predictors = {}, {}, {}
    for path in paths:
        run, predictors[path] = sliding_window_function(model, window, overlap, sw_batch, path)
        rates[path], _, cpu[path] = _median_rate(lambda run=run: run(vol).numpy(), 1.0, per_path)
        logger.info("sliding window (%s): %.4f volumes/s", path, rates[path])
    best = max(rates, key=rates.get)
    model_fn = predictors[best]
    if best == "inlined":
        model_fn = window_predictor(model, window, "noinline")  # compiled, as in the loop
    model_rate, _, model_cpu = _median_rate(
        lambda: model_fn(windows).numpy(), sw_batch, seconds / 2
    )
    return {
        "infer_paths": rates,
        "infer_best_path": best,
        "infer_cpu_s_per_volume": cpu,
        "sw_cpu_s_per_volume": cpu[best],
        "model_windows_s": model_rate,
        "model_cpu_s_per_window": model_cpu,
    }


def train_rate(model, window: int, batch: int, seconds: float) -> tuple[float, list[float], float]:
    """Training patches/s of ``model`` (Adam, ``dice_ce``) on one random batch of patches: the
    median, each window's, and the CPU seconds per patch."""
    import keras
    import numpy as np

    from medseg.models.losses import DiceCE

    classes = int(model.output_shape[-1])
    rng = np.random.default_rng(0)
    x = rng.random((batch, window, window, window, 1), np.float32)
    y = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, (batch,) + (window,) * 3)]
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=DiceCE(), jit_compile=False)
    model.train_on_batch(x, y)  # traces the compiled train step
    return _median_rate(lambda: model.train_on_batch(x, y), batch, seconds)


def apply_thread_settings() -> dict | str:
    """Apply ``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS`` when set; what was set."""
    import tensorflow as tf

    threads = {}
    for key, setter in (
        ("TF_NUM_INTRAOP_THREADS", tf.config.threading.set_intra_op_parallelism_threads),
        ("TF_NUM_INTEROP_THREADS", tf.config.threading.set_inter_op_parallelism_threads),
    ):
        if os.environ.get(key):
            setter(int(os.environ[key]))
            threads[key] = int(os.environ[key])
    return threads or "default"


def bench_unet3d(
    volume: int = 128,
    window: int = 64,
    overlap: float = 0.5,
    sw_batch: int = 4,
    batch: int = 2,
    classes: int = 3,
    seconds: float = 20.0,
    *,
    precision: str = "auto",
    infer_paths: tuple[str, ...] = DEFAULT_INFER_PATHS_3D,
) -> dict:
    """Benchmark the 3D U-Net in this process; see the module docstring for the keys.

    Args:
        volume: side of the cubic volume of the sliding window.
        window: side of the windows (inference) and of the training patches.
        overlap: overlap of neighbouring windows.
        sw_batch: windows per model call.
        batch: training patches per step.
        classes: output classes (background included).
        seconds: timed seconds of training, and of the sliding window (shared by the paths).
        precision: ``auto`` (``mixed_bfloat16`` on a CPU with AMX, else ``float32``),
            ``float32`` or ``mixed_bfloat16``.
        infer_paths: inference paths to time (some of :data:`INFER_PATHS_3D`).

    Returns:
        The settings, ``params``, ``windows_per_volume``, ``sw_volumes_s``, ``sw_windows_s``,
        ``infer_paths``, ``infer_best_path``, ``model_windows_s``, ``sw_overhead``,
        ``train_patches_s`` (and each window's rate), the CPU seconds ``sw_cpu_s_per_volume``
        (and per path), ``model_cpu_s_per_window``, ``train_cpu_s_per_patch``,
        ``peak_rss_mb`` and ``seconds``.

    Raises:
        ConfigError: an unknown precision or inference path, or a window that does not divide
            by 16 (four poolings).
    """
    from medseg.utils import import_tensorflow_quietly

    if precision not in ("auto", "float32", "mixed_bfloat16"):
        raise ConfigError(f"precision: expected auto, float32 or mixed_bfloat16, got {precision}")
    unknown = sorted(set(infer_paths) - set(INFER_PATHS_3D)) or ([] if infer_paths else ["none"])
    if unknown:
        raise ConfigError(f"infer paths: unknown {', '.join(unknown)}")
    if window % 2 ** _WIDTHS["depth"]:
        raise ConfigError(f"window: {window} is not divisible by 16 (the U-Net pools 4 times)")
    import_tensorflow_quietly()
    import keras

    policy = precision
    if precision == "auto":
        policy = "mixed_bfloat16" if cpu_has_amx() else "float32"
    out: dict = {
        "model": "unet3d",
        "volume": volume,
        "window": window,
        "overlap": overlap,
        "sw_batch": sw_batch,
        "batch": batch,
        "classes": classes,
        "seconds_setting": seconds,
        "precision": policy,
        "batch_norm_folded": True,
        "train_jit_compile": False,
        "threads": apply_thread_settings(),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "windows_per_volume": n_windows(volume, window, overlap),
    }
    t0 = time.perf_counter()
    keras.utils.set_random_seed(0)
    model = build_bench_unet3d(classes, policy)
    out["params"] = sum(int(w.numpy().size) for w in model.trainable_weights)
    # folding needs float32 layers: a bfloat16 run folds a float32 twin of the network
    twin = model if policy == "float32" else build_bench_unet3d(classes)
    fast = inference_unet3d(twin, policy)
    out.update(sliding_window_rates(fast, volume, window, overlap, sw_batch, seconds, infer_paths))
    out["sw_volumes_s"] = out["infer_paths"][out["infer_best_path"]]
    out["sw_windows_s"] = out["sw_volumes_s"] * out["windows_per_volume"]
    out["sw_overhead"] = 1.0 - out["sw_windows_s"] / out["model_windows_s"]
    train = train_rate(model, window, batch, seconds)
    out["train_patches_s"], out["train_windows_patches_s"], out["train_cpu_s_per_patch"] = train
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["seconds"] = time.perf_counter() - t0
    return out


def _bench_child(kwargs: dict) -> dict:
    logging.basicConfig(level=logging.WARNING)
    return bench_unet3d(**kwargs)


def bench_unet3d_isolated(**kwargs) -> dict:
    """:func:`bench_unet3d` in a fresh process (its own TensorFlow runtime and peak memory)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_bench_child, kwargs).result()


# --------------------------------------------------------------------------------------------
# The peer


def find_peer_python(python: str | None) -> str | None:
    """The interpreter for the peer: ``python`` when given, else this one when it has torch and
    MONAI, else None."""
    if python:
        return python
    if all(importlib.util.find_spec(m) is not None for m in ("torch", "monai")):
        return sys.executable
    return None


def peer_unet3d(
    python: str,
    volume: int = 128,
    window: int = 64,
    seconds: float = 20.0,
    script: str | Path | None = None,
    *,
    overlap: float = 0.5,
    sw_batch: int = 4,
    batch: int = 2,
    classes: int = 3,
) -> dict:
    """Run the peer script (default :data:`PEER_SCRIPT`) with ``python``; its JSON line.

    Raises:
        MedsegError: the script is missing, fails or prints no JSON.
    """
    script = Path(script or PEER_SCRIPT)
    if not script.is_file():
        raise MedsegError(f"peer benchmark script not found: {script}")
    cmd = [python, str(script), "--volume", str(volume), "--window", str(window)]
    cmd += ["--overlap", str(overlap), "--sw-batch", str(sw_batch), "--batch", str(batch)]
    cmd += ["--classes", str(classes), "--seconds", str(seconds)]
    return run_json_script(cmd, "3D peer")


def run_json_script(cmd: list[str], what: str) -> dict:
    """Run a reference benchmark script; the JSON object of its last ``{...}`` line.

    Raises:
        MedsegError: the script fails or prints no JSON (the message names ``what``, the
            script and its last line of stderr).
    """
    logger.info("%s: %s", what, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MedsegError(f"{what} {cmd[1]} failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def compare_unet3d(ours: dict, peer: dict) -> dict:
    """medseg's ratios to each peer network and to the faster one, per figure.

    Args:
        ours: :func:`bench_unet3d`'s result.
        peer: :func:`peer_unet3d`'s result (keys ``<network>_sw_volumes_s`` and
            ``<network>_train_patches_s``).

    Returns:
        ``{"faster_peer": {figure: network}, "vs_faster_peer": {figure: ratio},
        "vs_<network>": {figure: ratio}, "goal": 1.2, "meets_goal": bool}`` for the figures
        ``sw_volumes`` and ``train_patches`` (a ratio above 1: medseg is faster).

    Raises:
        MedsegError: the peer's result has no network with both figures.
    """
    suffix = "_" + FIGURES["sw_volumes"]
    networks = sorted(
        key[: -len(suffix)]
        for key in peer
        if key.endswith(suffix) and f"{key[: -len(suffix)]}_{FIGURES['train_patches']}" in peer
    )
    if not networks:
        raise MedsegError("3D peer result: no network with sw_volumes_s and train_patches_s")
    out: dict = {"faster_peer": {}, "vs_faster_peer": {}}
    for name in networks:
        out[f"vs_{name}"] = {fig: ours[key] / peer[f"{name}_{key}"] for fig, key in FIGURES.items()}
    for fig, key in FIGURES.items():
        faster = max(networks, key=lambda n: peer[f"{n}_{key}"])
        out["faster_peer"][fig] = faster
        out["vs_faster_peer"][fig] = ours[key] / peer[f"{faster}_{key}"]
    out["goal"] = GOAL
    out["meets_goal"] = all(r >= GOAL for r in out["vs_faster_peer"].values())
    return out


def run_unet3d_bench(
    seconds: float = 20.0,
    peer_python: str | None = None,
    peer_script: str | Path | None = None,
    peer: bool = True,
    **kwargs,
) -> dict:
    """The 3D part of ``medseg bench``: ours in a fresh process, then the peer (one after the
    other, never concurrently).

    Args:
        seconds: timed seconds of each part, ours and the peer's.
        peer_python: an interpreter with torch and MONAI (default: this one if it has them).
        peer_script: the peer script (default :data:`PEER_SCRIPT`).
        peer: run the peer when an interpreter is found.
        **kwargs: more arguments of :func:`bench_unet3d` (volume, window, ...).

    Returns:
        ``{"unet3d": {...}, "peer_unet3d": {...} | None, "unet3d_vs_peer": {...} | None}``.
    """
    ours = bench_unet3d_isolated(seconds=seconds, **kwargs)
    logger.info(
        "unet3d: sliding window %.4f volumes/s (%s), training %.2f patches/s",
        ours["sw_volumes_s"], ours["infer_best_path"], ours["train_patches_s"],
    )  # fmt: skip
    result: dict = {"unet3d": ours, "peer_unet3d": None, "unet3d_vs_peer": None}
    python = find_peer_python(peer_python) if peer else None
    if python is None:
        logger.info("no torch + MONAI found (give --peer3d-python): the 3D peer is skipped")
        return result
    settings = {k: ours[k] for k in ("volume", "window", "overlap", "sw_batch", "batch", "classes")}
    volume, window = settings.pop("volume"), settings.pop("window")
    result["peer_unet3d"] = peer_unet3d(python, volume, window, seconds, peer_script, **settings)
    result["unet3d_vs_peer"] = compare_unet3d(ours, result["peer_unet3d"])
    logger.info("unet3d vs the faster peer: %s", result["unet3d_vs_peer"]["vs_faster_peer"])
    return result
