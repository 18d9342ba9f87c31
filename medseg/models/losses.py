"""Segmentation and classification losses, by name.

Keras 3's built-ins are used where they exist (``keras.losses.Dice``, ``BinaryFocalCrossentropy``,
``Tversky``, ``CategoricalCrossentropy``); :class:`BCEDice` combines two of them.
"""

from __future__ import annotations

import keras

from medseg.config import TrainConfig
from medseg.errors import ConfigError


@keras.saving.register_keras_serializable(package="medseg")
class BCEDice(keras.losses.Loss):
    """Binary cross-entropy plus soft Dice loss (computed over the whole batch).

    Args:
        bce_weight: weight of the cross-entropy term.
        dice_weight: weight of the Dice term.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, name="bce_dice", **kw):
        super().__init__(name=name, **kw)
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self._bce = keras.losses.BinaryCrossentropy()
        self._dice = keras.losses.Dice()

    def call(self, y_true, y_pred):
        return self.bce_weight * self._bce(y_true, y_pred) + self.dice_weight * self._dice(
            y_true, y_pred
        )

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "bce_weight": self.bce_weight,
            "dice_weight": self.dice_weight,
        }


LOSSES = {
    "bce_dice": lambda cfg: BCEDice(),
    "dice": lambda cfg: keras.losses.Dice(),
    "bce": lambda cfg: keras.losses.BinaryCrossentropy(),
    "focal": lambda cfg: keras.losses.BinaryFocalCrossentropy(gamma=2.0),
    # Keras' alpha weighs false negatives and beta false positives: 0.7/0.3 favours recall of
    # small lesions (Salehi et al. 2017).
    "tversky": lambda cfg: keras.losses.Tversky(alpha=0.7, beta=0.3),
    "categorical_crossentropy": lambda cfg: keras.losses.CategoricalCrossentropy(
        label_smoothing=cfg.label_smoothing
    ),
}


def get_loss(cfg: TrainConfig) -> keras.losses.Loss:
    """The loss named by ``cfg.loss``.

    Raises:
        ConfigError: unknown name; the message lists the valid ones.
    """
    try:
        factory = LOSSES[cfg.loss]
    except KeyError:
        raise ConfigError(
            f"train.loss: unknown loss '{cfg.loss}'; valid losses: {', '.join(LOSSES)}"
        ) from None
    return factory(cfg)
