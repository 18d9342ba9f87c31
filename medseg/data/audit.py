"""Dataset audit: what is in a dataset folder, and what would go wrong when training on it.

:func:`audit` scans a folder (detecting its layout when none is given), reads every image (and
every mask of a segmentation layout) with the readers of :mod:`medseg.io`, and reports:

* counts: images, groups (after near-duplicate grouping), classes per split, splits;
* images: distinct sizes, grey/RGB counts, stored bit depths, intensity statistics over an evenly
  spaced sample of images;
* problems: unreadable files (every image is decoded in full; garbled JPEG data counts as
  unreadable), images smaller than ``min_size`` pixels along a side, images without masks
  and masks without images (from the scanner),
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

The per-image checks are in :mod:`medseg.data.audit_checks`, the near-duplicate findings in
:mod:`medseg.data.audit_duplicates`. A 3D ``dataset.json`` dataset (layout ``msd``) gets its own
audit, :func:`medseg.data.audit_volumes.audit_volumes`: the dataset fingerprint and the plan
defaults instead of the 2D checks (near-duplicates and the like are None in its report).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import Config
from medseg.data import scan as scan_module
from medseg.data.audit_checks import (
    Record,
    intensity_summary,
    read_records,
    segmentation_summary,
    size_summary,
)
from medseg.data.audit_duplicates import MAX_LISTED, near_duplicates, split_key
from medseg.data.audit_volumes import audit_volumes, format_rows, format_volume_audit
from medseg.data.dedup import default_workers
from medseg.data.samples import Sample, ScanResult
from medseg.errors import DataError
from medseg.io import read_image, read_mask, to_channels
from medseg.io.base import MIN_IMAGE_PIXELS
from medseg.utils import atomic_path, atomic_write_json, display_text

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


# --------------------------------------------------------------------------------------------
# Scanning


def _detect_layout(root: Path) -> str:
    detect = getattr(scan_module, "detect_layout", None)
    if detect is None:
        raise DataError(
            f"{root}: no layout given and this medseg cannot detect one; give --layout "
            f"(from Python, layout=)"
        )
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
    records: list[Record] | None = None,
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

    records = records or [Record(ok=True) for _ in samples]
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
            ax.set_title(display_text(Path(s.id).name)[-22:], fontsize=6)
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
    config: Config | None = None,
    min_size: int = MIN_IMAGE_PIXELS,
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
        config: ``msd`` layout: the config whose values override the plan defaults (None: the
            defaults).
        min_size: list images with fewer pixels along a side as problems (>= 1).

    Returns:
        The report (JSON-able dict with the keys :data:`REPORT_KEYS`; for ``msd`` also
        ``fingerprint`` and ``plan``).

    Raises:
        DataError: the folder is missing, holds no usable layout, or (strict) a scan problem.
    """
    started = time.perf_counter()
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    layout = layout or _detect_layout(root)
    if layout == "msd":
        return audit_volumes(root, out_dir, config=config, strict=strict, workers=workers)
    series = {"image_series": image_series, "mask_series": mask_series}
    scan = _scan(root, layout, strict, series)
    samples = list(scan.samples)
    segmentation = any(isinstance(s.target, str) for s in samples)
    n = len(samples)
    stats_idx = set(_pick(list(range(n)), max(0, intensity_sample)))
    workers = workers or default_workers()
    records = read_records(samples, segmentation, stats_idx, workers, min_size=min_size)
    problems, non_binary = _problems(scan, records, root)
    class_names = list(scan.class_names)
    dup = near_duplicates(samples, records, class_names, threshold)
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
        **_class_counts(samples, class_names),
        "images": size_summary(records),
        "intensity": intensity_summary(records),
        "problems": problems,
        "non_binary_masks": non_binary[:MAX_LISTED],
        "segmentation": segmentation_summary(records) if segmentation else None,
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
    _log_summary(report, root, layout)
    return report


def _problems(
    scan: ScanResult, records: list[Record], root: Path
) -> tuple[list[str], list[dict[str, Any]]]:
    """The scanner's and the readers' problems (paths relative to ``root``); non-binary masks."""
    problems = [_rel(p, root) for p in scan.problems]
    problems += [_rel(p, root) for r in records for p in r.problems]
    non_binary = [
        {"mask": _mask_name(s, root), "values": list(r.mask_values)}
        for s, r in zip(scan.samples, records, strict=True)
        if r.mask_values is not None and not set(r.mask_values) <= {0, 1}
    ]
    for item in non_binary[:MAX_LISTED]:
        problems.append(f"{item['mask']}: mask is not binary, values {item['values']}")
    return problems, non_binary


def _class_counts(samples: list[Sample], class_names: list[str]) -> dict[str, Any]:
    """The report's ``classes``, ``classes_by_split`` and ``splits``."""
    splits = Counter(s.split for s in samples if s.split is not None)
    classes: dict[str, int] = {}
    by_split: dict[str, dict[str, int]] = {}
    if class_names:
        counts = Counter(s.target for s in samples)
        classes = {name: counts.get(c, 0) for c, name in enumerate(class_names)}
        for split in sorted(splits, key=split_key):
            sc = Counter(s.target for s in samples if s.split == split)
            by_split[split] = {name: sc.get(c, 0) for c, name in enumerate(class_names)}
    return {
        "classes": classes,
        "classes_by_split": by_split,
        "splits": {k: splits[k] for k in sorted(splits, key=split_key)},
    }


def _log_summary(report: dict[str, Any], root: Path, layout: str) -> None:
    logger.info(
        "audit of %s (%s): %d images, %d near-duplicate groups, %d leaks, %d problems in %.1fs",
        root,
        layout,
        report["n_images"],
        report["near_duplicate_groups"]["n_groups"],
        report["leaks"]["n_groups"],
        len(report["problems"]),
        report["seconds"],
    )


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
    if "fingerprint" in report:
        return format_volume_audit(report)
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
    return format_rows(rows, report)
