"""3D U-Net (Çiçek et al. 2016, in nnU-Net's form) for volumetric segmentation.

A plain Keras functional model built from Keras layers only (no custom layer), so it saves to
``.keras`` and reloads without registration. Each level has two blocks of Conv3D 3x3x3 -> norm ->
ReLU -> dropout; the encoder goes down by 2x2x2 max-pooling, the decoder up by 2x2x2 transposed
convolutions with skip concatenation; a 1x1x1 softmax head (float32, so mixed-precision safe)
named ``probabilities`` gives one channel per label, background included.

With ``deep_supervision`` the model has three outputs, ``[full, 1/2, 1/4]`` resolution (softmax
heads on the last three decoder levels, as nnU-Net trains); train it with one loss per output
(:func:`deep_supervision_weights`, targets from :func:`deep_supervision_targets`) and serve
:func:`inference_model`, which keeps only the full-resolution output.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from medseg.errors import ModelError

NORMS = ("batch", "instance", "none")
ACTIVATIONS = ("relu", "leaky_relu")
#: Outputs of a deep-supervision model: full, 1/2 and 1/4 resolution.
DEEP_SUPERVISION_OUTPUTS = 3


def level_filters(base_filters: int, depth: int, max_filters: int) -> list[int]:
    """Filters of each level, the bottleneck last: ``base * 2**level`` capped at ``max_filters``.

    Example:
        >>> level_filters(16, 4, 256)
        [16, 32, 64, 128, 256]
    """
    return [min(base_filters * 2**level, max_filters) for level in range(depth + 1)]


def _norm(x, norm: str, bn_momentum: float, name: str):
    if norm == "batch":
        return layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
    if norm == "instance":
        # groups=-1: one group per channel, statistics over the spatial axes of each sample.
        return layers.GroupNormalization(groups=-1, name=f"{name}_in")(x)
    return x


def conv_block3d(
    x,
    filters: int,
    *,
    norm: str,
    activation: str,
    dropout: float,
    bn_momentum: float,
    l2: float,
    name: str,
):
    """Two Conv3D 3x3x3 -> norm -> activation -> dropout blocks (layers ``<name>_conv1`` ...).

    The convolutions have no bias when a normalisation follows (its offset takes that role).
    """
    reg = keras.regularizers.L2(l2) if l2 > 0 else None
    for i in (1, 2):
        x = layers.Conv3D(
            filters,
            3,
            padding="same",
            use_bias=norm == "none",
            kernel_initializer="he_normal",
            kernel_regularizer=reg,
            name=f"{name}_conv{i}",
        )(x)
        x = _norm(x, norm, bn_momentum, f"{name}_{i}")
        if activation == "leaky_relu":
            x = layers.LeakyReLU(negative_slope=0.01, name=f"{name}_{i}_lrelu")(x)
        else:
            x = layers.ReLU(name=f"{name}_{i}_relu")(x)
        if dropout > 0:
            x = layers.Dropout(dropout, name=f"{name}_{i}_dropout")(x)
    return x


def _head(x, num_classes: int, name: str):
    return layers.Conv3D(num_classes, 1, activation="softmax", dtype="float32", name=name)(x)


def _check_args(
    input_channels: int, num_classes: int, depth: int, norm: str, activation: str, ds: bool
) -> None:
    if input_channels < 1:
        raise ModelError(f"unet3d: input_channels must be >= 1, got {input_channels}")
    if num_classes < 2:
        raise ModelError(
            f"unet3d: num_classes must be >= 2 (softmax, background included), got {num_classes}"
        )
    if depth < 1:
        raise ModelError(f"unet3d: depth must be >= 1, got {depth}")
    if norm not in NORMS:
        raise ModelError(f"unet3d: norm must be one of {', '.join(NORMS)}, got '{norm}'")
    if activation not in ACTIVATIONS:
        raise ModelError(
            f"unet3d: activation must be one of {', '.join(ACTIVATIONS)}, got '{activation}'"
        )
    if ds and depth < DEEP_SUPERVISION_OUTPUTS:
        raise ModelError(
            f"unet3d: deep supervision needs depth >= {DEEP_SUPERVISION_OUTPUTS} "
            f"(heads on three decoder levels), got depth {depth}"
        )


def build_unet3d(
    input_channels: int,
    num_classes: int,
    *,
    base_filters: int = 16,
    depth: int = 4,
    max_filters: int = 320,
    norm: str = "batch",
    dropout: float = 0.0,
    deep_supervision: bool = False,
    bn_momentum: float = 0.9,
    l2: float = 0.0,
    activation: str = "relu",
    input_name: str = "image",
    name: str = "unet3d",
) -> keras.Model:
    """Build a 3D U-Net with a softmax head.

    Args:
        input_channels: channels ``C`` of the input ``[B, D, H, W, C]``; the spatial size is free
            but must be divisible by ``2 ** depth`` at call time.
        num_classes: output channels, background included (>= 2).
        base_filters: filters of the first level, doubled at each level down.
        depth: number of poolings (levels = depth + 1, the bottleneck included).
        max_filters: cap on the filters of a level (nnU-Net: 320).
        norm: ``batch``, ``instance`` (``GroupNormalization(groups=-1)``) or ``none``.
        dropout: dropout rate after each activation (0: none).
        deep_supervision: three outputs ``[full, 1/2, 1/4]`` instead of one (needs depth >= 3).
        bn_momentum: batch-norm momentum.
        l2: L2 penalty on the 3x3x3 kernels (0: none).
        activation: ``relu`` (default; the peer benchmark's network) or ``leaky_relu`` (slope
            0.01, nnU-Net's).
        input_name: name of the input (the serving signature's key).
        name: model name.

    Returns:
        An uncompiled functional ``keras.Model``; its (first) output is named ``probabilities``,
        the deep-supervision outputs ``probabilities_ds1`` (1/2) and ``probabilities_ds2`` (1/4).

    Raises:
        ModelError: an argument out of range.

    Example:
        >>> model = build_unet3d(1, 3, base_filters=4, depth=2)
        >>> model(np.zeros((1, 16, 16, 16, 1), "float32")).shape
        (1, 16, 16, 16, 3)
    """
    _check_args(input_channels, num_classes, depth, norm, activation, deep_supervision)
    filters = level_filters(base_filters, depth, max_filters)
    block = {
        "norm": norm,
        "activation": activation,
        "dropout": dropout,
        "bn_momentum": bn_momentum,
        "l2": l2,
    }
    inputs = keras.Input(shape=(None, None, None, input_channels), name=input_name)
    x, skips = inputs, []
    for level in range(depth):
        x = conv_block3d(x, filters[level], name=f"enc{level}", **block)
        skips.append(x)
        x = layers.MaxPooling3D(2, name=f"pool{level}")(x)
    x = conv_block3d(x, filters[depth], name="bottleneck", **block)

    decoded = {}
    for level in reversed(range(depth)):
        x = layers.Conv3DTranspose(filters[level], 2, strides=2, name=f"up{level}")(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = conv_block3d(x, filters[level], name=f"dec{level}", **block)
        decoded[level] = x

    outputs = _head(decoded[0], num_classes, "probabilities")
    if deep_supervision:
        outputs = [outputs] + [
            _head(decoded[k], num_classes, f"probabilities_ds{k}")
            for k in range(1, DEEP_SUPERVISION_OUTPUTS)
        ]
    return keras.Model(inputs=inputs, outputs=outputs, name=name)


def inference_model(model: keras.Model) -> keras.Model:
    """The model with only its full-resolution output, sharing the weights.

    A no-op (the same object) for a single-output model.
    """
    if len(model.outputs) == 1:
        return model
    return keras.Model(inputs=model.input, outputs=model.outputs[0], name=model.name)


def deep_supervision_weights(num_outputs: int = DEEP_SUPERVISION_OUTPUTS) -> list[float]:
    """Loss weights of the outputs ``[full, 1/2, 1/4, ...]``: ``1, 1/2, 1/4, ...`` normalised.

    Example:
        >>> deep_supervision_weights(3)  # [4/7, 2/7, 1/7]
        [0.5714285714285714, 0.2857142857142857, 0.14285714285714285]
    """
    raw = [0.5**k for k in range(num_outputs)]
    return [w / sum(raw) for w in raw]


def deep_supervision_targets(y, num_outputs: int = DEEP_SUPERVISION_OUTPUTS) -> tuple:
    """One-hot targets for the outputs ``[full, 1/2, 1/4, ...]`` of a deep-supervision model.

    The coarser targets are the 2**k average pools of the one-hot map (each voxel gets the class
    shares of the voxels it covers; soft targets sum to 1, as linear resampling of one-hot maps).

    Args:
        y: one-hot targets ``[B, D, H, W, K]`` (or ``[B, H, W, K]``), sides divisible by
            ``2 ** (num_outputs - 1)``; a tensor or array (usable in a ``tf.data`` map).
        num_outputs: number of outputs.

    Returns:
        A tuple of ``num_outputs`` float32 targets, finest first (``fit`` takes it as ``y``).
    """
    y = ops.cast(y, "float32")
    return (y,) + tuple(
        ops.average_pool(y, pool_size=2**k, strides=2**k, padding="valid")
        for k in range(1, num_outputs)
    )
