"""Each loss on hand-computed cases, and exact parameter counts of tiny builders."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.config import TrainConfig
from medseg.models.losses import LOSSES, get_loss

Y = np.array([[1.0, 0.0, 1.0, 0.0]], np.float32)
P = np.array([[0.9, 0.2, 0.6, 0.1]], np.float32)


def _bce(y, p):
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def _loss(name, **kw):
    return float(get_loss(TrainConfig(loss=name, **kw))(Y, P))


def test_dice_loss():
    # soft Dice over the batch: 2 * (0.9 + 0.6) / (2 + 1.8) = 3 / 3.8
    assert _loss("dice") == pytest.approx(1 - 3.0 / 3.8, rel=1e-5)


def test_bce_and_bce_dice():
    assert _loss("bce") == pytest.approx(_bce(Y, P), rel=1e-4)
    assert _loss("bce_dice") == pytest.approx(_bce(Y, P) + 1 - 3.0 / 3.8, rel=1e-4)


def test_focal_loss():
    # Keras' binary focal: -(1 - p_t)^gamma * log(p_t), gamma 2, no alpha balancing, mean.
    pt = np.where(Y == 1, P, 1 - P)
    expected = float(np.mean(-((1 - pt) ** 2) * np.log(pt)))
    assert _loss("focal") == pytest.approx(expected, rel=1e-4)
    assert _loss("focal") < _loss("bce")  # easy examples are down-weighted


def test_tversky_loss():
    # False negatives weigh 0.7 and false positives 0.3 (recall of small lesions first).
    tp = float(np.sum(Y * P))
    fp = float(np.sum((1 - Y) * P))
    fn = float(np.sum(Y * (1 - P)))
    expected = 1 - tp / (tp + 0.7 * fn + 0.3 * fp)
    assert _loss("tversky") == pytest.approx(expected, rel=1e-5)


def _tversky_index(alpha=0.7, beta=0.3):
    tp = float(np.sum(Y * P))
    fp = float(np.sum((1 - Y) * P))
    fn = float(np.sum(Y * (1 - P)))
    return tp / (tp + alpha * fn + beta * fp)


def test_focal_tversky_and_bce_tversky():
    # Abraham & Khan's focal form: (1 - TI) ** 0.75 lifts a small loss (here 0.227 -> 0.329).
    plain = 1 - _tversky_index()
    assert _loss("focal_tversky") == pytest.approx(plain**0.75, rel=1e-5)
    assert _loss("focal_tversky") > plain
    assert _loss("bce_tversky") == pytest.approx(_bce(Y, P) + plain, rel=1e-4)


def test_tversky_weighs_misses_above_false_alarms():
    from medseg.models.losses import FocalTversky

    y = np.array([[1.0, 1.0, 0.0, 0.0]], np.float32)
    missed = np.array([[0.9, 0.1, 0.1, 0.1]], np.float32)  # one tumour pixel missed
    extra = np.array([[0.9, 0.9, 0.9, 0.1]], np.float32)  # one false alarm instead
    for loss in (get_loss(TrainConfig(loss="bce_tversky")), FocalTversky(gamma=0.75)):
        assert float(loss(y, missed)) > float(loss(y, extra)), loss.name


def test_focal_tversky_config_round_trip():
    import keras

    from medseg.models.losses import FocalTversky

    loss = FocalTversky(alpha=0.6, beta=0.4, gamma=0.5, bce_weight=0.25, name="ft")
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(again, FocalTversky)
    assert (again.alpha, again.beta, again.gamma, again.bce_weight, again.name) == (
        0.6,
        0.4,
        0.5,
        0.25,
        "ft",
    )
    assert float(again(Y, P)) == pytest.approx(float(loss(Y, P)), rel=1e-6)


def test_categorical_crossentropy_with_label_smoothing():
    y = np.array([[0.0, 1.0, 0.0]], np.float32)
    p = np.array([[0.2, 0.7, 0.1]], np.float32)
    plain = float(get_loss(TrainConfig(loss="categorical_crossentropy"))(y, p))
    assert plain == pytest.approx(-math.log(0.7), rel=1e-5)
    smooth = float(
        get_loss(TrainConfig(loss="categorical_crossentropy", label_smoothing=0.3))(y, p)
    )
    target = y * 0.7 + 0.3 / 3
    assert smooth == pytest.approx(float(-np.sum(target * np.log(p))), rel=1e-5)


def test_every_registered_loss_is_zero_or_small_for_a_perfect_binary_prediction():
    perfect = np.clip(Y, 1e-7, 1 - 1e-7)
    for name in LOSSES:
        if name in ("categorical_crossentropy", "dice_ce"):  # categorical: need one-hot rows
            continue
        assert float(get_loss(TrainConfig(loss=name))(Y, perfect)) < 1e-3, name


def test_tiny_unet_parameter_count_by_hand():
    from medseg.models.unet import UNet

    model = UNet(input_shape=(16, 16, 1), base_filters=2, depth=1, batch_norm=False, dropout=0)
    enc = (9 * 1 * 2 + 2) + (9 * 2 * 2 + 2)  # two 3x3 convs, 1 -> 2 -> 2 channels
    bottleneck = (9 * 2 * 4 + 4) + (9 * 4 * 4 + 4)  # 2 -> 4 -> 4
    up = 2 * 2 * 4 * 2 + 2  # 2x2 transposed conv, 4 -> 2
    dec = (9 * 4 * 2 + 2) + (9 * 2 * 2 + 2)  # after the skip concat: 4 -> 2 -> 2
    head = 2 * 1 + 1
    assert model.count_params() == enc + bottleneck + up + dec + head == 431
    with_bn = UNet(input_shape=(16, 16, 1), base_filters=2, depth=1, batch_norm=True, dropout=0)
    # conv biases go (2+2+4+4+2+2 = 16), BN adds 4 per channel of each conv (64 in all)
    assert with_bn.count_params() == 431 - 16 + 4 * 16
