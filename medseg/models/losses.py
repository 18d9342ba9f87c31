"""Segmentation and classification losses, by name.

Keras 3's built-ins are used where they exist (``keras.losses.Dice``, ``BinaryFocalCrossentropy``,
``Tversky``, ``CategoricalCrossentropy``); :class:`BCEDice`, :class:`FocalTversky` and
:class:`DiceCE` (softmax label maps) combine them.
"""

from __future__ import annotations

import keras
from keras import ops

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


@keras.saving.register_keras_serializable(package="medseg")
class FocalTversky(keras.losses.Loss):
    """Focal Tversky loss ``(1 - TI) ** gamma``, optionally plus binary cross-entropy.

    The Tversky index ``TI = TP / (TP + alpha * FN + beta * FP)`` (Salehi et al. 2017) is taken
    over the whole batch with ``keras.losses.tversky``; ``gamma < 1`` is the focal form of Abraham
    and Khan (2019), which keeps the gradient up on hard, nearly missed lesions.

    Args:
        alpha: weight of false negatives (``> beta`` favours recall).
        beta: weight of false positives.
        gamma: focal exponent (1 is the plain Tversky loss).
        bce_weight: weight of an added cross-entropy term (0 for none).

    Example:
        >>> loss = FocalTversky(alpha=0.7, beta=0.3, gamma=1.0, bce_weight=1.0)  # "bce_tversky"
    """

    def __init__(
        self,
        alpha: float = 0.7,
        beta: float = 0.3,
        gamma: float = 0.75,
        bce_weight: float = 0.0,
        name="focal_tversky",
        **kw,
    ):
        super().__init__(name=name, **kw)
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.bce_weight = bce_weight
        self._bce = keras.losses.BinaryCrossentropy()

    def call(self, y_true, y_pred):
        # keras.losses.tversky's ``alpha`` multiplies y_true * (1 - y_pred), the false negatives.
        loss = keras.losses.tversky(y_true, y_pred, alpha=self.alpha, beta=self.beta)
        if self.gamma != 1.0:
            loss = keras.ops.power(keras.ops.maximum(loss, keras.config.epsilon()), self.gamma)
        if self.bce_weight:
            loss = loss + self.bce_weight * self._bce(y_true, y_pred)
        return loss

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "alpha": self.alpha,
            "beta": self.beta,
            "gamma": self.gamma,
            "bce_weight": self.bce_weight,
        }


@keras.saving.register_keras_serializable(package="medseg")
class DiceCE(keras.losses.Loss):
    """Categorical cross-entropy plus ``1 - soft Dice`` of each class, for softmax label maps.

    nnU-Net's loss: the Dice of each class is taken over the whole batch (all voxels of all
    samples pooled, "batch dice"), ``(2 * sum(y * p) + smooth) / (sum(y) + sum(p) + smooth)``, and
    averaged over the classes (the foreground ones unless ``include_background``). A class absent
    from both truth and prediction scores 1. Works for ``[B, D, H, W, K]`` and ``[B, H, W, K]``
    one-hot targets.

    With deep supervision, compile one ``DiceCE`` per output with the loss weights of
    :func:`medseg.models.unet3d.deep_supervision_weights`.

    Args:
        include_background: also average the Dice of class 0.
        dice_weight: weight of the Dice term.
        ce_weight: weight of the cross-entropy term.
        smooth: added to the Dice numerator and denominator.
    """

    def __init__(
        self,
        include_background: bool = False,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        smooth: float = 1e-5,
        name: str = "dice_ce",
        **kw,
    ):
        super().__init__(name=name, **kw)
        self.include_background = include_background
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.smooth = smooth
        self._ce = keras.losses.CategoricalCrossentropy()

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        axes = tuple(range(len(y_pred.shape) - 1))  # everything but the classes
        tp = ops.sum(y_true * y_pred, axis=axes)
        denom = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
        dice = (2.0 * tp + self.smooth) / (denom + self.smooth)
        if not self.include_background:
            dice = dice[1:]
        loss = self.dice_weight * (1.0 - ops.mean(dice))
        if self.ce_weight:
            loss = loss + self.ce_weight * self._ce(y_true, y_pred)
        return loss

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "include_background": self.include_background,
            "dice_weight": self.dice_weight,
            "ce_weight": self.ce_weight,
            "smooth": self.smooth,
        }


LOSSES = {
    "bce_dice": lambda cfg: BCEDice(),
    "dice": lambda cfg: keras.losses.Dice(),
    "bce": lambda cfg: keras.losses.BinaryCrossentropy(),
    "focal": lambda cfg: keras.losses.BinaryFocalCrossentropy(gamma=2.0),
    # Keras' alpha weighs false negatives and beta false positives: 0.7/0.3 favours recall of
    # small lesions (Salehi et al. 2017).
    "tversky": lambda cfg: keras.losses.Tversky(alpha=0.7, beta=0.3),
    # Abraham & Khan (2019): gamma 0.75 (their 1/gamma with gamma 4/3).
    "focal_tversky": lambda cfg: FocalTversky(alpha=0.7, beta=0.3, gamma=0.75),
    # Cross-entropy keeps the pixel-wise gradient of bce_dice; Tversky tilts the overlap term
    # towards recall (the LGG recipe's errors are mostly missed tumour).
    "bce_tversky": lambda cfg: FocalTversky(
        alpha=0.7, beta=0.3, gamma=1.0, bce_weight=1.0, name="bce_tversky"
    ),
    "categorical_crossentropy": lambda cfg: keras.losses.CategoricalCrossentropy(
        label_smoothing=cfg.label_smoothing
    ),
    # softmax label maps (unet3d): cross-entropy + foreground batch Dice, as nnU-Net trains
    "dice_ce": lambda cfg: DiceCE(),
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
