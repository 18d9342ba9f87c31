"""MobileNetV2 U-Net: a ``keras.applications`` MobileNetV2 encoder with a U-Net decoder.

The design of the TensorFlow segmentation tutorial (https://www.tensorflow.org/tutorials/images/
segmentation): the encoder's activations at 1/2, 1/4, 1/8 and 1/16 of the input size are the skip
connections, its 1/32 output the bottleneck; each decoder step doubles the resolution and
concatenates a skip; a last transposed convolution restores the input size.
"""

from __future__ import annotations

import math
import os

import keras
from keras import layers

from medseg.errors import ModelError
from medseg.models.blocks import bn_relu_dropout

#: encoder layers giving the skip connections (1/2, 1/4, 1/8, 1/16) and the bottleneck (1/32).
SKIP_LAYERS = (
    "block_1_expand_relu",
    "block_3_expand_relu",
    "block_6_expand_relu",
    "block_13_expand_relu",
    "block_16_project",
)


def build_mobilenetv2_encoder(
    input_shape: tuple[int | None, int | None, int],
    *,
    alpha: float = 1.0,
    weights: str | None = None,
    bn_momentum: float = 0.9,
    name: str = "backbone",
) -> keras.Model:
    """The MobileNetV2 encoder: one output per entry of :data:`SKIP_LAYERS`, shallow to deep.

    Args:
        input_shape: ``(height, width, 3)``; expects inputs in [-1, 1].
        alpha: MobileNetV2 width multiplier.
        weights: None (random initialisation) or the path of a local weights file of
            ``keras.applications.MobileNetV2(include_top=False)`` with the same ``alpha``.
        bn_momentum: momentum of every batch-norm layer.
        name: name of the returned model.
    """
    # A named input: an automatic one ("input_layer_<n>") differs between two builds.
    inputs = keras.Input(shape=input_shape, name=f"{name}_input")
    base = keras.applications.MobileNetV2(
        input_tensor=inputs, include_top=False, weights=weights, alpha=alpha
    )
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = bn_momentum
    outputs = [base.get_layer(n).output for n in SKIP_LAYERS]
    return keras.Model(inputs, outputs, name=name)


def up_block(
    x,
    filters: int,
    *,
    upsampling: str,
    batch_norm: bool,
    dropout: float,
    l2: float,
    bn_momentum: float,
    name: str,
):
    """Double the resolution: upsample (conv) -> batch norm -> ReLU -> dropout."""
    reg = keras.regularizers.L2(l2) if l2 > 0 else None
    conv = {
        "padding": "same",
        "use_bias": not batch_norm,
        "kernel_initializer": "he_normal",
        "kernel_regularizer": reg,
        "name": f"{name}_conv",
    }
    if upsampling == "transpose":
        x = layers.Conv2DTranspose(filters, 3, strides=2, **conv)(x)
    else:
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_resize")(x)
        x = layers.Conv2D(filters, 3, **conv)(x)
    return bn_relu_dropout(
        x, batch_norm=batch_norm, bn_momentum=bn_momentum, dropout=dropout, name=name
    )


@keras.saving.register_keras_serializable(package="medseg")
class MobileNetV2UNet(keras.Model):
    """A U-Net whose encoder is MobileNetV2 (``keras.applications``), as a serialisable model.

    Images reach the model in [0, 1] (medseg's ``minmax`` normalisation); the model rescales them
    to the [-1, 1] that MobileNetV2 expects. The encoder is the nested model named ``backbone``.

    Args:
        input_shape: ``(height, width, 3)``; height and width must be divisible by 32 (None: any
            multiple of 32 at call time).
        num_classes: 1 for a binary mask (sigmoid head), >= 2 for a label map (softmax head).
        alpha: MobileNetV2 width multiplier (0.35, 0.5, 0.75, 1.0, 1.3, 1.4).
        weights: None (random initialisation) or the path of a local weights file of
            ``keras.applications.MobileNetV2(include_top=False, alpha=alpha)``. Only the
            constructor reads it: :meth:`from_config` (and so ``keras.models.load_model``, which
            restores the saved weights afterwards) builds a randomly initialised encoder, so a
            saved model loads without the file.
        freeze_backbone: make the encoder non-trainable (its batch norm then runs in inference
            mode). ``get_config`` reports the encoder's current state, so a model saved after
            ``model.get_layer("backbone").trainable = True`` reloads unfrozen.
        decoder_filters: filters of the decoder steps, deep to shallow (4 steps: 1/32 -> 1/2).
        dropout: dropout rate after each decoder step (0 disables it).
        batch_norm: decoder steps are conv -> batch norm -> ReLU when true, conv(+bias) -> ReLU
            when false. The encoder always has batch norm.
        upsampling: ``transpose`` (3x3 transposed conv, stride 2; the head too) or ``resize``
            (bilinear resize + 3x3 conv; the head too).
        l1: L1 penalty on the head's kernel.
        l2: L2 penalty on the decoder's and the head's kernels (not the encoder's).
        bn_momentum: momentum of every batch-norm layer, encoder included (keras.applications
            uses 0.999: its moving statistics never settle in a short run from scratch, so
            inference-mode outputs collapse).
        foreground_prior: initial foreground probability of the sigmoid head (bias
            ``log(p / (1 - p))``); None: bias 0. Ignored for a softmax head.
        input_name: name of the input (the serving signature's key).
        **kwargs: passed to :class:`keras.Model` (``name``, ``trainable``, ...).

    Example:
        >>> model = MobileNetV2UNet(input_shape=(64, 64, 3), num_classes=1, alpha=0.35)
        >>> model(np.zeros((2, 64, 64, 3), "float32")).shape
        (2, 64, 64, 1)
    """

    def __init__(
        self,
        input_shape: tuple[int | None, int | None, int] = (None, None, 3),
        num_classes: int = 1,
        alpha: float = 1.0,
        weights: str | None = None,
        freeze_backbone: bool = False,
        decoder_filters: tuple[int, int, int, int] = (512, 256, 128, 64),
        dropout: float = 0.0,
        batch_norm: bool = True,
        upsampling: str = "transpose",
        l1: float = 0.0,
        l2: float = 0.0,
        bn_momentum: float = 0.9,
        foreground_prior: float | None = 0.01,
        input_name: str = "image",
        **kwargs,
    ):
        input_shape = tuple(input_shape)
        decoder_filters = tuple(int(f) for f in decoder_filters)
        weights = str(weights) if weights else None
        if len(input_shape) != 3 or input_shape[-1] != 3:
            raise ModelError(f"MobileNetV2 U-Net needs 3 input channels, got shape {input_shape}")
        for side in input_shape[:2]:
            if side is not None and side % 32:
                raise ModelError(
                    f"MobileNetV2 U-Net input size {input_shape[:2]} must be divisible by 32"
                )
        if num_classes < 1:
            raise ModelError(f"num_classes must be >= 1, got {num_classes}")
        if upsampling not in ("transpose", "resize"):
            raise ModelError(f"upsampling must be 'transpose' or 'resize', got '{upsampling}'")
        if len(decoder_filters) != len(SKIP_LAYERS) - 1:
            raise ModelError(
                f"decoder_filters needs {len(SKIP_LAYERS) - 1} values (deep to shallow), "
                f"got {list(decoder_filters)}"
            )
        if weights is not None and not os.path.isfile(weights):
            raise ModelError(f"MobileNetV2 weights file not found: {weights}")
        kwargs.setdefault("name", "mobilenetv2_unet")

        # === Encoder ===
        inputs = keras.Input(shape=input_shape, name=input_name)
        # MobileNetV2 expects inputs in [-1, 1]; medseg's normalisation gives [0, 1] (minmax).
        x = layers.Rescaling(2.0, offset=-1.0, name="to_unit_range")(inputs)
        try:
            backbone = build_mobilenetv2_encoder(
                input_shape, alpha=alpha, weights=weights, bn_momentum=bn_momentum
            )
        except ValueError as e:  # bad alpha, or a weights file of another architecture
            raise ModelError(f"cannot build the MobileNetV2 encoder: {e}") from e
        backbone.trainable = not freeze_backbone
        *skips, x = backbone(x)

        # === Decoder ===
        block = {
            "upsampling": upsampling,
            "batch_norm": batch_norm,
            "dropout": dropout,
            "l2": l2,
            "bn_momentum": bn_momentum,
        }
        for level, filters in zip(reversed(range(len(skips))), decoder_filters, strict=True):
            x = up_block(x, filters, name=f"dec{level}", **block)
            x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])

        # === Head ===
        activation = "sigmoid" if num_classes == 1 else "softmax"
        bias = "zeros"
        if num_classes == 1 and foreground_prior is not None:
            bias = keras.initializers.Constant(math.log(foreground_prior / (1 - foreground_prior)))
        head = {
            "activation": activation,
            "padding": "same",
            "bias_initializer": bias,
            "kernel_regularizer": keras.regularizers.L1L2(l1=l1, l2=l2) if l1 or l2 else None,
            "dtype": "float32",  # float32 probabilities under mixed precision
            "name": "head",
        }
        if upsampling == "transpose":
            outputs = layers.Conv2DTranspose(num_classes, 3, strides=2, **head)(x)
        else:
            x = layers.UpSampling2D(2, interpolation="bilinear", name="head_resize")(x)
            outputs = layers.Conv2D(num_classes, 3, **head)(x)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.input_shape_ = input_shape
        self.num_classes = num_classes
        self.alpha = alpha
        self.backbone_weights = weights
        self.decoder_filters = decoder_filters
        self.dropout = dropout
        self.batch_norm = batch_norm
        self.upsampling = upsampling
        self.l1 = l1
        self.l2 = l2
        self.bn_momentum = bn_momentum
        self.foreground_prior = foreground_prior
        self.input_name = input_name

    @property
    def freeze_backbone(self) -> bool:
        return not self.get_layer("backbone").trainable

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "input_shape": list(self.input_shape_),
            "num_classes": self.num_classes,
            "alpha": self.alpha,
            "weights": self.backbone_weights,
            "freeze_backbone": self.freeze_backbone,
            "decoder_filters": list(self.decoder_filters),
            "dropout": self.dropout,
            "batch_norm": self.batch_norm,
            "upsampling": self.upsampling,
            "l1": self.l1,
            "l2": self.l2,
            "bn_momentum": self.bn_momentum,
            "foreground_prior": self.foreground_prior,
            "input_name": self.input_name,
        }

    @classmethod
    def from_config(cls, config: dict) -> MobileNetV2UNet:
        # The weights file is not read again (see ``weights``); the path stays in the config.
        config = dict(config)
        weights = config.pop("weights", None)
        model = cls(**config)
        model.backbone_weights = weights
        return model
