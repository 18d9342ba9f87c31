"""MobileNetV2 classifier (keras.applications backbone; weights None or a local weights file).

``keras.applications.MobileNetV2`` builds its batch-norm layers with momentum 0.999: trained from
scratch for a few hundred steps, their moving statistics never settle and inference-mode outputs
collapse to one class. The builder sets ``bn_momentum`` (default 0.9) on every batch-norm layer.
"""

from __future__ import annotations

import keras
from keras import layers

from medseg.errors import ModelError


def build_mobilenetv2_classifier(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    dropout: float = 0.2,
    l2: float = 0.0,
    bn_momentum: float = 0.9,
    weights: str | None = None,
    input_name: str = "image",
    name: str = "mobilenetv2_classifier",
) -> keras.Model:
    """MobileNetV2 backbone -> global average pooling -> dropout -> dense softmax.

    Args:
        input_shape: ``(height, width, channels)``; channels must be 3.
        num_classes: number of classes (>= 2).
        dropout: dropout before the dense head.
        l2: L2 penalty on the dense head's kernel.
        bn_momentum: momentum of every batch-norm layer of the backbone.
        weights: None (random initialisation) or the path of a local weights file.
        input_name: name of the model input.
        name: model name.

    Example:
        >>> model = build_mobilenetv2_classifier((96, 96, 3), 4)
        >>> model.output_shape
        (None, 4)
    """
    if input_shape[-1] != 3:
        raise ModelError(f"MobileNetV2 needs 3 input channels, got {input_shape[-1]}")
    if num_classes < 2:
        raise ModelError(f"a classifier needs >= 2 classes, got {num_classes}")
    inputs = keras.Input(shape=input_shape, name=input_name)
    # MobileNetV2 expects inputs in [-1, 1]; medseg's normalisation gives [0, 1] (minmax).
    x = layers.Rescaling(2.0, offset=-1.0, name="to_unit_range")(inputs)
    backbone = keras.applications.MobileNetV2(
        input_shape=input_shape, include_top=False, weights=weights, pooling=None
    )
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = bn_momentum
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    reg = keras.regularizers.L2(l2) if l2 > 0 else None
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=reg, dtype="float32", name="head"
    )(x)
    return keras.Model(inputs, outputs, name=name)
