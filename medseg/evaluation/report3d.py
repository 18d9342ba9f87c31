"""The report of a 3D cross-validation: out-of-fold scores per structure, in mm, with intervals.

Each fold of a 3D ``medseg cv`` writes ``fold_<k>/oof.csv``: one row per validation case,
structure and post-processing (``none``: the model's label map; ``largest``: each structure's
largest connected component only). This module reads them back and writes ``cv_summary.json``
and ``report.md`` at the top of the CV folder:

* ``none`` and ``largest``: the summary (:func:`medseg.evaluation.volumetric.
  summarize_volumetric`: per structure and macro mean, 95% bootstrap intervals over patients)
  of every out-of-fold case with that post-processing;
* ``chosen``: post-processing chosen out of fold, the honest figure: for fold ``k`` the setting
  with the higher macro mean Dice on the *other* folds' cases is applied to fold ``k``'s cases
  (a tie keeps ``none``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from medseg.artifacts.cv import fold_dir
from medseg.errors import DataError
from medseg.evaluation.evaluate import read_cases
from medseg.evaluation.volumetric import format_volumetric, summarize_volumetric
from medseg.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

POSTPROCESSING = ("none", "largest")
#: Text columns of a 3D per-case row; every other column is a number (empty: missing).
TEXT_COLUMNS = frozenset({"id", "case", "group", "structure", "postprocess", "empty", "unit"})


def is_volumetric_cv(root: str | Path) -> bool:
    """Whether the CV folder ``root`` holds a 3D cross-validation (a fold wrote ``plan.json``)."""
    return any(Path(root).glob("fold_*/plan.json"))


def _typed(row: dict) -> dict:
    out: dict = {}
    for key, value in row.items():
        if key in TEXT_COLUMNS or value is None:
            out[key] = value
        elif value == "" or value.lower() == "nan":
            out[key] = math.nan
        else:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def read_oof_rows(root: str | Path) -> dict[int, list[dict]]:
    """Each finished fold's typed out-of-fold rows, by fold number.

    Raises:
        DataError: no fold has written its ``oof.csv`` yet.
    """
    folds: dict[int, list[dict]] = {}
    k = 1
    while fold_dir(Path(root), k).exists():
        path = fold_dir(Path(root), k) / "oof.csv"
        if path.exists():
            folds[k] = [_typed(r) for r in read_cases(path)]
        k += 1
    if not folds:
        raise DataError(f"{root}: no fold has written its oof.csv yet")
    return folds


def _macro_dice(rows: list[dict]) -> float:
    values = [r["dice"] for r in rows if not math.isnan(r.get("dice", math.nan))]
    return sum(values) / len(values) if values else -1.0


def choose_out_of_fold(folds: dict[int, list[dict]]) -> tuple[list[dict], dict[int, str]]:
    """Post-processing chosen for each fold on the other folds' cases, and the rows it gives."""
    chosen_rows: list[dict] = []
    choices: dict[int, str] = {}
    for k, rows in folds.items():
        others = [r for f, rs in folds.items() if f != k for r in rs]
        scores = {
            p: _macro_dice([r for r in others if r["postprocess"] == p]) for p in POSTPROCESSING
        }
        choice = "largest" if scores["largest"] > scores["none"] else "none"
        choices[k] = choice
        chosen_rows += [r for r in rows if r["postprocess"] == choice]
    return chosen_rows, choices


def summarize_volumetric_cv(root: str | Path, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """The summary of a 3D CV folder (see the module docstring)."""
    folds = read_oof_rows(root)
    every = [r for rows in folds.values() for r in rows]
    summary: dict = {"kind": "volumetric", "folds": sorted(folds)}
    for p in POSTPROCESSING:
        summary[p] = summarize_volumetric(
            [r for r in every if r["postprocess"] == p], n_boot=n_boot, seed=seed
        )
    chosen, choices = choose_out_of_fold(folds) if len(folds) > 1 else ([], {})
    if chosen:
        summary["chosen"] = summarize_volumetric(chosen, n_boot=n_boot, seed=seed)
        summary["postprocess_by_fold"] = {str(k): v for k, v in choices.items()}
    return summary


def _markdown(summary: dict) -> str:
    lines = [
        "# Cross-validation (3D)",
        "",
        f"Folds: {', '.join(map(str, summary['folds']))}. Every figure is out of fold: each "
        "case is scored by the model that did not train on it; intervals are 95% bootstrap "
        "intervals over patients.",
        "",
    ]
    titles = {
        "chosen": "Post-processing chosen out of fold (the figure to quote)",
        "none": "No post-processing",
        "largest": "Largest component per structure, on every fold",
    }
    for key in ("chosen", "none", "largest"):
        if key not in summary:
            continue
        lines += [f"## {titles[key]}", "", "```", format_volumetric(summary[key]), "```", ""]
    if "postprocess_by_fold" in summary:
        by_fold = ", ".join(f"fold {k}: {v}" for k, v in summary["postprocess_by_fold"].items())
        lines += [f"Post-processing chosen per fold: {by_fold}.", ""]
    return "\n".join(lines)


def write_volumetric_report(root: str | Path, summary: dict | None = None) -> dict:
    """Write ``cv_summary.json`` and ``report.md`` of a 3D CV folder; returns the summary."""
    root = Path(root)
    if summary is None:
        summary = summarize_volumetric_cv(root)
    atomic_write_json(root / "cv_summary.json", summary)
    atomic_write_text(root / "report.md", _markdown(summary))
    logger.info("wrote %s and report.md", root / "cv_summary.json")
    return summary
