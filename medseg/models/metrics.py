"""Metrics: Keras metrics for training, NumPy functions for evaluation reports.

Dice and IoU for binary masks follow the usual conventions: both are computed from true positives,
false positives and false negatives; when prediction and truth are both empty the score is 1.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="medseg")
class DiceScore(keras.metrics.Metric):
    """Dice coefficient of thresholded binary predictions, accumulated over all pixels seen.

    Args:
        threshold: probability above which a pixel counts as foreground.
    """

    def __init__(self, threshold: float = 0.5, name: str = "dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold
        self.tp = self.add_variable(shape=(), initializer="zeros", name="tp")
        self.fp = self.add_variable(shape=(), initializer="zeros", name="fp")
        self.fn = self.add_variable(shape=(), initializer="zeros", name="fn")

    def update_state(self, y_true, y_pred, sample_weight=None):
        t = ops.cast(y_true > 0.5, "float32")
        p = ops.cast(y_pred > self.threshold, "float32")
        self.tp.assign_add(ops.sum(t * p))
        self.fp.assign_add(ops.sum((1 - t) * p))
        self.fn.assign_add(ops.sum(t * (1 - p)))

    def result(self):
        denom = 2 * self.tp + self.fp + self.fn
        return ops.where(denom > 0, 2 * self.tp / ops.maximum(denom, 1.0), 1.0)

    def reset_state(self):
        for v in (self.tp, self.fp, self.fn):
            v.assign(0.0)

    def get_config(self) -> dict:
        return {**super().get_config(), "threshold": self.threshold}


def training_metrics(task: str, num_classes: int) -> list:
    """Metrics reported every epoch.

    Classification: accuracy, AUC, precision and recall. Binary segmentation: Dice and IoU of
    the foreground. Label maps: mean IoU and the IoU of each foreground class (``iou_<k>``).
    """
    if task == "classification":
        return [
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ]
    if num_classes == 1:
        return [
            DiceScore(name="dice"),
            keras.metrics.BinaryIoU(target_class_ids=[1], threshold=0.5, name="iou"),
        ]
    return [keras.metrics.OneHotMeanIoU(num_classes=num_classes, name="iou")] + [
        keras.metrics.OneHotIoU(num_classes=num_classes, target_class_ids=[k], name=f"iou_{k}")
        for k in range(1, num_classes)
    ]


def confusion_counts(pred: np.ndarray, true: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) of two boolean arrays."""
    pred, true = pred.astype(bool), true.astype(bool)
    return (int(np.sum(pred & true)), int(np.sum(pred & ~true)), int(np.sum(~pred & true)))


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice = 2TP / (2TP + FP + FN); 1.0 when both masks are empty."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    """IoU = TP / (TP + FP + FN); 1.0 when both masks are empty."""
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


def segmentation_report(
    pred: np.ndarray, true: np.ndarray, groups: list[str] | None = None
) -> dict:
    """Dice and IoU of binary masks ``[N, H, W]``, per image, over everything, and per group.

    Returns:
        ``dice``/``iou`` over all pixels; ``dice_per_image_mean`` and
        ``dice_per_image_mean_nonempty`` (images whose truth has foreground); and, when ``groups``
        are given, ``dice_per_group_mean``/``_median`` with each group's slices pooled (per-patient
        Dice, as the LGG literature reports it) and ``per_group`` with each group's score.
    """
    counts = [confusion_counts(p, t) for p, t in zip(pred, true, strict=True)]
    tp, fp, fn = (int(sum(c[i] for c in counts)) for i in range(3))
    per_image = np.array([dice_from_counts(*c) for c in counts])
    nonempty = np.array([t.any() for t in true])
    report = {
        "n_images": len(counts),
        "dice": dice_from_counts(tp, fp, fn),
        "iou": iou_from_counts(tp, fp, fn),
        "dice_per_image_mean": float(per_image.mean()),
        "dice_per_image_mean_nonempty": float(per_image[nonempty].mean())
        if nonempty.any()
        else None,
    }
    if groups is not None:
        pooled: dict[str, list[int]] = {}
        for g, c in zip(groups, counts, strict=True):
            acc = pooled.setdefault(g, [0, 0, 0])
            for i in range(3):
                acc[i] += c[i]
        per_group = {g: dice_from_counts(*c) for g, c in sorted(pooled.items())}
        values = np.array(list(per_group.values()))
        report.update(
            n_groups=len(per_group),
            dice_per_group_mean=float(values.mean()),
            dice_per_group_median=float(np.median(values)),
            per_group=per_group,
        )
    return report


def hausdorff95(pred: np.ndarray, true: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance between two 2D (or 3D) binary masks, in
    pixels (voxels); NaN when either mask is empty.

    Distances are measured between the masks' boundaries (foreground pixels with a background
    neighbour), from each boundary to the other, both directions pooled.
    """
    from scipy import ndimage

    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    if not pred.any() or not true.any():
        return float("nan")
    edge_p = pred & ~ndimage.binary_erosion(pred)
    edge_t = true & ~ndimage.binary_erosion(true)
    to_t = ndimage.distance_transform_edt(~edge_t)[edge_p]
    to_p = ndimage.distance_transform_edt(~edge_p)[edge_t]
    return float(np.percentile(np.concatenate([to_t, to_p]), 95))
