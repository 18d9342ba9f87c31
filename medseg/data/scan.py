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
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import DataConfig
from medseg.errors import ConfigError, DataError
from medseg.io import is_dicom, list_image_files

logger = logging.getLogger(__name__)

MASK_SUFFIX = "_mask"
SPLIT_FOLDERS = ("Training", "Testing")


@dataclass(frozen=True)
class Sample:
    """One training or evaluation example.

    Attributes:
        id: stable id: the image path relative to the dataset root, with ``/`` separators, and
            ``#<index>`` for a slice of a volume.
        image: path of the image file, or of a volume (NIfTI file, DICOM series folder).
        target: mask path or folder (segmentation), class index (classification) or None.
        group: patient or near-duplicate group; all samples of a group stay on one side of a split.
        split: the split the dataset layout put it in (``Training``/``Testing``), if any.
        index: for a slice of a volume, its index along the volume's first axis (the same index
            in the image and the mask volume); None for 2D images.
    """

    id: str
    image: str
    target: str | int | None
    group: str
    split: str | None = None
    index: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScanResult:
    """What a scanner found: samples, class names (classification) and problems."""

    root: Path
    layout: str
    samples: list[Sample]
    class_names: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def log_problems(self) -> None:
        """Log every problem at WARNING level (file names only)."""
        for p in self.problems:
            logger.warning("%s", p)


def _problem(result: ScanResult, message: str, strict: bool) -> None:
    if strict:
        raise DataError(message)
    result.problems.append(message)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _require_dir(root: Path) -> None:
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    _entries(root)


def _entries(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted; a folder that cannot be listed is an error, not empty."""
    try:
        return sorted(folder.iterdir())
    except PermissionError:
        raise DataError(f"{folder}: permission denied; cannot list the folder") from None
    except OSError as e:
        raise DataError(f"{folder}: cannot list the folder ({e.strerror or e})") from None


def scan_lgg(root: str | Path, strict: bool = False) -> ScanResult:
    """Scan the LGG layout ``<patient>/<name>.tif`` + ``<name>_mask.tif``."""
    root = Path(root)
    _require_dir(root)
    result = ScanResult(root=root, layout="lgg", samples=[])
    patients = [p for p in _entries(root) if p.is_dir() and not p.name.startswith(".")]
    for patient in patients:
        files = list_image_files(patient, recursive=False)
        masks = {f.stem[: -len(MASK_SUFFIX)]: f for f in files if f.stem.endswith(MASK_SUFFIX)}
        images = {f.stem: f for f in files if not f.stem.endswith(MASK_SUFFIX)}
        for stem in sorted(images, key=natural_key):
            if stem not in masks:
                _problem(
                    result, f"{images[stem]}: image has no mask ({stem}{MASK_SUFFIX}.*)", strict
                )
                continue
            result.samples.append(
                Sample(
                    id=_rel(images[stem], root),
                    image=str(images[stem]),
                    target=str(masks[stem]),
                    group=patient.name,
                )
            )
        for stem in sorted(set(masks) - set(images)):
            _problem(result, f"{masks[stem]}: mask has no image ({stem}.*)", strict)
    if not result.samples:
        raise DataError(
            f"{root}: no image/mask pairs found in the 'lgg' layout "
            f"(<patient>/<name>.tif + <name>{MASK_SUFFIX}.tif)"
        )
    return result


def scan_pairs(root: str | Path, strict: bool = False) -> ScanResult:
    """Scan ``images/`` + ``masks/`` with matching stems."""
    root = Path(root)
    _require_dir(root)
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
            _problem(result, f"{f}: image has no mask in {mask_dir}", strict)
            continue
        seen.add(stem)
        result.samples.append(
            Sample(id=_rel(f, root), image=str(f), target=str(masks[stem]), group=stem)
        )
    for stem in sorted(set(masks) - seen):
        _problem(result, f"{masks[stem]}: mask has no image in {img_dir}", strict)
    if not result.samples:
        raise DataError(f"{root}: no image/mask pairs found in images/ and masks/")
    return result


def scan_class_folders(root: str | Path, strict: bool = False) -> ScanResult:
    """Scan ``<class>/*`` or ``Training/<class>/*`` + ``Testing/<class>/*``."""
    root = Path(root)
    _require_dir(root)
    split_dirs = [root / s for s in SPLIT_FOLDERS if (root / s).is_dir()]
    bases = [(d, d.name) for d in split_dirs] or [(root, None)]
    class_names = sorted(
        {c.name for base, _ in bases for c in _entries(base) if c.is_dir() and c.name[0] != "."}
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
                _problem(result, f"{folder}: class folder is empty or missing", strict)
            for f in files:
                rel = _rel(f, root)
                result.samples.append(
                    Sample(id=rel, image=str(f), target=index, group=rel, split=split)
                )
    if not result.samples:
        raise DataError(f"{root}: no images found in the class folders")
    return result


# ---------------------------------------------------------------------------------------------
# DICOM series: <root>/<patient>/<study>/<series>/*.dcm

#: Largest distance between matching image and mask slices, as a fraction of the slice spacing.
POSITION_TOLERANCE = 0.1
# Smallest |cosine| between image and mask row/column directions that counts as the same plane.
_ORIENTATION_COS = 0.999


class _SeriesError(Exception):
    """A series folder cannot be used; the message says why (no patient ids in it)."""


@dataclass
class _Series:
    folder: Path
    description: str  # SeriesDescription ('' when absent)
    files: list[Path]


def _dicom_files(folder: Path) -> list[Path]:
    return [
        f
        for f in list_image_files(folder, recursive=False)
        if f.suffix.lower() == ".dcm" or is_dicom(f)
    ]


def _subdirs(folder: Path) -> list[Path]:
    return [p for p in _entries(folder) if p.is_dir() and not p.name.startswith(".")]


def _read_header(path: Path) -> Any:
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as e:  # pydicom raises many types for broken files
        raise _SeriesError(f"{path}: unreadable DICOM header ({type(e).__name__})") from None


def _series_description(files: list[Path]) -> str:
    ds = _read_header(files[0])
    return str(ds.get("SeriesDescription", "") or "").strip()


def _plane(series: _Series) -> tuple[tuple[int, int], np.ndarray | None]:
    """(rows, columns) and the 6 direction cosines of the series' first file (None if absent)."""
    ds = _read_header(series.files[0])
    try:
        size = (int(ds.Rows), int(ds.Columns))
    except (AttributeError, TypeError, ValueError):
        raise _SeriesError(f"{series.files[0]}: no Rows/Columns (not an image)") from None
    iop = ds.get("ImageOrientationPatient")
    if iop is None:  # enhanced multi-frame: shared functional groups
        shared = ds.get("SharedFunctionalGroupsSequence")
        seq = shared[0].get("PlaneOrientationSequence") if shared else None
        iop = seq[0].get("ImageOrientationPatient") if seq else None
    try:
        cosines = np.array([float(v) for v in iop], dtype=np.float64) if iop else None
    except (TypeError, ValueError):
        cosines = None
    return size, cosines if cosines is not None and cosines.shape == (6,) else None


def _positions(folder: Path) -> np.ndarray:
    """(D, 3) slice positions in the order medseg.io reads the series."""
    from medseg.io import slice_positions

    try:
        return np.asarray(slice_positions(folder), dtype=np.float64).reshape(-1, 3)
    except DataError as e:
        raise _SeriesError(str(e)) from None


def _norm_text(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def _matches(series: _Series, query: str) -> bool:
    q = _norm_text(query)
    return bool(q) and (q in _norm_text(series.description) or q in _norm_text(series.folder.name))


def _pick(candidates: list[_Series], query: str) -> list[_Series]:
    """Narrow several matches to the one whose description or folder *equals* the query."""
    if len(candidates) <= 1:
        return candidates
    q = _norm_text(query)
    exact = [s for s in candidates if q in (_norm_text(s.description), _norm_text(s.folder.name))]
    return exact if len(exact) == 1 else candidates


def _describe_series(series: list[_Series]) -> str:
    return ", ".join(f"'{s.folder.name}' ({s.description or 'no description'})" for s in series)


def _align(image: _Series, mask: _Series, study: Path) -> int:
    """Check that the mask has exactly the image's slices, in the same places; returns the count.

    Positions come from :func:`medseg.io.slice_positions` (the order of the volumes that
    :func:`medseg.io.read_image` / :func:`~medseg.io.read_mask` give), matched in 3D with
    :func:`medseg.io.match_slice_positions` within :data:`POSITION_TOLERANCE` x slice spacing.
    """
    from medseg.io import match_slice_positions

    (img_size, img_cos), (msk_size, msk_cos) = _plane(image), _plane(mask)
    if img_size != msk_size:
        raise _SeriesError(
            f"{study}: mask slices are {msk_size[0]}x{msk_size[1]} but image slices are "
            f"{img_size[0]}x{img_size[1]} (rows x columns)"
        )
    if img_cos is not None and msk_cos is not None:
        row, col = (
            img_cos[:3] / np.linalg.norm(img_cos[:3]),
            img_cos[3:] / np.linalg.norm(img_cos[3:]),
        )
        mrow, mcol = (
            msk_cos[:3] / np.linalg.norm(msk_cos[:3]),
            msk_cos[3:] / np.linalg.norm(msk_cos[3:]),
        )
        if float(row @ mrow) < _ORIENTATION_COS or float(col @ mcol) < _ORIENTATION_COS:
            raise _SeriesError(
                f"{study}: mask and image series have different slice orientations "
                f"(ImageOrientationPatient); study skipped"
            )
    img_pos, msk_pos = _positions(image.folder), _positions(mask.folder)
    steps = np.linalg.norm(np.diff(img_pos, axis=0), axis=1)
    spacing = float(np.median(steps)) if len(steps) else 1.0
    tol = POSITION_TOLERANCE * spacing if spacing > 0 else 1e-3
    mask_on_image = match_slice_positions(img_pos, msk_pos, tol)
    image_on_mask = match_slice_positions(msk_pos, img_pos, tol)
    if (mask_on_image < 0).any() or (image_on_mask < 0).any():
        normal = np.cross(img_cos[:3], img_cos[3:]) if img_cos is not None else None

        def where(points: np.ndarray) -> str:
            return f"{float(points @ normal):.2f} mm" if normal is not None else str(points)

        parts = []
        if (mask_on_image < 0).any():
            k = int((mask_on_image < 0).sum())
            parts.append(
                f"{k} mask slice(s) at positions the image lacks "
                f"(e.g. {where(msk_pos[mask_on_image < 0][0])})"
            )
        if (image_on_mask < 0).any():
            k = int((image_on_mask < 0).sum())
            parts.append(
                f"{k} image slice(s) without a mask slice "
                f"(e.g. {where(img_pos[image_on_mask < 0][0])})"
            )
        raise _SeriesError(
            f"{study}: mask and image slices are not aligned ({'; '.join(parts)}; "
            f"tolerance {tol:.3g} mm); study skipped"
        )
    if not np.array_equal(mask_on_image, np.arange(len(img_pos))):  # pragma: no cover
        raise _SeriesError(f"{study}: mask slices are in a different order than image slices")
    return len(img_pos)


def scan_dicom_series(
    root: str | Path,
    strict: bool = False,
    image_series: str = "",
    mask_series: str = "MaskTumor",
    slice_axis: int = 0,
) -> ScanResult:
    """Scan ``<root>/<patient>/<study>/<series>/*.dcm``: one sample per image slice.

    Args:
        root: dataset folder.
        strict: raise on the first problem instead of collecting it.
        image_series: substring (case and punctuation ignored) of the image series'
            SeriesDescription or folder name, e.g. ``T1post``. Empty: the one series of the study
            that is not the mask.
        mask_series: substring of the mask series' description or folder name, e.g.
            ``MaskTumor`` (matches ``Mask_Tumor`` too).
        slice_axis: axis of the volume the 2D samples are cut along (see
            :func:`medseg.data.volumes.reslice`).
    """
    root = Path(root)
    _require_dir(root)
    if not _norm_text(mask_series):
        raise ConfigError("data.mask_series: empty; name the mask series, e.g. 'MaskTumor'")
    result = ScanResult(root=root, layout="dicom_series", samples=[])
    for patient in _subdirs(root):
        studies = _subdirs(patient)
        if not studies:
            _problem(result, f"{patient}: no study folders (<patient>/<study>/<series>)", strict)
        for study in studies:
            try:
                result.samples.extend(
                    _scan_study(root, patient, study, image_series, mask_series, slice_axis)
                )
            except _SeriesError as e:
                _problem(result, str(e), strict)
    if not result.samples:
        raise DataError(
            f"{root}: no aligned image/mask series found in the 'dicom_series' layout "
            f"(<patient>/<study>/<series>/*.dcm){_first_problems(result)}"
        )
    return result


def _first_problems(result: ScanResult, n: int = 3) -> str:
    if not result.problems:
        return ""
    return "; problems: " + " | ".join(result.problems[:n])


def _scan_study(
    root: Path,
    patient: Path,
    study: Path,
    image_series: str,
    mask_series: str,
    slice_axis: int = 0,
) -> list[Sample]:
    series = []
    for folder in _subdirs(study):
        files = _dicom_files(folder)
        if files:
            series.append(_Series(folder, _series_description(files), files))
    if not series:
        raise _SeriesError(f"{study}: no series folders with DICOM files")
    masks = _pick([s for s in series if _matches(s, mask_series)], mask_series)
    if len(masks) != 1:
        raise _SeriesError(
            f"{study}: {'several' if masks else 'no'} series match mask_series '{mask_series}'"
            f" (series: {_describe_series(masks or series)})"
        )
    others = [s for s in series if s is not masks[0]]
    if _norm_text(image_series):
        images = _pick([s for s in others if _matches(s, image_series)], image_series)
    else:
        images = others
    if len(images) != 1:
        what = f"match image_series '{image_series}'" if image_series else "could be the image"
        raise _SeriesError(
            f"{study}: {'several' if images else 'no'} series {what}"
            f" (series: {_describe_series(images or others)}); set data.image_series"
        )
    image, mask = images[0], masks[0]
    n = _align(image, mask, study)
    if slice_axis:
        rows_cols, _ = _plane(image)
        n = rows_cols[slice_axis - 1]
    rel = _rel(image.folder, root)
    return [
        Sample(
            id=f"{rel}#{i}",
            image=str(image.folder),
            target=str(mask.folder),
            group=patient.name,
            index=i,
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# NIfTI: images/<case>.nii.gz + labels/<case>.nii.gz (or nnU-Net imagesTr/ + labelsTr/)

NIFTI_FOLDERS = (("images", "labels"), ("imagesTr", "labelsTr"))
_NNUNET_CHANNEL = re.compile(r"^(.*)_(\d{4})$")
#: medseg.io reads a NIfTI volume as (slice, row, col) = canonical (RAS) axes (k, j, i), so
#: axis ``a`` of the array the reader returns is canonical axis ``2 - a``.
NIFTI_SLICE_AXIS = 2


def _nifti_stem(path: Path) -> str | None:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _nifti_files(folder: Path) -> dict[str, Path]:
    out = {}
    for f in _entries(folder):
        stem = _nifti_stem(f)
        if stem and f.is_file() and not f.name.startswith("."):
            out[stem] = f
    return out


def _canonical_shape(path: Path) -> tuple[int, ...]:
    """Spatial shape (3 axes) after reorientation to the closest canonical (RAS) axes."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(d) for d in img.shape)
    except Exception as e:  # nibabel raises several types for broken files
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise _SeriesError(f"{path}: unreadable NIfTI header ({reason})") from None
    if len(shape) == 4 and shape[3] == 1 or len(shape) == 5 and shape[3:] == (1, 1):
        shape = shape[:3]
    if len(shape) not in (3, 4):
        raise _SeriesError(f"{path}: expected a 3D volume (or 3D + channels), shape is {shape}")
    if 0 in shape:
        raise _SeriesError(f"{path}: NIfTI image is empty (shape {shape})")
    try:
        ornt = nib.io_orientation(img.affine)
        targets = [int(target) for target, _flip in ornt[:3]]
    except Exception:  # NaN or singular affine
        raise _SeriesError(
            f"{path}: NIfTI affine is singular or not finite; the header is corrupt"
        ) from None
    canonical = [0, 0, 0]
    for axis, target in enumerate(targets):
        canonical[target] = shape[axis]
    return tuple(canonical)


def scan_nifti(root: str | Path, strict: bool = False, slice_axis: int = 0) -> ScanResult:
    """Scan ``images/`` + ``labels/`` (or ``imagesTr/`` + ``labelsTr/``) NIfTI volumes.

    One sample per slice along ``slice_axis`` of the volume as :func:`medseg.io.read_image`
    returns it (0: axial), counted from the header alone.
    """
    root = Path(root)
    _require_dir(root)
    pairs = [(root / i, root / m) for i, m in NIFTI_FOLDERS if (root / i).is_dir()]
    if not pairs:
        raise DataError(
            f"{root}: folder not found (the 'nifti' layout needs images/ + labels/ or "
            f"imagesTr/ + labelsTr/)"
        )
    result = ScanResult(root=root, layout="nifti", samples=[])
    cases: list[tuple[str, Path, Path, tuple[int, ...]]] = []
    for img_dir, lbl_dir in pairs:
        if not lbl_dir.is_dir():
            raise DataError(f"{lbl_dir}: folder not found (labels for {img_dir.name}/)")
        labels = _nifti_files(lbl_dir)
        used = set()
        for stem, f in _nifti_files(img_dir).items():
            case, channel = stem, 0
            m = _NNUNET_CHANNEL.match(stem)
            if stem not in labels and m and m.group(1) in labels:
                case, channel = m.group(1), int(m.group(2))
            if case not in labels:
                _problem(result, f"{f}: image has no label in {lbl_dir}", strict)
                continue
            if channel:
                _problem(result, f"{f}: extra channel file ignored (only _0000 is read)", strict)
                continue
            used.add(case)
            try:
                shape = _canonical_shape(f)
                lshape = _canonical_shape(labels[case])
            except _SeriesError as e:
                _problem(result, str(e), strict)
                continue
            if shape[:3] != lshape[:3]:
                _problem(
                    result,
                    f"{labels[case]}: label shape {lshape} differs from image shape "
                    f"{shape[:3]} ({f.name})",
                    strict,
                )
                continue
            cases.append((case, f, labels[case], shape))
        for case in sorted(set(labels) - used):
            _problem(result, f"{labels[case]}: label has no image in {img_dir}", strict)
    for case, f, label, shape in cases:
        depth = shape[NIFTI_SLICE_AXIS - slice_axis]
        rel = _rel(f, root)
        result.samples.extend(
            Sample(id=f"{rel}#{i}", image=str(f), target=str(label), group=case, index=i)
            for i in range(depth)
        )
    if not result.samples:
        raise DataError(f"{root}: no image/label volume pairs found{_first_problems(result)}")
    return result


# ---------------------------------------------------------------------------------------------
# Registry, layout detection, grouping

SCANNERS = {
    "lgg": scan_lgg,
    "pairs": scan_pairs,
    "class_folders": scan_class_folders,
    "dicom_series": scan_dicom_series,
    "nifti": scan_nifti,
}

LAYOUT_HINTS = {
    "lgg": "<patient>/<name>.tif + <name>_mask.tif",
    "pairs": "images/ + masks/",
    "class_folders": "<class>/*.png or Training/<class>/ + Testing/<class>/",
    "dicom_series": "<patient>/<study>/<series>/*.dcm",
    "nifti": "images/ + labels/ (or imagesTr/ + labelsTr/) with .nii.gz volumes",
}

GROUP_BY = ("auto", "folder", "phash", "none")


def _has_dicom(folder: Path, limit: int = 5) -> bool:
    checked = 0
    for f in _entries(folder):
        if not f.is_file() or f.name.startswith("."):
            continue
        if f.suffix.lower() == ".dcm" or is_dicom(f):
            return True
        checked += 1
        if checked >= limit:
            return False
    return False


def detect_layout(root: str | Path) -> str:
    """Guess the layout of a dataset folder from its structure (a few folders are looked at).

    Raises:
        DataError: nothing fits; the message lists the layouts and what each looks like.
    """
    root = Path(root)
    _require_dir(root)
    subdirs = _subdirs(root)
    names = {d.name for d in subdirs}
    for img, lbl in NIFTI_FOLDERS:
        if img in names and lbl in names and _nifti_files(root / img):
            return "nifti"
    if {"images", "masks"} <= names:
        return "pairs"
    if names & set(SPLIT_FOLDERS):
        return "class_folders"
    flat_images = 0
    for d in subdirs[:5]:
        files = list_image_files(d, recursive=False)
        if any(f.stem.endswith(MASK_SUFFIX) for f in files):
            return "lgg"
        flat_images += bool(files)
        for study in _subdirs(d)[:2]:
            if any(_has_dicom(series) for series in _subdirs(study)[:4]):
                return "dicom_series"
    if len(subdirs) >= 2 and flat_images >= 2:
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
    if any(s.index is not None for s in samples):
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


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically (``a_2`` before ``a_10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
