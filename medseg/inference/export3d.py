"""Export a 3D (``unet3d``) run as a self-contained SavedModel with a model card.

The serving signature ``serve`` is :class:`medseg.inference.volumetric.VolumeModule`: a raw
volume of any shape and spacing in, probabilities and a label map of the same shape out
(normalisation, resampling to the plan's spacing, sliding window and resampling back all run in
the graph):

* input ``volume``: float32 ``[D, H, W, C]`` raw intensities, axes (slice, row, col);
* input ``spacing``: float32 ``[3]``, (slice, row, col) mm;
* outputs ``probabilities`` float32 ``[D, H, W, K]`` and ``labels`` int32 ``[D, H, W]``.

Export folder::

    saved_model/   SavedModel (signature serve)
    model.keras    copy of the Keras checkpoint (takes normalised patches at the plan's spacing)
    medseg.json    model card: ``"dims": 3``, labels, channels, plan, sliding-window options,
                   input spec, config and split hashes, checksums, metrics, versions

After writing, the reloaded SavedModel is run on random volumes (an odd shape at another spacing,
and an odd shape at the plan's spacing) and compared with the same :class:`VolumeModule` run on
the Keras model; a difference above ``export.tolerance`` discards the export. The folder is
written under a temporary name and renamed into place, so a failed or killed export leaves no
partial folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import medseg
from medseg.artifacts.exports import CARD_NAME, KERAS_NAME, SAVED_MODEL, SERVE_SIGNATURE
from medseg.artifacts.runs import RunDir, load_run_model, open_run
from medseg.config import Config
from medseg.data.fingerprint import VolumePlan
from medseg.data.split import load_manifest
from medseg.errors import ConfigError, ModelError, RunExistsError
from medseg.inference.volumetric import VolumeModule, load_plan, tta_axes
from medseg.utils import atomic_write_json, file_sha256, read_json, replace_folder

logger = logging.getLogger(__name__)

#: ``dims`` of a 3D model card (2D cards have none, or 2).
DIMS = 3


def export_volumetric(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    checkpoint: str = "best",
    overwrite: bool = False,
    mirror: bool | None = None,
) -> Path:
    """Export a ``unet3d`` run folder to ``out`` (default ``<export.dir>/<run name>``).

    Args:
        run_dir: the run folder (``config.yaml``, ``plan.json``, ``checkpoints/``).
        out: the export folder.
        checkpoint: ``best`` or ``last``.
        overwrite: replace an existing export folder.
        mirror: mirror test-time augmentation in the graph (None: ``volume.mirror_tta``),
            over the axes training flipped (:func:`~medseg.inference.volumetric.tta_axes`).

    Returns:
        The export folder.

    Raises:
        RunExistsError: ``out`` exists and ``overwrite`` is false.
        ConfigError: the run is not a ``unet3d`` run, or its plan is malformed.
        ModelError: the checkpoint or plan is missing, or the reloaded SavedModel differs from
            the Keras path by more than ``export.tolerance``.
    """
    start = time.perf_counter()
    run = open_run(run_dir)
    cfg = run.config()
    if cfg.model.name != "unet3d":
        raise ConfigError(f"{run.config_path}: model.name is {cfg.model.name!r}, not unet3d")
    out = Path(out) if out else Path(cfg.export.dir) / run.path.name
    if out.exists() and not overwrite:
        raise RunExistsError(f"{out}: export folder exists; pass --overwrite to replace it")
    plan = load_plan(run)
    model = load_run_model(run, checkpoint)
    v = cfg.volume
    module = VolumeModule(
        model,
        plan,
        overlap=v.overlap,
        sw_batch=v.sw_batch,
        gaussian=v.gaussian,
        mirror=tta_axes(cfg, v.mirror_tta if mirror is None else bool(mirror)),
    )
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_saved_model(module, tmp / SAVED_MODEL)
        verification = _verify(module, tmp / SAVED_MODEL, cfg.export.tolerance, out)
        src = run.best_model if checkpoint == "best" else run.last_model
        shutil.copy2(src, tmp / KERAS_NAME)
        card = _card(cfg, run, checkpoint, plan, module, verification)
        card["keras"] = {
            "files": [KERAS_NAME],
            "sha256": {KERAS_NAME: file_sha256(tmp / KERAS_NAME)},
            "note": "copy of the Keras checkpoint; it takes normalised patches at the plan's "
            "spacing (no sliding window, no resampling)",
        }
        atomic_write_json(tmp / CARD_NAME, card)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "exported 3D %s -> %s (max diff %.3g%s; %.1fs)",
        run.path.name,
        out,
        verification["max_abs_diff"],
        ", mirror tta" if module.options["mirror"] else "",
        time.perf_counter() - start,
    )
    return out


def _write_saved_model(module: VolumeModule, path: Path) -> None:
    """The SavedModel with the one signature ``serve`` (the module's ``tf.function``)."""
    archive = keras.export.ExportArchive()
    for m in module.models:
        archive.track(m)
    archive.add_endpoint(SERVE_SIGNATURE, module.serve)
    archive.write_out(str(path), verbose=False)


def verification_inputs(plan: VolumePlan, channels: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic random ``(volume, spacing)`` pairs for the export check: a volume of an odd
    shape (more than one window on the first axes, smaller than the patch on the last) at another
    spacing than the plan's, and one of another odd shape at the plan's spacing."""
    rng = np.random.default_rng(0)
    p = [int(s) for s in plan.patch_size]
    target = np.asarray(plan.target_spacing, np.float32)
    if plan.normalization == "ct" and len(plan.intensity_clip) == 2:
        low, high = plan.intensity_clip
        span = high - low
        low, high = low - 0.1 * span, high + 0.1 * span
    else:
        low, high = 0.0, 1000.0
    shapes = [
        (p[0] + p[0] // 2 + 1, p[1] + 3, max(p[2] // 2 + 1, 3)),
        (p[0] + 1, max(p[1] - 3, 3), p[2] + p[2] // 4 + 1),
    ]
    spacings = [target * np.float32([1.25, 0.9, 1.1]), target]
    return [
        (rng.uniform(low, high, (*s, channels)).astype(np.float32), sp.astype(np.float32))
        for s, sp in zip(shapes, spacings, strict=True)
    ]


def verify_volumetric_export(saved_model: Path, module: VolumeModule) -> dict:
    """Compare the reloaded SavedModel's ``serve`` with ``module`` run on the Keras model.

    Returns:
        ``max_abs_diff`` (probabilities), ``label_agreement`` (share of voxels with the same
        label, worst input) and the input shapes and spacings.

    Raises:
        ModelError: an output's shape differs.
    """
    serve = tf.saved_model.load(str(saved_model)).signatures[SERVE_SIGNATURE]
    diff, agreement, inputs = 0.0, 1.0, []
    for volume, spacing in verification_inputs(module.plan, module.channels):
        got = serve(volume=tf.constant(volume), spacing=tf.constant(spacing))
        want = module(tf.constant(volume), tf.constant(spacing))
        a, b = got["probabilities"].numpy(), want["probabilities"].numpy()
        if a.shape != b.shape or a.shape[:3] != volume.shape[:3]:
            raise ModelError(
                f"{saved_model}: output shape {a.shape} differs from the Keras path's {b.shape}"
            )
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        diff = max(diff, float("nan") if np.isnan(d).any() else float(d.max()))
        same = got["labels"].numpy() == want["labels"].numpy()
        agreement = min(agreement, float(same.mean()))
        inputs.append({"shape": list(volume.shape), "spacing": [float(s) for s in spacing]})
    return {"max_abs_diff": diff, "label_agreement": agreement, "inputs": inputs}


def _verify(module: VolumeModule, saved_model: Path, tol: float, out: Path) -> dict:
    result = verify_volumetric_export(saved_model, module)
    if not result["max_abs_diff"] <= tol:  # NaN fails too
        raise ModelError(
            f"{out}: reloaded SavedModel differs from the Keras path by "
            f"{result['max_abs_diff']:.3g} (tolerance {tol}); export discarded"
        )
    return {
        **result,
        "tolerance": tol,
        "against": "the same VolumeModule graph run on the Keras model (normalisation, "
        "resampling, sliding window, resampling back)",
    }


def _card(
    cfg: Config,
    run: RunDir,
    checkpoint: str,
    plan: VolumePlan,
    module: VolumeModule,
    verification: dict,
) -> dict:
    """The model card of a 3D export (``medseg.json``), the Keras copy aside."""
    metrics = run.metrics()
    test = read_json(run.path / "test_metrics.json", missing_ok=True)
    if not metrics and test is not None:
        metrics = {"test": test}
    manifest = load_manifest(run.splits_path) if run.splits_path.exists() else {}
    labels = {str(k): v for k, v in sorted(plan.labels.items())}
    mirror = module.options["mirror"]
    axes = ", ".join(("slice", "row", "col")[a] for a in module.options["mirror_axes"])
    n_flips = 2 ** len(module.options["mirror_axes"])
    return {
        "format": "medseg-export/1",
        "task": "segmentation",
        "dims": DIMS,
        "model": cfg.model.name,
        "run": run.path.name,
        "checkpoint": checkpoint,
        "labels": labels,
        "classes": list(labels.values()),
        "channels": {str(k): v for k, v in sorted(plan.channels.items())},
        "modality": plan.modality,
        "num_outputs": module.num_classes,
        "input": {
            "name": "volume",
            "dtype": "float32",
            "layout": "DHWC",
            "shape": [-1, -1, -1, module.channels],
            "channels": module.channels,
            "spacing": {"name": "spacing", "dtype": "float32", "shape": [3], "unit": "mm"},
            "axes": "slice, row, col (as medseg.io's readers return a volume)",
            "note": "raw intensities, any shape and spacing: normalised and resampled to "
            "plan.target_spacing in-graph, predicted by sliding window, mapped back to the "
            "input's shape",
        },
        "layout": cfg.data.layout,
        "normalization": plan.normalization,
        "plan": plan.to_dict(),
        "sliding_window": dict(module.options),
        "resampling": "linear (tf.image.resize, half-pixel centres), skipped at the plan's "
        "spacing; probabilities are resampled back linearly, then arg-max",
        "outputs": ["probabilities", "labels"],
        "signatures": {
            SERVE_SIGNATURE: "volume [D, H, W, C] + spacing [3] -> probabilities [D, H, W, K] "
            "and labels [D, H, W] (preprocessing in-graph)"
        },
        "formats": ["savedmodel"],
        "ensemble": None,
        "tta": {
            "enabled": mirror,
            "transforms": f"the {n_flips} flips of the {axes} axes" if mirror else ["identity"],
            "combine": "mean_probability",
        },
        "batch_norm_folded": 0,
        "config_hash": cfg.hash(),
        "split_hash": manifest.get("hash"),
        "metrics": metrics,
        "verification": verification,
        "versions": {
            "medseg": medseg.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    }
