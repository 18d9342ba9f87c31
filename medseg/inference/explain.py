"""Grad-CAM heatmaps for classifiers (Selvaraju et al. 2017), and heatmap overlays.

For class ``c`` and a convolutional feature map ``A`` (``[h, w, channels]``) of the network::

    alpha_k = mean over (i, j) of d y_c / d A[i, j, k]      (global-average-pooled gradients)
    cam     = ReLU(sum_k alpha_k * A[..., k])               ([h, w])
    heatmap = cam / max(cam), bilinearly resized to the input size, in [0, 1]

``y_c`` is the class score *before* the softmax when the output layer is a ``Dense`` with a
softmax activation (medseg's classifiers), the output probability otherwise. A heatmap whose cam
is zero everywhere (no positive evidence for the class in that map) stays all zeros.

The feature map is, by default, the output of the nested ``keras.applications`` model named
``"backbone"`` (MobileNetV2's last convolutional block), or the last layer inside the backbone
with a larger-than-1x1 output (padding layers excluded) when the backbone's output is 1x1 (small
inputs: a 1x1 map gives a constant heatmap). Models without a backbone use their last layer with
a 4D output. A TF-Hub backbone (:class:`medseg.models.hub.HubLayer`) returns pooled features
only, so there is no feature map to explain: :class:`~medseg.errors.ModelError`.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from medseg.data.overlay import to_display
from medseg.data.preprocess import Preprocessing
from medseg.errors import ModelError
from medseg.models.mobilenet import BACKBONE

HUB_MESSAGE = (
    "Grad-CAM needs an inner convolutional feature map, and the TF-Hub backbone '{name}' does "
    "not expose one (a hub feature-vector module returns pooled features only); use a model "
    "with a keras.applications backbone (model.hub_handle empty) to explain predictions"
)


# layers whose output is not a feature map of their own (padding only adds zeros at the border)
_NOT_FEATURES = (keras.layers.InputLayer, keras.layers.ZeroPadding2D)


def _is_map(tensor) -> bool:
    return len(tensor.shape) == 4


def _larger_than_1x1(tensor) -> bool:
    h, w = tensor.shape[1:3]
    return h is None or w is None or h * w > 1


def _last_map_layer(model: keras.Model, exclude_1x1: bool) -> keras.layers.Layer | None:
    for layer in reversed(model.layers):
        if isinstance(layer, _NOT_FEATURES) or not _is_map(layer.output):
            continue
        if not exclude_1x1 or _larger_than_1x1(layer.output):
            return layer
    return None


def _find_target(model: keras.Model, layer_name: str | None):
    """``(container, layer)``: the layer whose output is explained, and the model holding it
    (``model`` itself, or a nested model such as the backbone)."""
    if len(model.output_shape) != 2:
        raise ModelError(
            f"Grad-CAM explains classifiers (output [batch, classes]); model '{model.name}' "
            f"outputs {model.output_shape}"
        )
    outer = {la.name: la for la in model.layers}
    backbone = outer.get(BACKBONE)
    if layer_name and layer_name in outer and not isinstance(outer[layer_name], keras.Model):
        layer = outer[layer_name]
        if not _is_map(layer.output):
            raise ModelError(
                f"Grad-CAM layer '{layer_name}' outputs {layer.output.shape}, not a feature map "
                "[batch, height, width, channels]"
            )
        return model, layer
    if layer_name and layer_name in outer:
        backbone, layer_name = outer[layer_name], None  # a nested model: its default map
    if backbone is not None and not isinstance(backbone, keras.Model):
        raise ModelError(HUB_MESSAGE.format(name=backbone.name))
    if backbone is None:
        if layer_name:
            raise ModelError(
                f"model '{model.name}' has no layer '{layer_name}' for Grad-CAM; layers: "
                f"{', '.join(outer)}"
            )
        layer = _last_map_layer(model, exclude_1x1=False)
        if layer is None:
            raise ModelError(f"model '{model.name}' has no layer with a 4D feature map")
        return model, layer
    if layer_name:
        try:
            layer = backbone.get_layer(layer_name)
        except ValueError:
            raise ModelError(
                f"neither model '{model.name}' nor its backbone '{backbone.name}' has a layer "
                f"'{layer_name}' for Grad-CAM"
            ) from None
        if not _is_map(layer.output):
            raise ModelError(
                f"Grad-CAM layer '{layer_name}' outputs {layer.output.shape}, not a feature map"
            )
        return backbone, layer
    layer = _last_map_layer(backbone, exclude_1x1=True) or _last_map_layer(backbone, False)
    if layer is None:
        raise ModelError(f"backbone '{backbone.name}' has no layer with a 4D feature map")
    return backbone, layer


class GradCAM:
    """Grad-CAM for one classifier and feature map, built once and applied to many batches.

    Args:
        model: a Keras classifier (output ``[batch, classes]``).
        layer_name: the layer whose output feature map is explained: a layer of ``model`` or of
            its nested ``backbone`` model; None for the default (see the module docstring).

    Raises:
        ModelError: not a classifier, a TF-Hub backbone, no such layer or no 4D feature map.
    """

    def __init__(self, model: keras.Model, layer_name: str | None = None):
        container, layer = _find_target(model, layer_name)
        self.model = model
        self.layer_name: str = layer.name
        head = model.layers[-1]
        self._logits = (
            isinstance(head, keras.layers.Dense)
            and getattr(head.activation, "__name__", "") == "softmax"
        )
        self._head = head
        captured: dict = {}

        if container is model:

            def call(op, *args, **kwargs):
                out = op(*args, **kwargs)
                if op is layer:
                    captured["features"] = out
                if op is head:
                    captured["head_input"] = args[0]
                return out

        else:
            inner = keras.Model(container.inputs, [layer.output, container.outputs[0]])

            def call(op, *args, **kwargs):
                if op is container:
                    captured["features"], out = inner(*args, **kwargs)
                    return out
                if op is head:
                    captured["head_input"] = args[0]
                return op(*args, **kwargs)

        graph = keras.models.clone_model(model, clone_function=lambda la: la, call_function=call)
        self._grad_model = keras.Model(
            graph.inputs[0], [captured["features"], captured["head_input"], graph.outputs[0]]
        )

    def __call__(
        self, images, class_index=None, *, prep: Preprocessing | dict | None = None
    ) -> np.ndarray:
        """Heatmaps float32 ``[N, H, W]`` in [0, 1] at the input size.

        Args:
            images: float ``[N, H, W, C]`` model inputs, or raw pixels when ``prep`` is given.
            class_index: None (each image's predicted class), an int (for all images) or one
                int per image.
            prep: the model's :class:`~medseg.data.preprocess.Preprocessing` (or its fields as
                a dict): ``images`` are raw pixels, preprocessed as in training, and the
                heatmaps are mapped back to their size.
        """
        if isinstance(prep, dict):
            prep = Preprocessing(**prep)
        x = tf.convert_to_tensor(images, tf.float32)
        raw_hw = tf.shape(x)[1:3]
        if prep is not None:
            x = prep.apply(x)
        with tf.GradientTape() as tape:
            features, head_input, probs = self._grad_model(x, training=False)
            features = tf.cast(features, tf.float32)
            if self._logits:
                scores = tf.matmul(tf.cast(head_input, tf.float32), self._head.kernel)
                if self._head.use_bias:
                    scores = scores + self._head.bias
            else:
                scores = tf.cast(probs, tf.float32)
            idx = self._classes(class_index, probs)
            score = tf.reduce_sum(tf.gather(scores, idx, axis=1, batch_dims=1))
        grads = tape.gradient(score, features)
        if grads is None:
            raise ModelError(
                f"Grad-CAM: the class score does not depend on layer '{self.layer_name}'"
            )
        weights = tf.reduce_mean(grads, axis=[1, 2])  # [N, channels]
        cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", features, weights))
        peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)
        cam = tf.image.resize(cam[..., tf.newaxis], tf.shape(x)[1:3], method="bilinear")
        if prep is not None:
            cam = prep.restore(cam, raw_hw)
        return np.clip(cam[..., 0].numpy(), 0.0, 1.0).astype(np.float32)

    @staticmethod
    def _classes(class_index, probs) -> tf.Tensor:
        n = int(probs.shape[0])
        if class_index is None:
            return tf.argmax(probs, axis=-1, output_type=tf.int32)
        idx = np.broadcast_to(np.asarray(class_index, np.int32), (n,))
        k = int(probs.shape[-1])
        if (idx < 0).any() or (idx >= k).any():
            raise ModelError(f"Grad-CAM class_index {class_index} out of range for {k} classes")
        return tf.constant(idx)


def grad_cam(
    model: keras.Model,
    images,
    class_index=None,
    layer_name: str | None = None,
    *,
    prep: Preprocessing | dict | None = None,
) -> np.ndarray:
    """Grad-CAM heatmaps float32 ``[N, H, W]`` in [0, 1] at the input size (see :class:`GradCAM`;
    build a :class:`GradCAM` once to explain many batches with the same model)."""
    return GradCAM(model, layer_name)(images, class_index, prep=prep)


def heatmap_overlay(
    image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, cmap: str = "jet"
) -> np.ndarray:
    """Blend ``heatmap`` (HxW in [0, 1]) in a matplotlib colormap over ``image``; HxWx3 uint8.

    The image is shown as :func:`medseg.data.overlay.to_display` shows it (1st-99th percentile
    stretch); a heatmap of another size is resized (bilinear) to the image's.
    """
    from matplotlib import colormaps

    base = to_display(image).astype(np.float32)
    heat = np.asarray(heatmap, np.float32)
    if heat.ndim != 2:
        raise ModelError(f"heatmap must be HxW, got shape {heat.shape}")
    if heat.shape != base.shape[:2]:
        heat = tf.image.resize(heat[..., None], base.shape[:2], method="bilinear")[..., 0].numpy()
    colored = colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    return ((1 - alpha) * base + alpha * colored).round().clip(0, 255).astype(np.uint8)
