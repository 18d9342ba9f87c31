"""Resize and intensity normalisation as TensorFlow ops.

The same function runs in the training pipeline (``tf.data``) and inside the exported SavedModel's
serving signature, so that a served model sees exactly what the trained one saw.
"""

from __future__ import annotations

import tensorflow as tf

PERCENTILES = (0.5, 99.5)
_EPS = 1e-6


def _per_image_quantile(x: tf.Tensor, q: float) -> tf.Tensor:
    """``q``-th percentile of each image in an NHWC batch, shape [N, 1, 1, 1]."""
    flat = tf.sort(tf.reshape(x, [tf.shape(x)[0], -1]), axis=1)
    n = tf.shape(flat)[1]
    k = tf.cast(tf.round(q / 100.0 * tf.cast(n - 1, tf.float32)), tf.int32)
    return tf.reshape(flat[:, k], [-1, 1, 1, 1])


def normalize(images: tf.Tensor, method: str) -> tf.Tensor:
    """Normalise each image of an NHWC float batch on its own (all channels together).

    Args:
        images: float32 [N, H, W, C].
        method: ``minmax`` (to [0, 1]), ``percentile`` (clip to the 0.5-99.5th percentile, then
            [0, 1]), ``zscore`` (zero mean, unit variance) or ``none``.
    """
    x = tf.cast(images, tf.float32)
    if method == "none":
        return x
    if method == "zscore":
        mean, var = tf.nn.moments(x, axes=[1, 2, 3], keepdims=True)
        return (x - mean) / tf.sqrt(var + _EPS)
    if method == "percentile":
        lo = _per_image_quantile(x, PERCENTILES[0])
        hi = _per_image_quantile(x, PERCENTILES[1])
        x = tf.clip_by_value(x, lo, hi)
    elif method == "minmax":
        lo = tf.reduce_min(x, axis=[1, 2, 3], keepdims=True)
        hi = tf.reduce_max(x, axis=[1, 2, 3], keepdims=True)
    else:
        raise ValueError(f"unknown normalization '{method}'")
    return (x - lo) / tf.maximum(hi - lo, _EPS)


def preprocess_images(images: tf.Tensor, size: tuple[int, int], method: str) -> tf.Tensor:
    """Resize an NHWC (or HWC) float batch to ``size`` (bilinear, antialiased), then normalise."""
    single = images.shape.rank == 3
    x = images[tf.newaxis] if single else images
    x = tf.image.resize(tf.cast(x, tf.float32), size, method="bilinear", antialias=True)
    x = normalize(x, method)
    return x[0] if single else x


def resize_masks(masks: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """Resize integer label maps (HxW or NxHxW) with nearest-neighbour interpolation."""
    x = masks[..., tf.newaxis]
    x = tf.image.resize(x, size, method="nearest")
    return tf.cast(x[..., 0], masks.dtype)
