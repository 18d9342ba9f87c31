"""Sliding-window inference over a whole volume, in TensorFlow (usable inside a ``tf.function``
whose volume shape is only known at run time).

The volume is covered by windows of the model's patch size (MONAI's ``sliding_window_inference``
and nnU-Net's predictor are the references):

* placement, per axis, as MONAI's ``_get_scan_interval`` + ``dense_patch_slices``: the step is
  ``int(patch * (1 - overlap))`` (at least 1), windows start at ``0, step, 2*step, ...`` and the
  last one is moved back so that it ends at the border (a 128^3 volume with 64^3 windows and
  overlap 0.5 takes 3 x 3 x 3 = 27 windows);
* a volume smaller than the patch is padded with zeros (half before, half after, as MONAI does)
  and the result is cropped back;
* each window's probabilities are weighted by a Gaussian importance map (sigma 1/8 of the
  window, nnU-Net's and MONAI's default) or uniformly, added into an accumulator of the volume's
  size by scatter-add on the window's index grid (the work is proportional to the windows'
  voxels, never to windows x volume), and the sum is divided by the accumulated weights;
* ``sw_batch`` windows go through the model per call;
* ``mirror`` averages each window's prediction over every combination of flips of the given
  spatial axes (``True``: all three, 8 combinations), nnU-Net's mirroring test-time
  augmentation; a model should be mirrored only along the axes its training flipped
  (:func:`medseg.data.augment3d.flip_axes`).

When one window covers the whole (padded) volume with uniform weights, the result is exactly one
forward pass of the model (with Gaussian weights, the same up to float rounding).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
from scipy.signal import windows

from medseg.errors import ConfigError

#: nnU-Net's and MONAI's Gaussian sigma, as a fraction of the window size.
SIGMA_SCALE = 0.125


def mirror_flips(mirror: bool | Sequence[int]) -> list[list[int]]:
    """The flips of mirror TTA over ``mirror``'s spatial axes (0 slice, 1 row, 2 col; ``True``:
    all three, ``False`` or none: no flip), as axes of a [batch, D, H, W, C] tensor; the first
    is the identity.

    Raises:
        ConfigError: an axis outside 0-2.
    """
    if isinstance(mirror, bool):
        axes = [0, 1, 2] if mirror else []
    else:
        axes = sorted({int(a) for a in mirror})
    if any(a not in (0, 1, 2) for a in axes):
        raise ConfigError(f"mirror axes: expected spatial axes 0, 1 or 2, got {list(mirror)}")
    tensor_axes = [a + 1 for a in axes]
    return [list(c) for n in range(len(axes) + 1) for c in itertools.combinations(tensor_axes, n)]


def _check_patch(patch_size: Sequence[int]) -> list[int]:
    patch = [int(p) for p in patch_size]
    if len(patch) != 3 or min(patch) < 1:
        raise ConfigError(f"patch_size: expected three sizes >= 1, got {list(patch_size)}")
    return patch


def _step(patch: int, overlap: float) -> int:
    """MONAI's scan interval: ``int(patch * (1 - overlap))``, at least 1."""
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap: must be in [0, 1), got {overlap}")
    return max(int(patch * (1.0 - overlap)), 1)


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """The Gaussian importance map of a window (float32, the window's shape).

    The separable Gaussian is centred on the window (``(p - 1) / 2``, as MONAI's), with sigma
    ``sigma_scale * p`` per axis; it is scaled to a maximum of 1, and zeros (underflow far from
    the centre) are replaced by the smallest non-zero value, so every voxel has some weight.

    Args:
        patch_size: the window's ``(D, H, W)``.
        sigma_scale: sigma as a fraction of the window's size.
    """
    patch = _check_patch(patch_size)
    g = np.ones(patch, np.float64)
    for axis, p in enumerate(patch):
        shape = [1, 1, 1]
        shape[axis] = p
        g = g * windows.gaussian(p, std=max(sigma_scale * p, 1e-6), sym=True).reshape(shape)
    g = (g / g.max()).astype(np.float32)  # zeros looked for after the cast: float32 underflow
    if (g == 0).any():
        g[g == 0] = g[g > 0].min()
    return g


def window_starts(size: int, patch: int, overlap: float) -> np.ndarray:
    """Start of every window along one axis (static NumPy version of the in-graph placement).

    A ``size`` below ``patch`` counts as ``patch`` (the volume is padded to the patch).

    Example:
        ``window_starts(128, 64, 0.5)`` is ``[0, 32, 64]``; ``window_starts(100, 64, 0.5)`` is
        ``[0, 32, 36]`` (the last window ends at the border).
    """
    step = _step(int(patch), overlap)
    span = max(int(size) - int(patch), 0)
    n = -(-span // step) + 1
    return np.minimum(np.arange(n) * step, span)


def window_grid(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> np.ndarray:
    """``[N, 3]`` starts of all windows over a ``(D, H, W)`` volume, slice axis slowest."""
    patch = _check_patch(patch_size)
    axes = [window_starts(s, p, overlap) for s, p in zip(shape, patch, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=-1)


def window_starts_graph(size: tf.Tensor, patch: int, overlap: float) -> tf.Tensor:
    """In-graph :func:`window_starts`: ``size`` a scalar int32 tensor, result int32 ``[n]``."""
    step = _step(int(patch), overlap)
    span = tf.maximum(tf.cast(size, tf.int32) - int(patch), 0)
    n = (span + step - 1) // step + 1
    return tf.minimum(tf.range(n, dtype=tf.int32) * step, span)


def window_grid_graph(shape: tf.Tensor, patch_size: Sequence[int], overlap: float) -> tf.Tensor:
    """In-graph :func:`window_grid`: ``shape`` int32 ``[3]``, result int32 ``[N, 3]``."""
    patch = _check_patch(patch_size)
    axes = [window_starts_graph(shape[i], patch[i], overlap) for i in range(3)]
    grid = tf.meshgrid(*axes, indexing="ij")
    return tf.stack([tf.reshape(g, [-1]) for g in grid], axis=-1)


def _patch_offsets(patch: Sequence[int]) -> tf.Tensor:
    """int32 ``[p0, p1, p2, 3]``: the voxel indices of a window starting at the origin."""
    grid = np.stack(np.meshgrid(*[np.arange(p) for p in patch], indexing="ij"), axis=-1)
    return tf.constant(grid.astype(np.int32))


def _as_probabilities(out) -> tf.Tensor:
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, list | tuple):  # a deep-supervision model: the full-resolution head
        out = out[0]
    return tf.cast(out, tf.float32)


def _predictor(
    predict_fn: Callable, mirror: bool | Sequence[int]
) -> Callable[[tf.Tensor], tf.Tensor]:
    """``predict_fn`` on a batch of windows, averaged over the flips of ``mirror``'s axes."""
    flips = mirror_flips(mirror)
    if len(flips) == 1:
        return lambda x: _as_probabilities(predict_fn(x))

    def mirrored(x: tf.Tensor) -> tf.Tensor:
        total = None
        for axes in flips:
            if axes:
                p = tf.reverse(_as_probabilities(predict_fn(tf.reverse(x, axes))), axes)
            else:
                p = _as_probabilities(predict_fn(x))
            total = p if total is None else total + p
        return total / float(len(flips))

    return mirrored


def sliding_window_inference(
    volume: tf.Tensor,
    predict_fn: Callable[[tf.Tensor], tf.Tensor],
    patch_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch: int = 4,
    gaussian: bool = True,
    mirror: bool | Sequence[int] = False,
    *,
    num_classes: int,
    sigma_scale: float = SIGMA_SCALE,
) -> tf.Tensor:
    """Probabilities over a whole volume from a model that takes windows of ``patch_size``.

    Args:
        volume: float ``[1, D, H, W, C]`` (any ``D, H, W``; dynamic shapes are fine in a
            ``tf.function``).
        predict_fn: maps float32 ``[b, *patch_size, C]`` to probabilities ``[b, *patch_size, K]``
            (e.g. ``lambda x: model(x, training=False)``); ``b <= sw_batch``.
        patch_size: the window ``(D, H, W)``.
        overlap: overlap of neighbouring windows, in ``[0, 1)``.
        sw_batch: windows per call of ``predict_fn``.
        gaussian: weight each window by :func:`gaussian_importance` (else uniformly).
        mirror: average each window over the flips of these spatial axes (0 slice, 1 row,
            2 col; ``True``: all three, the 8 flips; ``False``: none).
        num_classes: ``K``, the channels of ``predict_fn``'s output.
        sigma_scale: the Gaussian's sigma as a fraction of the window.

    Returns:
        float32 ``[1, D, H, W, K]``: the weighted mean of the windows' probabilities.

    Raises:
        ConfigError: a bad patch size, overlap, ``sw_batch`` or ``num_classes``.
    """
    patch = _check_patch(patch_size)
    for p in patch:
        _step(p, overlap)  # validates the overlap
    if int(sw_batch) < 1:
        raise ConfigError(f"sw_batch: must be >= 1, got {sw_batch}")
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes: must be >= 1, got {num_classes}")
    k, sw = int(num_classes), int(sw_batch)
    x = tf.convert_to_tensor(volume, tf.float32)
    spatial = tf.shape(x)[1:4]
    pad = tf.maximum(tf.constant(patch, tf.int32) - spatial, 0)
    before = pad // 2
    paddings = tf.concat(
        [
            tf.zeros([1, 2], tf.int32),
            tf.stack([before, pad - before], 1),
            tf.zeros([1, 2], tf.int32),
        ],
        0,
    )
    vol = tf.pad(x, paddings)[0]  # [D', H', W', C], each >= the patch
    padded = spatial + pad
    starts = window_grid_graph(padded, patch, overlap)
    offsets = _patch_offsets(patch)
    weight = gaussian_importance(patch, sigma_scale) if gaussian else np.ones(patch, np.float32)
    weight = tf.constant(weight[..., None])  # [p0, p1, p2, 1]
    predict = _predictor(predict_fn, mirror)
    n_windows = tf.shape(starts)[0]
    n_batches = (n_windows + sw - 1) // sw

    def body(i, acc):
        batch_starts = starts[i * sw : (i + 1) * sw]
        index = batch_starts[:, None, None, None, :] + offsets[None]  # [b, p0, p1, p2, 3]
        windows_in = tf.gather_nd(vol, index)
        probs = predict(windows_in)
        b = tf.shape(probs)[0]
        w = tf.broadcast_to(weight[None], tf.stack([b, *patch, 1]))
        update = tf.concat([probs * w, w], axis=-1)
        return i + 1, tf.tensor_scatter_nd_add(acc, index, update)

    acc = tf.zeros(tf.concat([padded, [k + 1]], 0), tf.float32)
    _, acc = tf.while_loop(
        lambda i, _: i < n_batches,
        body,
        [tf.constant(0), acc],
        shape_invariants=[tf.TensorShape([]), tf.TensorShape([None, None, None, k + 1])],
    )
    out = acc[..., :k] / acc[..., k:]
    out = tf.slice(out, tf.concat([before, [0]], 0), tf.concat([spatial, [k]], 0))
    return out[None]
