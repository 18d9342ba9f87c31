"""Surface metrics of binary masks and label maps in millimetres: HD95, ASSD, NSD, Dice, volumes.

Conventions (those of MONAI's ``compute_hausdorff_distance`` / ``compute_average_surface_distance``
/ ``compute_surface_dice`` with their defaults, i.e. boundaries counted in voxels, not DeepMind's
surfel areas):

* **Boundary** of a mask: its voxels with at least one background neighbour in the full
  (26-voxel in 3D, 8-pixel in 2D) neighbourhood, ``mask & ~binary_erosion(mask, full
  connectivity)``; space outside the array counts as background. (MONAI erodes with SciPy's
  default face-connected structure, which gives a slightly thinner boundary.)
* **Distances** from each boundary voxel of one mask to the nearest boundary voxel of the other,
  in mm from voxel centres (``distance_transform_edt(~boundary, sampling=spacing)``), computed
  on the joint bounding box of the two masks plus one voxel, which changes no distance.
* **HD95**: the larger of the two directed 95th percentiles (``numpy.percentile``, linear
  interpolation), as MONAI's ``percentile=95`` and DeepMind's ``compute_robust_hausdorff`` (which
  weights by surfel area instead of counting voxels). Not the percentile of both directions
  pooled.
* **ASSD**: the mean of all distances of both directions pooled (MONAI ``symmetric=True``), so
  a direction with more boundary voxels weighs more. DeepMind returns the two directed means.
* **NSD** at tolerance ``t`` mm (normalised surface Dice): boundary voxels of both masks within
  ``t`` of the other boundary (``d <= t``, up to float rounding), over all boundary voxels of
  both (MONAI ``use_subvoxels=False``; DeepMind's ``compute_surface_dice_at_tolerance`` weights
  by surfel area).
* **Dice**: ``2 |P & T| / (|P| + |T|)`` over voxels.
* **Spacing** ``None``: unit pixels/voxels; distances, tolerances and volumes are then in voxels
  and the unit is reported as ``"px"``.

Empty masks (the same rules everywhere; each case is reported in ``empty``):

====================  ======  =====  ============  ======================
case                  Dice    NSD    HD95, ASSD    ``empty``
====================  ======  =====  ============  ======================
both empty            1       1      0             ``"both"``
only prediction empty 0       0      NaN (missing) ``"pred"``
only truth empty      0       0      NaN (missing) ``"truth"``
====================  ======  =====  ============  ======================

MONAI would give NaN Dice/NSD for "both empty" and inf/NaN distances for one empty mask; here a
missing distance is NaN and summaries leave it out of the means and count it (never 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from medseg.errors import ConfigError, DataError

#: Slack (mm) of the NSD tolerance test, so that a distance equal to the tolerance counts as within
#: it whichever way the distance transform rounded it (e.g. 1.5 mm = hypot(0.9, 1.2)).
TOLERANCE_SLACK = 1e-9

#: Values of ``empty``: which of the two masks is empty ("" when neither is).
EMPTY_CASES = ("both", "pred", "truth")


def unit_of(spacing: Sequence[float] | None) -> str:
    """``"mm"`` when the voxel spacing is known, else ``"px"``."""
    return "px" if spacing is None else "mm"


def empty_case(pred: np.ndarray, truth: np.ndarray) -> str:
    """Which mask is empty: ``"both"``, ``"pred"`` (only the prediction), ``"truth"`` (only the
    truth) or ``""`` (neither)."""
    p, t = bool(np.any(pred)), bool(np.any(truth))
    if p and t:
        return ""
    if not p and not t:
        return "both"
    return "pred" if not p else "truth"


def _check(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]:
    """Both masks as bool arrays of one shape, and the spacing as floats (checked)."""
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    if pred.shape != truth.shape:
        raise DataError(f"prediction shape {pred.shape} differs from the truth's {truth.shape}")
    if spacing is None:
        return pred, truth, None
    sp = tuple(float(s) for s in spacing)
    if len(sp) != pred.ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise DataError(
            f"spacing {sp} does not fit masks of shape {pred.shape} (one mm > 0 per axis)"
        )
    return pred, truth, sp


def _crop(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to their joint bounding box plus one voxel (clipped to the array)."""
    box = ndimage.find_objects((pred | truth).astype(np.uint8))[0]
    box = tuple(
        slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, pred.shape, strict=True)
    )
    return pred[box], truth[box]


def boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a background neighbour in the full neighbourhood (outside the
    array is background)."""
    mask = np.asarray(mask, dtype=bool)
    full = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    return mask & ~ndimage.binary_erosion(mask, structure=full)


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed boundary distances ``(pred_to_truth, truth_to_pred)`` in mm (voxels without a
    spacing).

    ``pred_to_truth[i]`` is the distance from the i-th boundary voxel of ``pred`` (C order) to the
    nearest boundary voxel of ``truth``. Where the other mask is empty its distances are ``inf``;
    two empty masks give two empty arrays.

    Args:
        pred: Predicted binary mask (any nonzero is foreground), 2D or 3D.
        truth: Reference binary mask of the same shape.
        spacing: Voxel size in mm per array axis, or ``None`` for unit voxels.

    Raises:
        DataError: The shapes differ, or the spacing does not fit them.
    """
    pred, truth, sp = _check(pred, truth, spacing)
    if not pred.any() and not truth.any():
        return np.zeros(0), np.zeros(0)
    pred, truth = _crop(pred, truth)
    edge_p, edge_t = boundary(pred), boundary(truth)
    return _directed(edge_p, edge_t, sp), _directed(edge_t, edge_p, sp)


def _directed(src: np.ndarray, dst: np.ndarray, spacing: tuple[float, ...] | None) -> np.ndarray:
    """Distances from the ``src`` boundary voxels to the nearest ``dst`` boundary voxel."""
    if not dst.any():
        return np.full(int(src.sum()), np.inf)
    return ndimage.distance_transform_edt(~dst, sampling=spacing)[src]


def _check_tolerance(tolerance_mm: float) -> float:
    tol = float(tolerance_mm)
    if not math.isfinite(tol) or tol < 0:
        raise ConfigError(f"NSD tolerance_mm={tolerance_mm!r} must be a finite number >= 0")
    return tol


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Volume Dice of two binary masks; 1 when both are empty."""
    pred, truth, _ = _check(pred, truth, None)
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & truth)) / total


def _scores(
    empty: str, to_truth: np.ndarray, to_pred: np.ndarray, tolerance: float
) -> dict[str, float]:
    """HD95, ASSD and NSD from the directed distances, with the empty-mask rules."""
    if empty == "both":
        return {"hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    if empty:
        return {"hd95": math.nan, "assd": math.nan, "nsd": 0.0}
    both = np.concatenate([to_truth, to_pred])
    return {
        "hd95": float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95))),
        "assd": float(both.mean()),
        "nsd": float(np.count_nonzero(both <= tolerance + TOLERANCE_SLACK) / both.size),
    }


def mask_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    tolerance_mm: float = 1.0,
) -> dict[str, float | str]:
    """Dice, HD95, ASSD and NSD of two binary masks, computing the distances once.

    Args:
        pred: Predicted binary mask, 2D or 3D.
        truth: Reference binary mask of the same shape.
        spacing: Voxel size in mm per axis; ``None``: distances in voxels.
        tolerance_mm: NSD tolerance (in voxels when ``spacing`` is ``None``).

    Returns:
        ``dice``, ``hd95``, ``assd``, ``nsd`` (floats, NaN where missing by the empty-mask rules)
        and ``empty`` (``"both"``, ``"pred"``, ``"truth"`` or ``""``).
    """
    tol = _check_tolerance(tolerance_mm)
    pred, truth, sp = _check(pred, truth, spacing)
    empty = empty_case(pred, truth)
    to_truth, to_pred = surface_distances(pred, truth, sp) if not empty else ((), ())
    return {"dice": dice(pred, truth), **_scores(empty, to_truth, to_pred, tol), "empty": empty}


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Larger of the two directed 95th-percentile boundary distances (mm, or voxels without a
    spacing): 0 when both masks are empty, NaN when only one is."""
    return float(mask_metrics(pred, truth, spacing)["hd95"])


def assd(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Mean of the boundary distances of both directions pooled (mm, or voxels): 0 when both
    masks are empty, NaN when only one is."""
    return float(mask_metrics(pred, truth, spacing)["assd"])


def nsd(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    tolerance_mm: float = 1.0,
) -> float:
    """Normalised surface Dice at ``tolerance_mm``: the share of both boundaries' voxels within
    the tolerance of the other boundary; 1 when both masks are empty, 0 when only one is."""
    return float(mask_metrics(pred, truth, spacing, tolerance_mm)["nsd"])


def structure_metrics(
    pred_labels: np.ndarray,
    truth_labels: np.ndarray,
    spacing: Sequence[float] | None,
    labels: Mapping[int, str],
    tolerance_mm: float = 1.0,
) -> dict[str, dict]:
    """Metrics of each foreground structure of two label maps.

    Args:
        pred_labels: Predicted integer label map (D x H x W, or H x W), 0 background.
        truth_labels: Reference label map of the same shape.
        spacing: Voxel size in mm per axis (slice, row, col); ``None``: unit voxels, unit "px".
        labels: Label value -> structure name; value 0 (background) is skipped.
        tolerance_mm: NSD tolerance.

    Returns:
        Structure name -> ``dice``, ``hd95``, ``assd``, ``nsd``, ``empty``, ``unit`` ("mm" or
        "px"), ``voxels_pred``, ``voxels_truth`` and ``volume_pred_ml``, ``volume_truth_ml``,
        ``volume_diff_ml`` (prediction - truth; ``None`` when the spacing is unknown).

    Raises:
        DataError: The label maps' shapes differ, or the spacing does not fit them.
    """
    pred_labels, truth_labels = np.asarray(pred_labels), np.asarray(truth_labels)
    _check(pred_labels, truth_labels, spacing)
    voxel_ml = None if spacing is None else float(np.prod(spacing)) / 1000.0
    out: dict[str, dict] = {}
    for value, name in sorted(labels.items(), key=lambda item: int(item[0])):
        if int(value) == 0:
            continue
        pred, truth = pred_labels == int(value), truth_labels == int(value)
        n_pred, n_truth = int(pred.sum()), int(truth.sum())
        row = {**mask_metrics(pred, truth, spacing, tolerance_mm), "unit": unit_of(spacing)}
        row.update(voxels_pred=n_pred, voxels_truth=n_truth)
        row.update(
            volume_pred_ml=None if voxel_ml is None else n_pred * voxel_ml,
            volume_truth_ml=None if voxel_ml is None else n_truth * voxel_ml,
            volume_diff_ml=None if voxel_ml is None else (n_pred - n_truth) * voxel_ml,
        )
        out[str(name)] = row
    return out
