"""Cross-validation summary and report (``cv_summary.json``, ``report.md``, ``report.html``).

Everything here is computed from the out-of-fold (OOF) predictions that ``medseg cv`` writes, one
``fold_<k>/oof.csv`` per fold (see :mod:`medseg.training.cv`)::

    segmentation:   id,group,fold,tp,fp,fn,true_pixels,pred_pixels   (thresholded-mask pixel counts)
    classification: id,group,fold,target,pred,p_<class0>,p_<class1>,...

Per metric the summary holds:

- ``pooled``: the metric of all OOF rows together (every sample is predicted exactly once, by the
  fold model that did not train on it);
- ``folds``, ``mean``, ``std``: the metric of each fold's own OOF rows (recomputed from
  ``oof.csv``, not copied from ``metrics.json``), their mean and sample standard deviation
  (``ddof=1``; ``None`` with fewer than two folds);
- ``ci95``: a 95% percentile bootstrap interval of the pooled metric, resampling whole GROUPS
  (patients or near-duplicate groups) with replacement, so that slices of one patient are never
  treated as independent evidence. Seeded (:class:`numpy.random.Generator`), hence reproducible.

The summary is a function of the OOF files (plus ``splits.json``/``config.yaml`` for the number of
folds and the config description, and ``test_metrics.json`` passed through when present); the same
inputs give the same bytes of ``cv_summary.json`` and ``report.md``. Group ids are only used for
grouping: the summary and the report hold counts, never lists of ids.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from medseg.errors import DataError
from medseg.evaluation.plots import _save, logged_points, plot_confusion, plot_roc, plt
from medseg.models.metrics import dice_from_counts, iou_from_counts
from medseg.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

SEG_COLUMNS = ("id", "group", "fold", "tp", "fp", "fn", "true_pixels", "pred_pixels")
CLS_COLUMNS = ("id", "group", "fold", "target", "pred")
SEG_METRICS = (
    "dice",
    "iou",
    "dice_per_group_mean",
    "dice_per_group_median",
    "dice_per_image_mean_nonempty",
    "hd95_per_group_mean",
)
CLS_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro", "ece")
PER_CLASS_METRICS = ("precision", "recall", "f1", "roc_auc")
ECE_BINS = 10
CI_LEVEL = 0.95

LABELS = {
    "dice": "Dice, pooled pixels",
    "iou": "IoU, pooled pixels",
    "dice_per_group_mean": "Dice per patient/group, mean",
    "dice_per_group_median": "Dice per patient/group, median",
    "dice_per_image_mean_nonempty": "Dice per image, mean over images with foreground",
    "hd95_per_group_mean": "HD95 per patient/group, mean (pixels; both masks non-empty)",
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "macro_f1": "Macro F1",
    "roc_auc_macro": "ROC AUC, macro one-vs-rest",
    "ece": "Expected calibration error (10 bins; lower is better)",
}
HD95_NOTE = (
    "HD95 (95th-percentile Hausdorff distance) is not reported: these oof.csv files have no "
    "hd95 column (written by medseg versions that stored pixel counts only)."
)


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class _CVData:
    """A CV run's OOF rows, as parsed rows and as arrays."""

    root: Path
    task: str
    k: int
    folds_done: list[int]
    rows: list[dict]
    config: dict
    class_names: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # sorted unique group ids
    gidx: np.ndarray = None  # row -> index into groups
    fold: np.ndarray = None  # row -> fold number
    counts: np.ndarray = None  # segmentation: [N, 3] tp, fp, fn
    true_pixels: np.ndarray = None
    hd95: np.ndarray = None  # segmentation: per image, NaN where undefined or not recorded
    target: np.ndarray = None  # classification
    pred: np.ndarray = None
    probs: np.ndarray = None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({e})") from None
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def _fold_count(root: Path, manifest: dict, config: dict) -> int:
    if isinstance(manifest.get("k"), int):
        return manifest["k"]
    if isinstance(manifest.get("folds"), list) and manifest["folds"]:
        return len(manifest["folds"])
    folds = (config.get("cv") or {}).get("folds")
    if isinstance(folds, int):
        return folds
    found = [int(p.name[5:]) for p in root.glob("fold_*") if p.name[5:].isdigit()]
    if not found:
        raise DataError(f"{root / 'splits.json'}: no k-fold manifest and no fold_<k> folders")
    return max(found)


def _fold_started(fdir: Path) -> bool:
    """Has fold ``fdir`` finished (state done, metrics written or oof.csv present)?"""
    if (fdir / "oof.csv").exists() or (fdir / "metrics.json").exists():
        return True
    try:
        return json.loads((fdir / "state.json").read_text()).get("status") == "done"
    except (OSError, ValueError, AttributeError):
        return False


def _int(value: str, path: Path, line: int, column: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number) or number < 0:
        raise DataError(f"{path}: line {line}: {column}={value!r} is not a non-negative integer")
    return int(number)


def _prob(value: str, path: Path, line: int, column: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and -1e-6 <= number <= 1 + 1e-6):
        raise DataError(f"{path}: line {line}: {column}={value!r} is not a probability")
    return min(max(number, 0.0), 1.0)


def _read_oof_file(path: Path, k: int, task: str | None) -> tuple[str, list[str], list[dict]]:
    """Rows of one fold's oof.csv, typed and checked; returns (task, class names, rows)."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            raw = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if task is None:
        task = "segmentation" if "tp" in header else "classification"
    needed = SEG_COLUMNS if task == "segmentation" else CLS_COLUMNS
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(
            f"{path}: malformed {task} oof.csv, missing column(s) {', '.join(missing)} "
            f"(has {', '.join(header) or 'nothing'})"
        )
    names = [c[2:] for c in header if c.startswith("p_")] if task == "classification" else []
    if task == "classification" and len(names) < 2:
        raise DataError(f"{path}: malformed classification oof.csv, needs p_<class> columns")
    if not raw:
        raise DataError(f"{path}: no rows (a fold with no validation samples?)")
    rows = []
    for line, r in enumerate(raw, start=2):
        if None in r or any(r.get(c) is None for c in needed):
            raise DataError(f"{path}: line {line}: wrong number of fields")
        if not r["id"] or not r["group"]:
            raise DataError(f"{path}: line {line}: empty id or group")
        row = {"id": r["id"], "group": r["group"], "fold": _int(r["fold"], path, line, "fold")}
        if row["fold"] != k:
            raise DataError(f"{path}: line {line}: fold={row['fold']}, expected {k}")
        if task == "segmentation":
            for c in SEG_COLUMNS[3:]:
                row[c] = _int(r[c], path, line, c)
            hd = (r.get("hd95") or "").strip()
            try:
                row["hd95"] = float(hd) if hd else float("nan")
            except ValueError:
                raise DataError(f"{path}: line {line}: hd95={hd!r} is not a number") from None
            if row["true_pixels"] != row["tp"] + row["fn"] or (
                row["pred_pixels"] != row["tp"] + row["fp"]
            ):
                raise DataError(
                    f"{path}: line {line}: inconsistent counts (true_pixels must be tp+fn and "
                    "pred_pixels tp+fp)"
                )
        else:
            for c in ("target", "pred"):
                row[c] = _int(r[c], path, line, c)
                if row[c] >= len(names):
                    raise DataError(f"{path}: line {line}: {c}={row[c]} but {len(names)} classes")
            for n in names:
                row[f"p_{n}"] = _prob(r[f"p_{n}"], path, line, f"p_{n}")
        rows.append(row)
    return task, names, rows


def _load(run_dir: str | Path) -> _CVData:
    root = Path(run_dir)
    if not root.is_dir():
        raise DataError(f"{root}: cross-validation run folder not found")
    config = _read_yaml(root / "config.yaml")
    splits = root / "splits.json"
    manifest = _read_json(splits) if splits.is_file() else {}
    k = _fold_count(root, manifest, config)
    task = (config.get("data") or {}).get("task")
    if task not in (None, "segmentation", "classification"):
        raise DataError(f"{root / 'config.yaml'}: data.task '{task}' is not supported")
    folds_done = [f for f in range(1, k + 1) if _fold_started(root / f"fold_{f}")]
    if not folds_done:
        raise DataError(f"{root / 'fold_1' / 'oof.csv'}: not found (no fold has finished yet)")
    rows: list[dict] = []
    class_names: list[str] | None = None
    for f in folds_done:
        path = root / f"fold_{f}" / "oof.csv"
        if not path.is_file():
            raise DataError(f"{path}: not found (fold {f} has no out-of-fold predictions)")
        task, names, fold_rows = _read_oof_file(path, f, task)
        if class_names is not None and names != class_names:
            raise DataError(f"{path}: classes {names} differ from the other folds' {class_names}")
        class_names = names
        rows.extend(fold_rows)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise DataError(
            f"{root}: {len(ids) - len(set(ids))} sample id(s) occur in more than one oof.csv row "
            "(out-of-fold sets must not overlap)"
        )
    wanted = manifest.get("class_names") or []
    if task == "classification" and wanted and list(wanted) != class_names:
        raise DataError(
            f"{splits}: class_names {wanted} differ from the oof.csv columns {class_names}"
        )
    groups = sorted({r["group"] for r in rows})
    index = {g: i for i, g in enumerate(groups)}
    data = _CVData(
        root=root,
        task=task,
        k=k,
        folds_done=folds_done,
        rows=rows,
        config=config,
        class_names=class_names or [],
        groups=groups,
        gidx=np.array([index[r["group"]] for r in rows], dtype=np.int64),
        fold=np.array([r["fold"] for r in rows], dtype=np.int64),
    )
    if task == "segmentation":
        data.counts = np.array([[r["tp"], r["fp"], r["fn"]] for r in rows], dtype=np.int64)
        data.true_pixels = np.array([r["true_pixels"] for r in rows], dtype=np.int64)
        data.hd95 = np.array([r["hd95"] for r in rows], dtype=np.float64)
    else:
        data.target = np.array([r["target"] for r in rows], dtype=np.int64)
        data.pred = np.array([r["pred"] for r in rows], dtype=np.int64)
        data.probs = np.array([[r[f"p_{n}"] for n in data.class_names] for r in rows])
    return data


def load_oof(run_dir: str | Path) -> list[dict]:
    """Every finished fold's out-of-fold rows, in fold order then file order.

    Values are typed: ``id``/``group`` strings, ``fold`` and the counts (segmentation: ``tp``,
    ``fp``, ``fn``, ``true_pixels``, ``pred_pixels``) or class indices (classification:
    ``target``, ``pred``) ints, ``p_<class>`` floats. A fold counts as finished when its folder
    has ``oof.csv``, ``metrics.json`` or a ``done`` state; folds not started are skipped.

    Raises:
        DataError: naming the file, when a finished fold's ``oof.csv`` is missing or malformed
            (missing columns, bad values, wrong fold number, inconsistent counts), or when a sample
            id occurs in two rows.
    """
    return _load(run_dir).rows


# --------------------------------------------------------------------------------------------
# Metrics. Each takes row weights ``w`` (0 = row left out, m = row counted m times), so that the
# same code gives per-fold values (0/1 weights), pooled values (all 1) and bootstrap replicates
# (each row weighted by how often its group was drawn).


def _group_dice(d: _CVData, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the groups with rows in ``sel``, their Dice with their rows' counts pooled)."""
    g = d.gidx[sel]
    sums = np.stack(
        [np.bincount(g, weights=d.counts[sel, i], minlength=len(d.groups)) for i in range(3)], 1
    )
    present = np.unique(g)
    return present, np.array([dice_from_counts(*sums[i]) for i in present])


def _seg_metrics(d: _CVData, w: np.ndarray, group_mult: np.ndarray) -> dict:
    """Segmentation metrics of the rows weighted ``w``; ``group_mult[g]`` counts group ``g``."""
    tp, fp, fn = (float(v) for v in w @ d.counts)
    out = {"dice": dice_from_counts(tp, fp, fn), "iou": iou_from_counts(tp, fp, fn)}
    sel = w > 0
    present, per_group = _group_dice(d, sel)
    mult = np.asarray(group_mult)[present].astype(np.int64)
    out["dice_per_group_mean"] = float(np.average(per_group, weights=mult))
    out["dice_per_group_median"] = float(np.median(np.repeat(per_group, mult)))
    nonempty = sel & (d.true_pixels > 0)
    if nonempty.any():
        per_image = np.array([dice_from_counts(*c) for c in d.counts[nonempty]])
        out["dice_per_image_mean_nonempty"] = float(np.average(per_image, weights=w[nonempty]))
    else:
        out["dice_per_image_mean_nonempty"] = None
    out["hd95_per_group_mean"] = _hd95_per_group(d, w, group_mult)
    return out


def _hd95_per_group(d: _CVData, w: np.ndarray, group_mult: np.ndarray) -> float | None:
    """Mean over groups of each group's mean per-image HD95 (images where it is defined)."""
    ok = (w > 0) & np.isfinite(d.hd95)
    if not ok.any():
        return None
    g = d.gidx[ok]
    sums = np.bincount(g, weights=w[ok] * d.hd95[ok], minlength=len(d.groups))
    counts = np.bincount(g, weights=w[ok], minlength=len(d.groups))
    present = np.unique(g)
    mult = np.asarray(group_mult)[present].astype(float)
    return float(np.average(sums[present] / counts[present], weights=mult))


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


def _ece(d: _CVData, w: np.ndarray) -> float | None:
    return calibration_bins(d.probs.max(axis=1), (d.pred == d.target).astype(float), w)[0]


def _cls_sklearn(d: _CVData, sel: np.ndarray) -> dict:
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


class _AUC:
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


def _cls_weighted(d: _CVData, w: np.ndarray, aucs: list[_AUC] | None = None) -> dict:
    """The metrics of :func:`_cls_sklearn` with row weights, in NumPy (for the bootstrap).

    Same conventions as scikit-learn: precision/recall/F1 are 0 where undefined
    (``zero_division=0``), balanced accuracy averages the recall of classes present in the truth,
    macro F1 averages all classes, AUC is ``None`` for a class without positives or negatives.
    """
    n = len(d.class_names)
    aucs = aucs or [_AUC(d.probs[:, c], d.target == c) for c in range(n)]
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


# --------------------------------------------------------------------------------------------
# Summary


def _stat_block(pooled, fold_values: list, boot: list) -> dict:
    vals = np.array([v for v in fold_values if v is not None], dtype=float)
    finite = np.array([v for v in boot if v is not None], dtype=float)
    tail = 100 * (1 - CI_LEVEL) / 2
    return {
        "pooled": pooled,
        "mean": float(vals.mean()) if len(vals) else None,
        "std": float(vals.std(ddof=1)) if len(vals) >= 2 else None,
        "folds": fold_values,
        "ci95": [float(v) for v in np.percentile(finite, [tail, 100 - tail])]
        if len(finite)
        else None,
    }


def _config_summary(cfg: dict, k: int) -> dict:
    data, model, train = cfg.get("data") or {}, cfg.get("model") or {}, cfg.get("train") or {}
    out = {
        "model": model.get("name"),
        "image_size": data.get("image_size"),
        "channels": data.get("channels"),
        "epochs": train.get("epochs"),
        "batch_size": train.get("batch_size"),
        "optimizer": train.get("optimizer"),
        "learning_rate": train.get("learning_rate"),
        "loss": train.get("loss"),
        "seed": train.get("seed"),
        "folds": k,
        "medseg_version": (cfg.get("medseg") or {}).get("version"),
        "config_hash": (cfg.get("medseg") or {}).get("config_hash"),
    }
    if data.get("task") == "segmentation" or model.get("name") == "unet":
        out["threshold"] = (cfg.get("predict") or {}).get("threshold")
    return {key: v for key, v in out.items() if v is not None}


def _strip_groups(obj):
    """``obj`` without ``per_group`` entries (they list patient ids)."""
    if isinstance(obj, dict):
        return {key: _strip_groups(v) for key, v in obj.items() if key != "per_group"}
    if isinstance(obj, list):
        return [_strip_groups(v) for v in obj]
    return obj


def _metrics_json_warnings(d: _CVData, per_fold: dict[int, dict]) -> list[str]:
    """Differences between the recomputed fold metrics and the fold's metrics.json ``val``."""
    out = []
    for f, mine in per_fold.items():
        path = d.root / f"fold_{f}" / "metrics.json"
        if not path.is_file():
            continue
        try:
            val = json.loads(path.read_text()).get("val") or {}
        except (OSError, ValueError, AttributeError):
            out.append(f"fold_{f}/metrics.json: unreadable, not compared")
            continue
        for key in SEG_METRICS + CLS_METRICS:
            theirs, ours = val.get(key), mine.get(key)
            if isinstance(theirs, (int, float)) and ours is not None and abs(theirs - ours) > 1e-4:
                out.append(
                    f"fold_{f}: {key} from oof.csv is {ours:.4f} but metrics.json val says "
                    f"{theirs:.4f}"
                )
    return out


def summarize(run_dir: str | Path, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Cross-validation summary of a ``medseg cv`` run, computed from its OOF files.

    Args:
        run_dir: the CV run folder (``runs/<name>``).
        n_boot: bootstrap replicates for the confidence intervals (0: no intervals).
        seed: seed of the bootstrap's :func:`numpy.random.default_rng`.

    Returns:
        A JSON-ready dict: ``task``, ``run``, ``k``, ``folds_done``, ``n_samples``, ``n_groups``,
        ``fold_sizes``, ``config``, ``bootstrap`` (settings), ``metrics`` (per metric:
        ``pooled``, ``mean``, ``std``, ``folds``, ``ci95``), ``not_available``, ``warnings``,
        ``test`` (the held-out test split's metrics, when ``test_metrics.json`` exists) and, for
        classification, ``class_names``, ``per_class`` (precision/recall/f1/roc_auc blocks and
        ``support``), ``confusion_matrix`` and ``calibration`` (ECE bins of the pooled rows);
        for segmentation ``n_images_nonempty``.

    Raises:
        DataError: a finished fold's ``oof.csv`` is missing or malformed (the message names it).
    """
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    d = _load(run_dir)
    n, n_groups = len(d.rows), len(d.groups)
    ones = np.ones(n)
    seg = d.task == "segmentation"
    if seg:
        has_hd95 = bool(np.isfinite(d.hd95).any())
        names = [m for m in SEG_METRICS if has_hd95 or not m.startswith("hd95")]

        def compute(w, gm):
            return _seg_metrics(d, w, gm)

        pooled = compute(ones, np.ones(n_groups))
        per_fold = {
            f: compute(
                (d.fold == f).astype(float),
                np.bincount(d.gidx[d.fold == f], minlength=n_groups) > 0,
            )
            for f in d.folds_done
        }
    else:
        names = list(CLS_METRICS) + [f"{m}/{c}" for c in d.class_names for m in PER_CLASS_METRICS]
        aucs = [_AUC(d.probs[:, c], d.target == c) for c in range(len(d.class_names))]

        def compute(w, gm):
            return _cls_weighted(d, w, aucs)

        pooled = _cls_sklearn(d, np.ones(n, dtype=bool))
        per_fold = {f: _cls_sklearn(d, d.fold == f) for f in d.folds_done}

    rng = np.random.default_rng(seed)
    boot: dict[str, list] = {m: [] for m in names}
    for _ in range(n_boot):
        mult = np.bincount(rng.integers(0, n_groups, size=n_groups), minlength=n_groups)
        rep = compute(mult[d.gidx].astype(float), mult)
        for m in names:
            boot[m].append(rep[m])

    blocks = {
        m: _stat_block(pooled[m], [per_fold[f][m] for f in d.folds_done], boot[m]) for m in names
    }
    summary = {
        "task": d.task,
        "run": d.root.name,
        "k": d.k,
        "folds_done": d.folds_done,
        "n_samples": n,
        "n_groups": n_groups,
        "fold_sizes": [
            {
                "fold": f,
                "n_samples": int((d.fold == f).sum()),
                "n_groups": len(set(d.gidx[d.fold == f].tolist())),
            }
            for f in d.folds_done
        ],
        "config": _config_summary(d.config, d.k),
        "bootstrap": {
            "n_boot": n_boot,
            "seed": seed,
            "unit": "group",
            "level": CI_LEVEL,
            "method": "percentile",
        },
        "metrics": {m: blocks[m] for m in (names if seg else CLS_METRICS)},
    }
    if seg:
        summary["n_images_nonempty"] = int((d.true_pixels > 0).sum())
        summary["not_available"] = {} if np.isfinite(d.hd95).any() else {"hd95": HD95_NOTE}
    else:
        from sklearn.metrics import confusion_matrix

        summary["class_names"] = d.class_names
        summary["per_class"] = {
            c: {
                **{m: blocks[f"{m}/{c}"] for m in PER_CLASS_METRICS},
                "support": pooled[f"support/{c}"],
            }
            for c in d.class_names
        }
        labels = list(range(len(d.class_names)))
        summary["confusion_matrix"] = confusion_matrix(d.target, d.pred, labels=labels).tolist()
        summary["calibration"] = {
            "n_bins": ECE_BINS,
            "confidence": "max class probability",
            "bins": calibration_bins(d.probs.max(axis=1), (d.pred == d.target).astype(float))[1],
        }
        summary["not_available"] = {}
    folds_of = {}
    for g, f in zip(d.gidx.tolist(), d.fold.tolist(), strict=True):
        folds_of.setdefault(g, set()).add(f)
    crossing = sum(len(v) > 1 for v in folds_of.values())
    summary["warnings"] = (
        [
            f"{crossing} patient(s)/group(s) have out-of-fold rows in more than one fold: the "
            "folds were not split by group, so the fold models saw some of their own "
            "validation patients"
        ]
        if crossing
        else []
    ) + _metrics_json_warnings(d, per_fold)
    test_path = d.root / "test_metrics.json"
    summary["test"] = _strip_groups(_read_json(test_path)) if test_path.is_file() else None
    return summary


# --------------------------------------------------------------------------------------------
# Figures


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
    return _save(fig, out)


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
    return _save(fig, out)


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
    return _save(fig, out)


def _figures(d: _CVData, summary: dict, plots: Path) -> list[tuple[str, str]]:
    """Write the figures; returns ``(caption, path relative to the run)`` of each written."""
    figs: list[tuple[str, str]] = []

    def add(caption: str, path: Path | None):
        if path is not None:
            figs.append((caption, path.relative_to(d.root).as_posix()))

    histories = {f: d.root / f"fold_{f}" / "logs" / "history.csv" for f in d.folds_done}
    add(
        "Training curves of every fold (dashed: train, solid: validation)",
        plot_cv_history(histories, plots / "cv_history.png"),
    )
    if d.task == "segmentation":
        per_fold = {f: _group_dice(d, d.fold == f)[1] for f in d.folds_done}
        add("Per-patient Dice, by fold", plot_group_dice(per_fold, plots / "cv_dice_per_group.png"))
    else:
        add(
            "Confusion matrix of the pooled out-of-fold predictions",
            plot_confusion(
                np.array(summary["confusion_matrix"]), d.class_names, plots / "cv_confusion.png"
            ),
        )
        add(
            "One-vs-rest ROC curves, pooled out-of-fold",
            plot_roc(d.probs, d.target, d.class_names, plots / "cv_roc.png"),
        )
        add(
            "Reliability diagram, pooled out-of-fold (bars: accuracy per confidence bin)",
            plot_reliability(
                summary["calibration"]["bins"],
                summary["metrics"]["ece"]["pooled"],
                plots / "cv_reliability.png",
            ),
        )
    return figs


# --------------------------------------------------------------------------------------------
# Report


def _fmt(v, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ci(block: dict) -> str:
    ci = block.get("ci95")
    body = _fmt(block["pooled"])
    return body if ci is None else f"{body} ({_fmt(ci[0])}–{_fmt(ci[1])})"


def _mean_std(block: dict) -> str:
    if block["mean"] is None:
        return "–"
    return _fmt(block["mean"]) + ("" if block["std"] is None else f" ± {_fmt(block['std'])}")


def _test_line(test: dict, task: str) -> str:
    keys = SEG_METRICS if task == "segmentation" else CLS_METRICS
    parts = [
        f"{LABELS.get(key, key)} {test[key]:.4f}"
        for key in keys
        if isinstance(test.get(key), float)
    ]
    n = test.get("n_images")
    who = test.get("ensemble")
    src = f"ensemble of {len(who)} fold models" if isinstance(who, list) else "fold models"
    return (
        f"Held-out test split ({src}"
        + (f", {n} images" if isinstance(n, int) else "")
        + "): "
        + ("; ".join(parts) if parts else "no scalar metrics recorded")
        + "."
    )


def _blocks(summary: dict, figs: list[tuple[str, str]]) -> list[tuple]:
    """The report as a list of blocks, rendered to Markdown and HTML."""
    cfg = summary["config"]
    task = summary["task"]
    unit = "slices/images" if task == "segmentation" else "images"
    out: list[tuple] = [("h1", f"Cross-validation report: {summary['run']}")]
    out.append(
        (
            "p",
            f"{task.capitalize()}, {summary['k']}-fold cross-validation; folds finished: "
            f"{len(summary['folds_done'])} of {summary['k']}. Out-of-fold predictions: "
            f"{summary['n_samples']} {unit} from {summary['n_groups']} patients/groups.",
        )
    )
    out.append(("h2", "Configuration"))
    size = cfg.get("image_size")
    rows = [
        ["model", str(cfg.get("model", "–"))],
        [
            "image size",
            " × ".join(str(s) for s in size)
            + (f" × {cfg['channels']}" if "channels" in cfg else "")
            if isinstance(size, list)
            else "–",
        ],
        ["epochs", str(cfg.get("epochs", "–"))],
        ["folds", str(cfg.get("folds", summary["k"]))],
    ]
    for key in ("batch_size", "optimizer", "learning_rate", "loss", "threshold", "seed"):
        if key in cfg:
            rows.append([key.replace("_", " "), str(cfg[key])])
    if "medseg_version" in cfg:
        rows.append(["medseg", f"{cfg['medseg_version']} (config {cfg.get('config_hash', '?')})"])
    out.append(("table", ["setting", "value"], rows))

    out.append(("h2", "Results"))
    rows = [
        [LABELS.get(m, m), _mean_std(b), _ci(b), ", ".join(_fmt(v) for v in b["folds"])]
        for m, b in summary["metrics"].items()
    ]
    out.append(
        (
            "table",
            [
                "metric",
                "mean ± std over folds",
                "95% CI (bootstrap by patient/group)",
                "fold values",
            ],
            rows,
        )
    )
    out.append(
        (
            "p",
            "The CI column shows the pooled out-of-fold estimate followed by its 95% bootstrap "
            "interval in parentheses.",
        )
    )
    if task == "classification":
        out.append(("h3", "Per class (pooled out-of-fold estimate, 95% CI)"))
        rows = [
            [name, str(pc["support"])] + [_ci(pc[m]) for m in PER_CLASS_METRICS]
            for name, pc in summary["per_class"].items()
        ]
        out.append(("table", ["class", "support", "precision", "recall", "F1", "ROC AUC"], rows))
    for note in summary.get("not_available", {}).values():
        out.append(("p", note))
    if summary.get("test"):
        out.append(("h2", "Held-out test split"))
        out.append(("p", _test_line(summary["test"], task)))
    if figs:
        out.append(("h2", "Figures"))
        for caption, rel in figs:
            out.append(("img", caption, rel))
    out.append(("h2", "How these numbers were computed"))
    b = summary["bootstrap"]
    out.append(
        (
            "ul",
            [
                "Every sample was predicted once, by the model of the fold that held it out "
                "(out-of-fold, OOF); patients/groups never cross folds. All numbers come from "
                "the folds' oof.csv files.",
                "Fold values: each metric computed on one fold's OOF rows; mean ± std (sample "
                "standard deviation, ddof=1) across the finished folds.",
                "Pooled estimate: the metric computed on all OOF rows together.",
                (
                    "Pixel Dice/IoU pool the true/false positive and false negative pixel counts "
                    "of all images; per-patient Dice pools each patient's slices first; per-image "
                    "Dice is averaged over images whose ground truth has foreground."
                )
                if task == "segmentation"
                else (
                    "Precision, recall, F1, balanced accuracy and one-vs-rest ROC AUC as in "
                    "scikit-learn (zero_division=0; macro AUC over classes with positives and "
                    "negatives). ECE: 10 equal-width bins of the max class probability, "
                    "|accuracy − mean confidence| weighted by the bin's share of samples."
                ),
                f"95% CI: percentile bootstrap with {b['n_boot']} replicates (seed {b['seed']}), "
                f"resampling whole patients/groups with replacement ({summary['n_groups']} per "
                "replicate), so correlated slices of one patient move together.",
            ],
        )
    )
    if summary.get("warnings"):
        out.append(("h2", "Warnings"))
        out.append(("ul", summary["warnings"]))
    return out


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[1]}]({block[2]})", "", f"*{block[1]}*", ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
    return "\n".join(lines).rstrip() + "\n"


CSS = """
body { font-family: sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }
th { background: #eee; }
figure { margin: 1em 0; }
img { max-width: 100%; }
figcaption { font-style: italic; color: #555; }
"""


def _html(blocks: list[tuple], root: Path) -> str:
    esc = html.escape
    title = next((b[1] for b in blocks if b[0] == "h1"), "Cross-validation report")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
    ]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{esc(block[1])}</p>")
        elif kind == "table":
            parts.append("<table>")
            parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in block[1]) + "</tr>")
            for r in block[2]:
                parts.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>")
            parts.append("</table>")
        elif kind == "img":
            data = base64.b64encode((root / block[2]).read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{esc(block[1])}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(block[1])}</figcaption></figure>"
            )
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block[1]) + "</ul>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | Path, summary: dict | None = None) -> dict:
    """Write ``cv_summary.json``, ``report.md``, ``report.html`` and ``plots/cv_*.png`` of a CV run.

    Args:
        run_dir: the CV run folder.
        summary: the result of :func:`summarize` (computed with its defaults when ``None``).

    Returns:
        The summary.

    Figures: training curves of all folds; segmentation: per-patient Dice by fold; classification:
    confusion matrix, ROC curves and reliability diagram of the pooled OOF predictions.
    ``report.md`` links them relatively (``plots/…``); ``report.html`` embeds them (base64 PNG) and
    needs nothing else.
    """
    root = Path(run_dir)
    if summary is None:
        summary = summarize(root)
    d = _load(root)
    figs = _figures(d, summary, root / "plots")
    blocks = _blocks(summary, figs)
    atomic_write_json(root / "cv_summary.json", summary)
    atomic_write_text(root / "report.md", _markdown(blocks))
    atomic_write_text(root / "report.html", _html(blocks, root))
    logger.info("wrote %s, report.md and report.html", root / "cv_summary.json")
    return summary
