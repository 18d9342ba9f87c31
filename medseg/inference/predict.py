"""Batch inference on files and folders (``medseg predict``): the entry and the local executor.

:func:`predict` checks the options and the output folder, collects the cases
(:func:`medseg.inference.cases.collect_cases`: files, volumes, DICOM series, unreadable files)
and runs them, one after another in this process, or on a Ray cluster
(:func:`medseg.inference.ray_predict.predict_on_ray`). Either way every case goes through
:func:`medseg.inference.case.run_case` and the batch is recorded by
:class:`medseg.inference.batch.Batch`, so both executors write the same folder.

Prediction
    Volumes are predicted slice by slice, cut along the model's ``data.slice_axis`` as in
    training (axis 0, 1 or 2 of the ``(slice, row, col, C)`` array of :mod:`medseg.io`; see
    :func:`medseg.data.volumes.reslice`), ``batch_size`` slices per model call, and stacked back
    in the source geometry. Binary masks use the model's threshold, or ``threshold`` when given
    (applied to the returned probabilities); multi-class masks are the argmax. A 2.5D model
    (``data.context_slices`` = ``k``) gets each slice with its ``k`` neighbours on each side:
    the neighbouring slices of a volume, or, for a 2D image, the neighbouring 2D images of its
    folder in natural file-name order (a folder of slices is one volume, as in the ``lgg``
    layout; edges repeated as in training). ``min_lesion_voxels`` and
    ``largest_component`` then post-process the mask (:mod:`medseg.inference.postprocess`:
    connected components in 3D for volumes, in 2D for images).

Outputs under ``<out>/<case-id>/`` (written into a hidden temporary folder that is renamed into
place when the case succeeds, so a failed or killed case leaves no partial folder):

* segmentation, 2D: ``mask.png`` (binary: 0/255; label maps: the labels) and ``overlay.png``;
* segmentation, volumes: ``mask.nii.gz`` in the source geometry (NIfTI input: the input's own
  voxel order and affine; DICOM: voxel order (col, row, slice) with the series' affine in RAS;
  see :func:`medseg.io.writers.write_mask_nifti`) and ``overlay.png`` of the slice with
  the most foreground; for a DICOM series also ``seg.dcm``, a DICOM SEG (BINARY, segment
  ``"tumour"`` for a binary model) referencing the source SOP instances;
* classification: the class probabilities, in the tables only; for a volume (series, NIfTI,
  multi-frame) the probabilities are the mean over its slices.

The local executor streams the cases (:mod:`medseg.inference.stream`): reader threads read the
next cases while the model runs, the slices of consecutive cases of one shape share model calls
(``batch_size`` images a call, also for a folder of 2D files), and one writer thread writes each
case and records it. Memory holds at most ``queue_depth`` cases (default ``2 * batch_size``; at
most one of them a volume) whatever the size of the batch; a series
reads only its own files. ``queue_depth=0``, MC-dropout and Grad-CAM predict one case at a time.
The outputs are the same bytes either way. A batch that is interrupted (``kill -9``, a full disk)
is continued by the same call: finished cases are recorded in ``<out>/.medseg-predict/`` and not
predicted again (:class:`~medseg.inference.batch.Batch`); a full disk stops the batch with an
:class:`~medseg.errors.OutputError` naming the case folder, leaving no partial file.

The output folder is checked before any work: it must not be an input folder, lie inside one or
hold an input (:func:`medseg.utils.check_outside_inputs`), and it must be writable
(:func:`medseg.utils.check_writable`: a read-only file system or a missing permission is an
:class:`~medseg.errors.OutputError` naming the folder, exit 2 in the CLI; so is a write that
fails for these reasons later).

``predictions.csv`` and ``predictions.json`` hold one row per case with ``status`` ``ok`` or
``error`` and the error message (text as :func:`medseg.io.writers.write_tables` writes it: file
names that are not UTF-8 with backslash escapes, formula-like CSV cells quoted): a case that
fails (a :class:`~medseg.errors.MedsegError`, or any other exception, reported as ``<type>:
<message>``) is reported, never dropped, and the batch goes on. Rows of segmentation cases carry
``foreground_pixels`` (voxels), ``foreground_fraction``, ``foreground_mm2`` (2D, spacing known)
or ``foreground_ml`` (volumes, spacing known) and, for volumes, ``slices_with_foreground``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from medseg.errors import ConfigError, ModelError, OutputError
from medseg.inference.batch import Batch, PredictResult, batch_signature, progress_bar
from medseg.inference.case import Clock, Options, prepare_model, resolve_options, run_case
from medseg.inference.cases import Case, CaseReader, collect_cases
from medseg.inference.postprocess import check_threshold
from medseg.inference.predict3d import is_volumetric_model, predict_volumes
from medseg.inference.predictor import BasePredictor, EnsemblePredictor, Predictor
from medseg.inference.ray_predict import predict_on_ray
from medseg.inference.stream import stream_cases
from medseg.io.writers import write_tables
from medseg.utils import check_outside_inputs, check_writable

logger = logging.getLogger(__name__)

#: Where :func:`predict` runs the cases.
EXECUTORS = ("local", "ray")


def predict(
    model: str | Path | BasePredictor,
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    overlays: bool = True,
    overwrite: bool = False,
    threshold: float | None = None,
    largest_component: bool = False,
    min_lesion_voxels: int = 0,
    progress: bool = True,
    mc_samples: int = 0,
    explain: bool = False,
    keep_identifiers: bool = False,
    executor: str = "local",
    address: str | None = None,
    ray_workers: int | None = None,
    ensemble_with: list[str | Path] | tuple = (),
    queue_depth: int | None = None,
) -> PredictResult:
    """Predict every case of ``inputs`` with ``model``; write per-case outputs and the tables.

    Args:
        model: export folder or run folder (or a loaded :class:`Predictor`).
        inputs: files and folders (see :func:`collect_cases`).
        out_dir: output folder, apart from the inputs; must be new or empty unless
            ``overwrite``, or hold the unfinished batch of this call, which is continued.
        batch_size: images or volume slices per model call.
        overlays: write overlay PNGs.
        overwrite: allow writing into a non-empty ``out_dir`` (a case folder of the same id is
            replaced).
        threshold: foreground threshold in (0, 1) for binary segmentation models, applied to
            the probabilities instead of the model's own (``medseg.json`` / run config);
            ignored, with a warning, for multi-class and classification models.
        largest_component: keep only the largest connected foreground component of each case
            (3D for volumes).
        min_lesion_voxels: remove connected foreground components smaller than this (voxels,
            pixels for 2D images).
        progress: show a progress bar over the cases on stderr (only when it is a terminal).
        mc_samples: MC-dropout passes per case (0: off): adds an ``uncertainty`` column (mean
            voxel variance over the predicted lesion, or the predictive entropy of a
            classifier) and ``uncertainty.png`` (segmentation); needs a model with dropout.
        explain: classifiers: write ``gradcam.png`` (Grad-CAM of the predicted class).
        keep_identifiers: name DICOM cases after the PatientID and add ``patient_id``,
            ``patient_name`` and ``study_date`` to the tables (see :func:`collect_cases`).
            Off by default: no DICOM patient or study data reaches names, tables or logs.
        executor: ``local`` (cases one after another, in this process) or ``ray`` (cases spread
            over a pool of Ray actors that each load the model once; same outputs, see
            :mod:`medseg.inference.ray_predict`).
        address: Ray cluster address (``ray`` only; default: start a local Ray instance).
        ray_workers: number of Ray actors (``ray`` only; default: one per GPU of the cluster,
            else one per CPU).
        ensemble_with: more models (export, run or CV folders) of the same outputs: predict
            with the mean of all the models' probabilities (:class:`EnsemblePredictor`), e.g.
            the 2D and 2.5D recipes whose ensemble ``medseg tune --with`` measured. Not with
            ``mc_samples``, ``explain`` or the ``ray`` executor.
        queue_depth: the local executor's most cases in flight (default ``2 * batch_size``).

    Returns:
        The output folder, the per-case rows (failed cases have ``status == "error"``) and the
        model throughput.

    Raises:
        RunExistsError: ``out_dir`` is not empty (a finished batch, or an unfinished batch of
            another call) and ``overwrite`` is false.
        OutputError: ``out_dir`` is read-only or may not be written (checked before any work,
            and at write time), or its disk is full (the same call continues the batch).
        ConfigError: ``out_dir`` is, is inside or holds an input; a bad ``batch_size``,
            ``queue_depth``, ``threshold``, ``min_lesion_voxels`` or ``executor``,
            ``executor="ray"`` without Ray installed, or ``ensemble_with`` with
            ``mc_samples``, ``explain`` or ``ray``.
        DataError: an input does not exist, or a folder holds no supported file, or the
            ``ensemble_with`` models' outputs differ from the model's.
        ModelError: the model cannot be loaded.
    """
    given = Options(
        batch_size, overlays, threshold, largest_component, min_lesion_voxels, mc_samples, explain
    )
    opts = _checked(given, executor, ensemble_with, queue_depth)
    out = _checked_out(Path(out_dir), inputs)
    signature = batch_signature(model, inputs, _signed(opts, keep_identifiers, ensemble_with))
    batch = Batch.open(out, signature, overwrite)  # a finished batch needs overwrite
    cases = collect_cases(inputs, keep_identifiers=keep_identifiers)
    if _volumetric(model, opts, executor, ensemble_with):
        return predict_volumes(
            model, cases, out, batch, opts.largest_component, progress, queue_depth=queue_depth
        )
    if executor == "ray":  # the same batch record: skips and records cases as locally
        return predict_on_ray(
            model, cases, out, opts, address=address, workers=ray_workers, progress=progress,
            batch=batch,
        )  # fmt: skip
    if address or ray_workers:
        logger.warning("--address and --ray-workers apply to --executor ray; ignored")
    predictor = model if isinstance(model, BasePredictor) else Predictor(model)
    if ensemble_with:
        predictor = EnsemblePredictor([predictor, *(Predictor(m) for m in ensemble_with)])
    return _predict_locally(predictor, cases, out, opts, batch, progress, queue_depth)


def _checked_out(out: Path, inputs: list[str | Path]) -> Path:
    """``out``, checked before any work: apart from the inputs, and writable.

    Raises:
        ConfigError: ``out`` is an input folder, lies inside one or holds an input.
        OutputError: ``out`` is on a read-only file system or may not be written.
    """
    check_outside_inputs(out, list(inputs))  # outputs never mix with inputs
    check_writable(out)  # one line now, not an OSError after the work
    return out


def _checked(given: Options, executor: str, ensemble_with, queue_depth=None) -> Options:
    """The options of :func:`predict`, checked.

    Raises:
        ConfigError: a bad option, or options that do not work together.
    """
    if given.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {given.batch_size}")
    if (queue_depth or 0) < 0:
        raise ConfigError(f"queue_depth must be >= 0 (0: one case at a time), got {queue_depth}")
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor: '{executor}' is not one of {', '.join(EXECUTORS)}")
    if given.mc_samples == 1 or given.mc_samples < 0:
        raise ConfigError(f"mc_samples must be 0 (off) or >= 2, got {given.mc_samples}")
    if given.min_lesion_voxels < 0:
        raise ConfigError(f"min_lesion_voxels must be >= 0, got {given.min_lesion_voxels}")
    if ensemble_with and (given.mc_samples or given.explain or executor == "ray"):
        raise ConfigError(
            "--with (an ensemble of models) works with the local executor, without "
            "--mc-samples and --explain"
        )
    threshold = given.threshold
    if threshold is not None:
        try:
            threshold = check_threshold(threshold)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return dataclasses.replace(
        given,
        threshold=threshold,
        min_lesion_voxels=int(given.min_lesion_voxels),
        mc_samples=int(given.mc_samples),
    )


def _volumetric(model, opts: Options, executor: str, ensemble_with) -> bool:
    """Whether ``model`` is a 3D model folder (a bad folder is left to the 2D loader's error).

    Raises:
        ConfigError: a 3D model with options that 3D models do not support yet.
    """
    if isinstance(model, BasePredictor):
        return False
    try:
        if not is_volumetric_model(model):
            return False
    except ModelError:
        return False
    given = {
        "--executor ray": executor == "ray",
        "--with": bool(ensemble_with),
        "--mc-samples": bool(opts.mc_samples),
        "--explain": opts.explain,
        "--threshold": opts.threshold is not None,
        "--min-lesion-voxels": bool(opts.min_lesion_voxels),
    }
    unsupported = [name for name, used in given.items() if used]
    if unsupported:
        raise ConfigError(
            f"{', '.join(unsupported)}: not supported for 3D (unet3d) models yet; a 3D model "
            "takes --largest-component"
        )
    return True


def _signed(opts: Options, keep_identifiers: bool, ensemble_with) -> dict:
    """The options that change a batch's outputs, for :func:`batch_signature`."""
    signed = {
        "overlays": opts.overlays,
        "threshold": opts.threshold,
        "largest_component": opts.largest_component,
        "min_lesion_voxels": opts.min_lesion_voxels,
        "mc_samples": opts.mc_samples,
        "explain": opts.explain,
        "keep_identifiers": keep_identifiers,
    }
    if ensemble_with:
        signed["with"] = [str(Path(m).resolve()) for m in ensemble_with]
    return signed


def _predict_locally(
    predictor: BasePredictor,
    cases: list[Case],
    out: Path,
    opts: Options,
    batch: Batch,
    progress: bool,
    queue_depth: int | None = None,
) -> PredictResult:
    """The local executor: the cases streamed through this process
    (:func:`medseg.inference.stream.stream_cases`), or one after another (``queue_depth`` 0,
    MC-dropout, Grad-CAM)."""
    opts = resolve_options(predictor.task, predictor.card, opts)
    prepare_model(predictor, opts)
    start = time.perf_counter()
    batch.start()
    clock = Clock()
    with progress_bar(len(cases), progress) as bar:
        try:
            if queue_depth == 0 or opts.mc_samples or opts.explain:
                rows = _one_at_a_time(predictor, cases, out, opts, batch, clock, bar)
            else:
                rows = stream_cases(predictor, cases, out, opts, batch, clock, bar, queue_depth)
        except OutputError:
            check_writable(out)  # a folder that became read-only: say so
            raise
    rows = write_tables(out, rows)
    batch.finish()
    result = PredictResult(out, rows, clock.slices, clock.seconds, time.perf_counter() - start)
    logger.info(
        "predicted %d cases (%d failed), %d slices: %.1f slices/s end to end (read, predict, "
        "write), %.1f slices/s in the model -> %s",
        len(rows),
        result.n_failed,
        clock.slices,
        result.end_to_end_slices_per_second,
        result.slices_per_second,
        out,
    )
    return result


def _one_at_a_time(
    predictor: BasePredictor,
    cases: list[Case],
    out: Path,
    opts: Options,
    batch: Batch,
    clock: Clock,
    bar,
) -> list[dict]:
    """The cases one after another: read, predict, write, commit."""
    reader, rows = CaseReader(), []
    for case in cases:
        row = batch.done.get(case.case_id)  # finished before an interruption
        if row is None:
            row = batch.commit(run_case(predictor, case, reader, out, opts, clock))
        rows.append(row)
        bar.update(1)
    return rows
