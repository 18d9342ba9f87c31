"""Model registry: a plain dict from name to builder.

Each builder takes the resolved :class:`~medseg.config.Config` and the number of outputs and returns
an uncompiled ``keras.Model`` whose input is named ``image``.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from medseg.config import Config
from medseg.errors import ConfigError
from medseg.models.mobilenet import build_mobilenetv2_classifier
from medseg.models.mobilenet_unet import MobileNetV2UNet
from medseg.models.unet import UNet
from medseg.models.unet3d import build_unet3d


def _require_task(cfg: Config, task: str) -> None:
    """Reject a model built for another task than ``data.task``."""
    if cfg.data.task != task:
        raise ConfigError(
            f"model.name: '{cfg.model.name}' is a {task} model; data.task is '{cfg.data.task}'"
        )


def _unet(cfg: Config, num_outputs: int) -> keras.Model:
    m = cfg.model
    _require_task(cfg, "segmentation")
    # trained on patches (train.patch_size), validated and served on whole images
    size = (None, None) if cfg.train.patch_size else tuple(cfg.data.image_size)
    return UNet(
        input_shape=(*size, cfg.data.input_channels),
        num_classes=num_outputs,
        base_filters=m.base_filters,
        depth=m.depth,
        dropout=m.dropout,
        batch_norm=m.batch_norm,
        upsampling=m.upsampling,
        l2=m.l2,
        l1=m.l1,
        bn_momentum=m.bn_momentum,
        name="unet",
    )


def _mobilenetv2_classifier(cfg: Config, num_outputs: int) -> keras.Model:
    m = cfg.model
    _require_task(cfg, "classification")
    if m.hub_handle and m.weights:
        raise ConfigError("model.hub_handle and model.weights: give one backbone source, not both")
    return build_mobilenetv2_classifier(
        (*cfg.data.image_size, cfg.data.input_channels),
        num_outputs,
        dropout=m.dropout,
        l1=m.l1,
        l2=m.l2,
        bn_momentum=m.bn_momentum,
        weights=m.weights or None,
        alpha=m.alpha,
        hub_handle=m.hub_handle or None,
        freeze_backbone=m.freeze_backbone,
    )


def _mobilenetv2_unet(cfg: Config, num_outputs: int) -> keras.Model:
    m = cfg.model
    _require_task(cfg, "segmentation")
    return MobileNetV2UNet(
        input_shape=(*cfg.data.image_size, cfg.data.input_channels),
        num_classes=num_outputs,
        alpha=m.alpha,
        weights=m.weights or None,
        freeze_backbone=m.freeze_backbone,
        dropout=m.dropout,
        batch_norm=m.batch_norm,
        upsampling=m.upsampling,
        l1=m.l1,
        l2=m.l2,
        bn_momentum=m.bn_momentum,
        name="mobilenetv2_unet",
    )


def _unet3d(cfg: Config, num_outputs: int) -> keras.Model:
    m = cfg.model
    _require_task(cfg, "segmentation")
    if num_outputs < 2:
        raise ConfigError(
            f"model.num_classes: unet3d has a softmax head over the labels, background included, "
            f"so it needs >= 2 outputs, got {num_outputs}"
        )
    if cfg.data.context_slices:
        raise ConfigError(
            "data.context_slices: unet3d sees whole volumes; context slices are for 2D models"
        )
    # volumes [D, H, W, C]: the channels are the sequences (data.channels)
    return build_unet3d(
        cfg.data.channels,
        num_outputs,
        base_filters=m.base_filters,
        depth=m.depth,
        max_filters=m.max_filters,
        norm=m.norm,
        dropout=m.dropout,
        deep_supervision=m.deep_supervision,
        bn_momentum=m.bn_momentum,
        l2=m.l2,
        name="unet3d",
    )


MODELS: dict[str, Callable[[Config, int], keras.Model]] = {
    "unet": _unet,
    "mobilenetv2_unet": _mobilenetv2_unet,
    "mobilenetv2_classifier": _mobilenetv2_classifier,
    "unet3d": _unet3d,
}


def build_model(cfg: Config, num_outputs: int | None = None) -> keras.Model:
    """Build the model named by ``cfg.model.name``.

    Args:
        cfg: the resolved config.
        num_outputs: output channels or classes; default ``cfg.model.num_classes`` (a
            classification run passes the number of class folders).

    Raises:
        ConfigError: unknown model name (the message lists the valid ones) or a model that does
            not fit the task.
    """
    try:
        builder = MODELS[cfg.model.name]
    except KeyError:
        raise ConfigError(
            f"model.name: unknown model '{cfg.model.name}'; valid models: {', '.join(MODELS)}"
        ) from None
    keras.utils.set_random_seed(cfg.train.seed)
    return builder(cfg, cfg.model.num_classes if num_outputs is None else num_outputs)
