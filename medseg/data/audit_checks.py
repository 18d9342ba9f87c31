"""Dataset audit, the per-image checks: read every sample once and record what it holds.

:func:`read_records` reads every image (and mask, for segmentation) with the readers of
:mod:`medseg.io` in a thread pool, volumes once for all their slices, and gives one
:class:`Record` per sample: readable or not (with the problems), size, channels, stored bits, the
perceptual hash and a 32x32 thumbnail (for :mod:`medseg.data.audit_duplicates`), intensity sums
for an evenly spaced subset, and the mask's values and foreground fraction. The summaries
(:func:`size_summary`, :func:`intensity_summary`, :func:`segmentation_summary`) are parts of the
:func:`medseg.data.audit.audit` report.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from medseg.data.dedup import phash_array
from medseg.data.samples import Sample
from medseg.errors import DataError
from medseg.io import image_suffix, read_image, read_mask
from medseg.io.base import MIN_IMAGE_PIXELS
from medseg.io.plain import jpeg_data_problem

THUMB = 32
_JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})


@dataclass
class Record:
    """What reading one sample found."""

    ok: bool = False
    problems: list[str] = field(default_factory=list)
    height: int = 0
    width: int = 0
    channels: int = 0
    bits: int | None = None
    hash: int = 0
    thumb: np.ndarray | None = None  # THUMB*THUMB grey, zero mean, unit norm
    stats: tuple[float, float, float, float, int] | None = None  # sum, sumsq, min, max, n
    mask_values: tuple[int, ...] | None = None
    foreground: float | None = None


def _thumbnail(image: np.ndarray) -> np.ndarray:
    """A THUMB x THUMB grey thumbnail (box filter), zero mean and unit norm, flattened."""
    grey = image[..., 0] if image.shape[-1] == 1 else image @ np.array([0.299, 0.587, 0.114])
    small = PILImage.fromarray(np.ascontiguousarray(grey, np.float32)).resize(
        (THUMB, THUMB), PILImage.Resampling.BOX
    )
    a = np.asarray(small, np.float64).ravel()
    a = a - a.mean()
    norm = np.linalg.norm(a)
    return (a / norm if norm > 0 else a).astype(np.float32)


def _image_stats(a: np.ndarray) -> tuple[float, float, float, float, int]:
    a64 = a.astype(np.float64, copy=False)
    return (float(a64.sum()), float((a64 * a64).sum()), float(a.min()), float(a.max()), a.size)


def _inspect_slice(
    rec: Record, image: np.ndarray, mask: np.ndarray | None, with_stats: bool, where: str
) -> None:
    rec.height, rec.width, rec.channels = image.shape
    rec.hash = phash_array(image)
    rec.thumb = _thumbnail(image)
    if with_stats:
        rec.stats = _image_stats(image)
    if mask is None:
        rec.ok = True
        return
    if mask.shape != image.shape[:2]:
        rec.problems.append(
            f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
            f"{image.shape[1]}x{image.shape[0]}"
        )
    values = np.unique(mask)
    rec.mask_values = tuple(int(v) for v in values[:64])
    rec.foreground = float(np.count_nonzero(mask)) / max(mask.size, 1)
    rec.ok = True


def _small(rec: Record, where: str, min_size: int) -> None:
    """Note an image smaller than ``min_size`` pixels along a side (readable, but a problem)."""
    if rec.ok and min(rec.height, rec.width) < min_size:
        rec.problems.append(
            f"{where}: image is {rec.width}x{rec.height} pixels, smaller than the minimum "
            f"{min_size} along a side (--min-size)"
        )


def _read_2d(
    sample: Sample, with_stats: bool, segmentation: bool, min_size: int = MIN_IMAGE_PIXELS
) -> Record:
    rec = Record()
    try:
        img = read_image(sample.image)  # decodes every pixel (Pillow's load)
        if image_suffix(sample.image) in _JPEG_SUFFIXES:
            problem = jpeg_data_problem(Path(sample.image))
            if problem:  # Pillow decodes garbled JPEG data without an error
                raise DataError(problem)
        if img.is_volume:
            raise DataError(f"{sample.image}: expected a 2D image, got shape {img.array.shape}")
        rec.bits = img.meta.bits
        mask = read_mask(sample.target) if segmentation else None
        if mask is not None and mask.ndim != 2:
            raise DataError(f"{sample.target}: expected a 2D mask, got shape {mask.shape}")
        _inspect_slice(rec, img.array, mask, with_stats, str(sample.target or sample.image))
        _small(rec, str(sample.image), min_size)
    except DataError as e:
        rec.problems.append(str(e))
    return rec


def _read_volume(
    samples: list[Sample], with_stats: set[int], segmentation: bool, min_size: int
) -> list[Record]:
    """Records for the slices of one volume (read once); ``with_stats`` holds slice positions."""
    first = samples[0]
    try:
        img = read_image(first.image)
        mask = read_mask(first.target) if segmentation else None
    except DataError as e:
        return [Record(problems=[str(e)])] + [Record() for _ in samples[1:]]
    arr = img.array if img.is_volume else img.array[None]
    if mask is not None and mask.ndim == 2:
        mask = mask[None]
    out = []
    for pos, s in enumerate(samples):
        rec = Record(bits=img.meta.bits)
        k = s.index or 0
        if k >= len(arr) or (mask is not None and k >= len(mask)):
            rec.problems.append(f"{s.image}: slice {k} is outside the volume or its mask")
        else:
            m = None if mask is None else mask[k]
            _inspect_slice(rec, arr[k], m, pos in with_stats, f"{s.target}#{k}")
            if pos == 0:  # one line per volume: its slices share their size
                _small(rec, str(first.image), min_size)
        out.append(rec)
    return out


def read_records(
    samples: list[Sample],
    segmentation: bool,
    stats_idx: set[int],
    workers: int,
    min_size: int = MIN_IMAGE_PIXELS,
) -> list[Record]:
    """One :class:`Record` per sample, in order; each volume is read once for all its slices.

    Every image is decoded in full; a JPEG's compressed data is also checked
    (:func:`medseg.io.plain.jpeg_data_problem`): garbled data makes the image unreadable.

    Args:
        samples: the scanned samples.
        segmentation: read (and check) the masks too.
        stats_idx: positions of the samples whose intensity statistics are collected.
        workers: reading threads.
        min_size: images (or a volume's slices) with fewer pixels than this along a side are
            reported as a problem (they stay readable).

    Raises:
        DataError: ``min_size`` is below 1.
    """
    if min_size < 1:
        raise DataError(f"min_size must be >= 1, got {min_size}")
    flat = [i for i, s in enumerate(samples) if s.index is None]
    volumes: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        if s.index is not None:
            volumes[s.image].append(i)
    records: list[Record | None] = [None] * len(samples)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        flat_recs = pool.map(
            lambda i: _read_2d(samples[i], i in stats_idx, segmentation, min_size), flat
        )
        vol_jobs = {
            path: pool.submit(
                _read_volume,
                [samples[i] for i in idx],
                {p for p, i in enumerate(idx) if i in stats_idx},
                segmentation,
                min_size,
            )
            for path, idx in volumes.items()
        }
        for i, rec in zip(flat, flat_recs, strict=True):
            records[i] = rec
        for path, job in vol_jobs.items():
            for i, rec in zip(volumes[path], job.result(), strict=True):
                records[i] = rec
    return [r if r is not None else Record() for r in records]


def _distribution(values: Sequence[float], digits: int = 4) -> dict[str, float] | None:
    if not len(values):
        return None
    v = np.asarray(values, np.float64)
    q = np.percentile(v, [5, 25, 50, 75, 95])
    out = {"mean": float(v.mean()), "min": float(v.min())}
    out.update({f"p{p}": float(x) for p, x in zip((5, 25, 50, 75, 95), q, strict=True)})
    out["max"] = float(v.max())
    return {k: round(x, digits) for k, x in out.items()}


def intensity_summary(records: list[Record]) -> dict[str, Any]:
    """Mean, std, min and max of the stored values over the records with statistics."""
    stats = [r.stats for r in records if r.ok and r.stats is not None]
    if not stats:
        return {"n_images": 0}
    s = np.array(stats, np.float64)
    n = s[:, 4].sum()
    mean = s[:, 0].sum() / n
    var = max(s[:, 1].sum() / n - mean * mean, 0.0)
    image_means = s[:, 0] / s[:, 4]
    return {
        "n_images": len(stats),
        "mean": round(float(mean), 3),
        "std": round(float(np.sqrt(var)), 3),
        "min": float(s[:, 2].min()),
        "max": float(s[:, 3].max()),
        "image_mean": _distribution(image_means.tolist(), 3),
    }


def size_summary(records: list[Record]) -> dict[str, Any]:
    """Counts of the readable images' sizes, channels (grey/RGB) and stored bit depths."""
    ok = [r for r in records if r.ok]
    sizes = Counter(f"{r.width}x{r.height}" for r in ok)
    channels = Counter("grey" if r.channels == 1 else "rgb" for r in ok)
    bits = Counter(str(r.bits) if r.bits is not None else "unknown" for r in ok)
    return {
        "sizes": dict(sizes.most_common()),
        "channels": dict(sorted(channels.items())),
        "bits": dict(sorted(bits.items())),
        "dtype": "float32 (stored values; see medseg.io)",
    }


def segmentation_summary(records: list[Record]) -> dict[str, Any]:
    """Empty masks and the foreground fraction of the others."""
    fg = [r.foreground for r in records if r.ok and r.foreground is not None]
    non_empty = [f for f in fg if f > 0]
    return {
        "n_masks": len(fg),
        "empty_masks": len(fg) - len(non_empty),
        "empty_fraction": round((len(fg) - len(non_empty)) / len(fg), 4) if fg else None,
        "foreground_fraction": _distribution(non_empty, 5),
    }
