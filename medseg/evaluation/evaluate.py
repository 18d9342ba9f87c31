"""Evaluation of a trained run on one split of its manifest (``medseg evaluate``)."""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from pathlib import Path

import keras
import numpy as np
from sklearn.metrics import (
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    roc_auc_score,
)

from medseg.artifacts.runs import RunDir, check_model_fits, load_run_model, open_run
from medseg.config import Config
from medseg.data.overlay import overlay
from medseg.data.pipeline import ArrayData, load_arrays
from medseg.data.samples import Sample
from medseg.data.scan import scan_from_config
from medseg.data.split import check_manifest_files, load_manifest, select
from medseg.errors import DataError
from medseg.evaluation.patients import (
    MODEL_RESOLUTION,
    group_surface_rows,
    surface_description,
    surface_values,
)
from medseg.evaluation.plots import plot_confusion, plot_overlays, plot_roc
from medseg.evaluation.stats import group_surface_means
from medseg.models import build_model as _register_models  # noqa: F401  (custom objects)
from medseg.models.metrics import confusion_counts, segmentation_report
from medseg.utils import (
    atomic_write_json,
    atomic_write_text,
    csv_text,
    safe_name,
    spreadsheet_unquote,
)

logger = logging.getLogger(__name__)


def _folder_samples(cfg, folder: str | Path, class_names: list[str]):
    """All samples of another dataset folder, read with the run's data settings."""
    data_cfg = dataclasses.replace(cfg.data, root=str(folder))
    scan = scan_from_config(data_cfg)
    scan.log_problems()
    if cfg.data.task == "classification" and scan.class_names != class_names:
        raise DataError(
            f"{folder}: class folders {scan.class_names} differ from the run's classes "
            f"{class_names}"
        )
    return scan.samples


def evaluate(
    run_dir: str | Path,
    split: str = "val",
    checkpoint: str = "best",
    threshold: float | None = None,
    data: str | Path | None = None,
) -> dict:
    """Evaluate a run's model on ``split`` of its manifest (or on another dataset folder) and
    record the result in ``metrics.json``.

    Loads what :func:`evaluate_arrays` needs (the run's config and manifest, the split's
    samples, the checkpoint) and lets it score and record.

    Args:
        run_dir: the run folder.
        split: ``train``, ``val`` or ``test``.
        checkpoint: ``best`` or ``last``.
        threshold: foreground probability threshold; default ``predict.threshold`` of the run.
        data: a dataset folder in the run's layout to evaluate on instead of a split (every
            sample of it); recorded as ``folder:<name>``.

    Returns:
        The metrics (segmentation: Dice, IoU, per-image and per-patient Dice, per class for
        label maps; classification: accuracy, macro F1, per-class precision/recall/F1 and
        ROC AUC, confusion matrix).
    """
    run = open_run(run_dir)
    cfg = run.config()
    manifest = load_manifest(run.splits_path)
    class_names = manifest.get("class_names", [])
    if data is not None:
        samples = _folder_samples(cfg, data, class_names)
        split = f"folder:{Path(data).name}"
    else:
        samples = _split_samples(cfg, manifest, split)
    if not samples:
        raise DataError(f"{run.splits_path}: split '{split}' is empty")
    model = load_run_model(run, checkpoint)
    check_model_fits(model, cfg, run.best_model if checkpoint == "best" else run.last_model)
    arrays = load_arrays(samples, cfg.data, model.output_shape[-1])
    return evaluate_arrays(
        run,
        cfg,
        model,
        arrays,
        split=split,
        checkpoint=checkpoint,
        class_names=class_names,
        threshold=threshold,
    )


def _split_samples(cfg: Config, manifest: dict, split: str) -> list[Sample]:
    """The samples of ``split`` in today's scan of the run's dataset; warns about files that
    changed since the split was made."""
    scan = scan_from_config(cfg.data)
    scan.log_problems()
    samples = select(scan.samples, manifest, split)
    changed = check_manifest_files(samples, manifest)
    if changed:
        logger.warning(
            "%d files of split '%s' changed since the split was made, e.g. %s",
            len(changed),
            split,
            changed[0],
        )
    return samples


def evaluate_arrays(
    run: RunDir,
    cfg: Config,
    model: keras.Model,
    data: ArrayData,
    *,
    split: str = "val",
    checkpoint: str = "best",
    class_names: list[str] | None = None,
    threshold: float | None = None,
) -> dict:
    """Score ``model`` on decoded samples and record the result in the run, as :func:`evaluate`
    does: ``metrics.json[split]``, ``cases_<split>.csv``, for segmentation ``groups_<split>.csv``
    (one row per patient volume, :func:`medseg.evaluation.patients.group_surface_rows`) and the
    plots of the split.

    Training calls this with what it holds (its config, run folder, validation arrays and the
    chosen checkpoint's model) instead of reading them all back.

    Args:
        run: the run folder the results go to.
        cfg: the run's config (task, ``predict.threshold`` and ``predict.batch_size``).
        model: the model to score, holding the weights of ``checkpoint``.
        data: the decoded, preprocessed samples (:func:`medseg.data.pipeline.load_arrays`).
        split: the name the result is recorded under.
        checkpoint: ``best`` or ``last``: which checkpoint ``model`` holds (recorded).
        class_names: the run's classes (from its manifest); classification only.
        threshold: foreground probability threshold; default ``predict.threshold``.

    Returns:
        The metrics, as :func:`evaluate` returns them.
    """
    threshold = cfg.predict.threshold if threshold is None else threshold
    tag = safe_name(split)
    t0 = time.perf_counter()
    probs = model.predict(data.images, batch_size=cfg.predict.batch_size, verbose=0)
    seconds = time.perf_counter() - t0
    result, cases, group_rows = score(
        probs,
        data,
        cfg.data.task,
        threshold,
        list(class_names or []),
        tolerance=cfg.evaluation.nsd_tolerance_mm,
    )
    write_cases(run.path / f"cases_{tag}.csv", cases)
    if group_rows:
        write_cases(run.path / f"groups_{tag}.csv", group_rows)
    if cfg.data.task == "classification":
        plot_confusion(
            np.array(result["confusion_matrix"]),
            result["class_names"],
            run.plots / f"confusion_{tag}.png",
        )
        plot_roc(probs, data.targets, result["class_names"], run.plots / f"roc_{tag}.png")
    else:
        _overlay_grid(data, label_maps(probs, threshold) > 0, run.plots / f"overlays_{tag}.png")
    result.update(
        split=split,
        checkpoint=checkpoint,
        n_skipped=len(data.problems),
        inference_img_s=len(data.images) / max(seconds, 1e-9),
    )
    metrics = run.metrics()
    metrics[split] = result
    atomic_write_json(run.metrics_path, metrics)
    logger.info("%s on %s: %s", run.path.name, split, headline(result))
    return result


def label_maps(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Label maps from segmentation probabilities ([..., K]: threshold for one channel, else
    argmax), as uint8."""
    if probs.shape[-1] == 1:
        return (probs[..., 0] > threshold).astype(np.uint8)
    return probs.argmax(-1).astype(np.uint8)


def score(
    probs: np.ndarray,
    data: ArrayData,
    task: str,
    threshold: float,
    class_names: list[str],
    tolerance: float = 1.0,
) -> tuple[dict, list[dict], list[dict]]:
    """Metrics of predictions ``probs`` on ``data``, one row per case and one per patient.

    The case rows (written as ``cases_<split>.csv``, and as ``oof.csv`` by cross-validation)
    carry what the summary numbers are computed from: for segmentation the pixel counts ``tp``,
    ``fp``, ``fn``, ``true_pixels``, ``pred_pixels`` of each image's thresholded mask (foreground
    = any label > 0); for classification ``target``, ``pred`` and ``p_<class>``.

    Segmentation also gives one row per patient (``groups_<split>.csv``, ``oof_groups.csv``):
    its slices stacked in natural order and scored as one volume
    (:func:`medseg.evaluation.patients.group_surface_rows`: ``hd95_px``, ``assd_px``,
    ``nsd_<tolerance>px`` in pixels at the model's input size), summarised in the metrics as
    ``hd95_per_group_mean``, ``assd_per_group_mean``, ``nsd_per_group_mean`` (patients without
    a value left out and counted in ``<m>_missing``), ``surface_unit``, ``nsd_tolerance`` and
    ``surface`` (what they mean). Classification has no patient rows (``[]``).

    Args:
        probs: Model outputs, ``[N, H, W, K]`` (segmentation) or ``[N, K]``.
        data: The scored samples and their targets.
        task: ``segmentation`` or ``classification``.
        threshold: Foreground probability threshold (one-channel segmentation).
        class_names: The run's classes (classification).
        tolerance: NSD tolerance in pixels (``evaluation.nsd_tolerance_mm``).
    """
    ids = [(s.id, s.group) for s in data.samples]
    if task == "classification":
        result = classification_metrics(probs, data.targets, class_names)
        names = result["class_names"]
        rows = [
            {
                "id": i,
                "group": g,
                "target": int(t),
                "pred": int(p.argmax()),
                **{f"p_{n}": round(float(v), 6) for n, v in zip(names, p, strict=True)},
            }
            for (i, g), t, p in zip(ids, data.targets, probs, strict=True)
        ]
        return result, rows, []
    labels = label_maps(probs, threshold)
    pred, truth = labels > 0, data.targets > 0
    result = segmentation_report(pred, truth, [g for _, g in ids])
    result["threshold"] = threshold
    if probs.shape[-1] >= 2:
        result["per_class"] = {
            str(k): segmentation_report(labels == k, data.targets == k)
            for k in range(1, probs.shape[-1])
        }
    rows = [segmentation_row(i, g, p, t) for (i, g), p, t in zip(ids, pred, truth, strict=True)]
    group_rows = group_surface_rows(
        [i for i, _ in ids], [g for _, g in ids], pred, truth, tolerance
    )
    result.update(surface_metrics(group_rows, tolerance, MODEL_RESOLUTION))
    return result, rows, group_rows


def surface_metrics(group_rows: list[dict], tolerance: float, resolution: str) -> dict:
    """The per-patient surface metrics' means over patients (each counted once), with their
    unit, tolerance and description, from :func:`group_surface_rows` rows."""
    means = group_surface_means(surface_values(group_rows, tolerance), np.ones(len(group_rows)))
    description = surface_description(tolerance, resolution)
    return {
        **means,
        "surface_unit": description["unit"],
        "nsd_tolerance": description["nsd_tolerance"],
        "surface": description,
    }


def segmentation_row(sample_id: str, group: str, pred: np.ndarray, truth: np.ndarray) -> dict:
    """One per-case row of a segmentation: pixel counts of the binary masks ``pred`` and
    ``truth`` (``tp``, ``fp``, ``fn``, ``true_pixels``, ``pred_pixels``). Surface distances are
    per patient volume (:func:`medseg.evaluation.patients.group_surface_rows`), not per slice."""
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    tp, fp, fn = confusion_counts(pred, truth)
    return {
        "id": sample_id,
        "group": group,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "true_pixels": int(truth.sum()),
        "pred_pixels": int(pred.sum()),
    }


def write_cases(path: Path, rows: list[dict], extra: dict | None = None) -> Path:
    """Write per-case rows as CSV (atomically), with ``extra`` columns added to every row.

    Text cells go through :func:`medseg.utils.table_cell`: undecodable file-name bytes as
    backslash escapes, and a leading single quote on text that a spreadsheet would read as a
    formula (:func:`medseg.utils.spreadsheet_safe`); :func:`read_cases` removes the quote again.
    """
    rows = [{**r, **(extra or {})} for r in rows]
    return atomic_write_text(path, csv_text(list(rows[0]) if rows else ["id"], rows))


def read_cases(path: Path) -> list[dict]:
    """Rows of a per-case CSV written by :func:`write_cases` (values as strings, without the
    quote :func:`medseg.utils.spreadsheet_safe` put before formula-like text)."""
    with open(path, newline="") as f:
        return [
            {spreadsheet_unquote(k): spreadsheet_unquote(v) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


HEADLINE_KEYS = (
    "dice",
    "iou",
    "dice_per_image_mean_nonempty",
    "dice_per_group_mean",
    "dice_per_group_median",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "roc_auc_macro",
)


def headline(result: dict) -> str:
    """The main numbers of an evaluation as one line, e.g. ``dice=0.912, iou=0.838``."""
    return ", ".join(
        f"{k}={result[k]:.4f}" for k in HEADLINE_KEYS if isinstance(result.get(k), float)
    )


def classification_metrics(probs: np.ndarray, targets: np.ndarray, class_names: list) -> dict:
    pred = probs.argmax(-1)
    labels = list(range(probs.shape[-1]))
    names = class_names or [str(i) for i in labels]
    rep = classification_report(
        targets, pred, labels=labels, target_names=names, output_dict=True, zero_division=0
    )
    onehot = np.eye(probs.shape[-1])[targets]
    present = [k for k in labels if 0 < onehot[:, k].sum() < len(targets)]
    auc = {names[k]: float(roc_auc_score(onehot[:, k], probs[:, k])) for k in present}
    return {
        "n_images": len(targets),
        "accuracy": float(rep["accuracy"]),
        "balanced_accuracy": float(balanced_accuracy_score(targets, pred)),
        "roc_auc": auc,
        "roc_auc_macro": float(np.mean(list(auc.values()))) if auc else None,
        "macro_f1": float(rep["macro avg"]["f1-score"]),
        "per_class": {
            n: {k: float(rep[n][k]) for k in ("precision", "recall", "f1-score")} for n in names
        },
        "class_names": names,
        "confusion_matrix": confusion_matrix(targets, pred, labels=labels).tolist(),
        "predicted_classes": sorted({int(p) for p in pred}),
    }


def _overlay_grid(data, pred: np.ndarray, out: Path, n: int = 8) -> None:
    nonempty = [i for i in range(len(pred)) if data.targets[i].any()][: n // 2]
    rest = [i for i in range(len(pred)) if i not in nonempty][: n - len(nonempty)]
    images, titles = [], []
    for i in nonempty + rest:
        images.append(overlay(data.images[i], data.targets[i] > 0))
        titles.append(f"truth {i}")
        images.append(overlay(data.images[i], pred[i]))
        titles.append(f"prediction {i}")
    plot_overlays(images, titles, out)
