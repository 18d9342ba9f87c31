"""Training a U-Net on random patches (``train.patch_size``) and scoring it on whole images."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.config import AugmentConfig, load_config
from medseg.data.augment import apply_augment, build_augment
from medseg.data.pipeline import ArrayData, make_dataset
from medseg.errors import ConfigError


def test_the_crop_ends_the_pipeline_and_cuts_image_and_mask_alike():
    size, patch = 64, (32, 48)
    rng = np.random.default_rng(0)
    mask = (rng.random((size, size)) > 0.7).astype(np.uint8)
    image = np.repeat(mask[..., None], 3, axis=-1).astype(np.float32)
    cfg = AugmentConfig(hflip=0.5, vflip=0.5, affine=0, brightness_contrast=0)
    aug = build_augment(cfg, seed=3, patch_size=patch)
    offsets = set()
    for _ in range(8):
        x, m = apply_augment(aug, image, mask)
        assert x.shape == (*patch, 3) and m.shape == patch
        # the image's bright pixels are the mask's foreground: both were cropped in one place
        np.testing.assert_array_equal(x[..., 0] > 0.5, m > 0)
        offsets.add(m.tobytes())
    assert len(offsets) > 1  # a random crop, not a fixed one


def test_the_crop_stays_when_augmentation_is_off():
    off = AugmentConfig(enabled=False)
    assert build_augment(off) is None
    aug = build_augment(off, patch_size=[16, 16])
    image = np.arange(32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3)
    x, m = apply_augment(aug, image, np.zeros((32, 32), np.uint8))
    assert x.shape == (16, 16, 3) and m.shape == (16, 16)
    # a crop moves no pixel: the patch is a window of the image
    top, left = np.argwhere(image[..., 0] == x[0, 0, 0])[0]
    np.testing.assert_array_equal(x, image[top : top + 16, left : left + 16])


def test_the_dataset_yields_patches_and_refuses_a_patch_size_without_a_crop():
    rng = np.random.default_rng(1)
    data = ArrayData(
        rng.random((10, 32, 32, 3)).astype(np.float32),
        (rng.random((10, 32, 32)) > 0.5).astype(np.uint8),
        samples=[None] * 10,
    )
    aug = build_augment(AugmentConfig(enabled=False), patch_size=[16, 24])
    ds = make_dataset(
        data, task="segmentation", num_classes=1, batch_size=4, augment=aug, patch_size=[16, 24]
    )
    assert ds.element_spec[0].shape.as_list() == [None, 16, 24, 3]
    x, y = next(iter(ds))
    assert x.shape == (4, 16, 24, 3) and y.shape == (4, 16, 24, 1)
    with pytest.raises(ConfigError, match="patch_size"):
        make_dataset(data, task="segmentation", num_classes=1, batch_size=4, patch_size=[16, 16])


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["train.patch_size=[256,64]"], "at most data.image_size"),
        (["train.patch_size=[64]"], r"expected \[height, width\]"),
        (["train.patch_size=[72,72]"], "divisible by 2\\*\\*model.depth = 16"),
        (["train.patch_size=[64,64]", "model.name=mobilenetv2_unet"], "model.name 'unet'"),
    ],
)
def test_bad_patch_sizes_are_config_errors(overrides, problem):
    with pytest.raises(ConfigError, match=f"train.patch_size.*{problem}"):
        load_config(None, ["data.image_size=[128,128]", *overrides])


@pytest.mark.slow
def test_a_unet_trained_on_patches_is_scored_saved_and_exported_on_whole_images(
    tiny_synth, tmp_path
):
    import keras

    from medseg.inference.export import export_run
    from medseg.training.train import train

    cfg = load_config(
        None,
        [
            f"data.root={tiny_synth / 'segmentation'}",
            "data.image_size=[32,32]",
            "model.base_filters=4",
            "model.depth=2",
            "train.batch_size=8",
            "train.warmup_epochs=0",
            "train.epochs=2",
            "augment.enabled=false",
            "train.patch_size=[16,16]",
            f"run.root={tmp_path}",
            "run.name=patches",
        ],
    )
    result = train(cfg)
    run = result.run.path
    # the run validated and evaluated its model on the split's whole 32x32 images (the only
    # size they have: a U-Net fixed to the 16x16 patches would have failed there)
    assert result.metrics["n_images"] > 0
    model = keras.models.load_model(run / "checkpoints" / "best.keras")
    assert model.input_shape == (None, None, None, 3)
    whole = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    assert model.predict(whole, verbose=0).shape == (2, 32, 32, 1)
    out = export_run(run, tmp_path / "export")
    # export_run reloads the SavedModel and checks it against the Keras model on whole images
    assert (out / "saved_model" / "saved_model.pb").exists()
