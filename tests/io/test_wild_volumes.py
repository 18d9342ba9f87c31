"""Volumes from the wild (issue 30): 4D/5D NIfTI, DICOM series and enhanced multi-frame files
holding several acquisitions, tiny images, and messages that name only options that exist.

The rule under test (:func:`medseg.io.base.check_channels`): volumes along a 4th dimension are a
model's channels only when the model takes that many and names them; otherwise one line naming
the file, its shape, the volumes and what the model takes.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.errors import DataError
from medseg.inference.case import case_folder, check_model_input
from medseg.io import read_image
from medseg.io.base import check_channels, small_image_problem, volume_count
from tests.conftest import load_make_corpus

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _nifti(path: Path, shape: tuple[int, ...], *, tr: float | None = None) -> Path:
    data = np.zeros(shape, np.float32)
    data[20:40, 20:40] = 100.0
    img = nib.Nifti1Image(data, np.eye(4))
    if tr is not None:
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_zooms((1.0, 1.0, 1.0, tr))
    nib.save(img, str(path))
    return path


def _predictor(channels: int, names=None):
    card = {"input": {"channels": channels}}
    if names is not None:
        card["channels"] = names
    return SimpleNamespace(channels=channels, card=card)


# ------------------------------------------------------------------------------------- NIfTI


def test_4d_nifti_reports_its_volumes(tmp_path: Path) -> None:
    image = read_image(_nifti(tmp_path / "dwi.nii.gz", (64, 64, 8, 3), tr=2.0))
    assert image.array.shape == (8, 64, 64, 3)
    assert volume_count(image) == 3
    assert image.meta.photometric is None  # never RGB
    assert image.meta.extra["source_shape"] == (64, 64, 8, 3)
    assert image.meta.extra["volumes_are"] == "time points 2 s apart"


def test_3_volumes_are_refused_by_a_1_channel_model(tmp_path: Path) -> None:
    path = _nifti(tmp_path / "dce.nii.gz", (64, 64, 8, 3))
    image = read_image(path)
    with pytest.raises(DataError) as e:
        check_model_input(_predictor(1), image, str(path))
    assert str(e.value).startswith(
        f"{path}: 4D volume of shape (64, 64, 8, 3): 3 volumes along the 4th dimension, but "
        "the model takes 1 channel;"
    )
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="3 volumes along the 4th dimension"):
        read_image(path, channels=1)


def test_2_volumes_name_the_file_and_the_4th_dimension(tmp_path: Path) -> None:
    path = _nifti(tmp_path / "two.nii", (64, 64, 8, 2))
    for channels in (1, 3):
        with pytest.raises(DataError) as e:
            check_model_input(_predictor(channels), read_image(path), str(path))
        text = str(e.value)
        assert str(path) in text and "2 volumes along the 4th dimension" in text
        assert f"model takes {channels} channel" in text


def test_3_volumes_are_not_rgb_for_a_2d_colour_model(tmp_path: Path) -> None:
    path = _nifti(tmp_path / "three.nii", (32, 32, 4, 3))
    with pytest.raises(DataError, match=r"3 channels are colour \(RGB\) channels, not volumes"):
        check_model_input(_predictor(3), read_image(path), str(path))


def test_named_channels_of_the_model_take_the_volumes(tmp_path: Path) -> None:
    """MSD multi-channel 4D files stay channels when the model names as many."""
    path = _nifti(tmp_path / "prostate.nii.gz", (32, 32, 4, 2))
    image = read_image(path, channels=2, channel_names={0: "T2", 1: "ADC"})
    assert image.array.shape == (4, 32, 32, 2)
    assert image.meta.extra["channel_names"] == ["T2", "ADC"]
    check_model_input(_predictor(2, {"0": "T2", "1": "ADC"}), image, str(path))


def test_single_volume_4d_and_3d_files_pass(tmp_path: Path) -> None:
    for shape in ((32, 32, 4, 1), (32, 32, 4)):
        path = _nifti(tmp_path / f"v{len(shape)}.nii", shape)
        image = read_image(path, channels=1)
        assert image.array.shape == (4, 32, 32, 1) and volume_count(image) == 1
        check_channels(image, 3)  # grey -> colour is to_channels' job


def test_5d_nifti_is_refused_with_its_shape(tmp_path: Path) -> None:
    path = _nifti(tmp_path / "field.nii.gz", (16, 16, 4, 2, 3))
    with pytest.raises(DataError, match=r"5D NIfTI of shape \(16, 16, 4, 2, 3\); medseg reads"):
        read_image(path)


def test_many_volumes_keep_the_corpus_wording(tmp_path: Path) -> None:
    path = _nifti(tmp_path / "fmri.nii.gz", (8, 8, 4, 10), tr=2.5)
    with pytest.raises(DataError) as e:
        read_image(path)
    assert "4D NIfTI with 10 volumes; expected 3D" in str(e.value)
    assert "10 volumes along the 4th dimension" in str(e.value)
    assert "time points 2.5 s apart" in str(e.value) and str(path) in str(e.value)


def test_nan_message_names_what_a_user_can_do(tmp_path: Path) -> None:
    data = np.ones((8, 8, 4), np.float32)
    data[0, 0, 0] = np.nan
    path = tmp_path / "nan.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(DataError) as e:
        read_image(path)
    text = str(e.value)
    assert "clean the file" in text
    assert "from Python, pass replace_non_finite=<value> to medseg.io.read_image" in text
    assert read_image(path, replace_non_finite=0.0).meta.extra["non_finite_replaced"] == 1


# ------------------------------------------------------------------------------------- DICOM


def _series(folder: Path, keyword: str, values: list[float], slices: int = 3) -> Path:
    folder.mkdir(parents=True)
    base = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    uid = pydicom.uid.generate_uid(entropy_srcs=[str(folder)])
    k = 0
    for v_index, value in enumerate(values):
        for z in range(slices):
            ds = copy.deepcopy(base)
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(folder), str(k)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [0.0, 0.0, float(z)]
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            ds.PixelSpacing = [1.0, 1.0]
            ds.Rows = ds.Columns = 8
            ds.PixelData = np.full((8, 8), 10 * v_index + z, np.int16).tobytes()
            setattr(ds, keyword, value)
            ds.save_as(folder / f"IM{k:04d}.dcm")
            k += 1
    return folder


def test_dicom_series_of_b_values_is_a_4d_volume(tmp_path: Path) -> None:
    folder = _series(tmp_path / "dwi", "DiffusionBValue", [1000.0, 0.0, 500.0])
    image = read_image(folder)
    assert image.array.shape == (3, 8, 8, 3)
    assert image.meta.extra["volumes_are"] == "3 acquisitions by DiffusionBValue 0, 500, 1000"
    # channel k is the k-th b-value in ascending order (b=0 was written second)
    assert np.allclose(image.array[1, 0, 0], [11.0, 21.0, 1.0])
    with pytest.raises(DataError) as e:
        check_model_input(_predictor(1), image, str(folder))
    assert str(e.value).startswith(
        f"{folder}: 4D volume of shape (3, 8, 8, 3): 3 volumes along the 4th dimension "
        "(3 acquisitions by DiffusionBValue 0, 500, 1000), but the model takes 1 channel"
    )


def test_dicom_series_of_two_echoes(tmp_path: Path) -> None:
    folder = _series(tmp_path / "echo", "EchoNumbers", [1, 2])
    with pytest.raises(DataError, match="2 volumes along the 4th dimension .*EchoNumbers 1, 2"):
        read_image(folder, channels=1)


def test_duplicates_without_an_acquisition_attribute_stay_refused(tmp_path: Path) -> None:
    folder = _series(tmp_path / "copy", "ImageComments", ["a", "a"])
    for ds_path in folder.iterdir():  # no attribute tells the copies apart
        ds = pydicom.dcmread(ds_path)
        for keyword in ("EchoNumbers", "EchoTime", "InversionTime", "TriggerTime"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.AcquisitionNumber = 1
        ds.save_as(ds_path)
    with pytest.raises(DataError, match="same slice position"):
        read_image(folder)


def test_enhanced_multiframe_with_time_points_is_4d(tmp_path: Path) -> None:
    path = load_make_corpus().enhanced_multiframe(tmp_path / "dce.dcm", times=3, slices=4)
    image = read_image(path)
    assert image.array.shape == (4, 8, 8, 3)
    assert np.allclose(image.array[2, 0, 0], [2.0, 102.0, 202.0])
    assert image.meta.spacing == (2.0, 1.0, 1.0)
    with pytest.raises(DataError, match=r"TemporalPositionIndex 1, 2, 3\), but the model takes 1"):
        check_model_input(_predictor(1), image, str(path))


# ------------------------------------------------------------------------------ tiny images


def test_tiny_image_is_predicted_with_a_warning(tmp_path: Path, caplog) -> None:
    from PIL import Image as PILImage

    path = tmp_path / "tiny.png"
    PILImage.fromarray(np.zeros((3, 3), np.uint8)).save(path)
    image = read_image(path)
    with caplog.at_level(logging.WARNING, logger="medseg.inference.case"):
        check_model_input(_predictor(1), image, str(path))
    [record] = [r for r in caplog.records if "tiny.png" in r.getMessage()]
    assert "image of 3x3 pixels is smaller than 16 pixels" in record.getMessage()
    big = read_image(_nifti(tmp_path / "ok.nii", (32, 32, 2)))
    assert small_image_problem(big) is None  # 2 slices are fine slice by slice ...
    assert "2x32x32 voxels" in small_image_problem(big, volume=True)  # ... not in 3D


def test_a_failed_case_row_names_its_source(tmp_path: Path) -> None:
    case = SimpleNamespace(case_id="c1", source="/data/scan.nii")
    row: dict = {}
    with case_folder(case, tmp_path, row):
        raise DataError("volume of shape (8, 8, 8, 3): expected D x H x W x 1")
    assert row["status"] == "error"
    assert row["error"].startswith("/data/scan.nii: volume of shape")
