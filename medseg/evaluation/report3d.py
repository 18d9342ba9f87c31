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

``medseg tune`` (:func:`tune_volumetric`) adds mirror test-time augmentation: each fold's model
predicts its validation cases again with its flips averaged (``fold_<k>/oof_mirror.csv``; the
flips of the axes training flipped, :func:`medseg.data.augment3d.flip_axes`), and the choice runs
over the four settings ``none``, ``largest``, ``mirror`` and ``mirror+largest``, again on the
other folds only. A model trained without flips is not mirrored: the choice is then between the
first two.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from medseg.artifacts.cv import CV_CHECKPOINT, fold_dir
from medseg.artifacts.runs import open_run
from medseg.data.augment3d import flip_axes
from medseg.data.scan_msd import describe
from medseg.errors import DataError
from medseg.evaluation.evaluate import read_cases, write_cases
from medseg.evaluation.score3d import score_volumes
from medseg.evaluation.volumetric import format_volumetric, summarize_volumetric
from medseg.utils import atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)

POSTPROCESSING = ("none", "largest")
#: The settings :func:`tune_volumetric` chooses among, in order of preference on a tie.
TUNE_SETTINGS = ("none", "largest", "mirror", "mirror+largest")
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


def choose_out_of_fold(
    folds: dict[int, list[dict]], settings: tuple[str, ...] = POSTPROCESSING
) -> tuple[list[dict], dict[int, str]]:
    """The setting chosen for each fold on the other folds' cases (the highest macro mean Dice;
    the earlier of ``settings`` on a tie), and the rows it gives."""
    chosen_rows: list[dict] = []
    choices: dict[int, str] = {}
    for k, rows in folds.items():
        others = [r for f, rs in folds.items() if f != k for r in rs]
        scores = {p: _macro_dice([r for r in others if r["postprocess"] == p]) for p in settings}
        choice = max(settings, key=lambda p: (scores[p], -settings.index(p)))
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


def _mirror_rows(root: Path, k: int, n_boot: int) -> list[dict]:
    """Fold ``k``'s validation cases predicted with mirror TTA (computed once, then read)."""
    fdir = fold_dir(root, k)
    path = fdir / "oof_mirror.csv"
    if not path.exists():
        run = open_run(fdir)
        ids = read_json(run.splits_path)["splits"]["val"]
        by_id = {c.case_id: c for c in describe(run.config().data.root).cases}
        out = fdir / "tune_mirror"
        score_volumes(
            fdir, [by_id[i] for i in ids], out, checkpoint=CV_CHECKPOINT, split="val",
            n_boot=n_boot, mirror=True, tolerance_mm=run.config().evaluation.nsd_tolerance_mm,
        )  # fmt: skip
        rows = read_cases(out / "cases_val.csv")
        for row in rows:
            row["postprocess"] = "mirror" if row["postprocess"] == "none" else "mirror+largest"
        write_cases(path, rows, {"fold": k})
    return [_typed(r) for r in read_cases(path)]


def tune_volumetric(root: str | Path, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Out-of-fold choice among no post-processing, the largest component per structure and
    mirror TTA (see the module docstring); writes ``tune/tune.json`` and ``tune/ablation.md``.

    Raises:
        DataError: fewer than two folds have finished.
    """
    root = Path(root)
    folds = read_oof_rows(root)
    if len(folds) < 2:
        raise DataError(f"{root}: tune needs two finished folds or more, found {len(folds)}")
    settings = TUNE_SETTINGS
    axes = flip_axes(open_run(fold_dir(root, min(folds))).config().augment)
    if axes:
        for k in folds:
            folds[k] = folds[k] + _mirror_rows(root, k, n_boot)
    else:
        settings = tuple(s for s in TUNE_SETTINGS if not s.startswith("mirror"))
        logger.info("tune: no mirror TTA (training flipped no axis)")
    every = [r for rows in folds.values() for r in rows]
    result: dict = {
        "kind": "volumetric", "folds": sorted(folds), "mirror_axes": axes, "variants": {},
    }  # fmt: skip
    for setting in settings:
        rows = [r for r in every if r["postprocess"] == setting]
        result["variants"][setting] = summarize_volumetric(rows, n_boot=n_boot, seed=seed)
    chosen, choices = choose_out_of_fold(folds, settings)
    result["chosen"] = summarize_volumetric(chosen, n_boot=n_boot, seed=seed)
    result["chosen_by_fold"] = {str(k): v for k, v in choices.items()}
    lines = ["# Tune (3D): settings scored out of fold", ""]
    for name, summary in [
        *result["variants"].items(),
        ("chosen on the other folds", result["chosen"]),
    ]:
        lines += [f"## {name}", "", "```", format_volumetric(summary), "```", ""]
    by_fold = ", ".join(f"fold {k}: {v}" for k, v in choices.items())
    lines += [f"Chosen per fold (on the other folds): {by_fold}.", ""]
    atomic_write_json(root / "tune" / "tune.json", result)
    atomic_write_text(root / "tune" / "ablation.md", "\n".join(lines))
    return result
