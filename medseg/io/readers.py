"""Entry points: :func:`read_image`, :func:`read_mask`, :func:`list_image_files`.

They check the path, pick the reader (a folder is a DICOM series; files by suffix, DICOM also
by the ``DICM`` marker) and, for masks, turn the stored values into an integer label map.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from medseg.errors import DataError, MedsegError
from medseg.io.base import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    PLAIN_SUFFIXES,
    Image,
    check_channels,
    check_file,
    check_folder,
    image_suffix,
    raise_walk_error,
)
from medseg.io.dicom import read_dicom_image, read_dicom_mask
from medseg.io.dicom_series import read_series_image, read_series_mask
from medseg.io.headers import is_dicom
from medseg.io.nifti import read_nifti_image, read_nifti_mask
from medseg.io.plain import read_plain_image, read_plain_mask

logger = logging.getLogger(__name__)

# File names never taken as images even though they carry the DICOM marker.
_NOT_IMAGES = frozenset({"dicomdir"})
# Largest stored value of a binary mask that is mapped to label 1.
_BINARY_MAX = (255, 65535)


def read_image(
    path: str | Path,
    *,
    allow_gaps: bool = False,
    replace_non_finite: float | None = None,
    channels: int | None = None,
    channel_names: Mapping[int, str] | Sequence[str] | None = None,
) -> Image:
    """Read an image file, or a folder holding one DICOM series, into the :mod:`medseg.io` contract.

    * A folder is read as one DICOM series (DxHxWxC, slices sorted by position; see
      :mod:`medseg.io`); a folder with several series raises (use
      :func:`~medseg.io.read_dicom_series`).
    * ``.nii`` / ``.nii.gz`` is NIfTI, reoriented as described in :mod:`medseg.io.nifti`.
    * DICOM files are recognised by the ``.dcm`` suffix or by the ``DICM`` marker (any
      suffix or none); PNG, JPEG, TIFF and BMP by suffix (case-insensitive).

    Args:
        path: Image file or DICOM series folder.
        allow_gaps: DICOM series only: read a series with a missing slice (a step between
            neighbouring slices above 1.5x the median) instead of raising; the spacing is then
            the median step and ``meta.extra["slice_gaps"]`` lists the gaps.
        replace_non_finite: NIfTI only: replace NaN/Inf voxels with this value instead of
            raising.
        channels: the channels the consumer (a model) takes. When given, a file with several
            volumes along a 4th dimension (a 4D NIfTI, a DICOM series of several acquisitions)
            is refused unless it holds exactly that many and ``channel_names`` names them
            (:func:`~medseg.io.base.check_channels`). None: the volumes are returned as channels
            and ``meta.extra["volumes"]`` says so; the caller checks.
        channel_names: the consumer's channel names (``dataset.json``'s), with ``channels``.

    Returns:
        float32 HxWxC image or DxHxWxC volume with its metadata.

    Raises:
        DataError: If the file is missing, empty, of an unsupported type, not a readable image,
            truncated or corrupt, or needs a decoder that is not installed; or the folder is not
            one consistent DICOM series; or (``channels``) its 4th dimension does not hold the
            consumer's channels. The message starts with the path.
    """
    path = Path(path)
    if path.is_dir():
        with _reading(path, "DICOM series"):
            image = read_series_image(path, allow_gaps=allow_gaps)
        logger.debug("%s: read DICOM series of shape %s", path, image.array.shape)
        if channels is not None:
            check_channels(image, channels, channel_names, source=path)
        return image
    path = check_file(path)
    suffix = image_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        with _reading(path, "NIfTI"):
            image = read_nifti_image(path, replace_non_finite=replace_non_finite)
    elif suffix in DICOM_SUFFIXES or is_dicom(path):
        with _reading(path, "DICOM"):
            image = read_dicom_image(path)
    elif suffix in PLAIN_SUFFIXES:
        with _reading(path, "image"):
            image = read_plain_image(path)
    else:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; supported are "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}, DICOM files with any name and DICOM "
            f"series folders"
        )
    logger.debug("%s: read image of shape %s", path, image.array.shape)
    if channels is not None:
        check_channels(image, channels, channel_names, source=path)
    return image


def read_mask(path: str | Path, *, allow_gaps: bool = False) -> np.ndarray:
    """Read a segmentation mask as an integer label map (0 is background).

    * A mask whose values are only 0 and 255 (or 0 and 65535) becomes 0/1.
    * Grey masks keep their values as labels; palette PNGs give their palette indices.
    * RGB(A) masks whose colour channels are identical give one channel; alpha is ignored.
    * A multi-page TIFF gives a DxHxW label volume; a multi-frame DICOM gives DxHxW too.
    * A folder holding one DICOM mask series gives DxHxW, slices in the same position order
      as :func:`read_image` uses (align it with an image series by
      :func:`~medseg.io.slice_positions` and :func:`~medseg.io.match_slice_positions`).
    * A NIfTI file gives DxHxW, reoriented exactly like :func:`read_image` does.

    DICOM masks use the stored values (no rescale, no MONOCHROME1 inversion); NIfTI masks the
    values after the header's scl_slope/scl_inter.

    Args:
        path: Mask file (PNG, TIFF, BMP, JPEG - lossy, not recommended - DICOM, NIfTI) or DICOM
            series folder.
        allow_gaps: DICOM series only, as in :func:`read_image`.

    Returns:
        HxW (or DxHxW) array of dtype uint8 when every label fits, else int32.

    Raises:
        DataError: If the file cannot be read (see :func:`read_image`), has values that are
            not non-negative integers, or is a colour mask whose channels differ.
    """
    path = Path(path)
    if path.is_dir():
        with _reading(path, "DICOM series"):
            values, colour = read_series_mask(path, allow_gaps=allow_gaps)
        return _to_label_map(path, values, colour)
    path = check_file(path)
    suffix = image_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        with _reading(path, "NIfTI"):
            values, colour = read_nifti_mask(path), False
    elif suffix in DICOM_SUFFIXES or is_dicom(path):
        with _reading(path, "DICOM"):
            values, colour = read_dicom_mask(path)
    elif suffix in PLAIN_SUFFIXES:
        with _reading(path, "image"):
            values, colour = read_plain_mask(path)
    else:
        raise DataError(
            f"{path}: unsupported mask file type {suffix or '(no suffix)'!r}; supported are "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}, DICOM files with any name and DICOM "
            f"series folders"
        )
    return _to_label_map(path, values, colour)


def list_image_files(folder: str | Path, recursive: bool = True) -> list[Path]:
    """List the image files that :func:`read_image` can read, sorted.

    A file is listed when its suffix (:func:`~medseg.io.image_suffix`, so ``.nii.gz``
    counts) is in :data:`IMAGE_SUFFIXES` (case-insensitive) or it carries the DICOM ``DICM``
    marker. Each file of a DICOM series is listed on its own; read a series folder as one
    volume with :func:`read_image` (or all series with :func:`~medseg.io.read_dicom_series`).

    Hidden files and folders (name starting with ``.``, e.g. macOS ``._x.png`` resource
    forks) and ``DICOMDIR`` index files are skipped. Symbolic links to folders are not
    followed.

    Args:
        folder: Folder to search.
        recursive: Whether to search sub-folders too.

    Returns:
        Sorted list of paths (each ``folder / relative path``).

    Raises:
        DataError: If ``folder`` does not exist, is not a folder, or it or a sub-folder cannot be
            listed (permissions): unreadable folders are never skipped silently.
    """
    folder = check_folder(folder)
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, onerror=raise_walk_error):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        for name in files:
            if name.startswith(".") or name.lower() in _NOT_IMAGES:
                continue
            path = Path(root) / name
            if image_suffix(path) in IMAGE_SUFFIXES or is_dicom(path):
                found.append(path)
    found.sort()
    logger.debug("%s: found %d image file(s)", folder, len(found))
    return found


@contextmanager
def _reading(path: Path, kind: str) -> Iterator[None]:
    """Turn anything a third-party decoder raises on a corrupt file into a DataError.

    The format readers already say what is wrong in the cases they know; this is the net for the
    rest (a malformed header field, a decoder bug), so that a bad file never gives anything but
    a :class:`~medseg.errors.DataError` naming it.
    """
    try:
        yield
    except MedsegError:
        raise
    except MemoryError:
        raise DataError(f"{path}: {kind} file declares an image too large to read") from None
    except RecursionError:
        raise DataError(f"{path}: {kind} file is corrupt (nested too deeply to parse)") from None
    except Exception as e:
        reason = " ".join(str(e).split())[:300] or "no details"
        raise DataError(
            f"{path}: {kind} file is corrupt or unsupported ({type(e).__name__}: {reason})"
        ) from e


def _to_label_map(path: Path, values: np.ndarray, colour: bool) -> np.ndarray:
    """Validate stored mask values and return them as a uint8/int32 label map."""
    if colour:
        first = values[..., 0]
        if not all(np.array_equal(first, values[..., c]) for c in range(1, values.shape[-1])):
            raise DataError(
                f"{path}: colour mask whose channels differ; colour-coded masks are not "
                f"supported, save one integer label per pixel (grey or palette image)"
            )
        values = first
    if values.size == 0:
        raise DataError(f"{path}: mask is empty")
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise DataError(f"{path}: mask values are not integers; expected integer labels")
    elif not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
        raise DataError(f"{path}: mask has unsupported pixel type {values.dtype}")
    low, high = values.min(), values.max()
    if low < 0:
        raise DataError(f"{path}: mask has negative values (minimum {low}); labels must be >= 0")
    if high > np.iinfo(np.int32).max:
        raise DataError(f"{path}: mask value {high} is too large for a label")
    if high in _BINARY_MAX and np.all((values == 0) | (values == high)):
        logger.debug("%s: binary 0/%d mask mapped to 0/1", path, int(high))
        return (values == high).astype(np.uint8)
    dtype = np.uint8 if high <= 255 else np.int32
    return values.astype(dtype)
