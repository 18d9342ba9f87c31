"""Entry points: :func:`read_image`, :func:`read_mask`, :func:`list_image_files`.

They check the path, pick the reader by suffix (and by the DICOM ``DICM`` marker) and, for
masks, turn the stored values into an integer label map.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from medseg.errors import DataError
from medseg.io.base import DICOM_SUFFIXES, IMAGE_SUFFIXES, PLAIN_SUFFIXES, Image, check_file
from medseg.io.dicom import is_dicom, read_dicom_image, read_dicom_mask
from medseg.io.plain import read_plain_image, read_plain_mask

logger = logging.getLogger(__name__)

# File names never taken as images even though they carry the DICOM marker.
_NOT_IMAGES = frozenset({"dicomdir"})
# Largest stored value of a binary mask that is mapped to label 1.
_BINARY_MAX = (255, 65535)


def read_image(path: str | Path) -> Image:
    """Read an image file into the :mod:`medseg.io` contract.

    DICOM is recognised by the ``.dcm`` suffix or by the ``DICM`` marker (any suffix or none);
    PNG, JPEG, TIFF and BMP by suffix (case-insensitive).

    Args:
        path: Image file.

    Returns:
        float32 HxWxC image or DxHxWxC volume with its metadata.

    Raises:
        DataError: If the file is missing, empty, of an unsupported type, not a readable image,
            truncated or corrupt, or needs a decoder that is not installed. The message starts
            with the path.
    """
    path = check_file(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES or is_dicom(path):
        image = read_dicom_image(path)
    elif suffix in PLAIN_SUFFIXES:
        image = read_plain_image(path)
    else:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; supported are "
            f"{', '.join(sorted(IMAGE_SUFFIXES))} and DICOM files with any name"
        )
    logger.debug("%s: read image of shape %s", path, image.array.shape)
    return image


def read_mask(path: str | Path) -> np.ndarray:
    """Read a segmentation mask as an integer label map (0 is background).

    * A mask whose values are only 0 and 255 (or 0 and 65535) becomes 0/1.
    * Grey masks keep their values as labels; palette PNGs give their palette indices.
    * RGB(A) masks whose colour channels are identical give one channel; alpha is ignored.
    * A multi-page TIFF gives a DxHxW label volume; a multi-frame DICOM gives DxHxW too.

    DICOM masks use the stored values (no rescale, no MONOCHROME1 inversion).

    Args:
        path: Mask file (PNG, TIFF, BMP, JPEG - lossy, not recommended - or DICOM).

    Returns:
        HxW (or DxHxW) array of dtype uint8 when every label fits, else int32.

    Raises:
        DataError: If the file cannot be read (see :func:`read_image`), has values that are
            not non-negative integers, or is a colour mask whose channels differ.
    """
    path = check_file(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES or is_dicom(path):
        values, colour = read_dicom_mask(path)
    elif suffix in PLAIN_SUFFIXES:
        values, colour = read_plain_mask(path)
    else:
        raise DataError(
            f"{path}: unsupported mask file type {suffix or '(no suffix)'!r}; supported are "
            f"{', '.join(sorted(IMAGE_SUFFIXES))} and DICOM files with any name"
        )
    return _to_label_map(path, values, colour)


def list_image_files(folder: str | Path, recursive: bool = True) -> list[Path]:
    """List the image files that :func:`read_image` can read, sorted.

    A file is listed when its suffix is in :data:`IMAGE_SUFFIXES` (case-insensitive) or it
    carries the DICOM ``DICM`` marker. Hidden files and folders (name starting with ``.``,
    e.g. macOS ``._x.png`` resource forks) and ``DICOMDIR`` index files are skipped. Symbolic
    links to folders are not followed.

    Args:
        folder: Folder to search.
        recursive: Whether to search sub-folders too.

    Returns:
        Sorted list of paths (each ``folder / relative path``).

    Raises:
        DataError: If ``folder`` does not exist or is not a folder.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: folder does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder}: is not a folder")
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        for name in files:
            if name.startswith(".") or name.lower() in _NOT_IMAGES:
                continue
            path = Path(root) / name
            if path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path):
                found.append(path)
    found.sort()
    logger.debug("%s: found %d image file(s)", folder, len(found))
    return found


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
