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
from pathlib import Path

from medseg.evaluation.evaluate import write_cases
from medseg.evaluation.volumetric import case_rows, format_volumetric, summarize_volumetric
from medseg.inference.postprocess import largest_component_per_label
from medseg.inference.volumetric import VolumePredictor
from medseg.io.msd import MsdCase, read_case_image, read_case_labels
from medseg.utils import atomic_write_json

logger = logging.getLogger(__name__)


def score_volumes(
    model: str | Path,
    cases: list[MsdCase],
    out: str | Path,
    *,
    checkpoint: str = "best",
    split: str = "val",
    n_boot: int = 1000,
) -> dict:
    """Predict ``cases`` whole with ``model`` (a 3D run or export folder) and score them.

    Writes ``<out>/cases_<split>.csv`` (one row per case, structure and post-processing:
    ``none`` or ``largest``) and ``<out>/metrics.json`` (``{split: summary without
    post-processing, split + "_largest": with it}``); returns that dict.
    """
    out = Path(out)
    predictor = VolumePredictor(model, checkpoint=checkpoint)
    labels = predictor.labels
    rows: list[dict] = []
    for case in cases:
        image = read_case_image(case, predictor.channels)
        truth = read_case_labels(case, labels)
        spacing = image.meta.spacing
        pred = predictor.predict(image.array, spacing)["labels"]
        for name, mask in (("none", pred), ("largest", largest_component_per_label(pred))):
            for row in case_rows(case.case_id, case.case_id, mask, truth, spacing, labels):
                rows.append({**row, "postprocess": name})
    write_cases(out / f"cases_{split}.csv", rows)
    plain = summarize_volumetric([r for r in rows if r["postprocess"] == "none"], n_boot=n_boot)
    largest = summarize_volumetric(
        [r for r in rows if r["postprocess"] == "largest"], n_boot=n_boot
    )
    result = {split: {**plain, "checkpoint": checkpoint}, f"{split}_largest": largest}
    atomic_write_json(out / "metrics.json", result)
    logger.info("%s (%s, %d cases):\n%s", split, checkpoint, len(cases), format_volumetric(plain))
    return result
