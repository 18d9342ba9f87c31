"""Out-of-fold (OOF) predictions of a cross-validation run: reading and checking them.

``medseg cv`` writes one ``fold_<k>/oof.csv`` per fold (see :mod:`medseg.training.cv`)::

    segmentation:   id,group,fold,tp,fp,fn,true_pixels,pred_pixels   (thresholded-mask pixel counts)
    classification: id,group,fold,target,pred,p_<class0>,p_<class1>,...

Every sample is predicted exactly once, by the fold model that did not train on it. The number of
folds comes from ``splits.json`` (or ``config.yaml``, or the ``fold_<k>`` folders); a fold counts
as finished when its folder has ``oof.csv``, ``metrics.json`` or a ``done`` state.

Segmentation folds also write ``fold_<k>/oof_groups.csv``: one row per patient of the fold, its
slices scored as one volume (:mod:`medseg.evaluation.patients`)::

    group,slices,tp,fp,fn,dice,empty,unit,hd95_px,assd_px,nsd_<t>px,fold

Runs written before it existed have none; their per-patient surface metrics are then not
available (``CVData.group_surface`` is ``None``), never mixed with another convention.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from medseg.artifacts.cv import fold_dir
from medseg.artifacts.runs import RunDir
from medseg.config.loading import safe_load_bounded
from medseg.errors import DataError
from medseg.utils import read_json, spreadsheet_unquote

SEG_COLUMNS = ("id", "group", "fold", "tp", "fp", "fn", "true_pixels", "pred_pixels")
CLS_COLUMNS = ("id", "group", "fold", "target", "pred")
GROUP_COLUMNS = ("group", "tp", "fp", "fn", "empty")
#: The per-patient file of a segmentation fold.
GROUPS_FILE = "oof_groups.csv"
_EMPTY_VALUES = ("", "both", "pred", "truth")


@dataclass
class CVData:
    """A CV run's OOF rows, as parsed rows and as arrays."""

    root: Path
    task: str
    k: int
    folds_done: list[int]
    rows: list[dict]
    config: dict
    class_names: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # sorted unique group ids
    gidx: np.ndarray = None  # row -> index into groups
    fold: np.ndarray = None  # row -> fold number
    counts: np.ndarray = None  # segmentation: [N, 3] tp, fp, fn
    true_pixels: np.ndarray = None
    # segmentation, from every finished fold's oof_groups.csv: "hd95", "assd", "nsd" -> one
    # value per group (aligned with ``groups``; NaN where missing); None when a fold has none
    group_surface: dict[str, np.ndarray] | None = None
    surface_unit: str | None = None  # "px" (or "mm")
    nsd_tolerance: float | None = None  # in surface_unit
    surface_missing_folds: list[int] = field(default_factory=list)  # folds without the file
    target: np.ndarray = None  # classification
    pred: np.ndarray = None
    probs: np.ndarray = None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = safe_load_bounded(path.read_text(), str(path))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({e})") from None
    return data if isinstance(data, dict) else {}


def _fold_count(root: Path, manifest: dict, config: dict) -> int:
    if isinstance(manifest.get("k"), int):
        return manifest["k"]
    if isinstance(manifest.get("folds"), list) and manifest["folds"]:
        return len(manifest["folds"])
    folds = (config.get("cv") or {}).get("folds")
    if isinstance(folds, int):
        return folds
    found = [int(p.name[5:]) for p in root.glob("fold_*") if p.name[5:].isdigit()]
    if not found:
        raise DataError(f"{root / 'splits.json'}: no k-fold manifest and no fold_<k> folders")
    return max(found)


def _fold_started(fdir: Path) -> bool:
    """Has fold ``fdir`` finished (state done, metrics written or oof.csv present)?"""
    if (fdir / "oof.csv").exists() or (fdir / "metrics.json").exists():
        return True
    state = RunDir(fdir).state()
    return isinstance(state, dict) and state.get("status") == "done"


def _int(value: str, path: Path, line: int, column: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number) or number < 0:
        raise DataError(f"{path}: line {line}: {column}={value!r} is not a non-negative integer")
    return int(number)


def _prob(value: str, path: Path, line: int, column: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and -1e-6 <= number <= 1 + 1e-6):
        raise DataError(f"{path}: line {line}: {column}={value!r} is not a probability")
    return min(max(number, 0.0), 1.0)


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    """The header and rows of a CSV file (values as strings).

    Raises:
        DataError: the file cannot be read or parsed.
    """
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [{k: spreadsheet_unquote(v) for k, v in r.items()} for r in reader]
            return list(reader.fieldnames or []), rows
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _read_oof_file(path: Path, k: int, task: str | None) -> tuple[str, list[str], list[dict]]:
    """Rows of one fold's oof.csv, typed and checked; returns (task, class names, rows)."""
    header, raw = _read_csv(path)
    if task is None:
        task = "segmentation" if "tp" in header else "classification"
    needed = SEG_COLUMNS if task == "segmentation" else CLS_COLUMNS
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(
            f"{path}: malformed {task} oof.csv, missing column(s) {', '.join(missing)} "
            f"(has {', '.join(header) or 'nothing'})"
        )
    names = [c[2:] for c in header if c.startswith("p_")] if task == "classification" else []
    if task == "classification" and len(names) < 2:
        raise DataError(f"{path}: malformed classification oof.csv, needs p_<class> columns")
    if not raw:
        raise DataError(f"{path}: no rows (a fold with no validation samples?)")
    rows = []
    for line, r in enumerate(raw, start=2):
        if None in r or any(r.get(c) is None for c in needed):
            raise DataError(f"{path}: line {line}: wrong number of fields")
        if not r["id"] or not r["group"]:
            raise DataError(f"{path}: line {line}: empty id or group")
        row = {"id": r["id"], "group": r["group"], "fold": _int(r["fold"], path, line, "fold")}
        if row["fold"] != k:
            raise DataError(f"{path}: line {line}: fold={row['fold']}, expected {k}")
        if task == "segmentation":
            for c in SEG_COLUMNS[3:]:
                row[c] = _int(r[c], path, line, c)
            if row["true_pixels"] != row["tp"] + row["fn"] or (
                row["pred_pixels"] != row["tp"] + row["fp"]
            ):
                raise DataError(
                    f"{path}: line {line}: inconsistent counts (true_pixels must be tp+fn and "
                    "pred_pixels tp+fp)"
                )
        else:
            for c in ("target", "pred"):
                row[c] = _int(r[c], path, line, c)
                if row[c] >= len(names):
                    raise DataError(f"{path}: line {line}: {c}={row[c]} but {len(names)} classes")
            for n in names:
                row[f"p_{n}"] = _prob(r[f"p_{n}"], path, line, f"p_{n}")
        rows.append(row)
    return task, names, rows


def load_cv(run_dir: str | Path) -> CVData:
    """A CV run's OOF rows of every finished fold, parsed, checked and as arrays.

    Raises:
        DataError: naming the file, as :func:`load_oof` does; also when ``config.yaml`` names
            an unsupported task or no fold has finished.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise DataError(f"{root}: cross-validation run folder not found")
    config = _read_yaml(root / "config.yaml")
    splits = root / "splits.json"
    manifest = read_json(splits, missing_ok=True) or {}
    k = _fold_count(root, manifest, config)
    task = (config.get("data") or {}).get("task")
    if task not in (None, "segmentation", "classification"):
        raise DataError(f"{root / 'config.yaml'}: data.task '{task}' is not supported")
    folds_done = [f for f in range(1, k + 1) if _fold_started(fold_dir(root, f))]
    if not folds_done:
        raise DataError(f"{fold_dir(root, 1) / 'oof.csv'}: not found (no fold has finished yet)")
    rows: list[dict] = []
    class_names: list[str] | None = None
    for f in folds_done:
        path = fold_dir(root, f) / "oof.csv"
        if not path.is_file():
            raise DataError(f"{path}: not found (fold {f} has no out-of-fold predictions)")
        task, names, fold_rows = _read_oof_file(path, f, task)
        if class_names is not None and names != class_names:
            raise DataError(f"{path}: classes {names} differ from the other folds' {class_names}")
        class_names = names
        rows.extend(fold_rows)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise DataError(
            f"{root}: {len(ids) - len(set(ids))} sample id(s) occur in more than one oof.csv row "
            "(out-of-fold sets must not overlap)"
        )
    wanted = manifest.get("class_names") or []
    if task == "classification" and wanted and list(wanted) != class_names:
        raise DataError(
            f"{splits}: class_names {wanted} differ from the oof.csv columns {class_names}"
        )
    groups = sorted({r["group"] for r in rows})
    index = {g: i for i, g in enumerate(groups)}
    data = CVData(
        root=root,
        task=task,
        k=k,
        folds_done=folds_done,
        rows=rows,
        config=config,
        class_names=class_names or [],
        groups=groups,
        gidx=np.array([index[r["group"]] for r in rows], dtype=np.int64),
        fold=np.array([r["fold"] for r in rows], dtype=np.int64),
    )
    if task == "segmentation":
        data.counts = np.array([[r["tp"], r["fp"], r["fn"]] for r in rows], dtype=np.int64)
        data.true_pixels = np.array([r["true_pixels"] for r in rows], dtype=np.int64)
        _load_group_surface(data)
    else:
        data.target = np.array([r["target"] for r in rows], dtype=np.int64)
        data.pred = np.array([r["pred"] for r in rows], dtype=np.int64)
        data.probs = np.array([[r[f"p_{n}"] for n in data.class_names] for r in rows])
    return data


def _surface_header(path: Path, header: list[str]) -> tuple[str, float, dict[str, str]]:
    """``(unit, NSD tolerance, metric -> column)`` of an oof_groups.csv header (checked)."""
    hd = [c for c in header if c.startswith("hd95_")]
    unit = hd[0][5:] if len(hd) == 1 and hd[0][5:] in ("px", "mm") else "<unit>"
    nsd = [c for c in header if c.startswith("nsd_") and c.endswith(unit)]
    tol = _number(nsd[0][4 : len(nsd[0]) - len(unit)]) if len(nsd) == 1 else math.nan
    wanted = {
        **{c: c for c in GROUP_COLUMNS},
        "hd95": f"hd95_{unit}",
        "assd": f"assd_{unit}",
        "nsd": nsd[0] if len(nsd) == 1 and math.isfinite(tol) else f"nsd_<t>{unit}",
    }
    missing = [c for c in wanted.values() if c not in header]
    if missing:
        raise DataError(
            f"{path}: malformed {GROUPS_FILE}, missing column(s) {', '.join(missing)} "
            f"(has {', '.join(header) or 'nothing'})"
        )
    return unit, tol, {m: wanted[m] for m in ("hd95", "assd", "nsd")}


def _number(text: str | None) -> float:
    """``text`` as a float; NaN when empty or not a number."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _surface_value(value: str | None, path: Path, line: int, column: str) -> float:
    """A distance (>= 0) or NSD (0..1) cell; empty or ``nan``: missing (NaN)."""
    text = (value or "").strip()
    if text.lower() in ("", "nan"):
        return math.nan
    number = _number(text)
    top = 1.0 + 1e-9 if column.startswith("nsd_") else math.inf
    if not (math.isfinite(number) and 0 <= number <= top):
        raise DataError(f"{path}: line {line}: {column}={value!r} is not a valid value")
    return number


def _read_groups_file(
    path: Path, k: int, counts: dict[str, np.ndarray]
) -> tuple[str, float, dict[str, tuple[float, float, float]]]:
    """One fold's oof_groups.csv, checked against the fold's oof.csv counts per group
    (``counts``); returns ``(unit, NSD tolerance, group -> (hd95, assd, nsd))``."""
    header, raw = _read_csv(path)
    unit, tol, cols = _surface_header(path, header)
    out: dict[str, tuple[float, float, float]] = {}
    for line, r in enumerate(raw, start=2):
        if None in r or any(r.get(c) is None for c in header):
            raise DataError(f"{path}: line {line}: wrong number of fields")
        g = r["group"]
        if g not in counts or g in out:
            what = "appears twice" if g in out else "has no rows in this fold's oof.csv"
            raise DataError(f"{path}: line {line}: the patient/group {what}")
        if "fold" in r and _int(r["fold"], path, line, "fold") != k:
            raise DataError(f"{path}: line {line}: fold={r['fold']}, expected {k}")
        got = [_int(r[c], path, line, c) for c in ("tp", "fp", "fn")]
        if got != counts[g].tolist():
            raise DataError(
                f"{path}: line {line}: tp, fp, fn {got} differ from the sum of this patient's "
                f"oof.csv rows {counts[g].tolist()}"
            )
        if r["empty"] not in _EMPTY_VALUES:
            raise DataError(
                f"{path}: line {line}: empty={r['empty']!r} is not both, pred, truth or empty"
            )
        out[g] = tuple(_surface_value(r[cols[m]], path, line, cols[m]) for m in cols)
    if len(out) != len(counts):
        raise DataError(
            f"{path}: {len(counts) - len(out)} patient(s)/group(s) of this fold's oof.csv have "
            "no row"
        )
    return unit, tol, out


def _load_group_surface(d: CVData) -> None:
    """Fill ``d``'s per-group surface arrays from every finished fold's oof_groups.csv; leaves
    them ``None`` (listing ``surface_missing_folds``) when a fold has none."""
    d.surface_missing_folds = [
        f for f in d.folds_done if not (fold_dir(d.root, f) / GROUPS_FILE).is_file()
    ]
    if d.surface_missing_folds:
        return
    values = np.full((len(d.groups), 3), np.nan)
    seen = np.zeros(len(d.groups), dtype=np.int64)
    index = {g: i for i, g in enumerate(d.groups)}
    for f in d.folds_done:
        path = fold_dir(d.root, f) / GROUPS_FILE
        sel = d.fold == f
        sums = np.stack(
            [np.bincount(d.gidx[sel], d.counts[sel, c], len(d.groups)) for c in range(3)], 1
        ).astype(np.int64)
        counts = {d.groups[g]: sums[g] for g in np.unique(d.gidx[sel])}
        unit, tol, rows = _read_groups_file(path, f, counts)
        if d.surface_unit is not None and (unit, tol) != (d.surface_unit, d.nsd_tolerance):
            raise DataError(
                f"{path}: unit {unit} and NSD tolerance {tol:g} differ from the other folds' "
                f"{d.surface_unit} and {d.nsd_tolerance:g}"
            )
        d.surface_unit, d.nsd_tolerance = unit, tol
        for g, v in rows.items():
            values[index[g]] = v
            seen[index[g]] += 1
    values[seen > 1] = np.nan  # a group split across folds has no single volume
    d.group_surface = {m: values[:, j] for j, m in enumerate(("hd95", "assd", "nsd"))}


def load_oof(run_dir: str | Path) -> list[dict]:
    """Every finished fold's out-of-fold rows, in fold order then file order.

    Values are typed: ``id``/``group`` strings, ``fold`` and the counts (segmentation: ``tp``,
    ``fp``, ``fn``, ``true_pixels``, ``pred_pixels``) or class indices (classification:
    ``target``, ``pred``) ints, ``p_<class>`` floats. A fold counts as finished when its folder
    has ``oof.csv``, ``metrics.json`` or a ``done`` state; folds not started are skipped.

    Raises:
        DataError: naming the file, when a finished fold's ``oof.csv`` is missing or malformed
            (missing columns, bad values, wrong fold number, inconsistent counts), or when a sample
            id occurs in two rows.
    """
    return load_cv(run_dir).rows
