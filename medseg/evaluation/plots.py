"""Figures written into run folders (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import contextlib
import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medseg.utils import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def logged_points(epochs: list[int], rows: list[dict], key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of the ``history.csv`` rows that hold a number for ``key``: with
    ``train.validation_freq`` the ``val_*`` cells of epochs that were not validated are blank."""
    points = []
    for e, r in zip(epochs, rows, strict=True):
        with contextlib.suppress(TypeError, ValueError):
            if math.isfinite(v := float(r.get(key))):
                points.append((e, v))
    return points


def plot_history(history_csv: str | Path, out: str | Path) -> Path | None:
    """Training curves: one panel per metric, train and validation together."""
    history_csv = Path(history_csv)
    if not history_csv.exists():
        return None
    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    names = [k for k in rows[0] if k not in ("epoch", "learning_rate") and not k.startswith("val_")]
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ax.plot(epochs, [float(r[name]) for r in rows], label="train")
        val = logged_points(epochs, rows, f"val_{name}")
        if val:
            ax.plot(
                *zip(*val, strict=True), marker="." if len(val) < len(rows) else None, label="val"
            )
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend()
    return _save(fig, Path(out))


def plot_overlays(images: list[np.ndarray], titles: list[str], out: str | Path, cols: int = 4):
    """A grid of RGB uint8 images (e.g. overlays) with titles."""
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, title in zip(axes.ravel(), images, titles, strict=False):
        ax.imshow(img)
        ax.set_title(title, fontsize=8)
    return _save(fig, Path(out))


def plot_confusion(matrix: np.ndarray, class_names: list[str], out: str | Path) -> Path:
    """A confusion matrix with counts."""
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2, 1.2 * len(class_names) + 1))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center")
    return _save(fig, Path(out))


def plot_roc(probs: np.ndarray, targets: np.ndarray, class_names: list[str], out: str | Path):
    """One-vs-rest ROC curves of a classifier, one per class present."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for k, name in enumerate(class_names):
        truth = targets == k
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, probs[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(truth, probs[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=8)
    return _save(fig, Path(out))
