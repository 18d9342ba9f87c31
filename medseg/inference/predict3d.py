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
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml

from medseg.artifacts.exports import RUN_CONFIG, folder_kind, read_card
from medseg.config.loading import safe_load_bounded
from medseg.errors import ConfigError, DataError, OutputError
from medseg.inference.batch import Batch, PredictResult, progress_bar
from medseg.inference.case import case_folder, write_volume_masks
from medseg.inference.cases import Case, CaseReader
from medseg.inference.postprocess import largest_component_per_label
from medseg.inference.volumetric import VolumePredictor, structure_volumes_ml
from medseg.io.base import check_channels, small_image_problem
from medseg.io.writers import write_tables
from medseg.utils import check_writable

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


def _predict_volume(
    predictor: VolumePredictor, case: Case, reader: CaseReader, case_dir: Path, largest: bool
) -> tuple[dict, int, float]:
    image = reader.read(case)
    if not image.is_volume:
        raise DataError(f"{case.source}: a 3D model needs a volume, got a 2D image")
    check_channels(image, predictor.channels, predictor.channel_names, source=case.source)
    problem = small_image_problem(image, source=case.source, volume=True)
    if problem:
        logger.warning("%s", problem)
    spacing = image.meta.spacing
    if spacing is None:
        raise DataError(f"{case.source}: the volume has no voxel spacing; a 3D model needs it")
    t0 = time.perf_counter()
    labels = predictor.predict(image.array, spacing, image.meta.affine)["labels"]
    seconds = time.perf_counter() - t0
    if largest:
        labels = largest_component_per_label(labels)
    names = {k: v for k, v in predictor.labels.items() if k > 0}
    row: dict = {"shape": "x".join(map(str, labels.shape))}
    row["spacing_mm"] = "x".join(f"{s:.4g}" for s in spacing)
    for name, ml in structure_volumes_ml(labels, spacing, names).items():
        row[f"volume_ml_{column_name(name)}"] = round(ml, 4)
    case_dir.mkdir(parents=True, exist_ok=True)
    row.update(write_volume_masks(case_dir, labels, image, case, names))
    return row, int(labels.shape[0]), seconds


def run_volume_case(
    predictor: VolumePredictor, case: Case, reader: CaseReader, out: Path, largest: bool
) -> tuple[dict, int, float]:
    """Read, predict and write one case; its row, the slices predicted and the seconds in the
    model (0 on failure).

    Raises:
        OutputError: the output disk is full.
    """
    row: dict = {"case_id": case.case_id, "source": case.source, "status": "ok", "error": ""}
    if case.identifiers:
        row.update(case.identifiers)
    row["input_type"] = "dicom_series" if case.kind == "series" else "volume"
    if case.kind == "error":
        row.update(status="error", error=case.error)
        logger.error("%s", case.error)
        return row, 0, 0.0
    slices, seconds = 0, 0.0
    with case_folder(case, out, row) as tmp_dir:
        written, slices, seconds = _predict_volume(predictor, case, reader, tmp_dir, largest)
        row.update(written)
    return row, slices, seconds


def predict_volumes(
    model: str | Path | VolumePredictor,
    cases: list[Case],
    out: Path,
    batch: Batch,
    largest_component: bool = False,
    progress: bool = True,
) -> PredictResult:
    """Predict ``cases`` one after another with a 3D model (a folder or a loaded
    :class:`VolumePredictor`); write their outputs and the tables."""
    predictor = model if isinstance(model, VolumePredictor) else VolumePredictor(model)
    start = time.perf_counter()
    batch.start()
    reader, rows = CaseReader(), []
    n_slices, model_seconds = 0, 0.0
    with progress_bar(len(cases), progress) as bar:
        for case in cases:
            row = batch.done.get(case.case_id)
            if row is None:
                t0 = time.perf_counter()
                try:
                    row, slices, seconds = run_volume_case(
                        predictor, case, reader, out, largest_component
                    )
                except OutputError:
                    check_writable(out)  # a folder that became read-only: say so
                    raise
                n_slices, model_seconds = n_slices + slices, model_seconds + seconds
                logger.info(
                    "%s: %s (%.2f s)", case.case_id, row["status"], time.perf_counter() - t0
                )
                row = batch.commit(row)
            rows.append(row)
            bar.update(1)
    rows = write_tables(out, rows)
    batch.finish()
    result = PredictResult(out, rows, n_slices, model_seconds, time.perf_counter() - start)
    logger.info("predicted %d volumes (%d failed) -> %s", len(rows), result.n_failed, out)
    return result
