"""Volume scanners (DICOM series, NIfTI), layout detection, grouping, k-fold manifests and the leak
check, on small fixtures written to tmp_path (and on ../shared/data when it is there)."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from medseg.data import split as split_mod
from medseg.data.scan import Sample, detect_layout, scan_dataset
from medseg.data.split import (
    check_manifest_files,
    check_no_leak,
    load_manifest,
    make_kfold,
    make_split,
    path_sha256,
    select,
    write_manifest,
)
from medseg.errors import DataError
from medseg.io import slice_positions

MR_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "MR_small.dcm"
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SECRET_PID = "SECRET-PID-4711"  # PatientID in the headers: must never show up in ids or messages
SPACING = 5.0


# ---------------------------------------------------------------------------------------------
# Fixture writers


def _series(
    folder: Path,
    description: str,
    positions: list[float],
    *,
    size: int = 64,
    tumour: tuple[int, ...] | None = None,
    cosines: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
) -> None:
    """A DICOM series from MR_small.dcm: one file per position, file names NOT in slice order.

    ``tumour``: make it a 0/1 mask series with foreground in these slices (by position rank).
    """
    folder.mkdir(parents=True)
    uid = generate_uid()
    n = len(positions)
    order = np.random.default_rng(len(description) + n).permutation(n)  # file k holds slice o
    ranks = np.argsort(np.argsort(positions))
    for k, i in enumerate(order):
        ds = pydicom.dcmread(MR_SMALL)
        ds.PatientID = SECRET_PID
        ds.SeriesDescription = description
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = int(i) + 1
        ds.ImagePositionPatient = [-80.0, -90.0, float(positions[i])]
        ds.ImageOrientationPatient = [float(c) for c in cosines]
        if tumour is not None or size != 64:
            pixels = np.zeros((size, size), np.int16)
            if tumour is not None and ranks[i] in tumour:
                pixels[size // 4 : size // 2, size // 4 : size // 2] = 1
            elif tumour is None:
                pixels[:] = 100
            ds.Rows = ds.Columns = size
            ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"{k:06d}.dcm")


def _study(
    study: Path,
    n: int = 5,
    tumour: tuple[int, ...] = (2,),
    mask_positions: list[float] | None = None,
    mask_size: int = 64,
) -> None:
    positions = [10.0 + SPACING * i for i in range(n)]
    _series(study / "1-T1post-111", "T1post", positions)
    _series(study / "2-FLAIRreg-222", "FLAIR_reg", positions)
    _series(
        study / "3-MaskTumor-333",
        "Mask_Tumor",
        positions if mask_positions is None else mask_positions,
        size=mask_size,
        tumour=tumour,
    )


def _nii(path: Path, shape: tuple[int, ...], affine: np.ndarray | None = None, fg=False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(shape, np.uint8)
    if fg:
        data[(slice(1, 3),) * len(shape)] = 1
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _lgg(root: Path, patients: int, tumour_patients: int, slices: int = 3) -> Path:
    """An lgg-layout set: patient p has a tumour (in its middle slice) when p < tumour_patients."""
    for p in range(patients):
        for s in range(slices):
            img = np.full((8, 8), 10 * p + s, np.uint8)
            mask = np.zeros((8, 8), np.uint8)
            if p < tumour_patients and s == slices // 2:
                mask[2:5, 2:5] = 255
            _png(root / f"P{p:02d}" / f"P{p:02d}_{s}.png", img)
            _png(root / f"P{p:02d}" / f"P{p:02d}_{s}_mask.png", mask)
    return root


@pytest.fixture
def tcia(tmp_path) -> Path:
    root = tmp_path / "tcia"
    _study(root / "P1" / "study-A", tumour=(2,))
    _study(root / "P1" / "study-B", n=4, tumour=())  # a second study of the same patient
    _study(root / "P2" / "study-A", tumour=())
    return root


# ---------------------------------------------------------------------------------------------
# dicom_series


def test_dicom_series_one_sample_per_slice(tcia, caplog):
    caplog.set_level(logging.DEBUG)
    scan = scan_dataset(tcia, "dicom_series", image_series="t1POST", mask_series="MaskTumor")
    assert scan.problems == []
    assert len(scan.samples) == 5 + 4 + 5
    first = [s for s in scan.samples if s.id.startswith("P1/study-A/")]
    assert [s.id for s in first] == [f"P1/study-A/1-T1post-111#{i}" for i in range(5)]
    assert [s.index for s in first] == list(range(5))
    assert {s.image for s in first} == {str(tcia / "P1" / "study-A" / "1-T1post-111")}
    # "MaskTumor" matches the description "Mask_Tumor" (and the folder name).
    assert {s.target for s in first} == {str(tcia / "P1" / "study-A" / "3-MaskTumor-333")}
    # Both studies of P1 are one group: the patient folder, never the PatientID.
    assert {s.group for s in scan.samples} == {"P1", "P2"}
    assert {s.group for s in scan.samples if "study-B" in s.id} == {"P1"}
    text = json.dumps([s.to_dict() for s in scan.samples]) + caplog.text
    assert SECRET_PID not in text


def test_dicom_slice_positions_follow_the_normal_not_file_names(tcia):
    folder = tcia / "P1" / "study-A" / "1-T1post-111"
    names_in_position_order = sorted(
        (float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]), f.name)
        for f in folder.iterdir()
    )
    assert [n for _, n in names_in_position_order] != sorted(n for _, n in names_in_position_order)
    positions = slice_positions(folder)  # the reader's slice order: along the normal
    assert positions[:, 2] == pytest.approx([10.0 + SPACING * i for i in range(5)])
    assert positions == pytest.approx(slice_positions(tcia / "P1" / "study-A" / "3-MaskTumor-333"))


def test_dicom_series_slices_align_through_the_reader(tcia):
    image_dir = tcia / "P1" / "study-A" / "1-T1post-111"
    mask_dir = tcia / "P1" / "study-A" / "3-MaskTumor-333"
    from medseg.io import read_image, read_mask

    scan = scan_dataset(tcia, "dicom_series", image_series="T1post")
    volume = read_image(image_dir).array
    mask = read_mask(mask_dir)
    n = sum(s.image == str(image_dir) for s in scan.samples)
    assert volume.shape[0] == mask.shape[0] == n
    # Slice 2 (by position) is the only one with tumour: the index means the same in both.
    assert [bool(mask[i].any()) for i in range(n)] == [i == 2 for i in range(n)]


def test_dicom_series_without_matching_mask(tmp_path):
    root = tmp_path / "tcia"
    _study(root / "P1" / "s1")
    positions = [10.0 + SPACING * i for i in range(3)]
    _series(root / "P2" / "s1" / "1-T1post", "T1post", positions)  # no mask series
    scan = scan_dataset(root, "dicom_series", image_series="T1post")
    assert {s.group for s in scan.samples} == {"P1"}
    assert len(scan.problems) == 1
    assert str(root / "P2" / "s1") in scan.problems[0] and "no series" in scan.problems[0]
    assert "T1post" in scan.problems[0]  # the candidates are listed
    with pytest.raises(DataError, match="no series match mask_series"):
        scan_dataset(root, "dicom_series", strict=True, image_series="T1post")


def test_dicom_series_several_matching_image_series(tmp_path):
    root = tmp_path / "tcia"
    _study(root / "P1" / "s1")
    positions = [10.0 + SPACING * i for i in range(5)]
    _series(root / "P1" / "s1" / "4-T1post-repeat", "T1post repeat", positions)
    _series(root / "P1" / "s1" / "5-T1post-reg", "T1post reg", positions)
    scan = scan_dataset(root, "dicom_series", image_series="T1post")
    # Exactly one description equals the query: it wins over the longer ones.
    assert {s.image for s in scan.samples} == {str(root / "P1" / "s1" / "1-T1post-111")}
    with pytest.raises(DataError) as e:
        scan_dataset(root, "dicom_series", image_series="reg")  # FLAIR_reg and T1post reg
    message = str(e.value)
    assert "several series match image_series 'reg'" in message
    assert "FLAIR_reg" in message and "T1post reg" in message and str(root / "P1" / "s1") in message
    assert SECRET_PID not in message


def test_dicom_series_empty_image_series_needs_one_candidate(tmp_path):
    root = tmp_path / "tcia"
    positions = [10.0 + SPACING * i for i in range(3)]
    _series(root / "P1" / "s1" / "1-T1post", "T1post", positions)
    _series(root / "P1" / "s1" / "2-Mask", "MaskTumor", positions, tumour=(1,))
    scan = scan_dataset(root, "dicom_series")  # image_series "": the only other series
    assert len(scan.samples) == 3
    _series(root / "P1" / "s1" / "3-FLAIR", "FLAIR", positions)
    with pytest.raises(DataError, match="set data.image_series"):
        scan_dataset(root, "dicom_series")


def test_dicom_series_size_mismatch(tmp_path):
    root = tmp_path / "tcia"
    _study(root / "P1" / "s1")
    _study(root / "P2" / "s1", mask_size=32)
    scan = scan_dataset(root, "dicom_series", image_series="T1post")
    assert {s.group for s in scan.samples} == {"P1"}
    assert len(scan.problems) == 1
    assert "32x32" in scan.problems[0] and "64x64" in scan.problems[0]
    assert str(root / "P2" / "s1") in scan.problems[0]
    with pytest.raises(DataError, match="32x32"):
        scan_dataset(root, "dicom_series", strict=True, image_series="T1post")


@pytest.mark.parametrize(
    "mask_positions, expected",
    [
        ([10.0 + SPACING * i + 2.5 for i in range(5)], "5 mask slice(s) at positions"),  # shifted
        ([10.0 + SPACING * i for i in range(1, 5)], "1 image slice(s) without a mask"),  # subset
        ([10.0 + SPACING * i for i in range(6)], "1 mask slice(s) at positions"),  # extra slice
    ],
)
def test_dicom_series_misaligned_mask_skips_the_study(tmp_path, mask_positions, expected):
    root = tmp_path / "tcia"
    _study(root / "P1" / "s1")
    _study(root / "P2" / "s1", mask_positions=mask_positions, tumour=())
    scan = scan_dataset(root, "dicom_series", image_series="T1post")
    assert {s.group for s in scan.samples} == {"P1"}  # P2's study is skipped, not guessed
    assert len(scan.problems) == 1
    assert "not aligned" in scan.problems[0] and expected in scan.problems[0]
    assert str(root / "P2" / "s1") in scan.problems[0]


def test_dicom_series_orientation_mismatch(tmp_path):
    root = tmp_path / "tcia"
    positions = [10.0 + SPACING * i for i in range(3)]
    _series(root / "P1" / "s1" / "1-T1post", "T1post", positions)
    # Rows and columns swapped: same positions, transposed pixels.
    _series(
        root / "P1" / "s1" / "2-Mask",
        "MaskTumor",
        positions,
        tumour=(1,),
        cosines=(0, 1, 0, 1, 0, 0),
    )
    with pytest.raises(DataError, match="different slice orientations"):
        scan_dataset(root, "dicom_series", image_series="T1post")


def test_dicom_series_small_position_noise_is_tolerated(tmp_path):
    root = tmp_path / "tcia"
    noisy = [10.0 + SPACING * i + 0.01 * (-1) ** i for i in range(5)]  # 0.01 mm << 0.5 mm
    _study(root / "P1" / "s1", mask_positions=noisy)
    scan = scan_dataset(root, "dicom_series", image_series="T1post")
    assert len(scan.samples) == 5 and not scan.problems


def test_dicom_series_nothing_usable(tmp_path):
    root = tmp_path / "tcia"
    _study(root / "P1" / "s1", mask_size=32)
    with pytest.raises(DataError, match="no aligned image/mask series.*32x32"):
        scan_dataset(root, "dicom_series", image_series="T1post")


# ---------------------------------------------------------------------------------------------
# nifti


def _expected_depth(label: Path, header_depth: int) -> int:
    """Slices the scanner must report: the axial slices medseg.io reads, which are the header's
    z slices for these fixtures (read_mask must read them: a reader failure fails the test)."""
    from medseg.io import read_mask

    depth = int(read_mask(label).shape[0])
    assert depth == header_depth, (label, depth, header_depth)
    return depth


def test_nifti_one_sample_per_slice(tmp_path):
    root = tmp_path / "nii"
    _nii(root / "images" / "case1.nii.gz", (10, 12, 7))
    _nii(root / "labels" / "case1.nii.gz", (10, 12, 7), fg=True)
    # Stored z-first: the affine maps array axis 0 to z, so there are 7 axial slices too.
    swap = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    _nii(root / "images" / "case2.nii", (7, 12, 10), swap)
    _nii(root / "labels" / "case2.nii", (7, 12, 10), swap)
    scan = scan_dataset(root, "nifti")
    assert scan.problems == []
    n1 = _expected_depth(root / "labels" / "case1.nii.gz", 7)
    n2 = _expected_depth(root / "labels" / "case2.nii", 7)
    assert [s.id for s in scan.samples] == [f"images/case1.nii.gz#{i}" for i in range(n1)] + [
        f"images/case2.nii#{i}" for i in range(n2)
    ]
    assert Counter(s.group for s in scan.samples) == {"case1": n1, "case2": n2}
    assert all(s.target.endswith(f"labels/{s.group}" + s.image[s.image.index(".nii") :])
               for s in scan.samples)  # fmt: skip
    assert [s.index for s in scan.samples if s.group == "case1"] == list(range(n1))


def test_nifti_nnunet_layout(tmp_path):
    root = tmp_path / "Dataset001"
    _nii(root / "imagesTr" / "brain_001_0000.nii.gz", (6, 6, 4))
    _nii(root / "imagesTr" / "brain_001_0001.nii.gz", (6, 6, 4))  # second modality
    _nii(root / "labelsTr" / "brain_001.nii.gz", (6, 6, 4))
    _nii(root / "imagesTs" / "brain_009_0000.nii.gz", (6, 6, 4))  # no labels: not scanned
    scan = scan_dataset(root, "nifti")
    n = _expected_depth(root / "labelsTr" / "brain_001.nii.gz", 4)
    assert [s.id for s in scan.samples] == [f"imagesTr/brain_001_0000.nii.gz#{i}" for i in range(n)]
    assert {s.group for s in scan.samples} == {"brain_001"}
    assert len(scan.problems) == 1 and "brain_001_0001.nii.gz" in scan.problems[0]


def test_nifti_problems(tmp_path):
    root = tmp_path / "nii"
    _nii(root / "images" / "good.nii.gz", (8, 8, 3))
    _nii(root / "labels" / "good.nii.gz", (8, 8, 3))
    _nii(root / "images" / "bad_shape.nii.gz", (8, 8, 3))
    _nii(root / "labels" / "bad_shape.nii.gz", (8, 8, 4))
    _nii(root / "images" / "no_label.nii.gz", (8, 8, 3))
    _nii(root / "labels" / "no_image.nii.gz", (8, 8, 3))
    (root / "images" / "broken.nii.gz").write_bytes(b"not a nifti file")
    _nii(root / "labels" / "broken.nii.gz", (8, 8, 3))
    scan = scan_dataset(root, "nifti")
    assert {s.group for s in scan.samples} == {"good"}
    problems = "\n".join(scan.problems)
    assert len(scan.problems) == 4, problems
    assert "bad_shape.nii.gz: label shape (8, 8, 4) differs" in problems
    assert "no_label.nii.gz: image has no label" in problems
    assert "no_image.nii.gz: label has no image" in problems
    assert "broken.nii.gz: unreadable NIfTI header" in problems
    with pytest.raises(DataError, match="bad_shape"):
        scan_dataset(root, "nifti", strict=True)


def test_nifti_needs_its_folders(tmp_path):
    with pytest.raises(DataError, match="images/ \\+ labels/"):
        scan_dataset(tmp_path, "nifti")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="labels"):
        scan_dataset(tmp_path, "nifti")


# ---------------------------------------------------------------------------------------------
# detect_layout, grouping


def test_detect_layout_each_layout(tmp_path, tcia):
    assert detect_layout(tcia) == "dicom_series"
    assert detect_layout(_lgg(tmp_path / "lgg", 2, 1)) == "lgg"
    img = np.zeros((8, 8), np.uint8)
    for stem in ("a", "b"):
        _png(tmp_path / "pairs" / "images" / f"{stem}.png", img)
        _png(tmp_path / "pairs" / "masks" / f"{stem}.png", img)
        _png(tmp_path / "cls" / stem / "x.png", img)
        _png(tmp_path / "cls_split" / "Training" / stem / "x.png", img)
    assert detect_layout(tmp_path / "pairs") == "pairs"
    assert detect_layout(tmp_path / "cls") == "class_folders"
    assert detect_layout(tmp_path / "cls_split") == "class_folders"
    _nii(tmp_path / "nii" / "images" / "c.nii.gz", (4, 4, 2))
    _nii(tmp_path / "nii" / "labels" / "c.nii.gz", (4, 4, 2))
    _nii(tmp_path / "nnunet" / "imagesTr" / "c_0000.nii.gz", (4, 4, 2))
    _nii(tmp_path / "nnunet" / "labelsTr" / "c.nii.gz", (4, 4, 2))
    assert detect_layout(tmp_path / "nii") == "nifti"
    assert detect_layout(tmp_path / "nnunet") == "nifti"
    # layout "auto" scans with the detected layout
    assert scan_dataset(tmp_path / "nnunet", "auto").layout == "nifti"


def test_detect_layout_nothing_fits(tmp_path):
    (tmp_path / "empty_sub").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as e:
        detect_layout(tmp_path)
    for layout in ("lgg", "pairs", "class_folders", "dicom_series", "nifti"):
        assert layout in str(e.value)
    with pytest.raises(DataError, match="not found"):
        detect_layout(tmp_path / "missing")


def test_group_by_none_and_folder(tmp_path, tcia, caplog):
    root = _lgg(tmp_path / "lgg", 3, 1)
    folder = scan_dataset(root, "lgg", group_by="folder")
    assert {s.group for s in folder.samples} == {"P00", "P01", "P02"}
    assert scan_dataset(root, "lgg").samples == folder.samples  # auto = folder for lgg
    alone = scan_dataset(root, "lgg", group_by="none")
    assert [s.group for s in alone.samples] == [s.id for s in alone.samples]
    with caplog.at_level(logging.WARNING):
        vol = scan_dataset(tcia, "dicom_series", image_series="T1post", group_by="none")
    assert len({s.group for s in vol.samples}) == len(vol.samples)
    assert "leak" in caplog.text
    with pytest.raises(DataError, match="phash"):
        scan_dataset(tcia, "dicom_series", image_series="T1post", group_by="phash")
    from medseg.errors import ConfigError

    with pytest.raises(ConfigError, match="group_by"):
        scan_dataset(root, "lgg", group_by="patient")


def _class_folders_with_duplicate(root: Path) -> Path:
    # Smooth random textures (simple gradients or checkerboards all share one phash).
    rng = np.random.default_rng(0)
    one, other = (
        np.kron(rng.integers(0, 255, (8, 8)), np.ones((8, 8))).astype(np.uint8) for _ in range(2)
    )
    _png(root / "a" / "g1.png", one)
    _png(root / "a" / "g2.png", one)  # an exact copy: a near-duplicate of g1
    _png(root / "b" / "c1.png", other)
    return root


def test_group_by_phash_groups_near_duplicates(tmp_path):
    root = _class_folders_with_duplicate(tmp_path / "cls")
    for group_by in ("phash", "auto"):
        groups = {
            s.id: s.group for s in scan_dataset(root, "class_folders", group_by=group_by).samples
        }
        assert groups["a/g1.png"] == groups["a/g2.png"] != groups["b/c1.png"]


def test_group_by_auto_without_dedup_warns(tmp_path, monkeypatch, caplog):
    from medseg.data import scan as scan_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(
        scan_mod.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "medseg.data.dedup" else real(name, *a),
    )
    root = _class_folders_with_duplicate(tmp_path / "cls")
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(root, "class_folders")
    assert [s.group for s in scan.samples] == [s.id for s in scan.samples]
    assert "near-duplicate" in caplog.text
    with pytest.raises(DataError, match="dedup"):
        scan_dataset(root, "class_folders", group_by="phash")


# ---------------------------------------------------------------------------------------------
# k-fold manifests and the leak check


def _check_folds(manifest: dict, samples: list[Sample]) -> None:
    group = {s.id: s.group for s in samples}
    test = set(manifest["splits"]["test"])
    pool = [s.id for s in samples if s.id not in test]
    test_groups = {group[i] for i in test}
    val_count = Counter(i for f in manifest["folds"] for i in f["val"])
    assert val_count == Counter(pool)  # every non-test sample in exactly one val fold
    for f in manifest["folds"]:
        train_g, val_g = {group[i] for i in f["train"]}, {group[i] for i in f["val"]}
        assert not train_g & val_g
        assert not (train_g | val_g) & test_groups
        assert sorted(f["train"] + f["val"]) == sorted(pool)
    assert manifest["k"] == len(manifest["folds"])
    assert [set(g) for g in manifest["fold_groups"]] == [
        {group[i] for i in f["val"]} for f in manifest["folds"]
    ]


@pytest.fixture
def lgg_set(tmp_path):
    root = _lgg(tmp_path / "lgg", patients=20, tumour_patients=8)
    return scan_dataset(root, "lgg").samples


def test_kfold_stratified_on_tumour(lgg_set):
    manifest = make_kfold(lgg_set, k=4, seed=0)
    _check_folds(manifest, lgg_set)
    assert manifest["method"] == "stratified_group_kfold" and manifest["stratify"] == "tumour"
    positive = {f"P{p:02d}" for p in range(8)}
    per_fold = [len(set(g) & positive) for g in manifest["fold_groups"]]
    assert per_fold == [2, 2, 2, 2]  # 8 tumour patients over 4 folds
    assert [len(g) for g in manifest["fold_groups"]] == [5, 5, 5, 5]
    assert set(manifest["hashes"]) == {s.id for s in lgg_set}
    assert manifest["splits"]["test"] == []


def test_kfold_is_seeded(lgg_set):
    a = make_kfold(lgg_set, k=4, seed=3)
    assert a == make_kfold(lgg_set, k=4, seed=3)
    others = {json.dumps(make_kfold(lgg_set, k=4, seed=s)["folds"]) for s in range(4)}
    assert len(others) > 1


def test_kfold_with_held_out_test_groups(lgg_set):
    manifest = make_kfold(lgg_set, k=3, seed=1, test_fraction=0.25)
    _check_folds(manifest, lgg_set)
    test_groups = set(manifest["groups"]["test"])
    assert 3 <= len(test_groups) <= 7
    assert test_groups & {f"P{p:02d}" for p in range(8)}  # stratified: tumour patients too


def test_kfold_falls_back_to_group_kfold(tmp_path, caplog):
    samples = scan_dataset(_lgg(tmp_path / "lgg", patients=6, tumour_patients=6), "lgg").samples
    with caplog.at_level(logging.WARNING):
        manifest = make_kfold(samples, k=3, seed=0)
    assert manifest["method"] == "group_kfold" and manifest["stratify"] is None
    assert "same label" in caplog.text
    _check_folds(manifest, samples)
    plain = make_kfold(samples, k=3, seed=0, stratify=False)
    assert plain["method"] == "group_kfold"
    with pytest.raises(DataError, match="only 6 group"):
        make_kfold(samples, k=7)
    with pytest.raises(DataError, match="k >= 2"):
        make_kfold(samples, k=1)


def test_kfold_classification_keeps_testing_split(tmp_path):
    root = tmp_path / "cls"
    rng = np.random.default_rng(0)
    for split, n in (("Training", 6), ("Testing", 2)):
        for cls in ("glioma", "notumor"):
            for i in range(n):
                _png(root / split / cls / f"{i}.png", rng.integers(0, 255, (8, 8), np.uint8))
    samples = scan_dataset(root, "class_folders", group_by="none").samples
    manifest = make_kfold(samples, k=3, seed=0)
    assert set(manifest["splits"]["test"]) == {s.id for s in samples if s.split == "Testing"}
    assert manifest["method"] == "stratified_group_kfold" and manifest["stratify"] == "class"
    _check_folds(manifest, samples)
    by_id = {s.id: s for s in samples}
    for f in manifest["folds"]:
        assert Counter(by_id[i].target for i in f["val"]) == {0: 2, 1: 2}


def test_kfold_on_volume_slices(tcia, monkeypatch):
    samples = scan_dataset(tcia, "dicom_series", image_series="T1post").samples
    calls = []
    real = split_mod.file_sha256
    monkeypatch.setattr(split_mod, "file_sha256", lambda p: calls.append(p) or real(p))
    manifest = make_kfold(samples, k=2, seed=0, stratify=False)
    _check_folds(manifest, samples)
    assert len(calls) == 3 * 2 * 5 - 2  # each file of the 3 image + 3 mask folders, hashed once
    image_dir = tcia / "P1" / "study-A" / "1-T1post-111"
    mask_dir = tcia / "P1" / "study-A" / "3-MaskTumor-333"
    expected = f"{path_sha256(image_dir)}:{path_sha256(mask_dir)}"
    assert manifest["hashes"]["P1/study-A/1-T1post-111#3"] == expected
    # Changing one file of a folder changes its hash, so every slice of it is reported.
    one = sorted(image_dir.iterdir())[0]
    one.write_bytes(one.read_bytes() + b"\0")
    changed = check_manifest_files(samples, manifest)
    assert sorted(changed) == sorted(s.id for s in samples if s.image == str(image_dir))


def test_make_split_stratifies_on_tumour_for_volumes(tmp_path):
    root = tmp_path / "nii"
    for c in range(10):
        _nii(root / "images" / f"c{c}.nii.gz", (6, 6, 4))
        _nii(root / "labels" / f"c{c}.nii.gz", (6, 6, 4), fg=c < 5)
    samples = scan_dataset(root, "nifti").samples
    manifest = make_split(samples, val_fraction=0.2, test_fraction=0.2, seed=0)
    by_id = {s.id: s.group for s in samples}
    parts = {k: {by_id[i] for i in v} for k, v in manifest["splits"].items()}
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"])
    assert not parts["val"] & parts["test"]
    assert sum(len(v) for v in manifest["splits"].values()) == len(samples)
    strat = make_split(samples, val_fraction=0.2, test_fraction=0.2, seed=0, stratify=True)
    assert strat["stratify"] == "tumour" and strat["stratified"]
    positive = {f"c{c}" for c in range(5)}
    assert len(set(strat["groups"]["val"]) & positive) == 1
    assert len(set(strat["groups"]["test"]) & positive) == 1


def test_check_no_leak_raises_on_hand_made_manifests(lgg_set):
    manifest = make_kfold(lgg_set, k=4, seed=0)
    check_no_leak(manifest, lgg_set)
    leaky = json.loads(json.dumps(manifest))
    moved = leaky["folds"][1]["val"].pop()  # one slice of a val patient goes to train
    leaky["folds"][1]["train"].append(moved)
    group = next(s.group for s in lgg_set if s.id == moved)
    with pytest.raises(
        DataError, match=f"group '{group}' is in both 'fold 1 train' and 'fold 1 val'"
    ):
        check_no_leak(leaky, lgg_set)
    with pytest.raises(DataError, match=group):
        select(lgg_set, leaky, "val", fold=0)  # select refuses any leaky manifest
    split = make_split(lgg_set, 0.25, 0.2, seed=0)
    leaky = json.loads(json.dumps(split))
    moved = leaky["splits"]["train"].pop(0)
    leaky["splits"]["test"].append(moved)
    with pytest.raises(DataError, match="is in both 'train' and 'test'"):
        check_no_leak(leaky, lgg_set)
    kfold_test = make_kfold(lgg_set, k=3, seed=0, test_fraction=0.2)
    leaky = json.loads(json.dumps(kfold_test))
    leaky["splits"]["test"].append(leaky["folds"][0]["val"][0])
    with pytest.raises(DataError, match="'test' and 'fold 0"):
        check_no_leak(leaky, lgg_set)


def test_select_fold(lgg_set, tmp_path):
    manifest = make_kfold(lgg_set, k=4, seed=0, test_fraction=0.2)
    path = write_manifest(tmp_path / "splits.json", manifest)
    loaded = load_manifest(path)
    assert loaded == manifest
    for fold in range(4):
        train = select(lgg_set, loaded, "train", fold=fold)
        val = select(lgg_set, loaded, "val", fold=fold)
        assert [s.id for s in train] == manifest["folds"][fold]["train"]
        assert [s.id for s in val] == manifest["folds"][fold]["val"]
    assert [s.id for s in select(lgg_set, loaded, "test")] == manifest["splits"]["test"]
    with pytest.raises(DataError, match="needs a fold"):
        select(lgg_set, loaded, "train")
    with pytest.raises(DataError, match="unknown fold 4"):
        select(lgg_set, loaded, "val", fold=4)
    plain = make_split(lgg_set, 0.2, seed=0)
    with pytest.raises(DataError, match="no folds"):
        select(lgg_set, plain, "train", fold=0)
    raw = json.loads(path.read_text())
    raw["folds"][0]["val"].append(raw["folds"][0]["train"][0])
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="hash"):
        load_manifest(path)


def test_make_split_with_volume_slices_is_group_disjoint(tcia):
    samples = scan_dataset(tcia, "dicom_series", image_series="T1post").samples
    manifest = make_split(samples, val_fraction=0.5, seed=0)
    groups = {k: set(v) for k, v in manifest["groups"].items()}
    assert groups["train"] and groups["val"] and not groups["train"] & groups["val"]
    by_group = Counter(s.group for s in samples)
    for name, ids in manifest["splits"].items():
        assert len(ids) == sum(by_group[g] for g in groups[name])  # all slices of a patient


# ---------------------------------------------------------------------------------------------
# Real data (../shared/data)


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (see ../shared/data/README.md)")
    return path


@pytest.mark.realdata
def test_real_lgg_five_folds_by_patient():
    samples = scan_dataset(_shared("lgg-mri-segmentation/kaggle_3m"), "lgg").samples
    manifest = make_kfold(samples, k=5, seed=0)
    _check_folds(manifest, samples)
    assert len({s.group for s in samples}) == 46
    assert sorted(g for f in manifest["fold_groups"] for g in f) == sorted(
        {s.group for s in samples}
    )
    assert all(9 <= len(g) <= 10 for g in manifest["fold_groups"])


@pytest.mark.realdata
def test_real_tcia_study_per_slice_and_aligned():
    root = _shared("brain-tumor-progression-dicom")
    assert detect_layout(root) == "dicom_series"
    scan = scan_dataset(root, "dicom_series", image_series="T1post", mask_series="MaskTumor")
    assert scan.problems == []
    assert len(scan.samples) == 24
    assert [s.index for s in scan.samples] == list(range(24))
    assert {s.group for s in scan.samples} == {"PGBM-001"}
    (image_dir,) = {Path(s.image) for s in scan.samples}
    (mask_dir,) = {Path(s.target) for s in scan.samples}
    assert "T1post" in image_dir.name and "MaskTumor" in mask_dir.name
    img_pos, msk_pos = slice_positions(image_dir), slice_positions(mask_dir)
    assert np.linalg.norm(np.diff(img_pos, axis=0), axis=1) == pytest.approx([6.5] * 23, abs=1e-3)
    assert np.linalg.norm(img_pos - msk_pos, axis=1).max() < 0.01  # 6.5 mm x 0.1 would pass
    # Two series match "reg" (FLAIRreg, T2reg): the study is reported, not guessed.
    with pytest.raises(DataError, match="several series match image_series 'reg'"):
        scan_dataset(root, "dicom_series", image_series="reg")
    from medseg.io import read_image, read_mask

    assert read_image(image_dir).array.shape[:3] == (24, 320, 260)
    mask = read_mask(mask_dir)
    assert mask.shape == (24, 320, 260) and mask.max() == 1
