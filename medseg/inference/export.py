"""Export a trained run as a self-contained SavedModel with a model card (``medseg export``).

The serving signature ``serve`` takes raw pixels and repeats the training preprocessing in-graph:

* input ``image``: float32 ``[batch, height, width, channels]``, any batch size and image size,
  raw intensities (e.g. 0-255, or Hounsfield units); ``channels`` as in ``medseg.json``;
* the graph normalises each image and brings it to the model's input size exactly as in training
  (:func:`medseg.data.preprocess.preprocess_images`);
* outputs: ``probabilities`` float32 resized back to the input's height and width (segmentation:
  ``[batch, height, width, K]``; classification: ``[batch, K]``), and ``mask`` int32
  ``[batch, height, width]`` (segmentation) or ``label`` int32 ``[batch]`` (classification).

A second signature ``model`` takes the already preprocessed batch (``image`` float32
``[batch, H, W, C]`` at the model size, normalised) and returns ``probabilities`` at the model
size; it is what the TFLite file holds.

What the graph computes from the preprocessed batch:

* one run: the model's probabilities;
* an ensemble (``ensemble=True``, automatic for a cross-validation run folder, i.e. one with
  ``ensemble.json``): the mean of the fold models' probabilities (all fold models live in the one
  SavedModel);
* test-time augmentation (``tta=True``): the mean of the probabilities of the batch and of its
  horizontal flip (segmentation outputs of the flipped batch are flipped back first); with an
  ensemble, the mean over every fold and both views.

Export folder::

    saved_model/      SavedModel (signatures serve and model)     format "savedmodel"
    model.tflite      TFLite, preprocessed input (see below)      format "tflite"
    model.keras       copy of the Keras checkpoint (one run), or
    folds/fold_<k>.keras  the fold checkpoints (ensemble), for tools that need the Keras graph
    medseg.json       model card

``medseg.json`` records the task, classes, input spec, normalisation, config and split hashes,
metrics, ensemble (folds, CV summary, CV manifest hash), TTA, formats, Keras copies, TFLite input
contract and versions. The SavedModel is reloaded and compared with the same computation done
eagerly with the Keras models (on inputs at the model size and at another size); if they disagree
by more than ``export.tolerance`` the export fails and nothing is written.

TFLite: antialiased resizing (``ScaleAndTranslate``) has no TFLite builtin kernel, so in-graph
preprocessing cannot be converted without TF select ops; the TFLite file therefore holds the
``model`` signature only (preprocessed ``[batch, H, W, C]`` -> ``probabilities`` at the model
size, builtin ops only, float32, dynamic batch) and callers normalise and resize as the card says
(``tflite.input = "preprocessed"``), then threshold or argmax themselves. The file is run with the
interpreter's default CPU delegate (XNNPACK) and compared with the Keras models; float32 kernels
of TFLite differ from TensorFlow's in rounding, so its tolerance is ``TFLITE_TOLERANCE_FACTOR``
times ``export.tolerance`` (1e-3 by default).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import medseg
from medseg.artifacts.cv import ENSEMBLE_NAME
from medseg.artifacts.exports import (
    CARD_NAME,
    FOLDS_DIR,
    KERAS_NAME,
    MODEL_SIGNATURE,
    SAVED_MODEL,
    SERVE_SIGNATURE,
    TFLITE_NAME,
    folder_kind,
)
from medseg.artifacts.runs import RunDir, load_run_model, open_run
from medseg.config import Config
from medseg.data.preprocess import Preprocessing
from medseg.data.split import load_manifest
from medseg.errors import ConfigError, ModelError, RunExistsError
from medseg.inference.export3d import export_volumetric
from medseg.inference.serving import model_function, serving_function
from medseg.models.ensemble import (
    TTA_NOTE,
    as_model_list,
    is_segmentation,
    reference_probabilities,
)
from medseg.models.fold import FoldedBatchNorm, fold_batch_norm
from medseg.models.loading import load_keras_model
from medseg.utils import (
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    read_json,
    replace_folder,
)

logger = logging.getLogger(__name__)

FORMATS = ("savedmodel", "tflite")
# TFLite float32 kernels (XNNPACK) round differently from TensorFlow's: allowed diff, relative to
# export.tolerance.
TFLITE_TOLERANCE_FACTOR = 10.0


def _normalize_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
    items = [formats] if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for f in items:
        for name in FORMATS if f == "both" else [f]:
            if name not in FORMATS:
                raise ConfigError(f"--format: '{f}' is not one of {', '.join(FORMATS)} (or 'both')")
            if name not in out:
                out.append(name)
    if not out:
        raise ConfigError("--format: give at least one of " + ", ".join(FORMATS))
    return tuple(out)


def _load_model(path: Path) -> keras.Model:
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found (has the fold finished an epoch?)")
    return load_keras_model(path)  # checksum, safe mode


def _ensemble_members(run: RunDir, checkpoint: str) -> list[dict]:
    """The folds of a CV run's ``ensemble.json``: fold number and checkpoint path."""
    spec = read_json(run.path / ENSEMBLE_NAME, missing_ok=True)
    if spec is None:
        raise ConfigError(
            f"{run.path}: --ensemble needs a cross-validation run folder (with {ENSEMBLE_NAME})"
        )
    if spec.get("combine", "mean_probability") != "mean_probability":
        raise ModelError(f"{run.path / ENSEMBLE_NAME}: unknown combine '{spec.get('combine')}'")
    members = []
    for f in spec.get("folds", []):
        path = (run.path / f["model"]).with_name(f"{checkpoint}.keras")
        members.append({"fold": int(f["fold"]), "path": path})
    if not members:
        raise ModelError(f"{run.path / ENSEMBLE_NAME}: lists no finished fold to export")
    return members


def _cv_summary(run: RunDir) -> dict | None:
    summary = read_json(run.path / "cv_summary.json", missing_ok=True)
    if summary is None:
        return None
    keys = ("k", "folds_done", "n_samples", "n_groups", "metrics", "test")
    return {k: summary[k] for k in keys if k in summary}


@dataclass
class _Export:
    """What one export is made of: the run, its models and the choices of the call."""

    run: RunDir
    cfg: Config
    checkpoint: str
    formats: tuple[str, ...]
    tta: bool
    members: list[dict]  # the folds of an ensemble (fold number, checkpoint); none for one run
    models: list[keras.Model]  # as trained: the reference of the verification
    served: list[keras.Model]  # batch norm folded: what the graphs run
    prep: Preprocessing

    @property
    def ensemble(self) -> bool:
        return bool(self.members)


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    checkpoint: str = "best",
    overwrite: bool = False,
    ensemble: bool = False,
    tta: bool = False,
    formats: str | Iterable[str] = ("savedmodel",),
) -> Path:
    """Export a run's model to ``out_dir`` (default ``<export.dir>/<run name>``).

    Args:
        run_dir: a run folder, or a cross-validation run folder (exported as an ensemble).
        out_dir: the export folder.
        checkpoint: ``best`` or ``last`` (of every fold, for an ensemble).
        overwrite: replace an existing export folder.
        ensemble: export the mean-probability ensemble of a CV run's folds (automatic when
            ``run_dir`` holds ``ensemble.json``).
        tta: horizontal-flip test-time augmentation in the graph (a ``unet3d`` run: mirror
            TTA over the 8 flips of each window).
        formats: ``savedmodel`` and/or ``tflite`` (``both`` for the two).

    Returns:
        The export folder (holding ``medseg.json``, ``saved_model/`` and/or ``model.tflite``,
        and the Keras checkpoint copies). A ``unet3d`` run is exported by
        :func:`medseg.inference.export3d.export_volumetric`.

    Raises:
        RunExistsError: ``out_dir`` exists and ``overwrite`` is false.
        ConfigError: unknown format, or ``ensemble`` on a folder that is not a CV run.
        DataError: the run's ``ensemble.json`` or ``cv_summary.json`` is not valid JSON.
        ModelError: a checkpoint cannot be loaded, the TFLite conversion fails, or the reloaded
            export disagrees with the Keras models.
    """
    start = time.perf_counter()
    formats = _normalize_formats(formats)
    run = open_run(run_dir)
    cfg = run.config()
    if cfg.model.name == "unet3d":  # volumetric: sliding window in the graph
        if ensemble or folder_kind(run.path) == "cv" or formats != ("savedmodel",):
            raise ConfigError(
                f"{run.path}: a unet3d run exports one run folder as a SavedModel (no ensemble, "
                "no tflite)"
            )
        mirror = True if tta else None
        return export_volumetric(
            run.path, out_dir, checkpoint=checkpoint, overwrite=overwrite, mirror=mirror
        )
    out = Path(out_dir) if out_dir else Path(cfg.export.dir) / run.path.name
    if out.exists() and not overwrite:
        raise RunExistsError(f"{out}: export folder exists; pass --overwrite to replace it")
    ensemble = ensemble or folder_kind(run.path) == "cv"
    members = _ensemble_members(run, checkpoint) if ensemble else []
    if ensemble:
        models = [_load_model(m["path"]) for m in members]
    else:
        models = [load_run_model(run, checkpoint)]
    # The exported graphs run the models with batch norm folded into the convolutions (faster;
    # the same function up to rounding, which the verification bounds).
    served = [fold_batch_norm(m) for m in models]
    prep = Preprocessing.from_config(cfg.data)
    job = _Export(run, cfg, checkpoint, formats, tta, members, models, served, prep)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_saved_model(job, tmp / SAVED_MODEL)
        verification, tflite = _verify(job, tmp, out)
        if "savedmodel" not in formats:
            shutil.rmtree(tmp / SAVED_MODEL)
        keras_files = _copy_checkpoints(run, checkpoint, members, tmp)
        manifest = load_manifest(run.splits_path) if run.splits_path.exists() else {}
        card = _card(cfg, run, checkpoint, manifest, models[0], prep, verification, tflite)
        card.update(_card_contents(job, manifest, keras_files, tmp))
        atomic_write_json(tmp / CARD_NAME, card)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "exported %s -> %s (%s%s%s; %.1fs)",
        run.path.name,
        out,
        "+".join(formats),
        f", ensemble of {len(models)}" if ensemble else "",
        ", tta" if tta else "",
        time.perf_counter() - start,
    )
    return out


def _write_saved_model(job: _Export, path: Path) -> None:
    """The SavedModel of the export, with its two signatures (see the module docstring)."""
    task, threshold = job.cfg.data.task, job.cfg.predict.threshold
    archive = keras.export.ExportArchive()
    for m in job.served:
        archive.track(m)
    archive.add_endpoint(
        SERVE_SIGNATURE, serving_function(job.served, task, job.prep, threshold, tta=job.tta)
    )
    archive.add_endpoint(MODEL_SIGNATURE, model_function(job.served, job.prep.size, tta=job.tta))
    archive.write_out(str(path), verbose=False)


def _verify(job: _Export, tmp: Path, out: Path) -> tuple[dict | None, dict | None]:
    """Check the SavedModel and write and check the TFLite file (each when asked for) against
    the Keras models; the ``verification`` and ``tflite`` entries of the card.

    Raises:
        ModelError: a format differs from the Keras models by more than its tolerance.
    """
    tol, tta = job.cfg.export.tolerance, job.tta
    verification = tflite = None
    if "savedmodel" in job.formats:
        max_diff = verify_export(tmp / SAVED_MODEL, job.models, job.prep, tta=tta)
        if not max_diff <= tol:  # NaN fails too
            raise ModelError(
                f"{out}: reloaded SavedModel differs from the Keras model(s) by "
                f"{max_diff:.3g} (tolerance {tol}); export discarded"
            )
        verification = {
            "max_abs_diff": max_diff,
            "tolerance": tol,
            "against": "the Keras model(s) run eagerly on the same preprocessed inputs"
            + (", mean over the folds" if job.ensemble else "")
            + (" and the horizontal flip" if tta else ""),
            "inputs": "random raw images at the model size and at another size",
        }
    if "tflite" in job.formats:
        convert_tflite(tmp / SAVED_MODEL, tmp / TFLITE_NAME)
        tfl_tol = tol * TFLITE_TOLERANCE_FACTOR
        tfl_diff = verify_tflite(tmp / TFLITE_NAME, job.models, job.prep, tta=tta)
        if not tfl_diff <= tfl_tol:
            raise ModelError(
                f"{out}: TFLite model differs from the Keras model(s) by {tfl_diff:.3g} "
                f"(tolerance {tfl_tol:g}); export discarded"
            )
        tflite = _tflite_card(job.models[0], job.prep, job.cfg.data.task, tfl_diff, tfl_tol)
    return verification, tflite


def _copy_checkpoints(run: RunDir, checkpoint: str, members: list[dict], dest: Path) -> list:
    """Copy the Keras checkpoint(s) into the export; returns their paths relative to it."""
    if not members:
        src = run.best_model if checkpoint == "best" else run.last_model
        shutil.copy2(src, dest / KERAS_NAME)
        return [KERAS_NAME]
    (dest / FOLDS_DIR).mkdir()
    files = []
    for m in members:
        name = f"{FOLDS_DIR}/fold_{m['fold']}.keras"
        shutil.copy2(m["path"], dest / name)
        files.append(name)
    return files


def _card(cfg, run, checkpoint, manifest, model, prep, verification, tflite) -> dict:
    """The model card's description of the model (see :func:`_card_contents` for the rest)."""
    task = cfg.data.task
    metrics = run.metrics()
    test = read_json(run.path / "test_metrics.json", missing_ok=True)
    if not metrics and test is not None:  # CV run: the ensemble on the held-out test split
        metrics = {"test": test}
    fields = prep.card_fields()
    return {
        "format": "medseg-export/1",
        "task": task,
        "model": cfg.model.name,
        "run": run.path.name,
        "checkpoint": checkpoint,
        "classes": manifest.get("class_names", []),
        "num_outputs": int(model.output_shape[-1]),
        "input": {
            "name": "image",
            "dtype": "float32",
            "layout": "NHWC",
            "channels": int(model.input_shape[-1]),
            "model_size": fields["model_size"],
            "resize": fields["resize"],
            "resize_note": "any input size is brought to model_size in-graph (stretch: "
            "bilinear antialiased resize; pad: fit keeping the aspect ratio, zero padding); "
            "segmentation outputs are mapped back to the input size",
        },
        "layout": cfg.data.layout,
        "slice_axis": cfg.data.slice_axis,
        "context_slices": cfg.data.context_slices,
        "normalization": fields["normalization"],
        "window": fields["window"],
        "threshold": cfg.predict.threshold,
        "outputs": ["probabilities", "label"]
        if task == "classification"
        else ["probabilities", "mask"],
        "config_hash": cfg.hash(),
        "split_hash": manifest.get("hash"),
        "metrics": metrics,
        "verification": verification,
        "tflite": tflite,
        "versions": {
            "medseg": medseg.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    }


def _card_contents(job: _Export, manifest: dict, keras_files: list, folder: Path) -> dict:
    """The model card's description of the export: formats, signatures, ensemble, TTA and the
    Keras copies (checksums of the files in ``folder``)."""
    savedmodel = "savedmodel" in job.formats
    return {
        "formats": list(job.formats),
        "batch_norm_folded": sum(
            isinstance(layer, FoldedBatchNorm)
            for m in job.served
            for layer in m._flatten_layers(include_self=False)
        ),
        "signatures": {
            SERVE_SIGNATURE: "raw pixels, any size -> probabilities and mask/label "
            "(preprocessing in-graph)",
            MODEL_SIGNATURE: "preprocessed [batch, *model_size, channels] -> probabilities "
            "at the model size",
        }
        if savedmodel
        else {},
        "ensemble": {
            "combine": "mean_probability",
            "folds": [
                {
                    "fold": m["fold"],
                    "source": m["path"].relative_to(job.run.path).as_posix(),
                    "keras": f,
                }
                for m, f in zip(job.members, keras_files, strict=True)
            ],
            "cv_summary": _cv_summary(job.run),
            "cv_manifest_hash": manifest.get("hash"),
        }
        if job.ensemble
        else None,
        "tta": {
            "enabled": bool(job.tta),
            "transforms": ["identity", "horizontal_flip"] if job.tta else ["identity"],
            "combine": "mean_probability",
            "note": TTA_NOTE if job.tta else None,
        },
        "keras": {
            "files": keras_files,
            "sha256": {f: file_sha256(folder / f) for f in keras_files},  # checked when loaded
            "note": "copies of the Keras checkpoints"
            + (" (one per fold; the export is their mean probability)" if job.ensemble else "")
            + "; they take the preprocessed batch (see input) and hold no TTA"
            + (
                f"; loading them needs the TF-Hub module at {job.cfg.model.hub_handle}"
                if job.cfg.model.hub_handle
                else ""
            ),
        },
    }


def _tflite_card(model, prep: Preprocessing, task, max_diff, tol) -> dict:
    size, channels, k = list(prep.size), int(model.input_shape[-1]), model.output_shape[-1]
    return {
        "file": TFLITE_NAME,
        "input": "preprocessed",
        "input_name": "image",
        "input_shape": [-1, *size, channels],
        "output": "probabilities",
        "output_shape": [-1, *size, int(k)] if task == "segmentation" else [-1, int(k)],
        "signature": MODEL_SIGNATURE,
        "preprocessing": f"normalise each image ({prep.method}), then resize to "
        f"{size[0]}x{size[1]} ({prep.policy}), as medseg.data.preprocess.preprocess_images; "
        "map segmentation outputs back with restore_size and threshold/argmax them yourself",
        "ops": "TFLITE_BUILTINS",
        "dtype": "float32",
        "delegate": "XNNPACK (the TF Lite interpreter's default CPU delegate)",
        "why_preprocessed": "antialiased resize (ScaleAndTranslate) has no TFLite builtin kernel",
        "verification": {"max_abs_diff": max_diff, "tolerance": tol},
    }


def _verification_inputs(size: Sequence[int], channels: int) -> list[np.ndarray]:
    """Raw 0-255 test batches: one at the model size (no resize), one at another size."""
    rng = np.random.default_rng(0)
    h, w = int(size[0]), int(size[1])
    other = (h + h // 2 + 1, max(1, (3 * w) // 4 + 1))
    return [
        rng.uniform(0, 255, (2, h, w, channels)).astype(np.float32),
        rng.uniform(0, 255, (2, *other, channels)).astype(np.float32),
    ]


def verify_export(
    saved_model: Path,
    model: keras.Model | Sequence[keras.Model],
    prep: Preprocessing,
    *,
    tta: bool = False,
) -> float:
    """Max abs difference between the reloaded SavedModel and the Keras model(s).

    Both sides normalise and resize with the same function; the reference then runs each Keras
    model eagerly (and on the flipped batch with ``tta``) and averages in NumPy
    (:func:`reference_probabilities`). Inputs are deterministic random raw images at the model
    size and at another size (segmentation references are mapped back with ``restore_size``).
    The ``model`` signature is checked on the preprocessed batch as well.
    """
    models = as_model_list(model)
    loaded = tf.saved_model.load(str(saved_model))
    serve = loaded.signatures[SERVE_SIGNATURE]
    model_sig = loaded.signatures.get(MODEL_SIGNATURE)
    seg = is_segmentation(models[0])
    diff = 0.0
    for raw in _verification_inputs(prep.size, models[0].input_shape[-1]):
        got = serve(image=tf.constant(raw))["probabilities"].numpy()
        x = prep.apply(tf.constant(raw)).numpy()
        want = reference_probabilities(models, x, tta)
        if model_sig is not None:
            got_m = model_sig(image=tf.constant(x))["probabilities"].numpy()
            diff = max(diff, _max_abs_diff(got_m, want))
        if seg:
            want = prep.restore(tf.constant(want), raw.shape[1:3])
        diff = max(diff, _max_abs_diff(got, np.asarray(want)))
    return diff


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ModelError(f"export output shape {a.shape} differs from the Keras model's {b.shape}")
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float("nan") if np.isnan(d).any() else float(d.max())


def convert_tflite(saved_model: Path, out: Path) -> Path:
    """Convert the ``model`` signature of an export's SavedModel to a float32 TFLite file.

    Only TFLite builtin ops are allowed (no TF select ops), so the file runs on the plain TFLite
    runtime. Converting from the SavedModel (rather than a concrete function) freezes the
    variables into constants; the concrete-function path keeps resource variables that the
    interpreter silently reads as garbage.

    Raises:
        ModelError: the conversion fails (e.g. an op without a builtin kernel).
    """
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model), signature_keys=[MODEL_SIGNATURE]
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        blob = converter.convert()
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise ModelError(
            f"{saved_model}: TFLite conversion failed ({type(e).__name__}: {msg[0] if msg else ''})"
        ) from None
    atomic_write_bytes(out, blob)
    return out


def tflite_interpreter(path: str | Path, num_threads: int | None = None):
    """A TFLite interpreter for ``path`` with the default delegates (XNNPACK on CPU): LiteRT's
    when ``ai_edge_litert`` is installed, else ``tf.lite.Interpreter``.

    Args:
        path: the ``.tflite`` file.
        num_threads: CPU threads of the interpreter and XNNPACK (default: all cores; the
            runtime's own default is one thread).
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        return Interpreter(model_path=str(path), num_threads=num_threads or os.cpu_count())


def run_tflite(path: str | Path, x: np.ndarray) -> np.ndarray:
    """Run an exported ``model.tflite`` on a preprocessed ``[batch, H, W, C]`` batch."""
    runner = tflite_interpreter(path).get_signature_runner(MODEL_SIGNATURE)
    return np.asarray(runner(image=np.ascontiguousarray(x, np.float32))["probabilities"])


def verify_tflite(
    path: Path,
    model: keras.Model | Sequence[keras.Model],
    prep: Preprocessing,
    *,
    tta: bool = False,
) -> float:
    """Max abs difference between the TFLite file and the Keras model(s) on preprocessed
    batches of 1 and 2 images (the second exercises the dynamic batch size)."""
    models = as_model_list(model)
    diff = 0.0
    for raw in _verification_inputs(prep.size, models[0].input_shape[-1]):
        x = prep.apply(tf.constant(raw)).numpy()
        for batch in (x[:1], x):
            got = run_tflite(path, batch)
            diff = max(diff, _max_abs_diff(got, reference_probabilities(models, batch, tta)))
    return diff
