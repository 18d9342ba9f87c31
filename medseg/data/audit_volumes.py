"""Audit of a 3D ``dataset.json`` dataset (layout ``msd``): the fingerprint and the plan defaults.

:func:`audit_volumes` scans the dataset (:func:`medseg.data.scan_msd.scan_msd`), computes its
fingerprint (:func:`medseg.data.fingerprint.compute_fingerprint`: spacings, shapes, foreground
intensities, class shares) and the plan a 3D run would start from
(:func:`medseg.data.fingerprint.make_plan`, with the given config or the defaults). The report
has the keys of every audit (:data:`medseg.data.audit.REPORT_KEYS`; the 2D-only ones, such as
near-duplicates, are None) plus ``fingerprint`` and ``plan``. With ``out_dir``, ``audit.json``
and ``montage.png`` (for each of up to 18 cases, the axial slice with the most foreground, labels
overlaid) are written there. :func:`format_volume_audit` gives the short table for people.

Paths in the report are relative to the dataset root; case ids are file names, never patient
identifiers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import Config
from medseg.data.fingerprint import compute_fingerprint, flip_warning, make_plan
from medseg.data.scan_msd import MsdScanResult, scan_msd
from medseg.errors import DataError
from medseg.io.msd import read_case_image, read_case_labels
from medseg.utils import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

#: Cases shown in the montage.
MONTAGE_CASES = 18


def audit_volumes(
    root: str | Path,
    out_dir: str | Path | None = None,
    *,
    config: Config | None = None,
    strict: bool = False,
    workers: int | None = None,
    max_cases: int | None = None,
) -> dict[str, Any]:
    """Audit an ``msd`` dataset; see the module docstring for the report.

    Args:
        root: the folder holding ``dataset.json``.
        out_dir: write ``audit.json`` and ``montage.png`` here (created if needed).
        config: the config whose ``volume``/``train``/``model`` values override the plan
            defaults; None: the defaults.
        strict: raise on the first unusable case instead of listing it in ``problems``.
        workers: reading threads (default 2).
        max_cases: fingerprint only this many cases (evenly spaced); None: all.

    Raises:
        DataError: ``dataset.json`` is missing or malformed, a listed file is missing, no case
            is usable, or (strict) a case is unusable.
    """
    started = time.perf_counter()
    root = Path(root)
    cfg = config or Config()
    scan = scan_msd(root, strict=strict)
    if scan.description is None:  # scan_msd always sets it
        raise DataError(f"{root}: no dataset.json description")
    description = replace(scan.description, cases=list(scan.cases.values()))
    problems = list(scan.problems)
    fp_problems: list[str] | None = None if strict else []
    fingerprint = compute_fingerprint(
        description, max_cases=max_cases, workers=workers or 2, problems=fp_problems
    )
    problems += sorted(fp_problems or [])
    plan = make_plan(fingerprint, cfg)
    n = len(scan.samples)
    report: dict[str, Any] = {
        "root": str(root),
        "layout": "msd",
        "task": "segmentation",
        "n_images": n,
        "n_readable": n - len(fp_problems or []),
        "n_groups": len({s.group for s in scan.samples}),
        "groups": {"default_group_by": "folder", "folder": n, "phash": None},
        "threshold": None,
        "classes": dict(fingerprint["class_share"]),
        "classes_by_split": {},
        "splits": {},
        "images": {
            "shape": fingerprint["shape"],
            "spacing": fingerprint["spacing"],
            "channels": fingerprint["channels"],
        },
        "intensity": fingerprint["intensity"],
        "problems": [_rel(p, root) for p in problems],
        "non_binary_masks": [],
        "segmentation": {
            "labels": fingerprint["labels"],
            "class_share": fingerprint["class_share"],
        },
        "near_duplicate_groups": None,
        "cross_class_duplicates": None,
        "leaks": None,
        "dataset": {"name": description.name, "modality": description.modality},
        "fingerprint": fingerprint,
        "plan": plan.to_dict(),
        "flip_warning": flip_warning(fingerprint, cfg.augment),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_volume_montage(out / "montage.png", scan)
        report["outputs"] = {"report": str(out / "audit.json"), "montage": str(out / "montage.png")}
    report["seconds"] = round(time.perf_counter() - started, 2)
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "audit.json", report)
    logger.info(
        "audit of %s (msd): %d cases, %d problems in %.1fs",
        root,
        n,
        len(report["problems"]),
        report["seconds"],
    )
    return report


def write_volume_montage(path: str | Path, scan: MsdScanResult, per_row: int = 6) -> Path:
    """A PNG grid: for up to :data:`MONTAGE_CASES` cases, the slice with the most foreground."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from medseg.data.overlay import overlay

    description = scan.description
    cases = list(scan.cases.values())
    if len(cases) > MONTAGE_CASES:
        picks = np.linspace(0, len(cases) - 1, MONTAGE_CASES).round().astype(int)
        cases = [cases[i] for i in picks]
    rows = max(1, -(-len(cases) // per_row))
    fig = Figure(figsize=(per_row * 1.8, rows * 1.9), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, per_row, squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= len(cases) or description is None:
            continue
        case = cases[i]
        try:
            image = read_case_image(case, description.n_channels).array
            labels = read_case_labels(case, description.labels)
        except DataError:
            continue
        if labels.shape != image.shape[:3]:
            continue
        k = int(np.argmax((labels > 0).sum(axis=(1, 2))))
        ax.imshow(overlay(image[k, :, :, :1], labels[k]), interpolation="nearest")
        ax.set_title(f"{case.case_id[-22:]} #{k}", fontsize=6)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def format_volume_audit(report: dict[str, Any]) -> str:
    """A short human-readable table of an :func:`audit_volumes` report."""
    fp, plan = report["fingerprint"], report["plan"]
    labels = ", ".join(f"{k} {v}" for k, v in fp["labels"].items())
    channels = ", ".join(f"{k} {v}" for k, v in fp["channels"].items())
    rows = [
        ("dataset", f"{report['root']} (msd: {report['dataset']['name']})"),
        ("cases", f"{report['n_images']} ({report['n_readable']} readable), each its own group"),
        ("modality", f"{fp['modality']}; channels {channels}"),
        ("labels", labels),
        ("spacing mm", _range_text(fp["spacing"])),
        ("shape vox", _range_text(fp["shape"])),
    ]
    for it in fp["intensity"]:
        if it.get("mean") is None:
            rows.append((f"fg ch{it['channel']}", "no foreground voxels"))
            continue
        rows.append(
            (
                f"fg ch{it['channel']}",
                f"p0.5 {it['p0_5']:.4g}, p50 {it['p50']:.4g}, p99.5 {it['p99_5']:.4g}, "
                f"mean {it['mean']:.4g}, std {it['std']:.4g} ({it['n_voxels']} voxels)",
            )
        )
    share = ", ".join(f"{k} {100 * v:.2f}%" for k, v in fp["class_share"].items())
    rows.append(("class share", share))
    order = fp.get("label_order")
    if order:
        kept = ", ".join(
            f"{axis} {100 * v:.0f}%"
            for axis, v in zip(("slice", "row", "col"), order["axes"], strict=False)
        )
        rows.append(("label order", f"kept along {kept} of {order['n_cases']} cases"))
    if report.get("flip_warning"):
        rows.append(("flips", report["flip_warning"]))
    chosen = set(plan.get("from_config", []))

    def mark(key: str) -> str:
        return " (config)" if key in chosen else " (fingerprint)"

    rows.append(("plan spacing", f"{_list(plan['target_spacing'])}{mark('target_spacing')}"))
    rows.append(("plan patch", f"{_list(plan['patch_size'])}{mark('patch_size')}"))
    norm = plan["normalization"]
    if norm == "ct":
        norm += f", clip {_list(plan['intensity_clip'])}{mark('intensity_clip')}"
        norm += f", mean {_list(plan['channel_mean'])}, std {_list(plan['channel_std'])}"
    rows.append(("plan norm", f"{norm}{mark('normalization')}"))
    return format_rows(rows, report)


def format_rows(rows: list[tuple[str, str]], report: dict) -> str:
    """An audit's text: ``rows``, then its problems (the first 10) and its time, aligned."""
    rows = [*rows, ("problems", str(len(report["problems"])))]
    rows += [("", p) for p in report["problems"][:10]]
    if len(report["problems"]) > 10:
        rows.append(("", f"... and {len(report['problems']) - 10} more (see audit.json)"))
    rows.append(("time", f"{report['seconds']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


def _range_text(stats: dict[str, list[float]]) -> str:
    return f"median {_list(stats['median'])}, min {_list(stats['min'])}, max {_list(stats['max'])}"


def _list(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _rel(text: str, root: Path) -> str:
    """``text`` with the dataset root taken off the paths it names."""
    for prefix in {str(root), str(root.resolve())}:
        text = text.replace(prefix.rstrip("/") + "/", "")
    return text
