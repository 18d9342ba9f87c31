"""Write the bad-input corpus that ``tests/test_bad_inputs.py`` feeds to medseg.

Small text cases (YAML configs) are committed next to this file in ``configs/``; everything binary
is written here, deterministically (fixed seeds, fixed UIDs, no timestamps in the bytes that
matter), from scratch or from pydicom's bundled test files (globbed on disk in the installed
package, never fetched). Nothing outside the repository and the installed packages is read.

Usage::

    python tests/data/bad/make_corpus.py OUT          # files, series and datasets (no TensorFlow)
    python tests/data/bad/make_corpus.py OUT --models # also the model cases (imports TensorFlow)

Layout of ``OUT`` (``tests/test_bad_inputs.py`` lists what each case must give)::

    files/      single image files for read_image / read_mask / predict
    links/      a looping and a dangling symbolic link and a folder link back up (walked as a
                folder by predict)
    inputs_unreadable/  a predict input folder whose sub-folder may not be listed
    series/     DICOM series folders (missing slice, duplicated position, two series, sizes)
    datasets/   dataset folders for the scanners and the data pipeline (one problem each, plus
                ``pairs_good`` and ``pairs_bad``/``nifti_bad`` where every sample is bad)
    configs/    the committed YAML cases plus a non-UTF-8 one, a deeply nested and a long one
    names/      valid images named as no file should be: bytes that are not UTF-8, formulas
    out_inputs/ a predict input folder (``--out`` must not be it or lie inside it)
    models/     (``--models``) run folders and SavedModels that must be refused
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

HERE = Path(__file__).resolve().parent
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
SEED = 20240508
SIZE = 32  # plain images and masks are SIZE x SIZE


def _uid(name: str) -> str:
    """A UID that depends only on ``name`` (deterministic corpus)."""
    return generate_uid(entropy_srcs=["medseg-bad-corpus", name])


# ------------------------------------------------------------------------------------- DICOM


def _pydicom_file(name: str) -> Path:
    path = PYDICOM_FILES / name
    if not path.is_file():
        raise FileNotFoundError(f"pydicom test file {name} is not installed at {PYDICOM_FILES}")
    return path


def _dicom_variant(dst: Path, edit=None, source: str = "CT_small.dcm") -> Path:
    """A copy of a pydicom test file with its own series/instance UIDs and ``edit`` applied."""
    ds = pydicom.dcmread(_pydicom_file(source))
    ds.SeriesInstanceUID = _uid(f"{dst.name}/series")
    ds.SOPInstanceUID = _uid(f"{dst.name}/instance")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if edit is not None:
        edit(ds)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _no_pixels(ds: pydicom.Dataset) -> None:
    del ds.PixelData


def _mpeg2(ds: pydicom.Dataset) -> None:
    # A real transfer syntax that no pydicom decoder handles (video).
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.PixelData = encapsulate([ds.PixelData])


def _unknown_syntax(path: Path) -> None:
    """Replace the (explicit VR little endian) transfer syntax UID by one that is no syntax."""
    raw = path.read_bytes()
    old, new = b"1.2.840.10008.1.2.1\0", b"1.2.840.99999.1.2.1\0"
    assert raw[:400].count(old) == 1
    path.write_bytes(raw.replace(old, new, 1))


def _zero_rows(ds: pydicom.Dataset) -> None:
    ds.Rows = 0


def _short_pixels(ds: pydicom.Dataset) -> None:
    ds.Rows = 4096  # the pixel data holds 128 rows


def _palette_without_lut(ds: pydicom.Dataset) -> None:
    ds.PhotometricInterpretation = "PALETTE COLOR"


def _tiny(ds: pydicom.Dataset) -> None:
    ds.Rows = ds.Columns = 3
    ds.PixelData = np.arange(9, dtype=np.int16).tobytes()


def _series(
    folder: Path,
    positions: list[float],
    *,
    name: str,
    number: int = 1,
    description: str = "T1",
    size: tuple[int, int] = (8, 8),
    prefix: str = "IM",
    sizes: dict[int, tuple[int, int]] | None = None,
) -> list[Path]:
    """Single-frame MR slices at ``positions`` (mm along z), one series UID per ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(_pydicom_file("MR_small.dcm"))
    rng = np.random.default_rng(SEED)
    paths = []
    for k, z in enumerate(positions):
        rows, cols = (sizes or {}).get(k, size)
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = _uid(f"{name}/series")
        ds.SOPInstanceUID = _uid(f"{name}/{k}")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = number
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 1.0
        ds.Rows, ds.Columns = rows, cols
        ds.PixelData = rng.integers(0, 500, (rows, cols)).astype(np.int16).tobytes()
        path = folder / f"{prefix}{k:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def enhanced_multiframe(path: Path, times: int, slices: int) -> Path:
    """A multi-frame MR object: ``times`` time points of ``slices`` 8x8 slices each."""
    ds = pydicom.dcmread(_pydicom_file("MR_small.dcm"))
    ds.SeriesInstanceUID = _uid(f"{path.name}/series")
    ds.SOPInstanceUID = _uid(f"{path.name}/instance")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.NumberOfFrames = times * slices
    ds.Rows = ds.Columns = 8
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword in ds:
            delattr(ds, keyword)
    shared, orient, measures = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    measures.PixelSpacing, measures.SliceThickness = [1.0, 1.0], 2.0
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for t in range(times):
        for z in range(slices):
            item, plane, content = Dataset(), Dataset(), Dataset()
            plane.ImagePositionPatient = [0.0, 0.0, 2.0 * z]
            content.TemporalPositionIndex = t + 1
            item.PlanePositionSequence = Sequence([plane])
            item.FrameContentSequence = Sequence([content])
            frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    pixels = [np.full((8, 8), 100 * (i // slices) + i % slices) for i in range(times * slices)]
    ds.PixelData = np.stack(pixels).astype(np.int16).tobytes()
    ds.save_as(path)
    return path


# ------------------------------------------------------------------------------------- images


def _png_bytes(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (the image data is a few zero bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _jpeg(seed: int, size: int = 64) -> bytes:
    """A q90 JPEG of a smooth pattern with noise (as in tests/data/test_audit_decode.py)."""
    yy, xx = np.mgrid[:size, :size]
    base = (np.sin(xx / (5 + seed)) + np.cos(yy / 4)) * 60 + 128
    noise = np.random.default_rng(seed).normal(0, 20, base.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _garbled(data: bytes, garbage: bytes) -> bytes:
    """``data`` (a JPEG) with the middle of its entropy-coded data replaced by ``garbage``."""
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    mid = (start + len(data) - 2) // 2
    return data[:mid] + garbage + data[mid + len(garbage) :]


def _disc(shape: tuple[int, ...]) -> np.ndarray:
    """Zeros with a bright square in every slice and volume."""
    data = np.zeros(shape, np.float32)
    data[shape[0] // 4 : shape[0] // 2 + 4, shape[1] // 4 : shape[1] // 2 + 4] = 100.0
    return data


def _grey(seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(SEED + seed).integers(0, 256, (size, size)).astype(np.uint8)


def _labels(values: tuple[int, ...], size: int = SIZE, dtype=np.uint8) -> np.ndarray:
    """A label map with a square of each value after the first (background) one."""
    mask = np.full((size, size), values[0], dtype=dtype)
    for i, v in enumerate(values[1:]):
        mask[4 + 8 * i : 10 + 8 * i, 4:20] = v
    return mask


def _save(array: np.ndarray, path: Path, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    image.save(path)
    return path


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _nifti_with_raw_affine(path: Path, srow: np.ndarray) -> Path:
    """A valid .nii whose sform rows are replaced by ``srow`` (3x4) behind nibabel's back."""
    _nifti(path, np.ones((8, 8, 4), np.float32))
    raw = bytearray(path.read_bytes())
    raw[252:254] = struct.pack("<h", 0)  # qform_code: unknown
    raw[254:256] = struct.pack("<h", 1)  # sform_code: scanner
    raw[280:328] = np.asarray(srow, "<f4").tobytes()
    path.write_bytes(bytes(raw))
    return path


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


# ------------------------------------------------------------------------------------- corpus


def write_files(out: Path) -> None:
    """Bad (and a few valid edge-case) image files in ``out/files``; links in ``out/links``."""
    files = out / "files"
    files.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    # DICOM
    shutil.copy(_pydicom_file("MR_truncated.dcm"), files / "dicom_truncated.dcm")
    shutil.copy(_pydicom_file("rtplan.dcm"), files / "dicom_rtplan.dcm")
    ct = _pydicom_file("CT_small.dcm").read_bytes()
    (files / "dicom_cut_header.dcm").write_bytes(ct[:400])
    (files / "dicom_garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + rng.bytes(600))
    _dicom_variant(files / "dicom_no_pixels.dcm", _no_pixels)
    _dicom_variant(files / "dicom_unsupported_syntax.dcm", _mpeg2)
    _unknown_syntax(_dicom_variant(files / "dicom_unknown_syntax.dcm"))
    _dicom_variant(files / "dicom_zero_rows.dcm", _zero_rows)
    _dicom_variant(files / "dicom_short_pixels.dcm", _short_pixels)
    _dicom_variant(files / "dicom_palette_no_lut.dcm", _palette_without_lut)
    enhanced_multiframe(files / "enhanced_4d.dcm", times=3, slices=4)  # 3 time points
    _dicom_variant(files / "tiny.dcm", _tiny)  # valid, 3x3 pixels: predicted with a warning

    # plain images
    (files / "zero_byte.png").write_bytes(b"")
    (files / "text.png").write_text("this is a text file, not an image\n")
    _save(_grey(1), files / "valid.png")
    good = (files / "valid.png").read_bytes()
    (files / "png_truncated.png").write_bytes(good[: len(good) // 2])
    (files / "png_bomb.png").write_bytes(_png_bytes(100_000, 100_000))
    (files / "png_zero_width.png").write_bytes(_png_bytes(0, 16))
    (files / "notes.xyz").write_text("an unsupported file type\n")
    # valid edge cases: read, not refused
    _save((_grey(2).astype(np.uint16) * 257), files / "grey16.png")
    rgba = np.dstack([_grey(3), _grey(4), _grey(5), np.full((SIZE, SIZE), 128, np.uint8)])
    _save(rgba, files / "rgba.png")

    # NIfTI
    vol = np.random.default_rng(SEED).normal(100, 10, (8, 8, 4)).astype(np.float32)
    nan = vol.copy()
    nan[2, 3, 1] = np.nan
    _nifti(files / "nifti_nan.nii.gz", nan)
    _nifti(files / "nifti_4d.nii.gz", np.stack([vol] * 10, axis=-1))
    _nifti(files / "nifti_5d.nii.gz", np.zeros((8, 8, 4, 2, 3), np.float32))
    _nifti(files / "nifti_4d_3vol.nii.gz", _disc((64, 64, 8, 3)))  # DWI/DCE: not RGB
    _nifti(files / "nifti_4d_2vol.nii", _disc((32, 32, 4, 2)))
    _nifti(files / "nifti_empty.nii", np.zeros((8, 0, 4), np.float32))
    _nifti(out / "tmp_valid.nii", vol)
    nii = (out / "tmp_valid.nii").read_bytes()
    (out / "tmp_valid.nii").unlink()
    (files / "nifti_named.png").write_bytes(nii)
    (files / "nifti_not_gzipped.nii.gz").write_bytes(nii)
    (files / "nifti_truncated.nii.gz").write_bytes(_gzip(nii)[: len(_gzip(nii)) // 2])
    (files / "nifti_cut_data.nii").write_bytes(nii[:400])
    (files / "nifti_garbage.nii").write_bytes(rng.bytes(400))
    _nifti_with_raw_affine(files / "nifti_singular_affine.nii", np.zeros((3, 4)))
    nan_affine = np.hstack([np.eye(3), np.zeros((3, 1))])
    nan_affine[0, 0] = np.nan
    _nifti_with_raw_affine(files / "nifti_nan_affine.nii", nan_affine)

    # masks (read_mask)
    colour = np.dstack([_labels((0, 1)), _labels((0, 2)), _labels((0, 1)), _labels((255, 255))])
    _save(colour, files / "mask_rgba_colour.png")
    _save(_labels((0, 1)).astype(np.float32) * 0.5, files / "mask_float.tif", "F")
    _save(_labels((0, 1), dtype=np.int32) - 1, files / "mask_negative.tif", "I")

    # not readable by this user (root reads it anyway: the tests emulate the denial then)
    shutil.copy(files / "valid.png", files / "unreadable.png")
    (files / "unreadable.png").chmod(0)

    # a predict input folder with an unreadable sub-folder
    inputs = out / "inputs_unreadable"
    _save(_grey(6), inputs / "a.png")
    _save(_grey(7), inputs / "sub" / "b.png")
    (inputs / "sub").chmod(0)

    # symbolic links: a loop and a dangling link (in a folder of their own)
    links = out / "links"
    links.mkdir(parents=True, exist_ok=True)
    os.symlink("symlink_loop.png", links / "symlink_loop.png")
    os.symlink("missing_target.png", links / "dangling_link.png")
    os.symlink("..", links / "folder_loop")  # a folder link back up: must not be followed


def write_series(out: Path) -> None:
    """DICOM series folders that must be refused as one volume."""
    series = out / "series"
    _series(series / "missing_slice", [0, 1, 2, 3, 4], name="gap")
    (series / "missing_slice" / "IM0002.dcm").unlink()
    _series(series / "duplicate_position", [0, 1, 2, 2, 3], name="dup")
    _series(series / "mixed", [0, 1, 2], name="mixed-a", number=1, description="T1")
    _series(series / "mixed", [0, 1, 2], name="mixed-b", number=2, description="FLAIR", prefix="B")
    _series(series / "sizes_differ", [0, 1, 2], name="sizes", sizes={1: (6, 8)})
    # 3 b-values x 3 slices: every position 3 times, told apart by DiffusionBValue (a 4D volume)
    for k, path in enumerate(_series(series / "dwi_bvalues", [0, 1, 2] * 3, name="dwi")):
        ds = pydicom.dcmread(path)
        ds.DiffusionBValue = [0.0, 500.0, 1000.0][k // 3]
        ds.save_as(path)


def _pair(root: Path, stem: str, image: np.ndarray, mask: np.ndarray | None, suffix=".png"):
    _save(image, root / "images" / f"{stem}.png")
    if mask is not None:
        _save(mask, root / "masks" / f"{stem}{suffix}")


def write_datasets(out: Path) -> None:
    """Dataset folders: one problem per scanner case; all-bad sets for the data pipeline."""
    ds = out / "datasets"

    # a good pairs set (labels 0..2): the tiny runs of the model cases are made from it
    good = ds / "pairs_good"
    for i in range(4):
        _pair(good, f"ok_{i}", _grey(10 + i), _labels((0, 1, 2)))

    # scanner problems, one per folder
    bad = ds / "pairs_missing_mask"
    _pair(bad, "a", _grey(20), _labels((0, 1)))
    _pair(bad, "b_no_mask", _grey(21), None)

    lgg = ds / "lgg_missing_mask" / "patient_1"
    _save(_grey(22), lgg / "slice_1.tif")
    _save(_labels((0, 255)), lgg / "slice_1_mask.tif")
    _save(_grey(23), lgg / "slice_2.tif")

    for split in ("Training", "Testing"):
        for name in ("glioma", "meningioma"):
            folder = ds / "class_empty" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            if not (split == "Training" and name == "meningioma"):
                _save(_grey(24), folder / "img_1.png")
    _save(_grey(25), ds / "class_single" / "glioma" / "img_1.png")
    _save(_grey(26), ds / "class_single" / "glioma" / "img_2.png")

    nifti = ds / "nifti_shape_mismatch"
    _nifti(nifti / "images" / "case_1.nii.gz", np.ones((8, 8, 4), np.float32))
    _nifti(nifti / "labels" / "case_1.nii.gz", np.zeros((8, 8, 5), np.uint8))

    study = ds / "dicom_mixed" / "patient_1" / "study_1"
    _series(study / "T1post", [0, 1, 2], name="dm-img", number=1, description="T1post")
    _series(study / "T1post", [0, 1, 2], name="dm-other", number=3, description="T2", prefix="X")
    _series(study / "MaskTumor", [0, 1, 2], name="dm-mask", number=2, description="MaskTumor")

    unreadable = ds / "pairs_unreadable_folder"
    _pair(unreadable, "a", _grey(27), _labels((0, 1)))
    (unreadable / "masks").chmod(0)

    # a JPEG whose compressed data is garbled (Pillow decodes it) and a 3x3 DICOM, for audit
    jpegs = ds / "jpeg_garbled"
    for c, name in enumerate("ab"):
        (jpegs / name).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            (jpegs / name / f"img{i}.jpg").write_bytes(_jpeg(10 * c + i))
    (jpegs / "a" / "garbled.jpg").write_bytes(_garbled(_jpeg(7), b"\xff\xd3" + bytes(30)))
    _dicom_variant(jpegs / "b" / "tiny.dcm", _tiny)

    # every sample bad, in the pairs layout (the data pipeline must name each one)
    pb = ds / "pairs_bad"
    _pair(pb, "mask_size", _grey(30), _labels((0, 1), size=16))
    _pair(pb, "mask_labels", _grey(31), _labels((0, 1, 7)))
    _pair(pb, "mask_16bit", _grey(32), _labels((0, 1000), dtype=np.uint16))
    _pair(pb, "mask_rgba", _grey(33), None)
    shutil.copy(out / "files" / "mask_rgba_colour.png", pb / "masks" / "mask_rgba.png")
    _pair(pb, "mask_float", _grey(34), None)
    shutil.copy(out / "files" / "mask_float.tif", pb / "masks" / "mask_float.tif")
    _pair(pb, "mask_negative", _grey(36), None)
    shutil.copy(out / "files" / "mask_negative.tif", pb / "masks" / "mask_negative.tif")
    _pair(pb, "image_text", _grey(35), _labels((0, 1)))
    (pb / "images" / "image_text.png").write_text("not an image\n")
    (pb / "masks" / "image_loop.png").parent.mkdir(parents=True, exist_ok=True)
    _save(_labels((0, 1)), pb / "masks" / "image_loop.png")
    os.symlink("image_loop.png", pb / "images" / "image_loop.png")
    os.symlink("..", pb / "images" / "folder_loop")

    # every sample bad, in the NIfTI layout
    nb = ds / "nifti_bad"
    vol = np.random.default_rng(SEED).normal(100, 10, (8, 8, 4)).astype(np.float32)
    nan = vol.copy()
    nan[1, 1, 1] = np.nan
    _nifti(nb / "images" / "nan_image.nii.gz", nan)
    _nifti(nb / "labels" / "nan_image.nii.gz", np.zeros((8, 8, 4), np.uint8))
    _nifti(nb / "images" / "label_4d.nii.gz", vol)
    _nifti(nb / "labels" / "label_4d.nii.gz", np.zeros((8, 8, 4, 3), np.uint8))


def write_configs(out: Path) -> None:
    """The committed YAML cases, plus a non-UTF-8, a deeply nested and a 20,000-item one."""
    configs = out / "configs"
    shutil.copytree(HERE / "configs", configs, dirs_exist_ok=True)
    (configs / "not_utf8.yaml").write_bytes(b"train:\n  epochs: 3\n  optimizer: \xff\xfe adam\n")
    (configs / "deep.yaml").write_text("data:\n  window: " + "[" * 3000 + "]" * 3000 + "\n")
    items = ", ".join(["64"] * 20_000)
    (configs / "long_list.yaml").write_text(f"data:\n  image_size: [{items}]\n")


#: Valid image names that no file should have: bytes that are not UTF-8 (cannot be committed to
#: git) and names a spreadsheet would run as formulas.
WILD_NAMES = (b"scan_\xff\xfe.png", b"=cmd|' -C calc'!A0.png", b'=HYPERLINK("x").png')


def write_names(out: Path) -> None:
    """Valid images with wild names in ``out/names``; an input folder in ``out/out_inputs``."""
    names = out / "names"
    names.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(WILD_NAMES):
        with open(os.fsencode(names) + b"/" + name, "wb") as f:
            Image.fromarray(_grey(40 + i)).save(f, format="PNG")
    _save(_grey(43), out / "out_inputs" / "a.png")


def write_models(out: Path) -> None:
    """Run folders and SavedModels that evaluate/predict must refuse (imports TensorFlow).

    ``models/run_good`` is a real, untrained medseg run (U-Net, 3 labels, 32x32) on
    ``datasets/pairs_good`` with ``data.strict`` off; ``run_nifti`` is the same model with the
    ``nifti`` layout. The others break one thing each.
    """
    import keras
    import tensorflow as tf
    import yaml

    from medseg.config import config_from_dict
    from medseg.data.scan import scan_dataset
    from medseg.data.split import make_split, write_manifest
    from medseg.models.registry import build_model

    models = out / "models"
    raw = {
        "data": {
            "task": "segmentation",
            "layout": "pairs",
            "root": str(out / "datasets" / "pairs_good"),
            "image_size": [SIZE, SIZE],
            "channels": 1,
            "val_fraction": 0.5,
        },
        "model": {"name": "unet", "num_classes": 3, "base_filters": 2, "depth": 1},
        "train": {"epochs": 1, "warmup_epochs": 0},
    }
    cfg = config_from_dict(raw)
    keras.utils.set_random_seed(0)
    model = build_model(cfg, 3)

    def make_run(name: str, data: dict | None = None) -> Path:
        run = models / name
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        body = {**raw, "data": {**raw["data"], **(data or {})}}
        (run / "config.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
        scan = scan_dataset(raw["data"]["root"], "pairs")
        write_manifest(run / "splits.json", make_split(scan.samples, 0.5, seed=0))
        model.save(run / "checkpoints" / "best.keras")
        return run

    make_run("run_good")
    make_run("run_nifti", {"layout": "nifti", "root": str(out / "datasets" / "nifti_bad")})
    make_run("run_strict", {"strict": True})

    best = (models / "run_good" / "checkpoints" / "best.keras").read_bytes()
    run = make_run("run_checkpoint_truncated")
    (run / "checkpoints" / "best.keras").write_bytes(best[: len(best) // 2])
    run = make_run("run_checkpoint_garbage")
    (run / "checkpoints" / "best.keras").write_bytes(np.random.default_rng(SEED).bytes(4096))
    run = make_run("run_checkpoint_missing")
    (run / "checkpoints" / "best.keras").unlink()
    run = make_run("run_config_garbage")
    (run / "config.yaml").write_text("data: [unclosed\n  - : :\n")
    run = make_run("run_config_list")
    (run / "config.yaml").write_text("- data\n- model\n")
    run = make_run("run_splits_garbage")
    (run / "splits.json").write_text('{"version": 1, "splits": ')

    # a classifier where a segmentation run expects a U-Net (a model of another task)
    run = make_run("run_classifier")
    inputs = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Conv2D(2, 3, padding="same")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    keras.Model(inputs, outputs).save(run / "checkpoints" / "best.keras")

    # a SavedModel that medseg did not write, bare and dressed up as a medseg export
    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
        def __call__(self, x):
            return {"y": 2.0 * x}

    foreign = models / "foreign_savedmodel"
    tf.saved_model.save(Doubler(), str(foreign))
    card = {"task": "segmentation", "classes": [], "input": {"channels": 1}, "num_outputs": 3}
    export = models / "export_foreign_savedmodel"
    shutil.copytree(foreign, export / "saved_model")
    (export / "medseg.json").write_text(json.dumps(card))
    export = models / "export_card_garbage"
    shutil.copytree(foreign, export / "saved_model")
    (export / "medseg.json").write_text("{ this is not json")


def build(out: str | Path, models: bool = False) -> Path:
    """Write the whole corpus into ``out`` (created; must not hold an earlier corpus)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_files(out)
    write_series(out)
    write_datasets(out)
    write_configs(out)
    write_names(out)
    if models:
        write_models(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(build(sys.argv[1], models="--models" in sys.argv[2:]))
