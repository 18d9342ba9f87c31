"""Tests for medseg.models: U-Net, MobileNetV2 classifier, registry, losses and metrics.

The model tests follow segmentation_models.pytorch ``tests/models/base.py`` and keras-hub
``test_case.py``: one shared :class:`ModelTester` holds the checks every model must pass, and each
model is a short subclass that only says how to build it.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers  # noqa: E402

import medseg.models  # noqa: E402, F401  (registers the custom objects)
from medseg.config import TrainConfig, load_config  # noqa: E402
from medseg.errors import ConfigError, ModelError  # noqa: E402
from medseg.models.fold import FoldedBatchNorm, fold_batch_norm  # noqa: E402
from medseg.models.losses import LOSSES, BCEDice, get_loss  # noqa: E402
from medseg.models.metrics import (  # noqa: E402
    DiceScore,
    confusion_counts,
    dice_from_counts,
    iou_from_counts,
    segmentation_report,
)
from medseg.models.registry import MODELS, build_model  # noqa: E402
from medseg.models.unet import UNet  # noqa: E402

SIZE = 32


def _all_layers(model: keras.Model) -> list[layers.Layer]:
    """Every layer, descending into nested models (the MobileNetV2 backbone)."""
    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out.extend(_all_layers(layer))
    return out


def _np(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def _calibrate_batch_norm(model: keras.Model, input_shape: tuple[int, ...]) -> None:
    """Give batch-norm layers the moving statistics of one batch of data.

    Untrained, a from-scratch MobileNetV2 in inference mode shrinks its activations at every block
    (moving variance 1, real variance far below) and outputs exactly 1/K for every input, which
    would make output comparisons vacuous. One training-mode call with momentum 0 sets the moving
    statistics to the batch's; the configured momentum is restored afterwards.
    """
    bns = [la for la in _all_layers(model) if isinstance(la, layers.BatchNormalization)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    x = np.random.default_rng(123).uniform(0, 1, (8, *input_shape)).astype("float32")
    model(x, training=True)
    for bn, m in zip(bns, momenta, strict=True):
        bn.momentum = m


# ---------------------------------------------------------------------------------------------
# Shared model tester


class ModelTester:
    """Checks every medseg model must pass. Subclasses implement :meth:`build`."""

    input_shape: tuple[int, int, int] = (SIZE, SIZE, 3)
    batch_size = 2
    #: ``sigmoid`` (binary mask) or ``softmax`` (label map / classes) head.
    activation = "sigmoid"
    #: expected output shape of one input, without the batch axis.
    output_shape: tuple[int, ...] = (SIZE, SIZE, 1)
    #: fit eagerly (tracing a MobileNetV2 train step costs ~13 s on 2 CPU cores, eager ~1 s).
    fit_run_eagerly = False

    def build(self) -> keras.Model:
        raise NotImplementedError

    def clone_from_config(self, model: keras.Model) -> keras.Model:
        """Rebuild ``model`` from its config (functional models: ``keras.Model.from_config``)."""
        return keras.Model.from_config(
            model.get_config(), custom_objects=keras.saving.get_custom_objects()
        )

    def check_model(self, model: keras.Model) -> None:
        """Extra checks of a subclass, run on the built, reloaded and re-configured models."""

    # --- fixtures ---------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    def model(self) -> keras.Model:
        model = self.build()
        _calibrate_batch_norm(model, self.input_shape)
        return model

    @pytest.fixture(scope="class")
    def inputs(self) -> np.ndarray:
        rng = np.random.default_rng(0)
        return rng.uniform(0, 1, (self.batch_size, *self.input_shape)).astype("float32")

    @pytest.fixture(scope="class")
    def reloaded(self, model, tmp_path_factory) -> keras.Model:
        path = tmp_path_factory.mktemp("saved") / "model.keras"
        model.save(path)
        return keras.models.load_model(path)

    def targets(self, rng: np.random.Generator) -> np.ndarray:
        shape = (self.batch_size, *self.output_shape)
        if self.activation == "sigmoid":
            return (rng.uniform(0, 1, shape) > 0.5).astype("float32")
        labels = rng.integers(0, shape[-1], shape[:-1])
        return np.eye(shape[-1], dtype="float32")[labels]

    # --- shared tests -----------------------------------------------------------------------

    def test_output_shape(self, model, inputs):
        out = _np(model(inputs, training=False))
        assert out.shape == (self.batch_size, *self.output_shape)
        assert model.output_shape == (None, *self.output_shape)
        assert out.dtype == np.float32

    def test_output_range(self, model, inputs):
        out = _np(model(inputs, training=False))
        assert np.all(np.isfinite(out))
        assert out.min() >= 0.0 and out.max() <= 1.0
        if self.activation == "softmax":
            np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-5)
        else:
            # A sigmoid head is not normalised across pixels: a constant 1/C map would be wrong.
            assert out.shape[-1] == 1
        # The output depends on the input: the two images of the batch give different outputs.
        assert np.abs(out[0] - out[1]).max() > 1e-4

    def test_input_is_named_image(self, model):
        assert [t.name for t in model.inputs] == ["image"]

    def test_save_load_same_outputs(self, model, reloaded, inputs):
        assert type(reloaded) is type(model)
        expected = _np(model(inputs, training=False))
        got = _np(reloaded(inputs, training=False))
        np.testing.assert_allclose(got, expected, atol=1e-6)
        self.check_model(reloaded)

    def test_save_load_keeps_weights(self, model, reloaded):
        assert len(reloaded.weights) == len(model.weights)
        for a, b in zip(model.weights, reloaded.weights, strict=True):
            np.testing.assert_array_equal(_np(a), _np(b))

    def test_config_round_trip(self, model):
        clone = self.clone_from_config(model)
        assert type(clone) is type(model)
        assert clone.count_params() == model.count_params()
        assert len(clone.weights) == len(model.weights)
        assert [w.shape for w in clone.weights] == [w.shape for w in model.weights]
        assert [layer.name for layer in _all_layers(clone)] == [
            layer.name for layer in _all_layers(model)
        ]
        self.check_model(clone)

    def test_built_model_checks(self, model):
        self.check_model(model)

    def test_fold_batch_norm_same_outputs(self, model, inputs):
        """Export folds every batch norm into its conv: the folded copy has none left, computes
        the same function in inference mode, and leaves the original untouched."""
        bns = [la for la in _all_layers(model) if isinstance(la, layers.BatchNormalization)]
        before = [_np(w).copy() for w in model.weights]
        folded = fold_batch_norm(model)
        assert not [la for la in _all_layers(folded) if isinstance(la, layers.BatchNormalization)]
        n_folded = sum(isinstance(la, FoldedBatchNorm) for la in _all_layers(folded))
        assert n_folded == len(bns)
        expected = _np(model(inputs, training=False))
        np.testing.assert_allclose(_np(folded(inputs, training=False)), expected, atol=1e-4)
        assert all(np.array_equal(_np(a), b) for a, b in zip(model.weights, before, strict=True))

    def test_fit_step_changes_weights(self):
        model = self.build()  # not the shared one: fitting changes it
        rng = np.random.default_rng(1)
        x = rng.uniform(0, 1, (self.batch_size, *self.input_shape)).astype("float32")
        y = self.targets(rng)
        loss = "binary_crossentropy" if self.activation == "sigmoid" else "categorical_crossentropy"
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2), loss=loss, run_eagerly=self.fit_run_eagerly
        )
        before = [_np(w).copy() for w in model.trainable_weights]
        history = model.fit(x, y, batch_size=self.batch_size, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        after = [_np(w) for w in model.trainable_weights]
        changed = [not np.array_equal(a, b) for a, b in zip(before, after, strict=True)]
        assert sum(changed) > len(changed) // 2, f"{sum(changed)}/{len(changed)} weights changed"
        # The head's kernel always receives a gradient.
        head = [i for i, w in enumerate(model.trainable_weights) if "head" in w.path]
        assert head and all(changed[i] for i in head)


# ---------------------------------------------------------------------------------------------
# Models


class UNetTester(ModelTester):
    def clone_from_config(self, model):
        return UNet.from_config(model.get_config())


class TestUNetTranspose(UNetTester):
    bn_momentum = 0.8
    foreground_prior = 0.05

    def build(self):
        return UNet(
            input_shape=(SIZE, SIZE, 3),
            num_classes=1,
            base_filters=4,
            depth=2,
            bn_momentum=self.bn_momentum,
            foreground_prior=self.foreground_prior,
        )

    def check_model(self, model):
        assert model.upsampling == "transpose"
        assert any(isinstance(la, layers.Conv2DTranspose) for la in model.layers)
        bns = [la for la in model.layers if isinstance(la, layers.BatchNormalization)]
        # 2 per conv block: 2 encoder levels + bottleneck + 2 decoder levels.
        assert len(bns) == 10
        assert {bn.momentum for bn in bns} == {self.bn_momentum}
        assert model.losses == []  # no weight decay configured
        # The sigmoid head starts at the foreground prior: bias = logit(p).
        bias = _np(model.get_layer("head").bias)
        logit = math.log(self.foreground_prior / (1 - self.foreground_prior))
        np.testing.assert_allclose(bias, [logit], rtol=1e-6)


class TestUNetResize(UNetTester):
    def build(self):
        cfg = load_config(
            None,
            [
                "data.image_size=[32,32]",
                "model.base_filters=4",
                "model.depth=2",
                "model.upsampling=resize",
                "model.batch_norm=false",
                "model.l2=0.001",
            ],
        )
        return build_model(cfg)  # through the registry

    def check_model(self, model):
        assert model.upsampling == "resize" and model.l2 == pytest.approx(1e-3)
        assert not any(isinstance(la, layers.Conv2DTranspose) for la in model.layers)
        assert any(isinstance(la, layers.UpSampling2D) for la in model.layers)
        assert not any(isinstance(la, layers.BatchNormalization) for la in model.layers)
        # One L2 penalty per regularised conv kernel: 2 convs x (2 encoder + bottleneck + 2 decoder)
        assert len(model.losses) == 10
        assert all(float(_np(v)) > 0 for v in model.losses)


class TestUNetMulticlass(UNetTester):
    activation = "softmax"
    output_shape = (SIZE, SIZE, 3)

    def build(self):
        return UNet(
            input_shape=(SIZE, SIZE, 3), num_classes=3, base_filters=4, depth=2, dropout=0.0
        )

    def check_model(self, model):
        assert model.num_classes == 3
        assert not any(isinstance(la, layers.Dropout) for la in model.layers)
        # No foreground prior for a softmax head: it starts unbiased.
        np.testing.assert_array_equal(_np(model.get_layer("head").bias), np.zeros(3))


class TestMobileNetV2Classifier(ModelTester):
    activation = "softmax"
    output_shape = (4,)
    bn_momentum = 0.95
    fit_run_eagerly = True

    def build(self):
        cfg = load_config(
            None,
            [
                "data.task=classification",
                "data.layout=class_folders",
                "data.image_size=[32,32]",
                "model.name=mobilenetv2_classifier",
                f"model.bn_momentum={self.bn_momentum}",
            ],
        )
        return build_model(cfg, num_outputs=4)

    def check_model(self, model):
        bns = [la for la in _all_layers(model) if isinstance(la, layers.BatchNormalization)]
        assert len(bns) > 30  # the whole backbone, not just its top
        wrong = {la.name: la.momentum for la in bns if la.momentum != self.bn_momentum}
        assert not wrong, f"batch-norm layers without the configured momentum: {wrong}"


# ---------------------------------------------------------------------------------------------
# Registry and model errors


def test_registry_unknown_name_lists_models():
    cfg = load_config(None, ["model.name=vgg16"])
    with pytest.raises(ConfigError, match="vgg16") as e:
        build_model(cfg)
    assert "unet" in str(e.value)
    for name in MODELS:
        assert name in str(e.value)


def test_registry_rejects_model_of_other_task():
    cfg = load_config(None, ["data.task=classification", "data.layout=class_folders"])
    with pytest.raises(ConfigError, match="unet"):
        build_model(cfg)
    cfg = load_config(None, ["model.name=mobilenetv2_classifier"])
    with pytest.raises(ConfigError, match="mobilenetv2_classifier"):
        build_model(cfg)


def test_unet_size_not_divisible_raises():
    with pytest.raises(ModelError, match="divisible"):
        UNet(input_shape=(30, 30, 3), base_filters=4, depth=2)


def test_unet_bad_upsampling_raises():
    with pytest.raises(ModelError, match="bilinear|upsampling"):
        UNet(input_shape=(SIZE, SIZE, 3), base_filters=4, depth=2, upsampling="bilinear")


def test_unet_dynamic_size():
    model = UNet(input_shape=(None, None, 1), base_filters=2, depth=1, batch_norm=False)
    assert _np(model(np.zeros((1, 8, 12, 1), "float32"))).shape == (1, 8, 12, 1)


def test_mobilenet_rejects_grey_input():
    cfg = load_config(
        None,
        [
            "data.task=classification",
            "data.layout=class_folders",
            "data.image_size=[32,32]",
            "data.channels=1",
            "model.name=mobilenetv2_classifier",
        ],
    )
    with pytest.raises(ModelError, match="3 input channels"):
        build_model(cfg, num_outputs=4)


# ---------------------------------------------------------------------------------------------
# Losses


def test_get_loss_unknown_lists_names():
    with pytest.raises(ConfigError, match="nope") as e:
        get_loss(TrainConfig(loss="nope"))
    for name in LOSSES:
        assert name in str(e.value)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_get_loss_every_name(name: str):
    assert isinstance(get_loss(TrainConfig(loss=name)), keras.losses.Loss)


def test_categorical_crossentropy_label_smoothing():
    loss = get_loss(TrainConfig(loss="categorical_crossentropy", label_smoothing=0.2))
    assert loss.get_config()["label_smoothing"] == pytest.approx(0.2)


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    y = np.zeros((2, 8, 8, 1), "float32")
    y[0, 2:6, 2:6] = 1
    y[1, :3, 4:] = 1
    return y


def test_bce_dice_perfect_is_lower_than_inverted(mask):
    loss = BCEDice()
    perfect = float(_np(loss(mask, mask)))
    inverted = float(_np(loss(mask, 1.0 - mask)))
    assert perfect < 1e-3
    assert inverted > 1.0  # the Dice term alone is 1 for disjoint masks
    assert perfect < inverted


def test_bce_dice_weights(mask):
    rng = np.random.default_rng(0)
    pred = rng.uniform(0.05, 0.95, mask.shape).astype("float32")
    bce = float(_np(keras.losses.BinaryCrossentropy()(mask, pred)))
    dice = float(_np(keras.losses.Dice()(mask, pred)))
    got = float(_np(BCEDice(bce_weight=2.0, dice_weight=0.5)(mask, pred)))
    assert got == pytest.approx(2.0 * bce + 0.5 * dice, rel=1e-5)


def test_bce_dice_config_round_trip():
    loss = BCEDice(bce_weight=0.3, dice_weight=0.7)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(again, BCEDice)
    assert (again.bce_weight, again.dice_weight) == (0.3, 0.7)


# ---------------------------------------------------------------------------------------------
# Metrics

# Hand-made: truth 3 foreground pixels; prediction > 0.5 at indices 0, 1, 3, 6.
# TP = {0, 1} = 2, FP = {3, 6} = 2, FN = {2} = 1 -> Dice = 2*2 / (2*2 + 2 + 1) = 4/7.
TRUE = np.array([1, 1, 1, 0, 0, 0, 0, 0], "float32")
PRED = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.4, 0.51, 0.0], "float32")


def test_confusion_counts_hand_made():
    assert confusion_counts(PRED > 0.5, TRUE) == (2, 2, 1)


def test_dice_and_iou_from_counts():
    assert dice_from_counts(2, 2, 1) == pytest.approx(4 / 7)
    assert iou_from_counts(2, 2, 1) == pytest.approx(2 / 5)
    assert dice_from_counts(0, 0, 0) == 1.0
    assert iou_from_counts(0, 0, 0) == 1.0
    assert dice_from_counts(0, 3, 0) == 0.0


def test_dice_score_metric_hand_made():
    metric = DiceScore()
    metric.update_state(TRUE.reshape(1, 2, 4, 1), PRED.reshape(1, 2, 4, 1))
    got = float(_np(metric.result()))
    assert got == pytest.approx(4 / 7, rel=1e-6)
    assert got == pytest.approx(dice_from_counts(*confusion_counts(PRED > 0.5, TRUE)), rel=1e-6)


def test_dice_score_accumulates_counts():
    metric = DiceScore()
    metric.update_state(TRUE, PRED)
    # Second batch: TP += 2, nothing else -> TP 4, FP 2, FN 1 -> 8/11.
    metric.update_state(np.array([0, 0, 1, 1], "float32"), np.array([0, 0, 0.8, 0.9], "float32"))
    assert float(_np(metric.result())) == pytest.approx(8 / 11, rel=1e-6)
    assert float(_np(metric.result())) == pytest.approx(dice_from_counts(4, 2, 1), rel=1e-6)


def test_dice_score_threshold():
    # threshold 0.65: predicted {0, 3} -> TP 1, FP 1, FN 2 -> 2 / 5.
    metric = DiceScore(threshold=0.65)
    metric.update_state(TRUE, PRED)
    assert float(_np(metric.result())) == pytest.approx(2 / 5, rel=1e-6)


def test_dice_score_both_empty_is_one():
    metric = DiceScore()
    metric.update_state(np.zeros((1, 4, 4, 1), "float32"), np.full((1, 4, 4, 1), 0.1, "float32"))
    assert float(_np(metric.result())) == 1.0


def test_dice_score_reset():
    metric = DiceScore()
    metric.update_state(TRUE, 1.0 - TRUE)  # disjoint -> 0
    assert float(_np(metric.result())) == 0.0
    metric.reset_state()
    assert float(_np(metric.result())) == 1.0


def _report_example():
    """Four 2x2 images in three groups (p1 twice, not adjacent)."""
    true = np.array(
        [
            [[1, 1], [0, 0]],  # p1: TP 1, FN 1
            [[1, 1], [1, 1]],  # p2: TP 4
            [[0, 0], [0, 0]],  # p1: FP 1
            [[1, 1], [1, 1]],  # p3: TP 1, FN 3
        ],
        bool,
    )
    pred = np.array(
        [
            [[1, 0], [0, 0]],
            [[1, 1], [1, 1]],
            [[0, 0], [0, 1]],
            [[1, 0], [0, 0]],
        ],
        bool,
    )
    return pred, true, ["p1", "p2", "p1", "p3"]


def test_segmentation_report_hand_made():
    pred, true, groups = _report_example()
    r = segmentation_report(pred, true, groups)
    assert r["n_images"] == 4
    # Overall: TP 6, FP 1, FN 4.
    assert r["dice"] == pytest.approx(12 / 17)
    assert r["iou"] == pytest.approx(6 / 11)
    # Per image: 2/3, 1, 0, 2/5; the third image has an empty truth.
    assert r["dice_per_image_mean"] == pytest.approx((2 / 3 + 1 + 0 + 2 / 5) / 4)
    assert r["dice_per_image_mean_nonempty"] == pytest.approx((2 / 3 + 1 + 2 / 5) / 3)
    # Pooled per group: p1 TP 1, FP 1, FN 1 -> 1/2 (not the mean of its images, 1/3);
    # p2 -> 1; p3 -> 2/5.
    assert r["n_groups"] == 3
    assert r["dice_per_group_mean"] == pytest.approx((0.5 + 1 + 0.4) / 3)
    assert r["dice_per_group_median"] == pytest.approx(0.5)


def test_segmentation_report_without_groups():
    pred, true, _ = _report_example()
    r = segmentation_report(pred, true)
    assert "dice_per_group_mean" not in r and "n_groups" not in r


def test_segmentation_report_all_empty_truth():
    z = np.zeros((2, 2, 2), bool)
    r = segmentation_report(z, z, ["a", "b"])
    assert r["dice"] == 1.0
    assert r["dice_per_image_mean_nonempty"] is None
    assert r["dice_per_group_mean"] == 1.0


def test_segmentation_report_per_group_entry():
    pred, true, groups = _report_example()
    r = segmentation_report(pred, true, groups)
    assert r["per_group"] == pytest.approx({"p1": 0.5, "p2": 1.0, "p3": 0.4})


def test_unet_l1_regularises_the_output_layer_only():
    from medseg.models.unet import UNet

    model = UNet(input_shape=(16, 16, 1), base_filters=2, depth=1, l1=0.01)
    assert len(model.losses) == 1
    head = model.get_layer("head")
    expected = 0.01 * float(np.abs(np.asarray(head.kernel)).sum())
    assert float(model.losses[0]) == pytest.approx(expected, rel=1e-5)
