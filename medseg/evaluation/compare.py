"""Is model B really better than model A on the same cases? (``medseg evaluate --compare A B``).

A and B are each one of:

* a finished 3D cross-validation folder (its folds' ``oof.csv``: every case scored once by the
  fold model that did not train on it, ``postprocess`` ``none``);
* an evaluate output with per-case, per-structure rows (``cases.csv`` of ``medseg evaluate
  --pred/--truth``, or the one ``cases_<split>.csv`` of the 3D ``medseg evaluate``, whose
  ``postprocess`` column is restricted to ``none``), or that CSV file itself;
* a 2D ``medseg evaluate --data`` output, whose ``groups.csv`` holds each patient's volume Dice
  (then Dice is the only metric, one structure ``foreground``, and the case is the patient);
* a folder of predicted label maps, scored first against ``truth`` with
  :func:`medseg.evaluation.files.score_folders` (into ``<out>/a`` and ``<out>/b``).

The rows are paired by (case id, structure); the case sets, structures, units and NSD tolerance
must be the same on both sides. For each metric (Dice, HD95, ASSD, NSD), each structure and the
macro mean over structures (per case, over the structures where both sides have a value):

* the means of A and of B over the cases where both have a value (a pair with a missing value,
  e.g. HD95 where a mask is empty, is left out and counted);
* the paired difference of the means, B - A, with a 95% percentile interval from a PAIRED patient
  bootstrap: each resample draws patients with replacement
  (:func:`medseg.evaluation.stats.group_resamples`) and weights A and B with the same draw, so
  what A and B have in common cancels;
* the two-sided Wilcoxon signed-rank p-value (:func:`scipy.stats.wilcoxon`) on the per-patient
  differences (each patient's mean over its cases), with ``zero_method="wilcox"``: patients with
  a zero difference are dropped before ranking (and counted);
* a verdict in the direction the metric improves (Dice and NSD: higher is better; HD95 and ASSD:
  lower is better): ``B better`` or ``A better`` when the interval excludes 0, else ``no
  difference beyond the noise (interval includes 0)``.

Written into ``out`` (built in a temporary sibling folder and renamed into place; an existing
``out`` is refused unless ``overwrite``): ``comparison.json``, ``comparison.md`` and
``paired.csv`` (per patient and structure: A, B and B - A of each metric).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy import stats as sps

from medseg.artifacts.cv import fold_dir
from medseg.errors import ConfigError, DataError
from medseg.evaluation.evaluate import read_cases, write_cases
from medseg.evaluation.stats import CI_LEVEL, group_resamples, percentile_interval
from medseg.evaluation.volumetric import as_number
from medseg.utils import (
    atomic_write_json,
    atomic_write_text,
    check_output_folder,
    read_json,
    replace_folder,
)

logger = logging.getLogger(__name__)

#: How the Wilcoxon test treats zero differences (scipy's ``zero_method``).
ZERO_METHOD = "wilcox"
#: Verdict when the interval of B - A includes 0.
NO_DIFFERENCE = "no difference beyond the noise (interval includes 0)"
#: Name of the macro mean over structures (in the results and ``paired.csv``).
MACRO = "macro"
#: Structure name of a 2D evaluate output's per-patient Dice.
FOREGROUND = "foreground"
_SHOWN = 5  # ids named in a refusal


# --------------------------------------------------------------------------------------------
# Reading one side


def _header(path: Path) -> list[str]:
    """The column names of a CSV file ([] when empty)."""
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _case_csv(folder: Path) -> Path | None:
    """The per-case, per-structure CSV of an evaluate output folder, if it has one."""
    if (folder / "cases.csv").is_file() and "structure" in _header(folder / "cases.csv"):
        return folder / "cases.csv"
    found = sorted(p for p in folder.glob("cases_*.csv") if "structure" in _header(p))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DataError(f"{folder}: several case files ({names}); pass the one to compare")
    return found[0] if found else None


def _volumetric_rows(path: Path) -> list[dict]:
    """Rows of a per-case, per-structure CSV (``postprocess`` ``none`` only, where present)."""
    rows = read_cases(path)
    if rows and "postprocess" in rows[0]:
        rows = [r for r in rows if r["postprocess"] == "none"]
    missing = {"id", "group", "structure", "unit", "dice"} - set(rows[0] if rows else {})
    if not rows or missing:
        what = f"lacks the columns {sorted(missing)}" if rows else "has no rows"
        raise DataError(f"{path}: {what}; not per-case, per-structure evaluate rows")
    return rows


def _is_volumetric_cv(folder: Path) -> bool:
    """Is ``folder`` a finished 3D cross-validation (its report written)?"""
    summary = folder / "cv_summary.json"
    return summary.is_file() and read_json(summary).get("kind") == "volumetric"


def _oof_files(root: Path) -> list[Path]:
    """A 3D CV's out-of-fold rows, one ``oof.csv`` per fold (every case once)."""
    files, k = [], 1
    while fold_dir(root, k).is_dir():
        files.append(fold_dir(root, k) / "oof.csv")
        k += 1
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise DataError(f"{root}: unfinished cross-validation (missing {', '.join(missing)})")
    return files


def _group_rows(path: Path) -> list[dict]:
    """A 2D evaluate output's per-patient Dice as rows (case = patient, one structure)."""
    rows = read_cases(path)
    if not rows or not {"group", "dice"} <= set(rows[0]):
        raise DataError(f"{path}: expected columns group and dice (per-patient Dice)")
    return [
        {
            "id": r["group"],
            "group": r["group"],
            "structure": FOREGROUND,
            "unit": "",
            "dice": r["dice"],
        }
        for r in rows
    ]


def _load(
    side: str, path: Path, scratch: Path, truth: Path | None, options: Mapping
) -> tuple[str, list[dict]]:
    """``(kind, rows)`` of one side: ``cases`` (per-structure rows), ``groups`` (2D per-patient
    Dice) or ``predictions`` (a label-map folder, scored into ``scratch / side``)."""
    path = Path(path)
    if path.is_file():
        return "cases", _volumetric_rows(path)
    if not path.is_dir():
        raise DataError(f"{path}: {side.upper()} not found (an evaluate output or a folder)")
    if _is_volumetric_cv(path):
        return "cases", [r for f in _oof_files(path) for r in _volumetric_rows(f)]
    found = _case_csv(path)
    if found is not None:
        return "cases", _volumetric_rows(found)
    if (path / "groups.csv").is_file() and (path / "metrics.json").is_file():
        return "groups", _group_rows(path / "groups.csv")
    if truth is None:
        raise ConfigError(
            f"{path}: not an evaluate output (no cases.csv or groups.csv); to score it as a "
            "folder of predictions, give --truth DIR"
        )
    from medseg.evaluation.files import score_folders

    target = scratch / side
    score_folders(path, Path(truth), target, **options)
    return "predictions", _volumetric_rows(target / "cases.csv")


# --------------------------------------------------------------------------------------------
# Pairing


def _first(ids) -> str:
    """``n (first, ids, ...)`` for a refusal (``0`` alone when there are none)."""
    ids = sorted(ids)
    more = ", ..." if len(ids) > _SHOWN else ""
    return f"{len(ids)} ({', '.join(ids[:_SHOWN])}{more})" if ids else "0"


def _index(rows: list[dict], side: str) -> dict[tuple[str, str], dict]:
    """(case id, structure) -> row, refusing a pair given twice."""
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        key = (str(r["id"]), str(r["structure"]))
        if key in out:
            raise DataError(
                f"{side.upper()}: case {key[0]!r} has two rows for structure {key[1]!r}"
            )
        out[key] = r
    return out


def _metric_columns(rows: list[dict], side: str, kind: str) -> list[str]:
    """The compared columns: Dice, then HD95, ASSD and NSD of the rows' unit."""
    if kind == "groups":
        return ["dice"]
    units = {str(r["unit"]) for r in rows}
    if len(units) != 1:
        raise DataError(f"{side.upper()}: rows mix units {sorted(units)}; compare them apart")
    unit = units.pop()
    nsd = sorted({k for k in rows[0] if k.startswith("nsd_")})
    cols = ["dice", f"hd95_{unit}", f"assd_{unit}", *nsd[:1]]
    missing = [c for c in cols if c not in rows[0]]
    if missing or len(nsd) != 1:
        raise DataError(f"{side.upper()}: rows lack the columns {missing or ['nsd_<tolerance>']}")
    return cols


def _pair(kinds: tuple[str, str], rows: tuple[list[dict], list[dict]]) -> dict:
    """Check that A and B score the same cases alike; the pairing as arrays."""
    if (kinds[0] == "groups") != (kinds[1] == "groups"):
        raise DataError(
            "A and B differ in kind: a 2D evaluate output (per-patient Dice) cannot be paired "
            "with per-case, per-structure rows; compare like with like"
        )
    index_a, index_b = _index(rows[0], "a"), _index(rows[1], "b")
    cases_a, cases_b = {k[0] for k in index_a}, {k[0] for k in index_b}
    if cases_a != cases_b:
        only_a, only_b = cases_a - cases_b, cases_b - cases_a
        what = "patients" if kinds[0] == "groups" else "cases"
        name = _first if kinds[0] != "groups" else (lambda ids: str(len(ids)))
        raise DataError(
            f"A and B are not scored on the same {what}: {name(only_a)} only in A, "
            f"{name(only_b)} only in B"
        )
    if set(index_a) != set(index_b):
        names_a = sorted({k[1] for k in index_a})
        names_b = sorted({k[1] for k in index_b})
        raise DataError(f"A and B differ in structures: A has {names_a}, B has {names_b}")
    cols_a = _metric_columns(rows[0], "a", kinds[0])
    cols_b = _metric_columns(rows[1], "b", kinds[1])
    if cols_a[1:2] != cols_b[1:2]:
        units = [c[1].rpartition("_")[2] for c in (cols_a, cols_b)]
        raise DataError(f"A and B differ in units: {units[0]} in A, {units[1]} in B")
    if cols_a != cols_b:
        raise DataError(f"A and B differ in NSD tolerance: {cols_a[-1]} in A, {cols_b[-1]} in B")
    return _arrays(index_a, index_b, cols_a, list(dict.fromkeys(r["id"] for r in rows[0])))


def _arrays(index_a: dict, index_b: dict, cols: list[str], ids: list[str]) -> dict:
    """The paired values: ``values[side][structure]`` is a cases x metrics array."""
    structures = list(dict.fromkeys(k[1] for k in index_a))
    group_of: dict[str, str] = {}
    for case in ids:
        ga = {str(index_a[(case, s)]["group"]) for s in structures}
        gb = {str(index_b[(case, s)]["group"]) for s in structures}
        if len(ga) != 1 or ga != gb:
            raise DataError(
                f"case {case!r} is in different patient groups in A and B (or within one); "
                "score both with the same --groups file"
            )
        group_of[case] = ga.pop()
    values = {
        side: {
            s: np.array([[as_number(index[(c, s)][m]) for m in cols] for c in ids], dtype=float)
            for s in structures
        }
        for side, index in (("a", index_a), ("b", index_b))
    }
    groups = sorted(set(group_of.values()))
    gindex = {g: i for i, g in enumerate(groups)}
    gidx = np.array([gindex[group_of[c]] for c in ids], dtype=np.int64)
    return {"ids": ids, "groups": groups, "gidx": gidx, "cols": cols, "values": values}


def _macro(values: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> np.ndarray:
    """Per case and metric, the mean over the structures where both sides have a value."""
    stack = np.stack(list(values.values()))  # structures x cases x metrics
    ok = np.isfinite(stack) & np.isfinite(np.stack(list(other.values())))
    counts = ok.sum(0)
    sums = np.where(ok, stack, 0.0).sum(0)
    return np.divide(sums, counts, out=np.full(counts.shape, math.nan), where=counts > 0)


# --------------------------------------------------------------------------------------------
# Statistics


def better_direction(column: str) -> str:
    """``"higher"`` for Dice and NSD columns, ``"lower"`` for distances (HD95, ASSD)."""
    return "lower" if column.startswith(("hd95", "assd")) else "higher"


def verdict(ci: list[float] | None, better: str) -> str:
    """``"B better"``, ``"A better"`` or :data:`NO_DIFFERENCE` from the interval of B - A."""
    if ci is None:
        return "no interval (fewer than two patients)"
    lo, hi = ci
    if lo <= 0.0 <= hi:
        return NO_DIFFERENCE
    b_higher = lo > 0.0
    return "B better" if b_higher == (better == "higher") else "A better"


def _patient_means(x: np.ndarray, ok: np.ndarray, gidx: np.ndarray, n_groups: int) -> np.ndarray:
    """Each patient's mean of ``x`` over its cases where ``ok`` (NaN for a patient with none)."""
    counts = np.bincount(gidx, weights=ok.astype(float), minlength=n_groups)
    sums = np.bincount(gidx, weights=np.where(ok, x, 0.0), minlength=n_groups)
    return np.divide(sums, counts, out=np.full(n_groups, math.nan), where=counts > 0)


def _wilcoxon(diffs: np.ndarray) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of per-patient differences (``None`` when all are
    zero, so that nothing is left to rank)."""
    if not np.any(diffs != 0):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tiny samples: scipy notes the limits
        return float(sps.wilcoxon(diffs, zero_method=ZERO_METHOD).pvalue)


def _entry(a: np.ndarray, b: np.ndarray, gidx: np.ndarray, mult: np.ndarray, better: str) -> dict:
    """The comparison of one metric of one structure (``a``, ``b``: per case; ``mult``:
    resamples x patients, the draws shared by A and B)."""
    ok = np.isfinite(a) & np.isfinite(b)
    entry: dict = {"n_pairs": int(ok.sum()), "missing_pairs": int((~ok).sum()), "better": better}
    if not ok.any():
        entry.update(mean_a=None, mean_b=None, diff=None, ci=None, p_value=None, n_patients=0)
        entry.update(zero_differences=0, verdict="no pair with both values")
        return entry
    d = b - a
    ci = None
    if len(mult) and len(np.unique(gidx[ok])) >= 2:
        w = mult[:, gidx[ok]].astype(float)  # the same patients' weights for A and B: paired
        total = w.sum(1)
        keep = total > 0
        ci = percentile_interval(((w[keep] @ d[ok]) / total[keep]).tolist())
    diffs = _patient_means(d, ok, gidx, mult.shape[1])
    diffs = diffs[np.isfinite(diffs)]
    entry.update(
        mean_a=float(a[ok].mean()),
        mean_b=float(b[ok].mean()),
        diff=float(d[ok].mean()),
        ci=ci,
        p_value=_wilcoxon(diffs),
        n_patients=int(len(diffs)),
        zero_differences=int((diffs == 0).sum()),
        verdict=verdict(ci, better),
    )
    return entry


def _tables(paired: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{structure or "macro": (A, B)}``, each cases x metrics (macro with two structures+)."""
    va, vb = paired["values"]["a"], paired["values"]["b"]
    tables = {s: (va[s], vb[s]) for s in va}
    if len(va) > 1:
        tables[MACRO] = (_macro(va, vb), _macro(vb, va))
    return tables


def _compare_arrays(paired: dict, n_boot: int, seed: int) -> dict[str, dict[str, dict]]:
    """``{structure or "macro": {column: entry}}`` of the paired values."""
    n_groups = len(paired["groups"])
    draws = list(group_resamples(n_groups, max(n_boot, 0), seed))
    mult = np.array(draws, dtype=np.int64).reshape(len(draws), n_groups)
    return {
        name: {
            col: _entry(a[:, j], b[:, j], paired["gidx"], mult, better_direction(col))
            for j, col in enumerate(paired["cols"])
        }
        for name, (a, b) in _tables(paired).items()
    }


def _paired_rows(paired: dict) -> list[dict]:
    """``paired.csv``: per patient and structure (and the macro mean), A, B and B - A of each
    metric, each patient's mean over its cases where both sides have a value."""
    gidx, n_groups = paired["gidx"], len(paired["groups"])
    n_cases = np.bincount(gidx, minlength=n_groups)
    rows = []
    for name, (a, b) in _tables(paired).items():
        per = {}
        for j, col in enumerate(paired["cols"]):
            ok = np.isfinite(a[:, j]) & np.isfinite(b[:, j])
            per[col] = (
                _patient_means(a[:, j], ok, gidx, n_groups),
                _patient_means(b[:, j], ok, gidx, n_groups),
            )
        for k, patient in enumerate(paired["groups"]):
            row: dict = {"patient": patient, "structure": name, "n_cases": int(n_cases[k])}
            for col, (pa, pb) in per.items():
                row.update({f"{col}_a": _cell(pa[k]), f"{col}_b": _cell(pb[k])})
                row[f"{col}_diff"] = _cell(pb[k] - pa[k])
            rows.append(row)
    return rows


def _cell(value: float) -> float | str:
    """A CSV cell: rounded, empty where missing."""
    return "" if not math.isfinite(value) else round(float(value), 6)


# --------------------------------------------------------------------------------------------
# Report


def _label(column: str) -> str:
    """``dice`` -> ``Dice``, ``hd95_mm`` -> ``HD95 (mm)``, ``nsd_1mm`` -> ``NSD@1mm``."""
    if column == "dice":
        return "Dice"
    name, _, unit = column.partition("_")
    if name == "nsd":
        return f"NSD@{unit}"
    return f"{name.upper()} ({unit})"


def _num(value: float | None, digits: int, sign: bool = False) -> str:
    return "-" if value is None else format(value, f"{'+' if sign else ''}.{digits}f")


def _table_rows(result: Mapping) -> list[list[str]]:
    """One line per structure and metric: A, B, B - A [CI], p, verdict."""
    pct = round(100 * float(result["ci_level"]))
    lines = [["structure", "metric", "A", "B", f"B - A [{pct}% CI]", "p (Wilcoxon)", "verdict"]]
    for name, metrics in result["results"].items():
        for col, e in metrics.items():
            digits = 3 if col == "dice" or col.startswith("nsd") else 2
            diff = _num(e["diff"], digits, sign=True)
            if e["ci"] is not None:
                diff += f" [{_num(e['ci'][0], digits, True)}, {_num(e['ci'][1], digits, True)}]"
            p = "-" if e["p_value"] is None else f"{e['p_value']:.3g}"
            arrow = "higher" if e["better"] == "higher" else "lower"
            cells = [name, f"{_label(col)}, {arrow} better", _num(e["mean_a"], digits)]
            lines.append([*cells, _num(e["mean_b"], digits), diff, p, e["verdict"]])
    return lines


def _notes(result: Mapping) -> list[str]:
    """The lines under the table: inputs, counts, methods."""
    missing = {
        f"{name}/{_label(c)}": e["missing_pairs"]
        for name, m in result["results"].items()
        for c, e in m.items()
        if e["missing_pairs"]
    }
    left_out = ", ".join(f"{k} {v}" for k, v in missing.items()) or "none"
    return [
        f"A: {result['a']} ({result['kind_a']}); B: {result['b']} ({result['kind_b']})",
        f"{result['n_cases']} cases, {result['n_patients']} patients; paired patient bootstrap "
        f"({result['n_boot']} resamples, seed {result['seed']}, the same draw for A and B); "
        f"Wilcoxon signed-rank on per-patient differences, zero_method={result['zero_method']!r} "
        "(zero differences dropped before ranking)",
        f"pairs left out for a missing value (e.g. HD95 with an empty mask): {left_out}",
    ]


def format_comparison(result: dict) -> str:
    """The comparison of :func:`compare` as a text table (what ``medseg evaluate --compare``
    prints): per structure and metric, A, B, B - A with its interval, p and the verdict."""
    lines = _table_rows(result)
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines]
    return "\n".join([*text, *_notes(result)])


def _markdown(result: Mapping) -> str:
    """``comparison.md``: the table and the notes."""
    lines = _table_rows(result)
    table = ["| " + " | ".join(r) + " |" for r in lines]
    table.insert(1, "|" + "---|" * len(lines[0]))
    notes = [f"- {n}" for n in _notes(result)]
    head = [
        "# Comparison: B - A",
        "",
        f"Difference B - A; {NO_DIFFERENCE.split(' (')[0]} when the interval includes 0.",
        "",
    ]
    return "\n".join([*head, *table, "", *notes]) + "\n"


# --------------------------------------------------------------------------------------------
# Entry point


def _result(a: Path, b: Path, kinds: tuple[str, str], paired: dict, options: Mapping) -> dict:
    """The comparison record written to ``comparison.json`` (without the results)."""
    cols = paired["cols"]
    unit = cols[1].rpartition("_")[2] if len(cols) > 1 else None
    return {
        "a": str(a),
        "b": str(b),
        "kind_a": kinds[0],
        "kind_b": kinds[1],
        "truth": None if options.get("truth") is None else str(options["truth"]),
        "difference": "B - A",
        "unit": unit,
        "metrics": cols,
        "better": {c: better_direction(c) for c in cols},
        "structures": list(paired["values"]["a"]),
        "n_cases": len(paired["ids"]),
        "n_patients": len(paired["groups"]),
        "ci_level": CI_LEVEL,
        "n_boot": int(options["n_boot"]),
        "seed": int(options["seed"]),
        "bootstrap": "paired: patients drawn with replacement, the same draw for A and B; "
        "percentile interval of the difference of the case means",
        "test": "two-sided Wilcoxon signed-rank on the per-patient mean differences (scipy)",
        "zero_method": ZERO_METHOD,
    }


def compare(
    a: Path,
    b: Path,
    out: Path,
    *,
    truth: Path | None = None,
    groups: Path | None = None,
    tolerance_mm: float = 1.0,
    n_boot: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Compare model B with model A on the same cases (B - A, paired by case and structure).

    Args:
        a, b: each an evaluate output folder (``cases.csv`` / ``cases_<split>.csv`` per case and
            structure, or a 2D ``evaluate --data`` output's ``groups.csv``), such a CSV file, or a
            folder of predicted label maps (then ``truth`` is required).
        out: folder for ``comparison.json``, ``comparison.md``, ``paired.csv`` (and ``a/``,
            ``b/``: the scores of prediction folders).
        truth: ground-truth label maps, to score prediction folders.
        groups: CSV ``case,patient`` for scoring prediction folders (several cases per patient).
        tolerance_mm: NSD tolerance when scoring prediction folders.
        n_boot: paired bootstrap resamples (0: no intervals).
        seed: seed of the resamples.
        overwrite: replace an existing ``out``.

    Returns:
        The record of ``comparison.json``: inputs, counts, method and ``results``
        (``{structure or "macro": {metric column: {mean_a, mean_b, diff, ci, p_value, n_pairs,
        missing_pairs, n_patients, zero_differences, better, verdict}}}``).

    Raises:
        RunExistsError: ``out`` exists and ``overwrite`` is false.
        ConfigError: a prediction folder without ``truth``; ``groups`` with no prediction
            folder; ``out`` is or holds an input.
        DataError: the sides differ in cases, structures, units or NSD tolerance, or a file is
            not what it should be.
    """
    a, b, out = Path(a), Path(b), Path(out)
    check_output_folder(out, (a, b, truth), overwrite)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    options = {"groups": groups, "tolerance_mm": tolerance_mm, "n_boot": n_boot, "seed": seed}
    try:
        tmp.mkdir(parents=True)
        kind_a, rows_a = _load("a", a, tmp, truth, options)
        kind_b, rows_b = _load("b", b, tmp, truth, options)
        if groups is not None and "predictions" not in (kind_a, kind_b):
            raise ConfigError(
                f"{groups}: --groups applies to prediction folders; the evaluate outputs A and B "
                "already name each case's patient"
            )
        if truth is not None and "predictions" not in (kind_a, kind_b):
            logger.info("%s: not used, A and B are evaluate outputs (already scored)", truth)
        paired = _pair((kind_a, kind_b), (rows_a, rows_b))
        result = _result(a, b, (kind_a, kind_b), paired, {**options, "truth": truth})
        result["results"] = _compare_arrays(paired, n_boot, seed)
        atomic_write_json(tmp / "comparison.json", result)
        atomic_write_text(tmp / "comparison.md", _markdown(result))
        write_cases(tmp / "paired.csv", _paired_rows(paired))
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    macro = result["results"].get(MACRO) or next(iter(result["results"].values()))
    logger.info("compare %s vs %s: Dice %s", a.name, b.name, macro["dice"]["verdict"])
    return result
