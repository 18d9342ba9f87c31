"""From samples to ``tf.data`` pipelines.

Images are decoded once with the readers of :mod:`medseg.io`, converted to the configured number of
channels, resized and normalised (:func:`medseg.data.preprocess.preprocess_images`, the same ops
the exported model runs) and kept in memory as float32 NHWC; masks are resized with
nearest-neighbour interpolation and kept as integer label maps. Each epoch then shuffles,
augments (albumentations, training only), encodes targets and batches.

Targets as the model sees them:

* segmentation, ``num_classes == 1``: float32 ``[H, W, 1]`` with 1 where the label map is > 0;
* segmentation, ``num_classes >= 2``: one-hot float32 ``[H, W, num_classes]``;
* classification: one-hot float32 ``[num_classes]``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from medseg.config import DataConfig
from medseg.data.augment import apply_augment
from medseg.data.preprocess import preprocess_images, resize_masks
from medseg.data.scan import Sample
from medseg.errors import DataError
from medseg.io import read_image, read_mask, to_channels

logger = logging.getLogger(__name__)


@dataclass
class ArrayData:
    """Decoded, resized, normalised samples held in memory.

    Attributes:
        images: float32 [N, H, W, C], normalised.
        targets: uint8 label maps [N, H, W] (segmentation) or int32 class indices [N].
        samples: the samples in the same order.
        problems: ``"<file>: <problem>"`` for each sample that could not be loaded.
    """

    images: np.ndarray
    targets: np.ndarray
    samples: list[Sample]
    problems: list[str] = field(default_factory=list)


def load_image_2d(path: str, channels: int) -> np.ndarray:
    """Read a 2D image as float32 HxWxC with ``channels`` channels."""
    img = read_image(path)
    if img.is_volume:
        raise DataError(f"{path}: expected a 2D image, got a volume of shape {img.array.shape}")
    return to_channels(img.array, channels)


def _load_one(sample: Sample, cfg: DataConfig, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    size = tuple(cfg.image_size)
    image = load_image_2d(sample.image, cfg.channels)
    x = preprocess_images(tf.convert_to_tensor(image), size, cfg.normalization).numpy()
    if cfg.task == "classification":
        return x, np.int32(sample.target)
    mask = read_mask(sample.target)
    if mask.shape != image.shape[:2]:
        raise DataError(
            f"{sample.target}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
            f"{sample.image} is {image.shape[1]}x{image.shape[0]}"
        )
    if num_classes >= 2 and mask.max() >= num_classes:
        raise DataError(
            f"{sample.target}: mask holds label {int(mask.max())} but model.num_classes is "
            f"{num_classes}"
        )
    y = resize_masks(tf.convert_to_tensor(mask.astype(np.uint8)), size).numpy()
    return x, y


def load_arrays(
    samples: list[Sample], cfg: DataConfig, num_classes: int, strict: bool | None = None
) -> ArrayData:
    """Decode and preprocess ``samples`` (in parallel threads).

    Unreadable samples raise :class:`DataError` in strict mode; otherwise they are listed in
    :attr:`ArrayData.problems`, logged with their file names, and left out.
    """
    strict = cfg.strict if strict is None else strict
    if not samples:
        raise DataError("no samples to load")

    def job(s: Sample):
        try:
            return _load_one(s, cfg, num_classes)
        except DataError as e:
            if strict:
                raise
            return str(e)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(job, samples))
    problems = [r for r in results if isinstance(r, str)]
    kept = [(s, r) for s, r in zip(samples, results, strict=True) if not isinstance(r, str)]
    for p in problems:
        logger.warning("skipped: %s", p)
    if not kept:
        raise DataError(f"none of the {len(samples)} samples could be loaded, e.g. {problems[0]}")
    images = np.stack([r[0] for _, r in kept]).astype(np.float32)
    targets = np.stack([r[1] for _, r in kept])
    return ArrayData(images, targets, [s for s, _ in kept], problems)


def encode_targets(targets: tf.Tensor, task: str, num_classes: int) -> tf.Tensor:
    """Label maps or class indices -> what the loss expects (see the module docstring)."""
    if task == "classification":
        return tf.one_hot(tf.cast(targets, tf.int32), num_classes)
    if num_classes == 1:
        return tf.cast(targets > 0, tf.float32)[..., tf.newaxis]
    return tf.one_hot(tf.cast(targets, tf.int32), num_classes)


def make_dataset(
    data: ArrayData,
    *,
    task: str,
    num_classes: int,
    batch_size: int,
    augment=None,
    shuffle: bool = False,
    seed: int = 0,
) -> tf.data.Dataset:
    """A batched ``tf.data.Dataset`` of (image, target) over in-memory arrays.

    Args:
        data: arrays from :func:`load_arrays`.
        task: ``segmentation`` or ``classification``.
        num_classes: model output channels (1 = binary segmentation).
        batch_size: images per batch.
        augment: an albumentations pipeline (training) or None.
        shuffle: reshuffle every epoch.
        seed: shuffle seed.
    """
    images, targets = data.images, data.targets
    h, w, c = images.shape[1:]
    ds = tf.data.Dataset.range(len(images))
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)

    def fetch(i):
        i = int(i)
        x, y = images[i], targets[i]
        if augment is not None:
            x, y = apply_augment(augment, x, y if task == "segmentation" else None)
            if y is None:
                y = targets[i]
        return x.astype(np.float32), np.asarray(y, dtype=targets.dtype)

    target_shape = [h, w] if task == "segmentation" else []

    def load(i):
        x, y = tf.numpy_function(fetch, [i], [tf.float32, tf.as_dtype(targets.dtype)])
        x.set_shape([h, w, c])
        y.set_shape(target_shape)
        return x, encode_targets(y, task, num_classes)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
