"""Tests for medseg.models.fold: batch norm folded into the layer before it, by hand-made cases."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers  # noqa: E402

from medseg.models.fold import FoldedBatchNorm, fold_batch_norm  # noqa: E402


def _random_stats(bn: layers.BatchNormalization, rng: np.random.Generator) -> None:
    n = bn.moving_mean.shape[0]
    if bn.scale:
        bn.gamma.assign(rng.uniform(0.5, 2.0, n))
    if bn.center:
        bn.beta.assign(rng.normal(0, 1, n))
    bn.moving_mean.assign(rng.normal(0, 1, n))
    bn.moving_variance.assign(rng.uniform(0.1, 3.0, n))


def _model(producer: layers.Layer, shape=(8, 8, 3), **bn_kwargs) -> keras.Model:
    x = keras.Input(shape)
    y = layers.BatchNormalization(name="bn", epsilon=1e-3, **bn_kwargs)(producer(x))
    y = layers.Activation("relu")(y)
    model = keras.Model(x, y)
    rng = np.random.default_rng(0)
    for w in producer.weights:
        w.assign(rng.normal(0, 1, w.shape))
    _random_stats(model.get_layer("bn"), rng)
    return model


@pytest.mark.parametrize(
    "producer",
    [
        lambda: layers.Conv2D(5, 3, padding="same", use_bias=False, name="p"),
        lambda: layers.Conv2D(5, 3, padding="same", use_bias=True, name="p"),
        lambda: layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="p"),
        lambda: layers.Conv2DTranspose(4, 2, strides=2, use_bias=False, name="p"),
        lambda: layers.Dense(6, name="p"),
    ],
    ids=["conv", "conv_bias", "depthwise", "transpose", "dense"],
)
def test_folded_matches_inference_mode(producer):
    model = _model(producer())
    x = np.random.default_rng(1).normal(0, 1, (2, 8, 8, 3)).astype("float32")
    folded = fold_batch_norm(model)
    assert isinstance(folded.get_layer("bn"), FoldedBatchNorm)
    assert folded.get_layer("p").use_bias
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-4)


def test_fold_without_scale_and_center():
    model = _model(layers.Conv2D(4, 3, padding="same", name="p"), scale=False, center=False)
    x = np.random.default_rng(1).normal(0, 1, (2, 8, 8, 3)).astype("float32")
    folded = fold_batch_norm(model)
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-4)


def test_conv_read_twice_is_not_folded():
    """A conv whose output also feeds another layer keeps its batch norm (folding would change
    what the other reader sees)."""
    x = keras.Input((8, 8, 3))
    c = layers.Conv2D(4, 3, padding="same", name="p")(x)
    y = layers.Add()([layers.BatchNormalization(name="bn")(c), c])
    model = keras.Model(x, y)
    assert fold_batch_norm(model) is model


def test_conv_with_activation_is_not_folded():
    model = _model(layers.Conv2D(4, 3, padding="same", activation="relu", name="p"))
    assert fold_batch_norm(model) is model


def test_folded_model_saves_and_reloads(tmp_path):
    model = _model(layers.Conv2D(4, 3, padding="same", name="p"))
    folded = fold_batch_norm(model)
    folded.save(tmp_path / "f.keras")
    again = keras.models.load_model(tmp_path / "f.keras")
    x = np.ones((1, 8, 8, 3), "float32")
    np.testing.assert_allclose(again.predict(x, verbose=0), folded.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize(
    "producer",
    [
        lambda: layers.Conv3D(5, 3, padding="same", use_bias=False, name="p"),
        lambda: layers.Conv3D(5, 3, padding="same", use_bias=True, name="p"),
        lambda: layers.Conv3DTranspose(4, 2, strides=2, use_bias=False, name="p"),
    ],
    ids=["conv3d", "conv3d_bias", "transpose3d"],
)
def test_folded_3d_matches_inference_mode(producer):
    model = _model(producer(), shape=(6, 6, 6, 3))
    x = np.random.default_rng(1).normal(0, 1, (2, 6, 6, 6, 3)).astype("float32")
    folded = fold_batch_norm(model)
    assert isinstance(folded.get_layer("bn"), FoldedBatchNorm)
    assert folded.get_layer("p").use_bias
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-4)


def test_unet3d_batch_norms_all_fold():
    """Every batch norm of a (tiny) 3D U-Net follows a Conv3D and is folded; same outputs."""
    from medseg.models.unet3d import build_unet3d

    model = build_unet3d(1, 3, base_filters=4, depth=2)
    rng = np.random.default_rng(0)
    bns = [la for la in model.layers if isinstance(la, layers.BatchNormalization)]
    for bn in bns:
        _random_stats(bn, rng)
    folded = fold_batch_norm(model)
    assert not [la for la in folded.layers if isinstance(la, layers.BatchNormalization)]
    assert sum(isinstance(la, FoldedBatchNorm) for la in folded.layers) == len(bns) == 10
    x = rng.normal(0, 1, (1, 8, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(folded(x, training=False), model(x, training=False), atol=1e-5)
