"""dataset.json datasets (medseg.io.msd): MSD and nnU-Net v2 dialects, channels, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.data.synthetic3d import lps_affine, write_msd_dataset, write_nifti_volume
from medseg.errors import DataError
from medseg.io import (
    DatasetDescription,
    read_case_image,
    read_case_labels,
    read_dataset_json,
    read_image,
    read_mask,
)
from medseg.io.msd import MsdCase, modality_of, read_case_shape

SHAPE = (12, 14, 10)


@pytest.fixture(scope="module")
def msd(tmp_path_factory) -> Path:
    return write_msd_dataset(tmp_path_factory.mktemp("msd") / "ds", n_cases=3, shape=SHAPE)


@pytest.fixture(scope="module")
def msd2(tmp_path_factory) -> Path:
    """Two channels as _0000/_0001 files."""
    root = tmp_path_factory.mktemp("msd2") / "ds"
    return write_msd_dataset(root, n_cases=2, shape=SHAPE, channels=2, seed=3)


def _v2_dataset(root: Path, n_cases: int = 2, channels: int = 2) -> Path:
    """An nnU-Net v2 dataset: channel_names, labels name -> value, file_ending, no training."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    affine = lps_affine(SHAPE, (1.0, 1.0, 1.0), (3.0, 0.0, 0.0))
    for i in range(n_cases):
        for c in range(channels):
            image = rng.normal(size=SHAPE).astype(np.float32)
            write_nifti_volume(root / "imagesTr" / f"case{i}_{c:04d}.nii.gz", image, affine)
        labels = rng.integers(0, 3, SHAPE).astype(np.uint8)
        write_nifti_volume(root / "labelsTr" / f"case{i}.nii.gz", labels, affine)
    meta = {
        "channel_names": {str(c): name for c, name in enumerate(["T2", "ADC"][:channels])},
        "labels": {"background": 0, "PZ": 1, "TZ": 2},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _edit_json(root: Path, **changes) -> None:
    path = root / "dataset.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- MSD


def test_msd_description(msd):
    d = read_dataset_json(msd)
    assert isinstance(d, DatasetDescription)
    assert d.labels == {0: "background", 1: "anterior", 2: "posterior"}
    assert d.channels == {0: "MRI"} and d.modality == "MR"
    assert d.num_classes == 3 and d.n_channels == 1
    assert d.file_ending == ".nii.gz" and d.name == "SyntheticPhantom3D"
    assert [c.case_id for c in d.cases] == ["phantom_000", "phantom_001", "phantom_002"]
    case = d.cases[1]
    assert case.images == (msd / "imagesTr" / "phantom_001.nii.gz",)
    assert case.label == msd / "labelsTr" / "phantom_001.nii.gz"
    # the path of dataset.json itself works too
    assert read_dataset_json(msd / "dataset.json").cases == d.cases


def test_msd_case_arrays(msd):
    d = read_dataset_json(msd)
    case = d.cases[0]
    image = read_case_image(case, d.n_channels)
    labels = read_case_labels(case, d.labels)
    direct = read_image(case.images[0])
    np.testing.assert_array_equal(image.array, direct.array)
    assert image.array.dtype == np.float32 and image.array.ndim == 4
    assert labels.dtype == np.uint8 and labels.shape == image.array.shape[:3]
    np.testing.assert_array_equal(labels, read_mask(case.label))
    assert set(np.unique(labels)) == {0, 1, 2}
    assert read_case_shape(case) == (image.array.shape[:3], 1)
    assert image.meta.spacing == pytest.approx((2.0, 1.0, 1.5))


def test_two_channel_files(msd2):
    d = read_dataset_json(msd2)
    assert d.channels == {0: "MRI", 1: "T2"}
    case = d.cases[0]
    assert [p.name for p in case.images] == ["phantom_000_0000.nii.gz", "phantom_000_0001.nii.gz"]
    image = read_case_image(case, 2)
    assert image.array.shape[-1] == 2
    for c, path in enumerate(case.images):
        np.testing.assert_array_equal(image.array[..., c], read_image(path).array[..., 0])
    assert image.meta.source == tuple(str(p) for p in case.images)
    assert read_case_shape(case) == (image.array.shape[:3], 2)
    with pytest.raises(DataError, match="has 2 channel\\(s\\), dataset.json declares 1"):
        read_case_image(case, 1)


def test_4d_file_equals_channel_files(tmp_path, msd2):
    root = write_msd_dataset(
        tmp_path / "4d", n_cases=2, shape=SHAPE, channels=2, seed=3, four_d=True
    )
    d4, d2 = read_dataset_json(root), read_dataset_json(msd2)
    assert len(d4.cases[0].images) == 1
    image4 = read_case_image(d4.cases[0], 2)
    image2 = read_case_image(d2.cases[0], 2)
    assert image4.array.shape[-1] == 2
    np.testing.assert_allclose(image4.array, image2.array, rtol=0, atol=1e-6)
    np.testing.assert_allclose(image4.meta.affine, image2.meta.affine, atol=1e-5)


def test_channel_files_must_share_grid(tmp_path, msd2):
    root = _copy(msd2, tmp_path / "ds")
    case = read_dataset_json(root).cases[0]
    second = case.images[1]
    array = read_image(second).array[..., 0]
    shifted = lps_affine(array.shape, (2.0, 1.0, 1.5), (0.0, 0.0, 20.0))
    write_nifti_volume(second, array, shifted)
    with pytest.raises(DataError, match="affine differs"):
        read_case_image(case, 2)
    write_nifti_volume(second, array[:-1], shifted)
    with pytest.raises(DataError, match="shape .* differs"):
        read_case_image(case, 2)
    with pytest.raises(DataError, match="shape .* differs"):
        read_case_shape(case)


def test_labels_outside_dataset_json(tmp_path, msd):
    root = _copy(msd, tmp_path / "ds")
    d = read_dataset_json(root)
    case = d.cases[0]
    labels = read_mask(case.label)
    labels[0, 0, 0] = 7
    write_nifti_volume(case.label, labels, read_image(case.images[0]).meta.affine)
    with pytest.raises(DataError, match=r"phantom_000.nii.gz: label values \[7\] are not in"):
        read_case_labels(case, d.labels)
    with pytest.raises(DataError, match="no label file"):
        read_case_labels(MsdCase("x", case.images, None), d.labels)


# --------------------------------------------------------------------------- nnU-Net v2


def test_nnunet_v2_dataset(tmp_path):
    root = _v2_dataset(tmp_path / "v2")
    d = read_dataset_json(root)
    assert d.labels == {0: "background", 1: "PZ", 2: "TZ"}
    assert d.channels == {0: "T2", 1: "ADC"} and d.modality == "MR"
    assert [c.case_id for c in d.cases] == ["case0", "case1"]
    assert d.name == "v2"
    case = d.cases[1]
    assert case.label == root / "labelsTr" / "case1.nii.gz"
    image = read_case_image(case, 2)
    np.testing.assert_array_equal(image.array[..., 1], read_image(case.images[1]).array[..., 0])
    assert read_case_labels(case, d.labels).max() == 2


def test_nnunet_v2_missing_channel_and_label(tmp_path):
    root = _v2_dataset(tmp_path / "v2")
    (root / "imagesTr" / "case1_0001.nii.gz").unlink()
    with pytest.raises(DataError, match="case case1 in imagesTr/: missing case1_0001.nii.gz"):
        read_dataset_json(root)
    root = _v2_dataset(tmp_path / "v2b")
    (root / "labelsTr" / "case0.nii.gz").unlink()
    with pytest.raises(DataError, match="labelsTr/case0.nii.gz of case case0 does not exist"):
        read_dataset_json(root)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("bad_json", "dataset.json: not valid JSON"),
        ("no_labels", "dataset.json: missing key 'labels'"),
        ("gap_labels", r"dataset.json: 'labels' numbers \[0, 2\] are not 0..1"),
        ("only_background", "needs the background \\(0\\) and at least one structure"),
        ("no_modality", "dataset.json: missing key 'modality' \\(MSD\\) or 'channel_names'"),
        ("missing_image", "dataset.json: listed image imagesTr/phantom_001.nii.gz does not exist"),
        (
            "missing_label",
            "dataset.json: listed label ./labelsTr/phantom_002.nii.gz does not exist",
        ),
        ("region_labels", "region-based labels are not supported"),
        ("bad_entry", "dataset.json: training entry 0 has no 'image' file name"),
        ("no_file", "dataset.json: file not found"),
    ],
)
def test_bad_dataset_json(tmp_path, msd, change, message):
    root = _copy(msd, tmp_path / "ds")
    path = root / "dataset.json"
    if change == "bad_json":
        path.write_text('{"labels": {"0": "background",}')
    elif change == "no_labels":
        _edit_json(root, labels=None)
    elif change == "gap_labels":
        _edit_json(root, labels={"0": "background", "2": "posterior"})
    elif change == "only_background":
        _edit_json(root, labels={"0": "background"})
    elif change == "no_modality":
        _edit_json(root, modality=None)
    elif change == "missing_image":
        (root / "imagesTr" / "phantom_001.nii.gz").unlink()
    elif change == "missing_label":
        (root / "labelsTr" / "phantom_002.nii.gz").unlink()
    elif change == "region_labels":
        _edit_json(root, labels={"background": 0, "whole": [1, 2], "core": 2})
    elif change == "bad_entry":
        _edit_json(root, training=[{"label": "./labelsTr/phantom_000.nii.gz"}])
    elif change == "no_file":
        path.unlink()
    with pytest.raises(DataError, match=message) as info:
        read_dataset_json(root)
    assert "\n" not in str(info.value)


def test_modality_from_channel_names():
    assert modality_of({0: "CT"}) == "CT"
    assert modality_of({0: "T2", 1: "ADC"}) == "MR"
    assert modality_of({0: "FLAIR", 1: "T1w", 2: "t1gd", 3: "T2w"}) == "MR"
    assert modality_of({0: "MRI"}) == "MR"
    assert modality_of({0: "non-contrast CT", 1: "PET"}) == "CT"
    assert modality_of({0: "PET"}) == "PET"
