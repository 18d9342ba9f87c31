"""The work on one case of a batch prediction, the same for every executor.

:func:`run_case` reads a case, predicts it (:class:`~medseg.inference.predictor.BasePredictor`)
and writes its outputs into a hidden temporary folder that is renamed into ``<out>/<case-id>/``
when the case succeeds, so a failed or killed case leaves no partial folder; it returns the
case's row of ``predictions.csv``. A failed case is a row with ``status`` ``error``; a full disk
stops the batch (:class:`~medseg.errors.OutputError`).

:func:`resolve_options` drops the options that do not apply to a model and
:func:`prepare_model` builds what the options need before the first case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.overlay import overlay
from medseg.data.samples import natural_key
from medseg.data.volumes import context_indices, reslice, unreslice
from medseg.errors import DataError, MedsegError, OutputError
from medseg.inference.cases import Case, CaseReader, file_stem
from medseg.inference.explain import heatmap_overlay
from medseg.inference.postprocess import apply_threshold, postprocess
from medseg.inference.predictor import BasePredictor
from medseg.inference.uncertainty import (
    mc_dropout_model,
    mc_predict,
    predictive_entropy,
    segmentation_uncertainty,
    uncertainty_display,
)
from medseg.io import Image, image_suffix, read_image
from medseg.io.base import PLAIN_SUFFIXES, check_channels, small_image_problem
from medseg.io.writers import write_mask_nifti, write_mask_png, write_png, write_seg
from medseg.utils import disk_full_error, display_text, is_disk_full

logger = logging.getLogger(__name__)


@dataclass
class Options:
    """The options of a batch that change what is predicted and written for each case.

    Attributes:
        batch_size: images or volume slices per model call.
        overlays: write overlay PNGs.
        threshold: foreground threshold of binary segmentation models (None: the model's).
        largest_component: keep the largest connected foreground component only.
        min_lesion_voxels: remove smaller connected foreground components.
        mc_samples: MC-dropout passes per case (0: off).
        explain: write a Grad-CAM of classifiers.
    """

    batch_size: int
    overlays: bool
    threshold: float | None
    largest_component: bool
    min_lesion_voxels: int
    mc_samples: int = 0
    explain: bool = False


@dataclass
class Clock:
    """Slices that went through the model and the seconds spent in model calls."""

    slices: int = 0
    seconds: float = 0.0


@dataclass
class _Work:
    """One case being predicted: its image, cut as the model takes it, and where it goes."""

    predictor: BasePredictor
    case: Case
    image: Image
    case_dir: Path
    opts: Options
    clock: Clock
    source: np.ndarray  # [slices, H, W, C] in the source geometry
    axis: int  # the slice axis of a volume (data.slice_axis); 0 for a 2D image


def call_model(predictor: BasePredictor, images: np.ndarray, clock: Clock) -> dict:
    """One model call on ``images`` (:meth:`BasePredictor.model_input`), counting them and the
    seconds in the model on ``clock``."""
    t0 = time.perf_counter()
    out = predictor(images)
    clock.seconds += time.perf_counter() - t0
    clock.slices += len(images)
    return out


def run_model(
    predictor: BasePredictor, images: np.ndarray, step: int, clock: Clock
) -> Iterator[dict]:
    """Yield the model outputs for ``images``, ``step`` images per call (:func:`call_model`)."""
    for i in range(0, len(images), step):
        yield call_model(predictor, images[i : i + step], clock)


def _folder_slices(folder: Path) -> list[Path]:
    """The 2D image files (PNG, JPEG, TIFF, BMP; no ``*_mask.*``) of ``folder`` in natural
    file-name order: the slices of one volume for a 2.5D model."""
    files = [
        p
        for p in folder.iterdir()
        if not p.name.startswith(".")
        and image_suffix(p) in PLAIN_SUFFIXES
        and not file_stem(p).endswith("_mask")
        and p.is_file()
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def _context_input(predictor: BasePredictor, image: Image, case: Case) -> np.ndarray:
    """The 2.5D model input ``[1, H, W, C * (2k + 1)]`` of a 2D image: the image with its
    ``k`` neighbours on each side among the slices of its folder (:func:`_folder_slices`),
    stacked as in training (edges repeated)."""
    k = predictor.context_slices
    path = case.paths[0]
    slices = _folder_slices(path.parent) if image_suffix(path) in PLAIN_SUFFIXES else []
    names = [p.name for p in slices]
    if path.name not in names or len(slices) < 2 * k + 1:
        raise DataError(
            f"{case.source}: a 2D image, but the model takes {2 * k + 1} neighbouring slices "
            f"(data.context_slices={k}) and its folder holds {len(slices)} 2D slice file(s); "
            "give it a volume (NIfTI file, DICOM series) or a folder of a volume's slices "
            "(PNG/TIFF, one volume per folder, in file-name order)"
        )
    raw = []
    for i in context_indices(len(slices), k)[names.index(path.name)]:
        other = slices[i]
        array = image.array if other.name == path.name else read_image(other).array
        if array.shape != image.array.shape:
            raise DataError(
                f"{other}: shape {array.shape} differs from its neighbouring slice "
                f"{case.source} {image.array.shape}; a 2.5D model needs equal slices"
            )
        raw.append(array)
    return predictor.model_input(np.stack(raw))[k : k + 1]


def _prepare(
    predictor: BasePredictor, image: Image, case: Case, opts: Options, clock: Clock, row: dict
) -> tuple[_Work, np.ndarray, np.ndarray]:
    """Check a read case and cut it as the model takes it: its work, model input and volume
    (the source cut along the slice axis); adds the shape columns to ``row``."""
    check_model_input(predictor, image, case.source)
    source = image.array if image.is_volume else image.array[np.newaxis]
    row.update(slices=len(source), height=source.shape[1], width=source.shape[2])
    # a volume is cut along the model's data.slice_axis, as in training; masks go back
    axis = int(predictor.card.get("slice_axis") or 0) if image.is_volume else 0
    work = _Work(predictor, case, image, Path(), opts, clock, source, axis)
    volume = reslice(source, axis)
    if predictor.context_slices and not image.is_volume:
        images = _context_input(predictor, image, case)
    else:
        images = predictor.model_input(volume)
    return work, images, volume


def _finish(work: _Work, images: np.ndarray, volume: np.ndarray, parts: list[np.ndarray]) -> dict:
    """Post-process and write one predicted case into ``work.case_dir`` from ``parts`` (what
    :func:`output_part` kept of its model outputs, in slice order); the columns of its row."""
    opts, image, case_dir, source = work.opts, work.image, work.case_dir, work.source
    row: dict = {}
    if work.predictor.task == "classification":
        row.update(_classify(work, images, volume, parts))
        return row
    mask = _segment(work, parts)
    per_slice = (mask > 0).reshape(len(mask), -1).sum(axis=1)
    row.update(_write_segmentation(work, mask, per_slice))
    fg = int(per_slice.sum())
    k = int(per_slice.argmax()) if fg else len(mask) // 2
    if opts.overlays:
        write_png(case_dir / "overlay.png", overlay(source[k], mask[k]))
        if image.is_volume:
            row["overlay_slice"] = k
    if opts.mc_samples:
        row.update(_segmentation_uncertainty(work, images, mask, k))
    return row


def output_part(predictor: BasePredictor, opts: Options, out: dict) -> np.ndarray:
    """What a case keeps of a model output ``out`` (a batch, or the case's share of one): the
    class probabilities of a classifier; a segmentation's labels (uint8, int32 past 256 labels),
    thresholded at ``opts.threshold`` when it is set."""
    if predictor.task == "classification":
        return out["probabilities"]
    n_out = int(predictor.card.get("num_outputs", 1))
    if n_out == 1 and opts.threshold is not None:
        return apply_threshold(out["probabilities"], opts.threshold)
    return out["mask"].astype(np.uint8 if n_out <= 256 else np.int32)


def check_model_input(predictor: BasePredictor, image: Image, source: str) -> None:
    """Before a 2D (or 2.5D) model predicts ``image``: refuse volumes along a 4th dimension that
    the model does not take as its channels, and warn about an image too small to segment.

    The rule (:func:`medseg.io.base.check_channels`): the N volumes of a 4D NIfTI or of a DICOM
    series of N acquisitions are channels only when the model takes N channels and its card names
    them. A 2D model's channels are grey or colour, so it never takes such a file: without this
    check 3 volumes would be read as an RGB image and 2 would fail with a conversion error.
    An image smaller than :data:`~medseg.io.base.MIN_IMAGE_PIXELS` along a side is predicted
    (the model resizes it) with a warning.

    Raises:
        DataError: one line naming ``source``, its shape and what the model takes.
    """
    members = getattr(predictor, "members", None) or [predictor]
    names = predictor.card.get("channels")
    for channels in sorted({int(m.channels) for m in members}):
        check_channels(image, channels, names if isinstance(names, dict) else None, source=source)
    problem = small_image_problem(image, source=source)
    if problem:
        logger.warning("%s", display_text(problem))


def _mc_dropout(work: _Work, images: np.ndarray) -> dict:
    """``--mc-samples`` stochastic passes of the case's model (:func:`mc_predict`)."""
    predictor, opts = work.predictor, work.opts
    return mc_predict(
        predictor.keras_models(),
        images,
        opts.mc_samples,
        prep=predictor.preprocessing,
        batch_size=opts.batch_size,
    )


def _classify(work: _Work, images: np.ndarray, volume: np.ndarray, probs: list[np.ndarray]) -> dict:
    """A classifier's columns: the label, class and probabilities ``probs`` (a volume: the mean
    over its slices), and the uncertainty and Grad-CAM when asked for."""
    predictor, opts = work.predictor, work.opts
    mean = np.concatenate(probs).mean(axis=0)  # a volume: the mean over its slices
    names = predictor.classes or [str(i) for i in range(len(mean))]
    row: dict = {"label": int(mean.argmax()), "class": names[int(mean.argmax())]}
    row.update({f"p_{n}": round(float(p), 6) for n, p in zip(names, mean, strict=True)})
    if opts.mc_samples:
        r = _mc_dropout(work, images)
        row["uncertainty"] = round(float(predictive_entropy(r["mean"].mean(axis=0))), 6)
    if opts.explain:
        k = len(volume) // 2
        heat = predictor.gradcam()(
            images[k : k + 1], class_index=row["label"], prep=predictor.preprocessing
        )
        work.case_dir.mkdir(parents=True, exist_ok=True)
        write_png(work.case_dir / "gradcam.png", heatmap_overlay(volume[k], heat[0]))
        row["gradcam"] = f"{work.case.case_id}/gradcam.png"
    return row


def _segment(work: _Work, parts: list[np.ndarray]) -> np.ndarray:
    """The post-processed mask of a segmentation model in the source geometry, from its
    :func:`output_part` parts."""
    opts = work.opts
    n_out = int(work.predictor.card.get("num_outputs", 1))
    dtype = np.uint8 if n_out <= 256 else np.int32
    mask = unreslice(np.concatenate(parts).astype(dtype, copy=False), work.axis)
    if work.image.is_volume:
        return postprocess(
            mask,
            min_size_voxels=opts.min_lesion_voxels,
            largest_component=opts.largest_component,
        )
    mask[0] = postprocess(
        mask[0],
        min_size_voxels=opts.min_lesion_voxels,
        largest_component=opts.largest_component,
    )
    return mask


def _write_segmentation(work: _Work, mask: np.ndarray, per_slice: np.ndarray) -> dict:
    """Write the mask (and a DICOM series' SEG); the foreground and file columns."""
    image, case, case_dir = work.image, work.case, work.case_dir
    n_out = int(work.predictor.card.get("num_outputs", 1))
    fg = int(per_slice.sum())
    row: dict = {"foreground_pixels": fg, "foreground_fraction": round(fg / mask.size, 6)}
    spacing = image.meta.spacing
    case_dir.mkdir(parents=True, exist_ok=True)
    if not image.is_volume:
        if spacing:
            row["foreground_mm2"] = round(fg * float(np.prod(spacing)), 3)
        write_mask_png(case_dir / "mask.png", mask[0], n_out == 1)
        row["mask"] = f"{case.case_id}/mask.png"
        return row
    row["slices_with_foreground"] = int((per_slice > 0).sum())
    if spacing and len(spacing) == 3:
        row["foreground_ml"] = round(fg * float(np.prod(spacing)) / 1000.0, 4)
    row.update(
        write_volume_masks(case_dir, mask, image, case, _segment_names(work.predictor, n_out))
    )
    return row


def write_volume_masks(
    case_dir: Path, labels: np.ndarray, image: Image, case: Case, names: dict[int, str]
) -> dict:
    """Write a volume's label map as ``mask.nii.gz`` in the source geometry and, for a DICOM
    series, as ``seg.dcm`` (one segment per name); the row's ``mask_geometry``, ``mask`` and
    ``seg`` columns."""
    row = {"mask_geometry": write_mask_nifti(case_dir / "mask.nii.gz", labels, image.meta)}
    row["mask"] = f"{case.case_id}/mask.nii.gz"
    if case.kind == "series":
        write_seg(
            case_dir / "seg.dcm",
            labels,
            image.meta.source,
            segment_names=names,
            series_number=case.series_number,
        )
        row["seg"] = f"{case.case_id}/seg.dcm"
    return row


def _segmentation_uncertainty(work: _Work, images: np.ndarray, mask: np.ndarray, k: int) -> dict:
    """MC-dropout columns and maps of a segmentation: the mean variance over the predicted
    lesion, ``uncertainty.png`` of slice ``k`` and, for a volume, ``uncertainty.nii.gz``."""
    case = work.case
    r = _mc_dropout(work, images)
    variance = unreslice(r["variance_map"], work.axis)
    row: dict = {"uncertainty": round(float(segmentation_uncertainty(variance, mask > 0)), 6)}
    if work.image.is_volume:
        path = work.case_dir / "uncertainty.nii.gz"
        write_mask_nifti(path, variance, work.image.meta, continuous=True)
        row["uncertainty_volume"] = f"{case.case_id}/uncertainty.nii.gz"
    display = uncertainty_display(variance[k])
    write_png(work.case_dir / "uncertainty.png", heatmap_overlay(work.source[k], display))
    row["uncertainty_map"] = f"{case.case_id}/uncertainty.png"
    return row


def _segment_names(predictor: BasePredictor, n_out: int) -> dict[int, str]:
    if n_out == 1:
        return {1: "tumour"}
    classes = predictor.classes
    return {k: classes[k] if k < len(classes) else f"label {k}" for k in range(1, n_out)}


def commit_case_dir(tmp_dir: Path, case_dir: Path) -> None:
    """Move a finished case's temporary folder into place (nothing when it holds nothing)."""
    if not tmp_dir.is_dir():
        return
    if not any(tmp_dir.iterdir()):
        tmp_dir.rmdir()
        return
    if case_dir.exists():
        shutil.rmtree(case_dir)
    os.replace(tmp_dir, case_dir)


@contextlib.contextmanager
def case_errors(case: Case, out: Path, row: dict) -> Iterator[None]:
    """Turn an error of one case's work into its row: ``status`` ``error`` and one line naming
    the problem (logged), and the batch goes on; a full disk, a read-only or forbidden output is
    raised (:class:`~medseg.errors.OutputError`): every case after this one would fail the
    same way."""
    try:
        yield
    except OutputError as e:  # read-only or forbidden: its own message; a full disk: ours
        raise (disk_full_error(out / case.case_id) if is_disk_full(e.__cause__) else e) from e
    except MedsegError as e:
        message = " ".join(str(e).split())  # one line
        if case.source not in message:  # a failed case's row always names its source
            message = f"{case.source}: {message}"
        row.update(status="error", error=message)
        logger.error("%s", display_text(message))
    except Exception as e:  # one bad case must not stop the batch
        if is_disk_full(e):
            raise disk_full_error(out / case.case_id) from e
        message = f"{type(e).__name__}: {e}"
        row.update(status="error", error=f"{case.source}: {message}")
        logger.error("%s: unexpected error: %s", case.case_id, display_text(message))
        logger.debug("%s: traceback", case.case_id, exc_info=True)


@contextlib.contextmanager
def case_folder(case: Case, out: Path, row: dict) -> Iterator[Path]:
    """The hidden temporary folder that one case's outputs are written into.

    When the block succeeds the folder is renamed into ``<out>/<case_id>/``
    (:func:`commit_case_dir`). When it fails, the case's ``row`` gets ``status`` ``error`` and
    one line naming the problem, the error is logged, and the batch goes on; a full disk is
    raised (:class:`~medseg.errors.OutputError`): every case after this one would fail the same
    way (:func:`case_errors`). The temporary folder is always removed.
    """
    tmp_dir = out / f".{case.case_id}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        with case_errors(case, out, row):
            yield tmp_dir
            commit_case_dir(tmp_dir, out / case.case_id)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@dataclass
class PreparedCase:
    """A case read and cut for the model (:func:`prepare_case`), waiting for its model outputs.

    Attributes:
        case: the case.
        row: its row so far (``status`` ``error`` when reading or checking it failed).
        started: when its work began (``time.perf_counter``), for the log line.
        images: the model input ``[N, H, W, C']`` (None when it failed).
        is_volume: whether the case is a volume (known once read).
    """

    case: Case
    row: dict
    started: float
    images: np.ndarray | None = None
    is_volume: bool = False
    work: _Work | None = field(default=None, repr=False)
    volume: np.ndarray | None = field(default=None, repr=False)

    @property
    def failed(self) -> bool:
        """Whether the case has nothing to predict or write (an error case, or a failure)."""
        return self.work is None or self.row["status"] != "ok"

    def release_inputs(self) -> None:
        """Drop the model input once the model is done with it (only MC-dropout and Grad-CAM
        use it again, and they are not streamed)."""
        self.images = self.volume = None


def new_row(case: Case) -> dict:
    """The first columns of a case's row: id, source, status, error (and identifiers, input
    type)."""
    row: dict = {"case_id": case.case_id, "source": case.source, "status": "ok", "error": ""}
    if case.identifiers:  # only with keep_identifiers
        row.update(case.identifiers)
    if case.kind == "series":
        row.update(input_type="dicom_series", series_number=case.series_number)
    return row


def prepare_case(
    predictor: BasePredictor | None,
    case: Case,
    reader: CaseReader,
    out: Path,
    opts: Options,
    clock: Clock,
) -> PreparedCase:
    """Read a case and cut it as the model takes it (nothing is written); a failure is its row.

    Raises:
        OutputError: as :func:`case_errors`.
    """
    prepared = PreparedCase(case, new_row(case), time.perf_counter())
    row = prepared.row
    if case.kind == "error":
        row.update(status="error", error=case.error)
        logger.error("%s", display_text(case.error))
        return prepared
    assert predictor is not None
    with case_errors(case, out, row):
        image = reader.read(case)
        if case.kind != "series":
            row["input_type"] = "volume" if image.is_volume else "image"
        work, images, volume = _prepare(predictor, image, case, opts, clock, row)
        prepared.work, prepared.images, prepared.volume = work, images, volume
        prepared.is_volume = image.is_volume
    return prepared


def finish_case(prepared: PreparedCase, out: Path, parts: list[np.ndarray]) -> dict:
    """Post-process and write a predicted case into ``<out>/<case_id>/`` (a hidden temporary
    folder renamed into place when all its files are written, :func:`case_folder`); its row.

    Args:
        prepared: the case (a failed one is only logged).
        out: the output folder of the batch.
        parts: what :func:`output_part` kept of its model outputs, in slice order.

    Raises:
        OutputError: the output disk is full, or the output became read-only.
    """
    case, row = prepared.case, prepared.row
    if not prepared.failed:
        assert prepared.work is not None
        with case_folder(case, out, row) as tmp_dir:
            work = dataclasses.replace(prepared.work, case_dir=tmp_dir)
            row.update(_finish(work, prepared.images, prepared.volume, parts))
    if case.kind != "error":
        seconds = time.perf_counter() - prepared.started
        logger.info("%s: %s (%.2f s)", case.case_id, row["status"], seconds)
    return row


def run_case(
    predictor: BasePredictor | None,
    case: Case,
    reader: CaseReader,
    out: Path,
    opts: Options,
    clock: Clock,
) -> dict:
    """Read, predict and write one case into ``<out>/<case_id>/``; its row.

    Args:
        predictor: the model (None only for an ``"error"`` case, which is not predicted).
        case: the case.
        reader: reads the case.
        out: the output folder of the batch.
        opts: the options, as :func:`resolve_options` left them for this model.
        clock: counts the slices and the seconds in the model.

    Returns:
        The row: ``status`` ``ok``, or ``error`` with the error message (a failed case is
        reported, never dropped).

    Raises:
        OutputError: the output disk is full (every case after this one would fail the same way).
    """
    prepared = prepare_case(predictor, case, reader, out, opts, clock)
    parts: list[np.ndarray] = []
    if not prepared.failed:
        assert predictor is not None and prepared.images is not None
        with case_errors(case, out, prepared.row):
            for o in run_model(predictor, prepared.images, opts.batch_size, clock):
                parts.append(output_part(predictor, opts, o))
    return finish_case(prepared, out, parts)


def resolve_options(task: str, card: dict, opts: Options) -> Options:
    """``opts`` without the options that do not apply to this model (each with a warning)."""
    threshold, explain = opts.threshold, opts.explain
    if threshold is not None and (task != "segmentation" or int(card.get("num_outputs", 1)) != 1):
        logger.warning(
            "threshold %.3g ignored: it applies to binary segmentation models", threshold
        )
        threshold = None
    if explain and task != "classification":
        logger.warning("--explain applies to classifiers; ignored for this %s model", task)
        explain = False
    return dataclasses.replace(opts, threshold=threshold, explain=explain)


def prepare_model(predictor: BasePredictor, opts: Options) -> None:
    """Build what ``opts`` needs from the model (Grad-CAM, MC-dropout), so that problems of
    the model with these options fail the run before any case is written."""
    if opts.explain:
        predictor.gradcam()
    if opts.mc_samples:
        for m in predictor.keras_models():
            mc_dropout_model(m)
