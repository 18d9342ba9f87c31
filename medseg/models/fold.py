"""Inference-time graph rewrites: batch norm folded into the convolution before it.

In inference mode a batch-norm layer is a per-channel affine map,
``y = gamma * (x - mean) / sqrt(var + eps) + beta``. When it directly follows a convolution
(or a dense layer) whose output nothing else reads, the map can be merged into that layer's
kernel and bias, so the exported graph runs one fused conv + bias (+ activation) instead of a
conv and four element-wise passes over the activations. On this project's reference U-Net
(256x256, CPU) that is the single largest inference speed-up (see docs/performance.md).
"""

from __future__ import annotations

import logging

import keras
import numpy as np
from keras import layers

logger = logging.getLogger(__name__)

_TRANSPOSED = (layers.Conv2DTranspose, layers.Conv3DTranspose)
_FOLDABLE = (layers.Conv2D, layers.Conv3D, layers.DepthwiseConv2D, *_TRANSPOSED, layers.Dense)


@keras.saving.register_keras_serializable(package="medseg")
class FoldedBatchNorm(layers.Layer):
    """Stands where a folded batch-norm layer was: passes its input through unchanged (it takes
    batch norm's ``training`` and ``mask`` arguments, so the graph's calls stay valid)."""

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def _producer(layer: layers.Layer):
    """The layer whose output ``layer`` reads, when it reads exactly one tensor once."""
    nodes = layer._inbound_nodes
    if len(nodes) != 1 or len(nodes[0].input_tensors) != 1:
        return None
    return nodes[0].input_tensors[0]._keras_history.operation


def _foldable_pairs(model: keras.Model) -> dict[str, layers.Layer]:
    """``{conv name: bn layer}`` for every batch norm that can be folded into its producer."""
    pairs = {}
    for layer in model._flatten_layers(include_self=False):
        if not isinstance(layer, layers.BatchNormalization) or layer.axis not in (-1, [-1]):
            continue
        conv = _producer(layer)
        if (
            isinstance(conv, _FOLDABLE)
            and len(conv._inbound_nodes) == 1
            and len(conv._outbound_nodes) == 1
            and conv.get_config().get("activation", "linear") == "linear"
            and not conv.dtype_policy.name.startswith("mixed")
        ):
            pairs[conv.name] = layer
    return pairs


def _folded_weights(conv: layers.Layer, bn: layers.BatchNormalization) -> list[np.ndarray]:
    """The conv's kernel and bias with ``bn`` merged in (scale along the output channels)."""
    weights = [np.asarray(w, np.float64) for w in conv.get_weights()]
    kernel = weights[0]
    n_out = kernel.shape[-2] if isinstance(conv, _TRANSPOSED) else None
    if isinstance(conv, layers.DepthwiseConv2D):
        n_out = kernel.shape[2] * kernel.shape[3]
    bias = weights[1] if len(weights) > 1 else np.zeros(n_out or kernel.shape[-1])
    gamma = np.asarray(bn.gamma, np.float64) if bn.scale else 1.0
    beta = np.asarray(bn.beta, np.float64) if bn.center else 0.0
    scale = gamma / np.sqrt(np.asarray(bn.moving_variance, np.float64) + bn.epsilon)
    if isinstance(conv, layers.DepthwiseConv2D):  # kernel [kh, kw, in, multiplier]
        kernel = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
    elif isinstance(conv, _TRANSPOSED):  # kernel [*spatial, out, in]
        kernel = kernel * scale[:, None]
    else:  # kernel [..., out]
        kernel = kernel * scale
    bias = (bias - np.asarray(bn.moving_mean, np.float64)) * scale + beta
    return [kernel.astype(np.float32), bias.astype(np.float32)]


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """A copy of a functional ``model`` for inference, with batch norm folded into convolutions.

    Every ``BatchNormalization`` (channels-last) whose input is the only output of a
    ``Conv2D``/``Conv3D``/``DepthwiseConv2D``/``Conv2DTranspose``/``Conv3DTranspose``/``Dense``
    without activation is replaced by a pass-through :class:`FoldedBatchNorm` (same name), and the
    producer gets the folded kernel and a bias. Other layers are copied with their weights; nested
    functional models (a ``keras.applications`` backbone) are rewritten too. The copy computes
    the same function as ``model`` in inference mode (up to float rounding) and is meant for
    export and prediction, not for training.

    Args:
        model: a functional Keras model (or a subclass built from inputs and outputs, such as
            :class:`medseg.models.unet.UNet`).

    Returns:
        The folded model (a plain ``keras.Model``), or ``model`` itself when it has nothing to
        fold.

    Example:
        >>> fast = fold_batch_norm(model)
        >>> np.allclose(fast.predict(x), model.predict(x), atol=1e-4)
        True
    """
    pairs = _foldable_pairs(model)
    if not pairs:
        return model
    folded_bn = {bn.name for bn in pairs.values()}

    def clone(layer: layers.Layer) -> layers.Layer:
        if layer.name in folded_bn:
            return FoldedBatchNorm(name=layer.name)
        config = layer.get_config()
        if layer.name in pairs:
            config["use_bias"] = True
        new = layer.__class__.from_config(config)
        return new

    plain = keras.Model(model.inputs, model.outputs, name=model.name)
    copy = keras.models.clone_model(plain, clone_function=clone, recursive=True)
    originals = {layer.name: layer for layer in model._flatten_layers(include_self=False)}
    for layer in copy._flatten_layers(include_self=False):
        if isinstance(layer, keras.Model) or not layer.weights:
            continue
        source = originals[layer.name]
        if layer.name in pairs:
            layer.set_weights(_folded_weights(source, pairs[layer.name]))
        else:
            layer.set_weights(source.get_weights())
    logger.debug("folded %d batch-norm layers of %s", len(pairs), model.name)
    return copy
