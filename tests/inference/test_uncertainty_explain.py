"""Tests for MC-dropout uncertainty and Grad-CAM (medseg.inference.uncertainty / .explain).

Models are tiny and untrained. Their batch norm is built with momentum 0 and run once in training
mode, so the moving statistics are those of a real batch: an untrained network with the default
statistics (mean 0, variance 1) gives nearly the same output for every input, which would make
the comparisons below meaningless.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers  # noqa: E402

from medseg.errors import ConfigError, ModelError  # noqa: E402
from medseg.inference.explain import GradCAM, grad_cam, heatmap_overlay  # noqa: E402
from medseg.inference.uncertainty import (  # noqa: E402
    MCDropout,
    is_mc_model,
    mc_dropout_model,
    mc_predict,
    predictive_entropy,
    segmentation_uncertainty,
)
from medseg.models.mobilenet import build_mobilenetv2_classifier  # noqa: E402
from medseg.models.unet import UNet  # noqa: E402

SIZE = 32


def _images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, SIZE, SIZE, 3)).astype("float32")


def _unet(dropout: float = 0.3, num_classes: int = 1, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = UNet(
        input_shape=(SIZE, SIZE, 3),
        num_classes=num_classes,
        base_filters=4,
        depth=2,
        dropout=dropout,
        bn_momentum=0.0,
    )
    model(_images(), training=True)  # moving statistics := this batch's statistics
    return model


def _bn_layers(model: keras.Model) -> list:
    return [la for la in model.layers if isinstance(la, layers.BatchNormalization)]


def _bn_state(model: keras.Model) -> list[np.ndarray]:
    return [np.array(v) for la in _bn_layers(model) for v in la.non_trainable_weights]


def _disable_dropout(mc: keras.Model) -> None:
    for la in mc.layers:
        if isinstance(la, MCDropout):
            la.layer.rate = 0.0


@pytest.fixture(scope="module")
def unet() -> keras.Model:
    return _unet()


@pytest.fixture(scope="module")
def classifier() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = build_mobilenetv2_classifier(
        (SIZE, SIZE, 3), 3, alpha=0.35, dropout=0.3, bn_momentum=0.0
    )
    model(_images(8, seed=1), training=True)
    return model


# ---------------------------------------------------------------------------------------------
# MC dropout: the model


def test_mc_model_replaces_dropout_and_shares_the_rest(unet):
    mc = mc_dropout_model(unet)
    originals = [la.name for la in unet.layers if isinstance(la, layers.Dropout)]
    replaced = [la.name for la in mc.layers if isinstance(la, MCDropout)]
    assert len(originals) == 5 and sorted(replaced) == sorted(originals)
    assert not any(isinstance(la, MCDropout) for la in unet.layers)  # the original is untouched
    assert mc.get_layer("enc0_conv1") is unet.get_layer("enc0_conv1")  # same weights
    assert mc.get_layer("enc0_1_bn") is unet.get_layer("enc0_1_bn")
    assert is_mc_model(mc) and not is_mc_model(unet)
    assert mc_dropout_model(mc) is mc


def test_mc_model_keeps_batch_norm_in_inference_mode():
    model = _unet()
    x = _images()
    train_out = np.array(model(x, training=True))  # batch statistics
    for la in _bn_layers(model):  # moving statistics far from any batch's
        la.moving_mean.assign(np.full(la.moving_mean.shape, 0.7, "float32"))
        la.moving_variance.assign(np.full(la.moving_variance.shape, 0.05, "float32"))
    infer_out = np.array(model(x, training=False))
    assert np.abs(train_out - infer_out).max() > 0.1  # the two modes are distinguishable
    before = _bn_state(model)

    mc = mc_dropout_model(model)
    sampled = [np.array(mc(x)), np.array(mc(x, training=False))]
    assert np.abs(sampled[0] - sampled[1]).max() > 1e-3  # dropout is on ...
    _disable_dropout(mc)
    for kwargs in ({}, {"training": False}):  # ... and with it off, the model is the original
        np.testing.assert_allclose(np.array(mc(x, **kwargs)), infer_out, atol=1e-6)
    result = mc_predict(mc, x, 3)  # the compiled sampling path too
    np.testing.assert_allclose(result["mean"], infer_out, atol=1e-6)
    assert result["variance"].max() < 1e-10
    for b, a in zip(before, _bn_state(model), strict=True):  # statistics never updated
        np.testing.assert_array_equal(b, a)


def test_no_dropout_is_an_error(classifier):
    with pytest.raises(ModelError, match="MC-dropout needs dropout; the model has none"):
        mc_dropout_model(_unet(dropout=0.0))
    keras.utils.set_random_seed(0)
    plain = build_mobilenetv2_classifier((SIZE, SIZE, 3), 3, alpha=0.35, dropout=0.0)
    with pytest.raises(ModelError, match="needs dropout"):
        mc_predict(plain, _images(1), 4)


def test_nested_model_dropout_is_reached():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [keras.Input((8,)), layers.Dense(8), layers.Dropout(0.5)], name="inner"
    )
    inputs = keras.Input((8,))
    model = keras.Model(inputs, layers.Dense(2, activation="softmax")(inner(inputs)))
    x = np.ones((2, 8), "float32")
    result = mc_predict(model, x, 8)
    assert result["variance"].max() > 0
    np.testing.assert_allclose(np.array(model(x)), np.array(model(x)))  # original: deterministic


def test_mc_dropout_layer_serializes():
    layer = MCDropout(layers.SpatialDropout2D(0.25), name="d")
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(clone, MCDropout) and isinstance(clone.layer, layers.SpatialDropout2D)
    assert clone.layer.rate == 0.25
    x = np.ones((1, 4, 4, 8), "float32")
    assert (np.array(clone(x, training=False)) == 0).any()  # drops at inference


# ---------------------------------------------------------------------------------------------
# MC dropout: predictions


def test_mc_predict_segmentation(unet):
    x = _images()
    result = mc_predict(unet, x, 40, seed=0)
    det = np.array(unet(x, training=False))
    assert result["task"] == "segmentation" and result["samples_used"] == 40
    assert result["mean"].shape == result["variance"].shape == det.shape
    assert result["variance_map"].shape == result["foreground"].shape == (4, SIZE, SIZE)
    assert (result["variance"] >= 0).all() and result["variance"].max() > 1e-3
    assert result["variance"].max() <= 0.25 + 1e-6  # a probability's variance
    assert np.abs(result["mean"] - det).mean() < 0.05  # the MC mean approximates the model
    for i in range(4):
        want = segmentation_uncertainty(result["variance_map"][i], result["foreground"][i])
        assert result["uncertainty"][i] == pytest.approx(want, rel=1e-5)
    assert (result["uncertainty"] > 0).all()


def test_mc_samples_differ_and_seed_repeats(unet):
    x = _images(2)
    a = mc_predict(unet, x, 3, seed=1)
    b = mc_predict(unet, x, 3, seed=1)
    c = mc_predict(unet, x, 3, seed=2)
    np.testing.assert_array_equal(a["mean"], b["mean"])
    assert np.abs(a["mean"] - c["mean"]).max() > 1e-3
    mc = mc_dropout_model(unet)
    assert np.abs(np.array(mc(x)) - np.array(mc(x))).max() > 1e-3


def test_mc_predict_ensemble_pools_the_members(unet):
    other = _unet(seed=1)
    x = _images(2)
    result = mc_predict([unet, other], x, 20)
    assert result["samples_used"] == 40
    det = (np.array(unet(x, training=False)) + np.array(other(x, training=False))) / 2
    assert np.abs(result["mean"] - det).mean() < 0.05


def test_mc_predict_multiclass_segmentation_foreground():
    model = _unet(num_classes=3)
    result = mc_predict(model, _images(2), 6, batch_size=1)
    np.testing.assert_array_equal(result["foreground"], result["mean"].argmax(-1) > 0)
    np.testing.assert_allclose(result["variance_map"], result["variance"].mean(-1), rtol=1e-6)


def test_mc_predict_raw_pixels_with_preprocessing(unet):
    raw = np.random.default_rng(3).uniform(0, 255, (2, 40, 48, 3)).astype("float32")
    prep = {"size": (SIZE, SIZE), "method": "minmax", "window": (0.0, 1.0), "policy": "pad"}
    result = mc_predict(unet, raw, 4, prep=prep)
    assert result["mean"].shape == (2, 40, 48, 1)
    assert result["variance_map"].shape == (2, 40, 48)


def test_mc_predict_classification(classifier):
    x = _images(4, seed=1)
    result = mc_predict(classifier, x, 30, seed=0)
    det = np.array(classifier(x, training=False))
    assert result["task"] == "classification" and result["mean"].shape == (4, 3)
    np.testing.assert_allclose(result["mean"].sum(-1), 1.0, atol=1e-5)
    assert np.abs(result["mean"] - det).max() < 0.15
    assert result["variance"].max() > 0 and (result["variance"] >= 0).all()
    entropy = -(result["mean"] * np.log(result["mean"])).sum(-1)
    np.testing.assert_allclose(result["uncertainty"], entropy, rtol=1e-4)
    assert (result["uncertainty"] <= math.log(3) + 1e-6).all()
    assert (result["mutual_information"] > 0).all()
    assert (result["mutual_information"] <= result["uncertainty"]).all()


def test_mc_predict_with_a_function():
    rng = np.random.default_rng(0)

    def noisy(x):
        p = rng.uniform(0.2, 0.8, (len(x), 1))
        return np.concatenate([p, 1 - p], axis=-1)

    result = mc_predict(noisy, np.zeros((3, 4, 4, 1), "float32"), 50)
    assert result["variance"].max() > 0.005
    np.testing.assert_allclose(result["mean"], 0.5, atol=0.1)


def test_mc_predict_needs_two_samples(unet):
    with pytest.raises(ConfigError, match="n_samples >= 2"):
        mc_predict(unet, _images(1), 1)


def test_uncertainty_formulas():
    vmap = np.array([[0.1, 0.2], [0.0, 0.04]])
    assert segmentation_uncertainty(vmap, np.array([[1, 1], [0, 0]], bool)) == pytest.approx(0.15)
    assert segmentation_uncertainty(vmap, np.zeros((2, 2), bool)) == pytest.approx(0.085)
    np.testing.assert_allclose(predictive_entropy(np.array([[0.5, 0.5]])), [math.log(2)])
    np.testing.assert_allclose(predictive_entropy(np.array([[1.0, 0.0]])), [0.0], atol=1e-9)
    np.testing.assert_allclose(predictive_entropy(np.array([[0.5]])), [math.log(2)])  # sigmoid


# ---------------------------------------------------------------------------------------------
# Grad-CAM


def _brightness_classifier() -> keras.Model:
    """Class 1's logit is the image's mean brightness, class 0's its negative (hand-set)."""
    inputs = keras.Input((16, 16, 3))
    feat = layers.Conv2D(1, 1, activation="relu", name="bright")(inputs)
    pooled = layers.GlobalAveragePooling2D()(feat)
    outputs = layers.Dense(2, activation="softmax", name="head")(pooled)
    model = keras.Model(inputs, outputs)
    model.get_layer("bright").set_weights([np.full((1, 1, 3, 1), 1 / 3, "float32"), np.zeros(1)])
    model.get_layer("head").set_weights([np.array([[-4.0, 4.0]], "float32"), np.zeros(2)])
    return model


def _square(corner: str) -> np.ndarray:
    img = np.zeros((1, 16, 16, 3), "float32")
    if corner == "top-left":
        img[:, 1:5, 1:5] = 1.0
    else:
        img[:, 11:15, 11:15] = 1.0
    return img


def test_grad_cam_finds_the_bright_square():
    model = _brightness_classifier()
    cam = GradCAM(model)
    assert cam.layer_name == "bright"
    top = cam(_square("top-left"), class_index=1)[0]
    bottom = cam(_square("bottom-right"), class_index=1)[0]
    assert top.shape == (16, 16) and top.max() == pytest.approx(1.0)
    assert top[1:5, 1:5].min() > 0.9 and top[8:, 8:].max() < 0.05
    assert bottom[11:15, 11:15].min() > 0.9 and bottom[:8, :8].max() < 0.05
    np.testing.assert_array_equal(cam(_square("top-left"), class_index=0), 0.0)  # no evidence
    assert np.array_equal(cam(_square("top-left")), top[None])  # predicted class: 1


def test_grad_cam_mobilenet(classifier):
    x = _images(3, seed=2)
    heat = grad_cam(classifier, x)
    assert heat.shape == (3, SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert (heat.std(axis=(1, 2)) > 0.01).all()  # not constant
    assert np.abs(heat[0] - heat[1]).max() > 0.05  # depends on the image
    per_class = [grad_cam(classifier, x[:1], class_index=k)[0] for k in range(3)]
    assert np.abs(per_class[0] - per_class[1]).max() > 0.01 or per_class[0].max() == 0


def test_grad_cam_layer_choice(classifier):
    cam = GradCAM(classifier)
    inner = classifier.get_layer("backbone").get_layer(cam.layer_name)
    assert inner.output.shape[1] > 1  # the backbone's own output is 1x1 at 32x32: skipped
    named = GradCAM(classifier, layer_name="block_6_expand_relu")
    assert named(_images(1)).shape == (1, SIZE, SIZE)
    with pytest.raises(ModelError, match="no_such_layer"):
        GradCAM(classifier, layer_name="no_such_layer")
    with pytest.raises(ModelError, match="not a feature map"):
        GradCAM(classifier, layer_name="pool")


def test_grad_cam_raw_pixels(classifier):
    raw = np.random.default_rng(4).uniform(0, 255, (1, 50, 40, 3)).astype("float32")
    prep = {"size": (SIZE, SIZE), "method": "minmax", "window": (0.0, 1.0), "policy": "pad"}
    heat = grad_cam(classifier, raw, prep=prep)
    assert heat.shape == (1, 50, 40) and heat.min() >= 0.0 and heat.max() <= 1.0


def test_grad_cam_refuses_segmentation_models(unet):
    with pytest.raises(ModelError, match="explains classifiers"):
        grad_cam(unet, _images(1))


@pytest.mark.slow  # writes a TF-Hub module (seconds)
def test_grad_cam_hub_backbone_is_an_error(tmp_path):
    from medseg.models.hub import make_hub_module

    module = make_hub_module(tmp_path / "hub", input_size=SIZE, alpha=0.35)
    model = build_mobilenetv2_classifier((SIZE, SIZE, 3), 3, hub_handle=str(module))
    with pytest.raises(ModelError, match="TF-Hub backbone 'backbone' does not expose"):
        grad_cam(model, _images(1))


def test_heatmap_overlay():
    image = np.full((16, 16, 1), 100.0, "float32")
    image[0, 0] = 0.0
    heat = np.zeros((8, 8), "float32")
    heat[:4, :4] = 1.0  # another size: resized to the image's
    out = heatmap_overlay(image, heat)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    hot, cold = out[2, 2].astype(int), out[14, 14].astype(int)
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red where hot, blue where cold
    with pytest.raises(ModelError, match="HxW"):
        heatmap_overlay(image, np.zeros((1, 8, 8)))
