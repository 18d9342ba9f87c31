"""Averaging several models' probabilities: the one implementation of an ensemble's mean.

Every place that combines models (cross-validation's test ensemble, exports of fold ensembles,
the predictor's ``--with`` ensembles, out-of-fold tuning) uses these functions, so that an
ensemble means the same thing everywhere: the arithmetic mean of the members' probabilities,
with optional horizontal-flip test-time augmentation inside each member.

:func:`model_probabilities` builds the mean as graph ops (for exported signatures);
:func:`reference_probabilities` computes the same eagerly with NumPy (for checks and offline
work); :func:`mean_probabilities` averages probability arrays that are already computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from medseg.errors import ModelError

#: Axis flipped by test-time augmentation: the width of an NHWC batch.
FLIP_AXIS = 2
TTA_NOTE = (
    "applied to the preprocessed batch (model size); segmentation outputs of the flipped view "
    "are flipped back before the mean"
)


def as_model_list(models: keras.Model | Sequence[keras.Model]) -> list[keras.Model]:
    """One model or several -> a non-empty list of models.

    Raises:
        ModelError: no model was given.
    """
    models = [models] if isinstance(models, keras.Model) else list(models)
    if not models:
        raise ModelError("no model to combine")
    return models


def is_segmentation(model: keras.Model) -> bool:
    """Does ``model`` output NHWC maps (segmentation) rather than NxC scores?"""
    return len(model.output_shape) == 4


def mean_probabilities(probs: Sequence[np.ndarray]) -> np.ndarray:
    """The members' probability arrays (same shape) -> their mean, as float32.

    Accumulates in float64, so the result does not depend on the members' order.
    """
    if not len(probs):
        raise ModelError("no probabilities to average")
    return np.mean(np.stack([np.asarray(p, np.float64) for p in probs]), axis=0).astype(np.float32)


def model_probabilities(
    models: keras.Model | Sequence[keras.Model], x: tf.Tensor, tta: bool = False
) -> tf.Tensor:
    """Mean probabilities of ``models`` on a preprocessed NHWC batch, as graph ops.

    With ``tta`` each model also sees the horizontally flipped batch (stacked into one call);
    segmentation outputs of the flipped half are flipped back before the mean.
    """
    models = as_model_list(models)
    seg = is_segmentation(models[0])
    n = tf.shape(x)[0]
    xx = tf.concat([x, tf.reverse(x, [FLIP_AXIS])], 0) if tta else x
    total = None
    for m in models:
        p = tf.cast(m(xx, training=False), tf.float32)
        if tta:
            flipped = p[n:]
            p = (p[:n] + (tf.reverse(flipped, [FLIP_AXIS]) if seg else flipped)) / 2.0
        total = p if total is None else total + p
    return total / float(len(models))


def reference_probabilities(
    models: keras.Model | Sequence[keras.Model],
    x: np.ndarray,
    tta: bool = False,
    batch_size: int | None = None,
) -> np.ndarray:
    """What :func:`model_probabilities` computes, done eagerly: one Keras call per model, view
    and batch of ``batch_size`` images (default: all at once), flips and the mean in NumPy."""
    models = as_model_list(models)
    x = np.asarray(x, np.float32)
    step = batch_size or max(len(x), 1)
    parts = []
    for i in range(0, max(len(x), 1), step):
        xb = x[i : i + step]
        outs = []
        for m in models:
            outs.append(np.asarray(m(xb, training=False), np.float32))
            if tta:
                p = np.asarray(m(np.ascontiguousarray(np.flip(xb, FLIP_AXIS)), training=False))
                outs.append(np.flip(p, FLIP_AXIS) if is_segmentation(m) else p)
        parts.append(mean_probabilities(outs))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]
