"""U-Net (Ronneberger et al. 2015) for 2D segmentation, as a serialisable Keras functional model."""

from __future__ import annotations

import math

import keras
from keras import layers

from medseg.errors import ModelError
from medseg.models.blocks import bn_relu_dropout


def conv_block(
    x,
    filters: int,
    *,
    batch_norm: bool,
    dropout: float,
    l2: float,
    bn_momentum: float = 0.9,
    name: str,
):
    """Two 3x3 convolutions, each conv -> batch norm -> ReLU, then dropout."""
    reg = keras.regularizers.L2(l2) if l2 > 0 else None
    for i in (1, 2):
        x = layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=not batch_norm,
            kernel_initializer="he_normal",
            kernel_regularizer=reg,
            name=f"{name}_conv{i}",
        )(x)
        x = bn_relu_dropout(
            x,
            batch_norm=batch_norm,
            bn_momentum=bn_momentum,
            dropout=dropout if i == 2 else 0.0,
            name=f"{name}_{i}",
        )
    return x


@keras.saving.register_keras_serializable(package="medseg")
class UNet(keras.Model):
    """A U-Net: an encoder of conv blocks and max-pooling, a mirrored decoder with skip connections.

    Args:
        input_shape: ``(height, width, channels)``; height and width may be None, but must be
            divisible by ``2 ** depth`` at call time.
        num_classes: 1 for a binary mask (sigmoid head), >= 2 for a label map (softmax head).
        base_filters: filters of the first level; doubled at each level down.
        depth: number of down-sampling steps.
        dropout: dropout rate after each conv block (0 disables it).
        batch_norm: conv -> batch norm -> ReLU when true, conv(+bias) -> ReLU when false.
        upsampling: ``transpose`` (2x2 transposed conv) or ``resize`` (bilinear resize + 3x3 conv).
        l2: L2 weight decay on conv kernels.
        l1: L1 penalty on the output layer's kernel (regularisation near the output).
        bn_momentum: batch-norm momentum. Keras' default 0.99 leaves the moving statistics far
            from the data after a few hundred steps, so inference-mode outputs are wrong in short
            runs; 0.9 settles in tens of steps.
        foreground_prior: initial foreground probability of the sigmoid head (its bias is set to
            ``log(p / (1 - p))``, as in RetinaNet). Lesions cover ~1% of a slice; starting at 0.5
            spends the first hundreds of steps only pushing the background down. None: bias 0.
        input_name: name of the input (the serving signature's key).
        **kwargs: passed to :class:`keras.Model` (``name``, ``trainable``, ...).

    Example:
        >>> model = UNet(input_shape=(64, 64, 3), num_classes=1, base_filters=8, depth=3)
        >>> model(np.zeros((2, 64, 64, 3), "float32")).shape
        (2, 64, 64, 1)
    """

    def __init__(
        self,
        input_shape: tuple[int | None, int | None, int] = (None, None, 3),
        num_classes: int = 1,
        base_filters: int = 16,
        depth: int = 4,
        dropout: float = 0.1,
        batch_norm: bool = True,
        upsampling: str = "transpose",
        l2: float = 0.0,
        l1: float = 0.0,
        bn_momentum: float = 0.9,
        foreground_prior: float | None = 0.01,
        input_name: str = "image",
        **kwargs,
    ):
        input_shape = tuple(input_shape)
        for side in input_shape[:2]:
            if side is not None and side % (2**depth):
                raise ModelError(
                    f"U-Net input size {input_shape[:2]} must be divisible by 2**depth = "
                    f"{2**depth} (depth {depth})"
                )
        if upsampling not in ("transpose", "resize"):
            raise ModelError(f"upsampling must be 'transpose' or 'resize', got '{upsampling}'")
        block = {"batch_norm": batch_norm, "dropout": dropout, "l2": l2, "bn_momentum": bn_momentum}

        # === Encoder ===
        inputs = keras.Input(shape=input_shape, name=input_name)
        x = inputs
        skips = []
        for level in range(depth):
            x = conv_block(x, base_filters * 2**level, name=f"enc{level}", **block)
            skips.append(x)
            x = layers.MaxPooling2D(2, name=f"pool{level}")(x)

        # === Bottleneck ===
        x = conv_block(x, base_filters * 2**depth, name="bottleneck", **block)

        # === Decoder ===
        for level in reversed(range(depth)):
            filters = base_filters * 2**level
            if upsampling == "transpose":
                x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"up{level}")(x)
            else:
                x = layers.UpSampling2D(2, interpolation="bilinear", name=f"up{level}_resize")(x)
                x = layers.Conv2D(filters, 3, padding="same", name=f"up{level}")(x)
            x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
            x = conv_block(x, filters, name=f"dec{level}", **block)

        # === Head ===
        activation = "sigmoid" if num_classes == 1 else "softmax"
        bias = "zeros"
        if num_classes == 1 and foreground_prior is not None:
            bias = keras.initializers.Constant(math.log(foreground_prior / (1 - foreground_prior)))
        outputs = layers.Conv2D(
            num_classes,
            1,
            activation=activation,
            bias_initializer=bias,
            kernel_regularizer=keras.regularizers.L1(l1) if l1 > 0 else None,
            dtype="float32",
            name="head",
        )(x)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.input_shape_ = input_shape
        self.num_classes = num_classes
        self.base_filters = base_filters
        self.depth = depth
        self.dropout = dropout
        self.batch_norm = batch_norm
        self.upsampling = upsampling
        self.l2 = l2
        self.l1 = l1
        self.bn_momentum = bn_momentum
        self.foreground_prior = foreground_prior
        self.input_name = input_name

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "input_shape": list(self.input_shape_),
            "num_classes": self.num_classes,
            "base_filters": self.base_filters,
            "depth": self.depth,
            "dropout": self.dropout,
            "batch_norm": self.batch_norm,
            "upsampling": self.upsampling,
            "l2": self.l2,
            "l1": self.l1,
            "bn_momentum": self.bn_momentum,
            "foreground_prior": self.foreground_prior,
            "input_name": self.input_name,
        }

    @classmethod
    def from_config(cls, config: dict) -> UNet:
        return cls(**config)
