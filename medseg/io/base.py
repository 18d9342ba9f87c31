"""Data types and small helpers shared by every medseg image reader.

See :mod:`medseg.io` for the contract that the readers follow.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError

logger = logging.getLogger(__name__)

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

#: Fewest pixels along a side of a 2D image (or of a volume's slice) below which a prediction is
#: warned about (:func:`small_image_problem`): 16 pixels is where a 4-level U-Net (the default
#: depth) has pooled an image down to one pixel, and where a classifier's 224 x 224 input would be
#: more than 14x upsampled: the image holds too little for a reliable prediction. It is a warning,
#: not a refusal: every medseg model resizes or pads its input, so it runs at any size.
MIN_IMAGE_PIXELS = 16

#: Fewest voxels along an axis of a volume predicted in 3D below which a prediction is warned about:
#: a 3x3x3 convolution needs at least 3, and a volume thinner than 4 voxels is padded by the
#: sliding window to more than twice its size, so the model sees mostly padding.
MIN_VOLUME_VOXELS = 4

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


def volume_count(image: Image) -> int:
    """Volumes the reader found along a 4th dimension (NIfTI time points, DICOM acquisitions).

    1 for a 3D volume or a 2D image; N > 1 when the channel axis of ``image.array`` holds N
    volumes of the file (``meta.extra["volumes"]``, with ``"volume_axis"`` and, when the header
    says, ``"volumes_are"``) rather than colour or named channels.
    """
    return int(image.meta.extra.get("volumes", 1) or 1)


def check_channels(
    image: Image,
    channels: int,
    names: Mapping[int, str] | Sequence[str] | None = None,
    *,
    source: str | Path | None = None,
) -> None:
    """Refuse volumes along a 4th dimension unless the model takes them as its named channels.

    The rule: the N volumes of a 4D file (NIfTI time points, b-values, echoes; a DICOM series of N
    acquisitions) are channels only when the model takes exactly N channels and names them (a 3D
    model's ``dataset.json`` channels, e.g. ``{0: "T2", 1: "ADC"}``). A 2D model's 3 channels are
    colour (RGB), never volumes. Images without a 4th dimension (grey, RGB) pass unchanged;
    :func:`to_channels` converts those.

    Args:
        image: an image from :func:`medseg.io.read_image` (or the MSD reader).
        channels: the channels the model takes.
        names: the model's channel names (number -> name, or a list), when it names them.
        source: what to name in the message (default: the image's first source).

    Raises:
        DataError: one line naming the file, its shape, the number of volumes along the 4th
            dimension (and what they are, when known) and what the model takes.
    """
    n = volume_count(image)
    if n <= 1:
        return
    named = len(names or ()) == channels
    if n == channels and named:
        image.meta.extra["channel_names"] = _name_list(names, channels)
        logger.debug("%s: %d volumes taken as the model's channels", _where(image, source), n)
        return
    extra = image.meta.extra
    shape = tuple(extra.get("source_shape") or image.array.shape)
    what = f" ({extra['volumes_are']})" if extra.get("volumes_are") else ""
    axis = extra.get("volume_axis", "4th dimension")
    head = f"{_where(image, source)}: {len(shape)}D volume of shape {shape}: {n} volumes along "
    head += f"the {axis}{what}"
    if n != channels:
        reason = f"but the model takes {channels} channel{'s' if channels != 1 else ''}"
    else:
        reason = f"and the model's {channels} channels are colour (RGB) channels, not volumes"
    raise DataError(f"{head}, {reason}; give one 3D volume per file (or series)")


def small_image_problem(
    image: Image, *, source: str | Path | None = None, volume: bool = False
) -> str | None:
    """Why ``image`` is too small for a reliable prediction, or None.

    A 2D image (or each slice of a volume predicted slice by slice) smaller than
    :data:`MIN_IMAGE_PIXELS` along a side, or (``volume``: predicted in 3D) a volume smaller than
    :data:`MIN_VOLUME_VOXELS` along an axis. Callers log the text as a warning.
    """
    array = image.array
    if volume and image.is_volume:
        spatial, least, unit = array.shape[:3], MIN_VOLUME_VOXELS, "voxels"
    else:
        spatial, least, unit = array.shape[-3:-1], MIN_IMAGE_PIXELS, "pixels"
    if min(spatial) >= least:
        return None
    size = "x".join(str(n) for n in spatial)
    return (
        f"{_where(image, source)}: image of {size} {unit} is smaller than {least} {unit} along "
        f"an axis; the prediction is unreliable"
    )


def stack_volumes(where: str | Path, images: Sequence[Image], volumes_are: str) -> Image:
    """Stack 1-channel volumes of one grid (a series' acquisitions) along the channel axis.

    The result is DxHxWxN with ``meta.extra["volumes"] = N`` (see :func:`check_channels`), the
    first volume's geometry and every volume's files as ``meta.source``.

    Raises:
        DataError: the volumes differ in shape or slice positions, or one is not grey.
    """
    first = images[0]
    for image in images:
        if not image.is_volume or image.array.shape[-1] != 1:
            raise DataError(
                f"{where}: acquisition of shape {image.array.shape} is not a grey volume"
            )
        if image.array.shape != first.array.shape:
            raise DataError(
                f"{where}: the {len(images)} acquisitions ({volumes_are}) differ in shape "
                f"({first.array.shape[:3]} and {image.array.shape[:3]}); they are not one volume"
            )
        a, b = first.meta.extra.get("slice_positions"), image.meta.extra.get("slice_positions")
        if a is not None and b is not None and not np.allclose(a, b, atol=0.01):
            raise DataError(
                f"{where}: the {len(images)} acquisitions ({volumes_are}) are at different slice "
                f"positions; they do not form one volume"
            )
    array = np.concatenate([image.array for image in images], axis=-1)
    extra = dict(first.meta.extra)
    extra.update(volumes=len(images), volume_axis="4th dimension", volumes_are=volumes_are)
    extra.update(channels_from="DICOM acquisitions", source_shape=array.shape)
    source = tuple(s for image in images for s in image.meta.source)
    meta = ImageMeta(
        source=source,
        spacing=first.meta.spacing,
        affine=first.meta.affine,
        modality=first.meta.modality,
        photometric=None,
        patient_id=first.meta.patient_id,
        study_uid=first.meta.study_uid,
        series_uid=first.meta.series_uid,
        bits=first.meta.bits,
        extra=extra,
    )
    return Image(array=array, meta=meta)


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


def _where(image: Image, source: str | Path | None) -> str:
    if source is not None:
        return str(source)
    extra = image.meta.extra
    if extra.get("folder"):
        return str(extra["folder"])
    return image.meta.source[0] if image.meta.source else "image"


def _name_list(names: Mapping[int, str] | Sequence[str] | None, n: int) -> list[str]:
    if isinstance(names, Mapping):
        return [str(names.get(k, names.get(str(k), k))) for k in range(n)]  # type: ignore[call-overload]
    return [str(x) for x in (names or ())]


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"array of dtype {value.dtype}"
    return type(value).__name__
