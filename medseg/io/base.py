"""Data types and small helpers shared by every medseg image reader.

See :mod:`medseg.io` for the contract that the readers follow.
"""

from __future__ import annotations

import errno
import os
import stat
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

#: Most samples (voxels x channels) a DICOM or NIfTI header may declare: 2**29, e.g. 1024 x 1024
#: x 512. A header that declares more is refused before any pixel buffer is allocated, so that a
#: corrupt or hostile file cannot make the reader ask for gigabytes (as Pillow's decompression
#: bomb limit does for plain images).
MAX_SAMPLES = 2**29

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
    """Return ``path`` as a Path after checking that it is a non-empty regular file we may read.

    Raises:
        DataError: If the file is missing (or a dangling or looping symbolic link), is a
            directory or another non-regular file (FIFO, device), has zero bytes, or cannot be
            opened for reading (permissions).
    """
    path = Path(path)
    try:
        info = path.stat()
    except OSError as e:
        if path.is_symlink():
            raise DataError(f"{path}: {_link_problem(path, e)}") from None
        if isinstance(e, PermissionError):
            raise DataError(f"{path}: permission denied; cannot look up the file") from None
        raise DataError(f"{path}: file does not exist") from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"{path}: is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path}: is not a regular file (a FIFO, socket or device?)")
    if info.st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    try:
        with path.open("rb"):
            pass
    except PermissionError:
        raise DataError(
            f"{path}: permission denied; the file is not readable by this user"
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot open the file ({e.strerror or e})") from None
    return path


def check_folder(folder: str | Path) -> Path:
    """Return ``folder`` as a Path after checking that it is an existing folder we may list.

    Raises:
        DataError: If the folder is missing (or a dangling or looping symbolic link), is not a
            folder, or cannot be listed (permissions).
    """
    folder = Path(folder)
    try:
        info = folder.stat()
    except OSError as e:
        if folder.is_symlink():
            raise DataError(f"{folder}: {_link_problem(folder, e)}") from None
        raise DataError(f"{folder}: folder does not exist") from None
    if not stat.S_ISDIR(info.st_mode):
        raise DataError(f"{folder}: is not a folder")
    try:
        with os.scandir(folder):
            pass
    except OSError as e:
        raise_walk_error(e)
    return folder


def raise_walk_error(error: OSError) -> None:
    """``onerror`` for :func:`os.walk`: a folder that cannot be listed is an error, never skipped.

    Raises:
        DataError: Always, naming the folder and the reason.
    """
    where = error.filename if error.filename is not None else "folder"
    if isinstance(error, PermissionError):
        raise DataError(f"{where}: permission denied; cannot list the folder") from None
    raise DataError(f"{where}: cannot list the folder ({error.strerror or error})") from None


def _link_problem(path: Path, error: OSError) -> str:
    """Why a symbolic link cannot be followed: a loop, or a missing target."""
    if error.errno == errno.ELOOP:
        return "symbolic link loop (the link points back to itself)"
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return f"dangling symbolic link: its target {target!r} does not exist"


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"array of dtype {value.dtype}"
    return type(value).__name__
