"""Tests for medseg.data: scanning, leak-proof splits and manifests, preprocessing, tf.data pipeline
and augmentation, on a tiny synthetic dataset."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from medseg.config import AugmentConfig, DataConfig  # noqa: E402
from medseg.data.augment import MissingSequence, build_augment  # noqa: E402
from medseg.data.pipeline import ArrayData, load_arrays, make_dataset  # noqa: E402
from medseg.data.preprocess import normalize, preprocess_images, resize_masks  # noqa: E402
from medseg.data.scan import Sample, scan_dataset  # noqa: E402
from medseg.data.split import (  # noqa: E402
    check_manifest_files,
    load_manifest,
    make_split,
    select,
    write_manifest,
)
from medseg.data.synthetic import CLASSES, SynthSpec, generate  # noqa: E402
from medseg.errors import DataError  # noqa: E402

SPEC = SynthSpec(size=48, patients=6, slices_per_patient=6, images_per_class=4)
N_SLICES = SPEC.patients * SPEC.slices_per_patient
SIZE = 32


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "set", SPEC)


@pytest.fixture(scope="module")
def seg_scan(synth):
    return scan_dataset(synth.segmentation_dir, "lgg")


@pytest.fixture(scope="module")
def cls_scan(synth):
    return scan_dataset(synth.classification_dir, "class_folders")


@pytest.fixture
def seg_copy(synth, tmp_path) -> Path:
    """A private copy of the segmentation set, for tests that change files."""
    return Path(shutil.copytree(synth.segmentation_dir, tmp_path / "seg"))


def _seg_cfg(**kw) -> DataConfig:
    return DataConfig(**{"image_size": [SIZE, SIZE], "channels": 3, **kw})


def _cls_cfg(**kw) -> DataConfig:
    return DataConfig(task="classification", layout="class_folders", image_size=[SIZE, SIZE], **kw)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Scanning


def test_scan_lgg_finds_every_slice(synth, seg_scan):
    root = synth.segmentation_dir
    patients = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(patients) == SPEC.patients
    assert len(seg_scan.samples) == N_SLICES
    assert seg_scan.problems == []
    assert seg_scan.layout == "lgg"
    assert sorted({s.group for s in seg_scan.samples}) == patients
    for s in seg_scan.samples:
        image, mask = Path(s.image), Path(s.target)
        assert image.is_file() and mask.is_file()
        assert mask.parent == image.parent
        assert mask.name == f"{image.stem}_mask{image.suffix}"
        assert s.group == image.parent.name
        assert s.id == f"{image.parent.name}/{image.name}"
        assert s.split is None
    assert len({s.id for s in seg_scan.samples}) == N_SLICES


def test_scan_lgg_natural_slice_order(seg_copy):
    patient = sorted(p for p in seg_copy.iterdir() if p.is_dir())[0]
    for src, dst in ((f"{patient.name}_1", f"{patient.name}_10"),):
        shutil.copy(patient / f"{src}.tif", patient / f"{dst}.tif")
        shutil.copy(patient / f"{src}_mask.tif", patient / f"{dst}_mask.tif")
    scan = scan_dataset(seg_copy, "lgg")
    slices = [Path(s.image).stem.rsplit("_", 1)[1] for s in scan.samples if s.group == patient.name]
    assert slices == ["1", "2", "3", "4", "5", "6", "10"]


def test_scan_class_folders(synth, cls_scan):
    assert cls_scan.class_names == sorted(CLASSES)
    assert len(cls_scan.class_names) == 4
    assert cls_scan.problems == []
    n_train = len(CLASSES) * SPEC.images_per_class
    n_test = len(CLASSES) * SPEC.testing_per_class
    assert len(cls_scan.samples) == n_train + n_test
    splits = [s.split for s in cls_scan.samples]
    assert splits.count("Training") == n_train and splits.count("Testing") == n_test
    for s in cls_scan.samples:
        path = Path(s.image)
        assert cls_scan.class_names[s.target] == path.parent.name
        assert s.split == path.parent.parent.name
        assert s.group == s.id == path.relative_to(synth.classification_dir).as_posix()


def test_scan_class_folders_without_split_folders(synth, tmp_path):
    root = Path(shutil.copytree(synth.classification_dir / "Training", tmp_path / "flat"))
    scan = scan_dataset(root, "class_folders")
    assert scan.class_names == sorted(CLASSES)
    assert {s.split for s in scan.samples} == {None}
    assert len(scan.samples) == len(CLASSES) * SPEC.images_per_class


def test_scan_empty_class_folder_is_a_problem(synth, tmp_path):
    root = Path(shutil.copytree(synth.classification_dir, tmp_path / "cls"))
    empty = root / "Testing" / "glioma"
    shutil.rmtree(empty)
    empty.mkdir()
    scan = scan_dataset(root, "class_folders")
    assert len(scan.problems) == 1 and "glioma" in scan.problems[0]
    with pytest.raises(DataError, match="glioma"):
        scan_dataset(root, "class_folders", strict=True)


def test_scan_image_without_mask(seg_copy):
    patient = sorted(p for p in seg_copy.iterdir() if p.is_dir())[2]
    shutil.copy(patient / f"{patient.name}_1.tif", patient / "lonely_slice.tif")
    scan = scan_dataset(seg_copy, "lgg")
    assert len(scan.samples) == N_SLICES  # the good ones are kept
    assert len(scan.problems) == 1
    assert "lonely_slice.tif" in scan.problems[0]
    assert all("lonely_slice" not in s.id for s in scan.samples)
    with pytest.raises(DataError, match="lonely_slice.tif"):
        scan_dataset(seg_copy, "lgg", strict=True)


def test_scan_mask_without_image(seg_copy):
    patient = sorted(p for p in seg_copy.iterdir() if p.is_dir())[0]
    shutil.copy(patient / f"{patient.name}_1_mask.tif", patient / "orphan_mask.tif")
    scan = scan_dataset(seg_copy, "lgg")
    assert len(scan.samples) == N_SLICES
    assert len(scan.problems) == 1
    assert "orphan_mask.tif" in scan.problems[0]
    with pytest.raises(DataError, match="orphan_mask.tif"):
        scan_dataset(seg_copy, "lgg", strict=True)


def test_scan_missing_root(tmp_path):
    with pytest.raises(DataError, match="not_there"):
        scan_dataset(tmp_path / "not_there", "lgg")
    with pytest.raises(DataError, match="not_there"):
        scan_dataset(tmp_path / "not_there", "class_folders")


def test_scan_empty_root(tmp_path):
    with pytest.raises(DataError):
        scan_dataset(tmp_path, "lgg")


def test_scan_unknown_layout(tmp_path):
    with pytest.raises(KeyError, match="pairs"):
        scan_dataset(tmp_path, "nifti_folders")


def test_scan_pairs(tmp_path):
    root = tmp_path / "pairs"
    img = np.full((16, 16), 100, np.uint8)
    msk = np.zeros((16, 16), np.uint8)
    for stem in ("a", "b", "c"):
        _png(root / "images" / f"{stem}.png", img)
    _png(root / "masks" / "a.png", msk)
    _png(root / "masks" / "b_mask.png", msk)  # the _mask suffix is accepted too
    _png(root / "masks" / "d.png", msk)  # mask without image
    scan = scan_dataset(root, "pairs")
    assert [s.id for s in scan.samples] == ["images/a.png", "images/b.png"]
    assert [s.group for s in scan.samples] == ["a", "b"]
    assert [Path(s.target).name for s in scan.samples] == ["a.png", "b_mask.png"]
    assert len(scan.problems) == 2
    assert any("c.png" in p for p in scan.problems)
    assert any("d.png" in p for p in scan.problems)
    with pytest.raises(DataError, match="c.png"):
        scan_dataset(root, "pairs", strict=True)


def test_scan_pairs_needs_both_folders(tmp_path):
    _png(tmp_path / "images" / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="masks"):
        scan_dataset(tmp_path, "pairs")


# ---------------------------------------------------------------------------------------------
# Splits and manifests


def _check_partition(manifest: dict, samples: list[Sample]) -> None:
    by_id = {s.id: s for s in samples}
    parts = {k: set(v) for k, v in manifest["splits"].items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not parts[a] & parts[b], f"{a}/{b} share ids"
        groups_a = {by_id[i].group for i in parts[a]}
        groups_b = {by_id[i].group for i in parts[b]}
        assert not groups_a & groups_b, f"{a}/{b} share groups"
    assert set().union(*parts.values()) == set(by_id)
    assert sum(len(v) for v in manifest["splits"].values()) == len(samples)  # no duplicates
    for name, ids in manifest["splits"].items():
        assert manifest["groups"][name] == sorted({by_id[i].group for i in ids})


def test_make_split_by_group(seg_scan):
    manifest = make_split(seg_scan.samples, val_fraction=0.2, test_fraction=0.2, seed=0)
    _check_partition(manifest, seg_scan.samples)
    assert all(manifest["splits"][k] for k in ("train", "val", "test"))
    assert manifest["method"] == "group_shuffle"
    assert set(manifest["hashes"]) == {s.id for s in seg_scan.samples}


def test_make_split_without_test(seg_scan):
    manifest = make_split(seg_scan.samples, val_fraction=0.3, seed=0)
    _check_partition(manifest, seg_scan.samples)
    assert manifest["splits"]["test"] == []
    assert manifest["splits"]["val"] and manifest["splits"]["train"]


def test_make_split_is_reproducible(seg_scan):
    a = make_split(seg_scan.samples, 0.2, 0.2, seed=7)
    b = make_split(seg_scan.samples, 0.2, 0.2, seed=7)
    assert a == b


def test_make_split_seed_changes_split(seg_scan):
    splits = {
        json.dumps(make_split(seg_scan.samples, 0.2, 0.2, seed=s)["splits"], sort_keys=True)
        for s in range(5)
    }
    assert len(splits) > 1
    a = make_split(seg_scan.samples, 0.2, 0.2, seed=0)
    b = make_split(seg_scan.samples, 0.2, 0.2, seed=1)
    assert a["hash"] != b["hash"]


def test_make_split_needs_two_groups(seg_scan):
    one_patient = [s for s in seg_scan.samples if s.group == seg_scan.samples[0].group]
    with pytest.raises(DataError, match="group"):
        make_split(one_patient, 0.2)


def test_classification_split_keeps_testing(cls_scan):
    # 0.25: the stratified splitter's 1/fraction = 4 folds fit the 4 images per class.
    manifest = make_split(cls_scan.samples, val_fraction=0.25, seed=0)
    testing = {s.id for s in cls_scan.samples if s.split == "Testing"}
    training = {s.id for s in cls_scan.samples if s.split == "Training"}
    assert set(manifest["splits"]["test"]) == testing
    assert set(manifest["splits"]["train"]) | set(manifest["splits"]["val"]) == training
    assert manifest["splits"]["val"]
    assert manifest["method"] == "stratified_group"
    _check_partition(manifest, cls_scan.samples)


def test_classification_split_small_classes(cls_scan):
    manifest = make_split(cls_scan.samples, val_fraction=0.2, seed=0)
    assert manifest["splits"]["val"]
    _check_partition(manifest, cls_scan.samples)


def test_manifest_write_load_round_trip(seg_scan, tmp_path):
    manifest = make_split(seg_scan.samples, 0.2, seed=0)
    path = write_manifest(tmp_path / "splits.json", manifest)
    assert load_manifest(path) == manifest


def test_load_manifest_detects_tampering(seg_scan, tmp_path):
    manifest = make_split(seg_scan.samples, 0.2, seed=0)
    path = write_manifest(tmp_path / "splits.json", manifest)
    raw = json.loads(path.read_text())
    raw["splits"]["val"].append(raw["splits"]["train"].pop())  # move one slice to val
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="hash") as e:
        load_manifest(path)
    assert "splits.json" in str(e.value)


def test_load_manifest_detects_tampering_of_other_fields(seg_scan, tmp_path):
    manifest = make_split(seg_scan.samples, 0.2, seed=0)
    path = write_manifest(tmp_path / "splits.json", manifest)
    raw = json.loads(path.read_text())
    raw["val_fraction"] = 0.5
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="hash"):
        load_manifest(path)


def test_load_manifest_missing_and_broken(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_manifest(tmp_path / "none.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 1, "splits": {"train": [')
    with pytest.raises(DataError, match="broken.json"):
        load_manifest(broken)
    other = tmp_path / "other.json"
    other.write_text('{"a": 1}')
    with pytest.raises(DataError, match="other.json"):
        load_manifest(other)


def test_check_manifest_files_reports_changed_image(seg_copy):
    scan = scan_dataset(seg_copy, "lgg")
    manifest = make_split(scan.samples, 0.2, seed=0)
    assert check_manifest_files(scan.samples, manifest) == []
    image, mask = scan.samples[3], scan.samples[10]
    pixels = np.asarray(Image.open(image.image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image.image, format="TIFF")
    assert check_manifest_files(scan.samples, manifest) == [image.id]
    # A changed mask is reported too.
    m = np.asarray(Image.open(mask.target)).copy()
    m[0, 0] = 255 - m[0, 0]
    Image.fromarray(m).save(mask.target, format="TIFF")
    assert sorted(check_manifest_files(scan.samples, manifest)) == sorted([image.id, mask.id])


def test_select(seg_scan):
    manifest = make_split(seg_scan.samples, 0.2, seed=0)
    val = select(seg_scan.samples, manifest, "val")
    assert [s.id for s in val] == manifest["splits"]["val"]
    missing = manifest["splits"]["train"][0]
    fewer = [s for s in seg_scan.samples if s.id != missing]
    with pytest.raises(DataError, match="missing") as e:
        select(fewer, manifest, "train")
    assert missing in str(e.value)
    assert len(select(fewer, manifest, "val")) == len(val)  # other splits are unaffected
    with pytest.raises(DataError, match="holdout"):
        select(seg_scan.samples, manifest, "holdout")


# ---------------------------------------------------------------------------------------------
# Preprocessing


def test_normalize_minmax_per_image():
    rng = np.random.default_rng(0)
    a = rng.uniform(10, 20, (8, 8, 1))
    b = rng.uniform(-5, 100, (8, 8, 1))
    out = normalize(tf.constant(np.stack([a, b]), tf.float32), "minmax").numpy()
    for img, src in zip(out, (a, b), strict=True):
        assert img.min() == pytest.approx(0.0, abs=1e-6)
        assert img.max() == pytest.approx(1.0, abs=1e-6)
        expected = (src - src.min()) / (src.max() - src.min())
        np.testing.assert_allclose(img, expected, atol=1e-5)


def test_normalize_minmax_uses_all_channels_together():
    x = np.zeros((1, 4, 4, 3), np.float32)
    x[..., 0] = 0.0
    x[..., 1] = 5.0
    x[..., 2] = 10.0
    out = normalize(tf.constant(x), "minmax").numpy()
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 0.5, 1.0], atol=1e-6)


def test_normalize_zscore():
    rng = np.random.default_rng(1)
    batch = np.stack([rng.normal(50, 10, (16, 16, 3)), rng.normal(-3, 0.1, (16, 16, 3))])
    out = normalize(tf.constant(batch, tf.float32), "zscore").numpy()
    for img in out:
        assert img.mean() == pytest.approx(0.0, abs=1e-4)
        assert img.std() == pytest.approx(1.0, abs=1e-3)


def test_normalize_percentile_clips_outliers():
    rng = np.random.default_rng(2)
    img = rng.uniform(0, 1, (1, 32, 32, 1)).astype(np.float32)
    img[0, 5, 5, 0] = 1000.0  # one hot pixel
    pct = normalize(tf.constant(img), "percentile").numpy()
    mm = normalize(tf.constant(img), "minmax").numpy()
    assert pct.min() == pytest.approx(0.0, abs=1e-6) and pct.max() == pytest.approx(1.0, abs=1e-6)
    assert pct[0, 5, 5, 0] == pytest.approx(1.0)  # clipped to the top
    # Percentile: the ordinary pixels keep their spread over [0, 1]...
    assert 0.4 < np.median(pct) < 0.6
    assert 0.25 < np.mean(pct > 0.5) < 0.75
    # ...minmax squeezes them all below 0.001 because of the outlier.
    assert np.mean(mm < 0.001) > 0.99


def test_normalize_percentile_channel_scales_each_sequence_on_its_own():
    # Three "MRI sequences" as channels at very different scales (one scanner's FLAIR dim).
    rng = np.random.default_rng(3)
    base = rng.uniform(0, 1, (2, 16, 16, 1)).astype(np.float32)
    img = np.concatenate([base * 200.0, base * 20.0, base * 2.0 + 5.0], axis=-1)
    per_channel = normalize(tf.constant(img), "percentile_channel").numpy()
    together = normalize(tf.constant(img), "percentile").numpy()
    for c in range(3):
        assert per_channel[..., c].min() == pytest.approx(0.0, abs=1e-6)
        assert per_channel[..., c].max() == pytest.approx(1.0, abs=1e-6)
    # the same structure in every channel once each is scaled on its own
    np.testing.assert_allclose(per_channel[..., 0], per_channel[..., 1], atol=1e-5)
    np.testing.assert_allclose(per_channel[..., 0], per_channel[..., 2], atol=1e-5)
    # normalising all channels together leaves the dim channel near 0
    assert together[..., 1].max() < 0.15


def test_normalize_none_and_unknown():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(normalize(tf.constant(x), "none").numpy(), x)
    with pytest.raises(ValueError, match="nope"):
        normalize(tf.constant(x), "nope")


def test_normalize_constant_image_is_finite():
    out = normalize(tf.fill([1, 4, 4, 1], 7.0), "minmax").numpy()
    assert np.all(np.isfinite(out)) and np.all(out == 0)


def test_preprocess_images_shapes():
    rng = np.random.default_rng(3)
    hwc = rng.uniform(0, 255, (40, 50, 3)).astype(np.float32)
    out = preprocess_images(tf.constant(hwc), (SIZE, SIZE), "minmax")
    assert out.shape == (SIZE, SIZE, 3)
    nhwc = rng.uniform(0, 255, (2, 40, 50, 1)).astype(np.float32)
    out = preprocess_images(tf.constant(nhwc), (24, 16), "minmax").numpy()
    assert out.shape == (2, 24, 16, 1)
    assert out.dtype == np.float32
    # Normalised at native resolution, then resized: values stay in [0, 1] and span most of it.
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    assert out.max() - out.min() > 0.3  # (random noise averages out when downsampled)


def test_pad_policy_keeps_aspect_and_restore_size_inverts_it():
    from medseg.data.preprocess import restore_size

    img = np.ones((1, 20, 40, 1), np.float32)
    out = preprocess_images(tf.constant(img), (32, 32), "none", policy="pad").numpy()
    # 20x40 fits as 16x32, centred: 8 rows of zero padding above and below.
    assert np.all(out[0, :8] == 0) and np.all(out[0, 24:] == 0)
    assert np.allclose(out[0, 8:24], 1.0)
    back = restore_size(tf.constant(out), tf.constant([20, 40]), (32, 32), "pad").numpy()
    assert back.shape == (1, 20, 40, 1) and np.allclose(back, 1.0)


def test_window_normalization_clips_to_the_window():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0], np.float32).reshape(1, 1, 5, 1)
    out = normalize(tf.constant(hu), "window", (40.0, 400.0)).numpy().ravel()
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_resize_masks_keeps_label_values():
    mask = np.zeros((10, 10), np.uint8)
    mask[:, 5:] = 7
    mask[2:4, 1:3] = 3
    for size in ((17, 23), (5, 5), (32, 32)):
        out = resize_masks(tf.constant(mask), size).numpy()
        assert out.shape == size
        assert out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 3, 7}
    big = resize_masks(tf.constant(mask), (20, 20)).numpy()
    assert np.all(big[:, 10:] == 7)  # right half stays label 7
    assert np.all(big[:, :2] == 0)
    assert np.all(big[4:8, 2:6] == 3)


def test_resize_masks_batch():
    masks = np.zeros((3, 8, 8), np.uint8)
    masks[1] = 1
    out = resize_masks(tf.constant(masks), (4, 4)).numpy()
    assert out.shape == (3, 4, 4)
    assert out[1].min() == 1 and out[0].max() == 0 and out[2].max() == 0


# ---------------------------------------------------------------------------------------------
# Loading arrays


@pytest.fixture(scope="module")
def seg_data(seg_scan) -> ArrayData:
    return load_arrays(seg_scan.samples, _seg_cfg(), num_classes=1)


@pytest.fixture(scope="module")
def cls_data(cls_scan) -> ArrayData:
    return load_arrays(cls_scan.samples, _cls_cfg(), num_classes=4)


def test_load_arrays_segmentation(seg_scan, seg_data):
    x, y = seg_data.images, seg_data.targets
    assert x.shape == (N_SLICES, SIZE, SIZE, 3) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    # minmax per image at native resolution, then an antialiased resize: near 0 and near 1
    assert np.all(x.min(axis=(1, 2, 3)) < 0.05) and np.all(x.max(axis=(1, 2, 3)) > 0.5)
    assert y.shape == (N_SLICES, SIZE, SIZE) and y.dtype == np.uint8
    assert set(np.unique(y)) == {0, 1}
    assert seg_data.problems == []
    assert [s.id for s in seg_data.samples] == [s.id for s in seg_scan.samples]
    # The masks are the files' masks: same foreground fraction per slice (up to resampling).
    for s, target in zip(seg_data.samples, y, strict=True):
        original = np.asarray(Image.open(s.target)) > 0
        assert target.mean() == pytest.approx(original.mean(), abs=0.02)
        if original.sum() > 20:
            assert target.any()


def test_load_arrays_images_match_files(seg_data):
    # Minmax-normalised at native resolution, then resized (antialiased).
    s, x = seg_data.samples[0], seg_data.images[0]
    original = np.asarray(Image.open(s.image)).astype(np.float32)
    unit = (original - original.min()) / (original.max() - original.min())
    small = tf.image.resize(unit[None], (SIZE, SIZE), antialias=True).numpy()[0]
    np.testing.assert_allclose(x, small, atol=1e-4)


def test_load_arrays_grey(seg_scan):
    data = load_arrays(seg_scan.samples[:4], _seg_cfg(channels=1), num_classes=1)
    assert data.images.shape == (4, SIZE, SIZE, 1)


def test_load_arrays_classification(cls_scan, cls_data):
    assert cls_data.images.shape == (len(cls_scan.samples), SIZE, SIZE, 3)
    assert cls_data.images.dtype == np.float32
    assert cls_data.targets.dtype == np.int32
    assert cls_data.targets.tolist() == [s.target for s in cls_scan.samples]
    assert set(cls_data.targets.tolist()) == {0, 1, 2, 3}


@pytest.fixture
def wrong_size_sample(seg_scan, tmp_path) -> Sample:
    good = seg_scan.samples[0]
    mask = _png(tmp_path / "wrong_size_mask.png", np.zeros((40, 40), np.uint8))
    return Sample(id="bad/slice.tif", image=good.image, target=str(mask), group="bad")


def test_load_arrays_wrong_size_mask_reported(seg_scan, wrong_size_sample):
    samples = [seg_scan.samples[1], wrong_size_sample, seg_scan.samples[2]]
    data = load_arrays(samples, _seg_cfg(), num_classes=1)
    assert [s.id for s in data.samples] == [samples[0].id, samples[2].id]
    assert data.images.shape[0] == 2 and data.targets.shape[0] == 2
    assert len(data.problems) == 1
    assert "wrong_size_mask.png" in data.problems[0]


def test_load_arrays_wrong_size_mask_strict(seg_scan, wrong_size_sample):
    samples = [seg_scan.samples[1], wrong_size_sample]
    with pytest.raises(DataError, match="wrong_size_mask.png"):
        load_arrays(samples, _seg_cfg(), num_classes=1, strict=True)
    with pytest.raises(DataError, match="wrong_size_mask.png"):
        load_arrays(samples, _seg_cfg(strict=True), num_classes=1)


def test_load_arrays_label_above_num_classes(seg_scan, tmp_path):
    good = seg_scan.samples[0]
    labels = np.zeros((SPEC.size, SPEC.size), np.uint8)
    labels[10:20, 10:20] = 5
    mask = _png(tmp_path / "labels5.png", labels)
    sample = Sample(id="x", image=good.image, target=str(mask), group="x")
    with pytest.raises(DataError, match="labels5.png"):
        load_arrays([sample], _seg_cfg(), num_classes=3, strict=True)
    data = load_arrays([sample], _seg_cfg(), num_classes=6)
    assert set(np.unique(data.targets)) == {0, 5}


def test_load_arrays_nothing_loadable(wrong_size_sample):
    with pytest.raises(DataError, match="wrong_size_mask.png"):
        load_arrays([wrong_size_sample], _seg_cfg(), num_classes=1)
    with pytest.raises(DataError):
        load_arrays([], _seg_cfg(), num_classes=1)


# ---------------------------------------------------------------------------------------------
# tf.data pipeline


def _batches(ds) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in ds]


def test_make_dataset_binary_segmentation(seg_data):
    ds = make_dataset(seg_data, task="segmentation", num_classes=1, batch_size=8)
    batches = _batches(ds)
    assert len(batches) == -(-N_SLICES // 8)
    x, y = batches[0]
    assert x.shape == (8, SIZE, SIZE, 3) and x.dtype == np.float32
    assert y.shape == (8, SIZE, SIZE, 1) and y.dtype == np.float32
    xs = np.concatenate([b[0] for b in batches])
    ys = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(xs, seg_data.images)  # no augmentation, in order
    np.testing.assert_array_equal(ys[..., 0], (seg_data.targets > 0).astype(np.float32))
    assert set(np.unique(ys)) == {0.0, 1.0}


def test_make_dataset_multiclass_one_hot():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, (5, 16, 16)).astype(np.uint8)
    images = rng.uniform(0, 1, (5, 16, 16, 3)).astype(np.float32)
    data = ArrayData(images, labels, samples=[])
    x, y = _batches(make_dataset(data, task="segmentation", num_classes=3, batch_size=5))[0]
    assert x.shape == (5, 16, 16, 3)
    assert y.shape == (5, 16, 16, 3) and y.dtype == np.float32
    np.testing.assert_array_equal(y.sum(axis=-1), 1.0)
    np.testing.assert_array_equal(y.argmax(axis=-1), labels)


def test_make_dataset_classification_one_hot(cls_data):
    batches = _batches(make_dataset(cls_data, task="classification", num_classes=4, batch_size=6))
    x, y = batches[0]
    assert x.shape == (6, SIZE, SIZE, 3)
    assert y.shape == (6, 4) and y.dtype == np.float32
    ys = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(ys.sum(axis=1), 1.0)
    np.testing.assert_array_equal(ys.argmax(axis=1), cls_data.targets)


def test_make_dataset_shuffle_is_a_permutation(seg_data):
    ds = make_dataset(seg_data, task="segmentation", num_classes=1, batch_size=8, shuffle=True)
    xs = np.concatenate([b[0] for b in _batches(ds)])
    assert xs.shape == seg_data.images.shape
    assert not np.array_equal(xs, seg_data.images)

    def sums(a: np.ndarray) -> list[float]:
        return sorted(a.reshape(len(a), -1).sum(axis=1).round(3).tolist())

    assert sums(xs) == sums(seg_data.images)


def test_build_augment_off():
    assert build_augment(AugmentConfig(enabled=False)) is None
    off = AugmentConfig(hflip=0, vflip=0, rotate90=0, affine=0, brightness_contrast=0, noise=0)
    assert build_augment(off) is None


def test_augment_flips_image_and_mask_together(seg_data):
    aug = build_augment(AugmentConfig(hflip=1.0, affine=0, brightness_contrast=0))
    assert aug is not None
    ds = make_dataset(seg_data, task="segmentation", num_classes=1, batch_size=8, augment=aug)
    batches = _batches(ds)
    xs = np.concatenate([b[0] for b in batches])
    ys = np.concatenate([b[1] for b in batches])[..., 0]
    np.testing.assert_allclose(xs, np.flip(seg_data.images, axis=2), atol=1e-6)
    np.testing.assert_array_equal(ys, np.flip(seg_data.targets > 0, axis=2).astype(np.float32))
    # The flip is not a no-op on this data.
    assert not np.allclose(xs, seg_data.images)
    assert not np.array_equal(ys, (seg_data.targets > 0).astype(np.float32))


def test_missing_sequence_copies_the_reference_channel():
    # Channels hold 0, 1, 2 everywhere; channel 1 (FLAIR) is the one that is always present.
    image = np.stack([np.full((6, 6), v, np.float32) for v in (0.0, 1.0, 2.0)], axis=-1)
    aug = build_augment(
        AugmentConfig(missing_sequence=1.0, hflip=0, affine=0, brightness_contrast=0), seed=0
    )
    assert isinstance(aug.transforms[0], MissingSequence)
    seen = set()
    for _ in range(60):
        out = aug(image=image, mask=np.ones((6, 6), np.uint8))
        np.testing.assert_array_equal(out["mask"], 1)  # image-only
        values = tuple(float(v) for v in out["image"][0, 0])
        assert values[1] == 1.0  # the reference is never touched
        assert values != (0.0, 1.0, 2.0)  # p=1: something is always replaced
        seen.add(values)
    # Each pattern of the real data: all channels FLAIR, or just one of the others.
    assert seen == {(1.0, 1.0, 1.0), (1.0, 1.0, 2.0), (0.0, 1.0, 1.0)}
    off = build_augment(AugmentConfig(hflip=1.0, affine=0, brightness_contrast=0))
    assert not any(isinstance(t, MissingSequence) for t in off.transforms)


def test_missing_sequence_one_channel_and_bad_reference():
    gray = np.random.default_rng(0).random((4, 4, 1), dtype=np.float32)
    np.testing.assert_array_equal(MissingSequence(reference=0, p=1.0)(image=gray)["image"], gray)
    with pytest.raises(ValueError, match="reference channel 3 of 3"):
        MissingSequence(reference=3, p=1.0)(image=np.zeros((4, 4, 3), np.float32))


def test_augment_classification_keeps_labels(cls_data):
    aug = build_augment(AugmentConfig(hflip=1.0, affine=0, brightness_contrast=0))
    ds = make_dataset(cls_data, task="classification", num_classes=4, batch_size=20, augment=aug)
    batches = _batches(ds)
    xs = np.concatenate([b[0] for b in batches])
    ys = np.concatenate([b[1] for b in batches])
    np.testing.assert_allclose(xs, np.flip(cls_data.images, axis=2), atol=1e-6)
    np.testing.assert_array_equal(ys.argmax(axis=1), cls_data.targets)
