"""Throughput benchmark of medseg's models on this machine (``medseg bench``).

For each benchmarked config (default: the reference U-Net of ``configs/bench-unet.yaml`` and the
MobileNetV2 classifier of ``configs/bench-classifier.yaml``), in a fresh process each (so peak
memory is per model):

* ``pipeline_img_s``: the training input pipeline (:func:`medseg.data.pipeline.make_dataset` with
  the config's augmentation) over decoded synthetic images at the model size;
* ``train_img_s``: training steps (``model.fit`` with the config's optimizer, loss, metrics,
  ``steps_per_execution``, ``jit_compile`` and precision) on a fixed in-memory batch, after
  warm-up, the median of several timed windows;
* ``infer_img_s``: the best of the inference paths in ``infer_paths``: ``keras`` (the trained
  model, ``predict_on_batch``), ``keras_folded`` (batch norm folded into the convolutions, see
  :func:`medseg.models.fold.fold_batch_norm`), ``savedmodel`` (what ``medseg export`` writes,
  reloaded with ``tf.saved_model.load``) and ``tflite`` (the same graph converted to TFLite and
  run by the XNNPACK delegate on all cores);
* ``gflop_per_img``: forward-pass GFLOP per image (a multiply-add counts 2), counted from the
  layers; training is taken as 3x the forward pass; ``train_gflops``/``infer_gflops`` are the
  achieved rates and ``*_peak_fraction`` their fraction of ``matmul_peak_gflops``, a float32
  matrix-multiply peak measured in the same run;
* ``peak_rss_mb``: the peak resident memory of that model's process.

``predict`` (:func:`predict_bench`, in its own process too): ``medseg predict`` end to end on a
folder of synthetic 256x256 PNGs (overlays on) and on synthetic NIfTI volumes, beside the same
images through the model alone (``batch_size`` a call): ``model_img_s``, ``end_to_end_img_s``,
``ratio`` (end to end / model) and ``peak_rss_mb`` of the image folder, and per input kind
under ``images`` (with ``one_at_a_time_img_s``, ``queue_depth`` 0) and ``volumes``.

When PyTorch is available (in this interpreter, or in another one given by ``torch_python``),
the plain PyTorch reference U-Net of :mod:`medseg.bench_torch_reference` (or any script printing
the same JSON keys) is run in the same session, and ``vs_torch`` gives medseg's ratios to it.
torch is never a dependency of medseg.

The last line printed by ``medseg bench`` is one JSON object; docs/performance.md documents it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from medseg.bench3d import apply_thread_settings, run_json_script
from medseg.config import Config, load_config, precision_policy
from medseg.data.preprocess import Preprocessing
from medseg.errors import ConfigError
from medseg.inference.predictor import BasePredictor
from medseg.io import to_channels

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIGS = {
    "unet": CONFIG_DIR / "bench-unet.yaml",
    "classifier": CONFIG_DIR / "bench-classifier.yaml",
}
TORCH_REFERENCE = Path(__file__).with_name("bench_torch_reference.py")
INFER_PATHS = ("keras", "keras_folded", "savedmodel", "tflite")


# --------------------------------------------------------------------------------------------
# Measurements


def matmul_peak_gflops(n: int = 2048, seconds: float = 2.0) -> float:
    """Float32 matrix-multiply rate of this machine (TensorFlow, all cores), in GFLOP/s.

    The best of several timed runs of ``n`` x ``n`` products (2 n^3 FLOP each), after warm-up.
    """
    import tensorflow as tf

    a = tf.random.normal((n, n), seed=0)
    b = tf.random.normal((n, n), seed=1)
    tf.matmul(a, b).numpy()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds or best == 0.0:
        t = time.perf_counter()
        for _ in range(3):
            c = tf.matmul(a, b)
        c.numpy()
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def _layer_flops(layer, in_shape, out_shape) -> float:
    from keras import layers

    if isinstance(layer, layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return 2.0 * math.prod(out_shape[1:3]) * kh * kw * out_shape[-1]
    if isinstance(layer, layers.Conv2DTranspose):
        kh, kw = layer.kernel_size
        return 2.0 * math.prod(in_shape[1:3]) * kh * kw * in_shape[-1] * out_shape[-1]
    if isinstance(layer, layers.Conv2D):
        kh, kw = layer.kernel_size
        c_in = in_shape[-1] // layer.groups
        return 2.0 * math.prod(out_shape[1:3]) * kh * kw * c_in * out_shape[-1]
    if isinstance(layer, layers.Dense):
        return 2.0 * math.prod(out_shape[1:-1] or [1]) * in_shape[-1] * out_shape[-1]
    return 0.0


def count_flops(model) -> float:
    """Forward-pass FLOP per image of a functional model: convolutions (incl. depthwise and
    transposed) and dense layers, a multiply-add counted as 2; element-wise ops are ignored
    (they are a few percent at most). Nested functional models are counted layer by layer."""
    import keras

    total = 0.0
    for layer in model._flatten_layers(include_self=False, recursive=False):
        if isinstance(layer, keras.Model):
            total += count_flops(layer)
            continue
        for node in layer._inbound_nodes:
            if not node.input_tensors or not node.outputs:
                continue
            total += _layer_flops(layer, node.input_tensors[0].shape, node.outputs[0].shape)
    return total


def _median_rate(fn, images_per_call: int, windows: int, calls: int) -> float:
    """Images/s of ``fn``: median over ``windows`` timed windows of ``calls`` calls each."""
    rates = []
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append(images_per_call * calls / (time.perf_counter() - t))
    return statistics.median(rates)


def _calls_for(seconds: float, fn) -> int:
    """How many calls of ``fn`` fill about ``seconds`` (one call is run to find out)."""
    t = time.perf_counter()
    fn()
    return max(1, round(seconds / max(time.perf_counter() - t, 1e-6)))


def _synthetic_data(cfg: Config, n: int, num_classes: int):
    """``n`` decoded phantom images (and masks or classes) at the config's size, in memory."""
    from medseg.data.phantoms import CLASSES, phantom_slice
    from medseg.data.pipeline import ArrayData
    from medseg.data.samples import Sample

    h, w = cfg.data.image_size
    rng = np.random.default_rng(0)
    images, targets, samples = [], [], []
    for i in range(n):
        cls = CLASSES[i % len(CLASSES)]
        image, mask = phantom_slice(rng, max(h, w), cls)
        image = image[:h, :w, : cfg.data.channels]
        if image.shape[-1] < cfg.data.channels:
            image = np.repeat(image[..., :1], cfg.data.channels, axis=-1)
        images.append(image.astype(np.float32))  # phantoms are in [0, 1] already
        if cfg.data.task == "segmentation":
            targets.append(mask[:h, :w].astype(np.uint8))
        else:
            targets.append(i % num_classes)
        samples.append(Sample(id=f"synthetic/{i}", image="", target=None, group=str(i)))
    dtype = np.uint8 if cfg.data.task == "segmentation" else np.int32
    return ArrayData(np.stack(images), np.asarray(targets, dtype), samples)


def pipeline_rate(cfg: Config, num_classes: int, seconds: float, n: int = 64) -> float:
    """Images/s of the augmented training ``tf.data`` pipeline over decoded (cached) images."""
    from medseg.data.augment import build_augment
    from medseg.data.pipeline import make_dataset

    data = _synthetic_data(cfg, n, num_classes)
    ds = make_dataset(
        data,
        task=cfg.data.task,
        num_classes=num_classes,
        batch_size=cfg.train.batch_size,
        augment=build_augment(cfg.augment, seed=0),
        shuffle=True,
        oversample_tumour=cfg.train.oversample_tumour if cfg.data.task == "segmentation" else 0,
    ).repeat()
    it = iter(ds)
    next(it)
    batches = _calls_for(seconds / 3, lambda: next(it))
    return _median_rate(lambda: next(it), cfg.train.batch_size, 3, batches)


def _batch(cfg: Config, num_classes: int):
    rng = np.random.default_rng(0)
    b, (h, w), c = cfg.train.batch_size, cfg.data.image_size, cfg.data.channels
    x = rng.random((b, h, w, c), dtype=np.float32)
    if cfg.data.task == "segmentation":
        y = (rng.random((b, h, w, num_classes)) > 0.9).astype(np.float32)
    else:
        y = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, b)]
    return x, y


def train_rate(
    cfg: Config, model, x, y, seconds: float, windows: int = 3
) -> tuple[float, list[float]]:
    """Training images/s of ``model`` compiled as ``medseg train`` compiles it, on one fixed
    in-memory batch (so the input pipeline is not measured): warm-up (tracing), then the median
    of ``windows`` timed windows of whole ``fit`` calls, and each window's rate."""
    import tensorflow as tf

    from medseg.models.losses import get_loss
    from medseg.models.metrics import training_metrics
    from medseg.training.optim import build_optimizer

    model.compile(
        optimizer=build_optimizer(cfg.train, 100),
        loss=get_loss(cfg.train),
        metrics=training_metrics(cfg.data.task, y.shape[-1]),
        jit_compile=cfg.train.jit_compile,
        steps_per_execution=cfg.train.steps_per_execution,
    )
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    spe = cfg.train.steps_per_execution
    model.fit(ds, steps_per_epoch=2 * spe, epochs=1, verbose=0)  # trace + first steps

    def window(steps: int) -> float:
        """Images/s of ``steps`` training steps."""
        t = time.perf_counter()
        model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
        return len(x) * steps / (time.perf_counter() - t)

    per_step = len(x) / window(spe)
    steps = max(spe, round(seconds / windows / per_step / spe) * spe)
    rates = [window(steps) for _ in range(windows)]
    return statistics.median(rates), rates


def infer_rates(
    model, x, seconds: float, workdir: Path, paths: tuple[str, ...] = INFER_PATHS
) -> dict[str, float]:
    """Inference images/s of each path in ``paths`` on batch ``x`` (see the module docstring)."""
    import tensorflow as tf

    from medseg.inference.export import convert_tflite, tflite_interpreter
    from medseg.inference.serving import model_function
    from medseg.models.fold import fold_batch_norm

    per_path = max(seconds / max(len(paths), 1), 1.0)
    rates: dict[str, float] = {}

    def timed(fn):
        fn()  # warm-up (tracing)
        calls = _calls_for(per_path / 3, fn)
        return _median_rate(fn, len(x), 3, calls)

    folded = fold_batch_norm(model) if set(paths) - {"keras"} else model
    if "keras" in paths:
        rates["keras"] = timed(lambda: model.predict_on_batch(x))
    if "keras_folded" in paths:
        rates["keras_folded"] = timed(lambda: folded.predict_on_batch(x))
    if {"savedmodel", "tflite"} & set(paths):
        saved = workdir / "saved_model"
        module = tf.Module()
        module.model = folded
        fn = model_function(folded, x.shape[1:3])
        tf.saved_model.save(module, str(saved), signatures={"model": fn})
        if "savedmodel" in paths:
            serve = tf.saved_model.load(str(saved)).signatures["model"]
            xt = tf.constant(x)
            rates["savedmodel"] = timed(lambda: serve(image=xt)["probabilities"].numpy())
        if "tflite" in paths:
            path = convert_tflite(saved, workdir / "model.tflite")
            interpreter = tflite_interpreter(path, num_threads=os.cpu_count())
            runner = interpreter.get_signature_runner("model")
            xc = np.ascontiguousarray(x)
            rates["tflite"] = timed(lambda: runner(image=xc))
    return rates


# --------------------------------------------------------------------------------------------
# One model, in its own process


def bench_config(
    cfg: Config, seconds: float = 20.0, infer_paths: tuple[str, ...] = INFER_PATHS
) -> dict:
    """Benchmark one config in this process; see the module docstring for the keys."""
    from medseg.utils import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras

    from medseg.models.registry import build_model

    threads = apply_thread_settings()

    keras.mixed_precision.set_global_policy(precision_policy(cfg.train))
    keras.utils.set_random_seed(cfg.train.seed)
    num_classes = cfg.model.num_classes if cfg.data.task == "segmentation" else 4
    out: dict = {
        "model": cfg.model.name,
        "input": [*cfg.data.image_size, cfg.data.channels],
        "batch": cfg.train.batch_size,
        "mixed_precision": precision_policy(cfg.train),
        "jit_compile": cfg.train.jit_compile,
        "steps_per_execution": cfg.train.steps_per_execution,
        "threads": threads,
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
    }
    t0 = time.perf_counter()
    out["pipeline_img_s"] = pipeline_rate(cfg, num_classes, seconds * 0.15)
    model = build_model(cfg, num_classes)
    out["params"] = model.count_params()
    out["gflop_per_img"] = count_flops(model) / 1e9
    x, y = _batch(cfg, num_classes)
    out["train_img_s"], out["train_windows_img_s"] = train_rate(cfg, model, x, y, seconds * 0.45)
    with tempfile.TemporaryDirectory(prefix="medseg-bench-") as tmp:
        out["infer_paths"] = infer_rates(model, x, seconds * 0.4, Path(tmp), infer_paths)
    best = max(out["infer_paths"], key=out["infer_paths"].get)
    out["infer_img_s"] = out["infer_paths"][best]
    out["infer_best_path"] = best
    out["pipeline_vs_train"] = out["pipeline_img_s"] / out["train_img_s"]
    out["train_gflops"] = 3 * out["gflop_per_img"] * out["train_img_s"]
    out["infer_gflops"] = out["gflop_per_img"] * out["infer_img_s"]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["seconds"] = time.perf_counter() - t0
    return out


def _bench_in_child(cfg_dict: dict, seconds: float, infer_paths: tuple[str, ...]) -> dict:
    from medseg.config import config_from_dict

    logging.basicConfig(level=logging.WARNING)
    return bench_config(config_from_dict(cfg_dict), seconds, infer_paths)


def _run_isolated(fn, *args):
    """``fn(*args)`` in a fresh process: its own TensorFlow runtime, threads and peak RSS."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def _peak_in_child(seconds: float) -> float:
    from medseg.utils import import_tensorflow_quietly

    import_tensorflow_quietly()
    return matmul_peak_gflops(seconds=seconds)


# --------------------------------------------------------------------------------------------
# predict: batch inference end to end beside the model alone


DEFAULT_PREDICT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lgg-unet.yaml"


class KerasPredictor(BasePredictor):
    """A Keras model served as ``medseg predict`` serves a run folder's checkpoint."""

    def __init__(self, model, cfg: Config):
        from medseg.inference.serving import serving_function
        from medseg.models.fold import fold_batch_norm

        self.task = cfg.data.task
        self.classes = []
        self.channels = int(model.input_shape[-1])
        n_out, threshold = int(model.output_shape[-1]), cfg.predict.threshold
        self.card = {"task": self.task, "input": {"channels": self.channels}}
        self.card.update(num_outputs=n_out, threshold=threshold)
        self.preprocessing = Preprocessing.from_config(cfg.data)
        self._fn = serving_function(
            [fold_batch_norm(model)], self.task, self.preprocessing, cfg.predict.threshold
        )

    def model_input(self, images: np.ndarray) -> np.ndarray:
        return to_channels(images, self.channels)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self._fn(image=np.ascontiguousarray(images, np.float32))
        return {k: np.asarray(v) for k, v in out.items()}

    def keras_models(self) -> list:  # noqa: D102  (not used: no MC-dropout, no Grad-CAM)
        return []


def _write_inputs(root: Path, n_images: int, n_volumes: int, slices: int) -> tuple[Path, Path]:
    import nibabel as nib
    from PIL import Image

    rng = np.random.default_rng(0)
    images, volumes = root / "images", root / "volumes"
    for folder in (images, volumes):
        folder.mkdir()
    for i in range(n_images):
        img = rng.integers(0, 120, (256, 256, 3), dtype=np.uint8)
        img[80 + i % 40 : 120 + i % 40, 90:140] = 230
        Image.fromarray(img).save(images / f"slice_{i:04d}.png")
    for i in range(n_volumes):
        vol = rng.uniform(0, 400, (256, 256, slices)).astype(np.float32)
        vol[100:140, 90:150, slices // 3 : 2 * slices // 3] = 1500
        nib.save(nib.Nifti1Image(vol, np.diag([0.9, 0.9, 3.0, 1.0])), volumes / f"v{i}.nii.gz")
    return images, volumes


def _model_rate(predictor: KerasPredictor, n: int, batch: int) -> float:
    x = predictor.model_input(np.random.default_rng(1).uniform(0, 255, (batch, 256, 256, 3)))
    predictor(x)  # warm-up
    calls, t0 = max(1, n // batch), time.perf_counter()
    for _ in range(calls):
        predictor(x)
    return calls * batch / (time.perf_counter() - t0)


def _part(model_img_s: float, end_to_end_img_s: float) -> dict:
    ratio = round(end_to_end_img_s / model_img_s, 3) if model_img_s else None
    return {"model_img_s": round(model_img_s, 2), "end_to_end_img_s": round(end_to_end_img_s, 2),
            "ratio": ratio}  # fmt: skip


def predict_bench(
    cfg_dict: dict, n_images: int = 96, n_volumes: int = 2, slices: int = 24, batch: int = 8
) -> dict:
    """The ``predict`` part (module docstring), in this process: an untrained model of ``cfg_dict``
    (throughput does not depend on the weights) on synthetic 256x256 PNGs (overlays on;
    ``one_at_a_time_img_s``: ``queue_depth`` 0) and NIfTI volumes."""
    from medseg.config import config_from_dict
    from medseg.utils import import_tensorflow_quietly

    logging.basicConfig(level=logging.WARNING)
    import_tensorflow_quietly()
    import keras

    from medseg.inference.predict import predict
    from medseg.models.registry import build_model

    cfg = config_from_dict(cfg_dict)
    keras.utils.set_random_seed(cfg.train.seed)
    t0 = time.perf_counter()
    predictor = KerasPredictor(build_model(cfg, cfg.model.num_classes), cfg)
    out: dict = {"config": cfg.data.image_size, "batch": batch}
    with tempfile.TemporaryDirectory(prefix="medseg-bench-predict-") as tmp:
        root = Path(tmp)
        images, volumes = _write_inputs(root, n_images, n_volumes, slices)
        model_rate = _model_rate(predictor, n_images, batch)
        kw = {"batch_size": batch, "progress": False}
        seq = predict(predictor, [images], root / "seq", queue_depth=0, **kw)
        streamed = predict(predictor, [images], root / "images-out", **kw)
        vols = predict(predictor, [volumes], root / "volumes-out", **kw)
    out["images"] = _part(model_rate, streamed.end_to_end_slices_per_second)
    out["images"]["one_at_a_time_img_s"] = round(seq.end_to_end_slices_per_second, 2)
    out["images"]["n"] = n_images
    out["volumes"] = _part(model_rate, vols.end_to_end_slices_per_second)
    out["volumes"].update(n=n_volumes, slices=slices)
    out.update({k: out["images"][k] for k in ("model_img_s", "end_to_end_img_s", "ratio")})
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# --------------------------------------------------------------------------------------------
# PyTorch reference


def find_torch_python(torch_python: str | None) -> str | None:
    """The interpreter to run the PyTorch reference with: ``torch_python`` when given, else this
    interpreter when it can import torch, else None."""
    if torch_python:
        return torch_python
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    return None


def torch_reference(
    python: str, size: int, batch: int, channels: int, seconds: float, script: str | None = None
) -> dict:
    """Run the PyTorch reference U-Net script with ``python``; its JSON line as a dict.

    Raises:
        MedsegError: the script fails or prints no JSON.
    """
    cmd = [python, str(script or TORCH_REFERENCE), "--size", str(size), "--batch", str(batch)]
    cmd += ["--channels", str(channels), "--seconds", str(seconds)]
    return run_json_script(cmd, "PyTorch reference")


# --------------------------------------------------------------------------------------------
# The whole benchmark


def load_bench_config(name: str, path: str | Path | None, overrides: list[str]) -> Config:
    """The config of benchmark ``name`` (``unet``/``classifier``): ``path`` or the default."""
    if name not in DEFAULT_CONFIGS:
        names = ", ".join(DEFAULT_CONFIGS)
        raise ConfigError(f"unknown benchmark '{name}'; expected one of {names}")
    return load_config(path or DEFAULT_CONFIGS[name], overrides)


def run_bench(
    configs: dict[str, Config],
    *,
    seconds: float = 20.0,
    infer_paths: tuple[str, ...] = INFER_PATHS,
    torch_python: str | None = None,
    torch_script: str | None = None,
    torch_seconds: float = 8.0,
    torch: bool = True,
    unet3d: bool = False,
    peer3d_python: str | None = None,
    predict: Config | None = None,
) -> dict:
    """Run the benchmark; see the module docstring.

    Args:
        configs: ``{"unet": cfg, "classifier": cfg}`` (either may be left out).
        seconds: time budget of each model's timed parts (pipeline, training, inference).
        infer_paths: the inference paths to time.
        torch_python: an interpreter with torch for the reference (default: this one if it has
            torch, else no reference).
        torch_script: a reference script printing the same JSON keys (default: medseg's).
        torch_seconds: training seconds of the reference (inference gets half).
        torch: run the reference when torch is available.
        unet3d: also run the 3D U-Net benchmark and its torch/MONAI peer
            (:func:`medseg.bench3d.run_unet3d_bench`; keys ``unet3d``, ``peer_unet3d``,
            ``unet3d_vs_peer``).
        peer3d_python: an interpreter with torch and MONAI for the 3D peer.
        predict: the config of the ``predict`` part (batch inference end to end beside the
            model alone, :mod:`medseg.bench_predict`; key ``predict``), None to skip it.

    Returns:
        ``{"machine": ..., "matmul_peak_gflops": ..., "unet": {...}, "classifier": {...},
        "torch_reference": {...} | None, "vs_torch": {...} | None}``
    """
    result: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "settings": {"seconds": seconds, "infer_paths": list(infer_paths)},
    }
    t0 = time.perf_counter()
    result["matmul_peak_gflops"] = _run_isolated(_peak_in_child, 3.0)
    logger.info("float32 matmul peak: %.0f GFLOP/s", result["matmul_peak_gflops"])
    python = find_torch_python(torch_python) if torch else None
    result["torch_reference"] = None
    if "unet" in configs and python:
        cfg = configs["unet"]
        result["torch_reference"] = torch_reference(
            python, cfg.data.image_size[0], cfg.train.batch_size, cfg.data.channels,
            torch_seconds, torch_script,
        )  # fmt: skip
        logger.info("PyTorch reference: %s", result["torch_reference"])
    elif "unet" in configs:
        logger.info("no PyTorch found (give --torch-python): the reference is skipped")
    for name, cfg in configs.items():
        logger.info("benchmarking %s (%s) ...", name, cfg.model.name)
        res = _run_isolated(_bench_in_child, cfg.to_dict(), seconds, infer_paths)
        peak = result["matmul_peak_gflops"]
        res["train_peak_fraction"] = res["train_gflops"] / peak
        res["infer_peak_fraction"] = res["infer_gflops"] / peak
        result[name] = res
        logger.info(
            "%s: train %.2f img/s, inference %.2f img/s (%s), pipeline %.0f img/s",
            name, res["train_img_s"], res["infer_img_s"], res["infer_best_path"],
            res["pipeline_img_s"],
        )  # fmt: skip
    ref = result["torch_reference"]
    result["vs_torch"] = None
    if ref and "unet" in result and ref.get("plain_train_img_s"):
        ours = result["unet"]
        result["vs_torch"] = {
            "train": ours["train_img_s"] / ref["plain_train_img_s"],
            "infer": ours["infer_img_s"] / ref["plain_infer_img_s"],
            "pipeline_vs_torch_train": ours["pipeline_img_s"] / ref["plain_train_img_s"],
        }
    if predict is not None:
        n_images = max(16, min(96, int(5 * seconds)))
        slices = 24 if seconds >= 10 else 8
        logger.info("benchmarking predict end to end (%d images, 2 volumes) ...", n_images)
        result["predict"] = _run_isolated(predict_bench, predict.to_dict(), n_images, 2, slices)
        logger.info(
            "predict: %.1f img/s end to end, %.1f in the model (%.2f)",
            result["predict"]["end_to_end_img_s"], result["predict"]["model_img_s"],
            result["predict"]["ratio"],
        )  # fmt: skip
    if unet3d:
        from medseg.bench3d import run_unet3d_bench

        result.update(run_unet3d_bench(seconds, peer3d_python, peer=torch))
    result["seconds"] = time.perf_counter() - t0
    return json.loads(json.dumps(result, default=lambda o: float(np.asarray(o))))
