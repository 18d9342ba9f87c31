"""Tests for the volume readers of medseg.io: DICOM series folders and NIfTI (read and write)."""

from __future__ import annotations

import copy
import gzip
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

import medseg.io.nifti as nifti_module
from medseg.errors import DataError
from medseg.io import (
    image_suffix,
    list_image_files,
    match_slice_positions,
    read_dicom_series,
    read_image,
    read_mask,
    slice_positions,
    write_nifti_like,
)

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
REAL_DICOM = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "brain-tumor-progression-dicom"
)

ROWS, COLS = 6, 8
ROW_SPACING, COL_SPACING = 0.5, 0.8  # PixelSpacing: between rows, between columns
SLICE_SPACING = 2.5


def base_dataset() -> pydicom.Dataset:
    path = PYDICOM_TEST_FILES / "MR_small.dcm"
    if not path.is_file():
        pytest.skip("pydicom test file MR_small.dcm is not installed")
    return pydicom.dcmread(path)


def rotation() -> np.ndarray:
    """An oblique orthonormal frame: columns are row direction, column direction, normal."""
    a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rx @ ry


class Series:
    """A synthetic single-frame DICOM series written with shuffled names and instance numbers."""

    def __init__(
        self,
        folder: Path,
        n: int = 5,
        *,
        description: str = "T1 synthetic",
        number: int = 7,
        uid: str | None = None,
        seed: int = 0,
        slopes: list[float] | None = None,
        intercepts: list[float] | None = None,
        photometric: str = "MONOCHROME2",
        prefix: str = "",
    ) -> None:
        rng = np.random.default_rng(seed)
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        frame = rotation()
        self.along_row, self.along_col, self.normal = frame[:, 0], frame[:, 1], frame[:, 2]
        self.origin = np.array([-40.0, 12.5, 7.0])
        # Position order k = 0..n-1 along the normal; written under shuffled names/instances.
        self.positions = [self.origin + k * SLICE_SPACING * self.normal for k in range(n)]
        self.raw = [
            (rng.integers(0, 200, (ROWS, COLS)) + 1000 * (k + 1)).astype(np.int16) for k in range(n)
        ]
        self.slopes = slopes or [1.0] * n
        self.intercepts = intercepts or [0.0] * n
        # Neither file names nor instance numbers follow the position order.
        identity = np.arange(n)
        name_order = instance_order = identity
        while n > 2 and (np.all(name_order == identity) or np.all(instance_order == identity)):
            name_order, instance_order = rng.permutation(n), rng.permutation(n)
        self.paths: list[Path] = []
        self.uid = uid or generate_uid()
        base = base_dataset()
        for k in range(n):
            ds = copy.deepcopy(base)
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesInstanceUID = self.uid
            ds.SeriesDescription = description
            ds.SeriesNumber = number
            ds.InstanceNumber = int(instance_order[k]) + 1
            ds.ImagePositionPatient = [float(v) for v in self.positions[k]]
            ds.ImageOrientationPatient = [*map(float, self.along_row), *map(float, self.along_col)]
            ds.PixelSpacing = [ROW_SPACING, COL_SPACING]
            ds.SliceThickness = 2.0
            ds.Rows, ds.Columns = ROWS, COLS
            ds.RescaleSlope = self.slopes[k]
            ds.RescaleIntercept = self.intercepts[k]
            ds.PhotometricInterpretation = photometric
            ds.PixelData = self.raw[k].tobytes()
            path = folder / f"{prefix}IM{int(name_order[k]):04d}.dcm"
            ds.save_as(path)
            self.paths.append(path)

    def expected(self) -> np.ndarray:
        """Rescaled values in position order, DxHxWx1."""
        values = [r * s + b for r, s, b in zip(self.raw, self.slopes, self.intercepts, strict=True)]
        return np.stack(values)[..., np.newaxis].astype(np.float32)

    def edit(self, k: int, **attributes: object) -> None:
        ds = pydicom.dcmread(self.paths[k])
        for key, value in attributes.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
        ds.save_as(self.paths[k])


def assert_error(call, path: Path, match: str) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        call(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    return info.value


# --------------------------------------------------------------------------- DICOM series


def test_series_sorted_by_position_with_per_slice_rescale(tmp_path: Path) -> None:
    series = Series(
        tmp_path / "s",
        slopes=[1.0, 2.0, 0.5, 1.0, 3.0],
        intercepts=[0.0, -100.0, 50.0, 10.0, -1024.0],
    )
    names = [p.name for p in series.paths]
    assert names != sorted(names)  # file-name order is not position order
    image = read_image(series.folder)
    assert image.is_volume and image.array.shape == (5, ROWS, COLS, 1)
    assert image.array.dtype == np.float32
    np.testing.assert_allclose(image.array, series.expected())
    meta = image.meta
    assert meta.source == tuple(str(p) for p in series.paths)
    assert meta.spacing == pytest.approx((SLICE_SPACING, ROW_SPACING, COL_SPACING))
    assert meta.modality == "MR" and meta.photometric == "MONOCHROME2"
    assert meta.extra["series_description"] == "T1 synthetic"
    assert meta.extra["series_number"] == 7
    assert meta.extra["slice_order"] == "ImagePositionPatient"
    assert meta.extra["rescale_per_slice"] is True
    assert meta.extra["rescale_slopes"] == [1.0, 2.0, 0.5, 1.0, 3.0]
    np.testing.assert_allclose(meta.extra["slice_positions"], np.stack(series.positions))
    # (slice k, row r, col c) -> origin + k * step * normal + r * row spacing along the column
    # direction cosine + c * column spacing along the row direction cosine.
    k, r, c = 3, 4, 5
    expected = (
        series.origin
        + k * SLICE_SPACING * series.normal
        + r * ROW_SPACING * series.along_col
        + c * COL_SPACING * series.along_row
    )
    np.testing.assert_allclose((meta.affine @ [k, r, c, 1.0])[:3], expected, atol=1e-6)
    assert meta.patient_id == str(base_dataset().PatientID)


def test_series_slices_match_single_file_reader_monochrome1(tmp_path: Path) -> None:
    series = Series(
        tmp_path / "m1",
        n=3,
        slopes=[1.0, 2.0, 1.0],
        intercepts=[0.0, 5.0, 0.0],
        photometric="MONOCHROME1",
    )
    volume = read_image(series.folder).array
    for k, path in enumerate(series.paths):
        np.testing.assert_array_equal(volume[k], read_image(path).array)
    # Reflected within the stored range (-32768..32767) then rescaled: slope 1 -> -1 - v.
    np.testing.assert_array_equal(volume[0, ..., 0], -1.0 - series.raw[0])
    assert read_image(series.folder).meta.extra["monochrome1_inverted"] is True


def test_series_instance_number_fallback_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    series = Series(tmp_path / "nopos", n=4)
    for k in range(4):
        series.edit(k, ImagePositionPatient=None)
    with caplog.at_level(logging.WARNING, logger="medseg"):
        image = read_image(series.folder)
    assert "InstanceNumber" in caplog.text
    instances = [pydicom.dcmread(p).InstanceNumber for p in series.paths]
    order = np.argsort(instances)
    np.testing.assert_array_equal(image.array, series.expected()[order])
    assert image.meta.affine is None
    assert image.meta.extra["slice_order"] == "InstanceNumber"
    assert image.meta.spacing == pytest.approx((2.0, ROW_SPACING, COL_SPACING))  # thickness


def test_series_slices_of_different_size(tmp_path: Path) -> None:
    series = Series(tmp_path / "sizes", n=3)
    series.edit(1, Rows=3, PixelData=series.raw[1][:3].tobytes())
    error = assert_error(read_image, series.folder, "differ in size")
    assert series.paths[1].name in str(error)


def test_series_slices_of_different_orientation(tmp_path: Path) -> None:
    series = Series(tmp_path / "orient", n=3)
    series.edit(2, ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    assert_error(read_image, series.folder, "different orientations")


def test_series_duplicate_position_names_both_files(tmp_path: Path) -> None:
    series = Series(tmp_path / "dup", n=4)
    shutil.copy(series.paths[2], series.folder / "copy_of_slice.dcm")
    error = assert_error(read_image, series.folder, "same slice position")
    assert series.paths[2].name in str(error) and "copy_of_slice.dcm" in str(error)


def test_series_gap_is_an_error_unless_allowed(tmp_path: Path) -> None:
    series = Series(tmp_path / "gap", n=6)
    series.paths[3].unlink()
    error = assert_error(read_image, series.folder, "missing")
    distance = float(series.positions[2] @ series.normal)
    assert f"{distance:.3f}" in str(error)  # position of the gap, along the normal
    assert "allow_gaps" in str(error)
    image = read_image(series.folder, allow_gaps=True)
    assert image.array.shape[0] == 5
    assert image.meta.spacing[0] == pytest.approx(SLICE_SPACING)
    assert len(image.meta.extra["slice_gaps"]) == 1
    with pytest.raises(DataError, match="missing"):
        read_mask(series.folder)


def test_series_skips_obvious_non_images(tmp_path: Path) -> None:
    series = Series(tmp_path / "extras", n=3)
    (series.folder / "notes.txt").write_text("scanned on a Tuesday")
    (series.folder / "meta.json").write_text("{}")
    (series.folder / ".DS_Store").write_bytes(b"\0\1\2")
    shutil.copy(series.paths[0], series.folder / "DICOMDIR")  # index file, skipped by name
    shutil.copy(PYDICOM_TEST_FILES / "rtplan.dcm", series.folder / "plan.dcm")  # no image
    image = read_image(series.folder)
    assert image.array.shape[0] == 3


@pytest.mark.parametrize("name", ["photo.png", "data.bin", "IM9999"])
def test_series_with_foreign_file_fails(tmp_path: Path, name: str) -> None:
    series = Series(tmp_path / "foreign", n=3)
    (series.folder / name).write_bytes(b"not a dicom file at all" * 20)
    with pytest.raises(DataError, match="not a DICOM file") as info:
        read_image(series.folder)
    assert str(info.value).startswith(str(series.folder / name))


def test_series_with_corrupt_header_names_the_file(tmp_path: Path) -> None:
    series = Series(tmp_path / "cut", n=3)
    cut = series.folder / "cut.dcm"
    cut.write_bytes(series.paths[0].read_bytes()[:300])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        read_image(series.folder)
    assert str(info.value).startswith(str(cut))


def test_empty_folder_and_folder_of_folders(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_error(read_image, empty, "no DICOM image files")
    Series(tmp_path / "study" / "series_a", n=2)
    error = assert_error(read_image, tmp_path / "study", "sub-folder")
    assert "recursive=True" in str(error)


def test_several_series_in_one_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    t2 = Series(folder, n=3, description="T2 axial", number=12, seed=1, prefix="b")
    t1 = Series(folder, n=4, description="T1 axial", number=3, seed=2, prefix="a")
    patient_id = str(base_dataset().PatientID)
    error = assert_error(read_image, folder, "2 DICOM series")
    message = str(error)
    assert "'T1 axial'" in message and "'T2 axial'" in message and "#12" in message
    assert "read_dicom_series" in message
    assert patient_id not in message
    with pytest.raises(DataError, match="2 DICOM series"):
        read_mask(folder)
    images = read_dicom_series(folder)
    assert [im.meta.extra["series_number"] for im in images] == [3, 12]
    assert [im.meta.extra["series_description"] for im in images] == ["T1 axial", "T2 axial"]
    np.testing.assert_array_equal(images[0].array, t1.expected())
    np.testing.assert_array_equal(images[1].array, t2.expected())
    assert images[0].meta.series_uid == t1.uid


def test_read_dicom_series_recursive(tmp_path: Path) -> None:
    Series(tmp_path / "study" / "b", n=2, number=2, seed=3)
    Series(tmp_path / "study" / "a", n=3, number=5, seed=4)
    with pytest.raises(DataError, match="no DICOM image files"):
        read_dicom_series(tmp_path / "study")
    images = read_dicom_series(tmp_path / "study", recursive=True)
    assert [im.array.shape[0] for im in images] == [2, 3]


def test_series_of_one_multiframe_file(tmp_path: Path) -> None:
    folder = tmp_path / "dose"
    folder.mkdir()
    shutil.copy(PYDICOM_TEST_FILES / "rtdose.dcm", folder / "dose.dcm")
    image = read_image(folder)
    np.testing.assert_array_equal(image.array, read_image(folder / "dose.dcm").array)
    assert image.array.shape == (15, 10, 10, 1)
    assert "series_number" in image.meta.extra
    positions = slice_positions(folder)
    assert positions.shape == (15, 3)
    np.testing.assert_allclose(positions[1] - positions[0], image.meta.affine[:3, 0])


def test_series_mask_uses_stored_values_and_aligns_by_position(tmp_path: Path) -> None:
    image_series = Series(tmp_path / "img", n=5, seed=5)
    mask_folder = tmp_path / "mask"
    mask_series = Series(mask_folder, n=5, seed=6, slopes=[2.0] * 5, intercepts=[-3.0] * 5)
    labels = []
    for k in range(5):
        values = np.zeros((ROWS, COLS), dtype=np.int16)
        values[k % ROWS, 1 : k + 2] = 1
        mask_series.edit(k, PixelData=values.tobytes())
        labels.append(values)
    # Only slices 1..3 are part of the mask series (positions shared with the image series).
    mask_series.paths[0].unlink()
    mask_series.paths[4].unlink()
    mask = read_mask(mask_folder)
    assert mask.shape == (3, ROWS, COLS) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, np.stack(labels[1:4]))  # no rescale applied
    image_positions = slice_positions(image_series.folder)
    np.testing.assert_allclose(image_positions, np.stack(image_series.positions))
    np.testing.assert_allclose(
        image_positions, read_image(image_series.folder).meta.extra["slice_positions"]
    )
    index = match_slice_positions(image_positions, slice_positions(mask_folder))
    np.testing.assert_array_equal(index, [1, 2, 3])
    assert match_slice_positions(image_positions, image_positions[:1] + 5.0).tolist() == [-1]


def test_list_image_files_lists_each_slice(tmp_path: Path) -> None:
    series = Series(tmp_path / "s", n=3)
    assert list_image_files(series.folder) == sorted(series.paths)


def test_series_does_not_log_patient_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "mixed"
    Series(folder, n=2, number=1, seed=7)
    Series(folder, n=2, number=2, seed=8, prefix="x")
    patient_id = str(base_dataset().PatientID)
    with caplog.at_level(logging.DEBUG, logger="medseg"):
        images = read_dicom_series(folder)
    assert caplog.records
    assert patient_id not in caplog.text
    assert all(patient_id not in repr(im.meta) for im in images)


# --------------------------------------------------------------------------- NIfTI

SHAPE = (5, 6, 7)  # (i, j, k) as stored
MARKER = (1, 4, 2)
ZOOMS = (2.0, 3.0, 4.0)


def _affine(columns: list[list[float]], origin: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.array(columns, dtype=float).T
    affine[:3, 3] = origin
    return affine


# name: (affine columns for i, j, k as RAS vectors, expected (slice,row,col), array shape,
# spacing). Worked out by hand from the documented convention: slice grows to superior, row to
# posterior, column to patient left.
ORIENTATIONS = {
    "RAS": ([[2, 0, 0], [0, 3, 0], [0, 0, 4]], (2, 1, 3), (7, 6, 5), (4.0, 3.0, 2.0)),
    "LPS": ([[-2, 0, 0], [0, -3, 0], [0, 0, 4]], (2, 4, 1), (7, 6, 5), (4.0, 3.0, 2.0)),
    "RAI": ([[2, 0, 0], [0, 3, 0], [0, 0, -4]], (4, 1, 3), (7, 6, 5), (4.0, 3.0, 2.0)),
    # Sagittal storage: i -> anterior, j -> superior, k -> right.
    "ASR": ([[0, 2, 0], [0, 0, 3], [4, 0, 0]], (4, 3, 4), (6, 5, 7), (3.0, 2.0, 4.0)),
}


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_nifti_reorientation_puts_marker_where_documented(tmp_path: Path, name: str) -> None:
    columns, expected_index, expected_shape, expected_spacing = ORIENTATIONS[name]
    affine = _affine(columns, (10.0, -20.0, 30.0))
    data = np.zeros(SHAPE, dtype=np.int16)
    data[MARKER] = 500
    data[0, 0, 0] = 7
    path = write_nifti(tmp_path / f"{name}.nii.gz", data, affine)
    image = read_image(path)
    assert image.array.shape == (*expected_shape, 1)
    assert image.array.dtype == np.float32
    assert tuple(np.argwhere(image.array[..., 0] == 500)[0]) == expected_index
    assert image.meta.spacing == pytest.approx(expected_spacing)
    assert image.meta.photometric == "MONOCHROME2"
    assert image.meta.extra["nifti_axcodes"] == name
    # The affine maps the marker's (slice, row, col) to its LPS position.
    ras = affine @ [*MARKER, 1.0]
    lps = ras[:3] * [-1, -1, 1]
    np.testing.assert_allclose((image.meta.affine @ [*expected_index, 1.0])[:3], lps)
    # Radiological display: +col towards patient left (+x LPS), +row towards posterior (+y),
    # +slice towards superior (+z).
    directions = np.sign(np.round(image.meta.affine[:3, :3], 6))
    np.testing.assert_array_equal(directions, [[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    mask = read_mask(path)
    assert mask.shape == expected_shape and mask.dtype == np.int32
    assert mask[expected_index] == 500 and mask.sum() == 507


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_nifti_mask_roundtrip_to_original_orientation(tmp_path: Path, name: str) -> None:
    columns = ORIENTATIONS[name][0]
    affine = _affine(columns, (-5.0, 8.0, 1.5))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, SHAPE).astype(np.uint8)
    path = write_nifti(tmp_path / "labels.nii.gz", labels, affine)
    image = read_image(path)
    mask = read_mask(path)
    np.testing.assert_array_equal(mask, image.array[..., 0].astype(np.uint8))
    saved: list[str] = []
    real_save = nifti_module.nib.save

    def recording_save(img: nib.Nifti1Image, filename: str | os.PathLike) -> None:
        saved.append(str(filename))
        real_save(img, filename)

    out = tmp_path / "out" / "pred.nii.gz"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nifti_module.nib, "save", recording_save)
        assert write_nifti_like(out, mask, image.meta) == out
    assert len(saved) == 1 and saved[0] != str(out)
    assert saved[0].endswith(".nii.gz") and Path(saved[0]).parent == out.parent
    assert sorted(p.name for p in out.parent.iterdir()) == ["pred.nii.gz"]  # no temp left
    assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzipped
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)
    np.testing.assert_allclose(back.affine, affine)
    assert back.get_data_dtype() == np.uint8


def test_write_nifti_like_rejects_wrong_shape(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "a.nii", np.zeros(SHAPE, dtype=np.uint8), np.eye(4))
    meta = read_image(path).meta
    with pytest.raises(ValueError, match="do not fit"):
        write_nifti_like(tmp_path / "b.nii.gz", np.zeros(SHAPE, dtype=np.uint8), meta)
    with pytest.raises(ValueError, match=".nii"):
        write_nifti_like(tmp_path / "b.png", np.zeros((7, 6, 5), dtype=np.uint8), meta)
    with pytest.raises(ValueError, match="integers"):
        write_nifti_like(tmp_path / "b.nii", np.full((7, 6, 5), 0.5), meta)


def test_write_nifti_like_with_dicom_series_reference(tmp_path: Path) -> None:
    series = Series(tmp_path / "s", n=4)
    image = read_image(series.folder)
    labels = np.zeros(image.array.shape[:3], dtype=np.uint8)
    labels[2, 3, 5] = 1
    out = write_nifti_like(tmp_path / "seg.nii", labels, image.meta)
    back = nib.load(str(out))
    data = np.asanyarray(back.dataobj)
    assert data.shape == (COLS, ROWS, 4)
    assert tuple(np.argwhere(data == 1)[0]) == (5, 3, 2)
    ras = back.affine @ [5, 3, 2, 1.0]
    lps = image.meta.affine @ [2, 3, 5, 1.0]
    np.testing.assert_allclose(ras[:3] * [-1, -1, 1], lps[:3], atol=1e-6)
    # And reading it back gives the labels on the same LPS grid.
    again = read_image(out)
    point = np.argwhere(again.array[..., 0] == 1)[0]
    np.testing.assert_allclose((again.meta.affine @ [*point, 1.0])[:3], lps[:3], atol=1e-6)


def test_nifti_4d_channels_and_too_many_volumes(tmp_path: Path) -> None:
    data = np.zeros((*SHAPE, 3), dtype=np.float32)
    for c in range(3):
        data[MARKER + (c,)] = 10.0 * (c + 1)
    image = read_image(write_nifti(tmp_path / "c3.nii.gz", data, np.diag([*ZOOMS, 1.0])))
    assert image.array.shape == (7, 6, 5, 3)
    np.testing.assert_array_equal(image.array[2, 1, 3], [10.0, 20.0, 30.0])
    assert image.meta.photometric is None
    many = write_nifti(tmp_path / "fmri.nii.gz", np.zeros((*SHAPE, 10), np.float32), np.eye(4))
    assert_error(read_image, many, "4D NIfTI with 10 volumes; expected 3D")
    assert_error(read_mask, many, "4D NIfTI with 10 volumes")


def test_nifti_non_finite_voxels(tmp_path: Path) -> None:
    data = np.ones(SHAPE, dtype=np.float32)
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    path = write_nifti(tmp_path / "nan.nii.gz", data, np.eye(4))
    assert_error(read_image, path, "2 voxel")
    image = read_image(path, replace_non_finite=0.0)
    assert np.isfinite(image.array).all() and image.array.sum() == data.size - 2
    assert image.meta.extra["non_finite_replaced"] == 2


def test_nifti_mask_values(tmp_path: Path) -> None:
    floats = np.zeros(SHAPE, dtype=np.float32)
    floats[MARKER] = 0.5
    assert_error(read_mask, write_nifti(tmp_path / "f.nii", floats, np.eye(4)), "not integers")
    wide = np.zeros(SHAPE, dtype=np.int16)
    wide[MARKER] = 500
    mask = read_mask(write_nifti(tmp_path / "w.nii.gz", wide, np.diag([*ZOOMS, 1.0])))
    assert mask.dtype == np.int32 and mask[2, 1, 3] == 500


@pytest.mark.parametrize("content", [b"garbage" * 100, b""])
def test_corrupt_nifti(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(content)
    assert_error(read_image, path, "empty" if not content else "NIfTI")
    good = write_nifti(tmp_path / "good.nii.gz", np.ones((20, 20, 20), np.float32), np.eye(4))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[:200])
    assert_error(read_image, cut, "truncated or corrupt")
    plain = tmp_path / "plain.nii"
    plain.write_bytes(gzip.decompress(good.read_bytes())[:400])
    assert_error(read_image, plain, "truncated or corrupt")


def test_nifti_suffixes_and_listing(tmp_path: Path) -> None:
    assert image_suffix("a/b/scan.NII.GZ") == ".nii.gz"
    assert image_suffix("scan.nii") == ".nii"
    assert image_suffix("archive.tar.gz") == ".gz"
    assert image_suffix(".nii.gz") == ".gz"  # a hidden file named '.nii', not NIfTI
    write_nifti(tmp_path / "a.nii.gz", np.zeros(SHAPE, np.uint8), np.eye(4))
    write_nifti(tmp_path / "b.NII", np.zeros(SHAPE, np.uint8), np.eye(4))
    (tmp_path / "c.gz").write_bytes(b"x")
    assert list_image_files(tmp_path) == [tmp_path / "a.nii.gz", tmp_path / "b.NII"]


# --------------------------------------------------------------------------- real data

needs_real_dicom = pytest.mark.skipif(
    not REAL_DICOM.is_dir(), reason=f"real TCIA DICOM study not found at {REAL_DICOM}"
)


def _real_series(name: str) -> Path:
    found = sorted(REAL_DICOM.glob(f"*/*/*-{name}-*"))
    assert len(found) == 1, f"series {name} not found once under {REAL_DICOM}"
    return found[0]


@pytest.mark.realdata
@needs_real_dicom
def test_real_study_series() -> None:
    studies = sorted(p for p in REAL_DICOM.glob("*/*") if p.is_dir())
    assert studies
    images = read_dicom_series(studies[0], recursive=True)
    descriptions = [im.meta.extra["series_description"] for im in images]
    assert descriptions == ["T1post", "Mask_Tumor", "FLAIR_reg", "T2_reg"]
    for image in images:
        assert image.array.shape == (24, 320, 260, 1)
        assert image.meta.spacing == pytest.approx((6.5, 0.6875, 0.6875), abs=1e-5)
        assert image.meta.modality == "MR"
    with pytest.raises(DataError, match="sub-folder"):
        read_image(studies[0])


@pytest.mark.realdata
@needs_real_dicom
@pytest.mark.parametrize("name", ["T1post", "FLAIRreg", "T2reg", "MaskTumor"])
def test_real_series_folder_reads_sorted_by_position(name: str) -> None:
    folder = _real_series(name)
    image = read_image(folder)
    assert image.array.shape == (24, 320, 260, 1)
    positions = image.meta.extra["slice_positions"]
    distance = positions @ image.meta.extra["slice_normal"]
    assert np.all(np.diff(distance) > 6.0)  # strictly increasing, 6.5 mm apart
    names = [Path(p).name for p in image.meta.source]
    assert names != sorted(names)  # the real files are not in position order by name
    index = np.c_[np.arange(24), np.zeros((24, 2)), np.ones(24)]
    np.testing.assert_allclose((image.meta.affine @ index.T).T[:, :3], positions, atol=1e-4)


@pytest.mark.realdata
@needs_real_dicom
def test_real_mask_aligns_with_t1post() -> None:
    t1post, mask_folder = _real_series("T1post"), _real_series("MaskTumor")
    image_positions, mask_positions = slice_positions(t1post), slice_positions(mask_folder)
    np.testing.assert_allclose(mask_positions, image_positions, atol=1e-3)
    np.testing.assert_array_equal(
        match_slice_positions(image_positions, mask_positions), np.arange(24)
    )
    mask = read_mask(mask_folder)
    assert mask.shape == (24, 320, 260) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert mask.sum() > 1000
    assert read_image(t1post).array.shape[:3] == mask.shape


@pytest.mark.realdata
@needs_real_dicom
def test_real_two_series_in_one_folder(tmp_path: Path) -> None:
    for name in ("T1post", "T2reg"):
        for path in sorted(_real_series(name).iterdir())[:3]:
            (tmp_path / f"{name}_{path.name}").symlink_to(path)
    with pytest.raises(DataError, match="2 DICOM series") as info:
        read_image(tmp_path)
    assert "'T1post'" in str(info.value) and "'T2_reg'" in str(info.value)
    assert "PGBM" not in str(info.value)


def test_read_dicom_files_reads_a_chosen_subset_of_a_folder(tmp_path):
    """A folder whose other files are broken: the chosen series' files still read as one volume."""
    import pydicom

    from medseg.io import read_dicom_files, read_dicom_series

    src = pydicom.dcmread(Path(pydicom.__file__).parent / "data" / "test_files" / "MR_small.dcm")
    files = []
    for i in range(3):
        ds = src.copy()
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = 3 - i
        path = tmp_path / f"s{2 - i}.dcm"  # file-name order opposite to position order
        ds.save_as(path)
        files.append(path)
    (tmp_path / "broken.dcm").write_bytes(b"DICM but not really")
    with pytest.raises(DataError, match="broken.dcm"):
        read_dicom_series(tmp_path)
    (image,) = read_dicom_files(files, folder=tmp_path)
    assert image.array.shape == (3, 64, 64, 1)
    assert [Path(s).name for s in image.meta.source] == ["s2.dcm", "s1.dcm", "s0.dcm"]
