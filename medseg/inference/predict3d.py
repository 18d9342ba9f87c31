"""Batch prediction with a 3D model: whole volumes at their own resolution, several structures.

:func:`medseg.inference.predict.predict` hands a 3D model (an export whose card says
``"dims": 3``, or a ``unet3d`` run folder) to :func:`predict_volumes`. Each case (a NIfTI file, a
DICOM series, any volume :func:`medseg.inference.cases.collect_cases` finds) is read, predicted
by sliding window at its own shape and spacing (:class:`~medseg.inference.volumetric.
VolumePredictor`) and written into ``<out>/<case-id>/``:

* ``mask.nii.gz``: the label map in the source's geometry (its affine and voxel order);
* ``seg.dcm`` for a DICOM series: a DICOM SEG with one segment per structure, named as in the
  model's labels (``dataset.json``);

and its row of ``predictions.csv``/``.json`` holds each structure's volume in mL
(``volume_ml_<structure>``). The batch is resumable and each case is committed atomically, as
for 2D models (:mod:`medseg.inference.batch`, :func:`medseg.inference.case.commit_case_dir`).

The cases are streamed (``queue_depth`` other than 0): one reader thread reads and checks the
next volume while the model predicts the current one by sliding window (in the calling thread),
and one writer thread post-processes and writes the previous one (NIfTI, DICOM SEG), renames its
hidden temporary folder into place and then records it in the batch
(:meth:`~medseg.inference.batch.Batch.commit`), as :mod:`medseg.inference.stream` does for 2D
models: a ``kill -9`` leaves at most one case folder without its record (predicted again by the
same command) and never a record without its folder. At most three volumes are in memory (one
read ahead, one in the model, one being written). The rows, the masks and the SEG's pixels are
those of the one-case-at-a-time path (``queue_depth=0``): each case goes through the same read,
model, post-processing and writers.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medseg.artifacts.exports import RUN_CONFIG, folder_kind, read_card
from medseg.config.loading import safe_load_bounded
from medseg.errors import ConfigError, DataError, OutputError
from medseg.inference.batch import Batch, PredictResult, progress_bar
from medseg.inference.case import case_errors, case_folder, write_volume_masks
from medseg.inference.cases import Case, CaseReader
from medseg.inference.postprocess import largest_component_per_label
from medseg.inference.volumetric import VolumePredictor, structure_volumes_ml
from medseg.io import Image
from medseg.io.base import check_channels, small_image_problem
from medseg.io.writers import write_tables
from medseg.utils import check_writable, display_text

logger = logging.getLogger(__name__)


def is_volumetric_model(path: str | Path) -> bool:
    """Whether ``path`` is a 3D model: an export whose card says ``"dims": 3``, or a run or CV
    folder of a ``unet3d`` config.

    Raises:
        ModelError: ``path`` is not a model folder (:func:`medseg.artifacts.exports.folder_kind`).
    """
    kind = folder_kind(path)
    if kind == "export":
        return int(read_card(path).get("dims", 2)) == 3
    try:
        config = safe_load_bounded((Path(path) / RUN_CONFIG).read_text(), str(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError):
        return False  # not readable: the loader of the run says what is wrong with it
    model = config.get("model") if isinstance(config, dict) else None
    return isinstance(model, dict) and model.get("name") == "unet3d"


def column_name(structure: str) -> str:
    """``"Anterior"`` -> ``"anterior"``: a structure's name as a column suffix."""
    return "_".join(structure.lower().split())


def _read_volume(predictor: VolumePredictor, case: Case, reader: CaseReader) -> Image:
    """Read a case's volume and check it against the model.

    Raises:
        DataError: not a volume, channels the model does not take, or no voxel spacing.
    """
    image = reader.read(case)
    if not image.is_volume:
        raise DataError(f"{case.source}: a 3D model needs a volume, got a 2D image")
    check_channels(image, predictor.channels, predictor.channel_names, source=case.source)
    problem = small_image_problem(image, source=case.source, volume=True)
    if problem:
        logger.warning("%s", display_text(problem))
    if image.meta.spacing is None:
        raise DataError(f"{case.source}: the volume has no voxel spacing; a 3D model needs it")
    return image


def _predict_labels(predictor: VolumePredictor, image: Image) -> tuple:
    """The label map of a read volume (the probabilities are dropped) and the seconds in the
    model."""
    t0 = time.perf_counter()
    labels = predictor.predict(image.array, image.meta.spacing, image.meta.affine)["labels"]
    return labels, time.perf_counter() - t0


def _write_volume(
    predictor: VolumePredictor,
    case: Case,
    image: Image,
    labels,
    case_dir: Path,
    largest: bool,
) -> dict:
    """Post-process a predicted volume and write it into ``case_dir``; its row's columns."""
    spacing = image.meta.spacing
    if largest:
        labels = largest_component_per_label(labels)
    names = {k: v for k, v in predictor.labels.items() if k > 0}
    row: dict = {"shape": "x".join(map(str, labels.shape))}
    row["spacing_mm"] = "x".join(f"{s:.4g}" for s in spacing)
    for name, ml in structure_volumes_ml(labels, spacing, names).items():
        row[f"volume_ml_{column_name(name)}"] = round(ml, 4)
    case_dir.mkdir(parents=True, exist_ok=True)
    row.update(write_volume_masks(case_dir, labels, image, case, names))
    return row


def _new_row(case: Case) -> dict:
    row: dict = {"case_id": case.case_id, "source": case.source, "status": "ok", "error": ""}
    if case.identifiers:
        row.update(case.identifiers)
    row["input_type"] = "dicom_series" if case.kind == "series" else "volume"
    return row


@dataclass
class _Volume:
    """A case on its way through the stream: its row, and its volume once read and predicted."""

    case: Case
    row: dict
    started: float
    image: Image | None = None
    labels: object = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.case.kind != "error" and self.row["status"] == "ok"


def _read_job(predictor: VolumePredictor, case: Case, reader: CaseReader, out: Path) -> _Volume:
    """The reader thread's work on one case: its volume read and checked (a failure is its
    row).

    Raises:
        OutputError: as :func:`medseg.inference.case.case_errors`.
    """
    item = _Volume(case, _new_row(case), time.perf_counter())
    if case.kind == "error":
        item.row.update(status="error", error=case.error)
        logger.error("%s", case.error)
        return item
    with case_errors(case, out, item.row):
        item.image = _read_volume(predictor, case, reader)
    return item


def _write_job(
    predictor: VolumePredictor, item: _Volume, out: Path, largest: bool, batch: Batch
) -> dict:
    """The writer thread's work on one predicted case: its folder written and renamed into
    place (:func:`medseg.inference.case.case_folder`), then its record; its row.

    Raises:
        OutputError: the output disk is full, or the output became read-only.
    """
    case, row = item.case, item.row
    if item.ok:
        assert item.image is not None
        with case_folder(case, out, row) as tmp_dir:
            row.update(_write_volume(predictor, case, item.image, item.labels, tmp_dir, largest))
    item.image = item.labels = None
    logger.info("%s: %s (%.2f s)", case.case_id, row["status"], time.perf_counter() - item.started)
    return batch.commit(row)


@dataclass
class _Tally:
    """The rows in case order, and the slices and seconds in the model."""

    rows: list
    slices: int = 0
    seconds: float = 0.0


def _predict_job(predictor: VolumePredictor, item: _Volume, out: Path, tally: _Tally) -> None:
    """The model's work on one read case: its label map (a failure is its row)."""
    if not item.ok:
        return
    assert item.image is not None
    with case_errors(item.case, out, item.row):
        item.labels, seconds = _predict_labels(predictor, item.image)
        tally.slices += int(item.labels.shape[0])
        tally.seconds += seconds


def _one_at_a_time(predictor, cases, out, batch, largest, bar) -> _Tally:
    """Read, predict, write and commit each case before the next (the stream's steps, in
    turn)."""
    reader, tally = CaseReader(), _Tally([])
    for case in cases:
        row = batch.done.get(case.case_id)
        if row is None:
            item = _read_job(predictor, case, reader, out)
            _predict_job(predictor, item, out, tally)
            row = _write_job(predictor, item, out, largest, batch)
        tally.rows.append(row)
        bar.update(1)
    return tally


def _streamed(predictor, cases, out, batch, largest, bar) -> _Tally:
    """The cases streamed (see the module docstring): the next one read and the previous one
    written while the model predicts the current one."""
    tally = _Tally([batch.done.get(c.case_id) for c in cases])
    todo = [i for i, row in enumerate(tally.rows) if row is None]
    bar.update(len(cases) - len(todo))
    reader = CaseReader()
    readers = ThreadPoolExecutor(1, thread_name_prefix="medseg-read3d")
    writer = ThreadPoolExecutor(1, thread_name_prefix="medseg-write3d")
    writing: tuple[int, Future] | None = None

    def collect() -> None:  # the case being written: its row (an OutputError stops the batch)
        nonlocal writing
        if writing is not None:
            index, future = writing
            writing = None
            tally.rows[index] = future.result()
            bar.update(1)

    try:
        ahead = readers.submit(_read_job, predictor, cases[todo[0]], reader, out) if todo else None
        for k, index in enumerate(todo):
            assert ahead is not None
            item = ahead.result()  # an OutputError stops the batch
            ahead = None
            if k + 1 < len(todo):  # one volume read ahead
                ahead = readers.submit(_read_job, predictor, cases[todo[k + 1]], reader, out)
            _predict_job(predictor, item, out, tally)
            collect()  # one volume being written
            writing = (index, writer.submit(_write_job, predictor, item, out, largest, batch))
        collect()
    finally:  # on an error or an interrupt: the case handed to the writer (its volume
        # predicted) is still written and recorded; the one read ahead is dropped
        readers.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)
    return tally


def predict_volumes(
    model: str | Path | VolumePredictor,
    cases: list[Case],
    out: Path,
    batch: Batch,
    largest_component: bool = False,
    progress: bool = True,
    queue_depth: int | None = None,
) -> PredictResult:
    """Predict ``cases`` with a 3D model (a folder or a loaded :class:`VolumePredictor`); write
    their outputs and the tables.

    Args:
        model: the model folder, or a loaded predictor.
        cases: the cases, in the order of the tables.
        out: the output folder of the batch.
        batch: the batch record (not started yet).
        largest_component: keep the largest connected component of each structure.
        progress: show a progress bar over the cases (on a terminal).
        queue_depth: 0: one case at a time; otherwise (default) streamed, one volume read ahead
            and one being written while the model predicts (see the module docstring).

    Raises:
        OutputError: the output disk is full, or the output became read-only (the cases
            committed before it stay done; the same call continues the batch).
    """
    predictor = model if isinstance(model, VolumePredictor) else VolumePredictor(model)
    start = time.perf_counter()
    batch.start()
    with progress_bar(len(cases), progress) as bar:
        try:
            if queue_depth == 0:
                tally = _one_at_a_time(predictor, cases, out, batch, largest_component, bar)
            else:
                tally = _streamed(predictor, cases, out, batch, largest_component, bar)
        except OutputError:
            check_writable(out)  # a folder that became read-only: say so
            raise
    rows = write_tables(out, tally.rows)
    batch.finish()
    result = PredictResult(out, rows, tally.slices, tally.seconds, time.perf_counter() - start)
    logger.info(
        "predicted %d volumes (%d failed), %d slices: %.1f slices/s end to end, %.1f slices/s "
        "in the model -> %s",
        len(rows),
        result.n_failed,
        tally.slices,
        result.end_to_end_slices_per_second,
        result.slices_per_second,
        out,
    )
    return result
