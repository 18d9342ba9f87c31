"""Score any folder of label maps against ground truth (``medseg evaluate --pred DIR --truth DIR``).

The predictions may come from any tool (nnU-Net, MONAI, a reader study, medseg): NIfTI, PNG/TIFF
or DICOM SEG files (:func:`medseg.io.seg.read_label_map`), one per case, matched to the truth by
case id: the file name without its extension (``case_001.nii.gz`` -> ``case_001``; nnU-Net and
MSD name predictions and labels alike). Files of other kinds (``dataset.json``, ``plans.json``,
nnU-Net's ``.npz``/``.pkl``) and sub-folders are ignored; nnU-Net image channels
(``case_001_0000.nii.gz``) are refused, they are not label maps.

Each case is scored per structure by :func:`medseg.evaluation.volumetric.case_rows` (Dice, HD95,
ASSD, NSD at a tolerance, volumes; in mm with the files' spacing, in pixels without one) and the
rows summarised by :func:`~medseg.evaluation.volumetric.summarize_volumetric`, whose 95% intervals
are percentile intervals of the mean over patient resamples. Beside them, BCa intervals of the same
mean (the mean over cases, patients resampled: ``scipy.stats.bootstrap`` on per-patient sums and
case counts, ``method="BCa"``) for Dice, HD95, ASSD and NSD. A DICOM SEG, which stores only the
slices between its first and last non-empty frame, is put on the other file's voxel grid first.

Refused with one line (:class:`~medseg.errors.DataError`): unmatched cases (counted, the first few
named), a case whose two files differ in shape or geometry (spacing, affine), label values of a
prediction (or truth) that are not among the labels, an existing ``out`` without ``overwrite``.

Written into ``out`` (a temporary sibling folder renamed into place when everything is done)::

    cases.csv     one row per case and structure (the columns of case_rows)
    groups.csv    one row per patient and structure: the means of its cases
    metrics.json  the summary, both intervals, counts, unit, tolerance, labels, the inputs
    report.md     a table per structure, units in the column names
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medseg.errors import DataError
from medseg.evaluation.evaluate import write_cases
from medseg.evaluation.stats import CI_LEVEL
from medseg.evaluation.volumetric import case_rows, metric_columns, summarize_volumetric
from medseg.io import ImageMeta, image_suffix
from medseg.io.base import check_folder
from medseg.io.msd import DATASET_JSON, read_dataset_labels
from medseg.io.seg import LABEL_MAP_SUFFIXES, place_on_grid, read_label_map, union_grid
from medseg.utils import atomic_write_json, atomic_write_text, check_output_folder, replace_folder

logger = logging.getLogger(__name__)

#: Metrics (keys of :func:`~medseg.evaluation.volumetric.metric_columns`) given BCa intervals.
BCA_METRICS = ("dice", "hd95", "assd", "nsd")

#: Relative tolerance of the spacing and of the affine (times its largest entry) of a case's
#: two files.
GEOMETRY_TOLERANCE = 1e-3

#: How many case ids an error message names before "...".
NAMED_IDS = 5

_CHANNEL = re.compile(r"_\d{4}$")


def case_id(path: str | Path) -> str:
    """A file's case id: its name without a label-map extension (``case_001.nii.gz`` ->
    ``case_001``; other names are kept whole)."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: len(name) - len(suffix)] if suffix in LABEL_MAP_SUFFIXES else name


def list_label_maps(folder: str | Path) -> dict[str, Path]:
    """Case id -> label-map file of a folder (its files with a label-map suffix, not hidden).

    Raises:
        DataError: the folder is missing, holds no label map, or two files share a case id.
    """
    folder = check_folder(folder)
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if image_suffix(path) not in LABEL_MAP_SUFFIXES:
            continue
        cid = case_id(path)
        if cid in found:
            raise DataError(f"{folder}: {found[cid].name} and {path.name} are both case {cid}")
        found[cid] = path
    if not found:
        raise DataError(f"{folder}: no label-map files ({', '.join(sorted(LABEL_MAP_SUFFIXES))})")
    return found


def _named(ids: list[str]) -> str:
    shown = ", ".join(ids[:NAMED_IDS])
    return shown + (", ..." if len(ids) > NAMED_IDS else "")


def _check_not_channels(folder: Path, ids: list[str], other: set[str]) -> None:
    """Refuse nnU-Net image channel files (``<case>_0000``) given as label maps."""
    channels = [i for i in ids if _CHANNEL.search(i) and _CHANNEL.sub("", i) in other]
    zeros = [i for i in ids if i.endswith("_0000")]
    if channels or len(zeros) > 1:
        example = (channels or zeros)[0]
        raise DataError(
            f"{folder}: {example} looks like an nnU-Net image channel (_0000), not a label map; "
            "give the folder of label maps (labelsTr, or the predictions)"
        )


def match_cases(pred: Path, truth: Path) -> list[tuple[str, Path, Path]]:
    """``(case id, prediction file, truth file)`` of every case, sorted by id.

    Raises:
        DataError: a folder holds image channels, or cases are unmatched (both sides counted,
            the first few named).
    """
    pred_files, truth_files = list_label_maps(pred), list_label_maps(truth)
    _check_not_channels(pred, list(pred_files), set(truth_files))
    _check_not_channels(truth, list(truth_files), set(pred_files))
    only_pred = sorted(set(pred_files) - set(truth_files))
    only_truth = sorted(set(truth_files) - set(pred_files))
    if only_pred or only_truth:
        raise DataError(
            f"{pred} and {truth}: unmatched cases: {len(only_pred)} prediction(s) without "
            f"truth ({_named(only_pred) or 'none'}), {len(only_truth)} truth file(s) without "
            f"prediction ({_named(only_truth) or 'none'})"
        )
    return [(i, pred_files[i], truth_files[i]) for i in sorted(pred_files)]


def read_groups(path: str | Path, ids: list[str]) -> dict[str, str]:
    """Case id -> patient from a CSV with the columns ``case,patient`` (several cases per patient;
    a case may be given as its file name). Rows of other cases are ignored.

    Raises:
        DataError: unreadable file, missing columns, an empty patient, a case given two
            patients, or cases of ``ids`` without a patient (counted, the first few named).
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in reader.fieldnames or []]
            if not {"case", "patient"} <= set(fields):
                raise DataError(f"{path}: needs the columns case,patient (found {fields})")
            lines = [({k.strip(): (v or "").strip() for k, v in r.items() if k}) for r in reader]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the groups file ({e})") from None
    groups: dict[str, str] = {}
    for n, row in enumerate(lines, start=2):
        case, patient = case_id(row["case"]), row["patient"]
        if not case or not patient:
            raise DataError(f"{path}: line {n}: a case and its patient are both needed")
        if groups.setdefault(case, patient) != patient:
            raise DataError(f"{path}: line {n}: case {case} is given a second patient")
    missing = [i for i in ids if i not in groups]
    if missing:
        raise DataError(f"{path}: {len(missing)} case(s) have no patient ({_named(missing)})")
    return {i: groups[i] for i in ids}


def _labels_from_dataset(truth: Path) -> tuple[dict[int, str], str] | None:
    for folder in (truth, truth.parent):
        if (folder / DATASET_JSON).is_file():
            try:
                labels = read_dataset_labels(folder / DATASET_JSON)
            except DataError as e:
                raise DataError(f"{e} (the labels of --truth are read from it)") from None
            return labels, str(folder / DATASET_JSON)
    return None


def _truth_values(cases: list[tuple[str, Path, Path]]) -> dict[int, str]:
    values: set[int] = set()
    for _, _, path in cases:
        values.update(int(v) for v in np.unique(read_label_map(path)[0]))
    found = sorted(v for v in values if v > 0)
    if not found:
        raise DataError("every truth map is empty (no label above 0): nothing to score")
    return {0: "background", **{v: f"label_{v}" for v in found}}


def _close(a, b, scale: float = 1.0) -> bool:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return a.shape == b.shape and np.allclose(a, b, rtol=0, atol=GEOMETRY_TOLERANCE * scale)


def _check_geometry(cid: str, p_meta: ImageMeta, t_meta: ImageMeta) -> None:
    if p_meta.spacing is None or t_meta.spacing is None:
        return
    if not _close(p_meta.spacing, t_meta.spacing, max(map(abs, t_meta.spacing))):
        raise DataError(
            f"case {cid}: prediction spacing {_mm(p_meta.spacing)} mm differs from the truth's "
            f"{_mm(t_meta.spacing)} mm"
        )
    if p_meta.affine is None or t_meta.affine is None:
        return
    scale = max(1.0, float(np.abs(t_meta.affine).max()))
    if not _close(p_meta.affine, t_meta.affine, scale):
        worst = float(np.abs(np.asarray(p_meta.affine) - t_meta.affine).max())
        raise DataError(
            f"case {cid}: prediction affine (position/orientation) differs from the truth's "
            f"by up to {worst:.3g} mm"
        )


def _mm(values) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def _on_one_grid(cid: str, pred: tuple, truth: tuple) -> tuple[np.ndarray, np.ndarray]:
    """A case with a DICOM SEG on either side: both maps on the grid that holds them."""
    (p, p_meta), (t, t_meta) = pred, truth
    grid = union_grid(p.shape, p_meta.affine, t.shape, t_meta.affine)
    if grid is None:
        raise DataError(
            f"case {cid}: prediction and truth voxel grids differ (spacing "
            f"{_mm(p_meta.spacing)} vs {_mm(t_meta.spacing)} mm, or orientation or position)"
        )
    for name, labels, meta in (("prediction", p, p_meta), ("truth", t, t_meta)):
        full = not meta.extra.get("seg_frames_only")
        if full and tuple(grid[0]) != tuple(labels.shape):
            other = "truth" if name == "prediction" else "prediction"
            raise DataError(f"case {cid}: the {other}'s SEG frames reach outside the {name}'s grid")
    try:
        return (
            place_on_grid(p, p_meta.affine, *grid),
            place_on_grid(t, t_meta.affine, *grid),
        )
    except DataError as e:
        raise DataError(f"case {cid}: {e}") from None


def load_pair(
    cid: str, pred_path: Path, truth_path: Path
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]:
    """A case's prediction and truth on one voxel grid, and its spacing (None: unknown, pixels).

    Raises:
        DataError: unreadable files, or shapes or geometry (spacing, affine) that differ.
    """
    p, p_meta = read_label_map(pred_path)
    t, t_meta = read_label_map(truth_path)
    seg = p_meta.extra.get("seg_frames_only") or t_meta.extra.get("seg_frames_only")
    if seg and p_meta.affine is not None and t_meta.affine is not None:
        p, t = _on_one_grid(cid, (p, p_meta), (t, t_meta))  # the grids' lattice is checked
    elif p.shape != t.shape:
        raise DataError(
            f"case {cid}: prediction shape {p.shape} differs from the truth's {t.shape} "
            f"({pred_path.name}, {truth_path.name})"
        )
    else:
        _check_geometry(cid, p_meta, t_meta)
    spacing = t_meta.spacing or p_meta.spacing
    return p, t, (tuple(float(s) for s in spacing) if spacing else None)


def _check_values(cid: str, labels: Mapping[int, str], where: str, p, t) -> None:
    for side, array in (("prediction", p), ("truth", t)):
        unknown = sorted(int(v) for v in np.unique(array) if int(v) not in labels)
        if unknown:
            raise DataError(
                f"case {cid}: {side} label values {unknown[:10]} are not among the labels "
                f"{sorted(labels)} ({where})"
            )


def _patient_means(rows: list[dict], columns: list[str]) -> list[dict]:
    """One row per patient and structure: the means of its cases (NaN values left out)."""
    keyed: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        keyed.setdefault((r["group"], r["structure"]), []).append(r)
    out = []
    for (group, structure), members in keyed.items():
        row = {"group": group, "structure": structure, "label": members[0]["label"]}
        row.update(unit=members[0]["unit"], n_cases=len(members))
        for c in columns:
            values = np.array([float(m[c]) for m in members])
            ok = np.isfinite(values)
            row[c] = float(values[ok].mean()) if ok.any() else math.nan
        out.append(row)
    return sorted(out, key=lambda r: (str(r["group"]), int(r["label"])))


def bca_interval(
    values: np.ndarray, groups: np.ndarray, n_boot: int, seed: int
) -> list[float] | None:
    """BCa interval (:data:`CI_LEVEL`) of the mean of ``values`` over cases, resampling groups.

    ``scipy.stats.bootstrap`` with ``method="BCa"`` on the per-group sums and case counts
    (paired), the statistic being their ratio, i.e. the mean over the cases of the drawn groups;
    NaN values are left out. ``None`` with fewer than two groups, ``n_boot`` 0, or when the
    interval is undefined (e.g. every value equal).
    """
    from scipy import stats

    values, groups = np.asarray(values, float), np.asarray(groups)
    ok = np.isfinite(values)
    present, index = np.unique(groups[ok], return_inverse=True)
    if n_boot <= 0 or len(present) < 2:
        return None
    sums = np.bincount(index, weights=values[ok])
    counts = np.bincount(index).astype(float)

    def ratio(s, c, axis=-1):
        return s.sum(axis=axis) / c.sum(axis=axis)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate data: NaN interval, reported as None
        result = stats.bootstrap(
            (sums, counts),
            ratio,
            paired=True,
            vectorized=True,
            n_resamples=int(n_boot),
            confidence_level=CI_LEVEL,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
    low, high = (float(v) for v in result.confidence_interval)
    return [low, high] if math.isfinite(low) and math.isfinite(high) else None


def _macro_rows(rows: list[dict], columns: list[str]) -> list[dict]:
    """Per case, the mean over its structures (values present) of each column."""
    per_case: dict[str, list[dict]] = {}
    for r in rows:
        per_case.setdefault(r["id"], []).append(r)
    out = []
    for cid, members in per_case.items():
        row = {"id": cid, "group": members[0]["group"]}
        for c in columns:
            values = np.array([float(m[c]) for m in members])
            row[c] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
        out.append(row)
    return out


def _intervals(rows: list[dict], summary: dict, cols: dict, n_boot: int, seed: int) -> tuple:
    """``(ci_percentile, ci_bca)``: structure (and ``macro``) -> metric column -> [lo, hi]."""
    names = [cols[m] for m in BCA_METRICS]
    percentile = {
        name: {c: entry[c]["ci"] for c in names}
        for name, entry in {**summary["structures"], "macro": summary["macro"]}.items()
    }
    by_structure: dict[str, list[dict]] = {}
    for r in rows:
        by_structure.setdefault(r["structure"], []).append(r)
    by_structure["macro"] = _macro_rows(rows, names)
    bca = {}
    for name, members in by_structure.items():
        groups = np.array([str(m["group"]) for m in members])
        bca[name] = {
            c: bca_interval(np.array([float(m[c]) for m in members]), groups, n_boot, seed)
            for c in names
        }
    return percentile, bca


def _score_cases(
    cases: list[tuple[str, Path, Path]],
    group_of: Mapping[str, str],
    labels: Mapping[int, str],
    labels_from: str,
    tolerance_mm: float,
) -> list[dict]:
    rows: list[dict] = []
    unit_case: tuple[str, str] | None = None
    for cid, pred_path, truth_path in cases:
        pred, truth, spacing = load_pair(cid, pred_path, truth_path)
        _check_values(cid, labels, labels_from, pred, truth)
        unit = "mm" if spacing else "px"
        if unit_case is None:
            unit_case = (cid, unit)
        elif unit_case[1] != unit:
            raise DataError(
                f"case {cid}: distances in {unit} but case {unit_case[0]} in {unit_case[1]} "
                "(one folder, one unit: files with and without voxel spacing are scored apart)"
            )
        rows += case_rows(cid, group_of[cid], pred, truth, spacing, labels, tolerance_mm)
        logger.debug("scored case %s", cid)
    return rows


def score_folders(
    pred: Path,
    truth: Path,
    out: Path,
    *,
    groups: Path | None = None,
    labels: dict[int, str] | None = None,
    tolerance_mm: float = 1.0,
    n_boot: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Score every label map of ``pred`` against the one of the same case in ``truth``.

    Args:
        pred: Folder of predicted label maps (NIfTI, PNG/TIFF or DICOM SEG).
        truth: Folder of reference label maps, the same case ids.
        out: Output folder (``cases.csv``, ``groups.csv``, ``metrics.json``, ``report.md``).
        groups: CSV ``case,patient`` (default: each case its own patient).
        labels: Label value -> structure name (default: ``dataset.json`` in ``truth`` or its
            parent, else the values found in the truth maps, named ``label_<v>``).
        tolerance_mm: NSD tolerance (in pixels when the files carry no spacing).
        n_boot: Bootstrap resamples of the 95% intervals (0: none).
        seed: Seed of the resamples.
        overwrite: Replace an existing ``out``.

    Returns:
        What ``metrics.json`` holds: ``summary`` (of ``summarize_volumetric``; its ``ci`` are
        the percentile intervals), ``ci_percentile`` and ``ci_bca`` (structure or ``macro`` ->
        metric column -> [low, high] or None), ``ci_methods``, ``n_cases``, ``n_patients``,
        ``unit``, ``tolerance``, ``labels``, ``labels_from``, ``pred``, ``truth``, ``groups``,
        ``bootstrap``.

    Raises:
        DataError: unmatched cases, a shape, geometry or label mismatch, unreadable files.
        RunExistsError: ``out`` exists and ``overwrite`` is false.
    """
    pred, truth, out = Path(pred), Path(truth), Path(out)
    check_output_folder(out, (pred, truth), overwrite)
    cases = match_cases(pred, truth)
    ids = [c[0] for c in cases]
    group_of = read_groups(groups, ids) if groups is not None else {i: i for i in ids}
    if labels is not None:
        labels_from = "the labels given"
    elif (found := _labels_from_dataset(truth)) is not None:
        labels, labels_from = found
    else:
        labels, labels_from = _truth_values(cases), "the values of the truth maps"
    labels = {0: "background", **{int(k): str(v) for k, v in labels.items()}}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        rows = _score_cases(cases, group_of, labels, labels_from, tolerance_mm)
        summary = summarize_volumetric(rows, n_boot=n_boot, seed=seed)
        cols = metric_columns(summary["unit"], tolerance_mm)
        percentile, bca = _intervals(rows, summary, cols, n_boot, seed)
        result = {
            "pred": str(pred),
            "truth": str(truth),
            "groups": str(groups) if groups is not None else None,
            "n_cases": summary["n_cases"],
            "n_patients": summary["n_groups"],
            "unit": summary["unit"],
            "tolerance": float(tolerance_mm),
            "labels": {str(k): v for k, v in labels.items() if k != 0},
            "labels_from": labels_from,
            "ci_methods": _ci_methods(n_boot, seed),
            "ci_percentile": percentile,
            "ci_bca": bca,
            "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "unit": "patient"},
            "summary": summary,
        }
        write_cases(tmp / "cases.csv", rows)
        write_cases(tmp / "groups.csv", _patient_means(rows, summary["metrics"][:-1]))
        atomic_write_json(tmp / "metrics.json", result)
        atomic_write_text(tmp / "report.md", report_markdown(result))
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("%s: %d cases, %d patients scored -> %s", pred, len(ids), result["n_patients"], out)
    return result


def _ci_methods(n_boot: int, seed: int) -> dict[str, str]:
    level = f"{round(100 * CI_LEVEL)}%"
    return {
        "ci_percentile": f"{level} percentile interval of the mean over cases, {n_boot} "
        f"resamples of the patients (seed {seed}); the 'ci' of each summary entry",
        "ci_bca": f"{level} BCa interval of the same mean (scipy.stats.bootstrap, "
        f'method="BCa", {n_boot} resamples of the patients, seed {seed})',
    }


def _cell(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, list | tuple):
        return f"[{value[0]:.{digits}f}, {value[1]:.{digits}f}]"
    return f"{value:.{digits}f}"


def _column_titles(unit: str, tolerance: float) -> list[str]:
    vol = "mL" if unit == "mm" else "voxels"
    return [
        "Dice",
        f"HD95 ({unit})",
        f"ASSD ({unit})",
        f"NSD@{tolerance:g}{unit}",
        f"volume diff ({vol})",
        f"abs volume diff ({vol})",
    ]


def report_markdown(result: Mapping) -> str:
    """``report.md``: the inputs, the conventions and one table per structure (and the macro
    mean), statistics down, metrics across, each column naming its unit."""
    summary, unit = result["summary"], result["unit"]
    patients = "from " + str(result["groups"]) if result["groups"] else "one per case"
    lines = [
        f"# Evaluation of {result['pred']} against {result['truth']}",
        "",
        f"{result['n_cases']} cases, {result['n_patients']} patients ({patients}); distances "
        + ("in mm (the files' voxel spacing)" if unit == "mm" else "in pixels (no spacing)")
        + f"; NSD tolerance {result['tolerance']:g} {unit}; labels from {result['labels_from']}.",
        "",
        f"Intervals: {result['ci_methods']['ci_percentile']}; {result['ci_methods']['ci_bca']}.",
        "HD95/ASSD are missing (left out of the means, counted) where exactly one mask is empty.",
    ]
    titles = _column_titles(unit, result["tolerance"])
    entries = {**summary["structures"], "macro mean over structures": summary["macro"]}
    for name, entry in entries.items():
        key = name if name in summary["structures"] else "macro"
        label = next((v for v, n in result["labels"].items() if n == name), None)
        lines += ["", f"## {name}" + (f" (label {label})" if label else ""), ""]
        lines += _table(titles, summary["metrics"], entry, result["ci_bca"].get(key, {}))
    return "\n".join(lines) + "\n"


def _table(titles: list[str], metrics: list[str], entry: Mapping, bca: Mapping) -> list[str]:
    """The markdown table of one structure's summary entry (and its BCa intervals)."""
    digits = (3, 2, 2, 3, 3, 3)  # Dice, HD95, ASSD, NSD, volume diff, abs volume diff
    pct = round(100 * CI_LEVEL)
    picks = {
        "mean": lambda c: entry[c]["mean"],
        "median": lambda c: entry[c]["median"],
        f"{pct}% CI percentile": lambda c: entry[c]["ci"],
        f"{pct}% CI BCa": lambda c: bca.get(c),
    }
    lines = ["| statistic | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for stat, pick in picks.items():
        cells = [_cell(pick(c), d) for c, d in zip(metrics, digits, strict=True)]
        lines.append(f"| {stat} | " + " | ".join(cells) + " |")
    counts = [f"{entry[c]['n']} ({entry[c]['missing']})" for c in metrics]
    lines.append("| n (missing) | " + " | ".join(counts) + " |")
    lines.append(
        f"\nEmpty masks ({entry['n_cases']} cases): both {entry['empty_both']}, prediction "
        f"only {entry['empty_pred']}, truth only {entry['empty_truth']}."
    )
    return lines
