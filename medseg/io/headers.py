"""DICOM headers without pixel data: the one place medseg reads them.

:func:`read_dicom_header` parses a file with ``stop_before_pixels=True`` and returns a
:class:`DicomHeader` with what grouping files into series, ordering slices and describing a
series needs. The series reader (:mod:`medseg.io.dicom_series`), dataset scanning and case
discovery for prediction all read headers through it, so they agree on which files are images,
which are skipped and which are broken.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medseg.errors import DataError
from medseg.io.dicom_tags import (
    first_float,
    first_line,
    floats,
    frame_count,
    int_or_none,
    sop_class_name,
    str_or_none,
)

logger = logging.getLogger(__name__)

#: Attributes that tell apart the acquisitions of one series whose files share slice positions
#: (time points, b-values, echoes, inversion or trigger times), in the order they are tried.
ACQUISITION_KEYWORDS = (
    "TemporalPositionIdentifier",
    "DiffusionBValue",
    "EchoNumbers",
    "EchoTime",
    "InversionTime",
    "TriggerTime",
    "AcquisitionNumber",
)
#: The same for the frames of an enhanced multi-frame file: (functional group, attribute).
FRAME_ACQUISITION_KEYS = (
    ("FrameContentSequence", "TemporalPositionIndex"),
    ("MRDiffusionSequence", "DiffusionBValue"),
    ("MREchoSequence", "EffectiveEchoTime"),
    ("MRTimingAndRelatedParametersSequence", "InversionTimes"),
    ("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime"),
)

_PREAMBLE_LEN = 128
_MAGIC = b"DICM"


def is_dicom(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM Part 10 file, i.e. has ``DICM`` after its 128-byte preamble.

    Never raises: missing or unreadable paths give ``False``. Files named ``.dcm`` without
    the marker are still read by :func:`medseg.io.read_image`.
    """
    try:
        with Path(path).open("rb") as f:
            head = f.read(_PREAMBLE_LEN + len(_MAGIC))
    except OSError:
        return False
    return head[_PREAMBLE_LEN:] == _MAGIC


def parse_all(ds: Dataset) -> None:
    """Convert every element of ``ds`` (and its file meta) now.

    pydicom converts values lazily, on first access; a corrupt element (an unknown VR, a value
    cut short) would otherwise raise wherever medseg first reads it. Call inside the ``try``
    that turns parse errors into a DataError.
    """
    for dataset in (ds.file_meta, ds):
        for element in dataset.iterall():
            _ = element.value


@dataclass(frozen=True)
class DicomHeader:
    """What medseg reads from one DICOM image file's header (no pixel data).

    Patient and study data (``patient_id``, ``patient_name``, ``study_date``, the UIDs) are for
    grouping and opt-in naming only: they are left out of ``repr`` and never logged.

    Attributes:
        path: The file.
        has_marker: Whether the file has the ``DICM`` marker (else it was read as a bare
            ``.dcm`` dataset).
        sop_class: Name of the SOP class (``"CT Image Storage"``), None when absent or unknown.
        modality: Modality (``"CT"``, ``"MR"``, ...).
        series_uid: SeriesInstanceUID.
        study_uid: StudyInstanceUID.
        patient_id: PatientID.
        patient_name: PatientName as text.
        study_date: StudyDate as text.
        series_number: SeriesNumber.
        series_description: SeriesDescription.
        instance_number: InstanceNumber.
        size: ``(Rows, Columns)``.
        samples: SamplesPerPixel (1 when absent).
        frames: NumberOfFrames (1 when absent).
        position: ImagePositionPatient (3 floats, LPS mm) at the top level, else None.
        orientation: ImageOrientationPatient (6 direction cosines) at the top level, else from
            the shared functional groups (enhanced multi-frame files), else None.
        pixel_spacing: PixelSpacing, else ImagerPixelSpacing (row, column mm), else None.
        slice_thickness: SliceThickness.
        spacing_between_slices: SpacingBetweenSlices.
        dataset: The parsed header itself, for attributes not copied here.
    """

    path: Path
    has_marker: bool
    sop_class: str | None
    modality: str | None
    series_uid: str | None = field(repr=False)
    study_uid: str | None = field(repr=False)
    patient_id: str | None = field(repr=False)
    patient_name: str | None = field(repr=False)
    study_date: str | None = field(repr=False)
    series_number: int | None
    series_description: str | None
    instance_number: int | None
    size: tuple[int, int]
    samples: int
    frames: int
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    slice_thickness: float | None
    spacing_between_slices: float | None
    dataset: Dataset = field(repr=False, compare=False)

    @property
    def positioned(self) -> bool:
        """Whether both ImagePositionPatient and ImageOrientationPatient are known."""
        return self.position is not None and self.orientation is not None


def read_dicom_header(path: str | Path) -> DicomHeader | None:
    """Read the header of one DICOM file, without its pixel data.

    The caller chooses which files to try (``.dcm`` names, or :func:`is_dicom`); a file without
    the ``DICM`` marker is parsed as a bare dataset.

    Args:
        path: An existing file.

    Returns:
        The header; None for a DICOM object without an image (SR, RT plan, ...: a warning is
        logged), which readers skip.

    Raises:
        DataError: If the file is empty, its header is truncated or corrupt, or it is not a
            DICOM image at all (no ``DICM`` marker and no image size).
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    has_marker = is_dicom(path)
    try:
        if has_marker:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        parse_all(ds)
    except Exception as e:
        raise DataError(f"{path}: DICOM header is truncated or corrupt ({first_line(e)})") from e
    rows, columns = int_or_none(ds.get("Rows")), int_or_none(ds.get("Columns"))
    sop_class = sop_class_name(ds)
    if rows is None or columns is None:
        if not has_marker:
            raise DataError(f"{path}: not a DICOM image (no 'DICM' marker and no image size)")
        if sop_class is None or "Image" in sop_class:
            # An image SOP class (or an unknown one) without an image size: a cut header.
            # (An unknown UID is not quoted: a corrupt one may hold any bytes, newlines too.)
            raise DataError(
                f"{path}: DICOM header is truncated or corrupt (no Rows/Columns in a "
                f"{sop_class or 'DICOM'} file)"
            )
        logger.warning("%s: skipped, a DICOM object without an image (%s)", path, sop_class)
        return None
    return _header(path, ds, has_marker, sop_class, (rows, columns))


def _header(
    path: Path, ds: Dataset, has_marker: bool, sop_class: str | None, size: tuple[int, int]
) -> DicomHeader:
    position = floats(ds.get("ImagePositionPatient"), 3)
    orientation = floats(ds.get("ImageOrientationPatient"), 6)
    if orientation is None and "ImageOrientationPatient" not in ds:
        orientation = floats(_shared_orientation(ds), 6)
    spacing = floats(ds.get("PixelSpacing"), 2) or floats(ds.get("ImagerPixelSpacing"), 2)
    return DicomHeader(
        path=path,
        has_marker=has_marker,
        sop_class=sop_class,
        modality=str_or_none(ds.get("Modality")),
        series_uid=str_or_none(ds.get("SeriesInstanceUID")),
        study_uid=str_or_none(ds.get("StudyInstanceUID")),
        patient_id=str_or_none(ds.get("PatientID")),
        patient_name=str_or_none(ds.get("PatientName")),
        study_date=str_or_none(ds.get("StudyDate")),
        series_number=int_or_none(ds.get("SeriesNumber")),
        series_description=str_or_none(ds.get("SeriesDescription")),
        instance_number=int_or_none(ds.get("InstanceNumber")),
        size=size,
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        frames=frame_count(ds),
        position=position,
        orientation=orientation,
        pixel_spacing=spacing,
        slice_thickness=first_float(ds.get("SliceThickness")),
        spacing_between_slices=first_float(ds.get("SpacingBetweenSlices")),
        dataset=ds,
    )


def _shared_orientation(ds: Dataset) -> Any:
    """ImageOrientationPatient of the shared functional groups (enhanced multi-frame files)."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    planes = shared[0].get("PlaneOrientationSequence") if shared else None
    return planes[0].get("ImageOrientationPatient") if planes else None


def split_acquisitions(
    headers: list[DicomHeader],
) -> tuple[str, list[list[DicomHeader]]] | None:
    """The acquisitions of a series whose files repeat the same slice positions, or None.

    A series with N files at each slice position is N acquisitions (a DWI series' b-values, a
    multi-echo or dynamic series) when one of :data:`ACQUISITION_KEYWORDS` takes N values, each on
    one file per position. Anything else (no repeated position, no attribute that explains it) is
    None, and the series reader reports what is wrong.

    Returns:
        A description (``"DiffusionBValue 0, 500, 1000"``) and the files of each acquisition, in
        ascending order of the attribute.
    """
    if len(headers) < 2 or not all(h.positioned for h in headers):
        return None
    first = headers[0].orientation
    assert first is not None
    normal = np.cross(np.array(first[:3]), np.array(first[3:]))
    where = [round(float(np.dot(h.position, normal)), 2) for h in headers]  # type: ignore[arg-type]
    places = set(where)
    if len(places) == len(headers) or len(headers) % len(places):
        return None
    for keyword in ACQUISITION_KEYWORDS:
        found = _acquisitions(keyword, [first_float(h.dataset.get(keyword)) for h in headers])
        if found is None:
            continue
        text, groups = found
        if all({where[i] for i in g} == places and len(g) == len(places) for g in groups):
            return text, [[headers[i] for i in g] for g in groups]
    return None


def _acquisitions(keyword: str, values: list[float | None]) -> tuple[str, list[list[int]]] | None:
    """The indices of each value of ``keyword`` (ascending) and their description
    (``"DiffusionBValue 0, 500, 1000"``), when every item has a value and there are 2 or more
    values, each on as many items; else None."""
    if any(v is None for v in values):
        return None
    groups: dict[float, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v, []).append(i)  # type: ignore[arg-type]
    if len(groups) < 2 or len({len(g) for g in groups.values()}) != 1:
        return None
    order = sorted(groups)
    return f"{keyword} {', '.join(f'{v:g}' for v in order)}", [groups[v] for v in order]


def frame_acquisitions(ds: Dataset, n_frames: int) -> tuple[str, list[list[int]]] | None:
    """The acquisitions among the frames of an enhanced multi-frame file, or None.

    Frames form N > 1 acquisitions when a per-frame attribute of :data:`FRAME_ACQUISITION_KEYS`
    takes N values, on the same number of frames each (a 4D enhanced MR object: time points,
    b-values, echoes).

    Returns:
        A description (``"TemporalPositionIndex 1, 2, 3"``) and the frame indices of each
        acquisition (in file order), in ascending order of the attribute.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if n_frames < 2 or not per_frame or len(per_frame) != n_frames:
        return None
    for sequence, keyword in FRAME_ACQUISITION_KEYS:
        values = []
        for item in per_frame:
            inner = item.get(sequence)
            values.append(first_float(inner[0].get(keyword)) if inner else None)
        found = _acquisitions(keyword, values)
        if found is not None:
            return found
    return None
