"""Intensity normalisation and resizing as TensorFlow ops.

The same functions run in the training pipeline (``tf.data``) and inside the exported SavedModel's
serving signature, so that a served model sees exactly what the trained one saw. Each image is
normalised on its own at its native resolution, then brought to the model size:

* ``stretch``: bilinear, antialiased resize to the model size (aspect ratio not kept);
* ``pad``: resize to fit inside the model size keeping the aspect ratio, centre, pad with zeros.

:func:`restore_size` undoes either for segmentation outputs (crop the padding, resize back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tensorflow as tf

PERCENTILES = (0.5, 99.5)
_EPS = 1e-6


def _per_image_quantile(x: tf.Tensor, q: float) -> tf.Tensor:
    """``q``-th percentile of each image in an NHWC batch, shape [N, 1, 1, 1]."""
    flat = tf.sort(tf.reshape(x, [tf.shape(x)[0], -1]), axis=1)
    n = tf.shape(flat)[1]
    k = tf.cast(tf.round(q / 100.0 * tf.cast(n - 1, tf.float32)), tf.int32)
    return tf.reshape(flat[:, k], [-1, 1, 1, 1])


def _per_channel_quantile(x: tf.Tensor, q: float) -> tf.Tensor:
    """``q``-th percentile of each channel of each image in an NHWC batch, shape [N, 1, 1, C]."""
    chw = tf.transpose(x, [0, 3, 1, 2])
    flat = tf.sort(tf.reshape(chw, [tf.shape(x)[0], tf.shape(x)[3], -1]), axis=2)
    n = tf.shape(flat)[2]
    k = tf.cast(tf.round(q / 100.0 * tf.cast(n - 1, tf.float32)), tf.int32)
    return tf.expand_dims(tf.expand_dims(flat[:, :, k], 1), 1)


def normalize(images: tf.Tensor, method: str, window: tuple[float, float] | None = None):
    """Normalise each image of an NHWC float batch on its own (all channels together, except
    ``percentile_channel``).

    Args:
        images: float32 [N, H, W, C].
        method: ``minmax`` (to [0, 1]), ``percentile`` (clip to the 0.5-99.5th percentile, then
            [0, 1]), ``percentile_channel`` (the same for each channel on its own: for
            multi-sequence MRI stacked as channels, whose sequences differ in scale from scanner
            to scanner), ``zscore`` (zero mean, unit variance), ``window`` (clip to ``window`` =
            (centre, width), e.g. CT Hounsfield units, then [0, 1]) or ``none``.
        window: (centre, width) for ``window``.
    """
    x = tf.cast(images, tf.float32)
    if method == "none":
        return x
    if method == "zscore":
        mean, var = tf.nn.moments(x, axes=[1, 2, 3], keepdims=True)
        return (x - mean) / tf.sqrt(var + _EPS)
    if method == "window":
        if window is None:
            raise ValueError("normalization 'window' needs window=(centre, width)")
        lo, hi = window[0] - window[1] / 2.0, window[0] + window[1] / 2.0
        return (tf.clip_by_value(x, lo, hi) - lo) / (hi - lo)
    if method == "percentile":
        lo = _per_image_quantile(x, PERCENTILES[0])
        hi = _per_image_quantile(x, PERCENTILES[1])
        x = tf.clip_by_value(x, lo, hi)
    elif method == "percentile_channel":
        lo = _per_channel_quantile(x, PERCENTILES[0])
        hi = _per_channel_quantile(x, PERCENTILES[1])
        x = tf.clip_by_value(x, lo, hi)
    elif method == "minmax":
        lo = tf.reduce_min(x, axis=[1, 2, 3], keepdims=True)
        hi = tf.reduce_max(x, axis=[1, 2, 3], keepdims=True)
    else:
        raise ValueError(f"unknown normalization '{method}'")
    return (x - lo) / tf.maximum(hi - lo, _EPS)


def _fit_box(hw: tf.Tensor, size: tuple[int, int]) -> tuple[tf.Tensor, ...]:
    """(new_h, new_w, top, left) placing an image of size ``hw`` inside ``size``, aspect kept."""
    hw = tf.cast(hw, tf.float32)
    th, tw = float(size[0]), float(size[1])
    scale = tf.minimum(th / hw[0], tw / hw[1])
    nh = tf.clip_by_value(tf.cast(tf.round(hw[0] * scale), tf.int32), 1, size[0])
    nw = tf.clip_by_value(tf.cast(tf.round(hw[1] * scale), tf.int32), 1, size[1])
    return nh, nw, (size[0] - nh) // 2, (size[1] - nw) // 2


def resize_images(
    x: tf.Tensor, size: tuple[int, int], policy: str = "stretch", method: str = "bilinear"
) -> tf.Tensor:
    """Resize an NHWC batch to ``size`` with the ``stretch`` or ``pad`` policy."""
    antialias = method == "bilinear"
    if policy == "stretch":
        return tf.image.resize(x, size, method=method, antialias=antialias)
    if policy != "pad":
        raise ValueError(f"unknown resize policy '{policy}'")
    nh, nw, top, left = _fit_box(tf.shape(x)[1:3], size)
    x = tf.image.resize(x, tf.stack([nh, nw]), method=method, antialias=antialias)
    return tf.image.pad_to_bounding_box(x, top, left, size[0], size[1])


def restore_size(
    y: tf.Tensor, original_hw: tf.Tensor, size: tuple[int, int], policy: str = "stretch"
) -> tf.Tensor:
    """Map NHWC model outputs at ``size`` back to ``original_hw`` (inverse of resize_images)."""
    if policy == "pad":
        nh, nw, top, left = _fit_box(original_hw, size)
        y = tf.image.crop_to_bounding_box(y, top, left, nh, nw)
    return tf.image.resize(y, original_hw, method="bilinear")


def preprocess_images(
    images: tf.Tensor,
    size: tuple[int, int],
    method: str,
    *,
    window: tuple[float, float] | None = None,
    policy: str = "stretch",
) -> tf.Tensor:
    """Normalise (per image, native resolution), then resize an NHWC (or HWC) float batch."""
    single = images.shape.rank == 3
    x = images[tf.newaxis] if single else images
    x = normalize(tf.cast(x, tf.float32), method, window)
    x = resize_images(x, size, policy)
    return x[0] if single else x


def resize_masks(masks: tf.Tensor, size: tuple[int, int], policy: str = "stretch") -> tf.Tensor:
    """Resize integer label maps (HxW or NxHxW) with nearest-neighbour interpolation."""
    x = masks[..., tf.newaxis]
    single = x.shape.rank == 3
    x = x[tf.newaxis] if single else x
    x = resize_images(x, size, policy, method="nearest")
    x = x[0] if single else x
    return tf.cast(x[..., 0], masks.dtype)


#: The window of ``normalization: window`` when a model card records none (CT soft tissue).
DEFAULT_WINDOW = (40.0, 400.0)


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of its input: the one description of preprocessing.

    Built from a data config (training, evaluation, serving a run) or from an export's model
    card (serving an export), written into the model card, and applied as graph ops.

    Attributes:
        size: model input ``(height, width)``.
        method: intensity normalisation (``data.normalization``).
        window: ``(level, width)`` of ``window`` normalisation.
        policy: resize policy, ``stretch`` or ``pad``.
    """

    size: tuple[int, int]
    method: str
    window: tuple[float, float] = DEFAULT_WINDOW
    policy: str = "stretch"

    @classmethod
    def from_config(cls, data: Any) -> Preprocessing:
        """From a :class:`medseg.config.DataConfig` (``cfg.data``)."""
        return cls(
            size=tuple(data.image_size),
            method=data.normalization,
            window=tuple(data.window),
            policy=data.resize,
        )

    @classmethod
    def from_card(cls, card: dict) -> Preprocessing:
        """From an export's ``medseg.json`` model card."""
        window = card.get("window")
        return cls(
            size=tuple(card["input"]["model_size"]),
            method=card["normalization"],
            window=tuple(window) if window else DEFAULT_WINDOW,
            policy=card["input"].get("resize", "stretch"),
        )

    def card_fields(self) -> dict:
        """The model card's preprocessing fields (read back by :meth:`from_card`)."""
        return {
            "model_size": list(self.size),
            "resize": self.policy,
            "normalization": self.method,
            "window": list(self.window) if self.method == "window" else None,
        }

    def apply(self, images: tf.Tensor) -> tf.Tensor:
        """Raw NHWC (or HWC) pixels -> normalised model input (:func:`preprocess_images`)."""
        return preprocess_images(
            images, self.size, self.method, window=self.window, policy=self.policy
        )

    def restore(self, y: tf.Tensor, original_hw: tf.Tensor) -> tf.Tensor:
        """Model-size NHWC outputs -> the input's own size (:func:`restore_size`)."""
        return restore_size(y, original_hw, self.size, self.policy)
