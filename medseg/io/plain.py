"""Pillow reader for plain image files (PNG, JPEG, TIFF, BMP).

Values are returned exactly as stored (0..255 for 8-bit, 0..65535 for 16-bit), as float32 for
images; nothing is normalised here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageSequence

from medseg.errors import DataError
from medseg.io.base import Image, ImageMeta

logger = logging.getLogger(__name__)

# Stored bit depth per Pillow mode (before any conversion).
_MODE_BITS = {
    "1": 1,
    "L": 8,
    "LA": 8,
    "La": 8,
    "P": 8,
    "PA": 8,
    "RGB": 8,
    "RGBA": 8,
    "RGBa": 8,
    "RGBX": 8,
    "CMYK": 8,
    "YCbCr": 8,
    "LAB": 8,
    "HSV": 8,
    "I;16": 16,
    "I;16L": 16,
    "I;16B": 16,
    "I;16N": 16,
    "I": 32,
    "F": 32,
}
_GREY_MODES = frozenset({"1", "L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# Modes whose mask array is HxW: palette indices, or grey with alpha dropped.
_INDEX_MODES = frozenset({"P", "PA", "LA", "La"})
_TIFF_BITS_PER_SAMPLE = 258
_EXIF_ORIENTATION = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_plain_image(path: Path) -> Image:
    """Read a PNG/JPEG/TIFF/BMP file as an :class:`~medseg.io.base.Image`.

    Grey modes give C=1, colour modes C=3; alpha is dropped (``extra["alpha_dropped"]``),
    palette images are converted to RGB. A TIFF with more than one page is a volume.

    Args:
        path: An existing, non-empty file.

    Returns:
        The image with stored values as float32.

    Raises:
        DataError: If Pillow cannot read the file or the pages of a TIFF differ.
    """
    extra: dict[str, Any] = {}
    frames, info = _load_frames(path)
    arrays = [_frame_to_image_array(path, frame, extra) for frame in frames]
    array = _stack(path, arrays)
    mode = info["mode"]
    bits = info.get("tiff_bits") or _MODE_BITS.get(mode)
    if _png_colour_16bit(path):
        logger.warning("%s: 16-bit colour PNG; Pillow reduces it to 8 bits per channel", path)
        extra["reduced_from_16_bits"] = True
        bits = 8
    extra.update({"format": info["format"], "pil_mode": mode})
    if info.get("exif_orientation") not in (None, 1):
        extra["exif_orientation"] = info["exif_orientation"]
        logger.warning(
            "%s: EXIF orientation %s is not applied; pixels are returned as stored",
            path,
            info["exif_orientation"],
        )
    if len(frames) > 1:
        extra["n_pages"] = len(frames)
    photometric = "MONOCHROME2" if array.shape[-1] == 1 else "RGB"
    meta = ImageMeta(source=(str(path),), photometric=photometric, bits=bits, extra=extra)
    return Image(array=array, meta=meta)


def read_plain_mask(path: Path) -> tuple[np.ndarray, bool]:
    """Read a PNG/JPEG/TIFF/BMP file as raw label values (not yet validated).

    Palette images give their palette indices (the usual encoding of label PNGs); alpha is
    dropped; RGB images keep 3 channels so that the caller can check them.

    Args:
        path: An existing, non-empty file.

    Returns:
        HxW or HxWx3 (DxHxW or DxHxWx3 for multi-page TIFF) array of stored values, and
        whether it is colour (last axis holds R, G, B).

    Raises:
        DataError: If Pillow cannot read the file or the pages of a TIFF differ.
    """
    frames, info = _load_frames(path)
    if info["format"] == "JPEG":
        logger.warning("%s: JPEG is lossy; label values in a JPEG mask may be corrupted", path)
    if _png_colour_16bit(path):
        logger.warning("%s: 16-bit colour PNG; Pillow reduces it to 8 bits per channel", path)
    arrays = [_frame_to_mask_array(frame) for frame in frames]
    colour = info["mode"] not in _GREY_MODES | _INDEX_MODES
    return _stack(path, arrays), colour


def _load_frames(path: Path) -> tuple[list[PILImage.Image], dict[str, Any]]:
    """Open ``path`` with Pillow and return its loaded frames (TIFF pages) and some info."""
    try:
        with PILImage.open(path) as im:
            fmt = im.format or "unknown"
            info: dict[str, Any] = {"format": fmt, "mode": im.mode}
            if fmt == "TIFF":
                bps = im.tag_v2.get(_TIFF_BITS_PER_SAMPLE) if hasattr(im, "tag_v2") else None
                if isinstance(bps, tuple):
                    bps = bps[0] if bps else None
                if isinstance(bps, int):
                    info["tiff_bits"] = bps
                frames = [frame.copy() for frame in ImageSequence.Iterator(im)]
            else:
                # Only TIFF pages form a volume; other multi-frame formats (e.g. MPO JPEGs)
                # give their first frame.
                im.load()
                frames = [im.copy()]
            try:
                info["exif_orientation"] = im.getexif().get(_EXIF_ORIENTATION)
            except Exception:  # broken EXIF must not stop reading the pixels
                info["exif_orientation"] = None
    except PILImage.DecompressionBombError as e:
        raise DataError(f"{path}: image is too large to read safely ({e})") from e
    except PILImage.UnidentifiedImageError as e:
        raise DataError(
            f"{path}: not a readable image (Pillow could not identify the file format)"
        ) from e
    except Exception as e:
        raise DataError(f"{path}: image data is truncated or corrupt ({e})") from e
    return frames, info


def _frame_to_image_array(path: Path, im: PILImage.Image, extra: dict[str, Any]) -> np.ndarray:
    """Convert one Pillow frame to float32 HxWxC with stored values."""
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        extra["palette_converted"] = True
        mode = im.mode
    elif mode == "PA":
        im = im.convert("RGBA")
        extra["palette_converted"] = True
        mode = im.mode
    if mode in ("RGBa", "La"):  # premultiplied alpha
        im = im.convert(mode.upper())
        mode = im.mode
    if mode in _GREY_MODES:
        return np.asarray(im).astype(np.float32)[..., np.newaxis]
    if mode == "LA":
        extra["alpha_dropped"] = True
        return np.asarray(im)[..., :1].astype(np.float32)
    if mode in ("RGBA", "RGBX"):
        if mode == "RGBA":
            extra["alpha_dropped"] = True
        return np.asarray(im)[..., :3].astype(np.float32)
    if mode == "RGB":
        return np.asarray(im).astype(np.float32)
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        extra["converted_from"] = mode
        return np.asarray(im.convert("RGB")).astype(np.float32)
    raise DataError(f"{path}: unsupported Pillow image mode {mode!r}")


def _frame_to_mask_array(im: PILImage.Image) -> np.ndarray:
    """Convert one Pillow frame to HxW (or HxWx3 for colour) stored label values."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im).astype(np.uint8)
    if mode in ("LA", "La", "PA"):
        return np.asarray(im.convert(mode[0]))
    if mode in ("RGBA", "RGBa", "RGBX"):
        return np.asarray(im.convert("RGB"))
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB"))
    return np.asarray(im)


def _stack(path: Path, arrays: list[np.ndarray]) -> np.ndarray:
    """Return the single frame, or the frames stacked along a new first (slice) axis."""
    if len(arrays) == 1:
        return arrays[0]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(
            f"{path}: multi-page TIFF pages differ in size or channels {sorted(shapes)}; "
            f"cannot stack them into a volume"
        )
    if len({a.dtype for a in arrays}) != 1:
        raise DataError(f"{path}: multi-page TIFF pages differ in pixel type")
    return np.stack(arrays, axis=0)


def _png_colour_16bit(path: Path) -> bool:
    """Whether ``path`` is a 16-bit colour (RGB/RGBA/LA) PNG, which Pillow reduces to 8 bits."""
    try:
        with path.open("rb") as f:
            head = f.read(26)
    except OSError:
        return False
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return False
    bit_depth, colour_type = head[24], head[25]
    return bit_depth == 16 and colour_type in (2, 4, 6)


# --------------------------------------------------------------------------- JPEG integrity

# Markers that may follow the entropy-coded data of a scan (another table, scan or the end).
_AFTER_SCAN = frozenset({0xC4, 0xCC, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xFE}) | frozenset(
    range(0xE0, 0xF0)
)
# Grey levels, and share of pixels, beyond which two decoders of one file disagree.
_DECODER_TOLERANCE, _DECODER_SHARE = 24, 0.002


def jpeg_data_problem(path: Path) -> str | None:
    """Why a JPEG file's compressed data is damaged, or None when nothing is found.

    Pillow (libjpeg-turbo) decodes damaged entropy-coded data without an error: it drops the
    decoder's warnings and fills or garbles the rest of the image. This check, for audits,
    looks at the data itself:

    * the marker structure: every ``0xFF`` inside a scan must be a stuffed byte or the next
      restart marker in sequence, and the file must end with an end-of-image marker;
    * a second, independent decoder (pylibjpeg's libjpeg, a pydicom dependency): garbage in the
      Huffman-coded data makes the two decoders resynchronise differently, so their luma planes
      disagree (an intact file gives the same plane within 1 grey level).

    Garbage that happens to decode as valid Huffman codes in both decoders is not found; no
    JPEG decoder can tell it from image content.

    Args:
        path: a file (anything else than a JPEG gives None).
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"{path}: cannot read the file ({e.strerror or e})"
    if not data.startswith(b"\xff\xd8"):
        return None
    problem = _marker_problem(data)
    if problem is None:
        problem = _decoders_disagree(data)
    return f"{path}: JPEG data is corrupt ({problem})" if problem else None


def _marker_problem(data: bytes) -> str | None:
    """What is wrong with the marker structure of a JPEG byte string, or None."""
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            return f"no marker at byte {i}"
        while i + 1 < n and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        if i + 1 >= n:
            break
        marker = data[i + 1]
        if marker == 0xD9:
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if i + 4 > n:
            break
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if end > n:
            break
        i = end
        if marker == 0xDA:
            i, problem = _scan_end(data, i)
            if problem:
                return problem
    return "the file ends before its end-of-image marker (truncated)"


def _scan_end(data: bytes, i: int) -> tuple[int, str | None]:
    """Walk the entropy-coded data from ``i``; where the next marker starts, or a problem."""
    expected = 0
    while True:
        i = data.find(b"\xff", i)
        if i < 0 or i + 1 >= len(data):
            return len(data), None
        byte = data[i + 1]
        if byte == 0x00:
            i += 2
        elif byte == 0xFF:
            i += 1
        elif 0xD0 <= byte <= 0xD7:
            if byte - 0xD0 != expected:
                return i, f"restart marker {byte - 0xD0} where {expected} was due, at byte {i}"
            expected = (expected + 1) % 8
            i += 2
        elif byte in _AFTER_SCAN:
            return i, None
        else:
            return i, f"invalid marker 0xFF{byte:02X} inside the compressed data at byte {i}"


def _decoders_disagree(data: bytes) -> str | None:
    """Whether Pillow and libjpeg decode different luma planes from ``data`` (see above)."""
    try:
        import libjpeg  # pylibjpeg-libjpeg
    except ImportError:  # the check needs it; without it, structure only
        return None
    import io

    with PILImage.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "RGB") or getattr(im, "layers", 1) not in (1, 3):
            return None
        if im.mode == "RGB":
            im.draft("YCbCr", im.size)
        im.load()
        ours = np.asarray(im)
    ours = ours if ours.ndim == 2 else ours[..., 0]
    try:
        other = np.asarray(libjpeg.decode(data))
    except Exception as e:  # the second decoder refuses the data outright
        return f"{' '.join(str(e).split())[:120]}"
    other = other if other.ndim == 2 else other[..., 0]
    if other.shape != ours.shape:
        return None  # a layout the second decoder reads differently: no verdict
    off = np.abs(ours.astype(np.int16) - other.astype(np.int16)) > _DECODER_TOLERANCE
    share = float(off.mean())
    if share > _DECODER_SHARE:
        return f"two decoders disagree on {100 * share:.1f}% of the pixels: garbled data"
    return None
