"""Data types and small helpers shared by every medseg image reader.

See :mod:`medseg.io` for the contract that the readers follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError

#: Suffixes (lower case) read by Pillow.
PLAIN_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})

#: Suffixes (lower case) read as DICOM even without the ``DICM`` marker.
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm"})

#: Suffixes (lower case) read as NIfTI-1/NIfTI-2 by nibabel. ``.nii.gz`` is a double suffix:
#: ``Path("a.nii.gz").suffix`` is ``".gz"``, so test membership with :func:`image_suffix`.
NIFTI_SUFFIXES: frozenset[str] = frozenset({".nii", ".nii.gz"})

#: Every suffix (lower case) that :func:`medseg.io.read_image` accepts for a file, including
#: the double suffix ``.nii.gz`` (compare with :func:`image_suffix`, not ``Path.suffix``).
#: Files with any other suffix, or none, are read too when they carry the DICOM ``DICM``
#: marker; folders are read as one DICOM series.
IMAGE_SUFFIXES: frozenset[str] = PLAIN_SUFFIXES | DICOM_SUFFIXES | NIFTI_SUFFIXES

# ITU-R BT.601 luma weights for R, G, B.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


@dataclass
class ImageMeta:
    """What is known about where an image came from and how to place it in space.

    Attributes:
        source: The file or files that were read, as strings.
        spacing: Voxel size in mm in array axis order: ``(row, col)`` for 2D images and
            ``(slice, row, col)`` for volumes; ``None`` when unknown.
        affine: 4x4 matrix mapping a homogeneous array index to patient coordinates in mm (LPS
            for DICOM). The index is ``(row, col, 0, 1)`` for 2D images and
            ``(slice, row, col, 1)`` for volumes. ``None`` when unknown.
        modality: DICOM modality such as ``"CT"`` or ``"MR"``; ``None`` for plain images.
        photometric: Interpretation of the returned array (not of the stored file):
            ``"MONOCHROME2"`` (higher is brighter) when C is 1, ``"RGB"`` when C is 3. The
            stored value, when it differs, is in ``extra``.
        patient_id: Patient ID, kept for grouping images by patient (leak-free splits). Never
            log it or put it in file names; it is left out of ``repr``.
        study_uid: DICOM Study Instance UID (left out of ``repr``).
        series_uid: DICOM Series Instance UID (left out of ``repr``).
        bits: Stored bit depth of the source samples (8 for ordinary PNG/JPEG, BitsStored for
            DICOM, the palette entry depth for palette colour DICOM).
        extra: Anything else worth keeping, e.g. ``window_center``, ``window_width``,
            ``rescale_applied``, ``monochrome1_inverted``, ``alpha_dropped``.
    """

    source: tuple[str, ...]
    spacing: tuple[float, ...] | None = None
    affine: np.ndarray | None = None
    modality: str | None = None
    photometric: str | None = None
    patient_id: str | None = field(default=None, repr=False)
    study_uid: str | None = field(default=None, repr=False)
    series_uid: str | None = field(default=None, repr=False)
    bits: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(repr=False)
class Image:
    """An image as float32 array plus its metadata.

    Attributes:
        array: float32, channels last: HxWxC for 2D images, DxHxWxC for volumes, C >= 1.
        meta: Where the image came from and how it sits in space.

    Raises:
        ValueError: If ``array`` breaks the contract (dtype, number of axes) or
            ``meta.spacing``/``meta.affine`` do not fit it.
    """

    array: np.ndarray
    meta: ImageMeta

    def __post_init__(self) -> None:
        if not isinstance(self.array, np.ndarray) or self.array.dtype != np.float32:
            raise ValueError(
                f"Image.array must be a float32 numpy array, got {_describe(self.array)}"
            )
        if self.array.ndim not in (3, 4) or self.array.shape[-1] < 1:
            raise ValueError(
                f"Image.array must be HxWxC or DxHxWxC with C >= 1, got shape {self.array.shape}"
            )
        spacing = self.meta.spacing
        if spacing is not None and len(spacing) != self.array.ndim - 1:
            raise ValueError(
                f"ImageMeta.spacing {spacing} does not fit an array of shape {self.array.shape}"
            )
        affine = self.meta.affine
        if affine is not None and np.shape(affine) != (4, 4):
            raise ValueError(f"ImageMeta.affine must be 4x4, got shape {np.shape(affine)}")

    @property
    def is_volume(self) -> bool:
        """Whether the image is a volume (DxHxWxC) rather than a 2D image (HxWxC)."""
        return self.array.ndim == 4

    def __repr__(self) -> str:
        return (
            f"Image(shape={self.array.shape}, dtype={self.array.dtype}, "
            f"source={self.meta.source}, modality={self.meta.modality})"
        )


def to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """Convert a channels-last array to the given number of channels.

    The last axis is the channel axis, so HxWxC, DxHxWxC and NHWC arrays all work.

    * same number of channels: the input array itself is returned;
    * 1 -> 3: the grey channel is repeated (dtype kept);
    * 3 -> 1: ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (float32, or the input's
      floating dtype).

    Args:
        array: Channels-last array with at least 3 axes.
        channels: Wanted number of channels.

    Returns:
        Array with the same leading axes and ``channels`` channels.

    Raises:
        DataError: If the array has fewer than 3 axes or the conversion is not one of the above.
    """
    array = np.asarray(array)
    if array.ndim < 3:
        raise DataError(
            f"to_channels needs a channels-last array (HxWxC, NHWC or DxHxWxC), "
            f"got shape {array.shape}"
        )
    have = array.shape[-1]
    if have == channels:
        return array
    if have == 1 and channels == 3:
        return np.repeat(array, 3, axis=-1)
    if have == 3 and channels == 1:
        dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.dtype(np.float32)
        grey = array.astype(dtype, copy=False) @ _LUMA.astype(dtype)
        return grey[..., np.newaxis]
    raise DataError(
        f"cannot convert an image with {have} channel(s) to {channels} channel(s); "
        f"only 1 -> 3 (repeat) and 3 -> 1 (luma) are supported"
    )


def image_suffix(path: str | Path) -> str:
    """The lower-case suffix of ``path`` as :data:`IMAGE_SUFFIXES` spells it.

    Like ``Path.suffix`` but ``".nii.gz"`` for gzipped NIfTI (where ``Path.suffix`` gives
    ``".gz"``); ``""`` when the name has no suffix.
    """
    name = Path(path).name.lower()
    if name.endswith(".nii.gz") and len(name) > len(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def check_file(path: str | Path) -> Path:
    """Return ``path`` as a Path after checking that it is a non-empty regular file.

    Raises:
        DataError: If the file is missing, is a directory or has zero bytes.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: is not a regular file (a directory?)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    return path


def check_folder(folder: str | Path) -> Path:
    """Return ``folder`` as a Path after checking that it is an existing folder.

    Raises:
        DataError: If the folder is missing or is not a folder.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: folder does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder}: is not a folder")
    return folder


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"array of dtype {value.dtype}"
    return type(value).__name__
