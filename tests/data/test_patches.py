"""3D patch sampling, patch augmentation and the tf.data pipeline, on synthetic volumes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medseg.config.sections import AugmentConfig
from medseg.data.augment3d import augment_patch, sampling_shape
from medseg.data.patches import PatchSampler, patch_dataset
from medseg.errors import ConfigError, DataError

NO_AUGMENT = AugmentConfig(enabled=False)
#: Every spatial transform on every patch, no intensity change.
SPATIAL = AugmentConfig(
    hflip=0.5,
    vflip=0.5,
    dflip=0.5,
    affine=1.0,
    rotate_limit=20,
    scale_limit=0.15,
    elastic=1.0,
    brightness_contrast=0.0,
    gamma=0.0,
    noise=0.0,
)


def two_ellipsoids(shape=(24, 28, 32)) -> np.ndarray:
    """Labels 1 and 2: two ellipsoids side by side along the column axis."""
    grid = np.indices(shape, dtype=np.float64).transpose(1, 2, 3, 0)
    labels = np.zeros(shape, dtype=np.uint8)
    d, h, w = shape
    for value, centre in ((1, (d / 2, h / 2, w * 0.3)), (2, (d / 2, h / 2, w * 0.7))):
        radii = np.array([d / 3, h / 3, w / 5])
        labels[(((grid - centre) / radii) ** 2).sum(-1) < 1] = value
    return labels


def coded(labels: np.ndarray) -> np.ndarray:
    """An image whose intensities are its label values (one channel)."""
    return labels[..., None].astype(np.float32)


def one_hot(labels: np.ndarray, classes: int = 3) -> np.ndarray:
    """An image with one channel per class (1 inside it): after any interpolation, its arg-max
    is the label map, up to a voxel's rounding along the edges, if the two stayed aligned."""
    return np.eye(classes, dtype=np.float32)[labels]


def test_sampler_shapes_and_content():
    labels = two_ellipsoids()
    image = np.concatenate([coded(labels), -coded(labels)], axis=-1)
    sampler = PatchSampler([image, image[:20]], [labels, labels[:20]], (16, 12, 8), 3, seed=1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        patch, patch_labels = sampler.sample(rng)
        assert patch.shape == (16, 12, 8, 2) and patch.dtype == np.float32
        assert patch_labels.shape == (16, 12, 8) and patch_labels.dtype == np.uint8
        np.testing.assert_array_equal(patch[..., 0], patch_labels)  # image and labels aligned
        np.testing.assert_array_equal(patch[..., 1], -patch[..., 0])


def test_sampler_pads_small_volumes():
    labels = np.ones((5, 9, 5), dtype=np.uint8)
    sampler = PatchSampler([coded(labels) + 1], [labels], (8, 8, 8), 2, foreground_share=0.5)
    rng = np.random.default_rng(0)
    for _ in range(10):
        patch, patch_labels = sampler.sample(rng)
        assert patch.shape == (8, 8, 8, 1) and patch_labels.shape == (8, 8, 8)
        assert patch_labels.sum() == 5 * 8 * 5  # all of D and W, 8 of the 9 rows
        np.testing.assert_array_equal(patch[..., 0] > 0, patch_labels == 1)  # padding is 0
        assert patch_labels[0].sum() == 0 and patch_labels[1].sum() == 40  # padded on both sides


def test_sampler_context_is_centred_on_the_patch():
    labels = two_ellipsoids()
    sampler = PatchSampler([coded(labels)], [labels], (8, 8, 8), 3, context_size=(12, 16, 8))
    patch, patch_labels = sampler.sample(np.random.default_rng(3))
    assert patch.shape == (12, 16, 8, 1) and patch_labels.shape == (12, 16, 8)
    np.testing.assert_array_equal(patch[..., 0], patch_labels)
    with pytest.raises(ConfigError, match="context size"):
        PatchSampler([coded(labels)], [labels], (8, 8, 8), 3, context_size=(4, 8, 8))


def _foreground_rate(share: float, draws: int = 600) -> tuple[float, dict[int, int]]:
    """Share of patches (8^3 of a 48^3 volume) holding a 2^3 foreground block, and how often
    each of the two classes (blocks far apart) was in a patch."""
    labels = np.zeros((48, 48, 48), dtype=np.uint8)
    labels[10:12, 10:12, 10:12] = 1
    labels[36:38, 36:38, 36:38] = 2
    sampler = PatchSampler([coded(labels)], [labels], (8, 8, 8), 3, foreground_share=share)
    rng = np.random.default_rng(7)
    hits, per_class = 0, {1: 0, 2: 0}
    for _ in range(draws):
        found = set(np.unique(sampler.sample(rng)[1])) - {0}
        hits += bool(found)
        for k in found:
            per_class[k] += 1
    return hits / draws, per_class


def test_foreground_share_is_close_to_the_configured_one():
    # a random 8^3 patch holds a given block with probability (7/41)^3 ~ 0.5%
    rate, _ = _foreground_rate(0.33)
    assert abs(rate - 0.33) < 0.06  # 3 standard deviations of 600 draws
    assert _foreground_rate(0.0)[0] < 0.03
    rate, per_class = _foreground_rate(1.0)
    assert rate == 1.0  # the chosen voxel always stays inside the patch
    assert 0.4 < per_class[1] / 600 < 0.6 and 0.4 < per_class[2] / 600 < 0.6


def test_sampler_rejects_mismatched_cases():
    labels = two_ellipsoids()
    with pytest.raises(DataError, match="case 0"):
        PatchSampler([coded(labels)[:-1]], [labels], (8, 8, 8), 3)
    with pytest.raises(DataError, match="case 0: labels"):
        PatchSampler([coded(labels)], [labels * 2], (8, 8, 8), 3)
    with pytest.raises(DataError, match="case 1"):
        PatchSampler(
            [coded(labels), labels[..., None].repeat(2, -1)], [labels, labels], (8,) * 3, 3
        )


@pytest.mark.parametrize("order", [1, 3])
def test_augmentation_keeps_image_and_labels_aligned(order):
    labels = two_ellipsoids((28, 28, 28))
    rng = np.random.default_rng(11)
    changed = 0
    for _ in range(6):
        image, out = augment_patch(one_hot(labels), labels, SPATIAL, rng, (20, 20, 20), order)
        assert image.shape == (20, 20, 20, 3) and image.dtype == np.float32
        assert out.shape == (20, 20, 20) and out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 1, 2}
        assert (image.argmax(-1) == out).mean() > 0.97
        changed += not np.array_equal(out, labels[4:24, 4:24, 4:24])
    assert changed == 6  # every patch was rotated / deformed


def test_flips_alone_are_exact_and_disabled_is_identity():
    labels = two_ellipsoids((8, 10, 12))
    image = coded(labels)
    flips = AugmentConfig(hflip=1.0, vflip=0.0, dflip=1.0, affine=0.0, elastic=0.0, gamma=0.0)
    out_image, out = augment_patch(image, labels, flips, np.random.default_rng(0))
    np.testing.assert_array_equal(out, labels[::-1, :, ::-1])
    np.testing.assert_array_equal(out_image[..., 0], out)
    same_image, same = augment_patch(image, labels, NO_AUGMENT, np.random.default_rng(0), (6, 6, 6))
    np.testing.assert_array_equal(same, labels[1:7, 2:8, 3:9])
    np.testing.assert_array_equal(same_image, image[1:7, 2:8, 3:9])


def test_intensity_augmentation_leaves_labels_alone():
    labels = two_ellipsoids((12, 12, 12))
    image = np.random.default_rng(0).normal(size=(12, 12, 12, 2)).astype(np.float32)
    gamma = AugmentConfig(hflip=0.0, affine=0.0, gamma=1.0, noise=0.0)
    out_image, out = augment_patch(image, labels, gamma, np.random.default_rng(1))
    np.testing.assert_array_equal(out, labels)
    assert not np.allclose(out_image, image)
    np.testing.assert_allclose(out_image.min((0, 1, 2)), image.min((0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(out_image.max((0, 1, 2)), image.max((0, 1, 2)), atol=1e-5)
    noise = dataclasses.replace(gamma, gamma=0.0, noise=1.0)
    noisy, _ = augment_patch(image, labels, noise, np.random.default_rng(1))
    assert 0 < np.abs(noisy - image).std() < 0.4
    again, _ = augment_patch(image, labels, noise, np.random.default_rng(1))
    np.testing.assert_array_equal(again, noisy)


def test_sampling_shape_leaves_room_for_rotation():
    assert sampling_shape((16, 24, 32), NO_AUGMENT) == (16, 24, 32)
    assert sampling_shape((16, 24, 32), AugmentConfig(affine=0.0)) == (16, 24, 32)
    shape = sampling_shape((16, 24, 32), SPATIAL)
    assert all(p < s <= 2 * p for s, p in zip(shape, (16, 24, 32), strict=True))


def _batches(seed: int, deep_supervision: bool = False, count: int = 2) -> list:
    labels = two_ellipsoids((20, 20, 24))
    image = one_hot(labels)[..., 1:]
    data = patch_dataset(
        [image, image[:14]],
        [labels, labels[:14]],
        (16, 16, 16),
        3,
        2,
        SPATIAL,
        0.5,
        seed=seed,
        deep_supervision=deep_supervision,
    )
    return data, list(data.take(count).as_numpy_iterator())


def test_patch_dataset_shapes_and_reproducibility():
    data, batches = _batches(seed=5)
    x_spec, y_spec = data.element_spec
    assert tuple(x_spec.shape) == (2, 16, 16, 16, 2) and x_spec.dtype.name == "float32"
    assert tuple(y_spec.shape) == (2, 16, 16, 16, 3) and y_spec.dtype.name == "float32"
    for x, y in batches:
        assert x.shape == (2, 16, 16, 16, 2) and y.shape == (2, 16, 16, 16, 3)
        np.testing.assert_array_equal(y.sum(-1), 1)  # one-hot
        background = np.full(x.shape[:-1] + (1,), 0.5)  # a class channel above 1/2 wins
        aligned = np.concatenate([background, x], -1).argmax(-1) == y.argmax(-1)
        assert aligned.mean() > 0.95
    _, again = _batches(seed=5)
    for (x, y), (x2, y2) in zip(batches, again, strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    _, other = _batches(seed=6)
    assert not np.array_equal(batches[0][0], other[0][0])


def test_patch_dataset_deep_supervision():
    data, batches = _batches(seed=1, deep_supervision=True, count=1)
    x, (full, half, quarter) = batches[0]
    assert [tuple(s.shape) for s in data.element_spec[1]] == [
        (2, 16, 16, 16, 3),
        (2, 8, 8, 8, 3),
        (2, 4, 4, 4, 3),
    ]
    assert x.shape == (2, 16, 16, 16, 2)
    np.testing.assert_array_equal(half, full[:, ::2, ::2, ::2])
    np.testing.assert_array_equal(quarter, full[:, ::4, ::4, ::4])
    labels = two_ellipsoids()
    with pytest.raises(ConfigError, match="divisible by 4"):
        patch_dataset(
            [coded(labels)], [labels], (16, 16, 18), 3, 2, NO_AUGMENT, 0.5, deep_supervision=True
        )
    with pytest.raises(ConfigError, match="patch_size"):
        patch_dataset([coded(labels)], [labels], (16, 16), 3, 2, NO_AUGMENT, 0.5)
