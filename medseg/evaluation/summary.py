"""Cross-validation summary (``cv_summary.json``) of a ``medseg cv`` run, from its OOF files.

Per metric the summary holds:

- ``pooled``: the metric of all OOF rows together (every sample is predicted exactly once, by the
  fold model that did not train on it);
- ``folds``, ``mean``, ``std``: the metric of each fold's own OOF rows (recomputed from
  ``oof.csv``, not copied from ``metrics.json``), their mean and sample standard deviation
  (``ddof=1``; ``None`` with fewer than two folds);
- ``ci95``: a 95% percentile bootstrap interval of the pooled metric, resampling whole GROUPS
  (patients or near-duplicate groups) with replacement
  (:func:`medseg.evaluation.stats.group_resamples`).

The summary is a function of the OOF files (plus ``splits.json``/``config.yaml`` for the number of
folds and the config description, and ``test_metrics.json`` passed through when present); the same
inputs give the same bytes of ``cv_summary.json``. Group ids are only used for grouping: the
summary holds counts, never lists of ids.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from medseg.artifacts.cv import fold_dir
from medseg.errors import DataError
from medseg.evaluation.oof import GROUPS_FILE, CVData, load_cv
from medseg.evaluation.patients import CONVENTION, MODEL_RESOLUTION, SURFACE_KEYS
from medseg.evaluation.stats import (
    CI_LEVEL,
    ECE_BINS,
    WeightedAUC,
    calibration_bins,
    cls_metrics,
    cls_weighted,
    group_resamples,
    percentile_interval,
    seg_metrics,
)
from medseg.utils import read_json

SEG_METRICS = (
    "dice",
    "iou",
    "dice_per_group_mean",
    "dice_per_group_median",
    "dice_per_image_mean_nonempty",
    *SURFACE_KEYS,
)
CLS_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro", "ece")
PER_CLASS_METRICS = ("precision", "recall", "f1", "roc_auc")
HD95_NOTE = (
    "HD95, ASSD and NSD per patient volume are not reported: the folds have no oof_groups.csv "
    "(written by medseg versions that scored HD95 per slice, both directions pooled, or stored "
    "pixel counts only); re-run the CV to get them in the per-patient-volume convention."
)


def _stat_block(pooled, fold_values: list, boot: list) -> dict:
    vals = np.array([v for v in fold_values if v is not None], dtype=float)
    return {
        "pooled": pooled,
        "mean": float(vals.mean()) if len(vals) else None,
        "std": float(vals.std(ddof=1)) if len(vals) >= 2 else None,
        "folds": fold_values,
        "ci95": percentile_interval(boot),
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


def _metrics_json_warnings(d: CVData, per_fold: dict[int, dict]) -> list[str]:
    """Differences between the recomputed fold metrics and the fold's metrics.json ``val``."""
    out = []
    for f, mine in per_fold.items():
        path = fold_dir(d.root, f) / "metrics.json"
        if not path.is_file():
            continue
        try:
            val = read_json(path).get("val") or {}
        except DataError:
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


def _estimates(d: CVData) -> tuple[list[str], dict, dict[int, dict], Callable]:
    """``(metric names, pooled values, values per fold, replicate)``: ``replicate(row weights,
    group multiplicities)`` gives the metrics of one bootstrap resample."""
    n, n_groups = len(d.rows), len(d.groups)
    if d.task == "segmentation":
        has_surface = d.group_surface is not None
        names = [m for m in SEG_METRICS if has_surface or m not in SURFACE_KEYS]

        def replicate(w, gm):
            return seg_metrics(d, w, gm)

        pooled = replicate(np.ones(n), np.ones(n_groups))
        per_fold = {
            f: replicate(
                (d.fold == f).astype(float),
                np.bincount(d.gidx[d.fold == f], minlength=n_groups) > 0,
            )
            for f in d.folds_done
        }
        return names, pooled, per_fold, replicate
    names = list(CLS_METRICS) + [f"{m}/{c}" for c in d.class_names for m in PER_CLASS_METRICS]
    aucs = [WeightedAUC(d.probs[:, c], d.target == c) for c in range(len(d.class_names))]

    def replicate(w, gm):
        return cls_weighted(d, w, aucs)

    pooled = cls_metrics(d, np.ones(n, dtype=bool))
    per_fold = {f: cls_metrics(d, d.fold == f) for f in d.folds_done}
    return names, pooled, per_fold, replicate


def _surface_summary(d: CVData, pooled: dict) -> tuple[dict | None, dict]:
    """``(surface, not_available)`` of a segmentation summary: the per-patient surface metrics'
    unit, tolerance, convention and missing counts, or the note saying why there are none."""
    if d.group_surface is None:
        done = len(d.folds_done)
        if len(d.surface_missing_folds) == done:
            return None, {"hd95": HD95_NOTE}
        folds = ", ".join(f"fold_{f}" for f in d.surface_missing_folds)
        return None, {
            "hd95": f"HD95, ASSD and NSD per patient volume are not reported: {folds} of the "
            f"{done} finished folds have no {GROUPS_FILE} (written by an older medseg); a mix "
            "of conventions is never reported."
        }
    surface = {
        "unit": d.surface_unit,
        "nsd_tolerance": d.nsd_tolerance,
        "resolution": MODEL_RESOLUTION,
        "convention": CONVENTION,
        **{f"{m}_missing": pooled[f"{m}_missing"] for m in ("hd95", "assd", "nsd")},
    }
    return surface, {}


def _classification_summary(d: CVData, pooled: dict, blocks: dict) -> dict:
    """The classification-only entries: classes, per-class blocks, confusion, calibration."""
    from sklearn.metrics import confusion_matrix

    labels = list(range(len(d.class_names)))
    return {
        "class_names": d.class_names,
        "per_class": {
            c: {
                **{m: blocks[f"{m}/{c}"] for m in PER_CLASS_METRICS},
                "support": pooled[f"support/{c}"],
            }
            for c in d.class_names
        },
        "confusion_matrix": confusion_matrix(d.target, d.pred, labels=labels).tolist(),
        "calibration": {
            "n_bins": ECE_BINS,
            "confidence": "max class probability",
            "bins": calibration_bins(d.probs.max(axis=1), (d.pred == d.target).astype(float))[1],
        },
        "not_available": {},
    }


def _crossing_warnings(d: CVData) -> list[str]:
    """A warning when some group has OOF rows in more than one fold."""
    folds_of: dict[int, set[int]] = {}
    for g, f in zip(d.gidx.tolist(), d.fold.tolist(), strict=True):
        folds_of.setdefault(g, set()).add(f)
    crossing = sum(len(v) > 1 for v in folds_of.values())
    if not crossing:
        return []
    return [
        f"{crossing} patient(s)/group(s) have out-of-fold rows in more than one fold: the "
        "folds were not split by group, so the fold models saw some of their own "
        "validation patients"
    ]


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
        for segmentation ``n_images_nonempty`` and ``surface`` (unit, NSD tolerance, convention
        and the number of patients without each per-patient surface metric; ``None``, with a
        ``not_available`` note, for runs whose folds have no ``oof_groups.csv``).

    Raises:
        DataError: a finished fold's ``oof.csv`` is missing or malformed (the message names it).
    """
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    d = load_cv(run_dir)
    seg = d.task == "segmentation"
    names, pooled, per_fold, replicate = _estimates(d)
    boot: dict[str, list] = {m: [] for m in names}
    for mult in group_resamples(len(d.groups), n_boot, seed):
        rep = replicate(mult[d.gidx].astype(float), mult)
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
        "n_samples": len(d.rows),
        "n_groups": len(d.groups),
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
        summary["surface"], summary["not_available"] = _surface_summary(d, pooled)
    else:
        summary.update(_classification_summary(d, pooled, blocks))
    summary["warnings"] = _crossing_warnings(d) + _metrics_json_warnings(d, per_fold)
    test = read_json(d.root / "test_metrics.json", missing_ok=True)
    summary["test"] = None if test is None else _strip_groups(test)
    return summary
