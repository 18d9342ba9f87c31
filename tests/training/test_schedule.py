"""Tests for medseg.training.optim: learning-rate schedules and optimizers by name."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import math  # noqa: E402

import keras  # noqa: E402
import pytest  # noqa: E402

from medseg.config import OPTIMIZERS as CONFIG_OPTIMIZERS  # noqa: E402
from medseg.config import TrainConfig  # noqa: E402
from medseg.training.optim import (  # noqa: E402
    OPTIMIZERS,
    build_optimizer,
    learning_rate_schedule,
)

PEAK = 1e-3
FLOOR = 1e-4  # min_lr_fraction 0.1 of the peak
STEPS_PER_EPOCH = 10
TOTAL = 100  # 10 epochs x 10 steps


def _cfg(**kw) -> TrainConfig:
    base = {
        "epochs": 10,
        "learning_rate": PEAK,
        "min_lr_fraction": 0.1,
        "warmup_epochs": 0,
        "lr_schedule": "cosine",
    }
    return TrainConfig(**{**base, **kw})


def _lr(schedule, step: int) -> float:
    return float(keras.ops.convert_to_numpy(schedule(step)))


def _cosine(step: int, start: int, length: int) -> float:
    """Reference cosine decay from PEAK to FLOOR over ``length`` steps starting at ``start``."""
    t = min(max(step - start, 0), length) / length
    return FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------------------------
# Cosine without warm-up


@pytest.fixture(scope="module")
def cosine():
    return learning_rate_schedule(_cfg(), STEPS_PER_EPOCH)


def test_cosine_starts_at_peak(cosine):
    assert _lr(cosine, 0) == pytest.approx(PEAK, rel=1e-5)


def test_cosine_middle_is_mean_of_peak_and_floor(cosine):
    assert _lr(cosine, TOTAL // 2) == pytest.approx((PEAK + FLOOR) / 2, rel=1e-5)


def test_cosine_ends_at_floor(cosine):
    assert _lr(cosine, TOTAL) == pytest.approx(FLOOR, rel=1e-5)
    # ...and stays there if training runs longer.
    assert _lr(cosine, TOTAL + 37) == pytest.approx(FLOOR, rel=1e-5)


@pytest.mark.parametrize("step", [10, 25, 75, 90])
def test_cosine_matches_reference(cosine, step: int):
    assert _lr(cosine, step) == pytest.approx(_cosine(step, 0, TOTAL), rel=1e-5)


def test_cosine_is_monotonically_decreasing(cosine):
    values = [_lr(cosine, s) for s in range(0, TOTAL + 1, 5)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_min_lr_fraction_zero_decays_to_zero():
    schedule = learning_rate_schedule(_cfg(min_lr_fraction=0.0), STEPS_PER_EPOCH)
    assert _lr(schedule, TOTAL) == pytest.approx(0.0, abs=1e-10)
    assert _lr(schedule, TOTAL // 2) == pytest.approx(PEAK / 2, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Cosine with warm-up


@pytest.fixture(scope="module")
def warmup():
    return learning_rate_schedule(_cfg(warmup_epochs=2), STEPS_PER_EPOCH)


def test_warmup_starts_at_zero(warmup):
    assert _lr(warmup, 0) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("step", [5, 10, 15])
def test_warmup_is_linear(warmup, step: int):
    assert _lr(warmup, step) == pytest.approx(PEAK * step / 20, rel=1e-5)


def test_warmup_half_of_peak_at_step_10(warmup):
    assert _lr(warmup, 10) == pytest.approx(PEAK / 2, rel=1e-5)


def test_warmup_reaches_peak(warmup):
    assert _lr(warmup, 20) == pytest.approx(PEAK, rel=1e-5)


def test_warmup_then_cosine_midpoint(warmup):
    # Decay runs over steps 20..100: its midpoint is step 60.
    assert _lr(warmup, 60) == pytest.approx((PEAK + FLOOR) / 2, rel=1e-5)
    assert _lr(warmup, 40) == pytest.approx(_cosine(40, 20, 80), rel=1e-5)


def test_warmup_ends_at_floor(warmup):
    assert _lr(warmup, TOTAL) == pytest.approx(FLOOR, rel=1e-5)


def test_fractional_warmup_epochs_round_to_steps():
    schedule = learning_rate_schedule(_cfg(warmup_epochs=0.5), STEPS_PER_EPOCH)
    assert _lr(schedule, 0) == pytest.approx(0.0, abs=1e-12)
    assert _lr(schedule, 5) == pytest.approx(PEAK, rel=1e-5)
    assert _lr(schedule, TOTAL) == pytest.approx(FLOOR, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Constant


def test_constant_returns_the_float():
    lr = learning_rate_schedule(_cfg(lr_schedule="constant", learning_rate=3e-4), STEPS_PER_EPOCH)
    assert isinstance(lr, float)
    assert lr == 3e-4


def test_constant_optimizer_learning_rate():
    opt = build_optimizer(_cfg(lr_schedule="constant", learning_rate=3e-4), STEPS_PER_EPOCH)
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == pytest.approx(3e-4)


# ---------------------------------------------------------------------------------------------
# Optimizers

EXPECTED_CLASS = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": keras.optimizers.SGD,
    "momentum": keras.optimizers.SGD,
    "nesterov": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
    "adagrad": keras.optimizers.Adagrad,
    "adadelta": keras.optimizers.Adadelta,
    "nadam": keras.optimizers.Nadam,
}


def test_every_config_optimizer_is_registered():
    assert set(OPTIMIZERS) == set(CONFIG_OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_build_optimizer_class(name: str):
    opt = build_optimizer(_cfg(optimizer=name), STEPS_PER_EPOCH)
    # type() rather than isinstance: AdamW subclasses Adam.
    assert type(opt) is EXPECTED_CLASS[name]
    # The cosine schedule is attached: the learning rate follows the step counter.
    opt.iterations.assign(TOTAL // 2)
    lr = float(keras.ops.convert_to_numpy(opt.learning_rate))
    assert lr == pytest.approx((PEAK + FLOOR) / 2, rel=1e-5)


def test_nesterov_has_nesterov_momentum():
    opt = build_optimizer(_cfg(optimizer="nesterov"), STEPS_PER_EPOCH)
    assert opt.nesterov is True
    assert opt.momentum == pytest.approx(0.9)
    plain = build_optimizer(_cfg(optimizer="sgd"), STEPS_PER_EPOCH)
    assert plain.nesterov is False


def test_optimizer_schedule_follows_iterations():
    opt = build_optimizer(_cfg(optimizer="sgd"), STEPS_PER_EPOCH)
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == pytest.approx(PEAK, rel=1e-5)
    opt.iterations.assign(TOTAL)
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == pytest.approx(FLOOR, rel=1e-5)


def test_momentum_variants_and_clipping():
    plain = build_optimizer(_cfg(optimizer="sgd"), STEPS_PER_EPOCH)
    momentum = build_optimizer(_cfg(optimizer="momentum"), STEPS_PER_EPOCH)
    assert plain.momentum == 0.0 and momentum.momentum == 0.9 and not momentum.nesterov
    clipped = build_optimizer(_cfg(optimizer="adam", clipnorm=1.5), STEPS_PER_EPOCH)
    assert clipped.clipnorm == 1.5
    assert build_optimizer(_cfg(optimizer="adam"), STEPS_PER_EPOCH).clipnorm is None


def test_cosine_restarts_restart_at_the_peak():
    # First cycle: 2 epochs x 10 steps = 20 steps; the second is twice as long (t_mul 2).
    sched = learning_rate_schedule(
        _cfg(lr_schedule="cosine_restarts", restart_epochs=2.0), STEPS_PER_EPOCH
    )
    lr = [float(keras.ops.convert_to_numpy(sched(step))) for step in (0, 10, 19, 20, 40, 60)]
    assert lr[0] == pytest.approx(PEAK)
    assert lr[1] == pytest.approx((PEAK + FLOOR) / 2, rel=1e-5)  # middle of cycle 1
    assert lr[2] < 0.2 * PEAK  # end of cycle 1
    assert lr[3] == pytest.approx(PEAK)  # restart
    assert lr[4] == pytest.approx((PEAK + FLOOR) / 2, rel=1e-5)  # middle of cycle 2 (40 steps)
    assert lr[5] == pytest.approx(PEAK)  # second restart
