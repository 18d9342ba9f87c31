"""Statistics of out-of-fold predictions: weighted metrics, calibration and the group bootstrap.

The metrics take row weights ``w`` (0 = row left out, m = row counted m times), so that the same
code gives per-fold values (0/1 weights), pooled values (all 1) and bootstrap replicates (each row
weighted by how often its group was drawn).

The bootstrap resamples whole GROUPS (patients or near-duplicate groups) with replacement, so that
slices of one patient are never treated as independent evidence; it is seeded
(:func:`numpy.random.default_rng`), hence reproducible. :func:`group_resamples` is the one source
of resamples for cross-validation summaries and for scoring a model on a folder.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np

from medseg.evaluation.oof import CVData
from medseg.models.metrics import dice_from_counts, iou_from_counts

ECE_BINS = 10
CI_LEVEL = 0.95
#: Per-patient surface metrics of 2D segmentation (:mod:`medseg.evaluation.patients`).
SURFACE_METRICS = ("hd95", "assd", "nsd")


# --------------------------------------------------------------------------------------------
# Group bootstrap


def group_resamples(n_groups: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """``n_boot`` resamples of ``n_groups`` groups drawn with replacement, as the number of times
    each group was drawn (``[n_groups]`` ints), from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.bincount(rng.integers(0, n_groups, size=n_groups), minlength=n_groups)


def percentile_interval(values: Iterable[float | None]) -> list[float] | None:
    """The :data:`CI_LEVEL` percentile interval of bootstrap replicates (``None`` values left out;
    ``None`` when none is left)."""
    finite = np.array([v for v in values if v is not None], dtype=float)
    if not len(finite):
        return None
    tail = 100 * (1 - CI_LEVEL) / 2
    return [float(v) for v in np.percentile(finite, [tail, 100 - tail])]


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float], n_groups: int, n_boot: int, seed: int
) -> list[float] | None:
    """Percentile interval of ``statistic(multiplicity per group)`` over group resamples.

    ``None`` without replicates (``n_boot`` 0) or with fewer than two groups.
    """
    if n_boot <= 0 or n_groups < 2:
        return None
    return percentile_interval(statistic(m) for m in group_resamples(n_groups, n_boot, seed))


# --------------------------------------------------------------------------------------------
# Segmentation


def group_dice(d: CVData, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the groups with rows in ``sel``, their Dice with their rows' counts pooled)."""
    g = d.gidx[sel]
    sums = np.stack(
        [np.bincount(g, weights=d.counts[sel, i], minlength=len(d.groups)) for i in range(3)], 1
    )
    present = np.unique(g)
    return present, np.array([dice_from_counts(*sums[i]) for i in present])


def seg_metrics(d: CVData, w: np.ndarray, group_mult: np.ndarray) -> dict:
    """Segmentation metrics of the rows weighted ``w``; ``group_mult[g]`` counts group ``g``.

    Pixel Dice/IoU pool the rows' counts; per-group Dice pools each group's rows first. Where
    the folds recorded per-patient surface metrics (``oof_groups.csv``), also their means over
    groups (:func:`group_surface_means`), ``surface_unit`` and ``nsd_tolerance``.
    """
    tp, fp, fn = (float(v) for v in w @ d.counts)
    out = {"dice": dice_from_counts(tp, fp, fn), "iou": iou_from_counts(tp, fp, fn)}
    sel = w > 0
    present, per_group = group_dice(d, sel)
    mult = np.asarray(group_mult)[present].astype(np.int64)
    out["dice_per_group_mean"] = float(np.average(per_group, weights=mult))
    out["dice_per_group_median"] = float(np.median(np.repeat(per_group, mult)))
    nonempty = sel & (d.true_pixels > 0)
    if nonempty.any():
        per_image = np.array([dice_from_counts(*c) for c in d.counts[nonempty]])
        out["dice_per_image_mean_nonempty"] = float(np.average(per_image, weights=w[nonempty]))
    else:
        out["dice_per_image_mean_nonempty"] = None
    if d.group_surface is not None:
        out.update(group_surface_means(d.group_surface, group_mult))
        out.update(surface_unit=d.surface_unit, nsd_tolerance=d.nsd_tolerance)
    return out


def group_surface_means(
    values: Mapping[str, np.ndarray], group_mult: np.ndarray
) -> dict[str, float | int | None]:
    """Means over patients (groups) of per-patient surface metrics under bootstrap
    multiplicities.

    Args:
        values: ``hd95``, ``assd``, ``nsd`` -> one value per group (NaN where missing).
        group_mult: how many times each group counts (0: left out).

    Returns:
        ``<m>_per_group_mean`` (``None`` when no counted group has a value) and ``<m>_missing``
        (counted groups without a value, each counted ``group_mult[g]`` times) for ``m`` in
        ``hd95``, ``assd``, ``nsd``.
    """
    mult = np.asarray(group_mult, dtype=float)
    counted = mult > 0
    out: dict[str, float | int | None] = {}
    for m in SURFACE_METRICS:
        v = np.asarray(values[m], dtype=float)
        ok = counted & np.isfinite(v)
        out[f"{m}_per_group_mean"] = (
            float(np.average(v[ok], weights=mult[ok])) if ok.any() else None
        )
        out[f"{m}_missing"] = int(round(float(mult[counted & ~np.isfinite(v)].sum())))
    return out


# --------------------------------------------------------------------------------------------
# Calibration and classification


def _bin_index(confidence: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Bin ``b`` holds confidences in ``(b/n, (b+1)/n]``; 0 goes to the first bin."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.digitize(confidence, edges[1:-1], right=True)


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, w: np.ndarray | None = None, n_bins: int = ECE_BINS
) -> tuple[float | None, list[dict]]:
    """Expected calibration error and the reliability table of equal-width confidence bins.

    ECE = sum over bins of (weight of bin / total weight) * |accuracy of bin - mean confidence of
    bin|. Returns ``(ece, bins)``, each bin with ``lower``, ``upper``, ``count`` (weighted),
    ``confidence`` and ``accuracy`` (``None`` for an empty bin).
    """
    w = np.ones(len(confidence)) if w is None else np.asarray(w, dtype=float)
    b = _bin_index(confidence, n_bins)
    count = np.bincount(b, weights=w, minlength=n_bins)
    conf = np.bincount(b, weights=w * confidence, minlength=n_bins)
    acc = np.bincount(b, weights=w * correct, minlength=n_bins)
    total = count.sum()
    ece = float(np.abs(acc - conf).sum() / total) if total > 0 else None
    bins = [
        {
            "lower": round(i / n_bins, 6),
            "upper": round((i + 1) / n_bins, 6),
            "count": float(count[i]),
            "confidence": float(conf[i] / count[i]) if count[i] > 0 else None,
            "accuracy": float(acc[i] / count[i]) if count[i] > 0 else None,
        }
        for i in range(n_bins)
    ]
    return ece, bins


def _ece(d: CVData, w: np.ndarray) -> float | None:
    return calibration_bins(d.probs.max(axis=1), (d.pred == d.target).astype(float), w)[0]


def cls_metrics(d: CVData, sel: np.ndarray) -> dict:
    """Classification metrics of the rows ``sel`` with scikit-learn (point estimates)."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y, p, probs = d.target[sel], d.pred[sel], d.probs[sel]
    labels = list(range(len(d.class_names)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from a fold: handled below
        prec, rec, f1, support = precision_recall_fscore_support(
            y, p, labels=labels, zero_division=0
        )
        balanced = float(balanced_accuracy_score(y, p))
    auc: list[float | None] = []
    for c in labels:
        truth = y == c
        auc.append(float(roc_auc_score(truth, probs[:, c])) if 0 < truth.sum() < len(y) else None)
    present = [a for a in auc if a is not None]
    out = {
        "accuracy": float(accuracy_score(y, p)),
        "balanced_accuracy": balanced,
        "macro_f1": float(np.mean(f1)),
        "roc_auc_macro": float(np.mean(present)) if present else None,
        "ece": _ece(d, sel.astype(float)),
    }
    for c, name in enumerate(d.class_names):
        out[f"precision/{name}"] = float(prec[c])
        out[f"recall/{name}"] = float(rec[c])
        out[f"f1/{name}"] = float(f1[c])
        out[f"roc_auc/{name}"] = auc[c]
        out[f"support/{name}"] = int(support[c])
    return out


class WeightedAUC:
    """Weighted one-vs-rest ROC AUC with ties counted half (what roc_auc_score computes), with
    the sorting done once so that bootstrap replicates only re-weight."""

    def __init__(self, scores: np.ndarray, truth: np.ndarray):
        self.order = np.argsort(scores, kind="stable")
        _, self.tie = np.unique(scores[self.order], return_inverse=True)
        self.truth = truth[self.order].astype(float)

    def __call__(self, w: np.ndarray) -> float | None:
        w = w[self.order]
        pos = np.bincount(self.tie, weights=w * self.truth)
        neg = np.bincount(self.tie, weights=w * (1.0 - self.truth))
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos <= 0 or n_neg <= 0:
            return None
        below = np.cumsum(neg) - neg
        return float(np.sum(pos * (below + 0.5 * neg)) / (n_pos * n_neg))


def cls_weighted(d: CVData, w: np.ndarray, aucs: list[WeightedAUC] | None = None) -> dict:
    """The metrics of :func:`cls_metrics` with row weights, in NumPy (for the bootstrap).

    Same conventions as scikit-learn: precision/recall/F1 are 0 where undefined
    (``zero_division=0``), balanced accuracy averages the recall of classes present in the truth,
    macro F1 averages all classes, AUC is ``None`` for a class without positives or negatives.
    """
    n = len(d.class_names)
    aucs = aucs or [WeightedAUC(d.probs[:, c], d.target == c) for c in range(n)]
    cm = np.bincount(d.target * n + d.pred, weights=w, minlength=n * n).reshape(n, n)
    tp = np.diag(cm)
    true_sum, pred_sum = cm.sum(axis=1), cm.sum(axis=0)
    total = cm.sum()

    def div(a, b):
        return np.divide(a, b, out=np.zeros_like(a, dtype=float), where=b > 0)

    prec, rec, f1 = div(tp, pred_sum), div(tp, true_sum), div(2 * tp, true_sum + pred_sum)
    auc = [a(w) for a in aucs]
    present = [a for a in auc if a is not None]
    out = {
        "accuracy": float(tp.sum() / total),
        "balanced_accuracy": float(np.mean(rec[true_sum > 0])),
        "macro_f1": float(np.mean(f1)),
        "roc_auc_macro": float(np.mean(present)) if present else None,
        "ece": _ece(d, w),
    }
    for c, name in enumerate(d.class_names):
        out[f"precision/{name}"] = float(prec[c])
        out[f"recall/{name}"] = float(rec[c])
        out[f"f1/{name}"] = float(f1[c])
        out[f"roc_auc/{name}"] = auc[c]
    return out
