"""Sliding-window inference: the Gaussian map, MONAI's window placement, exact agreement with a
single forward pass, mirror TTA and padding, checked against references computed here in NumPy."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg.errors import ConfigError
from medseg.inference.sliding_window import (
    gaussian_importance,
    mirror_flips,
    sliding_window_inference,
    window_grid,
    window_grid_graph,
    window_starts,
    window_starts_graph,
)

PATCH = (16, 16, 16)


def _conv_model(channels: int = 1, classes: int = 3) -> keras.Model:
    """A tiny fully convolutional 3D softmax model (any input size; not flip-equivariant)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((None, None, None, channels))
    x = keras.layers.Conv3D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv3D(classes, 3, padding="same")(x)
    return keras.Model(inputs, keras.layers.Softmax()(x))


def _pointwise(x: tf.Tensor) -> tf.Tensor:
    """A voxel-wise (so flip- and shift-equivariant) 2-class softmax of a 1-channel input."""
    return tf.nn.softmax(tf.concat([x, -0.5 * x], axis=-1))


def _volume(shape, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(1, *shape, channels)).astype(np.float32)


# ------------------------------------------------------------------ Gaussian importance


def test_gaussian_importance_shape_max_and_positivity():
    g = gaussian_importance((16, 12, 9))
    assert g.shape == (16, 12, 9) and g.dtype == np.float32
    assert g.max() == pytest.approx(1.0)
    assert (g > 0).all()
    # centred: symmetric along every axis, largest in the middle, smallest in a corner
    for axis in range(3):
        np.testing.assert_allclose(g, np.flip(g, axis), rtol=1e-6)
    assert g[8, 6, 4] == g.max() and g[0, 0, 0] == g.min()


def test_gaussian_zeros_are_replaced_by_the_smallest_nonzero_value():
    g = gaussian_importance((32, 32, 32), sigma_scale=0.01)  # the corners underflow to 0
    assert (g > 0).all()
    assert g.min() == np.unique(g)[0] and g.max() == pytest.approx(1.0)


# ------------------------------------------------------------------ window placement


@pytest.mark.parametrize(
    ("size", "patch", "overlap", "expected"),
    [
        # MONAI: interval int(64 * 0.5) = 32; windows until d*32 + 64 >= size; the last moved
        # back so that it ends at the border.
        (128, 64, 0.5, [0, 32, 64]),
        (100, 64, 0.5, [0, 32, 36]),
        (50, 24, 0.25, [0, 18, 26]),  # interval int(24 * 0.75) = 18
        (64, 64, 0.5, [0]),  # the volume is the window
        (40, 64, 0.5, [0]),  # smaller than the window: padded to it
        (20, 16, 0.0, [0, 4]),  # no overlap: the last window still ends at the border
    ],
)
def test_window_starts_match_monai(size, patch, overlap, expected):
    assert window_starts(size, patch, overlap).tolist() == expected
    got = window_starts_graph(tf.constant(size), patch, overlap).numpy().tolist()
    assert got == expected


def test_window_count_of_the_bench_work_is_monais():
    """128^3 volume, 64^3 windows, overlap 0.5: 27 windows, as MONAI's."""
    grid = window_grid((128, 128, 128), (64, 64, 64), 0.5)
    assert grid.shape == (27, 3)
    graph = window_grid_graph(tf.constant([128, 128, 128]), (64, 64, 64), 0.5).numpy()
    np.testing.assert_array_equal(graph, grid)


def test_windows_cover_the_volume_and_stay_inside():
    for size in range(16, 60, 7):
        starts = window_starts(size, 16, 0.5)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s : s + 16] = True
        assert covered.all() and starts.max() + 16 == size


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="overlap"):
        window_starts(32, 16, 1.0)
    with pytest.raises(ConfigError, match="patch_size"):
        gaussian_importance((16, 16))
    with pytest.raises(ConfigError, match="sw_batch"):
        sliding_window_inference(_volume(PATCH), _pointwise, PATCH, sw_batch=0, num_classes=2)


# ------------------------------------------------------------------ agreement with one pass


def test_one_window_is_exactly_a_single_forward_pass():
    model = _conv_model()
    x = _volume(PATCH)
    single = model(x, training=False).numpy()
    uniform = sliding_window_inference(x, model, PATCH, gaussian=False, num_classes=3).numpy()
    np.testing.assert_array_equal(uniform, single)
    weighted = sliding_window_inference(x, model, PATCH, gaussian=True, num_classes=3).numpy()
    np.testing.assert_allclose(weighted, single, rtol=0, atol=1e-6)


def test_a_volume_smaller_than_the_window_is_padded_and_cropped_back():
    model = _conv_model()
    x = _volume((10, 16, 5))
    out = sliding_window_inference(x, model, PATCH, gaussian=False, num_classes=3).numpy()
    assert out.shape == (1, 10, 16, 5, 3)
    padded = np.pad(x, [(0, 0), (3, 3), (0, 0), (5, 6), (0, 0)])  # half before, half after
    want = model(padded, training=False).numpy()[:, 3:13, :, 5:10]
    np.testing.assert_array_equal(out, want)


def _reference(x: np.ndarray, fn, patch, overlap: float, gaussian: bool) -> np.ndarray:
    """A plain NumPy sliding window (slices, weighted sum, division) to check against."""
    _, d, h, w, _ = x.shape
    weight = gaussian_importance(patch) if gaussian else np.ones(patch, np.float32)
    total = weights = None
    for z, y, c in itertools.product(
        *(window_starts(s, p, overlap) for s, p in zip((d, h, w), patch, strict=True))
    ):
        win = x[:, z : z + patch[0], y : y + patch[1], c : c + patch[2]]
        p = np.asarray(fn(tf.constant(win)))[0].astype(np.float64)
        if total is None:
            total = np.zeros((d, h, w, p.shape[-1]))
            weights = np.zeros((d, h, w, 1))
        total[z : z + patch[0], y : y + patch[1], c : c + patch[2]] += p * weight[..., None]
        weights[z : z + patch[0], y : y + patch[1], c : c + patch[2]] += weight[..., None]
    return (total / weights)[None]


@pytest.mark.parametrize("gaussian", [True, False])
def test_many_windows_match_a_numpy_reference(gaussian):
    """Windows that each see a different part of the volume, weighted and averaged; sw_batch 3
    does not divide the 3 x 2 x 2 windows, so the last model call is a partial batch."""
    model = _conv_model()
    x = _volume((27, 20, 19))
    got = sliding_window_inference(
        x, model, PATCH, overlap=0.5, sw_batch=5, gaussian=gaussian, num_classes=3
    ).numpy()
    want = _reference(x, model, PATCH, 0.5, gaussian)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_inside_a_tf_function_with_a_dynamic_shape():
    fn = tf.function(
        lambda v: sliding_window_inference(v, _pointwise, PATCH, 0.5, 2, True, num_classes=2),
        input_signature=[tf.TensorSpec([1, None, None, None, 1], tf.float32)],
    )
    for shape in [(23, 17, 30), (9, 40, 16)]:
        x = _volume(shape, seed=len(shape))
        # a voxel-wise function gives the same value in every window: the weighted mean is it
        np.testing.assert_allclose(fn(x).numpy(), _pointwise(x).numpy(), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ mirror TTA


def test_mirror_tta_of_a_flip_equivariant_function_changes_nothing():
    x = _volume((20, 18, 16))
    plain = sliding_window_inference(x, _pointwise, PATCH, mirror=False, num_classes=2).numpy()
    tta = sliding_window_inference(x, _pointwise, PATCH, mirror=True, num_classes=2).numpy()
    np.testing.assert_allclose(tta, plain, rtol=0, atol=1e-6)


def test_mirror_tta_is_the_mean_over_the_eight_flips():
    model = _conv_model()
    x = _volume(PATCH, seed=3)
    got = sliding_window_inference(
        x, model, PATCH, gaussian=False, mirror=True, num_classes=3
    ).numpy()
    flips = [list(a) for n in range(4) for a in itertools.combinations((1, 2, 3), n)]
    views = [np.flip(model(np.flip(x, f).copy(), training=False).numpy(), f) for f in flips]
    np.testing.assert_allclose(got, np.mean(views, axis=0), rtol=0, atol=1e-6)
    plain = model(x, training=False).numpy()
    assert np.abs(got - plain).max() > 1e-3  # the model is not flip-equivariant: TTA matters


def test_mirror_tta_over_some_axes_is_the_mean_over_their_flips():
    model = _conv_model()
    x = _volume(PATCH, seed=4)
    got = sliding_window_inference(
        x, model, PATCH, gaussian=False, mirror=[2, 0], num_classes=3
    ).numpy()
    flips = [[], [1], [3], [1, 3]]  # tensor axes of spatial axes 0 and 2
    views = [np.flip(model(np.flip(x, f).copy(), training=False).numpy(), f) for f in flips]
    np.testing.assert_allclose(got, np.mean(views, axis=0), rtol=0, atol=1e-6)
    none = sliding_window_inference(x, model, PATCH, gaussian=False, mirror=[], num_classes=3)
    np.testing.assert_allclose(none.numpy(), model(x, training=False).numpy(), atol=1e-6)


def test_mirror_flips():
    assert len(mirror_flips(True)) == 8 and mirror_flips(False) == [[]]
    assert mirror_flips([1]) == [[], [2]] and mirror_flips((2, 2)) == [[], [3]]
    with pytest.raises(ConfigError, match="spatial axes"):
        mirror_flips([3])
