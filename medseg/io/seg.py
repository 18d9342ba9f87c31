"""Label maps read back from files of any kind: DICOM SEG (highdicom), NIfTI, PNG/TIFF.

* :func:`read_seg_labels`: a DICOM SEG (BINARY or LABELMAP, e.g. one written by
  :func:`medseg.io.writers.write_seg`) as an integer label map whose value is the segment number,
  in medseg's ``(slice, row, col)`` order: slices ascending along the normal of the image plane
  (the cross product of the row and column direction cosines), as :func:`medseg.io.read_image`
  orders a DICOM series, with the spacing (mm) and the ``(slice, row, col, 1) -> LPS`` affine
  taken from the SEG's plane positions and pixel measures (``highdicom`` ``get_volume``).
  A SEG usually leaves out frames without foreground, so its volume spans only the slices
  from its first to its last stored frame: :func:`union_grid` and :func:`place_on_grid` put
  such a map on the grid of the image (or of another label map) it belongs to.
* :func:`read_label_map`: one label-map file of any supported kind, with its geometry: NIfTI
  (:func:`medseg.io.nifti.read_nifti_image`, reoriented like every medseg reader), DICOM SEG
  (above), or a plain image (PNG/TIFF/BMP, :func:`medseg.io.readers.read_mask`; no spacing, so
  distances are in pixels).

Every problem raises :class:`~medseg.errors.DataError` with one line naming the file. Patient
data in a SEG is never read into the returned metadata nor logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medseg.errors import DataError
from medseg.io.base import (
    DICOM_SUFFIXES,
    NIFTI_SUFFIXES,
    PLAIN_SUFFIXES,
    ImageMeta,
    check_file,
    image_suffix,
)
from medseg.io.headers import is_dicom
from medseg.io.nifti import read_nifti_image
from medseg.io.readers import read_mask

logger = logging.getLogger(__name__)

#: SOP Class UID of the Segmentation Storage IOD (DICOM SEG).
SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"

#: Suffixes (lower case, see :func:`medseg.io.image_suffix`) of label-map files.
LABEL_MAP_SUFFIXES = frozenset(NIFTI_SUFFIXES | DICOM_SUFFIXES | PLAIN_SUFFIXES) - {
    ".jpg",
    ".jpeg",
}

#: Tolerance (in voxels) of grid alignment: directions and offsets within it count as equal.
GRID_TOLERANCE = 1e-3


def is_seg(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM file of the Segmentation Storage SOP class (header only)."""
    import pydicom

    path = Path(path)
    if image_suffix(path) not in DICOM_SUFFIXES and not is_dicom(path):
        return False
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # not readable as DICOM: the reader that follows says why
        return False
    return str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS_UID


def read_seg_labels(path: str | Path) -> tuple[np.ndarray, ImageMeta]:
    """Read a DICOM SEG as an integer label map (segment number = label value).

    Args:
        path: A DICOM SEG file (BINARY or LABELMAP; segments must not overlap).

    Returns:
        ``(labels, meta)``: labels DxHxW (uint8, or uint16 beyond 255 segments) over the slices
        the SEG stores (first to last frame; slices between them without a frame are 0),
        ascending along the plane normal; ``meta.spacing`` ``(slice, row, col)`` in mm,
        ``meta.affine`` ``(slice, row, col, 1) -> LPS mm``, ``meta.extra["segments"]`` segment
        number -> segment label, ``meta.extra["seg_frames_only"]`` True.

    Raises:
        DataError: the file is missing, not a DICOM SEG, fractional, has overlapping segments
            or frames that do not form one regularly spaced volume.
    """
    import highdicom as hd

    path = check_file(path)
    try:
        seg = hd.seg.segread(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a readable DICOM SEG ({_first_line(e)})") from None
    if str(seg.SOPClassUID) != SEG_SOP_CLASS_UID:
        raise DataError(f"{path}: not a DICOM SEG (SOP class {seg.SOPClassUID})")
    if str(seg.SegmentationType) == "FRACTIONAL":
        raise DataError(f"{path}: a FRACTIONAL DICOM SEG; only BINARY or LABELMAP ones are labels")
    numbers = [int(n) for n in seg.segment_numbers]
    dtype = np.uint8 if max(numbers, default=0) <= 255 else np.uint16
    try:
        volume = seg.get_volume(combine_segments=True, dtype=dtype)
    except Exception as e:
        raise DataError(
            f"{path}: DICOM SEG is not one labelled volume ({_first_line(e)})"
        ) from None
    labels, affine = np.asarray(volume.array), np.asarray(volume.affine, dtype=np.float64)
    if labels.ndim != 3:
        raise DataError(f"{path}: DICOM SEG gives an array of shape {labels.shape}, not D x H x W")
    normal = np.cross(affine[:3, 2], affine[:3, 1])
    if float(affine[:3, 0] @ normal) < 0:  # highdicom's slice order descends: flip it
        affine = affine.copy()
        affine[:3, 3] += (labels.shape[0] - 1) * affine[:3, 0]
        affine[:3, 0] *= -1
        labels = labels[::-1]
    segments = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    meta = ImageMeta(
        source=(str(path),),
        spacing=_spacing(affine),
        affine=affine,
        modality="SEG",
        extra={"segments": segments, "seg_frames_only": True},
    )
    logger.debug("%s: DICOM SEG, %d segments, labels %s", path, len(segments), labels.shape)
    return np.ascontiguousarray(labels), meta


def read_label_map(path: str | Path) -> tuple[np.ndarray, ImageMeta]:
    """Read one label-map file of any supported kind, with what is known of its geometry.

    * NIfTI (``.nii``, ``.nii.gz``): DxHxW, oriented as :func:`medseg.io.read_image` does,
      spacing and affine from the header; values must be non-negative integers.
    * DICOM SEG (any name): :func:`read_seg_labels`.
    * PNG/TIFF/BMP: :func:`medseg.io.read_mask` (HxW, or DxHxW for a multi-page TIFF; 0/255
      masks become 0/1); ``meta.spacing`` and ``meta.affine`` are None (unit: pixels).

    Returns:
        ``(labels, meta)``: an integer label map and its :class:`~medseg.io.ImageMeta` (the
        spacing or None).

    Raises:
        DataError: an unreadable file, a kind that holds no label map (JPEG, a DICOM image that
            is not a SEG, a multi-channel NIfTI) or values that are not non-negative integers.
    """
    path = check_file(path)
    suffix = image_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti_labels(path)
    if suffix in DICOM_SUFFIXES or is_dicom(path):
        if not is_seg(path):
            raise DataError(f"{path}: a DICOM file that is not a DICOM SEG holds no label map")
        return read_seg_labels(path)
    if suffix in LABEL_MAP_SUFFIXES:
        return read_mask(path), ImageMeta(source=(str(path),))
    raise DataError(
        f"{path}: not a label-map file (expected {', '.join(sorted(LABEL_MAP_SUFFIXES))} "
        f"or a DICOM SEG)"
    )


def union_grid(
    shape_a: tuple[int, ...], affine_a: np.ndarray, shape_b: tuple[int, ...], affine_b: np.ndarray
) -> tuple[tuple[int, int, int], np.ndarray] | None:
    """The smallest grid holding two voxel grids that lie on one lattice, or None if they don't.

    Two grids share a lattice when the voxels of ``a`` sit on voxels of ``b``: the axes of
    ``a`` are those of ``b`` up to order and sign with the same spacing, and its origin is a
    whole number of voxels away (both within :data:`GRID_TOLERANCE` voxels).

    Args:
        shape_a, affine_a: DxHxW shape and ``(slice, row, col, 1) -> mm`` affine of ``a``.
        shape_b, affine_b: The same of ``b``, whose axis order and directions the result keeps.

    Returns:
        ``(shape, affine)`` of the union grid, or None when the grids do not share a lattice.
    """
    to_b = np.linalg.solve(np.asarray(affine_b, float), np.asarray(affine_a, float))
    linear = to_b[:3, :3]
    rounded = np.round(linear)
    perm = np.abs(rounded)
    if not np.allclose(linear, rounded, atol=GRID_TOLERANCE) or not (
        np.array_equal(perm.sum(0), np.ones(3)) and np.array_equal(perm.sum(1), np.ones(3))
    ):
        return None
    offset = to_b[:3, 3]
    if not np.allclose(offset, np.round(offset), atol=GRID_TOLERANCE):
        return None
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    corners *= np.array(shape_a, float) - 1
    in_b = np.round(corners @ rounded.T + np.round(offset)).astype(int)
    low = np.minimum(in_b.min(0), 0)
    high = np.maximum(in_b.max(0), np.array(shape_b) - 1)
    affine = np.asarray(affine_b, float).copy()
    affine[:3, 3] = affine_b[:3, :3] @ low + affine_b[:3, 3]
    return tuple(int(n) for n in high - low + 1), affine


def place_on_grid(
    labels: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], grid_affine: np.ndarray
) -> np.ndarray:
    """A label map moved onto another grid of the same lattice (axes permuted or flipped, zeros
    padded, cropped) with highdicom's ``Volume.match_geometry``; nothing is resampled.

    Raises:
        DataError: the grids do not share a lattice, or foreground would be cropped away.
    """
    import highdicom as hd

    volume = hd.Volume(array=np.asarray(labels), affine=affine, coordinate_system="PATIENT")
    geometry = hd.VolumeGeometry(grid_affine, shape, coordinate_system="PATIENT")
    try:
        placed = volume.match_geometry(geometry, tol=GRID_TOLERANCE)
    except RuntimeError as e:
        raise DataError(f"voxel grids differ beyond axis order and padding ({e})") from None
    out = np.asarray(placed.array)
    if np.count_nonzero(out) != np.count_nonzero(labels):
        raise DataError("part of the label map lies outside the other grid")
    return out


def _read_nifti_labels(path: Path) -> tuple[np.ndarray, ImageMeta]:
    image = read_nifti_image(path)
    if image.array.shape[-1] != 1:
        raise DataError(f"{path}: NIfTI with {image.array.shape[-1]} volumes is not a label map")
    values = image.array[..., 0]
    if not np.array_equal(values, np.round(values)) or (values.size and values.min() < 0):
        raise DataError(f"{path}: label values are not non-negative integers")
    high = float(values.max()) if values.size else 0.0
    labels = values.astype(np.uint8 if high <= 255 else np.int32)
    return labels, image.meta


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(np.linalg.norm(affine[:3, i])) for i in range(3))


def _first_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return (text[:200] or type(error).__name__).rstrip()
