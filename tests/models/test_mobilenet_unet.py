"""Tests for medseg.models.mobilenet_unet: the shared model checks plus encoder-specific ones."""

from __future__ import annotations

import inspect
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers  # noqa: E402

from medseg.errors import ConfigError, ModelError  # noqa: E402
from medseg.models.mobilenet_unet import SKIP_LAYERS, MobileNetV2UNet  # noqa: E402
from tests.models.test_models import ModelTester, _all_layers, _np  # noqa: E402

SIZE = 64
ALPHA = 0.35
#: small decoder: the tests check wiring, not capacity (the default is the tutorial's 512..64).
DECODER = (32, 16, 16, 8)


def _bns(model: keras.Model) -> list[layers.BatchNormalization]:
    return [la for la in _all_layers(model) if isinstance(la, layers.BatchNormalization)]


def _fit_one_step(model: keras.Model, num_classes: int = 1) -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (2, SIZE, SIZE, 3)).astype("float32")
    y = (rng.uniform(0, 1, (2, SIZE, SIZE, num_classes)) > 0.5).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="bce", run_eagerly=True)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)


class MobileNetV2UNetTester(ModelTester):
    input_shape = (SIZE, SIZE, 3)
    output_shape = (SIZE, SIZE, 1)
    fit_run_eagerly = True  # tracing the train step costs ~10x an eager step on 2 CPU cores
    bn_momentum = 0.9

    def clone_from_config(self, model):
        return MobileNetV2UNet.from_config(model.get_config())

    def check_model(self, model):
        backbone = model.get_layer("backbone")
        assert isinstance(backbone, keras.Model)
        # Skips at 1/2, 1/4, 1/8, 1/16 of the input, then the 1/32 bottleneck.
        assert [o.shape[1] for o in backbone.outputs] == [SIZE // 2**k for k in range(1, 6)]
        assert all(
            out is backbone.get_layer(name).output
            for out, name in zip(backbone.outputs, SKIP_LAYERS, strict=True)
        )
        # Each decoder step concatenates the encoder's skip of its resolution.
        for level, skip in enumerate(backbone.outputs[:-1]):
            upsampled, concatenated = model.get_layer(f"skip{level}").input
            assert concatenated.shape == skip.shape
            assert upsampled.shape[1:3] == skip.shape[1:3]
        # [0, 1] -> [-1, 1] before the encoder.
        scale = model.get_layer("to_unit_range")
        assert (scale.scale, scale.offset) == (2.0, -1.0)
        # Every batch-norm layer, the ~50 of the encoder included, has the configured momentum.
        bns = _bns(model)
        assert len(_bns(backbone)) > 30
        wrong = {la.name: la.momentum for la in bns if la.momentum != self.bn_momentum}
        assert not wrong, f"batch-norm layers without the configured momentum: {wrong}"
        assert model.get_layer("head").dtype_policy.compute_dtype == "float32"


class TestMobileNetV2UNet(MobileNetV2UNetTester):
    bn_momentum = 0.8
    foreground_prior = 0.05

    def build(self):
        return MobileNetV2UNet(
            input_shape=(SIZE, SIZE, 3),
            num_classes=1,
            alpha=ALPHA,
            decoder_filters=DECODER,
            dropout=0.1,
            bn_momentum=self.bn_momentum,
            foreground_prior=self.foreground_prior,
        )

    def check_model(self, model):
        super().check_model(model)
        assert model.alpha == ALPHA and model.upsampling == "transpose"
        assert isinstance(model.get_layer("head"), layers.Conv2DTranspose)
        assert len([la for la in model.layers if isinstance(la, layers.Dropout)]) == 4
        assert model.losses == []  # no weight decay configured
        bias = _np(model.get_layer("head").bias)
        logit = math.log(self.foreground_prior / (1 - self.foreground_prior))
        np.testing.assert_allclose(bias, [logit], rtol=1e-6)

    def test_backbone_bn_momentum_after_reload(self, reloaded):
        momenta = {bn.momentum for bn in _bns(reloaded.get_layer("backbone"))}
        assert momenta == {self.bn_momentum}

    def test_config_has_every_argument(self, model):
        config = model.get_config()
        params = set(inspect.signature(MobileNetV2UNet.__init__).parameters) - {"self", "kwargs"}
        assert params <= set(config), f"missing from get_config: {params - set(config)}"
        assert config["input_shape"] == [SIZE, SIZE, 3]
        assert config["decoder_filters"] == list(DECODER)
        assert config["freeze_backbone"] is False and config["weights"] is None


class TestMobileNetV2UNetMulticlass(MobileNetV2UNetTester):
    """Softmax head, resize upsampling, no decoder batch norm, weight decay."""

    activation = "softmax"
    output_shape = (SIZE, SIZE, 3)

    def build(self):
        return MobileNetV2UNet(
            input_shape=(SIZE, SIZE, 3),
            num_classes=3,
            alpha=ALPHA,
            decoder_filters=DECODER,
            batch_norm=False,
            upsampling="resize",
            l1=1e-4,
            l2=1e-3,
        )

    def check_model(self, model):
        super().check_model(model)
        assert model.num_classes == 3
        assert not any(isinstance(la, layers.Conv2DTranspose) for la in model.layers)
        assert not any(isinstance(la, layers.BatchNormalization) for la in model.layers)
        np.testing.assert_array_equal(_np(model.get_layer("head").bias), np.zeros(3))
        # One penalty per decoder conv kernel and one for the head's (L1 + L2).
        assert len(model.losses) == 5
        assert all(float(_np(v)) > 0 for v in model.losses)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("shape", [(48, 48, 3), (64, 80, 3)])
def test_size_not_divisible_by_32_raises(shape):
    with pytest.raises(ModelError, match="divisible by 32"):
        MobileNetV2UNet(input_shape=shape, alpha=ALPHA, decoder_filters=DECODER)


def test_grey_input_raises():
    with pytest.raises(ModelError, match="3 input channels"):
        MobileNetV2UNet(input_shape=(SIZE, SIZE, 1), alpha=ALPHA)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ModelError, match="upsampling"):
        MobileNetV2UNet(input_shape=(SIZE, SIZE, 3), alpha=ALPHA, upsampling="bilinear")
    with pytest.raises(ModelError, match="decoder_filters"):
        MobileNetV2UNet(input_shape=(SIZE, SIZE, 3), alpha=ALPHA, decoder_filters=(8, 8))
    with pytest.raises(ModelError, match="not found"):
        MobileNetV2UNet(input_shape=(SIZE, SIZE, 3), alpha=ALPHA, weights=str(tmp_path / "x.h5"))


def test_dynamic_size():
    model = MobileNetV2UNet(input_shape=(None, None, 3), alpha=ALPHA, decoder_filters=DECODER)
    assert _np(model(np.zeros((1, 64, 96, 3), "float32"))).shape == (1, 64, 96, 1)


def test_mixed_precision_output_is_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = MobileNetV2UNet(input_shape=(32, 32, 3), alpha=ALPHA, decoder_filters=DECODER)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("dec0_conv").compute_dtype == "float16"
    assert model.get_layer("backbone").get_layer("Conv1").compute_dtype == "float16"
    out = model(np.full((1, 32, 32, 3), 0.5, "float32"))
    assert out.dtype == "float32"


# ---------------------------------------------------------------------------------------------
# Frozen and pretrained encoders


def test_freeze_backbone_trains_decoder_only():
    model = MobileNetV2UNet(
        input_shape=(SIZE, SIZE, 3), alpha=ALPHA, decoder_filters=DECODER, freeze_backbone=True
    )
    backbone = model.get_layer("backbone")
    assert not backbone.trainable and model.get_config()["freeze_backbone"] is True
    frozen = [w.path for w in backbone.weights]
    assert not {w.path for w in model.trainable_weights} & set(frozen)
    encoder_before = [_np(w).copy() for w in backbone.weights]  # moving statistics included
    decoder_before = [_np(w).copy() for w in model.trainable_weights]
    _fit_one_step(model)
    for w, before in zip(backbone.weights, encoder_before, strict=True):
        np.testing.assert_array_equal(_np(w), before, err_msg=w.path)
    changed = [
        not np.array_equal(_np(w), b)
        for w, b in zip(model.trainable_weights, decoder_before, strict=True)
    ]
    assert all(changed), f"{sum(changed)}/{len(changed)} decoder weights changed"


def test_unfrozen_backbone_reloads_unfrozen(tmp_path):
    model = MobileNetV2UNet(
        input_shape=(SIZE, SIZE, 3), alpha=ALPHA, decoder_filters=DECODER, freeze_backbone=True
    )
    model.get_layer("backbone").trainable = True  # fine-tuning after the warm-up epochs
    assert model.get_config()["freeze_backbone"] is False
    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    assert reloaded.get_layer("backbone").trainable
    assert len(reloaded.trainable_weights) == len(model.trainable_weights)


def test_local_weights_file(tmp_path):
    source = keras.applications.MobileNetV2(
        input_shape=(SIZE, SIZE, 3), include_top=False, weights=None, alpha=ALPHA
    )
    path = tmp_path / "encoder.weights.h5"
    source.save_weights(path)
    model = MobileNetV2UNet(
        input_shape=(SIZE, SIZE, 3), alpha=ALPHA, decoder_filters=DECODER, weights=str(path)
    )
    backbone = model.get_layer("backbone")
    compared = 0
    for layer in backbone.layers[1:]:  # after the input layer
        for got, want in zip(layer.weights, source.get_layer(layer.name).weights, strict=True):
            np.testing.assert_array_equal(_np(got), _np(want), err_msg=got.path)
            compared += 1
    assert compared == len(backbone.weights) > 200
    # Loading weights does not undo the configured batch-norm momentum.
    assert {bn.momentum for bn in _bns(backbone)} == {0.9}
    # A saved model carries its weights: it reloads without the file, and keeps the path.
    model.save(tmp_path / "m.keras")
    path.unlink()
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    assert reloaded.get_config()["weights"] == str(path)
    for a, b in zip(backbone.weights, reloaded.get_layer("backbone").weights, strict=True):
        np.testing.assert_array_equal(_np(a), _np(b))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Keras warns of each layer it cannot load
def test_weights_file_of_other_alpha_raises(tmp_path):
    source = keras.applications.MobileNetV2(
        input_shape=(SIZE, SIZE, 3), include_top=False, weights=None, alpha=0.5
    )
    path = tmp_path / "encoder.weights.h5"
    source.save_weights(path)
    with pytest.raises(ModelError, match="encoder"):
        MobileNetV2UNet(input_shape=(SIZE, SIZE, 3), alpha=ALPHA, weights=str(path))


def test_registry_builds_it_from_the_config():
    from medseg.config import load_config
    from medseg.models.registry import build_model

    cfg = load_config(
        None,
        [
            "model.name=mobilenetv2_unet",
            "model.alpha=0.35",
            "data.image_size=[64,64]",
            "model.freeze_backbone=true",
        ],
    )
    model = build_model(cfg, 1)
    assert isinstance(model, MobileNetV2UNet) and model.output_shape == (None, 64, 64, 1)
    assert not model.get_layer("backbone").trainable
    bad = load_config(
        None,
        ["model.name=mobilenetv2_unet", "data.task=classification", "data.layout=class_folders"],
    )
    with pytest.raises(ConfigError, match="segmentation model"):
        build_model(bad, 4)
