"""3D training patches: foreground-aware random sampling and the ``tf.data`` pipeline.

* :class:`PatchSampler`: random patches of preprocessed volumes (on the model's grid), a share
  of them centred on a voxel of a foreground class (the class drawn among those the case
  holds, from up to :data:`LOCATIONS_PER_CLASS` precomputed voxel locations per class and case,
  as nnU-Net's ``class_locations``), the others placed uniformly. Volumes smaller than the patch
  are padded (image 0, labels 0) with ``albumentations.PadIfNeeded3D``; patches are cut with
  numpy slicing at positions drawn from the caller's generator (albumentations'
  ``RandomCrop3D`` draws from its own).
* :func:`patch_dataset`: an infinite ``tf.data.Dataset`` of augmented batches
  (:func:`medseg.data.augment3d.augment_patch`), each element drawn from a generator seeded with
  ``(seed, element index)`` so that the stream is reproducible whatever the parallelism.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import numpy as np
import tensorflow as tf

from medseg.data.augment3d import augment_patch, sampling_shape
from medseg.errors import ConfigError, DataError

__all__ = ["LOCATIONS_PER_CLASS", "PatchSampler", "augment_patch", "patch_dataset"]

#: Foreground voxel locations kept per class and case (drawn at random when there are more).
LOCATIONS_PER_CLASS = 4000


def _class_locations(
    labels: np.ndarray, num_classes: int, rng: np.random.Generator
) -> dict[int, np.ndarray]:
    """Foreground class -> (N, 3) voxel indices (at most :data:`LOCATIONS_PER_CLASS`)."""
    out = {}
    for k in range(1, num_classes):
        where = np.argwhere(labels == k)
        if len(where) > LOCATIONS_PER_CLASS:
            where = where[rng.choice(len(where), LOCATIONS_PER_CLASS, replace=False)]
        if len(where):
            out[k] = where.astype(np.int32)
    return out


class PatchSampler:
    """Random training patches of a list of cases.

    Args:
        images: D x H x W x C float32 volumes (normalised, on the model's grid); every case has
            the same channels C.
        labels: the D x H x W integer label maps of the same cases.
        patch_size: (D, H, W) of a patch.
        num_classes: classes including background (labels are 0 .. num_classes - 1).
        foreground_share: probability that a patch is centred (with a random jitter of up to a
            quarter of the patch, the voxel staying inside it) on a voxel of a foreground class
            the case holds; otherwise the patch is placed uniformly at random.
        seed: seeds the subsampling of the class locations.
        context_size: (D, H, W) of the window :meth:`sample` cuts, centred on the patch and at
            least as large (None: the patch itself); beyond the (padded) volume it holds 0.
            Augmentation that rotates the patch samples its corners from this context.

    Raises:
        DataError: a case's label map does not match its image, or the channels differ.

    Example:
        >>> sampler = PatchSampler([image], [labels], (32, 32, 32), num_classes=3)
        >>> patch, patch_labels = sampler.sample(np.random.default_rng(0))
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        patch_size: Sequence[int],
        num_classes: int,
        foreground_share: float = 0.33,
        seed: int = 0,
        context_size: Sequence[int] | None = None,
    ):
        if not images or len(images) != len(labels):
            raise DataError(f"PatchSampler needs cases: {len(images)} images, {len(labels)} labels")
        self.patch_size = tuple(int(s) for s in patch_size[:3])
        self.num_classes = int(num_classes)
        self.foreground_share = float(foreground_share)
        self.context_size = tuple(int(s) for s in (context_size or patch_size)[:3])
        if any(c < p for c, p in zip(self.context_size, self.patch_size, strict=True)):
            raise ConfigError(
                f"context size {self.context_size} is smaller than the patch {self.patch_size}"
            )
        self.channels = int(images[0].shape[-1])
        rng = np.random.default_rng(seed)
        pad = A.Compose([A.PadIfNeeded3D(min_zyx=self.patch_size, fill=0, fill_mask=0, p=1.0)])
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.locations: list[dict[int, np.ndarray]] = []
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            self._check(i, image, label)
            image = np.asarray(image, dtype=np.float32)
            label = np.asarray(label, dtype=np.uint8)
            if any(s < p for s, p in zip(image.shape[:3], self.patch_size, strict=True)):
                padded = pad(volume=image, mask3d=label)
                image, label = padded["volume"], padded["mask3d"]
            self.images.append(image)
            self.labels.append(label)
            self.locations.append(_class_locations(label, self.num_classes, rng))

    def _check(self, index: int, image: np.ndarray, labels: np.ndarray) -> None:
        if image.ndim != 4 or image.shape[-1] != self.channels:
            raise DataError(
                f"case {index}: image must be D x H x W x {self.channels}, got {image.shape}"
            )
        if tuple(labels.shape) != tuple(image.shape[:3]):
            raise DataError(
                f"case {index}: label map {tuple(labels.shape)} differs from image {image.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataError(
                f"case {index}: labels must lie in 0..{self.num_classes - 1}, "
                f"got {int(labels.min())}..{int(labels.max())}"
            )

    def _start(self, case: int, rng: np.random.Generator) -> np.ndarray:
        """The patch's first voxel (D, H, W) in the padded volume of ``case``."""
        shape = np.asarray(self.labels[case].shape)
        patch = np.asarray(self.patch_size)
        room = shape - patch
        classes = sorted(self.locations[case])
        if classes and rng.random() < self.foreground_share:
            where = self.locations[case][classes[int(rng.integers(len(classes)))]]
            voxel = where[int(rng.integers(len(where)))]
            jitter = rng.integers(-(patch // 4), patch // 4 + 1)
            start = voxel - patch // 2 + jitter
        else:
            start = rng.integers(0, room + 1)
        return np.clip(start, 0, room)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One patch of a case drawn uniformly.

        Args:
            rng: the source of every random draw.

        Returns:
            (D x H x W x C float32 image, D x H x W uint8 labels) of ``context_size`` (the
            patch and its context).
        """
        case = int(rng.integers(len(self.images)))
        image, labels = self.images[case], self.labels[case]
        margin = (np.asarray(self.context_size) - np.asarray(self.patch_size)) // 2
        start = self._start(case, rng) - margin
        stop = start + np.asarray(self.context_size)
        low, high = np.maximum(start, 0), np.minimum(stop, labels.shape)
        window = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
        pad = [(int(a), int(b)) for a, b in zip(low - start, stop - high, strict=True)]
        if not any(a or b for a, b in pad):
            return image[window].copy(), labels[window].copy()
        return (
            np.pad(image[window], [*pad, (0, 0)]),
            np.pad(labels[window], pad),
        )


def downsampled_targets(onehot: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """A batch of one-hot maps at full, 1/2 and 1/4 resolution (nearest: every 2nd, 4th voxel)."""
    return onehot, onehot[:, ::2, ::2, ::2, :], onehot[:, ::4, ::4, ::4, :]


def patch_dataset(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    patch_size: Sequence[int],
    num_classes: int,
    batch_size: int,
    augment_cfg: Any,
    foreground_share: float,
    seed: int = 0,
    deep_supervision: bool = False,
) -> tf.data.Dataset:
    """An infinite dataset of augmented training batches of 3D patches.

    Patches are sampled larger than ``patch_size`` when rotation or elastic deformation is
    configured (:func:`medseg.data.augment3d.sampling_shape`) and augmented down to it. Element
    ``i`` is drawn from ``numpy.random.default_rng([seed, i])``: the same seed gives the same
    batches.

    Args:
        images: D x H x W x C float32 volumes (normalised, on the model's grid).
        labels: their D x H x W label maps (0 .. num_classes - 1).
        patch_size: (D, H, W) of a patch; divisible by 4 with ``deep_supervision``.
        num_classes: classes including background (K).
        batch_size: patches per batch (B).
        augment_cfg: the ``augment`` section.
        foreground_share: share of patches centred on a foreground voxel.
        seed: seeds the sampling and the augmentation.
        deep_supervision: y is ``(full, half, quarter)`` one-hot maps instead of one.

    Returns:
        A dataset of ``(x, y)``: x float32 [B, D, H, W, C]; y float32 one-hot [B, D, H, W, K],
        or with ``deep_supervision`` a tuple of it, [B, D/2, H/2, W/2, K] and
        [B, D/4, H/4, W/4, K]; all shapes static. It never ends (``take`` or
        ``steps_per_epoch`` bound it).

    Raises:
        ConfigError: a patch size of the wrong length, or not divisible by 4 with deep
            supervision.
    """
    size = tuple(int(s) for s in patch_size)
    if len(size) != 3 or min(size) < 1:
        raise ConfigError(f"train.patch_size must be 3 positive ints (D, H, W), got {list(size)}")
    if deep_supervision and any(s % 4 for s in size):
        raise ConfigError(
            f"train.patch_size {list(size)} must be divisible by 4 with model.deep_supervision"
        )
    context = sampling_shape(size, augment_cfg)
    sampler = PatchSampler(images, labels, size, num_classes, foreground_share, seed, context)
    channels = sampler.channels

    def draw(index: np.int64) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([int(seed), int(index)])
        image, label = sampler.sample(rng)
        image, label = augment_patch(image, label, augment_cfg, rng, out_shape=size)
        return image.astype(np.float32, copy=False), label.astype(np.uint8, copy=False)

    def element(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = tf.numpy_function(draw, [index], [tf.float32, tf.uint8], stateful=False)
        x = tf.ensure_shape(x, (*size, channels))
        y = tf.one_hot(tf.ensure_shape(tf.cast(y, tf.int32), size), num_classes, dtype=tf.float32)
        return x, y

    data = tf.data.Dataset.counter().map(
        element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    data = data.batch(batch_size, drop_remainder=True)
    if deep_supervision:
        data = data.map(
            lambda x, y: (x, downsampled_targets(y)), num_parallel_calls=tf.data.AUTOTUNE
        )
    return data.prefetch(tf.data.AUTOTUNE)
