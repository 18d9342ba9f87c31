"""pydicom reader for single DICOM files (one image, or one multi-frame volume).

Pixel values go through the modality LUT (Rescale Slope/Intercept, e.g. to Hounsfield units);
MONOCHROME1 images are inverted so that higher always means brighter; colour images come back
as RGB (pydicom converts YBR to RGB) and palette colour images are mapped through their palette.
No VOI/window is applied; the window is kept in ``meta.extra``.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medseg.errors import DataError
from medseg.io.base import MAX_SAMPLES, Image, ImageMeta
from medseg.io.dicom_tags import (
    first_float,
    first_line,
    floats,
    frame_count,
    functional_value,
    int_or_none,
    sop_class_name,
    str_or_none,
)
from medseg.io.headers import frame_acquisitions, is_dicom, parse_all

logger = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# pydicom names the import of a plugin's dependency; the pip package can differ.
_PIP_NAMES = {"gdcm": "python-gdcm"}


def read_dicom_image(path: Path) -> Image:
    """Read one DICOM file as an :class:`~medseg.io.base.Image`.

    Args:
        path: An existing, non-empty file.

    Returns:
        HxWxC image for a single frame, DxHxWxC volume for a multi-frame file.

    Raises:
        DataError: If the file is not DICOM, is truncated or corrupt, has no pixel data, or
            needs a pixel data decoder that is not installed.
    """
    ds = read_dataset(path)
    n_frames = frame_count(ds)
    array, photometric, bits, extra = dataset_array(path, ds)
    expected_ndim = 4 if n_frames > 1 else 3
    if array.ndim != expected_ndim:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        raise DataError(
            f"{path}: decoded pixel data has shape {array.shape}, which does not match "
            f"{n_frames} frame(s) of {samples} sample(s) per pixel"
        )

    acquisitions = frame_acquisitions(ds, n_frames) if n_frames > 1 else None
    frames = None
    if acquisitions is not None:  # frames of N acquisitions: N volumes along a 4th dimension
        what, groups = acquisitions
        if array.shape[-1] != 1:
            raise DataError(f"{path}: colour frames in {len(groups)} acquisitions ({what})")
        array = np.stack([array[g, ..., 0] for g in groups], axis=-1)
        frames = groups[0]
        extra.update(volumes=len(groups), volume_axis="4th dimension", source_shape=array.shape)
        extra.update(volumes_are=f"{len(groups)} acquisitions by {what}")
        extra["channels_from"] = "DICOM acquisitions"
        photometric = None
    spacing, affine, geo_extra = dataset_geometry(ds, n_frames, frames=frames)
    extra.update(geo_extra)
    extra.update(_other_attributes(ds))
    meta = ImageMeta(
        source=(str(path),),
        spacing=spacing,
        affine=affine,
        modality=str_or_none(ds.get("Modality")),
        photometric=photometric,
        patient_id=str_or_none(ds.get("PatientID")),
        study_uid=str_or_none(ds.get("StudyInstanceUID")),
        series_uid=str_or_none(ds.get("SeriesInstanceUID")),
        bits=bits,
        extra=extra,
    )
    logger.debug("%s: DICOM %s, shape %s", path, meta.modality, array.shape)
    return Image(array=np.ascontiguousarray(array, dtype=np.float32), meta=meta)


def read_dicom_mask(path: Path) -> tuple[np.ndarray, bool]:
    """Read the stored pixel values of a DICOM file (no LUT, no inversion) for use as a mask.

    Returns:
        HxW (DxHxW for multi-frame) array, or HxWx3 (DxHxWx3) for colour data; and whether
        the data is colour (last axis holds the samples).

    Raises:
        DataError: As :func:`read_dicom_image`.
    """
    ds = read_dataset(path)
    colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1
    return decode_pixels(path, ds), colour


def dataset_array(path: Path, ds: Dataset) -> tuple[np.ndarray, str, int | None, dict[str, Any]]:
    """Decode ``ds`` and turn it into contract values (modality LUT, MONOCHROME1, RGB).

    Shared by the single-file reader and the series reader (one call per slice).

    Returns:
        float64/float32 array with a trailing channel axis (HxWxC, or DxHxWxC for multi-frame
        data), the returned photometric interpretation (``"MONOCHROME2"`` or ``"RGB"``), the
        stored bit depth and notes for ``meta.extra``.

    Raises:
        DataError: If the pixel data cannot be decoded or has an unsupported layout.
    """
    raw = decode_pixels(path, ds)
    n_frames = frame_count(ds)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    stored_photometric = str(ds.get("PhotometricInterpretation", "") or "").upper() or None
    extra: dict[str, Any] = {
        "transfer_syntax": ds.file_meta.TransferSyntaxUID.name,
        "number_of_frames": n_frames,
    }
    if stored_photometric:
        extra["dicom_photometric"] = stored_photometric
    bits = int_or_none(ds.get("BitsStored", ds.get("BitsAllocated")))

    if samples == 3:
        array = raw.astype(np.float32)
        photometric = "RGB"
    elif samples == 1 and stored_photometric == "PALETTE COLOR":
        try:
            array = apply_color_lut(raw, ds).astype(np.float32)
        except Exception as e:  # missing or malformed palette tables
            raise DataError(
                f"{path}: PALETTE COLOR image whose palette cannot be applied ({first_line(e)})"
            ) from e
        photometric = "RGB"
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = int(descriptor[2]) if descriptor else bits
        extra["palette_applied"] = True
    elif samples == 1:
        array, lut_extra = _to_display_values(ds, raw, n_frames, stored_photometric, bits)
        array = array[..., np.newaxis]
        extra.update(lut_extra)
        photometric = "MONOCHROME2"
    else:
        raise DataError(f"{path}: unsupported SamplesPerPixel {samples} (expected 1 or 3)")
    return array, photometric, bits, extra


# --------------------------------------------------------------------------- reading/decoding


def read_dataset(path: Path) -> Dataset:
    """Parse ``path`` with pydicom and make sure it holds pixel data we can try to decode.

    Raises:
        DataError: If the file is not DICOM, is truncated or corrupt, has no pixel data, or
            names no usable transfer syntax.
    """
    has_marker = is_dicom(path)
    try:
        if has_marker:
            ds = pydicom.dcmread(path)
        else:
            # A .dcm file without preamble (old ACR-NEMA style); force parsing, quietly, and
            # rely on the pixel data check below to reject files that are not DICOM at all.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, force=True)
        parse_all(ds)
    except InvalidDicomError as e:
        raise DataError(f"{path}: not a valid DICOM file ({first_line(e)})") from e
    except Exception as e:
        raise DataError(f"{path}: DICOM file is truncated or corrupt ({first_line(e)})") from e
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        if has_marker:
            raise DataError(f"{path}: DICOM file has no pixel data{_no_pixels_reason(ds)}")
        raise DataError(f"{path}: not a DICOM image (no 'DICM' marker and no pixel data)")
    if not str(ds.file_meta.get("TransferSyntaxUID", "") or "").strip():
        ds.file_meta.TransferSyntaxUID = _guess_transfer_syntax(path, ds)
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    if not ts.is_transfer_syntax:
        raise DataError(
            f"{path}: the file meta names {str(ts)[:64]!r} as transfer syntax, which is not a "
            f"DICOM transfer syntax; the pixel data cannot be decoded"
        )
    return ds


def _no_pixels_reason(ds: Dataset) -> str:
    """Why a DICOM file with the marker has no pixel data, from its SOP class (no patient data)."""
    kind = sop_class_name(ds)
    if kind is None:
        return " and no known SOP class; it is truncated, corrupt or not an image"
    if "Image" in kind:
        return f" ({kind}); the file is truncated or its pixel data was removed"
    return f" ({kind}); it is not an image"


def _guess_transfer_syntax(path: Path, ds: Dataset) -> UID:
    """Transfer syntax of an uncompressed dataset whose file meta does not name one."""
    encoding = getattr(ds, "original_encoding", (None, None))
    implicit, little = encoding
    if implicit is None or little is None:
        raise DataError(f"{path}: DICOM file does not say how its pixel data is encoded")
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def decode_pixels(path: Path, ds: Dataset) -> np.ndarray:
    """Decode the stored pixel values of ``ds`` (read by :func:`read_dataset` from ``path``).

    Raises:
        DataError: On every failure, saying what to do (e.g. which decoder to install).
    """
    _check_size(path, ds)
    ts = ds.file_meta.TransferSyntaxUID
    decoder = None
    if ts.is_compressed:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError as e:
            raise DataError(
                f"{path}: pixel data uses transfer syntax {ts.name} ({ts}), which pydicom "
                f"cannot decode"
            ) from e
        if not decoder.is_available:
            raise DataError(
                f"{path}: pixel data is compressed with {ts.name} and no decoder for it is "
                f"installed; install one of: {_install_hint(decoder.missing_dependencies)}"
            )
    try:
        return ds.pixel_array
    except Exception as e:
        reason = first_line(e)
        if decoder is not None:
            hint = ""
            if decoder.missing_dependencies:
                hint = (
                    "; another decoder may handle it, install one of: "
                    f"{_install_hint(decoder.missing_dependencies)}"
                )
            raise DataError(
                f"{path}: could not decode the {ts.name} pixel data ({reason}){hint}"
            ) from e
        raise DataError(
            f"{path}: cannot read the pixel data; the file may be truncated or corrupt ({reason})"
        ) from e


def _check_size(path: Path, ds: Dataset) -> None:
    """Refuse, before decoding, a header that declares more samples than medseg reads."""
    rows, columns = int_or_none(ds.get("Rows")), int_or_none(ds.get("Columns"))
    samples = int_or_none(ds.get("SamplesPerPixel")) or 1
    frames = frame_count(ds)
    if rows is None or columns is None:
        return  # pydicom says what is missing
    count = abs(rows) * abs(columns) * abs(samples) * frames
    if count > MAX_SAMPLES:
        raise DataError(
            f"{path}: DICOM header declares {frames} frame(s) of {rows}x{columns}x{samples} = "
            f"{count} samples, more than medseg reads ({MAX_SAMPLES}); the header is corrupt or "
            f"the image too large"
        )


def _install_hint(missing: list[str]) -> str:
    """Turn pydicom's 'plugin - requires a>=1 and b>=2' lines into pip commands."""
    commands = []
    for line in missing:
        _, _, requires = line.partition("requires")
        names = []
        for requirement in requires.split(" and "):
            name = re.split(r"[<>=!~ ]", requirement.strip(), maxsplit=1)[0]
            if name and name != "numpy":
                names.append(_PIP_NAMES.get(name, name))
        if names:
            commands.append("'pip install " + " ".join(names) + "'")
    return ", ".join(commands) if commands else "a pydicom pixel data plugin"


# --------------------------------------------------------------------------- values


def _to_display_values(
    ds: Dataset, raw: np.ndarray, n_frames: int, photometric: str | None, bits: int | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply the modality LUT and, for MONOCHROME1, invert; returns float64 values and notes."""
    extra: dict[str, Any] = {}
    inverted = photometric == "MONOCHROME1"
    smin, smax = _stored_range(ds, raw, bits)
    has_lut_sequence = bool(ds.get("ModalityLUTSequence"))

    if has_lut_sequence:
        array = apply_modality_lut(raw, ds).astype(np.float64)
        extra["modality_lut_applied"] = True
        lut_range = apply_modality_lut(_stored_samples(smin, smax, raw.dtype), ds)
        lo, hi = float(np.min(lut_range)), float(np.max(lut_range))
        if inverted:
            array = (lo + hi) - array
    else:
        array = raw.astype(np.float64)
        if inverted:
            # Reflect within the stored range; for a linear rescale this equals reflecting the
            # rescaled values within the rescaled range.
            array = (smin + smax) - array
        slopes, intercepts = _rescale(ds, n_frames)
        if slopes is not None and intercepts is not None:
            if "RescaleSlope" in ds and "RescaleIntercept" in ds:
                array = apply_modality_lut(array, ds)
            elif len(slopes) == 1 or n_frames == 1:
                array = array * slopes[0] + intercepts[0]
            else:
                shape = (n_frames,) + (1,) * (array.ndim - 1)
                array = array * np.reshape(slopes, shape) + np.reshape(intercepts, shape)
            extra.update(
                rescale_applied=True,
                rescale_slope=slopes[0],
                rescale_intercept=intercepts[0],
            )
            if len(set(slopes)) > 1 or len(set(intercepts)) > 1:
                extra["rescale_per_frame"] = True
            rescale_type = functional_value(ds, "PixelValueTransformationSequence", "RescaleType")
            if rescale_type:
                extra["rescale_type"] = str(rescale_type)
            a, b = smin * slopes[0] + intercepts[0], smax * slopes[0] + intercepts[0]
            lo, hi = min(a, b), max(a, b)
        else:
            extra["rescale_applied"] = False
            lo, hi = smin, smax

    center = first_float(functional_value(ds, "FrameVOILUTSequence", "WindowCenter"))
    width = first_float(functional_value(ds, "FrameVOILUTSequence", "WindowWidth"))
    if inverted:
        extra["monochrome1_inverted"] = True
        extra["inversion_range"] = (lo, hi)
        if center is not None:
            center = lo + hi - center
            extra["window_center_inverted"] = True
    if center is not None:
        extra["window_center"] = center
    if width is not None:
        extra["window_width"] = width
    if "DoseGridScaling" in ds:
        extra["dose_grid_scaling"] = float(ds.DoseGridScaling)  # kept, not applied
    return array, extra


def _stored_range(ds: Dataset, raw: np.ndarray, bits: int | None) -> tuple[float, float]:
    """Smallest and largest value that the stored samples can hold."""
    if np.issubdtype(raw.dtype, np.floating) or not bits:
        return float(np.min(raw)), float(np.max(raw))
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _stored_samples(smin: float, smax: float, dtype: np.dtype) -> np.ndarray:
    """All stored values when there are at most 2**16 of them, else the two ends."""
    if smax - smin <= 2**16:
        return np.arange(int(smin), int(smax) + 1, dtype=np.int64).astype(dtype)
    return np.array([smin, smax]).astype(dtype)


def _rescale(ds: Dataset, n_frames: int) -> tuple[list[float] | None, list[float] | None]:
    """Rescale slope(s) and intercept(s): top level, or per frame from functional groups."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope = first_float(ds.get("RescaleSlope"))
        intercept = first_float(ds.get("RescaleIntercept"))
        return [1.0 if slope is None else slope], [0.0 if intercept is None else intercept]
    slopes, intercepts = [], []
    for frame in range(n_frames):
        sequence = "PixelValueTransformationSequence"
        slope = first_float(functional_value(ds, sequence, "RescaleSlope", frame))
        intercept = first_float(functional_value(ds, sequence, "RescaleIntercept", frame))
        if slope is None and intercept is None:
            return None, None
        slopes.append(1.0 if slope is None else slope)
        intercepts.append(0.0 if intercept is None else intercept)
    return slopes, intercepts


# --------------------------------------------------------------------------- geometry


def dataset_geometry(
    ds: Dataset, n_frames: int, *, frames: list[int] | None = None
) -> tuple[tuple[float, ...] | None, np.ndarray | None, dict[str, Any]]:
    """Spacing (array axis order) and 4x4 index->LPS affine, where the file allows.

    Args:
        ds: A dataset (its header is enough).
        n_frames: Its number of frames.
        frames: the frames that form the volume (one acquisition of a 4D multi-frame file);
            None: all of them.

    Returns:
        Spacing, affine (each None when unknown) and notes for ``meta.extra``.
    """
    extra: dict[str, Any] = {}
    pixel_spacing = floats(functional_value(ds, "PixelMeasuresSequence", "PixelSpacing"), 2)
    if pixel_spacing is None:
        pixel_spacing = floats(ds.get("ImagerPixelSpacing"), 2)
        if pixel_spacing is not None:
            extra["spacing_source"] = "ImagerPixelSpacing"
    orientation = floats(
        functional_value(ds, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
    )
    positions = _positions(ds, n_frames, frames)
    if frames is not None:
        n_frames = len(frames)

    row_dir = col_dir = normal = None
    if orientation is not None:
        # ImageOrientationPatient: direction of increasing column index, then of increasing row.
        col_dir, row_dir = np.array(orientation[:3]), np.array(orientation[3:])
        normal = np.cross(col_dir, row_dir)

    thickness = first_float(functional_value(ds, "PixelMeasuresSequence", "SliceThickness"))
    between = first_float(functional_value(ds, "PixelMeasuresSequence", "SpacingBetweenSlices"))
    if thickness is not None:
        extra["slice_thickness"] = thickness

    if n_frames == 1:
        spacing = pixel_spacing
        if pixel_spacing is None or orientation is None or not positions:
            return spacing, None, extra
        depth = thickness if thickness else 1.0
        columns = (row_dir * pixel_spacing[0], col_dir * pixel_spacing[1], normal * depth)
        return spacing, _affine(columns, positions[0]), extra

    step, slice_spacing, source = _slice_step(ds, n_frames, positions, normal, between, thickness)
    if source:
        extra["slice_spacing_source"] = source
    if pixel_spacing is not None:
        extra["pixel_spacing"] = pixel_spacing
    spacing = None
    if pixel_spacing is not None and slice_spacing is not None:
        spacing = (slice_spacing, *pixel_spacing)
    if pixel_spacing is None or orientation is None or not positions or step is None:
        return spacing, None, extra
    columns = (step, row_dir * pixel_spacing[0], col_dir * pixel_spacing[1])
    return spacing, _affine(columns, positions[0]), extra


def _slice_step(
    ds: Dataset,
    n_frames: int,
    positions: list[np.ndarray],
    normal: np.ndarray | None,
    between: float | None,
    thickness: float | None,
) -> tuple[np.ndarray | None, float | None, str | None]:
    """Vector from one frame to the next, its length and where it came from."""
    if len(positions) == n_frames:
        steps = np.diff(np.stack(positions), axis=0)
        if np.allclose(steps, steps[0], atol=1e-3):
            return steps[0], float(np.linalg.norm(steps[0])), "ImagePositionPatient"
        # Frames are not a regular grid (e.g. a SEG with one frame per segment).
        return None, between, "SpacingBetweenSlices" if between else None
    offsets = floats(ds.get("GridFrameOffsetVector"), n_frames)
    if offsets is not None and normal is not None:
        diffs = np.diff(offsets)
        if np.allclose(diffs, diffs[0], atol=1e-3):
            return normal * diffs[0], abs(float(diffs[0])), "GridFrameOffsetVector"
        return None, None, None
    for value, source in ((between, "SpacingBetweenSlices"), (thickness, "SliceThickness")):
        if value:
            return (normal * value if normal is not None else None), value, source
    return None, None, None


def _positions(ds: Dataset, n_frames: int, frames: list[int] | None = None) -> list[np.ndarray]:
    """ImagePositionPatient of each frame (of ``frames``) when every frame has one, else of the
    first only."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and len(per_frame) == n_frames and frames is not None:
        per_frame, n_frames = [per_frame[i] for i in frames], len(frames)
    if per_frame and len(per_frame) == n_frames:
        found = []
        for item in per_frame:
            plane = item.get("PlanePositionSequence")
            position = floats(plane[0].get("ImagePositionPatient"), 3) if plane else None
            if position is None:
                break
            found.append(np.array(position))
        else:
            return found
    position = floats(functional_value(ds, "PlanePositionSequence", "ImagePositionPatient"), 3)
    return [np.array(position)] if position is not None else []


def _affine(columns: tuple[np.ndarray, ...], origin: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    for i, column in enumerate(columns):
        affine[:3, i] = column
    affine[:3, 3] = origin
    return affine


# --------------------------------------------------------------------------- small helpers


def _other_attributes(ds: Dataset) -> dict[str, Any]:
    """Non-identifying attributes that later steps (e.g. series sorting) may want."""
    extra: dict[str, Any] = {}
    instance = int_or_none(ds.get("InstanceNumber"))
    if instance is not None:
        extra["instance_number"] = instance
    location = first_float(ds.get("SliceLocation"))
    if location is not None:
        extra["slice_location"] = location
    return extra
