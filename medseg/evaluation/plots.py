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


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` (PNG, 100 dpi, atomically) and close it; returns ``path``."""
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
    return save_figure(fig, Path(out))


def plot_overlays(images: list[np.ndarray], titles: list[str], out: str | Path, cols: int = 4):
    """A grid of RGB uint8 images (e.g. overlays) with titles."""
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, title in zip(axes.ravel(), images, titles, strict=False):
        ax.imshow(img)
        ax.set_title(title, fontsize=8)
    return save_figure(fig, Path(out))


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
    return save_figure(fig, Path(out))


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
    return save_figure(fig, Path(out))


def plot_cv_history(histories: dict[int, Path], out: Path) -> Path | None:
    """Training curves of all folds: one panel per metric, one colour per fold, train dashed and
    validation solid."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    data: dict[int, list[dict]] = {}
    for f, path in histories.items():
        if path.is_file():
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            if rows:
                data[f] = rows
    if not data:
        return None
    names: list[str] = []
    for rows in data.values():
        for key in rows[0]:
            skip = key in ("epoch", "learning_rate", "lr") or key.startswith("val_")
            if not skip and key not in names:
                names.append(key)
    if not names:
        return None

    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for i, (_f, rows) in enumerate(sorted(data.items())):
            colour = f"C{i % 10}"
            epochs = [int(float(r.get("epoch", j))) + 1 for j, r in enumerate(rows)]
            for key, style, width in ((name, "--", 1), (f"val_{name}", "-", 1.4)):
                # blank cells (epochs not validated: train.validation_freq) are left out, as NaN
                # gaps would hide a line of isolated points
                points = logged_points(epochs, rows, key)
                if points:
                    sparse = len(points) < len(rows)
                    ax.plot(
                        *zip(*points, strict=True),
                        style,
                        color=colour,
                        linewidth=width,
                        marker="." if sparse else None,
                    )
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [
        Line2D([], [], color=f"C{i % 10}", label=f"fold {f}") for i, f in enumerate(sorted(data))
    ]
    handles += [
        Line2D([], [], color="k", linestyle="--", label="train"),
        Line2D([], [], color="k", linestyle="-", label="val"),
    ]
    axes[0][0].legend(handles=handles, fontsize=7)
    return save_figure(fig, out)


def plot_group_dice(per_fold: dict[int, np.ndarray], out: Path) -> Path:
    """Per-patient (group) Dice: a box per fold and for all folds, with the groups as points."""
    labels = [f"fold {f}" for f in per_fold] + ["all"]
    series = list(per_fold.values()) + [np.concatenate(list(per_fold.values()))]
    fig, ax = plt.subplots(figsize=(1.2 * len(series) + 2, 3.6))
    ax.boxplot(series, showfliers=False)
    ax.set_xticks(range(1, len(series) + 1), labels)
    jitter = np.random.default_rng(0)
    for i, s in enumerate(series, start=1):
        ax.plot(i + jitter.uniform(-0.15, 0.15, len(s)), s, "o", ms=3, alpha=0.6, color="C0")
    ax.set_ylabel("Dice per patient/group")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"per-patient Dice ({len(series[-1])} groups)")
    return save_figure(fig, out)


def plot_reliability(bins: list[dict], ece: float | None, out: Path) -> Path:
    """Reliability diagram: accuracy per confidence bin (bars) and the bin's mean confidence
    (red marks) against the diagonal, with the number of samples per bin below."""
    fig, (ax, axc) = plt.subplots(
        2, 1, figsize=(4.5, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    width = bins[0]["upper"] - bins[0]["lower"]
    full = [b for b in bins if b["count"]]
    mids = [(b["lower"] + b["upper"]) / 2 for b in full]
    ax.bar(mids, [b["accuracy"] for b in full], width=width * 0.9, color="C0", label="accuracy")
    ax.plot(
        mids,
        [b["confidence"] for b in full],
        "_",
        color="C3",
        markersize=14,
        markeredgewidth=2,
        label="mean confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("reliability" + (f" (ECE {ece:.3f})" if ece is not None else ""))
    ax.legend(fontsize=7, loc="upper left")
    all_mids = [(b["lower"] + b["upper"]) / 2 for b in bins]
    counts = [b["count"] for b in bins]
    axc.bar(all_mids, counts, width=width * 0.9, color="0.6")
    for m, c in zip(all_mids, counts, strict=True):
        if c:
            axc.text(m, c, f"{c:g}", ha="center", va="bottom", fontsize=7)
    axc.set_xlabel("confidence (max class probability)")
    axc.set_ylabel("count")
    return save_figure(fig, out)
