"""Volumes on the model's grid and back: resampling to a target spacing, and normalisation.

The resampling follows nnU-Net's: images by spline interpolation (order 3 by default, per
channel), label maps by nearest neighbour or by linear interpolation of their one-hot maps (then
the arg-max), all with :func:`scipy.ndimage.zoom` in ``grid_mode`` so that voxel *centres* and
the volume's outer edges line up (as ``skimage.transform.resize`` does for nnU-Net): a volume
resampled to its own spacing is returned unchanged, and the field of view (shape times spacing)
is kept.

Normalisation (``plan.normalization``): ``zscore`` per channel over the volume's voxels,
``ct`` clipped to ``plan.intensity_clip`` then scaled with the dataset's foreground mean and
std, or ``none``. :func:`prepare_case` normalises on the source grid, then resamples, in the order
the served model does it in its graph.

``plan`` is a :class:`medseg.data.fingerprint.VolumePlan` or any object with its fields
(``target_spacing``, ``normalization``, ``intensity_clip``, ``channel_mean``, ``channel_std``,
``labels``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.errors import ConfigError, DataError

#: Label resampling modes.
LABEL_MODES = ("nearest", "linear")
#: Smallest standard deviation a z-score divides by.
EPS = 1e-8


def target_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """The (D, H, W) shape of a volume of ``shape`` voxels at ``spacing`` once resampled to
    ``target_spacing`` (same field of view; rounded, at least 1 voxel per axis).

    Args:
        shape: (D, H, W) voxels (further axes, e.g. channels, are ignored).
        spacing: (slice, row, col) mm of the source.
        target_spacing: (slice, row, col) mm of the target.

    Raises:
        DataError: a spacing is not 3 positive numbers.
    """
    src = _spacing(spacing, "spacing")
    dst = _spacing(target_spacing, "target_spacing")
    size = np.asarray(shape[:3], dtype=np.float64) * src / dst
    return tuple(int(v) for v in np.maximum(np.round(size), 1).astype(int))  # type: ignore[return-value]


def _spacing(spacing: Sequence[float], name: str) -> np.ndarray:
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if values.size != 3 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise DataError(f"{name} must be 3 positive numbers (slice, row, col mm), got {spacing}")
    return values


def _check_image(array: np.ndarray) -> None:
    if array.ndim != 4:
        raise DataError(f"a volume must be D x H x W x C (4 axes), got shape {array.shape}")


def _check_labels(labels: np.ndarray) -> None:
    if labels.ndim != 3:
        raise DataError(f"a label map must be D x H x W (3 axes), got shape {labels.shape}")


def _zoom(volume: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """One 3D float32 volume resized to ``shape`` (voxel centres aligned, edge values kept)."""
    out = np.empty(shape, dtype=np.float32)
    factors = [n / s for n, s in zip(shape, volume.shape, strict=True)]
    ndimage.zoom(volume, factors, output=out, order=order, mode="nearest", grid_mode=True)
    return out


def resize_image(array: np.ndarray, shape: Sequence[int], order: int = 3) -> np.ndarray:
    """A D x H x W x C volume resized to ``shape`` (D, H, W), channel by channel.

    Args:
        array: the volume (any real dtype; channels last).
        shape: the (D, H, W) it is resized to.
        order: spline order, 0-5 (1 linear, 3 cubic).

    Returns:
        A float32 D' x H' x W' x C volume (a copy of the input when the shape is already right).
    """
    _check_image(array)
    shape = tuple(int(s) for s in shape[:3])
    if shape == array.shape[:3]:
        return array.astype(np.float32, copy=True)
    channels = [
        _zoom(np.asarray(array[..., c], dtype=np.float32), shape, order)
        for c in range(array.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def resize_labels(
    labels: np.ndarray,
    shape: Sequence[int],
    mode: str = "nearest",
    num_classes: int | None = None,
) -> np.ndarray:
    """A D x H x W label map resized to ``shape``.

    Args:
        labels: integer label map, 0 background.
        shape: the (D, H, W) it is resized to.
        mode: ``nearest`` (order 0), or ``linear``: each class's one-hot map is interpolated
            linearly and every voxel takes the class of the largest value (smoother borders).
        num_classes: classes of the one-hot maps for ``linear`` (None: ``labels.max() + 1``).

    Returns:
        The resized label map, in the input's dtype (a copy when the shape is already right).

    Raises:
        ConfigError: an unknown mode.
    """
    _check_labels(labels)
    if mode not in LABEL_MODES:
        raise ConfigError(f"volume.label_resampling must be one of {LABEL_MODES}, got {mode!r}")
    shape = tuple(int(s) for s in shape[:3])
    if shape == labels.shape:
        return labels.copy()
    if mode == "nearest":
        out = np.empty(shape, dtype=labels.dtype)
        factors = [n / s for n, s in zip(shape, labels.shape, strict=True)]
        ndimage.zoom(labels, factors, output=out, order=0, mode="nearest", grid_mode=True)
        return out
    classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    best = np.full(shape, -np.inf, dtype=np.float32)
    out = np.zeros(shape, dtype=labels.dtype)
    for k in range(classes):
        score = _zoom((labels == k).astype(np.float32), shape, 1)
        better = score > best
        out[better] = k
        best[better] = score[better]
    return out


def resample_image(
    array: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    order: int = 3,
) -> np.ndarray:
    """A D x H x W x C volume resampled from ``spacing`` to ``target_spacing`` (mm).

    Args:
        array: the volume, channels last.
        spacing: its (slice, row, col) spacing.
        target_spacing: the spacing it is resampled to.
        order: spline order (1 linear, 3 cubic as nnU-Net).

    Returns:
        A float32 volume of :func:`target_shape` voxels (a copy when the shape does not change).
    """
    _check_image(array)
    return resize_image(array, target_shape(array.shape, spacing, target_spacing), order)


def resample_labels(
    labels: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    mode: str = "nearest",
    num_classes: int | None = None,
) -> np.ndarray:
    """A D x H x W label map resampled from ``spacing`` to ``target_spacing`` (mm).

    Args:
        labels: integer label map.
        spacing: its (slice, row, col) spacing.
        target_spacing: the spacing it is resampled to.
        mode: ``nearest`` or ``linear`` (see :func:`resize_labels`).
        num_classes: classes for ``linear`` (None: from the map).

    Returns:
        The label map on the target grid, in the input's dtype.
    """
    _check_labels(labels)
    shape = target_shape(labels.shape, spacing, target_spacing)
    return resize_labels(labels, shape, mode, num_classes)


def _per_channel(values: Sequence[float], channels: int, key: str) -> np.ndarray:
    out = np.asarray(values, dtype=np.float32).reshape(-1)
    if out.size == 1:
        out = np.repeat(out, channels)
    if out.size != channels:
        raise ConfigError(f"plan.{key} has {out.size} values for {channels} channels")
    return out


def normalize_volume(array: np.ndarray, plan: Any) -> np.ndarray:
    """A D x H x W x C volume normalised as ``plan.normalization`` says.

    * ``zscore``: per channel, over all voxels of this volume, ``(x - mean) / max(std, 1e-8)``.
    * ``ct``: clip to ``plan.intensity_clip`` ([low, high]), then
      ``(x - plan.channel_mean[c]) / max(plan.channel_std[c], 1e-8)`` per channel.
    * ``none``: unchanged.

    Args:
        array: the volume, channels last.
        plan: a ``VolumePlan`` (or an object with its fields).

    Returns:
        A new float32 volume of the same shape.

    Raises:
        ConfigError: an unknown normalisation, or ``ct`` without its clip/mean/std values.
    """
    _check_image(array)
    mode = plan.normalization
    out = np.array(array, dtype=np.float32, copy=True)
    if mode == "none":
        return out
    if mode == "zscore":
        flat = out.reshape(-1, out.shape[-1]).astype(np.float64)
        mean, std = flat.mean(axis=0), flat.std(axis=0)
        out -= mean.astype(np.float32)
        out /= np.maximum(std, EPS).astype(np.float32)
        return out
    if mode == "ct":
        clip = list(plan.intensity_clip)
        if len(clip) != 2:
            raise ConfigError(f"plan.intensity_clip must be [low, high] for ct, got {clip}")
        mean = _per_channel(plan.channel_mean, out.shape[-1], "channel_mean")
        std = _per_channel(plan.channel_std, out.shape[-1], "channel_std")
        np.clip(out, clip[0], clip[1], out=out)
        out -= mean
        out /= np.maximum(std, EPS)
        return out
    raise ConfigError(f"plan.normalization must be zscore, ct or none, got {mode!r}")


def prepare_case(
    array: np.ndarray,
    spacing: Sequence[float],
    labels: np.ndarray | None,
    plan: Any,
    order: int = 3,
    label_mode: str = "nearest",
) -> tuple[np.ndarray, np.ndarray | None]:
    """A case on the model's grid: normalised on its own grid, then resampled to
    ``plan.target_spacing`` (image with spline ``order``, labels with ``label_mode``).

    Args:
        array: D x H x W x C volume.
        spacing: its (slice, row, col) spacing, mm.
        labels: its D x H x W label map, or None (prediction).
        plan: a ``VolumePlan`` (``normalization``, ``target_spacing``, ``labels`` ...).
        order: spline order for the image.
        label_mode: ``nearest`` or ``linear`` (one-hot, ``len(plan.labels)`` classes).

    Returns:
        (float32 image, label map or None) at the target spacing.

    Raises:
        DataError: the label map's shape differs from the image's.
    """
    _check_image(array)
    if labels is not None and tuple(labels.shape) != tuple(array.shape[:3]):
        raise DataError(
            f"label map shape {tuple(labels.shape)} differs from the image's {array.shape[:3]}"
        )
    image = resample_image(normalize_volume(array, plan), spacing, plan.target_spacing, order)
    if labels is None:
        return image, None
    num_classes = len(plan.labels) if getattr(plan, "labels", None) else None
    out = resample_labels(labels, spacing, plan.target_spacing, label_mode, num_classes)
    return image, out


def standard_orientation(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, ...]]:
    """How to reorder a volume's axes into medseg's standard orientation.

    The standard orientation is the one the NIfTI reader returns (:mod:`medseg.io.nifti`):
    slice index towards patient superior, row index towards posterior, column index towards the
    patient's left, as closely as the grid allows. A model trained on NIfTI volumes sees its
    training data this way; a DICOM series stored sagittally or coronally must be turned the
    same way before it is predicted, or the model sees its axes swapped.

    Args:
        affine: 4x4 (slice, row, col, 1) -> LPS mm of the volume.

    Returns:
        ``(axes, flips)``: ``to_standard`` transposes by ``axes``, then reverses each axis
        whose flip is true.
    """
    from nibabel.orientations import io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=float))  # per array axis: LPS axis, sign
    axes, flips = [], []
    for world in (2, 1, 0):  # S (+z), P (+y), L (+x) in LPS
        axis = int(np.flatnonzero(ornt[:, 0] == world)[0])
        axes.append(axis)
        flips.append(bool(ornt[axis, 1] < 0))
    return (axes[0], axes[1], axes[2]), tuple(flips)


def to_standard(array: np.ndarray, axes: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    """``array`` (D x H x W[ x C]) turned into the standard orientation
    (:func:`standard_orientation`)."""
    out = np.transpose(array, (*axes, *range(3, array.ndim)))
    index = tuple(slice(None, None, -1) if f else slice(None) for f in flips)
    return np.ascontiguousarray(out[index])


def from_standard(array: np.ndarray, axes: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    """The inverse of :func:`to_standard`: back to the volume's own axis order."""
    index = tuple(slice(None, None, -1) if f else slice(None) for f in flips)
    inverse = np.argsort(axes)
    return np.ascontiguousarray(np.transpose(array[index], (*inverse, *range(3, array.ndim))))
