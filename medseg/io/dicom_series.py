"""DICOM series reader: a folder of single-frame DICOM files becomes one DxHxWxC volume.

Headers are read first (``stop_before_pixels=True``) to find the series and the slice order;
pixel data is read only for the series that is returned. Slices are ordered by their
ImagePositionPatient projected on the slice normal (the cross product of the row and column
direction cosines of ImageOrientationPatient), never by file name; when positions are missing
the InstanceNumber is used and a warning is logged. See :mod:`medseg.io` for the contract.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io.base import (
    Image,
    ImageMeta,
    check_folder,
    image_suffix,
    raise_walk_error,
    stack_volumes,
)
from medseg.io.dicom import (
    dataset_array,
    dataset_geometry,
    decode_pixels,
    read_dataset,
    read_dicom_image,
    read_dicom_mask,
)
from medseg.io.headers import DicomHeader, is_dicom, read_dicom_header, split_acquisitions

logger = logging.getLogger(__name__)

#: File names (lower case) in a series folder that are skipped as obvious non-images.
NON_IMAGE_NAMES: frozenset[str] = frozenset(
    {"dicomdir", "readme", "license", "licence", "thumbs.db", "desktop.ini"}
)
#: Suffixes (lower case) of files in a series folder that are skipped as obvious non-images.
NON_IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {
        ".txt",
        ".json",
        ".xml",
        ".csv",
        ".tsv",
        ".md",
        ".log",
        ".html",
        ".htm",
        ".pdf",
        ".ini",
        ".cfg",
        ".yaml",
        ".yml",
        ".md5",
        ".sha1",
        ".sha256",
    }
)

# Two slices whose positions along the normal differ by less than this are the same slice.
_SAME_POSITION_MM = 0.01
# A step between neighbouring slices larger than this times the median step is a missing slice.
_GAP_FACTOR = 1.5
# Steps differing from the median by more than this fraction make the spacing "irregular".
_IRREGULAR_FRACTION = 0.01
# Tolerance on direction cosines and (relative) pixel spacing between slices of one series.
_ORIENTATION_ATOL = 1e-4
_SPACING_RTOL = 1e-4


@dataclass
class _Stack:
    """One series in slice order, with its geometry."""

    headers: list[DicomHeader]
    positions: np.ndarray | None  # (D, 3) LPS mm, in slice order; None when unknown
    spacing: tuple[float, ...] | None
    affine: np.ndarray | None
    extra: dict[str, Any]


# --------------------------------------------------------------------------- public API


def read_dicom_series(
    folder: str | Path, recursive: bool = False, *, allow_gaps: bool = False
) -> list[Image]:
    """Read every DICOM series in a folder, one volume per series.

    Files are split by SeriesInstanceUID; each series is read as :func:`read_image` reads a
    folder with one series (slices sorted by position, modality LUT per slice). A series
    stored as one multi-frame file is read as that file. ``meta.extra`` holds
    ``series_description``, ``series_number`` and ``slice_positions``; ``meta.source`` is the
    sorted file list.

    Args:
        folder: Folder holding DICOM files (and, optionally, obvious non-images such as
            ``DICOMDIR``, ``.txt`` or ``.json`` files, which are skipped).
        recursive: Whether to look in sub-folders too (hidden folders are skipped); one series
            may then span several folders.
        allow_gaps: Read series with a missing slice anyway (see :func:`read_image`).

    Returns:
        One :class:`~medseg.io.Image` per series, sorted by SeriesNumber (series without a
        number last), then SeriesDescription.

    Raises:
        DataError: If the folder is missing, holds no DICOM image, holds a file that is
            neither DICOM nor an obvious non-image, or any series cannot be read.
    """
    folder = check_folder(folder)
    groups = _split(_scan(folder, recursive))
    if not groups:
        raise DataError(f"{folder}: no DICOM image files found{_subfolder_hint(folder, recursive)}")
    return [_read_group_image(folder, group, allow_gaps) for group in groups]


def slice_positions(folder: str | Path) -> np.ndarray:
    """ImagePositionPatient of each slice of the one DICOM series in ``folder``, in array order.

    Reads headers only. Row ``i`` is the LPS position (mm) of the first pixel of slice ``i`` of
    the volume that :func:`read_image` and :func:`read_mask` return for the same folder, so an
    image series and a mask series (e.g. TCIA ``T1post`` and ``MaskTumor``) can be aligned by
    position with :func:`match_slice_positions`. Gaps are allowed here (a mask series may hold
    only some slices).

    Raises:
        DataError: If the folder does not hold exactly one DICOM series, or its slices have no
            ImagePositionPatient / ImageOrientationPatient, or two slices share a position.
    """
    folder = check_folder(folder)
    group = _single_group(folder)
    if len(group) == 1 and group[0].frames > 1:
        header = group[0]
        _, affine, _ = dataset_geometry(header.dataset, header.frames)
        if affine is None:
            raise DataError(f"{header.path}: multi-frame file whose frame positions are unknown")
        index = np.zeros((header.frames, 4))
        index[:, 0], index[:, 3] = np.arange(header.frames), 1.0
        return (index @ affine.T)[:, :3]
    stack = _order(folder, group, allow_gaps=True)
    if stack.positions is None:
        raise DataError(
            f"{folder}: slices have no ImagePositionPatient/ImageOrientationPatient; "
            f"their positions are unknown"
        )
    return stack.positions.copy()


def match_slice_positions(
    reference: np.ndarray, other: np.ndarray, tolerance_mm: float = 0.1
) -> np.ndarray:
    """For each slice position in ``other``, the index of the same position in ``reference``.

    Use it with :func:`slice_positions` of an image series (``reference``) and of a mask series
    (``other``): ``index = match_slice_positions(img_pos, mask_pos)``; mask slice ``k`` lies on
    image slice ``index[k]``, or on none when ``index[k]`` is -1.

    Args:
        reference: (D, 3) positions in mm.
        other: (K, 3) positions in mm.
        tolerance_mm: Largest distance between two positions taken as the same.

    Returns:
        int64 array of shape (K,), -1 where ``other`` has no match in ``reference``.
    """
    reference = np.asarray(reference, dtype=np.float64).reshape(-1, 3)
    other = np.asarray(other, dtype=np.float64).reshape(-1, 3)
    if reference.shape[0] == 0:
        return np.full(other.shape[0], -1, dtype=np.int64)
    distances = np.linalg.norm(other[:, np.newaxis, :] - reference[np.newaxis, :, :], axis=-1)
    nearest = np.argmin(distances, axis=1)
    found = distances[np.arange(other.shape[0]), nearest] <= tolerance_mm
    return np.where(found, nearest, -1).astype(np.int64)


# --------------------------------------------------------------------------- used by readers


def read_series_image(folder: Path, *, allow_gaps: bool = False) -> Image:
    """Read the one DICOM series in ``folder`` (not recursive) as a DxHxWxC volume."""
    return _read_group_image(folder, _single_group(folder), allow_gaps)


def read_series_mask(folder: Path, *, allow_gaps: bool = False) -> tuple[np.ndarray, bool]:
    """Stored values (no LUT, no inversion) of the one series in ``folder``, in slice order.

    Returns:
        DxHxW array (DxHxWxS for colour data) and whether the data is colour.
    """
    group = _single_group(folder)
    if len(group) == 1 and group[0].frames > 1:
        return read_dicom_mask(group[0].path)
    stack = _order(folder, group, allow_gaps)
    slices = []
    colour = stack.headers[0].samples > 1
    for header in stack.headers:
        values = decode_pixels(header.path, read_dataset(header.path))
        _check_slice_shape(folder, header, values, stack.headers[0])
        slices.append(values)
    return np.stack(slices), colour


# --------------------------------------------------------------------------- scanning


def read_dicom_files(
    files: list[str | Path], *, folder: str | Path | None = None, allow_gaps: bool = False
) -> list[Image]:
    """Read the given DICOM files as :func:`read_dicom_series` reads a folder's files.

    For callers that have already chosen the files of a series (e.g. to leave out a broken
    file of the same folder). Files are split by SeriesInstanceUID, one volume per series.

    Args:
        files: DICOM files.
        folder: the folder named in error messages (default: the first file's folder).
        allow_gaps: Read series with a missing slice anyway (see :func:`read_image`).

    Raises:
        DataError: as :func:`read_dicom_series`.
    """
    paths = [Path(f) for f in files]
    where = Path(folder) if folder is not None else (paths[0].parent if paths else Path("."))
    headers = [h for h in (_read_header(p) for p in paths) if h is not None]
    groups = _split(headers)
    if not groups:
        raise DataError(f"{where}: no DICOM image files among the {len(paths)} given")
    return [_read_group_image(where, group, allow_gaps) for group in groups]


def _scan(folder: Path, recursive: bool) -> list[DicomHeader]:
    """Headers of the DICOM image files in ``folder``, in file name order."""
    headers: list[DicomHeader] = []
    for root, dirs, files in os.walk(folder, onerror=raise_walk_error):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or _obvious_non_image(path):
                logger.debug("%s: skipped (not an image)", path)
                continue
            header = _read_header(path)
            if header is not None:
                headers.append(header)
    return headers


def _obvious_non_image(path: Path) -> bool:
    name = path.name.lower()
    return name in NON_IMAGE_NAMES or image_suffix(path) in NON_IMAGE_SUFFIXES


def _read_header(path: Path) -> DicomHeader | None:
    """Header of one file; None for DICOM objects that are not images (SR, RT plan, ...)."""
    if not is_dicom(path) and image_suffix(path) != ".dcm":
        raise DataError(
            f"{path}: not a DICOM file; a DICOM series folder may hold only DICOM files and "
            f"obvious non-images (DICOMDIR, {', '.join(sorted(NON_IMAGE_SUFFIXES)[:6])}, ...)"
        )
    return read_dicom_header(path)


def _split(headers: list[DicomHeader]) -> list[list[DicomHeader]]:
    """Group headers by SeriesInstanceUID; groups sorted by SeriesNumber, then description."""
    groups: dict[str | None, list[DicomHeader]] = {}
    for header in headers:
        groups.setdefault(header.series_uid, []).append(header)

    def key(group: list[DicomHeader]) -> tuple[bool, int, str, str]:
        first = group[0]
        number = first.series_number
        return (number is None, number or 0, first.series_description or "", str(first.path))

    return sorted(groups.values(), key=key)


def _single_group(folder: Path) -> list[DicomHeader]:
    """The headers of the one series directly in ``folder``; DataError for none or several."""
    groups = _split(_scan(folder, recursive=False))
    if not groups:
        raise DataError(f"{folder}: no DICOM image files found{_subfolder_hint(folder, False)}")
    if len(groups) > 1:
        listed = "; ".join(_describe(group) for group in groups)
        raise DataError(
            f"{folder}: folder holds {len(groups)} DICOM series ({listed}); give the folder of "
            f"one series (medseg predict splits such a folder into its series; from Python, "
            f"read them all with medseg.io.read_dicom_series(folder))"
        )
    return groups[0]


def _describe(group: list[DicomHeader]) -> str:
    """Series number and description of a group (never patient data)."""
    first = group[0]
    number = f"#{first.series_number}" if first.series_number is not None else "#?"
    description = (
        f" {first.series_description!r}" if first.series_description else " (no description)"
    )
    return f"{number}{description}, {len(group)} file(s)"


def _subfolder_hint(folder: Path, recursive: bool) -> str:
    if recursive:
        return ""
    subfolders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not subfolders:
        return ""
    return (
        f" directly in it; it has {len(subfolders)} sub-folder(s): give one series folder "
        f"(from Python, medseg.io.read_dicom_series(folder, recursive=True) reads them all)"
    )


# --------------------------------------------------------------------------- ordering


def _order(folder: Path, group: list[DicomHeader], allow_gaps: bool) -> _Stack:
    """Check that the files of one series form a volume and put them in slice order."""
    first = group[0]
    for header in group[1:]:
        if header.size != first.size:
            raise DataError(
                f"{folder}: slices differ in size ({first.path.name} is "
                f"{first.size[0]}x{first.size[1]}, {header.path.name} is "
                f"{header.size[0]}x{header.size[1]}); they do not form one volume"
            )
        if header.samples != first.samples:
            raise DataError(
                f"{folder}: slices differ in samples per pixel ({first.path.name}: "
                f"{first.samples}, {header.path.name}: {header.samples})"
            )
    if any(header.frames > 1 for header in group):
        raise DataError(
            f"{folder}: series {_describe(group)} mixes multi-frame files with other files; "
            f"read the multi-frame files one by one with read_image(file)"
        )
    spacings = [h.pixel_spacing for h in group]
    pixel_spacing = spacings[0] if all(s is not None for s in spacings) else None
    if pixel_spacing is not None:
        for header in group[1:]:
            if not np.allclose(header.pixel_spacing, pixel_spacing, rtol=_SPACING_RTOL):
                raise DataError(
                    f"{folder}: slices have different pixel spacing ({first.path.name}: "
                    f"{pixel_spacing}, {header.path.name}: {header.pixel_spacing}); they do "
                    f"not form one volume"
                )
    if all(h.position is not None and h.orientation is not None for h in group):
        return _order_by_position(folder, group, pixel_spacing, allow_gaps)
    return _order_by_instance(folder, group, pixel_spacing)


def _order_by_position(
    folder: Path,
    group: list[DicomHeader],
    pixel_spacing: tuple[float, ...] | None,
    allow_gaps: bool,
) -> _Stack:
    first = group[0]
    for header in group[1:]:
        if not np.allclose(header.orientation, first.orientation, atol=_ORIENTATION_ATOL):
            raise DataError(
                f"{folder}: slices have different orientations (ImageOrientationPatient of "
                f"{first.path.name}: {_fmt(first.orientation)}, of {header.path.name}: "
                f"{_fmt(header.orientation)}); they do not form one volume"
            )
    # ImageOrientationPatient: direction of increasing column index, then of increasing row.
    along_row, along_col = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    normal = np.cross(along_row, along_col)
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        raise DataError(
            f"{first.path}: ImageOrientationPatient {_fmt(first.orientation)} does not hold "
            f"two perpendicular directions"
        )
    normal = normal / norm
    positions = np.stack([h.position for h in group])
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    headers = [group[i] for i in order]
    positions, distance = positions[order], distance[order]
    steps = np.diff(distance)
    extra: dict[str, Any] = {"slice_order": "ImagePositionPatient", "slice_normal": normal}

    for i in np.flatnonzero(steps < _SAME_POSITION_MM):
        raise DataError(
            f"{folder}: files {headers[i].path.name} and {headers[i + 1].path.name} have the "
            f"same slice position ({distance[i]:.3f} mm along the slice normal); the folder may "
            f"hold two acquisitions (echoes, time points) or a copied file"
        )

    slice_spacing: float | None = None
    if len(headers) > 1:
        slice_spacing = float(np.median(steps))
        gaps = np.flatnonzero(steps > _GAP_FACTOR * slice_spacing)
        if gaps.size:
            i = int(gaps[0])
            where = (
                f"gap of {steps[i]:.3f} mm between slice positions {distance[i]:.3f} and "
                f"{distance[i + 1]:.3f} mm along the slice normal (after slice {i}, file "
                f"{headers[i].path.name}, at {_fmt(positions[i])} LPS mm), "
                f"{steps[i] / slice_spacing:.1f}x the median spacing {slice_spacing:.3f} mm"
            )
            if not allow_gaps:
                raise DataError(
                    f"{folder}: slice(s) missing: {where}; {gaps.size} gap(s) in all. Add the "
                    f"missing files, or, from Python, read it anyway with "
                    f"medseg.io.read_image(folder, allow_gaps=True)"
                )
            logger.warning("%s: %d gap(s) in the series, first: %s", folder, gaps.size, where)
            extra["slice_gaps"] = [(float(distance[j]), float(distance[j + 1])) for j in gaps]
        if np.any(np.abs(steps - slice_spacing) > _IRREGULAR_FRACTION * slice_spacing):
            extra["slice_spacing_irregular"] = True
            if not gaps.size:
                logger.warning(
                    "%s: irregular slice spacing (%.3f..%.3f mm); using the median %.3f mm",
                    folder,
                    steps.min(),
                    steps.max(),
                    slice_spacing,
                )
        extra["slice_spacing_source"] = "ImagePositionPatient"
        # Direction of the stack (differs from the normal for a tilted gantry), one step long.
        step = (positions[-1] - positions[0]) / (distance[-1] - distance[0]) * slice_spacing
    else:
        slice_spacing, source = _declared_slice_spacing(first)
        if source:
            extra["slice_spacing_source"] = source
        step = normal * (slice_spacing or 1.0)

    spacing = affine = None
    if pixel_spacing is not None:
        if slice_spacing is not None:
            spacing = (slice_spacing, *pixel_spacing)
        affine = np.eye(4)
        affine[:3, 0] = step
        affine[:3, 1] = along_col * pixel_spacing[0]
        affine[:3, 2] = along_row * pixel_spacing[1]
        affine[:3, 3] = positions[0]
    return _Stack(headers, positions, spacing, affine, extra)


def _order_by_instance(
    folder: Path, group: list[DicomHeader], pixel_spacing: tuple[float, ...] | None
) -> _Stack:
    missing = sum(h.position is None or h.orientation is None for h in group)
    if len(group) > 1:
        logger.warning(
            "%s: %d of %d slices lack ImagePositionPatient/ImageOrientationPatient; ordering "
            "by InstanceNumber",
            folder,
            missing,
            len(group),
        )
    for header in group:
        if header.instance_number is None and len(group) > 1:
            raise DataError(
                f"{folder}: cannot order the slices: {header.path.name} has neither "
                f"ImagePositionPatient/ImageOrientationPatient nor InstanceNumber"
            )
    headers = sorted(group, key=lambda h: h.instance_number or 0)
    for a, b in zip(headers, headers[1:], strict=False):
        if a.instance_number == b.instance_number:
            raise DataError(
                f"{folder}: files {a.path.name} and {b.path.name} have the same InstanceNumber "
                f"{a.instance_number} and no positions; the slice order is unknown"
            )
    slice_spacing, source = _declared_slice_spacing(headers[0])
    extra: dict[str, Any] = {"slice_order": "InstanceNumber"}
    if source:
        extra["slice_spacing_source"] = source
    spacing = None
    if pixel_spacing is not None and slice_spacing is not None:
        spacing = (slice_spacing, *pixel_spacing)
    return _Stack(headers, None, spacing, None, extra)


def _declared_slice_spacing(header: DicomHeader) -> tuple[float | None, str | None]:
    for value, keyword in (
        (header.spacing_between_slices, "SpacingBetweenSlices"),
        (header.slice_thickness, "SliceThickness"),
    ):
        if value:
            return abs(value), keyword
    return None, None


# --------------------------------------------------------------------------- pixels


def _read_group_image(folder: Path, group: list[DicomHeader], allow_gaps: bool) -> Image:
    if len(group) == 1 and group[0].frames > 1:
        image = read_dicom_image(group[0].path)
        image.meta.extra.update(_series_extra(group[0]))
        return image
    acquisitions = split_acquisitions(group)
    if acquisitions is not None:  # N files per position: N volumes along a 4th dimension
        what, parts = acquisitions
        images = [_read_group_image(folder, part, allow_gaps) for part in parts]
        return stack_volumes(folder, images, f"{len(parts)} acquisitions by {what}")
    stack = _order(folder, group, allow_gaps)
    first = stack.headers[0]
    volume: np.ndarray | None = None
    photometric = bits = None
    notes: dict[str, Any] = {}
    slopes, intercepts, inverted = [], [], False
    for i, header in enumerate(stack.headers):
        ds = read_dataset(header.path)
        array, slice_photometric, slice_bits, slice_extra = dataset_array(header.path, ds)
        _check_slice_shape(folder, header, array[..., 0], first)
        if volume is None:
            volume = np.empty((len(stack.headers), *array.shape), dtype=np.float32)
            photometric, bits, notes = slice_photometric, slice_bits, slice_extra
        elif slice_photometric != photometric:
            raise DataError(
                f"{folder}: slices differ in colour ({first.path.name}: {photometric}, "
                f"{header.path.name}: {slice_photometric})"
            )
        volume[i] = array
        slopes.append(slice_extra.get("rescale_slope", 1.0))
        intercepts.append(slice_extra.get("rescale_intercept", 0.0))
        inverted = inverted or bool(slice_extra.get("monochrome1_inverted"))
    assert volume is not None  # a group is never empty

    extra = {k: v for k, v in notes.items() if k not in ("number_of_frames",)}
    if len(set(slopes)) > 1 or len(set(intercepts)) > 1:
        extra["rescale_per_slice"] = True
        extra["rescale_slopes"] = slopes
        extra["rescale_intercepts"] = intercepts
    if inverted:
        extra["monochrome1_inverted"] = True
    extra.update(stack.extra)
    extra.update(_series_extra(first))
    extra.update(
        folder=str(folder),
        number_of_slices=len(stack.headers),
        instance_numbers=[h.instance_number for h in stack.headers],
    )
    if stack.positions is not None:
        extra["slice_positions"] = stack.positions
    if stack.headers[0].pixel_spacing is not None:
        extra["pixel_spacing"] = stack.headers[0].pixel_spacing
    if first.slice_thickness is not None:
        extra["slice_thickness"] = first.slice_thickness
    meta = ImageMeta(
        source=tuple(str(h.path) for h in stack.headers),
        spacing=stack.spacing,
        affine=stack.affine,
        modality=first.modality,
        photometric=photometric,
        patient_id=first.patient_id,
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        bits=bits,
        extra=extra,
    )
    logger.debug(
        "%s: DICOM series %s, %s, shape %s", folder, _describe(group), meta.modality, volume.shape
    )
    return Image(array=volume, meta=meta)


def _series_extra(header: DicomHeader) -> dict[str, Any]:
    return {"series_description": header.series_description, "series_number": header.series_number}


def _check_slice_shape(
    folder: Path, header: DicomHeader, values: np.ndarray, first: DicomHeader
) -> None:
    if tuple(values.shape[:2]) != first.size:
        raise DataError(
            f"{folder}: decoded slice {header.path.name} has shape {values.shape[:2]}, expected "
            f"{first.size[0]}x{first.size[1]} like {first.path.name}"
        )


def _fmt(values: np.ndarray | tuple[float, ...] | None) -> str:
    if values is None:
        return "None"
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"
