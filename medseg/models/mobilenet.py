"""MobileNetV2 classifier: a ``keras.applications`` or TF-Hub backbone with a dense softmax head.

``keras.applications.MobileNetV2`` builds its batch-norm layers with momentum 0.999: trained from
scratch for a few hundred steps, their moving statistics never settle and inference-mode outputs
collapse to one class. The builder sets ``bn_momentum`` (default 0.9) on every batch-norm layer of
a ``keras.applications`` backbone; a TF-Hub module carries the momentum it was written with (see
:func:`medseg.models.hub.make_hub_module`).

The backbone layer is named ``"backbone"`` whichever kind it is, so that training code can freeze
it (``freeze_backbone``) and unfreeze it mid-run with :class:`FineTuneAfter`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
from keras import layers

from medseg.errors import ModelError
from medseg.models.hub import HubLayer

logger = logging.getLogger(__name__)

BACKBONE = "backbone"


def build_mobilenetv2_classifier(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    dropout: float = 0.2,
    l1: float = 0.0,
    l2: float = 0.0,
    bn_momentum: float = 0.9,
    weights: str | None = None,
    alpha: float = 1.0,
    hub_handle: str | None = None,
    freeze_backbone: bool = False,
    input_name: str = "image",
    name: str = "mobilenetv2_classifier",
) -> keras.Model:
    """MobileNetV2 backbone -> (global average pooling) -> dropout -> dense softmax.

    Inputs are images in [0, 1] (medseg's ``minmax`` normalisation). A TF-Hub module takes them
    as they are (the TF-Hub image convention); the ``keras.applications`` backbone gets them
    rescaled to [-1, 1].

    Args:
        input_shape: ``(height, width, channels)``; channels must be 3. With ``hub_handle`` the
            size must be one the module accepts.
        num_classes: number of classes (>= 2).
        dropout: dropout before the dense head.
        l1: L1 penalty on the dense head's kernel.
        l2: L2 penalty on the dense head's kernel.
        bn_momentum: momentum of every batch-norm layer of a ``keras.applications`` backbone
            (a TF-Hub module keeps its own).
        weights: ``keras.applications`` backbone: None or ``""`` (random initialisation), the
            path of a local weights file for this ``alpha`` (no top), or ``"imagenet"`` (needs
            network access). Not allowed with ``hub_handle``.
        alpha: ``keras.applications`` width multiplier (a TF-Hub module has its own).
        hub_handle: TF-Hub feature-vector module (URL or local SavedModel folder, e.g. written by
            :func:`medseg.models.hub.make_hub_module`); None or ``""`` for ``keras.applications``.
        freeze_backbone: build with the backbone frozen (``trainable=False``: its weights and
            batch-norm statistics stay fixed); :class:`FineTuneAfter` unfreezes it.
        input_name: name of the model input.
        name: model name.

    Raises:
        ModelError: wrong channels or classes, weights with a hub handle, a missing weights file,
            a module that cannot be loaded or does not accept ``input_shape``.

    Example:
        >>> model = build_mobilenetv2_classifier((96, 96, 3), 4)
        >>> model.output_shape
        (None, 4)
    """
    if input_shape[-1] != 3:
        raise ModelError(f"MobileNetV2 needs 3 input channels, got {input_shape[-1]}")
    if num_classes < 2:
        raise ModelError(f"a classifier needs >= 2 classes, got {num_classes}")
    weights = weights or None
    inputs = keras.Input(shape=input_shape, name=input_name)
    if hub_handle:
        x = _hub_features(inputs, input_shape, hub_handle, weights, freeze_backbone)
    else:
        x = _applications_features(
            inputs, input_shape, weights, alpha, bn_momentum, freeze_backbone
        )
    if dropout > 0:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    reg = keras.regularizers.L1L2(l1=l1, l2=l2) if (l1 > 0 or l2 > 0) else None
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=reg, dtype="float32", name="head"
    )(x)
    return keras.Model(inputs, outputs, name=name)


def _hub_features(
    inputs: keras.KerasTensor,
    input_shape: tuple[int, int, int],
    hub_handle: str,
    weights: str | None,
    freeze_backbone: bool,
) -> keras.KerasTensor:
    """Features of a TF-Hub feature-vector module (the layer named :data:`BACKBONE`)."""
    if weights is not None:
        raise ModelError(
            f"weights='{weights}' applies to the keras.applications backbone; the TF-Hub "
            f"module '{hub_handle}' carries its own weights"
        )
    backbone = HubLayer(hub_handle, trainable=not freeze_backbone, name=BACKBONE)
    try:
        x = backbone(inputs)
    except (ValueError, TypeError) as e:
        raise ModelError(
            f"TF-Hub module '{hub_handle}' does not accept inputs of shape "
            f"{tuple(input_shape)}: {str(e).splitlines()[0]}"
        ) from e
    if len(x.shape) != 2:
        raise ModelError(
            f"TF-Hub module '{hub_handle}' returns shape {x.shape}; a feature-vector module "
            "([batch, features]) is needed"
        )
    return x


def _applications_features(
    inputs: keras.KerasTensor,
    input_shape: tuple[int, int, int],
    weights: str | None,
    alpha: float,
    bn_momentum: float,
    freeze_backbone: bool,
) -> keras.KerasTensor:
    """Pooled features of a ``keras.applications`` MobileNetV2 (the layer named BACKBONE)."""
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise ModelError(f"model.weights: '{weights}': weights file not found")
    # MobileNetV2 expects inputs in [-1, 1]; medseg's normalisation gives [0, 1] (minmax).
    x = layers.Rescaling(2.0, offset=-1.0, name="to_unit_range")(inputs)
    try:
        backbone = keras.applications.MobileNetV2(
            input_shape=input_shape,
            alpha=alpha,
            include_top=False,
            weights=weights,
            pooling=None,
            name=BACKBONE,
        )
    except ValueError as e:
        raise ModelError(f"cannot build MobileNetV2 (weights={weights!r}): {e}") from e
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = bn_momentum
    backbone.trainable = not freeze_backbone
    x = backbone(x)
    return layers.GlobalAveragePooling2D(name="pool")(x)


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def _fine_tune_variables(model: keras.Model, layer: layers.Layer) -> list:
    """The model's trainable variables as they will be once ``layer`` is trainable."""
    was = layer.trainable
    layer.trainable = True
    try:
        return list(model.trainable_variables)
    finally:
        layer.trainable = was


def _optimizer_knows(optimizer, variables: list) -> bool:
    """Whether a built optimizer has slots for every variable (Keras 3 refuses others)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    indices = getattr(inner, "_trainable_variables_indices", None)
    if not getattr(inner, "built", False) or indices is None:
        return False
    return all(inner._var_key(v) in indices for v in variables)


def build_optimizer_for_fine_tuning(model: keras.Model, layer_name: str = BACKBONE) -> None:
    """Build the compiled model's optimizer over the head *and* the (frozen) backbone.

    Keras 3 optimizers only update the variables they were built with, and ``model.fit`` builds
    the optimizer with the variables trainable at its start (the head, when the backbone is
    frozen). Calling this after ``model.compile`` and before ``model.fit`` builds it with the
    backbone's variables too, so that :class:`FineTuneAfter` can unfreeze the backbone mid-run
    without replacing the optimizer (the head's optimizer state is kept), and so that the
    optimizer's variables are the same before and after the unfreeze (``BackupAndRestore``).

    Nothing happens when the optimizer already covers them. A built optimizer that does not is
    replaced by a fresh one with the same config and step count (its slots are lost).
    """
    if model.optimizer is None:
        raise ModelError("compile the model before building its optimizer")
    variables = _fine_tune_variables(model, _get_layer(model, layer_name))
    if _optimizer_knows(model.optimizer, variables):
        return
    old = model.optimizer
    with model.distribute_strategy.scope():
        if old.built:
            new = old.__class__.from_config(old.get_config())
            new.build(variables)
            new.iterations.assign(old.iterations)
            model.optimizer = new
            logger.info("optimizer rebuilt over %d variables for fine-tuning", len(variables))
        else:
            old.build(variables)


def _get_layer(model: keras.Model, layer_name: str) -> layers.Layer:
    try:
        return model.get_layer(layer_name)
    except ValueError:
        raise ModelError(
            f"model '{model.name}' has no layer '{layer_name}' to freeze or fine-tune; layers: "
            f"{', '.join(la.name for la in model.layers)}"
        ) from None


class FineTuneAfter(keras.callbacks.Callback):
    """Unfreeze the layer ``layer_name`` at the start of epoch ``epoch`` (0-based).

    With ``FineTuneAfter(2)`` epochs 0 and 1 train the head only and the backbone trains from
    epoch 2 on (also when a run resumes at or after epoch 2). In Keras 3 setting ``trainable``
    mid-fit is not enough: the compiled train step keeps the variable list it was traced with,
    and the optimizer only updates the variables it was built with. The callback therefore

    1. at the start of training, builds the optimizer over the backbone's variables as well (see
       :func:`build_optimizer_for_fine_tuning`; call that function yourself right after
       ``compile`` to keep the optimizer's variables stable across ``BackupAndRestore``);
    2. at the unfreeze, sets ``trainable = True`` and retraces the train step with
       ``model.make_train_function(force=True)`` (``fit`` looks ``model.train_function`` up at
       every step, so the new function is used from the epoch's first step).
    """

    def __init__(self, epoch: int, layer_name: str = BACKBONE):
        super().__init__()
        if epoch < 0:
            raise ModelError(f"fine_tune_after must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self.layer_name = layer_name
        self.unfrozen_at: int | None = None

    def on_train_begin(self, logs=None):
        layer = _get_layer(self.model, self.layer_name)
        if not layer.trainable:
            build_optimizer_for_fine_tuning(self.model, self.layer_name)

    def on_epoch_begin(self, epoch, logs=None):
        layer = _get_layer(self.model, self.layer_name)
        if epoch < self.epoch or layer.trainable:
            return
        layer.trainable = True
        build_optimizer_for_fine_tuning(self.model, self.layer_name)  # no-op when built above
        self.model.make_train_function(force=True)
        self.unfrozen_at = epoch
        logger.info("epoch %d: unfroze '%s' for fine-tuning", epoch + 1, self.layer_name)
