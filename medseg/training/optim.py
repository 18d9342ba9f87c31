"""Optimizers and learning-rate schedules by name."""

from __future__ import annotations

import keras

from medseg.config import TrainConfig

OPTIMIZERS = {
    "adam": lambda lr: keras.optimizers.Adam(lr),
    "adamw": lambda lr: keras.optimizers.AdamW(lr),
    "sgd": lambda lr: keras.optimizers.SGD(lr),
    "nesterov": lambda lr: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
    "rmsprop": lambda lr: keras.optimizers.RMSprop(lr),
    "adagrad": lambda lr: keras.optimizers.Adagrad(lr),
    "adadelta": lambda lr: keras.optimizers.Adadelta(lr),
    "nadam": lambda lr: keras.optimizers.Nadam(lr),
}


def learning_rate_schedule(cfg: TrainConfig, steps_per_epoch: int):
    """Cosine decay from ``learning_rate`` to ``min_lr_fraction * learning_rate`` over the run,
    after a linear warm-up from 0 over ``warmup_epochs``; or the constant ``learning_rate``."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if warmup:
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0,
            decay_steps=max(1, total - warmup),
            alpha=cfg.min_lr_fraction,
            warmup_target=cfg.learning_rate,
            warmup_steps=warmup,
        )
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.learning_rate, decay_steps=total, alpha=cfg.min_lr_fraction
    )


def build_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer named by ``cfg.optimizer`` with the configured schedule."""
    return OPTIMIZERS[cfg.optimizer](learning_rate_schedule(cfg, steps_per_epoch))
