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

Symbolic links among the inputs are followed, with a row each way (a case, or a refusal):

* a link to a file is a case of its own (``source`` is the link's path), also when the file lies
  outside the inputs (one log line counts those and names the first);
* a link to a folder is walked like a folder (``source`` under the link's path), after the
  inputs, with a log line naming the link, its target and whether it lies outside the inputs;
* refused with an ``error`` row naming the link and the reason: a link loop (a link to itself,
  or to a folder that holds it), a dangling link, and a link to a file or folder this batch
  already reads by another path (not predicted twice) or into a medseg output folder.

An input given by name is followed whatever it is. medseg's own prediction outputs (a folder with
its ``predictions.json`` or an unfinished batch's ``.medseg-predict/``) are never inputs: such a
folder is skipped with a log line (given by name, it is refused).

Case ids are file-name safe and unique (``_2``, ``_3``, ... on a clash): the file name without
its suffix for files; ``<folder>_<SeriesNumber>`` for a series (or ``<folder>_<8 hex digits of
the SHA-256 of the SeriesInstanceUID>`` when the series has no number or shares it with another
series of the folder). Any byte sequence the file system allows is a file name: the id of a name
that is not valid UTF-8 is its safe part and 8 hex digits of the SHA-256 of its bytes
(``scan_\\xff\\xfe.png`` -> ``scan_ae440d68``), so that it is stable across reruns and two such
names never share one; tables and logs show the name with backslash escapes
(:func:`medseg.utils.display_text`).

DICOM header values that identify the patient (PatientName, PatientID, birth and study dates,
...) are never used in names, tables or logs, unless ``keep_identifiers`` asks for DICOM cases
named after the PatientID (still file-name safe) and ``patient_id``/``patient_name``/
``study_date`` columns.

:class:`CaseReader` reads the cases one at a time (a series reads only its own files).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import DataError
from medseg.inference.batch import BATCH_STATE
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
from medseg.utils import display_text, safe_name

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
        DataError: an input does not exist (or is a broken symbolic link), a folder holds no
            supported file, or an input folder is a medseg prediction output.
    """
    scan = _Scan(roots=[_real(Path(i)) for i in inputs])
    cases: list[Case] = []
    for item in map(Path, inputs):
        if item.is_dir():
            if _prediction_output(item):
                raise DataError(
                    f"{display_text(str(item))}: is a medseg prediction output folder "
                    "(predictions.json); its masks and overlays are not inputs"
                )
            links = len(scan.links)
            found = _walk(item, scan)
            if scan.masks:
                logger.info("%s: skipping %d mask files (*_mask.*)", _shown(item), scan.masks)
                scan.masks = 0
            if not found and len(scan.links) == links:
                raise DataError(f"{display_text(str(item))}: folder holds no image or DICOM files")
            cases.extend(found)
        elif item.is_file():
            cases.append(Case(file_stem(item), str(item), "file", (item,)))
        elif item.is_symlink():
            raise DataError(_broken_link(item))
        else:
            raise DataError(f"{display_text(str(item))}: input not found")
    cases.extend(_follow_folder_links(scan))
    _check_file_links(cases, scan)
    if keep_identifiers:
        _name_after_patients(cases)
    seen: set[str] = set()
    for case in cases:
        base = case_id_base(case.case_id)
        case_id, n = base, 1
        while case_id in seen:
            n += 1
            case_id = f"{base}_{n}"
        seen.add(case_id)
        case.case_id = case_id
    return cases


def case_id_base(name: str) -> str:
    """The file-name safe id of a case named ``name`` (before clashes are numbered).

    A name that is not valid UTF-8 (undecodable bytes kept as surrogate escapes) or holds
    control characters gets 8 hex digits of the SHA-256 of its bytes after its safe part: stable
    across reruns, and distinct for two names whose safe parts are the same.
    """
    base = safe_name(name)
    if display_text(name) != name:
        try:
            raw = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = name.encode("utf-8", "surrogatepass")
        base = f"{safe_name(name, max_len=55)}_{hashlib.sha256(raw).hexdigest()[:8]}"
    return base


@dataclass
class _Scan:
    """What the walk over the inputs has seen (see :func:`collect_cases`)."""

    roots: list[Path]  # the inputs, resolved
    visited: set[Path] = field(default_factory=set)  # folders walked (resolved)
    outputs: list[Path] = field(default_factory=list)  # medseg output folders (resolved)
    links: list[Path] = field(default_factory=list)  # folder links still to follow
    masks: int = 0


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a link loop
        return path.absolute()


def _shown(path: Path | str) -> str:
    """A path as logs and messages show it (:func:`medseg.utils.display_text`)."""
    return display_text(str(path))


def _outside(target: Path, scan: _Scan) -> bool:
    return not any(target == root or root in target.parents for root in scan.roots)


def _broken_link(path: Path) -> str:
    """Why the symbolic link ``path`` cannot be followed: a loop, or a missing target."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{_shown(path)}: symbolic link loop (the link points back to itself)"
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return f"{_shown(path)}: dangling symbolic link: its target {_shown(target)!r} does not exist"


def _link_error(link: Path, message: str) -> Case:
    """The ``error`` case (a row) of a symbolic link that is not followed."""
    return Case(file_stem(link), str(link), "error", (link,), error=message)


def _prediction_output(folder: Path, names: list[str] | None = None) -> bool:
    """Whether ``folder`` is a medseg prediction output folder: it holds an unfinished batch's
    :data:`~medseg.inference.batch.BATCH_STATE` folder, or the ``predictions.json`` that medseg
    writes (a list of rows with ``case_id`` and ``status``)."""
    if names is None:
        try:
            names = os.listdir(folder)
        except OSError:
            return False
    if BATCH_STATE in names:
        return True
    if "predictions.json" not in names:
        return False
    try:
        rows = json.loads((folder / "predictions.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rows, list) and all(
        isinstance(r, dict) and "case_id" in r and "status" in r for r in rows
    )


def _walk(root: Path, scan: _Scan, followed: bool = False) -> list[Case]:
    """The cases of the folder ``root`` and its sub-folders; folder links are queued in
    ``scan.links`` (followed after the inputs), medseg's output folders skipped with a log line.
    Walking a followed link (``followed``), folders already walked are not walked again."""
    cases: list[Case] = []
    for folder, dirs, files in os.walk(root, onerror=raise_walk_error):  # never skip silently
        here = Path(folder)
        if _prediction_output(here, [*dirs, *files]):
            logger.info("%s: a medseg prediction output folder; not read as input", _shown(here))
            scan.outputs.append(_real(here))
            dirs[:] = []
            continue
        scan.visited.add(_real(here))
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            path = here / name
            if path.is_symlink():
                scan.links.append(path)
            elif followed and _real(path) in scan.visited:
                logger.info("%s: already read by another path; not read again", _shown(path))
            else:
                kept.append(name)
        dirs[:] = kept
        found, n = _folder_cases(here, sorted(files))
        cases.extend(found)
        scan.masks += n
    return cases


def _follow_folder_links(scan: _Scan) -> list[Case]:
    """Follow the folder links the walk queued (and those found in them): their cases, or an
    ``error`` case for each link that is refused (see the module docstring)."""
    cases: list[Case] = []
    while scan.links:
        link = scan.links.pop(0)
        try:
            target = link.resolve(strict=True)
        except (OSError, RuntimeError):
            cases.append(_link_error(link, _broken_link(link)))
            continue
        holder = _real(link.parent)
        shown = f"{_shown(link)}: symbolic link to the folder {_shown(target)}"
        if target == holder or target in holder.parents:
            reason = "a link loop: the folder holds the link; not followed"
        elif target in scan.visited:
            reason = "which this batch already reads by another path; not predicted twice"
        elif any(out == target or out in target.parents for out in scan.outputs):
            reason = "inside a medseg prediction output folder; not an input"
        else:
            where = " (outside the inputs)" if _outside(target, scan) else ""
            found = _walk(link, scan, followed=True)
            logger.info("%s%s: followed, %d cases", shown, where, len(found))
            cases.extend(found)
            continue
        cases.append(_link_error(link, f"{shown}, {reason}"))
    return cases


def _check_file_links(cases: list[Case], scan: _Scan) -> None:
    """File links found in the folders: a link to a file that the batch already reads by
    another path becomes an ``error`` case (not predicted twice); links to files outside the
    inputs are followed, counted in one log line."""
    linked = [c for c in cases if c.kind == "file" and c.paths[0].is_symlink()]
    if not linked:
        return
    links = {id(c) for c in linked}
    read = {_real(p) for c in cases if id(c) not in links for p in c.paths}
    outside: list[Case] = []
    for case in linked:
        target = _real(case.paths[0])
        if target in read:
            case.kind = "error"
            case.error = (
                f"{_shown(case.source)}: symbolic link to {_shown(target)}, which this batch "
                "already reads by another path; not predicted twice"
            )
            continue
        read.add(target)
        if _outside(target, scan):
            outside.append(case)
    if outside:
        logger.info(
            "%d symbolic links to files outside the inputs followed (e.g. %s -> %s)",
            len(outside),
            _shown(outside[0].source),
            _shown(_real(outside[0].paths[0])),
        )


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
        if path.is_symlink() and not path.exists():  # a loop or a dangling link: a row
            clean = False
            singles.append(_link_error(path, _broken_link(path)))
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
