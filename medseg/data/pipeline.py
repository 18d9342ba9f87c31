"""From samples to ``tf.data`` pipelines.

Each sample is decoded with the readers of :mod:`medseg.io` (a volume is read once for all of its
slices), converted to the configured number of channels, normalised and resized
(:func:`medseg.data.preprocess.preprocess_images`, the same ops the exported model runs); masks are
resized with nearest-neighbour interpolation and stay integer label maps. With ``data.cache`` the
results are kept in memory as float32 NHWC (:class:`ArrayData`); without it, every epoch decodes
the files again (:class:`LazyData`, for datasets larger than memory). Each epoch then shuffles,
optionally oversamples slices with tumour, augments (albumentations, training only, in parallel
with ``tf.numpy_function``), encodes targets and batches.

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
from pathlib import Path

import numpy as np
import tensorflow as tf

from medseg.config import Config, DataConfig
from medseg.data.augment import apply_augment, build_augment
from medseg.data.preprocess import Preprocessing, resize_masks
from medseg.data.samples import Sample, natural_key
from medseg.data.volumes import reslice, stack_slices
from medseg.errors import ConfigError, DataError
from medseg.io import read_image, read_mask, to_channels

logger = logging.getLogger(__name__)


def _preprocess(image: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """HxWxC or DxHxWxC raw pixels -> normalised, resized float32 (same rank)."""
    return Preprocessing.from_config(cfg).apply(tf.convert_to_tensor(image)).numpy()


def _check_mask(mask: np.ndarray, image: np.ndarray, sample: Sample, num_classes: int) -> None:
    if mask.shape != image.shape[:-1]:
        raise DataError(
            f"{sample.target}: mask shape {mask.shape} does not match its image "
            f"{sample.image} of shape {image.shape[:-1]}"
        )
    if num_classes >= 2 and mask.max() >= num_classes:
        raise DataError(
            f"{sample.target}: mask holds label {int(mask.max())} but model.num_classes is "
            f"{num_classes}"
        )


def load_samples(
    samples: list[Sample], cfg: DataConfig, num_classes: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Decode and preprocess samples that share one image file or volume.

    All samples must have the same ``image`` (and ``target`` for segmentation); a volume is read
    once and sliced at each sample's ``index``.

    Returns:
        ``(image [H, W, C] float32, target)`` per sample: a uint8 label map [H, W] or an int32
        class index.
    """
    first = samples[0]
    image = to_channels(read_image(first.image, channels=cfg.channels).array, cfg.channels)
    is_volume = image.ndim == 4
    if is_volume != (first.index is not None):
        raise DataError(
            f"{first.image}: expected a {'volume' if first.index is not None else '2D image'}, "
            f"got an array of shape {image.shape}"
        )
    mask = None
    if cfg.task == "segmentation":
        mask = read_mask(first.target)
        _check_mask(mask, image, first, num_classes)
    # volumes: samples are slices along cfg.slice_axis (see medseg.data.volumes)
    if is_volume:
        image = reslice(image, cfg.slice_axis)
        mask = reslice(mask, cfg.slice_axis) if mask is not None else None
        idx = [s.index for s in samples]
        bad = [i for i in idx if not 0 <= i < len(image)]
        if bad:
            raise DataError(f"{first.image}: slice {bad[0]} out of range (0..{len(image) - 1})")
        images = _preprocess(image[idx], cfg)
        masks = mask[idx] if mask is not None else None
    else:
        images = _preprocess(image, cfg)[np.newaxis]
        masks = mask[np.newaxis] if mask is not None else None
    if masks is None:
        return [(images[k], np.int32(s.target)) for k, s in enumerate(samples)]
    # all slices of the volume in one resize call, not one eager op per slice
    size = tuple(cfg.image_size)
    resized = resize_masks(tf.convert_to_tensor(masks.astype(np.uint8)), size, cfg.resize).numpy()
    return list(zip(images, resized, strict=True))


def by_source(samples: list[Sample]) -> list[list[int]]:
    """Indices of samples grouped by (image, target), in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        key = (s.image, s.target if isinstance(s.target, str) else None)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


@dataclass
class ArrayData:
    """Decoded, preprocessed samples held in memory.

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

    def __len__(self) -> int:
        return len(self.images)

    def fetch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[i], self.targets[i]

    def has_foreground(self) -> np.ndarray:
        """Per sample: does the target label map have foreground (segmentation only)."""
        return self.targets.reshape(len(self.targets), -1).max(axis=1) > 0


@dataclass
class LazyData:
    """Samples decoded again on every access (``data.cache: false``)."""

    samples: list[Sample]
    cfg: DataConfig
    num_classes: int
    shape: tuple[int, int, int]
    target_dtype: np.dtype
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def fetch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return load_samples([self.samples[i]], self.cfg, self.num_classes)[0]


def load_arrays(
    samples: list[Sample], cfg: DataConfig, num_classes: int, strict: bool | None = None
) -> ArrayData:
    """Decode and preprocess ``samples`` into memory (parallel threads, one read per volume).

    Unreadable samples raise :class:`DataError` in strict mode; otherwise they are listed in
    :attr:`ArrayData.problems`, logged with their file names, and left out.
    """
    strict = cfg.strict if strict is None else strict
    if not samples:
        raise DataError("no samples to load")
    groups = by_source(samples)

    def job(idx: list[int]):
        try:
            return load_samples([samples[i] for i in idx], cfg, num_classes)
        except DataError as e:
            if strict:
                raise
            return str(e)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(job, groups))
    problems, kept = [], []
    for idx, r in zip(groups, results, strict=True):
        if isinstance(r, str):
            problems.append(r if len(idx) == 1 else f"{r} ({len(idx)} slices)")
        else:
            kept.extend(zip(idx, r, strict=True))
    for p in problems:
        logger.warning("skipped: %s", p)
    if not kept:
        raise DataError(f"none of the {len(samples)} samples could be loaded, e.g. {problems[0]}")
    kept.sort(key=lambda t: t[0])
    images = np.stack([r[0] for _, r in kept]).astype(np.float32)
    targets = np.stack([r[1] for _, r in kept])
    kept_samples = [samples[i] for i, _ in kept]
    if cfg.context_slices:
        images = stack_context(images, kept_samples, cfg.context_slices)
    return ArrayData(images, targets, kept_samples, problems)


def slice_order(samples: list[Sample]) -> list[list[int]]:
    """Indices of ``samples`` per volume, each list in slice order.

    A volume is the image of slices of a volume (ordered by ``index``) or the folder of 2D slice
    files (``lgg``: a patient, ordered by the file names' natural order).
    """
    volumes: dict[str, list[tuple]] = {}
    for i, s in enumerate(samples):
        if s.index is not None:
            key, pos = s.image, [s.index]
        else:
            key, pos = str(Path(s.image).parent), natural_key(Path(s.image).name)
        volumes.setdefault(key, []).append((pos, i))
    return [[i for _, i in sorted(v)] for v in volumes.values()]


def stack_context(images: np.ndarray, samples: list[Sample], k: int) -> np.ndarray:
    """:func:`stack_slices` for every volume among ``samples`` (``images`` in sample order)."""
    out = np.empty((*images.shape[:3], images.shape[3] * (2 * k + 1)), np.float32)
    for order in slice_order(samples):
        out[order] = stack_slices(images[order], k)
    return out


def open_lazy(samples: list[Sample], cfg: DataConfig, num_classes: int) -> LazyData:
    """A :class:`LazyData` over ``samples``; decodes the first one to learn the shapes."""
    if not samples:
        raise DataError("no samples to load")
    if cfg.context_slices:
        raise ConfigError("data.context_slices needs data.cache: true")
    x, y = load_samples([samples[0]], cfg, num_classes)[0]
    return LazyData(samples, cfg, num_classes, x.shape, y.dtype)


def load_data(samples: list[Sample], cfg: DataConfig, num_classes: int) -> ArrayData | LazyData:
    """:func:`load_arrays` when ``cfg.cache`` is set, else :func:`open_lazy`."""
    return (
        load_arrays(samples, cfg, num_classes)
        if cfg.cache
        else open_lazy(samples, cfg, num_classes)
    )


def encode_targets(targets: tf.Tensor, task: str, num_classes: int) -> tf.Tensor:
    """Label maps or class indices -> what the loss expects (see the module docstring)."""
    if task == "classification":
        return tf.one_hot(tf.cast(targets, tf.int32), num_classes)
    if num_classes == 1:
        return tf.cast(targets > 0, tf.float32)[..., tf.newaxis]
    return tf.one_hot(tf.cast(targets, tf.int32), num_classes)


def _index_dataset(
    data: ArrayData | LazyData, shuffle: bool, seed: int, oversample_tumour: float
) -> tuple[tf.data.Dataset, int]:
    """Indices for one epoch, and how many there are."""
    n = len(data)
    if oversample_tumour > 0:
        if not isinstance(data, ArrayData):
            raise ConfigError("train.oversample_tumour needs data.cache: true")
        fg = data.has_foreground()
        pos, neg = np.flatnonzero(fg), np.flatnonzero(~fg)
        if len(pos) and len(neg):
            parts = [
                tf.data.Dataset.from_tensor_slices(ix).shuffle(len(ix), seed=seed + k).repeat()
                for k, ix in enumerate((pos, neg))
            ]
            weights = [oversample_tumour, 1.0 - oversample_tumour]
            ds = tf.data.Dataset.sample_from_datasets(parts, weights, seed=seed)
            return ds.take(n), n
        logger.warning(
            "oversample_tumour ignored: the split has %d slices with tumour and %d without",
            len(pos),
            len(neg),
        )
    ds = tf.data.Dataset.range(n)
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    return ds, n


def make_dataset(
    data: ArrayData | LazyData,
    *,
    task: str,
    num_classes: int,
    batch_size: int,
    augment=None,
    shuffle: bool = False,
    seed: int = 0,
    oversample_tumour: float = 0.0,
    deterministic: bool = False,
    shard: tuple[int, int] | None = None,
    patch_size: tuple[int, int] | list[int] | None = None,
) -> tf.data.Dataset:
    """A batched ``tf.data.Dataset`` of (image, target).

    Args:
        data: samples from :func:`load_arrays` (in memory) or :func:`open_lazy` (from disk).
        task: ``segmentation`` or ``classification``.
        num_classes: model output channels (1 = binary segmentation).
        batch_size: images per batch.
        augment: an albumentations pipeline (training) or None.
        shuffle: reshuffle every epoch.
        seed: shuffle seed.
        oversample_tumour: segmentation: expected fraction of each batch drawn from samples
            whose mask has foreground (0: the data's own mix).
        deterministic: augment in one thread, in order, so that a seeded run repeats exactly
            (slower; ``train.deterministic``).
        shard: ``(num_workers, worker_index)`` for multi-worker training: every worker builds
            the same epoch order (same seed), keeps the first ``num_workers * (n //
            num_workers)`` indices of it (a different few samples are left out each epoch) and
            takes every ``num_workers``-th one from ``worker_index``, before any image is read.
            The workers' parts are disjoint, equally long, and together cover the epoch.
            ``batch_size`` is then the global batch (``tf.distribute`` splits each batch across
            the replicas of all workers), TensorFlow's own auto-sharding is switched off, and
            the dataset's length is unknown (see the code).
        patch_size: ``[height, width]`` of the images ``augment`` returns when it ends with a
            crop (``train.patch_size``); None: the data's own size.
    """
    if isinstance(data, ArrayData):
        h, w, c = data.images.shape[1:]
        target_dtype = data.targets.dtype
    else:
        h, w, c = data.shape
        target_dtype = data.target_dtype
    if patch_size:
        if augment is None:
            raise ConfigError("make_dataset: a patch_size needs the augment pipeline that crops")
        h, w = patch_size
    ds, n = _index_dataset(data, shuffle, seed, oversample_tumour)
    if shard is not None:
        num_shards, index = shard
        ds = ds.take(shard_length(n, num_shards) * num_shards).shard(num_shards, index)

    def fetch(i):
        x, y = data.fetch(int(i))
        if augment is not None:
            x, y2 = apply_augment(augment, x, y if task == "segmentation" else None)
            y = y if y2 is None else y2
        return x.astype(np.float32), np.asarray(y, dtype=target_dtype)

    target_shape = [h, w] if task == "segmentation" else []

    def load(i):
        x, y = tf.numpy_function(fetch, [i], [tf.float32, tf.as_dtype(target_dtype)])
        x.set_shape([h, w, c])
        y.set_shape(target_shape)
        return x, encode_targets(y, task, num_classes)

    if deterministic:
        ds = ds.map(load)  # one call at a time, in order
    else:
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    if shard is not None:
        # tf.distribute splits each global batch over the replicas of *all* workers, and with
        # its own sharding off this worker's replicas take all the pieces, one step each: the
        # dataset then lasts num_workers times as many steps as its length says. An unknown
        # length makes Keras run until the data ends (the same step on every worker).
        ds = ds.filter(lambda x, y: True)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        ds = ds.with_options(options)
    return ds


def shard_length(n: int, num_shards: int) -> int:
    """Samples per worker and epoch when ``n`` samples are sharded over ``num_shards`` workers
    (see ``shard`` in :func:`make_dataset`)."""
    return n // num_shards


def prefetch_to_device(ds: tf.data.Dataset, device: str | None = None) -> tf.data.Dataset:
    """Let ``ds`` copy its next batches to ``device`` while the current step runs.

    With one GPU (``device`` None: the first visible GPU) the host-to-device copy then overlaps
    the step instead of starting it. Without a GPU, or with several (a distribution strategy
    distributes and prefetches the batches itself), ``ds`` is returned unchanged.
    """
    if device is None:
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) != 1:
            return ds
        device = gpus[0].name
    return ds.apply(tf.data.experimental.prefetch_to_device(device, buffer_size=2))


def class_weights(targets: np.ndarray, num_classes: int) -> dict[int, float]:
    """Inverse-frequency class weights (sklearn's ``balanced``) for ``model.fit``."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(targets)
    weights = compute_class_weight("balanced", classes=present, y=targets)
    out = {int(c): 1.0 for c in range(num_classes)}
    out.update({int(c): float(w) for c, w in zip(present, weights, strict=True)})
    return out


def training_dataset(
    data: ArrayData | LazyData,
    cfg: Config,
    num_classes: int,
    batch_size: int,
    shard: tuple[int, int] | None = None,
) -> tf.data.Dataset:
    """The training dataset of a 2D run as ``medseg train`` reads it: ``cfg.augment``'s
    pipeline, shuffled with ``train.seed``, tumour oversampling for segmentation, patches of
    ``train.patch_size`` (see :func:`make_dataset` for ``shard``)."""
    return make_dataset(
        data,
        task=cfg.data.task,
        num_classes=num_classes,
        batch_size=batch_size,
        augment=build_augment(
            cfg.augment,
            seed=cfg.train.seed,
            channels_per_slice=cfg.data.channels,
            patch_size=cfg.train.patch_size,
        ),
        patch_size=cfg.train.patch_size,
        shuffle=True,
        seed=cfg.train.seed,
        oversample_tumour=cfg.train.oversample_tumour if cfg.data.task == "segmentation" else 0,
        deterministic=cfg.train.deterministic,
        shard=shard,
    )
