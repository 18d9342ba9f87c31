"""Scoring a 3D model on whole volumes: per case and structure, in mm, with intervals.

:func:`score_volumes` predicts each case whole at its own resolution with
:class:`~medseg.inference.volumetric.VolumePredictor` (the code a served model runs), scores
each structure (:mod:`medseg.evaluation.volumetric`: Dice, HD95 and ASSD in mm, NSD, volumes in
mL) with and without keeping each structure's largest component, and writes the rows and the
summaries. Training calls it on a run's validation cases; ``medseg evaluate`` on a run's split or
on a labelled dataset folder (``dataset.json``).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medseg.artifacts.exports import folder_kind
from medseg.artifacts.runs import open_run
from medseg.data.scan_msd import describe
from medseg.errors import ConfigError, DataError
from medseg.evaluation.evaluate import write_cases
from medseg.evaluation.volumetric import case_rows, format_volumetric, summarize_volumetric
from medseg.inference.postprocess import largest_component_per_label
from medseg.inference.volumetric import VolumePredictor
from medseg.io.msd import MsdCase, read_case_image, read_case_labels
from medseg.utils import atomic_write_json, read_json

logger = logging.getLogger(__name__)


def score_volumes(
    model: str | Path,
    cases: list[MsdCase],
    out: str | Path,
    *,
    checkpoint: str = "best",
    split: str = "val",
    n_boot: int = 1000,
    mirror: bool | None = None,
    tolerance_mm: float = 1.0,
) -> dict:
    """Predict ``cases`` whole with ``model`` (a 3D run, CV or export folder) and score them.

    Writes ``<out>/cases_<split>.csv`` (one row per case, structure and post-processing:
    ``none`` or ``largest``) and records in ``<out>/metrics.json`` (other keys kept)
    ``{split: summary without post-processing, split + "_largest": with it}``; returns those
    two entries. ``mirror``: mirror TTA on or off (None: the model's own setting).
    ``tolerance_mm``: the NSD tolerance (``evaluation.nsd_tolerance_mm``).
    """
    out = Path(out)
    predictor = VolumePredictor(model, checkpoint=checkpoint, mirror=mirror)
    rows = _predict_and_score(predictor, cases, tolerance_mm)
    out.mkdir(parents=True, exist_ok=True)
    write_cases(out / f"cases_{_file_part(split)}.csv", rows)
    plain = summarize_volumetric([r for r in rows if r["postprocess"] == "none"], n_boot=n_boot)
    largest = summarize_volumetric(
        [r for r in rows if r["postprocess"] == "largest"], n_boot=n_boot
    )
    result = {split: {**plain, "checkpoint": checkpoint}, f"{split}_largest": largest}
    path = out / "metrics.json"
    recorded = read_json(path) if path.is_file() else {}
    atomic_write_json(path, {**recorded, **result})
    logger.info("%s (%s, %d cases):\n%s", split, checkpoint, len(cases), format_volumetric(plain))
    return result


def _read_case(case: MsdCase, channels: int, labels: dict) -> tuple:
    return read_case_image(case, channels), read_case_labels(case, labels)


def _score_case(case: MsdCase, pred, truth, spacing, labels: dict, tolerance_mm: float) -> list:
    """One case's rows: each structure, without and with its largest component only."""
    rows = []
    for name, mask in (("none", pred), ("largest", largest_component_per_label(pred))):
        args = (case.case_id, case.case_id, mask, truth, spacing, labels, tolerance_mm)
        rows.extend({**row, "postprocess": name} for row in case_rows(*args))
    return rows


def _predict_and_score(
    predictor: VolumePredictor, cases: list[MsdCase], tolerance_mm: float
) -> list[dict]:
    """The rows of ``cases`` in order, each case read (one ahead) and scored (one at a time) in
    threads while the model predicts the next: the same rows as one case after another, with
    at most three cases' volumes in memory."""
    labels, rows = predictor.labels, []
    with (
        ThreadPoolExecutor(1, thread_name_prefix="medseg-read3d") as readers,
        ThreadPoolExecutor(1, thread_name_prefix="medseg-score3d") as scorer,
    ):
        ahead = readers.submit(_read_case, cases[0], predictor.channels, labels) if cases else None
        scoring = None
        for k, case in enumerate(cases):
            assert ahead is not None
            image, truth = ahead.result()
            ahead = None
            if k + 1 < len(cases):
                ahead = readers.submit(_read_case, cases[k + 1], predictor.channels, labels)
            spacing = image.meta.spacing
            pred = predictor.predict(image.array, spacing, image.meta.affine)["labels"]
            if scoring is not None:
                rows.extend(scoring.result())
            scoring = scorer.submit(_score_case, case, pred, truth, spacing, labels, tolerance_mm)
        if scoring is not None:
            rows.extend(scoring.result())
    return rows


def _file_part(split: str) -> str:
    """``folder:name`` -> ``folder_name`` (a split's name in a file name)."""
    return split.replace(":", "_").replace("/", "_")


def evaluate_volumes(
    model: str | Path,
    *,
    split: str = "val",
    data: str | Path | None = None,
    out: str | Path | None = None,
    checkpoint: str = "best",
    n_boot: int = 1000,
    tolerance_mm: float | None = None,
) -> dict:
    """``medseg evaluate`` for a 3D model: a run's split, or every case of a labelled folder.

    Args:
        model: a 3D run folder, or (with ``data`` and ``out``) a 3D CV or export folder.
        split: the run's split to score (without ``data``).
        data: a dataset folder with a ``dataset.json`` and labels, scored instead of a split
            (recorded as ``folder:<name>``).
        out: where the rows and ``metrics.json`` go (default: the run folder).
        checkpoint: ``best`` or ``last`` (run and CV folders).
        n_boot: bootstrap resamples of the intervals.
        tolerance_mm: NSD tolerance; None: the run's ``evaluation.nsd_tolerance_mm`` (1 mm for
            CV and export folders).

    Returns:
        ``{split: summary, split + "_largest": summary with the largest component per structure}``.

    Raises:
        ConfigError: an export or CV folder without ``data`` and ``out``.
        DataError: the split is empty, or the folder is not a labelled dataset.
    """
    kind = folder_kind(model)
    if kind != "run" and (data is None or out is None):
        raise ConfigError(f"{model}: a 3D {kind} folder is scored on --data FOLDER --out DIR")
    if data is not None:
        cases = [c for c in describe(data).cases if c.label is not None]
        if not cases:
            raise DataError(f"{data}: no labelled case (dataset.json lists no label files)")
        split = f"folder:{Path(data).name}"
    else:
        run = open_run(model)
        ids = read_json(run.splits_path)["splits"].get(split, [])
        if not ids:
            raise DataError(f"{run.splits_path}: split '{split}' is empty")
        by_id = {c.case_id: c for c in describe(run.config().data.root).cases}
        cases = [by_id[i] for i in ids]
    if tolerance_mm is None and kind == "run":
        tolerance_mm = open_run(model).config().evaluation.nsd_tolerance_mm
    target = Path(out) if out is not None else Path(model)
    return score_volumes(
        model, cases, target, checkpoint=checkpoint, split=split, n_boot=n_boot,
        tolerance_mm=1.0 if tolerance_mm is None else tolerance_mm,
    )  # fmt: skip
