"""3D phantoms and the files they are written as (medseg.data.synthetic3d)."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from medseg.data.synthetic3d import (
    LABELS,
    PATIENT_ID,
    lps_affine,
    phantom3d,
    write_dicom_series,
    write_msd_dataset,
    write_nifti_volume,
)
from medseg.io import read_dicom_series, read_image, read_mask

SPACING = (2.0, 1.0, 1.5)


def test_phantom_shape_labels_and_contrast():
    image, labels = phantom3d((20, 24, 18), seed=1, channels=2)
    assert image.shape == (20, 24, 18, 2) and image.dtype == np.float32
    assert labels.shape == (20, 24, 18) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2}
    # the two structures touch: some voxel of one has a face neighbour in the other
    touching = False
    for axis in range(3):
        a, b = np.moveaxis(labels, axis, 0)[:-1], np.moveaxis(labels, axis, 0)[1:]
        touching |= bool(np.any((a == 1) & (b == 2)) or np.any((a == 2) & (b == 1)))
    assert touching
    # anterior (label 1) lies above (smaller row index than) posterior (label 2)
    rows = np.indices(labels.shape)[1]
    assert rows[labels == 1].mean() < rows[labels == 2].mean()
    # label 1 is bright and label 2 dark in channel 0, the other way round in channel 1
    ch0, ch1 = image[..., 0], image[..., 1]
    assert ch0[labels == 1].mean() > ch0[labels == 2].mean() + 0.3
    assert ch1[labels == 2].mean() > ch1[labels == 1].mean() + 0.3
    assert ch0[labels == 0].mean() < 0.4  # background: the blob and the dark outside


def test_phantom_depends_on_seed_only():
    a_img, a_lab = phantom3d(seed=4)
    b_img, b_lab = phantom3d(seed=4)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    _, c_lab = phantom3d(seed=5)
    assert not np.array_equal(a_lab, c_lab)
    with pytest.raises(ValueError, match="at least 8"):
        phantom3d((4, 16, 16))


def test_nifti_volume_round_trip_oblique(tmp_path):
    shape = (10, 12, 9)
    affine = lps_affine(shape, SPACING, (6.0, -4.0, 5.0))
    image, labels = phantom3d(shape, seed=2)
    write_nifti_volume(tmp_path / "img.nii.gz", image[..., 0], affine)
    write_nifti_volume(tmp_path / "lab.nii.gz", labels, affine)
    back = read_image(tmp_path / "img.nii.gz")
    np.testing.assert_array_equal(back.array, image)
    np.testing.assert_allclose(back.meta.affine, affine, atol=1e-4)
    assert back.meta.spacing == pytest.approx(SPACING, abs=1e-5)
    np.testing.assert_array_equal(read_mask(tmp_path / "lab.nii.gz"), labels)


def test_msd_dataset_files(tmp_path):
    root = write_msd_dataset(tmp_path / "ds", n_cases=3, shape=(12, 14, 10), spacing=SPACING)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {str(k): v for k, v in LABELS.items()}
    assert meta["modality"] == {"0": "MRI"} and len(meta["training"]) == 3
    shapes, affines = set(), []
    for entry in meta["training"]:
        image = read_image(root / entry["image"])
        labels = read_mask(root / entry["label"])
        assert labels.shape == image.array.shape[:3]
        assert set(np.unique(labels)) == {0, 1, 2}
        assert image.meta.spacing == pytest.approx(SPACING, abs=1e-5)
        linear = image.meta.affine[:3, :3] / np.array(SPACING)
        assert np.abs(linear - np.round(linear)).max() > 0.01  # oblique
        np.testing.assert_allclose(linear.T @ linear, np.eye(3), atol=1e-6)
        shapes.add(image.array.shape[:3])
        affines.append(image.meta.affine)
    assert len(shapes) > 1  # shapes differ from case to case
    straight = write_msd_dataset(
        tmp_path / "straight", n_cases=1, shape=(12, 14, 10), oblique=False
    )
    image = read_image(straight / "imagesTr" / "phantom_000.nii.gz")
    np.testing.assert_allclose(image.meta.affine[:3, :3], lps_affine((1, 1, 1), SPACING)[:3, :3])


def test_msd_dataset_channels_and_overwrite(tmp_path):
    root = write_msd_dataset(tmp_path / "ds", n_cases=2, shape=(12, 14, 10), channels=2)
    names = sorted(p.name for p in (root / "imagesTr").iterdir())
    assert names == [f"phantom_00{i}_000{c}.nii.gz" for i in range(2) for c in range(2)]
    assert json.loads((root / "dataset.json").read_text())["modality"] == {"0": "MRI", "1": "T2"}
    with pytest.raises(FileExistsError, match="not empty"):
        write_msd_dataset(root, n_cases=1, shape=(12, 14, 10))
    write_msd_dataset(root, n_cases=1, shape=(12, 14, 10), overwrite=True)
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["phantom_000.nii.gz"]


def test_dicom_series_round_trip(tmp_path):
    shape = (9, 16, 12)
    affine = lps_affine(shape, SPACING, (5.0, 3.0, -7.0))
    image, _ = phantom3d(shape, seed=3)
    volume = image[..., 0] * 1000.0 - 200.0
    paths = write_dicom_series(tmp_path / "series", volume, SPACING, affine, seed=1)
    assert len(paths) == shape[0]
    assert [p.name for p in paths] != sorted(p.name for p in paths)  # names not in slice order
    ds = pydicom.dcmread(paths[0])
    assert ds.PatientID == PATIENT_ID and ds.Modality == "MR" and ds.BitsAllocated == 16
    assert ds.PixelRepresentation == 1 and float(ds.RescaleSlope) != 1.0
    (series,) = read_dicom_series(tmp_path / "series")
    slope = float(ds.RescaleSlope)
    assert series.array.shape == (*shape, 1)
    np.testing.assert_allclose(series.array[..., 0], volume, atol=slope / 2 + 1e-3)
    assert series.meta.spacing == pytest.approx(SPACING, abs=1e-4)
    np.testing.assert_allclose(series.meta.affine, affine, atol=1e-4)
    # the same volume as NIfTI reads back on the same grid
    write_nifti_volume(tmp_path / "same.nii.gz", volume.astype(np.float32), affine)
    nifti = read_image(tmp_path / "same.nii.gz")
    np.testing.assert_allclose(nifti.meta.affine, series.meta.affine, atol=1e-4)
    np.testing.assert_allclose(nifti.array, series.array, atol=slope / 2 + 1e-3)
    # read_image on the folder gives the same
    folder = read_image(tmp_path / "series")
    np.testing.assert_array_equal(folder.array, series.array)


def test_dicom_series_default_geometry(tmp_path):
    volume = np.arange(8 * 10 * 12, dtype=np.float32).reshape(8, 10, 12)
    write_dicom_series(tmp_path / "s", volume, (3.0, 0.5, 0.5))
    back = read_image(tmp_path / "s")
    np.testing.assert_allclose(back.array[..., 0], volume, atol=0.05)
    np.testing.assert_allclose(
        back.meta.affine, lps_affine(volume.shape, (3.0, 0.5, 0.5)), atol=1e-4
    )
    with pytest.raises(ValueError, match="differs from"):
        write_dicom_series(
            tmp_path / "t", volume, (1.0, 1.0, 1.0), lps_affine(volume.shape, SPACING)
        )


def test_dicom_series_takes_a_seg(tmp_path):
    """The synthetic series carries what a DICOM SEG writer copies from its source images."""
    import highdicom as hd

    from medseg.io.writers import write_seg

    shape = (8, 16, 12)
    image, labels = phantom3d(shape, seed=1)
    write_dicom_series(
        tmp_path / "s", image[..., 0], SPACING, lps_affine(shape, SPACING, (4, 3, 2))
    )
    source = read_image(tmp_path / "s").meta.source
    names = {1: "anterior", 2: "posterior"}
    path = write_seg(tmp_path / "seg.dcm", labels, list(source), segment_names=names)
    assert hd.seg.segread(path).get_segment_numbers() == [1, 2]
