"""Export a trained run as a self-contained SavedModel with a model card (``medseg export``).

The serving signature ``serve`` takes raw pixels and repeats the training preprocessing in-graph:

* input ``image``: float32 ``[batch, height, width, channels]``, any batch size and image size,
  raw intensities (e.g. 0-255, or Hounsfield units); ``channels`` as in ``medseg.json``;
* the graph normalises each image and brings it to the model's input size exactly as in training
  (:func:`medseg.data.preprocess.preprocess_images`);
* outputs: ``probabilities`` float32 resized back to the input's height and width (segmentation:
  ``[batch, height, width, K]``; classification: ``[batch, K]``), and ``mask`` int32
  ``[batch, height, width]`` (segmentation) or ``label`` int32 ``[batch]`` (classification).

``medseg.json`` beside ``saved_model/`` records the task, classes, input spec, normalisation,
config and split hashes, metrics and versions. The export is reloaded and compared with the Keras
model before it is kept; if they disagree by more than ``export.tolerance`` the export fails.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import medseg
from medseg.config import Config
from medseg.data.preprocess import preprocess_images, restore_size
from medseg.errors import ModelError, RunExistsError
from medseg.training.evaluate import load_run_model
from medseg.training.runs import open_run
from medseg.utils import atomic_write_json

logger = logging.getLogger(__name__)

CARD_NAME = "medseg.json"
SAVED_MODEL = "saved_model"


def preprocessing(cfg: Config) -> dict:
    """The preprocessing a run's model expects, as keyword arguments of ``preprocess_images``."""
    d = cfg.data
    return {
        "size": tuple(d.image_size),
        "method": d.normalization,
        "window": tuple(d.window),
        "policy": d.resize,
    }


def serving_function(model: keras.Model, task: str, prep: dict, threshold: float):
    """A ``tf.function`` from raw NHWC pixels to probabilities and masks/labels.

    Args:
        model: the trained Keras model.
        task: ``segmentation`` or ``classification``.
        prep: :func:`preprocessing` of the run's config.
        threshold: foreground threshold of binary segmentation masks.
    """
    channels = model.input_shape[-1]
    n_out = model.output_shape[-1]

    @tf.function(
        input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32, name="image")]
    )
    def serve(image):
        x = preprocess_images(image, **prep)
        probs = tf.cast(model(x, training=False), tf.float32)
        if task == "classification":
            return {"probabilities": probs, "label": tf.argmax(probs, -1, output_type=tf.int32)}
        probs = restore_size(probs, tf.shape(image)[1:3], prep["size"], prep["policy"])
        if n_out == 1:
            mask = tf.cast(probs[..., 0] > threshold, tf.int32)
        else:
            mask = tf.argmax(probs, -1, output_type=tf.int32)
        return {"probabilities": probs, "mask": mask}

    return serve


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    checkpoint: str = "best",
    overwrite: bool = False,
) -> Path:
    """Export a run's model to ``out_dir`` (default ``<export.dir>/<run name>``).

    Returns:
        The export folder (holding ``saved_model/`` and ``medseg.json``).

    Raises:
        RunExistsError: ``out_dir`` exists and ``overwrite`` is false.
        ModelError: the reloaded export disagrees with the Keras model.
    """
    run = open_run(run_dir)
    cfg = run.config()
    out = Path(out_dir) if out_dir else Path(cfg.export.dir) / run.path.name
    if out.exists() and not overwrite:
        raise RunExistsError(f"{out}: export folder exists; pass --overwrite to replace it")
    model = load_run_model(run, checkpoint)
    prep = preprocessing(cfg)
    serve = serving_function(model, cfg.data.task, prep, cfg.predict.threshold)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", serve)
        archive.write_out(str(tmp / SAVED_MODEL), verbose=False)
        max_diff = verify_export(tmp / SAVED_MODEL, model, prep)
        if max_diff > cfg.export.tolerance:
            raise ModelError(
                f"{out}: reloaded SavedModel differs from the Keras model by {max_diff:.3g} "
                f"(tolerance {cfg.export.tolerance}); export discarded"
            )
        manifest = json.loads(run.splits_path.read_text()) if run.splits_path.exists() else {}
        card = {
            "format": "medseg-export/1",
            "task": cfg.data.task,
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
                "model_size": list(prep["size"]),
                "resize": prep["policy"],
                "resize_note": "any input size is brought to model_size in-graph (stretch: "
                "bilinear antialiased resize; pad: fit keeping the aspect ratio, zero padding); "
                "segmentation outputs are mapped back to the input size",
            },
            "normalization": cfg.data.normalization,
            "window": list(prep["window"]) if cfg.data.normalization == "window" else None,
            "threshold": cfg.predict.threshold,
            "outputs": ["probabilities", "label"]
            if cfg.data.task == "classification"
            else ["probabilities", "mask"],
            "config_hash": cfg.hash(),
            "split_hash": manifest.get("hash"),
            "metrics": run.metrics(),
            "verification": {"max_abs_diff": max_diff, "tolerance": cfg.export.tolerance},
            "versions": {
                "medseg": medseg.__version__,
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
            },
        }
        atomic_write_json(tmp / CARD_NAME, card)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s -> %s (max abs diff %.2g)", run.path.name, out, max_diff)
    return out


def verify_export(saved_model: Path, model: keras.Model, prep: dict) -> float:
    """Max abs difference between the reloaded SavedModel and the Keras model on test inputs.

    The inputs are deterministic random images at the model size (so no resize is involved) in
    raw 0-255 range; both sides normalise with the same function.
    """
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 255, (2, *prep["size"], model.input_shape[-1])).astype(np.float32)
    loaded = tf.saved_model.load(str(saved_model))
    got = loaded.signatures["serve"](image=tf.constant(raw))["probabilities"].numpy()
    x = preprocess_images(tf.constant(raw), **prep)
    want = np.asarray(model(x, training=False), np.float32)
    return float(np.max(np.abs(got - want)))
