"""NIfTI reader and label writer (nibabel), in the array convention of the DICOM readers.

Orientation. The image is first reoriented to the closest canonical orientation
(``nibabel.as_closest_canonical``): voxel axes ``(i, j, k)`` then run, as closely as the
affine allows, towards patient Right, Anterior and Superior (RAS+). The returned array is

    ``array[s, r, c] = canonical[I - 1 - c, J - 1 - r, s]``

i.e. axes ``(k, j, i)`` become ``(slice, row, col)``, rows are flipped so that anterior is at
the top (row index grows towards posterior) and columns are flipped so that the patient's right
is on the image's left (column index grows towards patient left). This is the radiological
display in which DICOM axial images are stored (rows along +y, columns along +x of LPS), and
slice index grows towards superior like a position-sorted DICOM axial series. ``meta.affine``
maps ``(slice, row, col, 1)`` to LPS mm (the NIfTI RAS affine with x and y negated), and
``meta.spacing`` is the header zooms in ``(slice, row, col)`` order. For an oblique affine the
axes are the closest ones and the affine stays exact.

The original affine, shape and header codes are kept in ``meta.extra`` so that
:func:`write_nifti_like` can write a label volume back in the source's own voxel order.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    io_orientation,
    ornt_transform,
)

from medseg.errors import DataError
from medseg.io.base import MAX_SAMPLES, NIFTI_SUFFIXES, Image, ImageMeta, image_suffix

logger = logging.getLogger(__name__)

#: Largest 4th dimension of a NIfTI image that is read as channels.
MAX_NIFTI_CHANNELS = 4

# RAS <-> LPS: negate x and y.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_nifti_image(path: Path, replace_non_finite: float | None = None) -> Image:
    """Read a ``.nii``/``.nii.gz`` file as a DxHxWxC float32 volume (see the module docstring).

    A 4th dimension of N > 1 volumes becomes N channels and is said so in ``meta.extra``:
    ``volumes`` (N), ``volume_axis``, ``source_shape`` (the file's shape) and, when the header
    tells, ``volumes_are`` (:func:`volumes_description`). Whether a model may take them as its
    channels is :func:`medseg.io.base.check_channels`'s decision, never the reader's: photometric
    is None, so they are never taken for RGB.

    Args:
        path: An existing, non-empty file.
        replace_non_finite: Value that NaN and +-Inf voxels are replaced with; ``None`` (the
            default) raises instead.

    Raises:
        DataError: If the file is not a readable NIfTI image, is empty, has a NaN/Inf or
            singular affine, has more than 4 dimensions or a 4th dimension larger than
            :data:`MAX_NIFTI_CHANNELS`, or has NaN/Inf voxels and ``replace_non_finite`` is None.
    """
    img = _load(path)
    try:
        canonical = nib.as_closest_canonical(img)
        data = canonical.get_fdata(dtype=np.float32)
    except Exception as e:
        raise DataError(f"{path}: NIfTI data is truncated or corrupt ({_first_line(e)})") from e
    if data.ndim == 3:
        data = data[..., np.newaxis]
    bad = ~np.isfinite(data)
    extra: dict[str, Any] = {}
    if bad.any():
        count = int(bad.sum())
        if replace_non_finite is None:
            raise DataError(
                f"{path}: {count} voxel(s) are NaN or infinite; clean the file (e.g. set them "
                f"to 0 and save it again), or, from Python, pass replace_non_finite=<value> to "
                f"medseg.io.read_image"
            )
        data[bad] = replace_non_finite
        extra["non_finite_replaced"] = count
    array = np.ascontiguousarray(_canonical_to_array(data), dtype=np.float32)
    channels = array.shape[-1]
    extra.update(_original_extra(img))
    if channels > 1:
        extra["channels_from"] = "4th NIfTI dimension"
        extra.update(volumes=channels, volume_axis="4th dimension")
        extra["source_shape"] = tuple(int(n) for n in img.shape)
        what = volumes_description(img)
        if what:
            extra["volumes_are"] = what
    meta = ImageMeta(
        source=(str(path),),
        spacing=_spacing(canonical),
        affine=_array_affine(canonical),
        modality=None,
        photometric="MONOCHROME2" if channels == 1 else None,
        bits=int(img.header["bitpix"]) if "bitpix" in img.header else None,
        extra=extra,
    )
    logger.debug("%s: NIfTI %s -> array shape %s", path, extra["nifti_axcodes"], array.shape)
    return Image(array=array, meta=meta)


def read_nifti_mask(path: Path) -> np.ndarray:
    """Values of a NIfTI mask (scl_slope/scl_inter applied), reoriented like images: DxHxW.

    Raises:
        DataError: If the file is not a readable 3D NIfTI image (a 4th dimension of size 1 is
            allowed).
    """
    img = _load(path, max_channels=1)
    try:
        canonical = nib.as_closest_canonical(img)
        values = np.asanyarray(canonical.dataobj)
    except Exception as e:
        raise DataError(f"{path}: NIfTI data is truncated or corrupt ({_first_line(e)})") from e
    if values.ndim == 4:
        values = values[..., 0]
    return np.ascontiguousarray(_canonical_to_array(values))


def write_nifti_like(
    path: str | Path, labels: np.ndarray, reference: ImageMeta, *, continuous: bool = False
) -> Path:
    """Write a DxHxW label volume so that it overlays ``reference``'s source in a viewer.

    * ``reference`` from a NIfTI file (:func:`medseg.io.read_image`): the labels are put back
      in the source's voxel order and written with its original affine and qform/sform
      codes, so the written array equals what the source's own array would be.
    * ``reference`` from a DICOM series: written in voxel order ``(col, row, slice)`` with the
      RAS affine equivalent to ``reference.affine``.

    The file is written atomically: to a hidden temporary file with the same suffix in the
    same folder, then renamed over ``path``.

    Args:
        path: Output file ending in ``.nii`` or ``.nii.gz`` (its folder is created).
        labels: Integer (or boolean) label volume, DxHxW in the array convention of
            :func:`medseg.io.read_image` and of the same shape as the reference image.
        reference: ``meta`` of the image the labels were computed on.
        continuous: write a float32 map (probabilities, uncertainty) instead of integer labels.

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: If ``path`` is not a NIfTI name, ``labels`` is not an integer DxHxW array
            of the reference's shape, or ``reference`` has no geometry to write with.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if suffix not in NIFTI_SUFFIXES:
        raise ValueError(f"{path}: output must end in .nii or .nii.gz")
    labels = np.asarray(labels, np.float32) if continuous else _as_labels(labels)
    extra = reference.extra
    qform_code = sform_code = 1  # scanner-based coordinates
    if "nifti_original_affine" in extra:
        original_affine = np.asarray(extra["nifti_original_affine"], dtype=np.float64)
        original_shape = tuple(int(n) for n in extra["nifti_original_shape"][:3])
        original_ornt = io_orientation(original_affine)
        canonical_shape = [0, 0, 0]
        for axis, (target, _) in enumerate(original_ornt):
            canonical_shape[int(target)] = original_shape[axis]
        expected = tuple(canonical_shape[::-1])
        if labels.shape != expected:
            raise ValueError(
                f"labels of shape {labels.shape} do not fit the reference volume "
                f"{reference.source[0] if reference.source else ''} of shape {expected}"
            )
        to_original = ornt_transform(axcodes2ornt(("R", "A", "S")), original_ornt)
        data = apply_orientation(_array_to_canonical(labels), to_original)
        affine = original_affine
        original_q = int(extra.get("nifti_qform_code", 0))
        original_s = int(extra.get("nifti_sform_code", 0))
        qform_code, sform_code = original_q or original_s or 1, original_s or original_q or 1
    elif reference.affine is not None:
        data = labels.transpose(2, 1, 0)
        index = np.zeros((4, 4))
        index[0, 2] = index[1, 1] = index[2, 0] = index[3, 3] = 1.0  # (c, r, s) -> (s, r, c)
        affine = _RAS_TO_LPS @ np.asarray(reference.affine, dtype=np.float64) @ index
    else:
        raise ValueError("reference has no affine; cannot place the labels in space")

    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.set_data_dtype(np.float32 if continuous else _label_dtype(labels))
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        nib.save(image, tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.debug("%s: wrote labels of shape %s", path, labels.shape)
    return path


# --------------------------------------------------------------------------- helpers


def _load(path: Path, max_channels: int = MAX_NIFTI_CHANNELS) -> nib.Nifti1Image:
    """Load the header (data stays on disk) and check the number of dimensions."""
    try:
        img = nib.load(str(path))
    except Exception as e:
        raise DataError(
            f"{path}: not a readable NIfTI file; truncated or corrupt ({_first_line(e)})"
        ) from e
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise DataError(f"{path}: not a NIfTI-1/NIfTI-2 image ({type(img).__name__})")
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) not in (3, 4):
        raise DataError(
            f"{path}: {len(shape)}D NIfTI of shape {tuple(int(n) for n in img.shape)}; medseg "
            f"reads 3D volumes (or 4D ones whose 4th dimension holds a model's channels)"
        )
    if len(shape) == 4 and shape[3] > max_channels:
        allowed = "of size 1" if max_channels == 1 else f"of at most {max_channels} channels"
        what = volumes_description(img)
        raise DataError(
            f"{path}: 4D NIfTI with {shape[3]} volumes; expected 3D (or a 4th dimension "
            f"{allowed}): shape {shape}, {shape[3]} volumes along the 4th dimension"
            f"{' (' + what + ')' if what else ''}"
        )
    if 0 in shape:
        raise DataError(f"{path}: NIfTI image is empty (shape {tuple(img.shape)})")
    _check_size(path, img)
    _check_affine(path, img)
    if shape != tuple(img.shape):
        try:
            img = img.__class__(np.asanyarray(img.dataobj).reshape(shape), img.affine, img.header)
        except Exception as e:
            raise DataError(f"{path}: NIfTI data is truncated or corrupt ({_first_line(e)})") from e
    return img


def volumes_description(img: nib.Nifti1Image | nib.Nifti2Image) -> str:
    """What the header says the volumes along the 4th dimension are, or ``""`` when it does not.

    An intent (``"intent vector"``), or time points with their step when the time unit is set
    (``"time points 2 s apart"``: fMRI, DCE phases); b-values and echoes are not in a NIfTI header.
    """
    header = img.header
    try:
        intent = str(header.get_intent()[0])
        time_unit = str(header.get_xyzt_units()[1])
        zooms = header.get_zooms()
        step = float(zooms[3]) if len(zooms) > 3 else 0.0
    except Exception:  # a header field nibabel cannot interpret: say nothing
        return ""
    if intent not in ("none", ""):
        return f"intent {intent}"
    units = {"sec": "s", "msec": "ms", "usec": "us"}
    if time_unit in units and np.isfinite(step) and step > 0:
        return f"time points {step:g} {units[time_unit]} apart"
    if time_unit in ("hz", "ppm", "rads"):
        return f"spectral points ({time_unit})"
    return ""


def _check_size(path: Path, img: nib.Nifti1Image) -> None:
    """Refuse, before reading the data, a header that declares more than the file can hold."""
    count = int(np.prod([int(n) for n in img.shape], dtype=object))
    if count > MAX_SAMPLES:
        raise DataError(
            f"{path}: NIfTI header declares {count} voxels (shape {tuple(img.shape)}), more than "
            f"medseg reads ({MAX_SAMPLES}); the header is corrupt or the image too large"
        )
    if image_suffix(path) == ".nii":
        try:
            need = int(img.header.get_data_offset()) + count * img.header.get_data_dtype().itemsize
        except Exception as e:  # a corrupt data type or offset
            raise DataError(f"{path}: NIfTI header is corrupt ({_first_line(e)})") from e
        size = path.stat().st_size
        if size < need:
            raise DataError(
                f"{path}: NIfTI data is truncated or corrupt (the header declares {need} bytes, "
                f"the file has {size})"
            )


def _check_affine(path: Path, img: nib.Nifti1Image) -> None:
    """The voxel-to-world matrix must be finite and invertible to place and reorient the data."""
    try:
        linear = np.asarray(img.affine, dtype=np.float64)[:3, :3]
    except Exception as e:
        raise DataError(f"{path}: NIfTI header has no usable affine ({_first_line(e)})") from e
    if not np.all(np.isfinite(linear)):
        raise DataError(f"{path}: NIfTI affine holds NaN or infinite values; the header is corrupt")
    singular = np.linalg.svd(linear, compute_uv=False)
    if singular.max() == 0 or singular.min() <= 1e-9 * singular.max():
        raise DataError(
            f"{path}: NIfTI affine is singular (voxel axes collapse); the header is corrupt"
        )


def _canonical_to_array(data: np.ndarray) -> np.ndarray:
    """(i, j, k[, c]) in RAS+ order -> (slice, row, col[, c]), rows and columns flipped."""
    axes = (2, 1, 0, 3) if data.ndim == 4 else (2, 1, 0)
    return np.transpose(data, axes)[:, ::-1, ::-1]


def _array_to_canonical(array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_canonical_to_array` for a DxHxW array."""
    return np.transpose(array[:, ::-1, ::-1], (2, 1, 0))


def _array_affine(canonical: nib.Nifti1Image) -> np.ndarray:
    """4x4 matrix from (slice, row, col, 1) to LPS mm."""
    size_i, size_j = canonical.shape[0], canonical.shape[1]
    index = np.zeros((4, 4))
    index[0, 2], index[0, 3] = -1.0, size_i - 1  # i = I - 1 - col
    index[1, 1], index[1, 3] = -1.0, size_j - 1  # j = J - 1 - row
    index[2, 0] = 1.0  # k = slice
    index[3, 3] = 1.0
    return _RAS_TO_LPS @ canonical.affine @ index


def _spacing(canonical: nib.Nifti1Image) -> tuple[float, float, float]:
    zooms = canonical.header.get_zooms()
    return (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def _original_extra(img: nib.Nifti1Image) -> dict[str, Any]:
    header = img.header
    return {
        "format": "nifti",
        "nifti_axcodes": "".join(str(c) for c in nib.aff2axcodes(img.affine)),
        "nifti_original_affine": np.array(img.affine, dtype=np.float64),
        "nifti_original_shape": tuple(int(n) for n in img.shape),
        "nifti_qform_code": int(header["qform_code"]),
        "nifti_sform_code": int(header["sform_code"]),
        "nifti_dtype": str(header.get_data_dtype()),
    }


def _as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a DxHxW volume, got shape {labels.shape}")
    if labels.dtype == np.bool_:
        return labels.astype(np.uint8)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError("labels must be integers")
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    return labels


def _label_dtype(labels: np.ndarray) -> type[np.integer]:
    low = int(labels.min()) if labels.size else 0
    high = int(labels.max()) if labels.size else 0
    if low >= 0 and high <= 255:
        return np.uint8
    if low >= -32768 and high <= 32767:
        return np.int16
    return np.int32


def _first_line(error: Exception) -> str:
    text = str(error).split("\n")[0].strip()
    return text or type(error).__name__
