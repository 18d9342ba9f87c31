"""Pipeline features: lazy decoding, tumour oversampling, class weights, augmentation kinds."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.config import AugmentConfig, DataConfig
from medseg.data.augment import apply_augment, build_augment
from medseg.data.pipeline import (
    ArrayData,
    class_weights,
    load_arrays,
    load_data,
    load_samples,
    make_dataset,
    open_lazy,
)
from medseg.data.samples import Sample
from medseg.data.scan import scan_dataset
from medseg.errors import ConfigError


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), layout="lgg", image_size=[32, 32], **kw)


@pytest.fixture(scope="module")
def seg_samples(tiny_synth):
    return scan_dataset(tiny_synth / "segmentation", "lgg").samples


def test_lazy_data_gives_the_same_arrays_as_the_cache(tiny_synth, seg_samples):
    cfg = _cfg(tiny_synth / "segmentation")
    cached = load_arrays(seg_samples[:6], cfg, 1)
    lazy = open_lazy(seg_samples[:6], cfg, 1)
    assert len(lazy) == 6 and lazy.shape == (32, 32, 3)
    for i in range(6):
        x, y = lazy.fetch(i)
        np.testing.assert_allclose(x, cached.images[i], atol=1e-6)
        np.testing.assert_array_equal(y, cached.targets[i])
    batches = list(make_dataset(lazy, task="segmentation", num_classes=1, batch_size=4))
    assert [b[0].shape[0] for b in batches] == [4, 2]
    assert isinstance(load_data(seg_samples[:2], _cfg(tiny_synth, cache=False), 1), type(lazy))


def test_oversampling_draws_the_requested_share_of_tumour_slices():
    rng = np.random.default_rng(0)
    targets = np.zeros((100, 8, 8), np.uint8)
    targets[:10, 2:4, 2:4] = 1  # 10% of slices have tumour
    data = ArrayData(rng.uniform(0, 1, (100, 8, 8, 1)).astype(np.float32), targets, samples=[])
    ds = make_dataset(
        data, task="segmentation", num_classes=1, batch_size=50, shuffle=True, oversample_tumour=0.5
    )
    share = []
    for _ in range(4):  # four epochs of 100 draws each
        ys = np.concatenate([y.numpy() for _, y in ds])
        assert len(ys) == 100
        share.append(ys.reshape(100, -1).max(axis=1).mean())
    assert 0.38 < np.mean(share) < 0.62  # ~0.5 instead of the data's 0.1
    plain = make_dataset(data, task="segmentation", num_classes=1, batch_size=100, shuffle=True)
    ys = np.concatenate([y.numpy() for _, y in plain])
    assert ys.reshape(100, -1).max(axis=1).mean() == pytest.approx(0.1)


def test_oversampling_needs_the_cache(tiny_synth, seg_samples):
    lazy = open_lazy(seg_samples[:4], _cfg(tiny_synth / "segmentation"), 1)
    with pytest.raises(ConfigError, match="data.cache"):
        make_dataset(lazy, task="segmentation", num_classes=1, batch_size=2, oversample_tumour=0.3)


def test_class_weights_are_inverse_frequency():
    targets = np.array([0] * 60 + [1] * 30 + [2] * 10)
    w = class_weights(targets, 4)
    assert w[0] == pytest.approx(100 / (3 * 60)) and w[2] == pytest.approx(100 / (3 * 10))
    assert w[3] == 1.0  # absent class
    assert w[2] > w[1] > w[0]


@pytest.mark.parametrize("kind", ["elastic", "grid_distortion", "affine"])
def test_geometric_augmentation_moves_image_and_mask_together(kind):
    size = 64
    yy, xx = np.mgrid[:size, :size]
    mask = (((yy - 20) ** 2 + (xx - 40) ** 2) < 100).astype(np.uint8) * 2  # label 2 disc
    image = np.repeat((mask > 0)[..., None], 3, axis=-1).astype(np.float32)
    cfg = AugmentConfig(**{"hflip": 0, "affine": 0, "brightness_contrast": 0, kind: 1.0})
    aug = build_augment(cfg, seed=1)
    moved = 0
    for _ in range(5):
        x, m = apply_augment(aug, image, mask)
        assert set(np.unique(m)) <= {0, 2}  # nearest interpolation keeps labels
        bright = x[..., 0] > 0.5
        agree = np.sum(bright == (m > 0)) / bright.size
        assert agree > 0.97
        moved += np.any(m != mask)
    assert moved >= 3


def test_intensity_augmentation_leaves_the_mask_alone():
    cfg = AugmentConfig(hflip=0, affine=0, brightness_contrast=1, gamma=1, noise=1)
    aug = build_augment(cfg, seed=0)
    image = np.random.default_rng(0).uniform(0.2, 0.8, (32, 32, 3)).astype(np.float32)
    mask = np.eye(32, dtype=np.uint8)
    x, m = apply_augment(aug, image, mask)
    np.testing.assert_array_equal(m, mask)
    assert not np.allclose(x, image)


def test_augmentation_off_builds_nothing():
    assert build_augment(AugmentConfig(enabled=False)) is None
    zero = AugmentConfig(hflip=0, affine=0, brightness_contrast=0)
    assert build_augment(zero) is None


def test_volume_slices_load_once_per_volume_and_match_the_reader(tmp_path, monkeypatch):
    import nibabel as nib

    import medseg.data.pipeline as pipeline
    from medseg.io import read_image, read_mask

    rng = np.random.default_rng(0)
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    for case in ("case_a", "case_b"):
        vol = rng.uniform(0, 500, (20, 24, 5)).astype(np.float32)
        lab = np.zeros((20, 24, 5), np.uint8)
        lab[5:9, 6:12, 2] = 1
        nib.save(
            nib.Nifti1Image(vol, np.diag([1.0, 1.0, 3.0, 1.0])),
            tmp_path / "images" / f"{case}.nii.gz",
        )
        nib.save(
            nib.Nifti1Image(lab, np.diag([1.0, 1.0, 3.0, 1.0])),
            tmp_path / "labels" / f"{case}.nii.gz",
        )
    samples = scan_dataset(tmp_path, "nifti").samples
    assert len(samples) == 10 and {s.group for s in samples} == {"case_a", "case_b"}

    reads = []
    original = pipeline.read_image
    monkeypatch.setattr(
        pipeline, "read_image", lambda p, **kw: reads.append(p) or original(p, **kw)
    )
    cfg = DataConfig(
        root=str(tmp_path), layout="nifti", image_size=[24, 20], channels=1, normalization="none"
    )
    data = load_arrays(samples, cfg, 1)
    assert len(reads) == 2  # one read per volume, not per slice
    assert data.images.shape == (10, 24, 20, 1)
    s = data.samples[3]
    volume = read_image(s.image).array
    np.testing.assert_allclose(data.images[3], volume[s.index], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(data.targets[3], read_mask(s.target)[s.index])
    assert sum(t.any() for t in data.targets) == 2  # the labelled slice of each case


def test_training_refuses_a_4d_nifti_whose_volumes_are_not_the_models_channels(tmp_path):
    # three volumes along the 4th dimension (e.g. DWI b-values) are not an RGB image
    import nibabel as nib

    from medseg.errors import DataError

    image = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 4, 3), np.float32), np.eye(4)), image)
    sample = Sample(id="dwi#1", image=str(image), target=0, group="a", index=1)
    cfg = DataConfig(root=str(tmp_path), task="classification", image_size=[16, 16], channels=3)
    with pytest.raises(DataError, match=r"dwi\.nii\.gz: 4D volume of shape \(16, 16, 4, 3\)"):
        load_samples([sample], cfg, 2)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_reslice_round_trips_and_keeps_superior_up(axis):
    from medseg.data.volumes import reslice, unreslice

    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # (slice inferior->superior, row, col)
    cut = reslice(vol, axis)
    assert cut.shape[0] == vol.shape[axis]
    np.testing.assert_array_equal(unreslice(cut, axis), vol)
    if axis:
        # The top row of a coronal/sagittal slice is the most superior axial slice.
        top = cut[0, 0]
        expected = vol[-1, 0, :] if axis == 1 else vol[-1, :, 0]
        np.testing.assert_array_equal(top, expected)


def test_coronal_slices_of_a_nifti_dataset(tmp_path):
    import nibabel as nib

    from medseg.data.volumes import reslice
    from medseg.io import read_image

    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    vol = np.random.default_rng(1).uniform(0, 1, (12, 10, 6)).astype(np.float32)
    lab = (vol > 0.9).astype(np.uint8)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "images" / "c1.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "labels" / "c1.nii.gz")
    cfg = DataConfig(
        root=str(tmp_path),
        layout="nifti",
        slice_axis=1,
        image_size=[6, 12],
        channels=1,
        normalization="none",
    )
    samples = scan_dataset(tmp_path, "nifti", slice_axis=1).samples
    assert len(samples) == 10  # canonical j (anterior-posterior) has 10 voxels
    data = load_arrays(samples, cfg, 1)
    coronal = reslice(read_image(tmp_path / "images" / "c1.nii.gz").array, 1)
    np.testing.assert_allclose(data.images[4], coronal[samples[4].index], atol=1e-5)


def test_prefetch_to_device_keeps_the_batches():
    """On this CPU-only machine no GPU is visible: the dataset is unchanged; prefetching to an
    explicit device (the CPU here, a GPU in training) yields the same batches."""
    import tensorflow as tf

    from medseg.data.pipeline import prefetch_to_device

    ds = tf.data.Dataset.range(10).batch(3)
    if not tf.config.list_logical_devices("GPU"):
        assert prefetch_to_device(ds) is ds
    moved = prefetch_to_device(ds, "/cpu:0")
    assert moved is not ds
    assert [b.numpy().tolist() for b in moved] == [b.numpy().tolist() for b in ds]
