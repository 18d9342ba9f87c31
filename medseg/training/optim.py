"""Optimizers and learning-rate schedules by name."""

from __future__ import annotations

import keras

from medseg.config import TrainConfig

OPTIMIZERS = {
    "adam": lambda lr, **kw: keras.optimizers.Adam(lr, **kw),
    "adamw": lambda lr, **kw: keras.optimizers.AdamW(lr, **kw),
    "sgd": lambda lr, **kw: keras.optimizers.SGD(lr, **kw),
    "momentum": lambda lr, **kw: keras.optimizers.SGD(lr, momentum=0.9, **kw),
    "nesterov": lambda lr, **kw: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, **kw),
    "rmsprop": lambda lr, **kw: keras.optimizers.RMSprop(lr, **kw),
    "adagrad": lambda lr, **kw: keras.optimizers.Adagrad(lr, **kw),
    "adadelta": lambda lr, **kw: keras.optimizers.Adadelta(lr, **kw),
    "nadam": lambda lr, **kw: keras.optimizers.Nadam(lr, **kw),
}


def learning_rate_schedule(cfg: TrainConfig, steps_per_epoch: int):
    """The learning rate (schedule) of ``cfg.lr_schedule``.

    ``cosine``: cosine decay from ``learning_rate`` to ``min_lr_fraction * learning_rate`` over
    the run, after a linear warm-up from 0 over ``warmup_epochs``. ``cosine_restarts``: SGDR cycles
    of ``restart_epochs`` (each twice as long as the one before). ``constant``: ``learning_rate``.
    """
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if cfg.lr_schedule == "cosine_restarts":
        return keras.optimizers.schedules.CosineDecayRestarts(
            initial_learning_rate=cfg.learning_rate,
            first_decay_steps=max(1, int(round(cfg.restart_epochs * steps_per_epoch))),
            t_mul=2.0,
            m_mul=1.0,
            alpha=cfg.min_lr_fraction,
        )
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
    """The optimizer named by ``cfg.optimizer`` with the configured schedule and clipping.

    ``sgd`` is plain SGD, ``momentum`` SGD with momentum 0.9 and ``nesterov`` the same with
    Nesterov momentum.
    """
    kwargs = {"clipnorm": cfg.clipnorm} if cfg.clipnorm > 0 else {}
    return OPTIMIZERS[cfg.optimizer](learning_rate_schedule(cfg, steps_per_epoch), **kwargs)
