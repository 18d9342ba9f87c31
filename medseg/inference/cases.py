"""Cases of a batch prediction: what ``medseg predict`` makes of its inputs, and reading them.

:func:`collect_cases` turns the inputs (files and folders) into cases. A file given by name is one
case. A folder is walked (sub-folders too; hidden files and folders, ``DICOMDIR`` and obvious
non-images such as ``.txt``/``.json`` are skipped; files named ``*_mask.*`` are masks of a
dataset and are skipped with a count in the log). In each folder:

* the single-frame DICOM files (``.dcm`` or the ``DICM`` marker; headers are read first) are
  grouped by SeriesInstanceUID: a group of two or more files with image positions is a DICOM
  series case, read with :func:`medseg.io.read_dicom_series` (several series in one folder are
  several cases; a series is read within its own folder, a series spread over sub-folders gives
  one case per folder). A group of one file, and the files of a group without any
  ImagePositionPatient (projection images, secondary captures), are 2D cases;
* multi-frame DICOM files and NIfTI files are volume cases, plain images (PNG, JPEG, TIFF, BMP)
  2D cases (a multi-page TIFF is a volume);
* a file whose DICOM header cannot be read, or a ``.dcm`` file that is not DICOM, is an error
  case: it gets a row with ``status`` ``error`` and the file in ``error``.

Case ids are file-name safe and unique (``_2``, ``_3``, ... on a clash): the file name without
its suffix for files; ``<folder>_<SeriesNumber>`` for a series (or ``<folder>_<8 hex digits of
the SHA-256 of the SeriesInstanceUID>`` when the series has no number or shares it with another
series of the folder). DICOM header values that identify the patient (PatientName, PatientID,
birth and study dates, ...) are never used in names, tables or logs, unless ``keep_identifiers``
asks for DICOM cases named after the PatientID (still file-name safe) and
``patient_id``/``patient_name``/``study_date`` columns.

:class:`CaseReader` reads the cases one at a time (a series reads only its own files).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import DataError
from medseg.io import (
    IMAGE_SUFFIXES,
    DicomHeader,
    Image,
    image_suffix,
    is_dicom,
    read_dicom_files,
    read_dicom_header,
    read_image,
)
from medseg.io.base import raise_walk_error
from medseg.io.dicom_series import NON_IMAGE_NAMES, NON_IMAGE_SUFFIXES
from medseg.utils import safe_name

logger = logging.getLogger(__name__)


@dataclass
class Case:
    """One unit of prediction: an image file, a volume file, a DICOM series, or an error.

    Attributes:
        case_id: file-name safe, unique id; the case's outputs go to ``<out>/<case_id>/``.
        source: the file, or the folder of a series, as the user gave it.
        kind: ``"file"`` (read with :func:`medseg.io.read_image`), ``"series"`` (read with
            :func:`medseg.io.read_dicom_series`) or ``"error"`` (could not be read at all).
        paths: the file, or the files of the series (in file-name order).
        error: why an ``"error"`` case cannot be read.
        series_number: SeriesNumber of a series case.
    """

    case_id: str
    source: str
    kind: str
    paths: tuple[Path, ...]
    error: str = ""
    series_number: int | None = None
    series_uid: str | None = field(default=None, repr=False)
    folder: Path | None = field(default=None, repr=False)
    # The folder holds nothing but the DICOM series it was split into.
    folder_clean: bool = field(default=False, repr=False)
    # PatientID, PatientName, StudyDate: only with keep_identifiers (see collect_cases)
    identifiers: dict | None = field(default=None, repr=False)


def collect_cases(inputs: list[str | Path], *, keep_identifiers: bool = False) -> list[Case]:
    """Expand files and folders into cases (see the module docstring), with unique ids.

    Args:
        inputs: files and folders.
        keep_identifiers: name DICOM cases after the patient, ``<PatientID>_<usual id>``
            (made file-name safe: no separators, at most 64 characters), and carry
            ``patient_id``, ``patient_name`` and ``study_date`` into the rows. Off by default:
            case ids, tables and logs then hold no DICOM patient or study data.

    Raises:
        DataError: an input does not exist, or a folder holds no supported file.
    """
    cases: list[Case] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found, masks = _walk(item)
            if masks:
                logger.info("%s: skipping %d mask files (*_mask.*)", item, masks)
            if not found:
                raise DataError(f"{item}: folder holds no image or DICOM files")
            cases.extend(found)
        elif item.is_file():
            cases.append(Case(file_stem(item), str(item), "file", (item,)))
        else:
            raise DataError(f"{item}: input not found")
    if keep_identifiers:
        _name_after_patients(cases)
    seen: set[str] = set()
    for case in cases:
        base = safe_name(case.case_id)
        case_id, n = base, 1
        while case_id in seen:
            n += 1
            case_id = f"{base}_{n}"
        seen.add(case_id)
        case.case_id = case_id
    return cases


def _walk(root: Path) -> tuple[list[Case], int]:
    cases: list[Case] = []
    masks = 0
    for folder, dirs, files in os.walk(root, onerror=raise_walk_error):  # never skip silently
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found, n = _folder_cases(Path(folder), sorted(files))
        cases.extend(found)
        masks += n
    return cases, masks


def _folder_cases(folder: Path, names: list[str]) -> tuple[list[Case], int]:
    """The cases directly in ``folder`` and the number of mask files skipped."""
    singles: list[Case] = []  # files and errors, in file-name order
    headers: list[DicomHeader] = []
    masks = 0
    clean = True  # every file _scan of read_dicom_series would look at is a series slice
    for name in names:
        path = folder / name
        if name.startswith(".") or name.lower() in NON_IMAGE_NAMES:
            continue
        suffix = image_suffix(path)
        if suffix in NON_IMAGE_SUFFIXES:
            continue
        if file_stem(path).endswith("_mask"):
            masks += 1
            clean = False
            continue
        dicom = suffix == ".dcm" or (suffix not in IMAGE_SUFFIXES and is_dicom(path))
        if not dicom:
            clean = False
            if suffix in IMAGE_SUFFIXES:
                singles.append(Case(file_stem(path), str(path), "file", (path,)))
            else:
                logger.debug("%s: skipped (not an image)", path)
            continue
        try:
            header = read_dicom_header(path)
        except DataError as e:
            clean = False
            singles.append(Case(file_stem(path), str(path), "error", (path,), error=str(e)))
            continue
        if header is None:  # a DICOM object without an image (SR, ...); the reader skips it too
            continue
        if header.frames > 1 or header.series_uid is None:
            clean = False
            singles.append(Case(file_stem(path), str(path), "file", (path,)))
        else:
            headers.append(header)

    groups: dict[str, list[DicomHeader]] = {}
    for header in headers:
        groups.setdefault(header.series_uid, []).append(header)
    series: list[list[DicomHeader]] = []
    for group in groups.values():
        if len(group) > 1 and any(h.positioned for h in group):
            series.append(group)
        else:
            if len(group) > 1:
                logger.info(
                    "%s: %d DICOM files of one series without ImagePositionPatient; predicted "
                    "as separate 2D images",
                    folder,
                    len(group),
                )
                clean = False
            singles.extend(Case(file_stem(h.path), str(h.path), "file", (h.path,)) for h in group)
    singles.sort(key=lambda c: c.paths[0].name)

    numbers = [g[0].series_number for g in series]
    series.sort(key=lambda g: (g[0].series_number is None, g[0].series_number or 0, g[0].path))
    cases = []
    folder_name = folder.resolve().name
    for group in series:
        uid, number = group[0].series_uid, group[0].series_number
        if number is not None and numbers.count(number) == 1:
            tag = str(number)
        else:
            tag = hashlib.sha256(str(uid).encode()).hexdigest()[:8]
        cases.append(
            Case(
                f"{folder_name}_{tag}",
                str(folder),
                "series",
                tuple(h.path for h in group),
                series_number=number,
                series_uid=uid,
                folder=folder,
                folder_clean=clean,
            )
        )
    return cases + singles, masks


def file_stem(path: Path) -> str:
    """File name without its suffix (both of ``.nii.gz``)."""
    name = path.name
    if image_suffix(path) == ".nii.gz":
        return name[: -len(".nii.gz")]
    return path.stem


def _name_after_patients(cases: list[Case]) -> None:
    """``keep_identifiers``: prefix the ids of DICOM cases with their PatientID and attach the
    patient's identifiers (the ids are made file-name safe afterwards)."""
    for case in cases:
        if case.kind not in ("series", "file") or not (
            case.kind == "series" or is_dicom(case.paths[0])
        ):
            continue
        try:
            header = read_dicom_header(case.paths[0])
        except (DataError, OSError):  # the reader reports unreadable files in the case's row
            continue
        if header is None:
            continue
        ids = {
            "patient_id": header.patient_id or "",
            "patient_name": header.patient_name or "",
            "study_date": header.study_date or "",
        }
        case.identifiers = ids
        if ids["patient_id"]:
            case.case_id = f"{ids['patient_id']}_{case.case_id}"


class CaseReader:
    """Reads cases, one at a time: a series case reads only its own files, so memory holds one
    case's pixels whatever the number of cases or of series in a folder."""

    def read(self, case: Case) -> Image:
        """The image or volume of ``case`` (not an ``"error"`` case).

        Raises:
            DataError: the case cannot be read.
        """
        if case.kind != "series":
            return read_image(case.paths[0])
        return _read_series_alone(case)


def _read_series_alone(case: Case) -> Image:
    """Read the files of one series on their own (its folder may hold other, broken files)."""
    assert case.folder is not None
    images = read_dicom_files(case.paths, folder=case.folder)
    if len(images) != 1:
        raise DataError(f"{case.folder}: the files of series {case.series_number} split apart")
    image = images[0]
    image.meta.extra["folder"] = str(case.folder)
    return image
