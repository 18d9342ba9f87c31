"""Dataset scanners: turn a dataset folder into a list of :class:`Sample`.

Layouts (``data.layout`` in the config):

* ``lgg``: the LGG FLAIR segmentation layout (Buda et al. 2019, Kaggle ``kaggle_3m``):
  ``<root>/<patient>/<name>.tif`` paired with ``<root>/<patient>/<name>_mask.tif``. The group of a
  sample is its patient folder, so no split can put slices of one patient on both sides.
* ``pairs``: ``<root>/images/<stem>.<ext>`` paired with ``<root>/masks/<stem>.<ext>`` (the mask may
  also be named ``<stem>_mask.<ext>``). Each image is its own group.
* ``class_folders``: ``<root>/<class>/*`` or ``<root>/Training/<class>/*`` and
  ``<root>/Testing/<class>/*`` (the Kaggle brain-tumour MRI layout). Class names are the sorted
  folder names. Each image is its own group (see *Grouping* for near-duplicates).
* ``dicom_series``: ``<root>/<patient>/<study>/<series>/*.dcm`` (the TCIA layout). In each study
  one image series and one mask series are picked by a substring of their SeriesDescription or
  folder name (``image_series``, ``mask_series``); the mask must have a slice at every position of
  the image and no other (ImagePositionPatient of :func:`medseg.io.slice_positions`, within a
  tenth of the slice spacing), the same size and orientation; otherwise the study is reported and
  skipped, never guessed. One sample per slice: ``image``/``target`` are the series folders and
  ``index`` the slice in the order :func:`medseg.io.read_image` gives a series folder (along the
  normal), the same in both volumes. The group is the patient folder.
* ``nifti``: ``<root>/images/<case>.nii[.gz]`` + ``<root>/labels/<case>.nii[.gz]``, or nnU-Net's
  ``imagesTr/<case>_0000.nii.gz`` + ``labelsTr/<case>.nii.gz``. One sample per slice along the
  first axis of the volume as :mod:`medseg.io` returns it; the group is the case.
* ``msd``: a ``dataset.json`` (Medical Segmentation Decathlon or nnU-Net) with ``imagesTr/`` and
  ``labelsTr/``: one sample per case (the whole volume, every channel), the group is the case
  (:mod:`medseg.data.scan_msd`). A folder holding a ``dataset.json`` is detected as ``msd``.

Problems (an image without a mask, a mask without an image, an empty class folder, a study without
exactly one matching image and mask series, a mask whose slices or size differ from the image's)
are collected in :attr:`ScanResult.problems` with the file or folder names; with ``strict=True``
the first one raises :class:`~medseg.errors.DataError` instead. Nothing is dropped silently: the
caller logs the list. Patient ids from DICOM headers are never put in ids, messages or logs; the
patient *folder* name (the user's own) is.

Grouping (:func:`scan_dataset`, ``group_by``): ``folder`` keeps the scanner's groups, ``none``
makes every sample its own group, ``phash`` groups near-duplicate 2D images
(:func:`medseg.data.dedup.group_near_duplicates`), ``auto`` is ``phash`` for class folders and
``folder`` otherwise. :func:`detect_layout` guesses the layout of a folder.

The 2D layouts are scanned here; ``dicom_series`` in :mod:`medseg.data.scan_dicom`, ``nifti`` in
:mod:`medseg.data.scan_nifti`, ``msd`` in :mod:`medseg.data.scan_msd`; :class:`Sample` and
:class:`ScanResult` are defined in :mod:`medseg.data.samples`.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path

from medseg.config import DataConfig
from medseg.data.samples import (
    Sample,
    ScanResult,
    add_problem,
    entries,
    natural_key,
    relative_id,
    require_dir,
    subdirs,
)
from medseg.data.scan_dicom import has_dicom, scan_dicom_series
from medseg.data.scan_msd import scan_msd
from medseg.data.scan_nifti import NIFTI_FOLDERS, nifti_files, scan_nifti
from medseg.errors import ConfigError, DataError
from medseg.io import list_image_files

logger = logging.getLogger(__name__)

MASK_SUFFIX = "_mask"
SPLIT_FOLDERS = ("Training", "Testing")


def scan_lgg(root: str | Path, strict: bool = False) -> ScanResult:
    """Scan the LGG layout ``<patient>/<name>.tif`` + ``<name>_mask.tif``."""
    root = Path(root)
    require_dir(root)
    result = ScanResult(root=root, layout="lgg", samples=[])
    patients = [p for p in entries(root) if p.is_dir() and not p.name.startswith(".")]
    for patient in patients:
        files = list_image_files(patient, recursive=False)
        masks = {f.stem[: -len(MASK_SUFFIX)]: f for f in files if f.stem.endswith(MASK_SUFFIX)}
        images = {f.stem: f for f in files if not f.stem.endswith(MASK_SUFFIX)}
        for stem in sorted(images, key=natural_key):
            if stem not in masks:
                add_problem(
                    result, f"{images[stem]}: image has no mask ({stem}{MASK_SUFFIX}.*)", strict
                )
                continue
            result.samples.append(
                Sample(
                    id=relative_id(images[stem], root),
                    image=str(images[stem]),
                    target=str(masks[stem]),
                    group=patient.name,
                )
            )
        for stem in sorted(set(masks) - set(images)):
            add_problem(result, f"{masks[stem]}: mask has no image ({stem}.*)", strict)
    if not result.samples:
        raise DataError(
            f"{root}: no image/mask pairs found in the 'lgg' layout "
            f"(<patient>/<name>.tif + <name>{MASK_SUFFIX}.tif)"
        )
    return result


def scan_pairs(root: str | Path, strict: bool = False) -> ScanResult:
    """Scan ``images/`` + ``masks/`` with matching stems."""
    root = Path(root)
    require_dir(root)
    img_dir, mask_dir = root / "images", root / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"{d}: folder not found (the 'pairs' layout needs images/ and masks/)")
    result = ScanResult(root=root, layout="pairs", samples=[])
    masks = {}
    for f in list_image_files(mask_dir):
        stem = f.relative_to(mask_dir).with_suffix("").as_posix()
        masks[stem.removesuffix(MASK_SUFFIX)] = f
    seen = set()
    for f in list_image_files(img_dir):
        stem = f.relative_to(img_dir).with_suffix("").as_posix()
        if stem not in masks:
            add_problem(result, f"{f}: image has no mask in {mask_dir}", strict)
            continue
        seen.add(stem)
        result.samples.append(
            Sample(id=relative_id(f, root), image=str(f), target=str(masks[stem]), group=stem)
        )
    for stem in sorted(set(masks) - seen):
        add_problem(result, f"{masks[stem]}: mask has no image in {img_dir}", strict)
    if not result.samples:
        raise DataError(f"{root}: no image/mask pairs found in images/ and masks/")
    return result


def scan_class_folders(root: str | Path, strict: bool = False) -> ScanResult:
    """Scan ``<class>/*`` or ``Training/<class>/*`` + ``Testing/<class>/*``."""
    root = Path(root)
    require_dir(root)
    split_dirs = [root / s for s in SPLIT_FOLDERS if (root / s).is_dir()]
    bases = [(d, d.name) for d in split_dirs] or [(root, None)]
    class_names = sorted(
        {c.name for base, _ in bases for c in entries(base) if c.is_dir() and c.name[0] != "."}
    )
    if len(class_names) < 2:
        raise DataError(
            f"{root}: classification needs at least 2 class folders, found {class_names or 'none'}"
        )
    result = ScanResult(root=root, layout="class_folders", samples=[], class_names=class_names)
    for base, split in bases:
        for index, name in enumerate(class_names):
            folder = base / name
            files = list_image_files(folder) if folder.is_dir() else []
            if not files:
                add_problem(result, f"{folder}: class folder is empty or missing", strict)
            for f in files:
                rel = relative_id(f, root)
                result.samples.append(
                    Sample(id=rel, image=str(f), target=index, group=rel, split=split)
                )
    if not result.samples:
        raise DataError(f"{root}: no images found in the class folders")
    return result


# ---------------------------------------------------------------------------------------------
# Registry, layout detection, grouping

SCANNERS = {
    "lgg": scan_lgg,
    "pairs": scan_pairs,
    "class_folders": scan_class_folders,
    "dicom_series": scan_dicom_series,
    "nifti": scan_nifti,
    "msd": scan_msd,
}

LAYOUT_HINTS = {
    "lgg": "<patient>/<name>.tif + <name>_mask.tif",
    "pairs": "images/ + masks/",
    "class_folders": "<class>/*.png or Training/<class>/ + Testing/<class>/",
    "dicom_series": "<patient>/<study>/<series>/*.dcm",
    "nifti": "images/ + labels/ (or imagesTr/ + labelsTr/) with .nii.gz volumes",
    "msd": "dataset.json + imagesTr/ + labelsTr/ (Medical Segmentation Decathlon, nnU-Net)",
}

GROUP_BY = ("auto", "folder", "phash", "none")


def detect_layout(root: str | Path) -> str:
    """Guess the layout of a dataset folder from its structure (a few folders are looked at).

    Raises:
        DataError: nothing fits; the message lists the layouts and what each looks like.
    """
    root = Path(root)
    require_dir(root)
    if (root / "dataset.json").is_file():
        return "msd"
    folders = subdirs(root)
    names = {d.name for d in folders}
    for img, lbl in NIFTI_FOLDERS:
        if img in names and lbl in names and nifti_files(root / img):
            return "nifti"
    if {"images", "masks"} <= names:
        return "pairs"
    if names & set(SPLIT_FOLDERS):
        return "class_folders"
    flat_images = 0
    for d in folders[:5]:
        files = list_image_files(d, recursive=False)
        if any(f.stem.endswith(MASK_SUFFIX) for f in files):
            return "lgg"
        flat_images += bool(files)
        for study in subdirs(d)[:2]:
            if any(has_dicom(series) for series in subdirs(study)[:4]):
                return "dicom_series"
    if len(folders) >= 2 and flat_images >= 2:
        return "class_folders"
    hints = "; ".join(f"{k}: {v}" for k, v in LAYOUT_HINTS.items())
    raise DataError(f"{root}: cannot tell the dataset layout; expected one of {hints}")


def scan_dataset(
    root: str | Path,
    layout: str,
    strict: bool = False,
    group_by: str = "auto",
    phash_threshold: int = 6,
    image_series: str = "",
    mask_series: str = "MaskTumor",
    slice_axis: int = 0,
) -> ScanResult:
    """Scan ``root`` with the scanner registered for ``layout`` and group the samples.

    Args:
        root: dataset folder.
        layout: a key of :data:`SCANNERS`, or ``auto`` (:func:`detect_layout`).
        strict: raise on the first unusable file instead of listing it in ``problems``.
        group_by: ``folder`` (the scanner's groups: patient folder, case), ``none`` (each
            sample alone; leaks slices of one volume across splits), ``phash`` (near-duplicate
            2D images share a group) or ``auto`` (``phash`` for class folders, else ``folder``).
        phash_threshold: largest Hamming distance between perceptual hashes of one group.
        image_series, mask_series: ``dicom_series`` only (see :func:`scan_dicom_series`).
        slice_axis: volume layouts: the axis 2D samples are cut along (0 axial, 1 coronal,
            2 sagittal for axially stored volumes; see :func:`medseg.data.volumes.reslice`).

    Raises:
        KeyError: unknown layout (the message lists the valid ones).
        ConfigError: unknown ``group_by``.
        DataError: the folder is missing, empty, or (strict) holds an unusable file.
    """
    if layout == "auto":
        layout = detect_layout(root)
    try:
        scanner = SCANNERS[layout]
    except KeyError:
        raise KeyError(f"unknown layout '{layout}'; valid layouts: {', '.join(SCANNERS)}") from None
    if group_by not in GROUP_BY:
        raise ConfigError(f"data.group_by: '{group_by}' is not one of {', '.join(GROUP_BY)}")
    if layout == "dicom_series":
        result = scanner(
            root,
            strict=strict,
            image_series=image_series,
            mask_series=mask_series,
            slice_axis=slice_axis,
        )
    elif layout == "nifti":
        result = scanner(root, strict=strict, slice_axis=slice_axis)
    else:
        result = scanner(root, strict=strict)
    result.samples = _regroup(result, group_by, phash_threshold)
    logger.info(
        "scanned %s (%s): %d samples, %d groups%s",
        root,
        layout,
        len(result.samples),
        len({s.group for s in result.samples}),
        f", {len(result.problems)} problems" if result.problems else "",
    )
    return result


def scan_from_config(data: DataConfig) -> ScanResult:
    """:func:`scan_dataset` with the fields of a :class:`medseg.config.DataConfig`."""
    return scan_dataset(
        data.root,
        data.layout,
        strict=data.strict,
        group_by=data.group_by,
        phash_threshold=data.phash_threshold,
        image_series=data.image_series,
        mask_series=data.mask_series,
        slice_axis=data.slice_axis,
    )


def _regroup(result: ScanResult, group_by: str, threshold: int) -> list[Sample]:
    samples = result.samples
    mode = group_by
    if mode == "auto":
        mode = "phash" if result.layout == "class_folders" else "folder"
    if mode == "folder":
        return samples
    if mode == "none":
        if any(s.index is not None for s in samples):
            logger.warning(
                "group_by 'none' puts slices of one volume in different groups: neighbouring "
                "slices can leak between train and validation"
            )
        return [replace(s, group=s.id) for s in samples]
    # phash
    if result.layout == "msd" or any(s.index is not None for s in samples):
        raise DataError(
            f"{result.root}: group_by 'phash' is for 2D images; '{result.layout}' volumes are "
            f"grouped by patient/case (use 'folder')"
        )
    if importlib.util.find_spec("medseg.data.dedup") is None:
        if group_by == "auto":
            logger.warning(
                "near-duplicate grouping (medseg.data.dedup) is not available: each image is "
                "its own group, so near-duplicates may leak between splits"
            )
            return samples
        raise DataError("group_by 'phash' needs medseg.data.dedup, which is not installed")
    from medseg.data.dedup import group_near_duplicates

    return list(group_near_duplicates(samples, threshold))
