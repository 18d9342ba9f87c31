"""Score an exported model, a CV ensemble or a run on any labelled folder (``medseg evaluate
MODEL --data FOLDER --out DIR``).

The model is used exactly as it is served (:class:`medseg.inference.predictor.Predictor`): raw
pixels in, the in-graph normalisation and resize, probabilities back at each image's own size.
So segmentation is scored at the images' native resolution against their own masks, not at the
model size.

The folder is read with the dataset scanners of :mod:`medseg.data.scan` in the layout recorded
with the model (exports from this version on), the one given, or the one detected. Groups
(patients, or near-duplicate groups of 2D class folders) are the bootstrap unit of the 95%
intervals, as in ``medseg cv``.

Segmentation post-processing (threshold, minimum lesion size, largest component) runs on each
patient's volume: the slices of one group in natural id order, components in 3D, as
``medseg tune`` chose them.

Written into ``--out`` (refused when it already holds a result, unless ``overwrite``)::

    cases.csv       one row per image: segmentation tp, fp, fn, true/pred pixels, Dice;
                    classification target, pred, p_<class>
    groups.csv      segmentation: one row per patient/group, its slices scored as one volume
                    (:func:`medseg.evaluation.patients.group_surface_rows`): Dice of the pooled
                    counts, hd95_px, assd_px, nsd_<t>px in pixels at the images' NATIVE
                    resolution (a patient whose slices differ in shape keeps them missing)
    metrics.json    the metrics with 95% bootstrap intervals, the model and the settings; the
                    per-patient surface means with ``surface`` saying their unit and convention
    plots/          segmentation: per-patient Dice; classification: confusion matrix, ROC,
                    reliability diagram
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medseg.data.pipeline import by_source, slice_order
from medseg.data.scan import detect_layout, scan_dataset
from medseg.data.volumes import reslice, stack_slices
from medseg.errors import ConfigError, DataError, RunExistsError
from medseg.evaluation.evaluate import (
    classification_metrics,
    headline,
    label_maps,
    segmentation_row,
    surface_metrics,
    write_cases,
)
from medseg.evaluation.patients import (
    NATIVE_RESOLUTION,
    SURFACE_KEYS,
    group_surface_rows,
    patient_volumes,
    surface_values,
)
from medseg.evaluation.plots import plot_confusion, plot_group_dice, plot_reliability, plot_roc
from medseg.evaluation.stats import (
    CI_LEVEL,
    bootstrap_interval,
    calibration_bins,
    group_surface_means,
)
from medseg.inference.postprocess import postprocess
from medseg.inference.predictor import Predictor, check_same_outputs
from medseg.io import read_image, read_mask, to_channels
from medseg.models.ensemble import mean_probabilities
from medseg.models.metrics import dice_from_counts
from medseg.utils import atomic_write_json

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Loaded:
    """Raw images (native size, the model's channels) and their truth, in sample order."""

    images: list[np.ndarray]
    truth: list  # label maps [H, W] or class indices
    samples: list


#: Reader threads of ``evaluate --data``: decoding and file reads release the GIL in part.
READERS = 2


def _read_source(samples: list, idx: list[int], task: str, channels: int, slice_axis: int):
    """The images and truth of the samples ``idx`` of one source file (their indices too)."""
    image_path = samples[idx[0]].image
    target_path = samples[idx[0]].target if task == "segmentation" else None
    image = to_channels(read_image(image_path, channels=channels).array, channels)
    mask = read_mask(target_path) if task == "segmentation" else None
    if mask is not None and mask.shape != image.shape[:-1]:
        raise DataError(
            f"{target_path}: mask shape {mask.shape} does not match its image {image_path} "
            f"of shape {image.shape[:-1]}"
        )
    if image.ndim == 4:
        image = reslice(image, slice_axis)
        mask = reslice(mask, slice_axis) if mask is not None else None
    images, truth = [], []
    for i in idx:
        s = samples[i]
        if image.ndim == 4:
            images.append(image[s.index])
            truth.append(mask[s.index] if mask is not None else int(s.target))
        else:
            images.append(image)
            truth.append(mask if mask is not None else int(s.target))
    return idx, images, truth


def _read_sources(samples: list, task: str, channels: int, slice_axis: int) -> Iterator[tuple]:
    """``(indices, images, truth)`` of each source file in :func:`by_source` order, read ahead by
    :data:`READERS` threads (at most ``4 * READERS`` files ahead of the consumer)."""
    groups = by_source(samples)
    ahead = 4 * READERS
    with ThreadPoolExecutor(READERS, thread_name_prefix="medseg-eval-read") as pool:
        pending: deque = deque()
        try:
            for idx in groups:
                pending.append(pool.submit(_read_source, samples, idx, task, channels, slice_axis))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def _read(
    samples: list, task: str, channels: int, slice_axis: int, context_slices: int = 0
) -> _Loaded:
    loaded = _Loaded([None] * len(samples), [None] * len(samples), samples)
    for idx, images, truth in _read_sources(samples, task, channels, slice_axis):
        for i, image, t in zip(idx, images, truth, strict=True):
            loaded.images[i], loaded.truth[i] = image, t
    if context_slices:
        _stack_context(loaded.images, samples, context_slices)
    return loaded


def _read_and_predict(
    predictor: Predictor, samples: list, task: str, batch: int, scorer: _PatientScorer | None = None
) -> tuple[_Loaded, list[np.ndarray], float]:
    """:func:`_read` and :func:`_predict` of a 2D model overlapped: each model call starts as
    soon as its images are read (the same calls, so the same probabilities). With a ``scorer``
    (segmentation) each image is dropped once predicted and the samples predicted are handed to
    it, which drops their probabilities and truth as it scores their patients."""
    loaded = _Loaded([None] * len(samples), [None] * len(samples), samples)
    key = (predictor.channels, predictor.card.get("slice_axis", 0))
    probs: list = [None] * len(samples)
    done, seconds = 0, 0.0
    for idx, images, truth in _read_sources(samples, task, *key):
        for i, image, t in zip(idx, images, truth, strict=True):
            loaded.images[i], loaded.truth[i] = image, t
        while (end := _batch_end(loaded.images, done, batch)) is not None:
            t0 = time.perf_counter()
            probs[done:end] = _call(predictor, loaded.images[done:end])
            seconds += time.perf_counter() - t0
            if scorer is not None:
                loaded.images[done:end] = [_PREDICTED] * (end - done)
                scorer.predicted(range(done, end), probs, loaded.truth)
            done = end
    return loaded, probs, seconds


#: Stands for an image the model has predicted and that was dropped (not None: that is an
#: image not read yet, for :func:`_batch_end`).
_PREDICTED = np.zeros((0,), np.float32)


def _batch_end(images: list, i: int, batch: int) -> int | None:
    """The end of the model call that starts at image ``i`` (consecutive images of one shape,
    at most ``batch``), or None while the images that decide it are not read yet."""
    if i >= len(images) or images[i] is None:
        return None
    j = i + 1
    while j < len(images) and j - i < batch:
        if images[j] is None:
            return None
        if images[j].shape != images[i].shape:
            break
        j += 1
    return j


def _call(predictor: Predictor, images: list[np.ndarray]) -> list[np.ndarray]:
    return list(predictor(np.stack(images).astype(np.float32, copy=False))["probabilities"])


def _stack_context(images: list[np.ndarray], samples: list, k: int) -> None:
    """Replace each slice in ``images`` by its 2.5D stack (``data.context_slices`` = ``k``)."""
    for order in slice_order(samples):
        shapes = {images[i].shape for i in order}
        if len(shapes) > 1:
            raise DataError(
                f"{samples[order[0]].image}: the slices of one volume differ in shape "
                f"{sorted(shapes)}; a 2.5D model needs equal neighbouring slices"
            )
        stacked = stack_slices(np.stack([images[i] for i in order]), k)
        for j, i in enumerate(order):
            images[i] = stacked[j]


def _predict(predictor: Predictor, images: list[np.ndarray], batch: int) -> list[np.ndarray]:
    """Probabilities of each image; consecutive images of one shape share a model call."""
    out: list = []
    while len(out) < len(images):
        out.extend(_call(predictor, images[len(out) : _batch_end(images, len(out), batch)]))
    return out


def _patient_masks(
    probs: list[np.ndarray], threshold: float, min_lesion_voxels: int, largest_component: bool
) -> list[np.ndarray]:
    """Label maps of one patient's slices (in slice order), post-processed as its volume (per
    slice where its slices differ in shape)."""
    masks = [label_maps(p, threshold) for p in probs]
    if not (min_lesion_voxels > 1 or largest_component):
        return masks
    if len({m.shape for m in masks}) == 1:
        vol = postprocess(
            np.stack(masks), min_size_voxels=min_lesion_voxels, largest_component=largest_component
        )
        return list(vol)
    return [  # slices of different sizes: 2D
        postprocess(m, min_size_voxels=min_lesion_voxels, largest_component=largest_component)
        for m in masks
    ]


def _score_patient(
    samples: list, idx: list[int], probs: list, truth: list, post: tuple, tolerance: float
) -> tuple[list[dict], dict]:
    """One patient's case rows (in the order of ``idx``, its slice order) and its patient row:
    ``probs`` and ``truth`` of its slices, ``post``: threshold, minimum lesion voxels and largest
    component; ``tolerance``: NSD tolerance (px at native resolution)."""
    masks = _patient_masks(probs, *post)
    rows = []
    for i, m, t in zip(idx, masks, truth, strict=True):
        row = segmentation_row(samples[i].id, samples[i].group, m, t)
        row["dice"] = round(dice_from_counts(row["tp"], row["fp"], row["fn"]), 6)
        rows.append(row)
    ids, groups = [samples[i].id for i in idx], [samples[i].group for i in idx]
    truth = [np.asarray(t) > 0 for t in truth]
    (group_row,) = group_surface_rows(ids, groups, [m > 0 for m in masks], truth, tolerance)
    return rows, group_row


class _PatientScorer:
    """Scores each patient (:func:`_score_patient`) in a thread as soon as its slices have all
    been predicted, while the model goes on; its probabilities, images and truth are dropped."""

    def __init__(self, samples: list, post: tuple, tolerance: float):
        self.samples, self.post, self.tolerance = samples, post, tolerance
        self.volumes = patient_volumes([s.group for s in samples], [s.id for s in samples])
        self.left = {g: len(idx) for g, idx in self.volumes.items()}
        self.rows: list = [None] * len(samples)
        self.futures: list = []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="medseg-eval-score")

    def predicted(self, indices: range, probs: list, truth: list) -> None:
        """Samples ``indices`` have their probabilities: score the patients they complete."""
        for i in indices:
            g = self.samples[i].group
            self.left[g] -= 1
            if self.left[g]:
                continue
            idx = self.volumes[g]
            args = (self.samples, idx, [probs[k] for k in idx], [truth[k] for k in idx])
            future = self.pool.submit(_score_patient, *args, self.post, self.tolerance)
            self.futures.append((idx, future))
            for k in idx:
                probs[k] = truth[k] = None

    def close(self) -> None:
        """Stop scoring (on an error): the patient being scored finishes, no other starts."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def result(self) -> tuple[list[dict], list[dict]]:
        """The case rows in sample order and the patient rows in group order."""
        group_rows = []
        try:
            for idx, future in self.futures:
                rows, group_row = future.result()
                group_rows.append(group_row)
                for i, row in zip(idx, rows, strict=True):
                    self.rows[i] = row
        finally:
            self.close()
        return self.rows, sorted(group_rows, key=lambda r: r["group"])


def _segmentation_metrics(
    rows: list[dict], group_rows: list[dict], tolerance: float, n_boot: int, seed: int
) -> dict:
    """The metrics of a segmentation model from its case and patient rows."""
    counts = np.array([[r["tp"], r["fp"], r["fn"]] for r in group_rows], np.int64)
    per_group = np.array([r["dice"] for r in group_rows])
    n = len(group_rows)

    def pooled(mult):
        tp, fp, fn = mult @ counts
        return dice_from_counts(tp, fp, fn)

    nonempty = [r["dice"] for r in rows if r["true_pixels"] > 0]
    metrics = {
        "n_images": len(rows),
        "n_groups": n,
        "dice_per_group_mean": float(per_group.mean()),
        "dice_per_group_mean_ci95": bootstrap_interval(
            lambda m: float(np.average(per_group, weights=m)), n, n_boot, seed
        ),
        "dice_per_group_median": float(np.median(per_group)),
        "dice": pooled(np.ones(n)),
        "dice_ci95": bootstrap_interval(pooled, n, n_boot, seed),
        "dice_per_image_mean_nonempty": float(np.mean(nonempty)) if nonempty else None,
        "per_group_dice": [float(v) for v in per_group],
        **surface_metrics(group_rows, tolerance, NATIVE_RESOLUTION),
    }
    values = surface_values(group_rows, tolerance)
    for key in SURFACE_KEYS:
        metrics[f"{key}_ci95"] = bootstrap_interval(
            lambda m, key=key: group_surface_means(values, m)[key], n, n_boot, seed
        )
    return metrics


def _classification(
    loaded: _Loaded, probs: np.ndarray, class_names: list[str], n_boot: int, seed: int
) -> tuple[dict, list[dict]]:
    targets = np.array(loaded.truth, dtype=np.int64)
    metrics = classification_metrics(probs, targets, class_names)
    names = metrics["class_names"]
    samples = loaded.samples
    groups = sorted({s.group for s in samples})
    index = {g: k for k, g in enumerate(groups)}
    gidx = np.array([index[s.group] for s in samples], dtype=np.int64)
    pred = probs.argmax(-1)
    correct = (pred == targets).astype(float)

    def accuracy(mult):
        w = mult[gidx]
        return float(np.average(correct, weights=w))

    def macro_f1(mult):
        from sklearn.metrics import f1_score

        w = mult[gidx]
        return float(
            f1_score(
                targets,
                pred,
                labels=list(range(len(names))),
                average="macro",
                sample_weight=w,
                zero_division=0,
            )
        )

    metrics["n_groups"] = len(groups)
    metrics["accuracy_ci95"] = bootstrap_interval(accuracy, len(groups), n_boot, seed)
    metrics["macro_f1_ci95"] = bootstrap_interval(macro_f1, len(groups), n_boot, seed)
    conf, bins = calibration_bins(probs.max(axis=1), correct)
    metrics["ece"] = float(conf)
    metrics["calibration_bins"] = bins
    rows = [
        {
            "id": s.id,
            "group": s.group,
            "target": int(t),
            "pred": int(p.argmax()),
            **{f"p_{n}": round(float(v), 6) for n, v in zip(names, p, strict=True)},
        }
        for s, t, p in zip(samples, targets, probs, strict=True)
    ]
    return metrics, rows


def evaluate_model(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    layout: str | None = None,
    checkpoint: str = "best",
    tta: bool = False,
    threshold: float | None = None,
    min_lesion_voxels: int = 0,
    largest_component: bool = False,
    batch_size: int = 8,
    overwrite: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    ensemble_with: list[str | Path] | tuple = (),
    tolerance_mm: float = 1.0,
) -> dict:
    """Score ``model`` on every labelled sample of the dataset folder ``data``.

    Args:
        model: an export folder (``saved_model/`` + ``medseg.json``), a ``medseg cv`` run folder
            (the mean-probability ensemble of its folds) or a run folder.
        data: a labelled dataset folder in one of medseg's layouts.
        out: folder for ``cases.csv``, ``groups.csv``, ``metrics.json`` and ``plots/``.
        layout: the folder's layout (default: the one recorded with the model, else detected).
        checkpoint: ``best`` or ``last`` checkpoints (run and CV folders).
        tta: mean with the horizontal flip (run and CV folders; an export has it or not).
        threshold: foreground probability threshold (default: the model's).
        min_lesion_voxels, largest_component: post-processing of each patient's volume.
        batch_size: images per model call.
        overwrite: replace an earlier result in ``out``.
        n_boot, seed: bootstrap of the 95% intervals (groups resampled).
        ensemble_with: more models of the same task and outputs (exports, runs, CV folders;
            e.g. another recipe, with other input channels or 2.5D input): the scores are those
            of the mean of all the models' probabilities, each model fed as it is served.
        tolerance_mm: NSD tolerance of the per-patient surface metrics; in pixels, since the
            masks are scored at the images' native resolution without a spacing.

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        RunExistsError: ``out`` holds a result and ``overwrite`` is false.
        DataError: the folder has no labelled samples, or its classes differ from the model's.
        ModelError: the model cannot be loaded.
    """
    out = Path(out)
    if (out / "metrics.json").exists() and not overwrite:
        raise RunExistsError(f"{out}: already holds an evaluation (metrics.json); use --overwrite")
    predictor = Predictor(model, checkpoint=checkpoint, tta=tta)
    members = [Predictor(m, checkpoint=checkpoint, tta=tta) for m in ensemble_with]
    check_same_outputs([predictor, *members])
    task = predictor.task
    check_options(task, threshold, min_lesion_voxels, largest_component)
    layout = layout or predictor.card.get("layout") or detect_layout(data)
    scan = scan_dataset(data, layout)
    scan.log_problems()
    samples = _labelled_samples(scan, data, layout, predictor)
    threshold = predictor.card.get("threshold", 0.5) if threshold is None else threshold
    predictors = [predictor, *members]
    if task == "segmentation":
        post = (threshold, min_lesion_voxels, largest_component)
        metrics, rows, seconds = _score_segmentation(
            out, predictors, samples, batch_size, post, tolerance_mm, n_boot, seed
        )
    else:
        loaded, probs, seconds = _ensemble_probabilities(predictors, samples, batch_size)
        metrics, rows = _score_classification(out, loaded, probs, predictor.classes, n_boot, seed)
    write_cases(out / "cases.csv", rows)
    metrics.update(
        model=str(model),
        ensemble_with=[str(m) for m in ensemble_with],
        data=str(data),
        layout=layout,
        task=task,
        settings={
            "checkpoint": checkpoint,
            "tta": bool(tta or (predictor.card.get("tta") or {}).get("enabled")),
            "threshold": threshold,
            "min_lesion_voxels": min_lesion_voxels,
            "largest_component": largest_component,
        },
        n_skipped=len(scan.samples) - len(samples),
        inference_img_s=len(rows) / max(seconds, 1e-9),
        bootstrap={"n_boot": n_boot, "seed": seed, "unit": "group", "level": CI_LEVEL},
    )
    atomic_write_json(out / "metrics.json", metrics)
    logger.info("%s on %s: %s", Path(model).name, data, headline(metrics))
    return metrics


def _labelled_samples(scan, data: str | Path, layout: str, predictor: Predictor) -> list:
    """The scanned samples with a target, checked against the model's task and classes."""
    samples = [s for s in scan.samples if s.target is not None]
    if not samples:
        raise DataError(f"{data}: no labelled samples in layout '{layout}'")
    if predictor.task == "classification":
        if predictor.classes and scan.class_names != predictor.classes:
            raise DataError(
                f"{data}: class folders {scan.class_names} differ from the model's classes "
                f"{predictor.classes}"
            )
    elif layout == "class_folders":
        raise DataError(f"{data}: a class-folder dataset cannot score a segmentation model")
    return samples


def _streamable(predictors: list[Predictor]) -> bool:
    """Whether the images can be predicted as they are read (:func:`_read_and_predict`): one
    model fed whole slices; an ensemble or a 2.5D model needs the whole folder first."""
    return len(predictors) == 1 and not predictors[0].context_slices


def _ensemble_probabilities(
    predictors: list[Predictor], samples: list, batch_size: int
) -> tuple[_Loaded, list[np.ndarray], float]:
    """``(images read, probabilities of each image, seconds of inference)``: the mean of the
    predictors' probabilities, each predictor fed the images as it is served."""
    task = predictors[0].task
    if _streamable(predictors):
        return _read_and_predict(predictors[0], samples, task, batch_size)
    seconds = 0.0
    all_probs, reads = [], {}
    for p in predictors:
        key = (p.channels, p.card.get("slice_axis", 0), p.context_slices)
        if key not in reads:  # models fed alike share one read of the folder
            reads[key] = _read(samples, task, *key)
        loaded = reads[key]
        t0 = time.perf_counter()
        all_probs.append(_predict(p, loaded.images, batch_size))
        seconds += time.perf_counter() - t0
    probs = all_probs[0]
    if len(predictors) > 1:
        probs = [mean_probabilities(ps) for ps in zip(*all_probs, strict=True)]
    return loaded, probs, seconds


def _score_segmentation(
    out: Path,
    predictors: list[Predictor],
    samples: list,
    batch: int,
    post: tuple,
    tolerance: float,
    n_boot: int,
    seed: int,
) -> tuple[dict, list[dict], float]:
    """The metrics and case rows of a segmentation model, and the seconds in the model; writes
    ``groups.csv`` and its plot.

    One model fed whole 2D slices is streamed: reader threads ahead of the model
    (:func:`_read_and_predict`) and each patient scored in a thread once its slices are
    predicted (:class:`_PatientScorer`), so memory holds the images read ahead and the
    probabilities of the patients not yet complete, not the whole folder. An ensemble or a 2.5D
    model reads the whole folder first (:func:`_ensemble_probabilities`) and is scored by the
    same per-patient code. ``post``: threshold, minimum lesion voxels and largest component;
    ``tolerance``: NSD tolerance in pixels.
    """
    scorer = _PatientScorer(samples, post, tolerance)
    try:
        if _streamable(predictors):
            _, _, seconds = _read_and_predict(predictors[0], samples, "segmentation", batch, scorer)
        else:
            loaded, probs, seconds = _ensemble_probabilities(predictors, samples, batch)
            scorer.predicted(range(len(samples)), list(probs), list(loaded.truth))
    except BaseException:
        scorer.close()
        raise
    rows, group_rows = scorer.result()
    metrics = _segmentation_metrics(rows, group_rows, tolerance, n_boot, seed)
    write_cases(out / "groups.csv", group_rows)
    plot_group_dice({1: np.array(metrics["per_group_dice"])}, out / "plots" / "group_dice.png")
    return metrics, rows, seconds


def _score_classification(
    out: Path,
    loaded: _Loaded,
    probs: list[np.ndarray],
    class_names: list[str],
    n_boot: int,
    seed: int,
) -> tuple[dict, list[dict]]:
    """Metrics and cases of a classifier; writes its confusion, ROC and reliability plots."""
    plots = out / "plots"
    p = np.stack(probs).astype(np.float32)
    metrics, rows = _classification(loaded, p, class_names, n_boot, seed)
    names = metrics["class_names"]
    plot_confusion(np.array(metrics["confusion_matrix"]), names, plots / "confusion.png")
    plot_roc(p, np.array(loaded.truth), names, plots / "roc.png")
    plot_reliability(metrics["calibration_bins"], metrics["ece"], plots / "reliability.png")
    return metrics, rows


def check_options(task: str, threshold: float | None, min_lesion: int, lcc: bool) -> None:
    """Refuse segmentation-only options for a classifier."""
    if task == "classification" and (threshold is not None or min_lesion or lcc):
        raise ConfigError(
            "--threshold, --min-lesion-voxels and --largest-component apply to segmentation "
            "models only"
        )
