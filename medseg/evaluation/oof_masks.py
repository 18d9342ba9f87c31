"""The out-of-fold label maps of a finished cross-validation, as NIfTI files any tool can read.

``medseg evaluate CV_RUN --export-oof DIR`` (:func:`export_oof_masks`) predicts every case of
the CV again with the one fold model that did not train on it, exactly as the CV scored it
(the checkpoint :data:`medseg.artifacts.cv.CV_CHECKPOINT`, the fold's
:class:`~medseg.inference.volumetric.VolumePredictor` with its own settings, no
post-processing), and writes::

    DIR/pred/<case_id>.nii.gz    the predicted labels
    DIR/truth/<case_id>.nii.gz   the reference labels as medseg read them for the CV
    DIR/oof.json                 the CV, checkpoint, labels, cases per fold, seconds
    DIR/dataset.json             the labels (nnU-Net v2 style), read by ``--pred/--truth``

Both maps are written in the source image's geometry (voxel order and affine) by
:func:`medseg.io.writers.write_mask_nifti`, the writer of ``medseg predict``'s ``mask.nii.gz``.
Scoring them, ``medseg evaluate --pred DIR/pred --truth DIR/truth --out S``
(:func:`medseg.evaluation.files.score_folders`), gives the per-structure means of the CV
report's ``cv_summary.json`` (key ``none``): the round trip from medseg to other tools and back.

A 2D segmentation CV is written one volume per patient, named ``patient_<n>`` (patient
identifiers stay out of file names; ``oof.json`` lists the names per fold): the patient's slices
stacked in natural order, at the model's input size, 1 mm voxels (the slices carry no spacing),
predicted from the fold's out-of-fold probabilities (those ``medseg tune`` caches) at
``predict.threshold``, as the CV scored them. Scoring them gives each patient's volume Dice,
whose mean is the CV report's per-patient Dice (``dice_per_group_mean``), and the HD95, ASSD and
NSD of ``fold_<k>/oof_groups.csv`` (in "mm" of 1 mm voxels, i.e. pixels).

A classification CV, a folder that is not a CV, and a CV whose folds have not all finished are
refused with one line.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from medseg.artifacts.cv import CV_CHECKPOINT, fold_dir, fold_done
from medseg.artifacts.runs import open_run
from medseg.data.scan_msd import describe
from medseg.data.split import load_manifest
from medseg.errors import ConfigError, DataError
from medseg.evaluation.evaluate import label_maps
from medseg.evaluation.patients import patient_volumes
from medseg.evaluation.tune import all_fold_probabilities
from medseg.inference.predict3d import is_volumetric_model
from medseg.inference.volumetric import VolumePredictor
from medseg.io.base import ImageMeta
from medseg.io.msd import DATASET_JSON, read_case_image, read_case_labels
from medseg.io.writers import write_mask_nifti
from medseg.utils import atomic_write_json, check_output_folder, read_json, replace_folder

logger = logging.getLogger(__name__)

#: The sub-folders of the export: predicted and reference label maps.
PRED_DIR, TRUTH_DIR = "pred", "truth"
#: What the export records about itself.
EXPORT_JSON = "oof.json"
#: File ending of the written label maps.
MASK_ENDING = ".nii.gz"


def cv_folds(root: str | Path) -> int:
    """The number of folds of the finished CV folder ``root`` (3D, or 2D segmentation).

    Raises:
        ConfigError: ``root`` is not a cross-validation folder, or a classification one.
        DataError: the split manifest is unreadable, or some folds have not finished (named).
    """
    root = Path(root)
    manifest_path = root / "splits.json"
    if not (root / "config.yaml").is_file() or not manifest_path.is_file():
        raise ConfigError(
            f"{root}: not a cross-validation folder (no config.yaml and splits.json of medseg cv)"
        )
    folds = load_manifest(manifest_path).get("folds")
    if not isinstance(folds, list) or not folds:
        raise ConfigError(f"{manifest_path}: not a cross-validation manifest (no 'folds')")
    if not is_volumetric_model(root) and open_run(root).config().data.task != "segmentation":
        raise ConfigError(f"{root}: a classification CV has no label maps to export")
    missing = [k for k in range(1, len(folds) + 1) if not fold_done(root, k)]
    if missing:
        raise DataError(
            f"{root}: the CV is not finished: fold(s) {', '.join(map(str, missing))} of "
            f"{len(folds)} have no finished model and oof.csv; run medseg cv again"
        )
    return len(folds)


def _export_fold(root: Path, k: int, tmp: Path, seen: set[str]) -> tuple[list[str], dict]:
    """Write fold ``k``'s validation cases, predicted by its model, into ``tmp``; returns the
    case ids and the labels (value -> name, background included)."""
    fdir = fold_dir(root, k)
    run = open_run(fdir)
    ids = [str(i) for i in read_json(run.splits_path)["splits"]["val"]]
    twice = sorted(seen.intersection(ids))
    if twice:
        raise DataError(f"{run.splits_path}: {len(twice)} case(s) are also in an earlier fold")
    seen.update(ids)
    data_root = run.config().data.root
    by_id = {c.case_id: c for c in describe(data_root).cases}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(
            f"{Path(data_root) / 'dataset.json'}: {len(missing)} validation case(s) of fold {k} "
            "are no longer listed"
        )
    predictor = VolumePredictor(fdir, checkpoint=CV_CHECKPOINT)
    for n, cid in enumerate(ids, start=1):
        case = by_id[cid]
        image = read_case_image(case, predictor.channels)
        truth = read_case_labels(case, predictor.labels)
        pred = predictor.predict(image.array, image.meta.spacing, image.meta.affine)["labels"]
        write_mask_nifti(tmp / PRED_DIR / f"{cid}{MASK_ENDING}", pred, image.meta)
        write_mask_nifti(tmp / TRUTH_DIR / f"{cid}{MASK_ENDING}", truth, image.meta)
        logger.info("fold %d: case %d/%d written", k, n, len(ids))
    return ids, dict(predictor.labels)


def _export_3d(root: Path, n_folds: int, tmp: Path) -> tuple[dict[str, list[str]], dict]:
    """Write every fold's validation cases of a 3D CV; returns the case ids per fold and the
    labels."""
    folds: dict[str, list[str]] = {}
    labels: dict = {}
    seen: set[str] = set()
    for k in range(1, n_folds + 1):
        logger.info("fold %d/%d: predicting its validation cases", k, n_folds)
        folds[str(k)], fold_labels = _export_fold(root, k, tmp, seen)
        if labels and fold_labels != labels:
            raise DataError(f"{fold_dir(root, k)}: its labels differ from fold 1's")
        labels = fold_labels
    return folds, labels


def _export_2d(root: Path, tmp: Path) -> tuple[dict[str, list[str]], dict]:
    """Write each patient of a 2D segmentation CV as one volume (its slices stacked in natural
    order), predicted by its fold's model as the CV scored it (the fold's probabilities at the
    model's input size, ``predict.threshold``), and its reference; returns the case names per
    fold (pseudonyms ``patient_<n>``: patient identifiers stay out of file names) and the
    labels."""
    cfg, _, folds = all_fold_probabilities(root)
    threshold = cfg.predict.threshold
    meta = ImageMeta(source=(), spacing=(1.0, 1.0, 1.0), affine=np.eye(4))
    names: dict[str, list[str]] = {}
    n_classes = 1
    count = 0
    for k, fp in sorted(folds.items()):
        probs = fp.probs[CV_CHECKPOINT]
        n_classes = probs.shape[-1]
        pred = label_maps(probs, threshold)
        names[str(k)] = []
        for _, idx in sorted(patient_volumes(fp.groups, fp.ids).items()):
            count += 1
            name = f"patient_{count:04d}"
            for folder, maps in ((PRED_DIR, pred), (TRUTH_DIR, fp.truth)):
                volume = np.stack([np.asarray(maps[i]) for i in idx]).astype(np.uint8)
                write_mask_nifti(tmp / folder / f"{name}{MASK_ENDING}", volume, meta)
            names[str(k)].append(name)
        logger.info("fold %d: %d patient volumes written", k, len(names[str(k)]))
    labels = {0: "background", 1: "foreground"}
    if n_classes > 1:
        labels = {0: "background", **{c: f"label_{c}" for c in range(1, n_classes)}}
    return names, labels


def export_oof_masks(root: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """Write the out-of-fold label maps of the finished CV ``root`` (3D, or 2D segmentation)
    into ``out``.

    Each case is predicted by the fold model that did not train on it, as the CV scored it
    (see the module docstring for the files).

    Args:
        root: A finished 3D cross-validation folder (``medseg cv``).
        out: The folder to write (built in a temporary sibling, then renamed into place).
        overwrite: Replace an existing ``out``.

    Returns:
        What ``oof.json`` holds: ``cv``, ``checkpoint``, ``labels`` (value -> name, background
        left out), ``cases_per_fold`` (fold -> number of cases), ``folds`` (fold -> case ids),
        ``n_cases``, ``seconds``.

    Raises:
        ConfigError: ``root`` is not a CV folder, or a classification one.
        DataError: unfinished folds, missing cases, or ``out`` is (or holds) the CV folder.
        RunExistsError: ``out`` exists and ``overwrite`` is false.
    """
    root, out = Path(root), Path(out)
    n_folds = cv_folds(root)
    check_output_folder(out, (root,), overwrite)
    start = time.perf_counter()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / PRED_DIR).mkdir(parents=True)
        (tmp / TRUTH_DIR).mkdir()
        if is_volumetric_model(root):
            folds, labels = _export_3d(root, n_folds, tmp)
        else:
            folds, labels = _export_2d(root, tmp)
        result = {
            "cv": str(root),
            "checkpoint": CV_CHECKPOINT,
            "postprocess": "none",
            "labels": {str(v): name for v, name in sorted(labels.items()) if v != 0},
            "cases_per_fold": {k: len(ids) for k, ids in folds.items()},
            "n_cases": sum(len(ids) for ids in folds.values()),
            "folds": folds,
            "seconds": round(time.perf_counter() - start, 2),
        }
        atomic_write_json(tmp / EXPORT_JSON, result)
        # the labels, nnU-Net v2 style, where `evaluate --pred/--truth` (and nnU-Net) look
        names = {name: int(v) for v, name in sorted(labels.items())}
        atomic_write_json(tmp / DATASET_JSON, {"labels": names, "file_ending": MASK_ENDING})
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "%d out-of-fold label maps of %d folds written to %s in %.1f s",
        result["n_cases"], n_folds, out, result["seconds"],
    )  # fmt: skip
    return result
