"""Tests for medseg.io: image/mask readers, channel conversion and file listing."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import get_decoder

from medseg.errors import DataError
from medseg.io import (
    IMAGE_SUFFIXES,
    Image,
    ImageMeta,
    is_dicom,
    list_image_files,
    read_image,
    read_mask,
    to_channels,
)

# pydicom ships its test files; never use pydicom.data.get_testdata_files() (network).
PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def dicom_test_file(name: str) -> Path:
    """Path of one of pydicom's bundled test files; skips the test when it is absent."""
    path = PYDICOM_TEST_FILES / name
    if not path.is_file():
        pytest.skip(f"pydicom test file {name} is not installed")
    return path


def save(array: np.ndarray, path: Path, mode: str | None = None) -> Path:
    image = PILImage.fromarray(array) if mode is None else PILImage.fromarray(array, mode=mode)
    image.save(path)
    return path


def assert_data_error(path: Path, match: str) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert path.name in message
    return info.value


# --------------------------------------------------------------------------- plain images


@pytest.fixture
def grey8() -> np.ndarray:
    return np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp", ".PNG"])
def test_grey_8bit_keeps_stored_values(tmp_path: Path, grey8: np.ndarray, suffix: str) -> None:
    image = read_image(save(grey8, tmp_path / f"grey{suffix}"))
    assert image.array.shape == (12, 10, 1)
    assert image.array.dtype == np.float32
    np.testing.assert_array_equal(image.array[..., 0], grey8.astype(np.float32))
    assert image.array.max() == 119.0  # not scaled to 0..1
    assert image.meta.bits == 8
    assert image.meta.photometric == "MONOCHROME2"
    assert image.meta.spacing is None and image.meta.affine is None
    assert image.meta.modality is None
    assert image.meta.source == (str(tmp_path / f"grey{suffix}"),)
    assert not image.is_volume


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_grey_16bit_is_not_scaled(tmp_path: Path, suffix: str) -> None:
    values = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000).astype(np.uint16)
    image = read_image(save(values, tmp_path / f"g16{suffix}"))
    assert image.array.shape == (4, 5, 1)
    assert image.array.dtype == np.float32
    np.testing.assert_array_equal(image.array[..., 0], values.astype(np.float32))
    assert image.array.max() == 57000.0
    assert image.meta.bits == 16


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_rgb(tmp_path: Path, suffix: str) -> None:
    rgb = np.zeros((6, 7, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 7
    rgb[0, 0] = (1, 2, 3)
    image = read_image(save(rgb, tmp_path / f"rgb{suffix}"))
    assert image.array.shape == (6, 7, 3)
    np.testing.assert_array_equal(image.array, rgb.astype(np.float32))
    assert image.meta.photometric == "RGB"
    assert image.meta.bits == 8


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((5, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[..., 3] = 128
    image = read_image(save(rgba, tmp_path / "rgba.png"))
    assert image.array.shape == (5, 4, 3)
    np.testing.assert_array_equal(image.array[0, 0], [10, 20, 30])
    assert image.meta.extra["alpha_dropped"] is True


def test_la_drops_alpha(tmp_path: Path) -> None:
    la = np.zeros((5, 4, 2), dtype=np.uint8)
    la[..., 0], la[..., 1] = 77, 255
    image = read_image(save(la, tmp_path / "la.png", mode="LA"))
    assert image.array.shape == (5, 4, 1)
    assert np.all(image.array == 77)
    assert image.meta.extra["alpha_dropped"] is True


def test_palette_becomes_rgb(tmp_path: Path) -> None:
    palette_image = PILImage.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    palette_image.putpalette([0, 0, 0, 250, 120, 5] + [0] * 762)
    palette_image.save(tmp_path / "pal.png")
    image = read_image(tmp_path / "pal.png")
    assert image.array.shape == (2, 2, 3)
    np.testing.assert_array_equal(image.array[0, 1], [250, 120, 5])
    np.testing.assert_array_equal(image.array[0, 0], [0, 0, 0])


def test_one_bit_gives_zero_one(tmp_path: Path) -> None:
    bits = PILImage.new("1", (4, 3))
    bits.putpixel((1, 2), 1)
    bits.save(tmp_path / "bits.png")
    image = read_image(tmp_path / "bits.png")
    assert image.array.shape == (3, 4, 1)
    assert image.array.sum() == 1.0 and image.array[2, 1, 0] == 1.0
    assert image.meta.bits == 1


def test_jpeg_grey_and_rgb(tmp_path: Path) -> None:
    flat = np.full((16, 16), 128, dtype=np.uint8)
    grey = read_image(save(flat, tmp_path / "g.jpg"))
    assert grey.array.shape == (16, 16, 1)
    assert abs(float(grey.array.mean()) - 128.0) < 2.0
    colour = read_image(save(np.dstack([flat, flat, flat]), tmp_path / "c.jpeg"))
    assert colour.array.shape == (16, 16, 3)


def test_multipage_tiff_is_volume(tmp_path: Path) -> None:
    pages = [PILImage.fromarray(np.full((3, 4), 10 * i, dtype=np.uint8)) for i in range(5)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    image = read_image(tmp_path / "stack.tif")
    assert image.is_volume
    assert image.array.shape == (5, 3, 4, 1)
    np.testing.assert_array_equal(image.array[:, 0, 0, 0], [0, 10, 20, 30, 40])
    assert image.meta.extra["n_pages"] == 5


def test_multipage_tiff_with_different_page_sizes_fails(tmp_path: Path) -> None:
    first = PILImage.fromarray(np.zeros((3, 4), dtype=np.uint8))
    second = PILImage.fromarray(np.zeros((5, 4), dtype=np.uint8))
    first.save(tmp_path / "ragged.tif", save_all=True, append_images=[second])
    assert_data_error(tmp_path / "ragged.tif", "differ")


# --------------------------------------------------------------------------- DICOM


def test_ct_small_hounsfield_units_and_geometry() -> None:
    path = dicom_test_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    image = read_image(path)
    assert image.array.shape == (128, 128, 1)
    assert image.array.dtype == np.float32
    np.testing.assert_array_equal(image.array[..., 0], ds.pixel_array.astype(np.float32) - 1024)
    assert image.array.min() < -500  # air is around -1000 HU
    assert image.array.min() >= -1100 and image.array.max() < 4000
    meta = image.meta
    assert meta.modality == "CT"
    assert meta.bits == 16
    assert meta.extra["rescale_applied"] is True
    assert meta.extra["rescale_intercept"] == -1024.0
    assert meta.spacing == pytest.approx((0.661468, 0.661468))
    assert meta.patient_id == str(ds.PatientID)
    assert meta.study_uid == str(ds.StudyInstanceUID)
    assert meta.series_uid == str(ds.SeriesInstanceUID)
    # Index (row 10, col 20) -> IPP + 20 * col spacing along x + 10 * row spacing along y.
    point = meta.affine @ np.array([10, 20, 0, 1.0])
    origin = np.array([float(v) for v in ds.ImagePositionPatient])
    expected = origin + np.array([20 * 0.661468, 10 * 0.661468, 0.0])
    np.testing.assert_allclose(point[:3], expected, atol=1e-4)


def test_mr_small_window_and_no_rescale() -> None:
    path = dicom_test_file("MR_small.dcm")
    image = read_image(path)
    assert image.array.shape == (64, 64, 1)
    np.testing.assert_array_equal(image.array[..., 0], pydicom.dcmread(path).pixel_array)
    assert image.meta.modality == "MR"
    assert image.meta.extra["window_center"] == 600.0
    assert image.meta.extra["window_width"] == 1600.0
    assert image.meta.extra["rescale_applied"] is False


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_test_file("MR_small.dcm"))
    original = read_image(dicom_test_file("MR_small.dcm")).array
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    image = read_image(tmp_path / "mono1.dcm")
    # Signed 16-bit stored values are reflected within -32768..32767: v -> -1 - v.
    np.testing.assert_array_equal(image.array, -1.0 - original)
    assert not np.array_equal(image.array, original)
    assert image.meta.extra["monochrome1_inverted"] is True
    assert image.meta.extra["dicom_photometric"] == "MONOCHROME1"
    assert image.meta.photometric == "MONOCHROME2"
    assert image.meta.extra["window_center"] == -601.0  # window follows the inversion


def test_monochrome1_with_rescale(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_test_file("CT_small.dcm"))
    hu = read_image(dicom_test_file("CT_small.dcm")).array
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "ct_mono1.dcm")
    inverted = read_image(tmp_path / "ct_mono1.dcm").array
    lo, hi = -32768 - 1024, 32767 - 1024
    np.testing.assert_array_equal(inverted, (lo + hi) - hu)


def test_multiframe_volume_spacing_and_affine() -> None:
    image = read_image(dicom_test_file("rtdose.dcm"))
    assert image.is_volume
    assert image.array.shape == (15, 10, 10, 1)
    assert image.meta.spacing == pytest.approx((5.0, 10.0, 10.0))
    np.testing.assert_allclose(image.meta.affine[:3, 0], [0.0, 0.0, 5.0])
    np.testing.assert_allclose(image.meta.affine[:3, 1], [0.0, 10.0, 0.0])
    np.testing.assert_allclose(image.meta.affine[:3, 2], [10.0, 0.0, 0.0])


def test_multiframe_colour() -> None:
    image = read_image(dicom_test_file("SC_rgb_rle_2frame.dcm"))
    assert image.array.shape == (2, 100, 100, 3)
    assert image.is_volume
    np.testing.assert_array_equal(image.array[0, 0, 0], [255, 0, 0])


def test_colour_dicom_rgb_and_ybr() -> None:
    rgb = read_image(dicom_test_file("SC_rgb_rle.dcm"))
    assert rgb.array.shape == (100, 100, 3)
    np.testing.assert_array_equal(rgb.array[0, 0], [255, 0, 0])
    assert rgb.meta.photometric == "RGB"
    ybr = read_image(dicom_test_file("SC_ybr_full_422_uncompressed.dcm"))
    assert ybr.meta.extra["dicom_photometric"] == "YBR_FULL_422"
    assert ybr.meta.photometric == "RGB"
    assert ybr.array.shape == (100, 100, 3)
    # Converted to RGB by pydicom: close to the RGB original (not raw Y, Cb, Cr).
    assert np.abs(ybr.array - rgb.array).max() <= 10


def test_palette_colour_dicom() -> None:
    image = read_image(dicom_test_file("examples_palette.dcm"))
    assert image.array.shape == (350, 800, 3)
    assert image.meta.bits == 16
    assert image.array.max() > 255


def test_dicom_found_by_preamble_without_suffix(tmp_path: Path) -> None:
    path = tmp_path / "IM0001"
    shutil.copy(dicom_test_file("CT_small.dcm"), path)
    assert is_dicom(path)
    image = read_image(path)
    assert image.meta.modality == "CT"
    assert image.array.min() < -500


def test_dcm_without_preamble_or_transfer_syntax(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_test_file("MR_small.dcm"))
    expected = ds.pixel_array.copy()
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    path = tmp_path / "old.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert not is_dicom(path)
    image = read_image(path)
    np.testing.assert_array_equal(image.array[..., 0], expected)


def test_is_dicom(tmp_path: Path, grey8: np.ndarray) -> None:
    assert is_dicom(dicom_test_file("MR_small.dcm"))
    assert not is_dicom(save(grey8, tmp_path / "a.png"))
    assert not is_dicom(tmp_path / "missing.dcm")
    assert not is_dicom(tmp_path)


def test_patient_id_never_logged_or_in_repr(caplog: pytest.LogCaptureFixture) -> None:
    path = dicom_test_file("CT_small.dcm")
    patient_id = str(pydicom.dcmread(path).PatientID)
    assert patient_id
    with caplog.at_level(logging.DEBUG, logger="medseg"):
        image = read_image(path)
    assert image.meta.patient_id == patient_id
    assert caplog.records  # the reader does log (at debug level)
    assert patient_id not in caplog.text
    assert patient_id not in repr(image.meta) and patient_id not in repr(image)


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    assert_data_error(tmp_path / "nope.png", "does not exist")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    assert_data_error(path, "empty")


@pytest.mark.parametrize("name", ["text.png", "text.jpg", "text.tif"])
def test_text_file_with_image_suffix(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("this is not an image\n" * 10)
    assert_data_error(path, "not a readable image")


def test_text_file_named_dcm(tmp_path: Path) -> None:
    path = tmp_path / "text.dcm"
    path.write_text("this is not a DICOM file\n" * 10)
    assert_data_error(path, "not a DICOM image")


def test_truncated_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    full = save(rng.integers(0, 255, (64, 64), dtype=np.uint8), tmp_path / "full.png")
    path = tmp_path / "cut.png"
    path.write_bytes(full.read_bytes()[:200])
    assert_data_error(path, "truncated or corrupt")


def test_truncated_dicom(tmp_path: Path) -> None:
    path = tmp_path / "MR_truncated.dcm"
    shutil.copy(dicom_test_file("MR_truncated.dcm"), path)
    assert_data_error(path, "truncated or corrupt")


def test_dicom_cut_in_header(tmp_path: Path) -> None:
    path = tmp_path / "cut.dcm"
    path.write_bytes(dicom_test_file("CT_small.dcm").read_bytes()[:300])
    assert_data_error(path, "DICOM")


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    path = tmp_path / "rtplan.dcm"
    shutil.copy(dicom_test_file("rtplan.dcm"), path)
    assert_data_error(path, "no pixel data")


def test_missing_decoder_names_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every decoder is installed here, so make pydicom see none (as on a machine without the
    # optional packages): no plugin available, the pylibjpeg and pyjpegls plugins missing.
    path = tmp_path / "jls.dcm"
    shutil.copy(dicom_test_file("MR_small_jpeg_ls_lossless.dcm"), path)
    ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    decoder = get_decoder(ts)
    missing = {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1"), "gdcm": ("gdcm>=3.0",)}
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", missing)
    error = assert_data_error(path, "no decoder")
    message = str(error)
    assert "'pip install pylibjpeg pylibjpeg-libjpeg'" in message
    assert "'pip install python-gdcm'" in message
    assert "JPEG-LS Lossless" in message


@pytest.mark.parametrize(
    "name",
    ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"],
)
def test_lossless_compressed_equals_uncompressed(name: str) -> None:
    reference = read_image(dicom_test_file("MR_small.dcm"))
    image = read_image(dicom_test_file(name))
    assert image.meta.extra["transfer_syntax"] != reference.meta.extra["transfer_syntax"]
    np.testing.assert_array_equal(image.array, reference.array)


@pytest.mark.parametrize(
    ("name", "max_error"),
    [
        ("SC_rgb_jpeg_gdcm.dcm", 0),  # lossless JPEG (process 14)
        ("SC_rgb_gdcm_KY.dcm", 0),  # JPEG 2000
        ("SC_rgb_jpeg_dcmtk.dcm", 10),  # baseline JPEG, YBR_FULL
        ("SC_rgb_dcmtk_+eb+cy+np.dcm", 100),  # baseline JPEG, YBR_FULL_422 subsampled
        ("SC_rgb_jls_lossy_line.dcm", 3),  # JPEG-LS near-lossless
    ],
)
def test_compressed_rgb_close_to_rle_original(name: str, max_error: int) -> None:
    reference = read_image(dicom_test_file("SC_rgb_rle.dcm")).array
    image = read_image(dicom_test_file(name))
    assert image.array.shape == (100, 100, 3)
    assert image.meta.photometric == "RGB"
    difference = np.abs(image.array - reference)
    assert difference.max() <= max_error
    assert difference.mean() <= 3.0
    np.testing.assert_allclose(image.array[0, 0], [255, 0, 0], atol=max_error)


def test_jpeg_extended_12bit_and_jpeg_ls_16bit_decode() -> None:
    image = read_image(dicom_test_file("JPGExtended.dcm"))
    assert image.array.shape == (1024, 256, 1)
    assert image.meta.bits == 12
    assert image.array.min() >= 0 and 100 < image.array.max() <= 4095
    image = read_image(dicom_test_file("JPEGLSNearLossless_16.dcm"))
    assert image.array.shape == (50, 10, 1) and image.array.max() > 255


def test_undecodable_jpeg_gives_clear_error(tmp_path: Path) -> None:
    # A 12-bit JPEG Extended file that libjpeg rejects ("misplaced marker segment").
    path = tmp_path / "JPEG-lossy.dcm"
    shutil.copy(dicom_test_file("JPEG-lossy.dcm"), path)
    error = assert_data_error(path, "could not decode the JPEG Extended")
    assert "pylibjpeg" in str(error)


@pytest.mark.parametrize("name", ["notes.txt", "scan.gz", "scan.nii.zip", "noext"])
def test_unsupported_suffix(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"some bytes that are not a DICOM preamble" * 10)
    assert_data_error(path, "unsupported file type")


def test_directory_without_dicom_is_rejected(tmp_path: Path) -> None:
    # A folder is read as a DICOM series (see test_io_volumes.py); without DICOM it fails.
    folder = tmp_path / "dir.png"
    folder.mkdir()
    assert_data_error(folder, "no DICOM image files")


# --------------------------------------------------------------------------- masks


def test_mask_0_255_becomes_0_1(tmp_path: Path) -> None:
    values = np.zeros((6, 5), dtype=np.uint8)
    values[2:4, 1:3] = 255
    mask = read_mask(save(values, tmp_path / "m.png"))
    assert mask.shape == (6, 5)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, values // 255)
    assert set(np.unique(mask)) == {0, 1}


def test_mask_labels_kept(tmp_path: Path) -> None:
    values = np.array([[0, 1, 2], [3, 2, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(read_mask(save(values, tmp_path / "labels.png")), values)


def test_mask_with_only_255_and_other_labels_is_not_binarised(tmp_path: Path) -> None:
    values = np.array([[0, 1, 255]], dtype=np.uint8)  # e.g. VOC: 255 is 'void'
    np.testing.assert_array_equal(read_mask(save(values, tmp_path / "voc.png")), values)


def test_mask_rgb_identical_channels(tmp_path: Path) -> None:
    grey = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    mask = read_mask(save(np.dstack([grey, grey, grey]), tmp_path / "rgb_mask.png"))
    assert mask.shape == (2, 2)
    np.testing.assert_array_equal(mask, [[0, 1], [1, 0]])


def test_mask_rgba_identical_channels(tmp_path: Path) -> None:
    grey = np.array([[0, 2], [1, 0]], dtype=np.uint8)
    alpha = np.full_like(grey, 255)
    mask = read_mask(save(np.dstack([grey, grey, grey, alpha]), tmp_path / "rgba_mask.png"))
    np.testing.assert_array_equal(mask, grey)


def test_mask_rgb_differing_channels_fails(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    path = save(rgb, tmp_path / "colour_mask.png")
    with pytest.raises(DataError, match="channels differ") as info:
        read_mask(path)
    assert str(info.value).startswith(str(path))


def test_mask_palette_gives_indices(tmp_path: Path) -> None:
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette_image = PILImage.fromarray(indices, mode="P")
    palette_image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    palette_image.save(tmp_path / "voc.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "voc.png"), indices)


def test_mask_non_integer_values_fail(tmp_path: Path) -> None:
    path = save(np.array([[0.0, 0.5], [1.0, 1.0]], dtype=np.float32), tmp_path / "float.tif")
    with pytest.raises(DataError, match="not integers") as info:
        read_mask(path)
    assert "float.tif" in str(info.value)


def test_mask_integral_floats_and_16bit_labels(tmp_path: Path) -> None:
    floats = np.array([[0.0, 2.0], [1.0, 0.0]], dtype=np.float32)
    mask = read_mask(save(floats, tmp_path / "ok.tif"))
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, floats.astype(np.uint8))
    wide = np.array([[0, 300], [2, 0]], dtype=np.uint16)
    mask = read_mask(save(wide, tmp_path / "wide.png"))
    assert mask.dtype == np.int32
    np.testing.assert_array_equal(mask, wide)


def test_mask_one_bit(tmp_path: Path) -> None:
    bits = PILImage.new("1", (3, 2))
    bits.putpixel((2, 1), 1)
    bits.save(tmp_path / "bits.png")
    mask = read_mask(tmp_path / "bits.png")
    np.testing.assert_array_equal(mask, [[0, 0, 0], [0, 0, 1]])


def test_mask_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.png"
    with pytest.raises(DataError, match="gone.png"):
        read_mask(path)


# --------------------------------------------------------------------------- to_channels


def test_to_channels_grey_to_rgb_and_back() -> None:
    grey = np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1)  # NHWC
    rgb = to_channels(grey, 3)
    assert rgb.shape == (2, 3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], grey[..., 0])
    back = to_channels(rgb, 1)
    assert back.shape == grey.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, grey, rtol=1e-6, atol=1e-5)


def test_to_channels_luma() -> None:
    rgb = np.zeros((1, 3, 3), dtype=np.float32)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    grey = to_channels(rgb, 1)
    np.testing.assert_allclose(grey[0, :, 0], [0.299 * 255, 0.587 * 255, 0.114 * 255], rtol=1e-6)
    uint8 = to_channels(rgb.astype(np.uint8), 1)
    assert uint8.dtype == np.float32


def test_to_channels_volume_and_same() -> None:
    volume = np.ones((2, 3, 4, 3), dtype=np.float32)  # DxHxWxC
    assert to_channels(volume, 1).shape == (2, 3, 4, 1)
    assert to_channels(volume, 3) is volume


@pytest.mark.parametrize(("shape", "channels"), [((4, 4, 4), 1), ((4, 4, 1), 2), ((4, 4), 3)])
def test_to_channels_unsupported(shape: tuple[int, ...], channels: int) -> None:
    with pytest.raises(DataError):
        to_channels(np.zeros(shape, dtype=np.float32), channels)


# --------------------------------------------------------------------------- listing, types


def test_image_suffixes() -> None:
    expected = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nii", ".nii.gz"}
    assert expected == IMAGE_SUFFIXES
    assert isinstance(IMAGE_SUFFIXES, frozenset)


def test_list_image_files(tmp_path: Path, grey8: np.ndarray) -> None:
    save(grey8, tmp_path / "b.png")
    save(grey8, tmp_path / "A.JPG")
    (tmp_path / "notes.txt").write_text("x")
    save(grey8, tmp_path / ".hidden.png")
    (tmp_path / ".git").mkdir()
    save(grey8, tmp_path / ".git" / "x.png")
    sub = tmp_path / "sub"
    sub.mkdir()
    shutil.copy(dicom_test_file("MR_small.dcm"), sub / "IM0001")
    shutil.copy(dicom_test_file("MR_small.dcm"), sub / "c.dcm")
    shutil.copy(dicom_test_file("MR_small.dcm"), sub / "DICOMDIR")
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4), np.uint8), np.eye(4)), str(sub / "v.nii.gz"))
    (sub / "archive.gz").write_bytes(b"x")
    found = list_image_files(tmp_path)
    expected = [tmp_path / "A.JPG", tmp_path / "b.png", sub / "IM0001", sub / "c.dcm"]
    assert found == sorted([*expected, sub / "v.nii.gz"])
    assert list_image_files(tmp_path, recursive=False) == [tmp_path / "A.JPG", tmp_path / "b.png"]
    for path in found:
        read_image(path)


def test_list_image_files_bad_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list_image_files(tmp_path / "missing")


def test_image_contract_checked() -> None:
    meta = ImageMeta(source=("x",))
    with pytest.raises(ValueError):
        Image(array=np.zeros((2, 2, 1), dtype=np.float64), meta=meta)
    with pytest.raises(ValueError):
        Image(array=np.zeros((2, 2), dtype=np.float32), meta=meta)
    with pytest.raises(ValueError):
        Image(array=np.zeros((2, 2, 1), dtype=np.float32), meta=ImageMeta(("x",), (1.0,)))
    volume = Image(array=np.zeros((2, 2, 2, 1), dtype=np.float32), meta=meta)
    assert volume.is_volume
