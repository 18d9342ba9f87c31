"""Tests for the 3D U-Net, the Dice+CE loss and the per-class Dice metrics.

Modelled on keras-hub's ``test_case.py`` (every model saves and reloads with identical outputs)
and segmentation_models.pytorch's shared tester (output shapes over several input sizes,
channels and classes). Tiny sizes: 16-32 voxels a side, 2-4 base filters.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers  # noqa: E402

import medseg.models  # noqa: E402, F401  (registers the custom objects)
from medseg.config import TrainConfig, load_config  # noqa: E402
from medseg.errors import ConfigError, ModelError  # noqa: E402
from medseg.models.losses import DiceCE, get_loss  # noqa: E402
from medseg.models.metrics import (  # noqa: E402
    ClassDice,
    MeanClassDice,
    metric_suffix,
    training_metrics,
)
from medseg.models.registry import MODELS, build_model  # noqa: E402
from medseg.models.unet3d import (  # noqa: E402
    build_unet3d,
    deep_supervision_targets,
    deep_supervision_weights,
    inference_model,
    level_filters,
)

LABELS = {0: "background", 1: "Anterior", 2: "Posterior"}


def _np(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def _volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k, dtype="float32")[labels]


def _tiny(channels: int = 1, classes: int = 3, **kw) -> keras.Model:
    return build_unet3d(channels, classes, **({"base_filters": 4, "depth": 2} | kw))


# ---------------------------------------------------------------------------------------------
# Model shapes


@pytest.mark.parametrize(
    ("channels", "classes", "spatial"),
    [(1, 2, (16, 16, 16)), (2, 3, (16, 32, 16)), (4, 5, (32, 16, 24))],
)
def test_output_shape_and_softmax(channels, classes, spatial):
    model = build_unet3d(channels, classes, base_filters=4, depth=2, norm="instance")
    out = _np(model(_volume((2, *spatial, channels))))
    assert out.shape == (2, *spatial, classes)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    assert model.input.name == "image" and model.output_names == ["probabilities"]


def test_head_is_float32_under_mixed_precision():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = _tiny()
        out = model(_volume((1, 16, 16, 16, 1)))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert model.get_layer("enc0_conv1").compute_dtype == "bfloat16"
    assert keras.backend.standardize_dtype(out.dtype) == "float32"


def test_level_filters_cap():
    assert level_filters(16, 4, 256) == [16, 32, 64, 128, 256]
    assert level_filters(32, 5, 320) == [32, 64, 128, 256, 320, 320]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"norm": "layer"}, "norm"),
        ({"activation": "gelu"}, "activation"),
        ({"classes": 1}, "num_classes"),
        ({"depth": 2, "deep_supervision": True}, "deep supervision"),
    ],
)
def test_bad_arguments_raise(kw, match):
    classes = kw.pop("classes", 3)
    with pytest.raises(ModelError, match=match):
        build_unet3d(1, classes, base_filters=2, **kw)


def test_peer_bench_configuration():
    """filters 16-32-64-128-256, two conv-BN-ReLU per level, max-pool, transposed conv: the
    trainable parameters equal the PyTorch reference's (peer_unet3d_bench.py's UNet3D)."""
    model = build_unet3d(1, 3, base_filters=16, depth=4, max_filters=256, norm="batch")
    convs = {la.name: la for la in model.layers if type(la) is layers.Conv3D}
    widths = [16, 32, 64, 128]
    for level, f in enumerate(widths):
        for i in (1, 2):
            assert convs[f"enc{level}_conv{i}"].filters == f
            assert convs[f"dec{level}_conv{i}"].filters == f
            assert not convs[f"enc{level}_conv{i}"].use_bias
        assert model.get_layer(f"up{level}").filters == f
    assert convs["bottleneck_conv1"].filters == convs["bottleneck_conv2"].filters == 256
    kinds = [type(la) for la in model.layers]
    assert kinds.count(layers.MaxPooling3D) == 4
    assert kinds.count(layers.Conv3DTranspose) == 4
    assert kinds.count(layers.BatchNormalization) == kinds.count(layers.ReLU) == 18
    assert layers.Dropout not in kinds

    def block(i, o):  # conv (no bias) + BN (gamma, beta), twice
        return 27 * i * o + 2 * o + 27 * o * o + 2 * o

    f = [16, 32, 64, 128, 256]
    torch = sum(block(1 if i == 0 else f[i - 1], c) for i, c in enumerate(f))
    torch += sum(8 * f[i] * f[i - 1] + f[i - 1] for i in range(1, 5))  # transposed convs
    torch += sum(block(2 * f[i - 1], f[i - 1]) for i in range(1, 5)) + 16 * 3 + 3
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == torch == 5_646_419


def test_instance_norm_is_per_sample_per_channel():
    model = _tiny(norm="instance")
    norm = model.get_layer("enc0_1_in")
    assert isinstance(norm, layers.GroupNormalization)
    x = _volume((2, 8, 8, 8, 4), seed=3) * np.array([1, 2, 3, 4], "float32") + 5
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = np.sqrt(x.var(axis=(1, 2, 3), keepdims=True) + norm.epsilon)
    np.testing.assert_allclose(_np(norm(x)), (x - mean) / std, atol=1e-4)


def test_dropout_and_leaky_relu_in_block_order():
    model = _tiny(dropout=0.2, activation="leaky_relu", norm="none")
    names = [la.name for la in model.layers]
    i = names.index("enc0_conv1")
    assert names[i : i + 3] == ["enc0_conv1", "enc0_1_lrelu", "enc0_1_dropout"]
    assert model.get_layer("enc0_conv1").use_bias  # no norm: the conv keeps its bias
    assert model.get_layer("enc0_1_lrelu").negative_slope == pytest.approx(0.01)


# ---------------------------------------------------------------------------------------------
# Deep supervision


def test_deep_supervision_outputs_and_inference_model():
    model = _tiny(depth=3, deep_supervision=True)
    assert model.output_names == [
        "probabilities",
        "probabilities_ds1",
        "probabilities_ds2",
    ]
    x = _volume((1, 16, 32, 16, 1))
    full, half, quarter = (_np(o) for o in model(x))
    assert full.shape == (1, 16, 32, 16, 3)
    assert half.shape == (1, 8, 16, 8, 3)
    assert quarter.shape == (1, 4, 8, 4, 3)
    served = inference_model(model)
    assert len(served.outputs) == 1
    np.testing.assert_allclose(_np(served(x)), full, atol=1e-6)
    assert {id(w) for w in served.weights} <= {id(w) for w in model.weights}  # shared
    single = _tiny()
    assert inference_model(single) is single


def test_deep_supervision_targets_and_weights():
    labels = np.zeros((1, 8, 8, 8), "int64")
    labels[0, :4, :4, :4] = 1
    labels[0, 0, 0, 0] = 2
    full, half, quarter = (_np(t) for t in deep_supervision_targets(_one_hot(labels, 3)))
    assert full.shape == (1, 8, 8, 8, 3) and half.shape == (1, 4, 4, 4, 3)
    assert quarter.shape == (1, 2, 2, 2, 3)
    np.testing.assert_allclose(half.sum(-1), 1.0)
    np.testing.assert_allclose(half[0, 0, 0, 0], [0, 7 / 8, 1 / 8])
    np.testing.assert_allclose(quarter[0, 0, 0, 0], [0, 63 / 64, 1 / 64])
    np.testing.assert_allclose(quarter[0, 1, 1, 1], [1, 0, 0])
    w = deep_supervision_weights()
    assert sum(w) == pytest.approx(1.0)
    assert w == pytest.approx([4 / 7, 2 / 7, 1 / 7])


# ---------------------------------------------------------------------------------------------
# Save and reload


@pytest.mark.parametrize(
    "kw",
    [
        {"norm": "batch"},
        {"norm": "instance", "dropout": 0.1},
        {"depth": 3, "deep_supervision": True},
    ],
    ids=["batch", "instance", "deep_supervision"],
)
def test_save_reload_identical(tmp_path, kw):
    model = _tiny(channels=2, **kw)
    x = _volume((1, 16, 16, 32, 2), seed=1)
    before = [_np(o) for o in keras.tree.flatten(model.predict(x, verbose=0))]
    assert before[0].std() > 0  # outputs depend on the input
    path = tmp_path / "unet3d.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    after = [_np(o) for o in keras.tree.flatten(loaded.predict(x, verbose=0))]
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)
    # the same architecture (JSON: tuples and lists alike)
    assert json.dumps(loaded.get_config(), sort_keys=True) == json.dumps(
        model.get_config(), sort_keys=True
    )


# ---------------------------------------------------------------------------------------------
# Registry


def _cfg(*extra: str):
    base = [
        "model.name=unet3d",
        "model.num_classes=3",
        "data.channels=2",
        "model.base_filters=4",
        "model.depth=3",
        "model.max_filters=8",
        "model.norm=instance",
        "model.dropout=0",
    ]
    return load_config(None, [*base, *extra])


def test_registry_builds_unet3d_from_config():
    assert "unet3d" in MODELS
    model = build_model(_cfg("model.deep_supervision=true"))
    assert model.name == "unet3d" and len(model.outputs) == 3
    assert model.input.shape == (None, None, None, None, 2)
    assert model.output[0].shape[-1] == 3
    convs = [la for la in model.layers if type(la) is layers.Conv3D and la.kernel_size == (3,) * 3]
    assert max(la.filters for la in convs) == 8  # max_filters caps 4-8-16-32
    assert any(isinstance(la, layers.GroupNormalization) for la in model.layers)
    assert not any(isinstance(la, layers.Dropout) for la in model.layers)
    assert build_model(_cfg(), num_outputs=4).output.shape[-1] == 4


def test_registry_rejects_unet3d_misuse():
    with pytest.raises(ConfigError, match="model.num_classes"):
        build_model(_cfg(), num_outputs=1)
    with pytest.raises(ConfigError, match="unet3d"):
        build_model(_cfg("data.task=classification", "data.layout=class_folders"))
    context = ["data.layout=nifti", "data.context_slices=1", "data.cache=true"]
    with pytest.raises(ConfigError, match="data.context_slices"):
        build_model(_cfg(*context, "data.normalization=none"))


# ---------------------------------------------------------------------------------------------
# Dice + CE


def test_dice_ce_perfect_prediction_is_cross_entropy_only():
    labels = np.random.default_rng(0).integers(0, 3, (2, 8, 8, 8))
    y = _one_hot(labels, 3)
    p = 0.9 * y + 0.05  # right class everywhere, soft
    ce = float(_np(keras.losses.CategoricalCrossentropy()(y, p)))
    assert float(_np(DiceCE()(y, y))) == pytest.approx(
        float(_np(keras.losses.CategoricalCrossentropy()(y, y))), abs=1e-6
    )
    assert float(_np(DiceCE(dice_weight=0.0)(y, p))) == pytest.approx(ce, rel=1e-5)
    assert float(_np(DiceCE(ce_weight=0.0)(y, y))) == pytest.approx(0.0, abs=1e-6)


def test_dice_ce_disjoint_prediction_dice_term_is_one():
    y = _one_hot(np.array([[[1, 1, 2, 2]]]), 3)
    p = _one_hot(np.array([[[2, 2, 1, 1]]]), 3)
    assert float(_np(DiceCE(ce_weight=0.0)(y, p))) == pytest.approx(1.0, abs=1e-5)


def test_dice_ce_background_excluded_by_hand():
    y = np.array([[[1, 0, 0], [0, 1, 0]]], "float32")  # [B=1, 2 voxels, K=3]
    p = np.array([[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]], "float32")
    # class 0: 2*0.5 / (1 + 0.5); class 1: 2*1 / (1 + 1.5); class 2 absent from both: 1
    dice = [1 / 1.5, 2 / 2.5, 1.0]
    fg = float(_np(DiceCE(ce_weight=0.0)(y, p)))
    allc = float(_np(DiceCE(ce_weight=0.0, include_background=True)(y, p)))
    assert fg == pytest.approx(1 - np.mean(dice[1:]), rel=1e-4)
    assert allc == pytest.approx(1 - np.mean(dice), rel=1e-4)
    ce = -np.log(0.5) / 2  # mean over the two voxels
    assert float(_np(DiceCE()(y, p))) == pytest.approx(fg + ce, rel=1e-4)


def test_dice_ce_is_batch_dice_in_2d_and_3d():
    # sample 0: the one class-1 voxel found (Dice 1); sample 1: three missed (Dice 0).
    # Per-sample mean would be 0.5; the batch pools them: 2*1 / (4 + 1) = 0.4.
    labels = np.zeros((2, 2, 2, 2), "int64")
    labels[0, 0, 0, 0] = 1
    labels[1, 0, :, 0] = 1
    labels[1, 1, 0, 0] = 1
    pred = np.zeros_like(labels)
    pred[0, 0, 0, 0] = 1
    y, p = _one_hot(labels, 2), _one_hot(pred, 2)
    loss = DiceCE(ce_weight=0.0)
    assert float(_np(loss(y, p))) == pytest.approx(1 - 0.4, rel=1e-4)
    flat = (y.reshape(2, 2, 4, 2), p.reshape(2, 2, 4, 2))  # the same voxels as [B, H, W, K]
    assert float(_np(loss(*flat))) == pytest.approx(1 - 0.4, rel=1e-4)


def test_dice_ce_registered_and_serialisable():
    loss = get_loss(TrainConfig(loss="dice_ce"))
    assert isinstance(loss, DiceCE)
    custom = DiceCE(include_background=True, dice_weight=2.0, ce_weight=0.5, smooth=1.0)
    again = keras.losses.deserialize(keras.losses.serialize(custom))
    assert isinstance(again, DiceCE)
    cfg = again.get_config()
    assert (cfg["include_background"], cfg["dice_weight"], cfg["ce_weight"], cfg["smooth"]) == (
        True,
        2.0,
        0.5,
        1.0,
    )


# ---------------------------------------------------------------------------------------------
# Per-class Dice metrics


def _probs(labels: np.ndarray, k: int = 3) -> np.ndarray:
    return 0.6 * _one_hot(labels, k) + 0.4 / k


def test_class_dice_on_known_arrays():
    true = np.array([[0, 1, 1, 1, 2, 2, 0, 0]])
    pred = np.array([[0, 1, 1, 0, 2, 1, 2, 0]])
    one = ClassDice(1, name="dice_anterior")
    one.update_state(_one_hot(true, 3), _probs(pred))
    # class 1: TP 2, FP 1 (voxel 5), FN 1 (voxel 3) -> 4 / 6
    assert float(_np(one.result())) == pytest.approx(4 / 6)
    two = ClassDice(2)
    two.update_state(_one_hot(true, 3), _probs(pred))
    # class 2: TP 1, FP 1 (voxel 6), FN 1 (voxel 5) -> 2 / 4
    assert float(_np(two.result())) == pytest.approx(0.5)
    assert two.name == "dice_2"
    mean = MeanClassDice([1, 2])
    mean.update_state(_one_hot(true, 3), _probs(pred))
    assert float(_np(mean.result())) == pytest.approx((4 / 6 + 0.5) / 2)


def test_class_dice_accumulates_over_the_epoch_and_empty_is_one():
    metric = ClassDice(1)
    empty = np.zeros((1, 4), "int64")
    metric.update_state(_one_hot(empty, 2), _probs(empty, 2))
    assert float(_np(metric.result())) == 1.0  # absent from both
    metric.update_state(_one_hot(np.array([[1, 1, 0, 0]]), 2), _probs(np.array([[1, 0, 0, 0]]), 2))
    metric.update_state(_one_hot(np.array([[0, 0, 0, 0]]), 2), _probs(np.array([[0, 1, 0, 0]]), 2))
    # pooled: TP 1, FN 1, FP 1 -> 2 / 4 (per-batch Dice would be 2/3 and 0)
    assert float(_np(metric.result())) == pytest.approx(0.5)
    metric.reset_state()
    assert float(_np(metric.result())) == 1.0
    again = ClassDice.from_config(ClassDice(2, name="dice_posterior").get_config())
    assert (again.class_id, again.name) == (2, "dice_posterior")


def test_training_metric_names():
    names = [m.name for m in training_metrics("segmentation", 3, LABELS)]
    assert names[-3:] == ["dice", "dice_anterior", "dice_posterior"]
    assert "iou" in names and "iou_2" in names  # the 2D names stay
    odd = ["bg", "Left Hippocampus (head)", "left hippocampus head", ""]
    names = [m.name for m in training_metrics("segmentation", 4, odd)]
    assert names[-4:] == [
        "dice",
        "dice_left_hippocampus_head",
        "dice_left_hippocampus_head_2",
        "dice_3",
    ]
    assert [m.name for m in training_metrics("segmentation", 3)][-2:] == ["dice_1", "dice_2"]
    assert [m.name for m in training_metrics("segmentation", 1)] == ["dice", "iou"]
    assert metric_suffix("Posterior") == "posterior"


def test_fit_logs_per_class_dice():
    model = _tiny(base_filters=2)
    model.compile(
        optimizer="adam",
        loss=get_loss(TrainConfig(loss="dice_ce")),
        metrics=training_metrics("segmentation", 3, LABELS),
    )
    x = _volume((2, 16, 16, 16, 1))
    y = _one_hot(np.random.default_rng(0).integers(0, 3, (2, 16, 16, 16)), 3)
    history = model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0).history
    for key in ("val_dice_anterior", "val_dice_posterior", "val_dice", "dice_anterior"):
        assert 0.0 <= history[key][0] <= 1.0, key
