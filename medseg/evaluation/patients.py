"""2D segmentation scored per patient volume: each patient's slices stacked in natural order.

Patient-level 2D datasets (LGG: each patient is a stack of slices) are scored as one volume per
patient with :mod:`medseg.evaluation.surface`, in the published convention: HD95 is the larger of
the two directed 95th percentiles of the boundary distances, ASSD the mean of both directions'
distances pooled, NSD the share of both boundaries within the tolerance; the empty-mask rules are
those of :mod:`medseg.evaluation.surface`. The files carry no spacing (PNG/TIFF), and the masks
are scored at the model's input size (training, CV, ``medseg tune``) or at the images' native
resolution (``medseg evaluate --data``), so the unit is pixels (``"px"``): the columns are
``hd95_px``, ``assd_px`` and ``nsd_<t>px``.

One row per patient (:func:`group_surface_rows`), written as ``groups_<split>.csv`` by
``medseg evaluate``/training, ``fold_<k>/oof_groups.csv`` by ``medseg cv`` and ``medseg tune``,
and ``groups.csv`` by ``medseg evaluate --data``::

    group,slices,tp,fp,fn,dice,empty,unit,hd95_px,assd_px,nsd_1px

``dice`` pools the patient's pixel counts; ``empty`` is ``both``, ``pred``, ``truth`` or ``""``
(:func:`medseg.evaluation.surface.empty_case`); a missing distance is NaN (``nan`` in the CSV).
A patient whose slices differ in shape cannot be stacked: its HD95, ASSD and NSD are missing
(NaN, unless a mask is empty, where the empty-mask rules decide), and a warning gives their number.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from medseg.data.scan import natural_key
from medseg.errors import DataError
from medseg.evaluation.surface import mask_metrics
from medseg.evaluation.volumetric import metric_columns
from medseg.models.metrics import confusion_counts, dice_from_counts

logger = logging.getLogger(__name__)

#: Unit of the 2D surface metrics: the files carry no spacing.
UNIT = "px"
#: Where the masks are scored, as the report labels say it.
MODEL_RESOLUTION = "the model's input size"
NATIVE_RESOLUTION = "the images' native resolution"
#: Per-patient summary metrics (:func:`medseg.evaluation.stats.group_surface_means`).
SURFACE_KEYS = ("hd95_per_group_mean", "assd_per_group_mean", "nsd_per_group_mean")
#: The convention, in one sentence for reports and ``metrics.json``.
CONVENTION = (
    "per patient volume (its slices stacked in natural order), HD95 the larger of the two "
    "directed 95th percentiles of the boundary distances, ASSD the mean of both directions' "
    "distances pooled, NSD the share of both boundaries within the tolerance; both masks empty: "
    "HD95 = ASSD = 0, NSD = 1; one empty: HD95 and ASSD missing (left out of the means and "
    "counted), NSD = 0"
)


def patient_volumes(groups: list[str], ids: list[str]) -> dict[str, list[int]]:
    """Indices of each group's samples, ordered as slices of a volume (natural id order)."""
    out: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        out.setdefault(g, []).append(i)
    return {g: sorted(idx, key=lambda i: natural_key(ids[i])) for g, idx in out.items()}


def surface_columns(tolerance: float) -> dict[str, str]:
    """Row column of each surface metric, e.g. ``{"hd95": "hd95_px", "assd": "assd_px",
    "nsd": "nsd_1px"}``."""
    cols = metric_columns(UNIT, tolerance)
    return {k: cols[k] for k in ("hd95", "assd", "nsd")}


def _patient_row(
    group: str, pred: list[np.ndarray], truth: list[np.ndarray], tolerance: float
) -> tuple[dict, bool]:
    """``(row, stacked)`` of one patient's slices (binary masks)."""
    counts = np.zeros(3, np.int64)
    for i, (p, t) in enumerate(zip(pred, truth, strict=True)):
        if p.shape != t.shape:
            raise DataError(
                f"patient slice {i + 1}: prediction shape {p.shape} differs from the truth's "
                f"{t.shape}"
            )
        counts += confusion_counts(p, t)
    tp, fp, fn = (int(c) for c in counts)
    stacked = len({p.shape for p in pred}) == 1
    if stacked:
        m = mask_metrics(np.stack(pred), np.stack(truth), None, tolerance)
    else:
        # The empty-mask rules depend on emptiness alone: apply them through one-pixel masks
        # of the same emptiness; a patient with both masks non-empty keeps its distances missing.
        m = mask_metrics(np.array([tp + fp > 0]), np.array([tp + fn > 0]), None, tolerance)
        if not m["empty"]:
            m.update(hd95=math.nan, assd=math.nan, nsd=math.nan)
    cols = surface_columns(tolerance)
    row = {
        "group": group,
        "slices": len(pred),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "dice": dice_from_counts(tp, fp, fn),
        "empty": m["empty"],
        "unit": UNIT,
        **{cols[k]: float(m[k]) for k in ("hd95", "assd", "nsd")},
    }
    return row, stacked or bool(m["empty"])


def group_surface_rows(
    ids: Sequence[str],
    groups: Sequence[str],
    pred: Sequence[np.ndarray],
    truth: Sequence[np.ndarray],
    tolerance: float = 1.0,
) -> list[dict]:
    """One row per patient (group): its slices stacked into a (slices, H, W) volume and scored
    with :func:`medseg.evaluation.surface.mask_metrics` (unit pixels).

    Args:
        ids: Sample id of each slice (their natural order is the slice order).
        groups: Patient (group) of each slice.
        pred: Predicted mask of each slice (any nonzero is foreground), H x W.
        truth: Reference mask of each slice, of the slice's prediction shape.
        tolerance: NSD tolerance in pixels (``evaluation.nsd_tolerance_mm`` of the config).

    Returns:
        Rows sorted by group: ``group``, ``slices``, ``tp``, ``fp``, ``fn``, ``dice`` (pooled
        counts), ``empty``, ``unit`` (``"px"``) and the columns of :func:`surface_columns`
        (NaN where missing). A patient whose slices differ in shape keeps its distances missing
        (counted in a logged warning).

    Raises:
        DataError: the lengths differ, or a slice's prediction and truth differ in shape.
    """
    if not len(ids) == len(groups) == len(pred) == len(truth):
        raise DataError(
            f"{len(ids)} ids, {len(groups)} groups, {len(pred)} predictions and {len(truth)} "
            "truth masks: one of each per slice expected"
        )
    volumes = patient_volumes(list(groups), list(ids))
    rows, unstacked = [], 0
    for g in sorted(volumes):
        idx = volumes[g]
        row, stacked = _patient_row(
            g,
            [np.asarray(pred[i]) > 0 for i in idx],
            [np.asarray(truth[i]) > 0 for i in idx],
            tolerance,
        )
        rows.append(row)
        unstacked += not stacked
    if unstacked:
        logger.warning(
            "%d patient(s) have slices of different shapes: not stacked into a volume, their "
            "HD95, ASSD and NSD are left missing",
            unstacked,
        )
    return rows


def surface_values(rows: Sequence[dict], tolerance: float) -> dict[str, np.ndarray]:
    """``{"hd95": ..., "assd": ..., "nsd": ...}``: the rows' values as float arrays (NaN where
    missing), in row order."""
    cols = surface_columns(tolerance)
    return {k: np.array([float(r[c]) for r in rows], dtype=float) for k, c in cols.items()}


def surface_labels(tolerance: float, resolution: str = MODEL_RESOLUTION) -> dict[str, str]:
    """Report label of each per-patient surface metric, naming its unit and convention."""
    t = f"{float(tolerance):g}"
    return {
        "hd95_per_group_mean": f"HD95 per patient volume, mean ({UNIT} at {resolution}; larger "
        "of the two directed 95th percentiles)",
        "assd_per_group_mean": f"ASSD per patient volume, mean ({UNIT} at {resolution}; both "
        "directions' boundary distances pooled)",
        "nsd_per_group_mean": f"NSD@{t}{UNIT} per patient volume, mean (share of both boundaries "
        f"within {t} {UNIT} at {resolution})",
    }


def surface_description(tolerance: float, resolution: str) -> dict:
    """What ``metrics.json`` says of its per-patient surface metrics: unit, tolerance, where the
    masks were scored, the convention and the label of each metric."""
    return {
        "unit": UNIT,
        "nsd_tolerance": float(tolerance),
        "resolution": resolution,
        "convention": CONVENTION,
        "labels": surface_labels(tolerance, resolution),
    }
