"""Dataset audit: what is in a dataset folder, and what would go wrong when training on it.

:func:`audit` scans a folder (detecting its layout when none is given), reads every image (and
every mask of a segmentation layout) with the readers of :mod:`medseg.io`, and reports:

* counts: images, groups (after near-duplicate grouping), classes per split, splits;
* images: distinct sizes, grey/RGB counts, stored bit depths, intensity statistics over an evenly
  spaced sample of images;
* problems: unreadable files, images without masks and masks without images (from the scanner),
  masks whose size differs from their image, masks that are not binary (with their values);
* segmentation: the fraction of slices with an empty mask, the foreground fraction of the others;
* near-duplicates (perceptual hashes, :mod:`medseg.data.dedup`): groups of two or more images,
  their sizes and examples; within one class, across classes (one picture under two labels: a
  labelling problem), across the dataset's own ``Training``/``Testing`` split (``leaks``) and,
  for layouts with patient groups, across patients.

Near-duplicate pairs also get the correlation of their 32x32 grey thumbnails: a pair at or above
:data:`CONFIRM_CORRELATION` is "confirmed" (the same picture), the others are only similar-looking
(on the brain-tumour set, every cross-class pair is of this kind).

Paths in the report are relative to the dataset root. Patient ids from DICOM headers are never
read into the report (sample ids are file paths; group names are not listed), and for the
``dicom_series`` layout the patient folder names, usually the PatientID, are replaced by
:func:`pseudonym` everywhere but in ``root``.

With ``out_dir``, ``audit.json`` (the report) and ``montage.png`` (sample images per class, or
mask overlays for segmentation) are written there atomically. :func:`format_audit` gives a short
table for people.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from medseg.data import scan as scan_module
from medseg.data.dedup import (
    connected_labels,
    default_workers,
    existing_group_links,
    hamming_pairs,
    phash_array,
)
from medseg.data.scan import Sample, ScanResult
from medseg.errors import DataError
from medseg.io import read_image, read_mask, to_channels
from medseg.utils import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

REPORT_KEYS = (
    "root",
    "layout",
    "task",
    "n_images",
    "n_readable",
    "n_groups",
    "groups",
    "threshold",
    "classes",
    "classes_by_split",
    "splits",
    "images",
    "intensity",
    "problems",
    "non_binary_masks",
    "segmentation",
    "near_duplicate_groups",
    "cross_class_duplicates",
    "leaks",
    "seconds",
)
"""Top-level keys of every report (values may be empty or None where they do not apply)."""

MAX_EXAMPLES = 10  # groups listed as examples per finding
MAX_MEMBERS = 8  # paths listed per example group
MAX_LISTED = 200  # problems / non-binary masks / leaks listed in full up to this many
CONFIRM_CORRELATION = 0.95
"""Correlation of 32x32 grey thumbnails above which a hash-linked pair is the same picture.

On the brain-tumour MRI set, pairs with equal hashes correlate at >= 0.996 (5th percentile), while
hash-linked pairs across classes (similar-looking slices of different patients) stay below 0.95.
"""
THUMB = 32


@dataclass
class _Record:
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


# --------------------------------------------------------------------------------------------
# Scanning


def _detect_layout(root: Path) -> str:
    detect = getattr(scan_module, "detect_layout", None)
    if detect is None:
        raise DataError(f"{root}: no layout given and this medseg cannot detect one; pass layout")
    return detect(root)


def _scan(root: Path, layout: str, strict: bool, series: dict[str, str]) -> ScanResult:
    """Scan with the layout's own groups (patients), never with perceptual-hash groups."""
    kwargs: dict[str, Any] = {"strict": strict}
    params = inspect.signature(scan_module.scan_dataset).parameters
    if "group_by" in params:
        kwargs["group_by"] = "folder"
    if layout == "dicom_series":
        kwargs.update({k: v for k, v in series.items() if k in params})
    return scan_module.scan_dataset(root, layout, **kwargs)


# --------------------------------------------------------------------------------------------
# Reading


def _rel(text: str, root: Path) -> str:
    """``text`` with the dataset root taken off the paths it names."""
    for prefix in {str(root), str(root.resolve())}:
        text = text.replace(prefix.rstrip("/") + "/", "")
    return text


def _mask_name(sample: Sample, root: Path) -> str:
    name = _rel(str(sample.target), root)
    return f"{name}#{sample.index}" if sample.index is not None else name


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
    rec: _Record, image: np.ndarray, mask: np.ndarray | None, with_stats: bool, where: str
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


def _read_2d(sample: Sample, with_stats: bool, segmentation: bool) -> _Record:
    rec = _Record()
    try:
        img = read_image(sample.image)
        if img.is_volume:
            raise DataError(f"{sample.image}: expected a 2D image, got shape {img.array.shape}")
        rec.bits = img.meta.bits
        mask = read_mask(sample.target) if segmentation else None
        if mask is not None and mask.ndim != 2:
            raise DataError(f"{sample.target}: expected a 2D mask, got shape {mask.shape}")
        _inspect_slice(rec, img.array, mask, with_stats, str(sample.target or sample.image))
    except DataError as e:
        rec.problems.append(str(e))
    return rec


def _read_volume(samples: list[Sample], with_stats: set[int], segmentation: bool) -> list[_Record]:
    """Records for the slices of one volume (read once); ``with_stats`` holds slice positions."""
    first = samples[0]
    try:
        img = read_image(first.image)
        mask = read_mask(first.target) if segmentation else None
    except DataError as e:
        return [_Record(problems=[str(e)])] + [_Record() for _ in samples[1:]]
    arr = img.array if img.is_volume else img.array[None]
    if mask is not None and mask.ndim == 2:
        mask = mask[None]
    out = []
    for pos, s in enumerate(samples):
        rec = _Record(bits=img.meta.bits)
        k = s.index or 0
        if k >= len(arr) or (mask is not None and k >= len(mask)):
            rec.problems.append(f"{s.image}: slice {k} is outside the volume or its mask")
        else:
            m = None if mask is None else mask[k]
            _inspect_slice(rec, arr[k], m, pos in with_stats, f"{s.target}#{k}")
        out.append(rec)
    return out


def _read_all(
    samples: list[Sample], segmentation: bool, stats_idx: set[int], workers: int
) -> list[_Record]:
    flat = [i for i, s in enumerate(samples) if s.index is None]
    volumes: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        if s.index is not None:
            volumes[s.image].append(i)
    records: list[_Record | None] = [None] * len(samples)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        flat_recs = pool.map(lambda i: _read_2d(samples[i], i in stats_idx, segmentation), flat)
        vol_jobs = {
            path: pool.submit(
                _read_volume,
                [samples[i] for i in idx],
                {p for p, i in enumerate(idx) if i in stats_idx},
                segmentation,
            )
            for path, idx in volumes.items()
        }
        for i, rec in zip(flat, flat_recs, strict=True):
            records[i] = rec
        for path, job in vol_jobs.items():
            for i, rec in zip(volumes[path], job.result(), strict=True):
                records[i] = rec
    return [r if r is not None else _Record() for r in records]


# --------------------------------------------------------------------------------------------
# Summaries


def _distribution(values: Sequence[float], digits: int = 4) -> dict[str, float] | None:
    if not len(values):
        return None
    v = np.asarray(values, np.float64)
    q = np.percentile(v, [5, 25, 50, 75, 95])
    out = {"mean": float(v.mean()), "min": float(v.min())}
    out.update({f"p{p}": float(x) for p, x in zip((5, 25, 50, 75, 95), q, strict=True)})
    out["max"] = float(v.max())
    return {k: round(x, digits) for k, x in out.items()}


def _intensity(records: list[_Record]) -> dict[str, Any]:
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


def _size_summary(records: list[_Record]) -> dict[str, Any]:
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


def _segmentation(records: list[_Record]) -> dict[str, Any]:
    fg = [r.foreground for r in records if r.ok and r.foreground is not None]
    non_empty = [f for f in fg if f > 0]
    return {
        "n_masks": len(fg),
        "empty_masks": len(fg) - len(non_empty),
        "empty_fraction": round((len(fg) - len(non_empty)) / len(fg), 4) if fg else None,
        "foreground_fraction": _distribution(non_empty, 5),
    }


def _group_summary(members: list[list[int]], samples: list[Sample]) -> dict[str, Any]:
    members = sorted(members, key=lambda m: (-len(m), min(samples[i].id for i in m)))
    return {
        "n_groups": len(members),
        "n_images": int(sum(len(m) for m in members)),
        "examples": [
            sorted(samples[i].id for i in m)[:MAX_MEMBERS] for m in members[:MAX_EXAMPLES]
        ],
    }


def _differs(values: list, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Whether ``values[rows[k]]`` and ``values[cols[k]]`` are both set and differ, per pair."""
    out = [
        values[a] is not None and values[b] is not None and values[a] != values[b]
        for a, b in zip(rows.tolist(), cols.tolist(), strict=True)
    ]
    return np.array(out, dtype=bool)


def _interleave(members: list[int], key, samples: list[Sample]) -> list[int]:
    """``members`` ordered round-robin over ``key`` (e.g. class), each key's members by id."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for i in sorted(members, key=lambda i: samples[i].id):
        by_key[key(i)].append(i)
    lists = [by_key[k] for k in sorted(by_key)]
    return [i for row in zip_longest(*lists) for i in row if i is not None]


def _by_split(members: list[int], samples: list[Sample]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for i in sorted(members, key=lambda i: samples[i].id):
        out[str(samples[i].split)].append(samples[i].id)
    return {k: out[k] for k in sorted(out, key=_split_key)}


def _split_key(split: str) -> tuple[int, str]:
    """Training before Testing, then other names alphabetically."""
    order = ("Training", "Testing")
    return (order.index(split) if split in order else len(order), split)


def _pair_summary(
    sel: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    dist: np.ndarray,
    corr: np.ndarray,
    name,
    limit: int = MAX_EXAMPLES,
) -> dict[str, Any]:
    """Counts and the closest examples of the linked pairs ``sel`` (a boolean mask)."""
    order = np.flatnonzero(sel)
    order = order[np.lexsort((dist[order], -corr[order]))]
    return {
        "n_pairs": int(sel.sum()),
        "n_confirmed_pairs": int((sel & (corr >= CONFIRM_CORRELATION)).sum()),
        "closest_pairs": [
            {
                "a": name(int(rows[k])),
                "b": name(int(cols[k])),
                "distance": int(dist[k]),
                "correlation": round(float(corr[k]), 4),
            }
            for k in order[:limit]
        ],
    }


def _near_duplicates(
    samples: list[Sample],
    records: list[_Record],
    class_names: list[str],
    threshold: int,
) -> dict[str, Any]:
    """Near-duplicate findings; also the number of groups a phash-grouped split would use.

    Groups are the connected components of the hash graph (what a phash-grouped split keeps
    together). Pairs are its edges; each pair also gets the correlation of the two images'
    32x32 grey thumbnails, and a pair with correlation >= :data:`CONFIRM_CORRELATION` counts as
    confirmed (the same picture, not just a similar-looking slice).
    """
    ok = np.array([i for i, r in enumerate(records) if r.ok], np.int64)
    hashes = np.array([records[i].hash for i in ok], dtype=np.uint64)
    r, c = hamming_pairs(hashes, threshold)
    rows, cols = ok[r], ok[c]  # sample indices
    dist = np.bitwise_count(hashes[r] ^ hashes[c]).astype(np.int64)
    if len(ok):
        thumbs = np.stack([records[i].thumb for i in ok])
        corr = np.einsum("ij,ij->i", thumbs[r], thumbs[c]) if len(r) else np.zeros(0)
    else:
        corr = np.zeros(0)
    labels = connected_labels(len(ok), [(r, c)])
    comps: dict[int, list[int]] = defaultdict(list)
    for pos, label in enumerate(labels.tolist()):
        comps[label].append(int(ok[pos]))
    groups = [m for m in comps.values() if len(m) > 1]
    identical = connected_labels(len(ok), [(r[dist == 0], c[dist == 0])])
    n_identical = int((np.bincount(identical) > 1).sum()) if len(ok) else 0

    def label_of(i: int) -> str:
        t = samples[i].target
        return class_names[t] if isinstance(t, int) and 0 <= t < len(class_names) else ""

    def name(i: int) -> str:
        lab = label_of(i)
        return f"{samples[i].id} ({lab})" if lab else samples[i].id

    classification = bool(class_names)
    own_groups = len({s.group for s in samples}) < len(samples)
    within: Counter[str] = Counter()
    across_classes, leaks, across_groups = [], [], []
    for m in groups:
        if classification:
            labels_in = {label_of(i) for i in m}
            if len(labels_in) == 1:
                within[next(iter(labels_in))] += 1
            else:
                across_classes.append(m)
        if len({samples[i].split for i in m if samples[i].split is not None}) > 1:
            leaks.append(m)
        if own_groups and len({samples[i].group for i in m}) > 1:
            across_groups.append(m)

    # Groups a split would use: near-duplicates joined with the layout's own groups.
    links = existing_group_links([samples[i].group for i in ok])
    merged = connected_labels(len(ok), [(r, c), links])
    # Unreadable samples keep their layout group; count those groups that no readable sample has.
    unread_groups = {s.group for s in samples} - {samples[i].group for i in ok.tolist()}
    n_groups = len(set(merged.tolist())) + len(unread_groups)

    summary = _group_summary(groups, samples)
    summary["largest"] = sorted((len(m) for m in groups), reverse=True)[:MAX_EXAMPLES]
    summary["identical_hash_groups"] = n_identical
    summary["n_pairs"] = len(rows)
    summary["n_confirmed_pairs"] = int((corr >= CONFIRM_CORRELATION).sum())
    summary["confirm_correlation"] = CONFIRM_CORRELATION
    if classification:
        summary["within_class"] = {cname: within.get(cname, 0) for cname in class_names}
    if own_groups:
        across = _differs([s.group for s in samples], rows, cols)
        summary["across_groups"] = {
            **_group_summary(across_groups, samples),
            **_pair_summary(across, rows, cols, dist, corr, name),
        }

    cross = None
    if classification:
        sel = _differs([s.target for s in samples], rows, cols)
        cross = {
            **_group_summary(across_classes, samples),
            **_pair_summary(sel, rows, cols, dist, corr, name),
        }
        cross["examples"] = [
            [name(i) for i in _interleave(m, label_of, samples)][:MAX_MEMBERS]
            for m in sorted(across_classes, key=lambda m: (-len(m), min(samples[i].id for i in m)))[
                :MAX_EXAMPLES
            ]
        ]
    split_of = [s.split for s in samples]
    sel = _differs(split_of, rows, cols)
    leak = {
        "splits": sorted({s for s in split_of if s is not None}, key=_split_key),
        **_group_summary(leaks, samples),
        **_pair_summary(sel, rows, cols, dist, corr, name),
        "n_images_by_split": dict(
            sorted(
                Counter(str(samples[i].split) for m in leaks for i in m).items(),
                key=lambda kv: _split_key(kv[0]),
            )
        ),
        "groups": [_by_split(m, samples) for m in leaks[:MAX_LISTED]],
    }
    return {
        "near_duplicate_groups": summary,
        "cross_class_duplicates": cross,
        "leaks": leak,
        "n_groups": n_groups,
    }


# --------------------------------------------------------------------------------------------
# Montage


def _pick(indices: list[int], k: int) -> list[int]:
    if len(indices) <= k:
        return indices
    return [indices[int(round(x))] for x in np.linspace(0, len(indices) - 1, k)]


def _load_for_display(sample: Sample, segmentation: bool):
    img = read_image(sample.image).array
    mask = read_mask(sample.target) if segmentation else None
    if sample.index is not None:
        img = img[sample.index] if img.ndim == 4 else img
        mask = mask[sample.index] if mask is not None and mask.ndim == 3 else mask
    return img, mask


def write_montage(
    path: str | Path,
    samples: list[Sample],
    records: list[_Record] | None = None,
    class_names: Sequence[str] = (),
    per_row: int = 6,
    rows: int = 3,
) -> Path:
    """A PNG grid of sample images: one row per class, or mask overlays for segmentation.

    Images are picked evenly through each class (or, for segmentation, through the slices with a
    non-empty mask, then the others), so the montage is the same on every run.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from medseg.data.overlay import overlay, to_display

    records = records or [_Record(ok=True) for _ in samples]
    readable = [i for i, r in enumerate(records) if r.ok]
    segmentation = bool(samples) and isinstance(samples[0].target, str)
    if class_names and not segmentation:
        grid = [
            (name, _pick([i for i in readable if samples[i].target == c], per_row))
            for c, name in enumerate(class_names)
        ]
    else:
        fg = [i for i in readable if (records[i].foreground or 0) > 0]
        rest = [i for i in readable if i not in set(fg)]
        chosen = _pick(fg, per_row * rows)
        chosen += _pick(rest, per_row * rows - len(chosen))
        grid = [("", chosen[r * per_row : (r + 1) * per_row]) for r in range(rows)]
        grid = [g for g in grid if g[1]]
    n_rows = max(1, len(grid))
    fig = Figure(figsize=(per_row * 1.8, n_rows * 1.9), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, per_row, squeeze=False)
    for r, (name, idx) in enumerate(grid):
        for c in range(per_row):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(idx):
                continue
            s = samples[idx[c]]
            try:
                img, mask = _load_for_display(s, segmentation)
            except DataError:
                continue
            if mask is not None and mask.shape == img.shape[:2]:
                # Grey under the overlay, so that the mask colour stands out.
                shown = overlay(to_channels(img, 1), mask)
            else:
                shown = to_display(img)
            ax.imshow(shown, interpolation="nearest")
            ax.set_title(Path(s.id).name[-22:], fontsize=6)
        if name:
            ax0 = axes[r][0]
            ax0.text(
                -0.08, 0.5, name, transform=ax0.transAxes, rotation=90, ha="right", va="center"
            )
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# --------------------------------------------------------------------------------------------
# The audit


def audit(
    root: str | Path,
    layout: str | None = None,
    out_dir: str | Path | None = None,
    *,
    threshold: int = 6,
    strict: bool = False,
    intensity_sample: int = 512,
    workers: int | None = None,
    image_series: str = "",
    mask_series: str = "MaskTumor",
) -> dict[str, Any]:
    """Audit a dataset folder; see the module docstring for what the report holds.

    Args:
        root: dataset folder.
        layout: a layout of :func:`medseg.data.scan.scan_dataset`; detected when None.
        out_dir: write ``audit.json`` and ``montage.png`` here (created if needed).
        threshold: largest Hamming distance (bits of 64) between perceptual hashes counted as a
            near-duplicate.
        strict: raise :class:`DataError` on the first problem the scanner finds (unreadable
            files and mask problems are always reported, not raised).
        intensity_sample: images (evenly spaced) that intensity statistics are computed over.
        workers: reading threads.
        image_series, mask_series: for the ``dicom_series`` layout, which series are the image
            and the mask (see :func:`medseg.data.scan.scan_dataset`).

    Returns:
        The report (JSON-able dict with the keys :data:`REPORT_KEYS`).

    Raises:
        DataError: the folder is missing, holds no usable layout, or (strict) a scan problem.
    """
    started = time.perf_counter()
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    layout = layout or _detect_layout(root)
    series = {"image_series": image_series, "mask_series": mask_series}
    scan = _scan(root, layout, strict, series)
    samples = list(scan.samples)
    segmentation = any(isinstance(s.target, str) for s in samples)
    n = len(samples)
    stats_idx = set(_pick(list(range(n)), max(0, intensity_sample)))
    records = _read_all(samples, segmentation, stats_idx, workers or default_workers())

    problems = [_rel(p, root) for p in scan.problems]
    problems += [_rel(p, root) for r in records for p in r.problems]
    non_binary = [
        {"mask": _mask_name(s, root), "values": list(r.mask_values)}
        for s, r in zip(samples, records, strict=True)
        if r.mask_values is not None and not set(r.mask_values) <= {0, 1}
    ]
    for item in non_binary[:MAX_LISTED]:
        problems.append(f"{item['mask']}: mask is not binary, values {item['values']}")

    class_names = list(scan.class_names)
    splits = Counter(s.split for s in samples if s.split is not None)
    classes: dict[str, int] = {}
    by_split: dict[str, dict[str, int]] = {}
    if class_names:
        counts = Counter(s.target for s in samples)
        classes = {name: counts.get(c, 0) for c, name in enumerate(class_names)}
        for split in sorted(splits, key=_split_key):
            sc = Counter(s.target for s in samples if s.split == split)
            by_split[split] = {name: sc.get(c, 0) for c, name in enumerate(class_names)}

    dup = _near_duplicates(samples, records, class_names, threshold)
    # Groups a split would use with group_by "auto": near-duplicate groups for class folders,
    # the layout's own (patient) groups otherwise.
    n_layout_groups = len({s.group for s in samples})
    n_phash_groups = dup["n_groups"]
    report: dict[str, Any] = {
        "root": str(root),
        "layout": layout,
        "task": "segmentation" if segmentation else "classification" if class_names else None,
        "n_images": n,
        "n_readable": sum(r.ok for r in records),
        "n_groups": n_phash_groups if layout == "class_folders" else n_layout_groups,
        "groups": {
            "default_group_by": "phash" if layout == "class_folders" else "folder",
            "folder": n_layout_groups,
            "phash": n_phash_groups,
        },
        "threshold": threshold,
        "classes": classes,
        "classes_by_split": by_split,
        "splits": {k: splits[k] for k in sorted(splits, key=_split_key)},
        "images": _size_summary(records),
        "intensity": _intensity(records),
        "problems": problems,
        "non_binary_masks": non_binary[:MAX_LISTED],
        "segmentation": _segmentation(records) if segmentation else None,
        "near_duplicate_groups": dup["near_duplicate_groups"],
        "cross_class_duplicates": dup["cross_class_duplicates"],
        "leaks": dup["leaks"],
    }
    if layout == "dicom_series":
        # Patient folders of DICOM datasets are usually named after the PatientID.
        folders = {d.name for d in root.iterdir() if d.is_dir()}
        folders |= {Path(s.id).parts[0] for s in samples}
        report = _pseudonymise(report, folders)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_montage(out / "montage.png", samples, records, class_names)
        report["outputs"] = {"report": str(out / "audit.json"), "montage": str(out / "montage.png")}
    report["seconds"] = round(time.perf_counter() - started, 2)
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "audit.json", report)
    logger.info(
        "audit of %s (%s): %d images, %d near-duplicate groups, %d leaks, %d problems in %.1fs",
        root,
        layout,
        n,
        report["near_duplicate_groups"]["n_groups"],
        report["leaks"]["n_groups"],
        len(problems),
        report["seconds"],
    )
    return report


def pseudonym(name: str) -> str:
    """The stable stand-in for a patient folder name in reports: ``patient-<8 hex digits>``."""
    return "patient-" + hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]


def _pseudonymise(report: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """``report`` with every path component in ``names`` replaced by :func:`pseudonym`."""
    names = {n for n in names if n}
    if not names:
        return report
    pattern = re.compile(
        r"(?<![\w.-])(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        + r")(?![\w.-])"
    )  # fmt: skip

    def walk(obj: Any) -> Any:
        if isinstance(obj, str):
            return pattern.sub(lambda m: pseudonym(m.group(1)), obj)
        if isinstance(obj, dict):
            return {walk(k): walk(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [walk(v) for v in obj]
        return obj

    out = walk(report)
    out["root"] = report["root"]
    out["pseudonymised"] = "patient folder names (DICOM layouts name them after the PatientID)"
    return out


def _counts(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"


def _pairs_text(d: dict[str, Any]) -> str:
    return (
        f"{d['n_groups']} groups ({d['n_images']} images), {d['n_pairs']} linked pairs, "
        f"{d['n_confirmed_pairs']} confirmed by pixels"
    )


def format_audit(report: dict[str, Any]) -> str:
    """A short human-readable table of an :func:`audit` report."""
    nd, g = report["near_duplicate_groups"], report["groups"]
    rows = [
        ("dataset", f"{report['root']} ({report['layout']})"),
        (
            "images",
            f"{report['n_images']} ({report['n_readable']} readable), {report['n_groups']} groups "
            f"for splitting (group_by {g['default_group_by']}; folder {g['folder']}, "
            f"phash {g['phash']})",
        ),
    ]
    if report["classes"]:
        rows.append(("classes", _counts(report["classes"])))
    for split, counts in report["classes_by_split"].items():
        rows.append((f"  {split}", _counts(counts)))
    if report["splits"] and not report["classes_by_split"]:
        rows.append(("splits", _counts(report["splits"])))
    img = report["images"]
    rows.append(("sizes", _counts(dict(list(img["sizes"].items())[:5]))))
    rows.append(("channels", f"{_counts(img['channels'])}; bits {_counts(img['bits'])}"))
    it = report["intensity"]
    if it.get("n_images"):
        rows.append(
            (
                "intensity",
                f"mean {it['mean']:.1f}, std {it['std']:.1f}, min {it['min']:g}, "
                f"max {it['max']:g} ({it['n_images']} images)",
            )
        )
    seg = report["segmentation"]
    if seg:
        ff = seg["foreground_fraction"] or {}
        rows.append(
            (
                "masks",
                f"{seg['n_masks']} read, {seg['empty_masks']} empty "
                f"({100 * (seg['empty_fraction'] or 0):.1f}%), foreground median "
                f"{100 * ff.get('p50', 0):.2f}% of non-empty",
            )
        )
    rows.append(
        (
            "near-dups",
            f"{nd['n_groups']} groups of >1 image ({nd['n_images']} images, "
            f"{nd['n_confirmed_pairs']}/{nd['n_pairs']} pairs confirmed by pixels), largest "
            f"{', '.join(map(str, nd['largest'][:5])) or '-'}; "
            f"{nd['identical_hash_groups']} identical-hash groups (threshold "
            f"{report['threshold']})",
        )
    )
    if "within_class" in nd:
        rows.append(("  within class", _counts(nd["within_class"])))
    cc = report["cross_class_duplicates"]
    if cc is not None:
        rows.append(("  across classes", _pairs_text(cc)))
    if "across_groups" in nd:
        ag = nd["across_groups"]
        rows.append(("  across groups", _pairs_text(ag)))
    lk = report["leaks"]
    if lk["splits"]:
        rows.append((f"  leaks {'/'.join(lk['splits'])}", _pairs_text(lk)))
    rows.append(("problems", str(len(report["problems"]))))
    rows += [("", p) for p in report["problems"][:10]]
    if len(report["problems"]) > 10:
        rows.append(("", f"... and {len(report['problems']) - 10} more (see audit.json)"))
    rows.append(("time", f"{report['seconds']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)
