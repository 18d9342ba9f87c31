"""Building blocks shared by medseg's models."""

from __future__ import annotations

from keras import layers


def bn_relu_dropout(x, *, batch_norm: bool, bn_momentum: float, dropout: float, name: str):
    """The tail of a conv block in the project's order: batch norm -> ReLU -> dropout.

    Args:
        x: output of a linear layer (conv without activation).
        batch_norm: add batch norm (with ``bn_momentum``) before the ReLU.
        bn_momentum: batch-norm momentum.
        dropout: dropout rate after the ReLU (0: none).
        name: prefix of the layer names (``<name>_bn``, ``<name>_relu``, ``<name>_dropout``).
    """
    if batch_norm:
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x
