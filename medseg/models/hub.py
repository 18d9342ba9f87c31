"""TF-Hub MobileNetV2 backbones: write a reusable SavedModel module, and use one inside Keras 3.

A TF-Hub *reusable SavedModel* (https://www.tensorflow.org/hub/reusable_saved_models) is a
SavedModel whose root object has

* ``__call__(inputs, training=False)``: float32 images ``[batch, height, width, 3]`` in [0, 1]
  -> pooled features ``[batch, features]``; ``training=True`` runs batch norm in training mode
  and updates its moving statistics;
* ``variables``, ``trainable_variables`` and ``regularization_losses`` (a list of zero-argument
  functions).

:func:`make_hub_module` writes such a module from ``keras.applications.MobileNetV2`` (random,
ImageNet or local-file weights), so that runs work without network access.

``hub.KerasLayer`` does not work inside Keras 3 models, and ``keras.layers.TFSMLayer`` exposes
variables whose names end in ``:0``, which Keras 3 optimizers reject. :class:`HubLayer` wraps
``hub.load(handle)`` itself: each of the module's ``tf.Variable`` objects is wrapped by a
``keras.Variable`` that *shares its storage* (on the TensorFlow backend ``keras.Variable(v)`` with a
``tf.Variable`` ``v`` keeps ``v`` as its value instead of copying it). The module's own functions
read and write these ``tf.Variable`` objects, so

* gradients taken with respect to the Keras variables (what ``model.fit`` and the optimizer use)
  flow through the module's functions, and the optimizer's updates are what the next call reads;
* the training-mode function's batch-norm updates land in the Keras (non-trainable) variables;
* ``model.save`` stores, and ``keras.models.load_model`` restores, the module's current values:
  loading rebuilds the layer from its ``handle`` (``hub.load`` again), then assigns the saved
  (fine-tuned) values through the Keras variables into the freshly loaded module.

Example:
    >>> path = make_hub_module("hub/mobilenetv2_035_96", input_size=96, alpha=0.35)
    >>> layer = HubLayer(str(path), trainable=True)
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import keras
import tensorflow as tf

from medseg.errors import ModelError, RunExistsError
from medseg.utils import atomic_write_json

#: file written next to ``saved_model.pb`` by :func:`make_hub_module`.
HUB_INFO_NAME = "medseg_hub.json"


def make_hub_module(
    out_dir: str | Path,
    *,
    input_size: int = 224,
    alpha: float = 1.0,
    weights: str | None = None,
    bn_momentum: float = 0.9,
    overwrite: bool = False,
) -> Path:
    """Write a MobileNetV2 feature-vector module in TF-Hub reusable SavedModel format.

    The module takes float32 images ``[batch, input_size, input_size, 3]`` in [0, 1] (it maps them
    to MobileNetV2's [-1, 1] itself) and returns globally average-pooled features
    ``[batch, 1280]`` (``1280 * alpha`` for ``alpha > 1``). Both the inference
    (``training=False``) and the training (``training=True``: batch norm uses batch statistics
    and updates its moving statistics with ``bn_momentum``) functions are saved.

    The folder is written under a temporary name and renamed when complete. It also holds
    ``medseg_hub.json`` (input size, alpha, source weights, feature size, versions).

    Args:
        out_dir: module folder to create.
        input_size: height and width of the input images (>= 32).
        alpha: MobileNetV2 width multiplier.
        weights: None (random initialisation), ``"imagenet"`` (downloads; needs network access)
            or the path of a local ``keras.applications`` MobileNetV2 weights file (no top) for
            this ``alpha``.
        bn_momentum: momentum of every batch-norm layer (keras.applications uses 0.999, too slow
            for short fine-tuning runs).
        overwrite: replace an existing folder.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        RunExistsError: ``out_dir`` exists and ``overwrite`` is false.
        ModelError: the weights cannot be loaded or the sizes are impossible.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise RunExistsError(f"{out}: folder exists; pass overwrite (--overwrite) to replace it")
    if input_size < 32:
        raise ModelError(f"MobileNetV2 needs inputs of at least 32x32, got {input_size}")
    if alpha <= 0:
        raise ModelError(f"alpha must be > 0, got {alpha}")
    weights = weights or None
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise ModelError(f"{weights}: weights file not found")
    backbone = _feature_backbone(input_size, alpha, weights, bn_momentum)
    root, serve = _reusable_root(backbone, input_size)
    info = {
        "format": "medseg-hub/1",
        "architecture": "MobileNetV2",
        "input_size": [input_size, input_size],
        "input_range": [0.0, 1.0],
        "alpha": alpha,
        "feature_dim": int(backbone.output_shape[-1]),
        "weights": weights,
        "bn_momentum": bn_momentum,
    }
    _save_module(out, root, serve, info)
    return out


def _feature_backbone(
    input_size: int, alpha: float, weights: str | None, bn_momentum: float
) -> keras.Model:
    """``keras.applications.MobileNetV2`` with average pooling and ``bn_momentum`` set."""
    try:
        backbone = keras.applications.MobileNetV2(
            input_shape=(input_size, input_size, 3),
            alpha=alpha,
            include_top=False,
            weights=weights,
            pooling="avg",
        )
    except Exception as e:  # keras raises ValueError, OSError, URL errors, ...
        raise ModelError(f"cannot build MobileNetV2 with weights={weights!r}: {e}") from e
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = bn_momentum
    return backbone


def _reusable_root(
    backbone: keras.Model, input_size: int
) -> tuple[tf.train.Checkpoint, tf.types.experimental.GenericFunction]:
    """The reusable SavedModel root object for ``backbone`` and its serving signature."""
    spec = tf.TensorSpec([None, input_size, input_size, 3], tf.float32, name="inputs")

    @tf.function
    def call(inputs, training=False):
        x = tf.cast(inputs, tf.float32) * 2.0 - 1.0  # [0, 1] -> MobileNetV2's [-1, 1]
        return backbone(x, training=training)

    @tf.function(input_signature=[spec])
    def serve(inputs):
        return {"features": call(inputs, training=False)}

    # Trace both modes: a reusable SavedModel must serve training=False and training=True.
    call.get_concrete_function(spec, training=False)
    call.get_concrete_function(spec, training=True)

    root = tf.train.Checkpoint()
    root.variables = [v.value for v in backbone.weights]
    root.trainable_variables = [v.value for v in backbone.trainable_weights]
    root.regularization_losses = []
    root.__call__ = call
    return root, serve


def _save_module(
    out: Path,
    root: tf.train.Checkpoint,
    serve: tf.types.experimental.GenericFunction,
    info: dict,
) -> None:
    """Save ``root`` and ``medseg_hub.json`` under a temporary name, then rename it to ``out``."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tf.saved_model.save(root, str(tmp), signatures={"serving_default": serve})
        import medseg

        versions = {
            "medseg": medseg.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        }
        atomic_write_json(tmp / HUB_INFO_NAME, {**info, "versions": versions})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_hub_module(handle: str):
    """``hub.load(handle)``, with a :class:`ModelError` naming the handle when it fails."""
    import tensorflow_hub as hub

    try:
        module = hub.load(handle)
    except Exception as e:  # no network, bad path, not a SavedModel, ...
        raise ModelError(
            f"cannot load TF-Hub module '{handle}': {type(e).__name__}: {e}".rstrip()
        ) from e
    if not callable(module) or not hasattr(module, "variables"):
        raise ModelError(
            f"TF-Hub module '{handle}' has no __call__ or no variables (not a reusable SavedModel)"
        )
    return module


def _is_local(handle: str) -> bool:
    return "://" not in handle and Path(handle).exists()


def _variable_name(v: tf.Variable, used: set[str]) -> str:
    """A Keras-valid, layer-unique name: no ``:0`` suffix (optimizers reject it), no ``/``."""
    base = re.sub(r":\d+$", "", v.name).replace("/", "_") or "variable"
    name, i = base, 1
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


@keras.saving.register_keras_serializable(package="medseg")
class HubLayer(keras.layers.Layer):
    """A TF-Hub reusable SavedModel (URL or local folder) as a Keras 3 layer.

    The module's variables become the layer's weights (trainable ones trainable, the rest, such as
    batch-norm moving statistics, non-trainable); they share storage with the module, so training,
    saving and loading act on what the module computes with. ``training`` is passed to the module
    only when the layer is trainable (as ``hub.KerasLayer`` does): a frozen backbone runs batch
    norm in inference mode and leaves its moving statistics alone.

    The layer computes in float32 (the module's dtype), whatever the global dtype policy.

    Args:
        handle: module URL or local SavedModel folder (existing local folders are stored as
            absolute paths, so a saved model reloads from another working directory).
        trainable: fine-tune the module's weights.
        output_dim: feature size, if known (checked against the module's output).

    Raises:
        ModelError: the module cannot be loaded (the message names the handle).
    """

    def __init__(
        self,
        handle: str,
        trainable: bool = False,
        output_dim: int | None = None,
        **kwargs,
    ):
        kwargs["dtype"] = "float32"
        super().__init__(trainable=trainable, **kwargs)
        handle = str(handle)
        self.handle = str(Path(handle).resolve()) if _is_local(handle) else handle
        self.output_dim = output_dim
        self._module = load_hub_module(self.handle)
        trainable_ids = {id(v) for v in getattr(self._module, "trainable_variables", [])}
        used: set[str] = set()
        with keras.name_scope(self.name):
            for v in self._module.variables:
                # keras.Variable(tf.Variable) wraps the tf.Variable itself: no copy.
                kv = keras.Variable(
                    v, trainable=id(v) in trainable_ids, name=_variable_name(v, used)
                )
                if kv.value is not v:  # pragma: no cover - guards a Keras behaviour change
                    raise ModelError(f"{self.handle}: Keras copied a module variable")
                self._track_variable(kv)
        self.built = True

    def call(self, inputs, training=None):
        training = bool(training) and self.trainable
        outputs = self._module(tf.cast(inputs, tf.float32), training=training)
        if training:
            for loss_fn in getattr(self._module, "regularization_losses", []):
                self.add_loss(loss_fn())
        if self.output_dim is not None:
            outputs = tf.ensure_shape(outputs, [None, self.output_dim])
        return outputs

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"handle": self.handle, "output_dim": self.output_dim})
        return config
