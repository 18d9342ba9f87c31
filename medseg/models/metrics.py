"""Metrics: Keras metrics for training, NumPy functions for evaluation reports.

Dice and IoU for binary masks follow the usual conventions: both are computed from true positives,
false positives and false negatives; when prediction and truth are both empty the score is 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

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


@keras.saving.register_keras_serializable(package="medseg")
class MeanClassDice(keras.metrics.Metric):
    """Mean over ``class_ids`` of each class's Dice, from hard (argmax) label maps.

    True/false positives and false negatives of ``argmax(y_pred) == k`` against
    ``argmax(y_true) == k`` are accumulated per class over every voxel seen (an epoch); each
    class's Dice is ``2TP / (2TP + FP + FN)``, 1.0 when the class is absent from both. ``y_true``
    is one-hot (or soft) ``[..., K]``, ``y_pred`` probabilities ``[..., K]``.

    Args:
        class_ids: the classes averaged (e.g. ``[1, 2]``: the foreground of a 3-label map).
    """

    def __init__(self, class_ids: list[int], name: str = "dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_ids = [int(k) for k in class_ids]
        n = len(self.class_ids)
        self.tp = self.add_variable(shape=(n,), initializer="zeros", name="tp")
        self.fp = self.add_variable(shape=(n,), initializer="zeros", name="fp")
        self.fn = self.add_variable(shape=(n,), initializer="zeros", name="fn")

    def update_state(self, y_true, y_pred, sample_weight=None):
        ids = ops.convert_to_tensor(self.class_ids, "int32")
        t = ops.expand_dims(ops.cast(ops.argmax(y_true, axis=-1), "int32"), -1) == ids
        p = ops.expand_dims(ops.cast(ops.argmax(y_pred, axis=-1), "int32"), -1) == ids
        t = ops.reshape(ops.cast(t, "float32"), (-1, len(self.class_ids)))
        p = ops.reshape(ops.cast(p, "float32"), (-1, len(self.class_ids)))
        self.tp.assign_add(ops.sum(t * p, axis=0))
        self.fp.assign_add(ops.sum((1 - t) * p, axis=0))
        self.fn.assign_add(ops.sum(t * (1 - p), axis=0))

    def class_dice(self):
        """Each class's Dice over what was seen, in the order of ``class_ids``."""
        denom = 2 * self.tp + self.fp + self.fn
        return ops.where(denom > 0, 2 * self.tp / ops.maximum(denom, 1.0), 1.0)

    def result(self):
        return ops.mean(self.class_dice())

    def reset_state(self):
        for v in (self.tp, self.fp, self.fn):
            v.assign(ops.zeros_like(v))

    def get_config(self) -> dict:
        return {**super().get_config(), "class_ids": list(self.class_ids)}


@keras.saving.register_keras_serializable(package="medseg")
class ClassDice(MeanClassDice):
    """Dice of one class of a label map (argmax of one-hot truth and of probabilities),
    accumulated over the epoch; 1.0 when the class is absent from both.

    Args:
        class_id: the class.
        name: the metric's name (``dice_anterior``: the logs read ``val_dice_anterior``).
    """

    def __init__(self, class_id: int, name: str | None = None, **kwargs):
        super().__init__([class_id], name=name or f"dice_{class_id}", **kwargs)
        self.class_id = int(class_id)

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("class_ids")
        return {**config, "class_id": self.class_id}


def metric_suffix(label: str) -> str:
    """A label name as a metric-name suffix: lower case, runs of other characters as ``_``.

    Example:
        >>> metric_suffix("Left Hippocampus (anterior)")
        'left_hippocampus_anterior'
    """
    return re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_")


def class_dice_metrics(
    num_classes: int, class_names: Mapping[int, str] | Sequence[str] | None = None
) -> list:
    """One :class:`ClassDice` per foreground class (``dice_<name>``) and their mean (``dice``).

    Args:
        num_classes: classes of the softmax output, background (class 0) included.
        class_names: name of each class (a ``{class: name}`` mapping such as the plan's
            ``labels``, or a list indexed by class); a missing or empty name gives ``dice_<k>``.
    """
    if isinstance(class_names, Mapping):
        names = {int(k): str(v) for k, v in class_names.items()}
    else:
        names = dict(enumerate(class_names or []))
    metrics, used = [], {"dice"}
    for k in range(1, num_classes):
        suffix = metric_suffix(names.get(k, "")) or str(k)
        name = f"dice_{suffix}" if f"dice_{suffix}" not in used else f"dice_{suffix}_{k}"
        used.add(name)
        metrics.append(ClassDice(k, name=name))
    return [MeanClassDice(list(range(1, num_classes)), name="dice"), *metrics]


def training_metrics(
    task: str,
    num_classes: int,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
) -> list:
    """Metrics reported every epoch.

    Classification: accuracy, AUC, precision and recall. Binary segmentation: Dice and IoU of
    the foreground. Label maps (softmax, ``num_classes >= 2``): mean IoU and the IoU of each
    foreground class (``iou_<k>``), the Dice of each foreground class (``dice_<name>``, see
    :func:`class_dice_metrics`) and their mean (``dice``).

    Args:
        task: ``segmentation`` or ``classification``.
        num_classes: model outputs (background included for label maps).
        class_names: label maps: the name of each class (the plan's ``labels``), so that the logs
            read ``val_dice_anterior``; without it the metrics are ``dice_1``, ``dice_2``, ...
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
    iou = [keras.metrics.OneHotMeanIoU(num_classes=num_classes, name="iou")] + [
        keras.metrics.OneHotIoU(num_classes=num_classes, target_class_ids=[k], name=f"iou_{k}")
        for k in range(1, num_classes)
    ]
    return iou + class_dice_metrics(num_classes, class_names)


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
