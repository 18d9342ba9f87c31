"""Per-case, per-structure rows of 3D (or patient-level 2D) segmentation metrics and their summary
with patient-bootstrap intervals.

* :func:`case_rows`: one flat row per (case, structure) from :func:`medseg.evaluation.surface.
  structure_metrics`, each column naming its unit (``hd95_mm``, ``nsd_1mm``, ``volume_diff_ml``;
  ``hd95_px``, ``nsd_1px``, ``volume_diff_px`` (voxels) where the spacing is unknown).
* :func:`summarize_volumetric`: per structure, and the macro mean over structures (per case
  first, then over cases), the mean, median and a 95% bootstrap interval of the mean whose
  resampling unit is the patient group (:func:`medseg.evaluation.stats.bootstrap_interval`), so
  several cases of one patient move together. Missing values (NaN: HD95/ASSD where one mask is
  empty) are left out of the means and counted, as are the empty-mask cases.
* :func:`format_volumetric`: the summary as a short text table.

The empty-mask rules are those of :mod:`medseg.evaluation.surface`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from medseg.errors import DataError
from medseg.evaluation.stats import CI_LEVEL, bootstrap_interval
from medseg.evaluation.surface import EMPTY_CASES, structure_metrics, unit_of

#: Row columns that are not metrics.
KEY_COLUMNS = ("id", "group", "structure", "label", "unit", "empty")


def metric_columns(unit: str, tolerance_mm: float = 1.0) -> dict[str, str]:
    """Row column of each metric for a unit (``"mm"`` or ``"px"``) and NSD tolerance, e.g.
    ``{"dice": "dice", "hd95": "hd95_mm", "assd": "assd_mm", "nsd": "nsd_1mm",
    "volume_pred": "volume_pred_ml", ...}``; volumes are in mL, or in voxels (``_px``)."""
    vol = "ml" if unit == "mm" else "px"
    return {
        "dice": "dice",
        "hd95": f"hd95_{unit}",
        "assd": f"assd_{unit}",
        "nsd": f"nsd_{float(tolerance_mm):g}{unit}",
        "volume_pred": f"volume_pred_{vol}",
        "volume_truth": f"volume_truth_{vol}",
        "volume_diff": f"volume_diff_{vol}",
    }


def case_rows(
    case_id: str,
    group: str,
    pred_labels: np.ndarray,
    truth_labels: np.ndarray,
    spacing: Sequence[float] | None,
    labels: Mapping[int, str],
    tolerance_mm: float = 1.0,
) -> list[dict]:
    """One row per foreground structure of a case.

    Args:
        case_id: Case id (column ``id``).
        group: Patient (bootstrap group) of the case (column ``group``).
        pred_labels: Predicted label map, D x H x W (or H x W), 0 background.
        truth_labels: Reference label map of the same shape.
        spacing: Voxel size in mm per axis; ``None``: distances in voxels, columns ``_px``.
        labels: Label value -> structure name (0 skipped).
        tolerance_mm: NSD tolerance.

    Returns:
        Rows with ``id``, ``group``, ``structure``, ``label``, ``unit``, ``empty`` and the metric
        columns of :func:`metric_columns` (NaN where missing).
    """
    unit = unit_of(spacing)
    cols = metric_columns(unit, tolerance_mm)
    per_structure = structure_metrics(pred_labels, truth_labels, spacing, labels, tolerance_mm)
    value_of = {str(name): int(value) for value, name in labels.items()}
    rows = []
    for name, m in per_structure.items():
        if unit == "mm":
            vols = (m["volume_pred_ml"], m["volume_truth_ml"], m["volume_diff_ml"])
        else:
            vols = (m["voxels_pred"], m["voxels_truth"], m["voxels_pred"] - m["voxels_truth"])
        row = {"id": case_id, "group": group, "structure": name, "label": value_of[name]}
        row.update(unit=unit, empty=m["empty"])
        row.update({cols[k]: float(m[k]) for k in ("dice", "hd95", "assd", "nsd")})
        row.update(
            {
                cols[k]: float(v)
                for k, v in zip(("volume_pred", "volume_truth", "volume_diff"), vols, strict=True)
            }
        )
        rows.append(row)
    return rows


def as_number(value) -> float:
    """A row value as a float; ``None``, ``""`` and unparsable text are NaN (missing)."""
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _summary_columns(rows: list[dict]) -> tuple[str, list[str]]:
    """The rows' unit and the metric columns to summarise (checked to be the same in all rows)."""
    units = {str(r.get("unit", "")) for r in rows}
    if len(units) != 1 or units - {"mm", "px"}:
        raise DataError(f"volumetric rows mix or lack units {sorted(units)}: score them apart")
    unit = units.pop()
    nsd = sorted({k for r in rows for k in r if k.startswith("nsd_")})
    if len(nsd) != 1:
        raise DataError(f"volumetric rows need one NSD column, got {nsd or 'none'}")
    vol = "volume_diff_ml" if unit == "mm" else "volume_diff_px"
    names = ["dice", f"hd95_{unit}", f"assd_{unit}", nsd[0], vol]
    missing = sorted({c for r in rows for c in names if c not in r})
    if missing:
        raise DataError(f"volumetric rows lack the columns {missing}")
    return unit, names


def _stat(values: np.ndarray, gidx: np.ndarray, n_groups: int, n_boot: int, seed: int) -> dict:
    """Mean, median, bootstrap interval of the mean over groups, and counts of one metric."""
    ok = np.isfinite(values)
    if not ok.any():
        return {"mean": None, "median": None, "ci": None, "n": 0, "missing": int(len(values))}
    v, g = values[ok], gidx[ok]

    def mean_of(mult: np.ndarray) -> float | None:
        w = mult[g]
        total = w.sum()
        return float(w @ v / total) if total > 0 else None

    return {
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "ci": bootstrap_interval(mean_of, n_groups, n_boot, seed),
        "n": int(ok.sum()),
        "missing": int((~ok).sum()),
    }


def _table(
    ids: list[str], values: dict[str, dict[str, float]], columns: list[str]
) -> dict[str, np.ndarray]:
    """Column -> values over ``ids`` (NaN where a case has no row)."""
    return {c: np.array([values.get(i, {}).get(c, math.nan) for i in ids]) for c in columns}


def _entry(table: dict[str, np.ndarray], empties: list[str], boot: tuple) -> dict:
    """The summary of one structure (or the macro mean): counts and one stat per column."""
    entry: dict = {"n_cases": int(len(next(iter(table.values()))))}
    entry.update({f"empty_{e}": int(sum(x == e for x in empties)) for e in EMPTY_CASES})
    for col, vals in table.items():
        entry[col] = _stat(vals, *boot)
    return entry


def summarize_volumetric(rows: Sequence[Mapping], n_boot: int = 1000, seed: int = 0) -> dict:
    """Per-structure and macro summaries of :func:`case_rows` rows (of many cases).

    For each metric (``dice``, ``hd95_<unit>``, ``assd_<unit>``, ``nsd_<tol><unit>``,
    ``volume_diff_<ml|px>`` and ``abs_volume_diff_<ml|px>``): ``mean``, ``median``, ``ci`` (the
    95% percentile interval of the mean over ``n_boot`` resamples of the patient groups, seeded;
    ``None`` with fewer than two groups or ``n_boot`` 0), ``n`` (values used) and ``missing``
    (NaN values left out). The macro mean averages each case's structures first (its values
    present), then the cases. Each entry also counts ``n_cases`` and ``empty_both``,
    ``empty_pred``, ``empty_truth``.

    Args:
        rows: Rows of :func:`case_rows` (values may be text, as read back from a CSV).
        n_boot: Bootstrap resamples.
        seed: Seed of the resamples.

    Returns:
        ``unit``, ``metrics`` (the column names), ``n_cases``, ``n_groups``, ``ci_level``,
        ``n_boot``, ``seed``, ``structures`` (name -> entry, in the rows' order) and ``macro``.

    Raises:
        DataError: No rows, mixed units, a case in two groups or twice for one structure.
    """
    rows = [dict(r) for r in rows]
    if not rows:
        raise DataError("no volumetric rows to summarise")
    unit, cols = _summary_columns(rows)
    abs_col = f"abs_{cols[-1]}"
    ids = list(dict.fromkeys(str(r["id"]) for r in rows))
    group_of: dict[str, str] = {}
    per: dict[str, dict[str, dict[str, float]]] = {}
    empties: dict[str, list[str]] = {}
    for r in rows:
        case, name = str(r["id"]), str(r["structure"])
        if group_of.setdefault(case, str(r["group"])) != str(r["group"]):
            raise DataError(f"case {case!r} is in two groups: {group_of[case]!r}, {r['group']!r}")
        if case in per.setdefault(name, {}):
            raise DataError(f"case {case!r} has two rows for structure {name!r}")
        vals = {c: as_number(r[c]) for c in cols}
        vals[abs_col] = abs(vals[cols[-1]])
        per[name][case] = vals
        empties.setdefault(name, []).append(str(r.get("empty") or ""))
    groups = sorted(set(group_of.values()))
    gindex = {g: i for i, g in enumerate(groups)}
    cols = [*cols, abs_col]
    macro_values: dict[str, dict[str, float]] = {}
    structures = {}
    for name, values in per.items():
        case_ids = list(values)
        gidx = np.array([gindex[group_of[i]] for i in case_ids])
        boot = (gidx, len(groups), n_boot, seed)
        structures[name] = _entry(_table(case_ids, values, cols), empties[name], boot)
    stacked = {n: _table(ids, v, cols) for n, v in per.items()}
    for c in cols:
        matrix = np.stack([stacked[n][c] for n in per])  # structures x cases
        ok = np.isfinite(matrix)
        sums, counts = np.where(ok, matrix, 0.0).sum(0), ok.sum(0)
        means = np.divide(sums, counts, out=np.full(len(ids), math.nan), where=counts > 0)
        for i, case in enumerate(ids):
            macro_values.setdefault(case, {})[c] = float(means[i])
    gidx = np.array([gindex[group_of[i]] for i in ids])
    all_empties = [e for name in per for e in empties[name]]
    macro = _entry(_table(ids, macro_values, cols), all_empties, (gidx, len(groups), n_boot, seed))
    macro["n_cases"] = len(ids)
    return {
        "unit": unit,
        "metrics": cols,
        "n_cases": len(ids),
        "n_groups": len(groups),
        "ci_level": CI_LEVEL,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "structures": structures,
        "macro": macro,
    }


def _fmt(stat: dict, digits: int, ci: bool = True, sign: bool = False) -> str:
    """``mean [lo, hi]`` of one metric's summary ("-" where missing)."""
    if stat["mean"] is None:
        return "-"
    spec = f"{'+' if sign else ''}.{digits}f"
    text = format(stat["mean"], spec)
    if ci and stat["ci"] is not None:
        text += f" [{format(stat['ci'][0], spec)}, {format(stat['ci'][1], spec)}]"
    return text


def format_volumetric(summary: Mapping) -> str:
    """The summary of :func:`summarize_volumetric` as a text table, one line per structure and
    one for the macro mean, each column naming its unit, then the case and empty-mask counts."""
    unit = summary["unit"]
    dice_c, hd_c, _assd_c, nsd_c, vol_c, abs_c = summary["metrics"]
    vol_unit = "mL" if unit == "mm" else "voxels"
    pct = round(100 * float(summary["ci_level"]))
    header = [
        "structure",
        f"Dice [{pct}% CI]",
        f"HD95 {unit} [{pct}% CI]",
        f"NSD@{nsd_c[4:]}",
        f"vol diff {vol_unit} (mean abs)",
        "missing HD95",
    ]
    lines = []
    entries = {**summary["structures"], "macro": summary["macro"]}
    for name, e in entries.items():
        vol = f"{_fmt(e[vol_c], 3, ci=False, sign=True)} ({_fmt(e[abs_c], 3, ci=False)})"
        cells = [name, _fmt(e[dice_c], 3), _fmt(e[hd_c], 2), _fmt(e[nsd_c], 3, ci=False), vol]
        lines.append([*cells, str(e[hd_c]["missing"])])
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    text = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *lines]
    ]
    m = summary["macro"]
    text.append(
        f"{summary['n_cases']} cases, {summary['n_groups']} patient groups; empty masks: "
        f"both {m['empty_both']}, prediction only {m['empty_pred']}, "
        f"truth only {m['empty_truth']} (structure-cases)"
    )
    return "\n".join(text)
