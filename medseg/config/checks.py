"""Validation of a whole config: impossible values and combinations raise ConfigError.

Messages quote the offending value through :func:`excerpt`: at most :data:`EXCERPT_CHARS`
characters, then the value's type and length, so that a huge value (a long list, a YAML alias
expansion) never becomes a huge error line.
"""

from __future__ import annotations

import reprlib
from typing import Any

from medseg.config.sections import (
    DISTRIBUTE,
    GROUP_BY,
    LABEL_RESAMPLING,
    LAYOUTS,
    LR_SCALINGS,
    LR_SCHEDULES,
    MODEL_NORMS,
    MONITOR_MODES,
    NORMALIZATIONS,
    OPTIMIZERS,
    PRECISIONS,
    RESIZE_POLICIES,
    TASKS,
    VOLUME_NORMALIZATIONS,
    Config,
)
from medseg.errors import ConfigError

#: The most characters of a value that an error message quotes.
EXCERPT_CHARS = 200

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring = _REPR.maxother = EXCERPT_CHARS
_REPR.maxlong = 60


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, with ``...`` and the value's type and
    length when it was shortened; the work is bounded too (nested and long containers are
    abbreviated, never expanded in full).

    Example:
        >>> excerpt(list(range(1000)))
        '[0, 1, 2, 3, 4, 5, 6, 7, ...] (a list of 1,000 items)'
    """
    if isinstance(value, str | bytes):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... (a {type(value).__name__} of {len(value):,} characters)"
    text = _REPR.repr(value)
    shortened = "..." in text
    if len(text) > limit:
        text, shortened = text[:limit] + "...", True
    if shortened and isinstance(value, list | tuple | dict | set):
        kind = "mapping" if isinstance(value, dict) else type(value).__name__
        unit = "keys" if isinstance(value, dict) else "items"
        text += f" (a {kind} of {len(value):,} {unit})"
    return text


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {excerpt(value)} is not one of {', '.join(choices)}")


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> Config:
    """Reject impossible values; returns ``cfg`` unchanged when it is valid."""
    _check_data(cfg)
    _check_augment(cfg)
    _check_model(cfg)
    _check_train(cfg)
    _check_volume(cfg)
    _check_rest(cfg)
    return cfg


def _check_data(cfg: Config) -> None:
    d = cfg.data
    _check_choice("data.task", d.task, TASKS)
    _check_choice("data.layout", d.layout, LAYOUTS)
    _check_choice("data.normalization", d.normalization, NORMALIZATIONS)
    _check_choice("data.group_by", d.group_by, GROUP_BY)
    _check_choice("data.resize", d.resize, RESIZE_POLICIES)
    _check(d.slice_axis in (0, 1, 2), "data.slice_axis", f"must be 0, 1 or 2, got {d.slice_axis}")
    _check(0 <= d.phash_threshold <= 32, "data.phash_threshold", "must be in [0, 32]")
    _check(
        len(d.window) == 2 and d.window[1] > 0,
        "data.window",
        f"expected [centre, width] with width > 0, got {excerpt(d.window)}",
    )
    _check(
        len(d.image_size) == 2 and all(s >= 8 for s in d.image_size),
        "data.image_size",
        f"expected [height, width], each >= 8, got {excerpt(d.image_size)}",
    )
    if cfg.model.name == "unet3d":  # channels come from dataset.json (or the volumes)
        _check(d.channels >= 1, "data.channels", f"must be >= 1, got {d.channels}")
    else:
        _check(d.channels in (1, 3), "data.channels", f"must be 1 or 3, got {d.channels}")
    _check(
        0 <= d.context_slices <= 4,
        "data.context_slices",
        f"must be in [0, 4], got {d.context_slices}",
    )
    if d.context_slices:
        _check(
            d.task == "segmentation" and d.layout in ("lgg", "dicom_series", "nifti"),
            "data.context_slices",
            "needs slices in order: a segmentation run on the 'lgg', 'dicom_series' or "
            f"'nifti' layout, got {d.task} on '{d.layout}'",
        )
        # the stack is normalised slice by slice in training and as one image when served:
        # only per-channel or per-pixel normalisations give the same numbers both ways
        _check(
            d.normalization in ("percentile_channel", "window", "none"),
            "data.normalization",
            "with data.context_slices the normalisation must be per channel or per pixel "
            f"('percentile_channel', 'window' or 'none'), got '{d.normalization}'",
        )
        _check(d.cache, "data.cache", "data.context_slices needs data.cache: true")
    _check(
        0.0 < d.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}"
    )
    _check(
        0.0 <= d.test_fraction < 1.0 and d.val_fraction + d.test_fraction < 1.0,
        "data.test_fraction",
        f"must be >= 0 and leave data for training, got {d.test_fraction}",
    )
    if d.task == "classification":
        _check(
            d.layout in ("class_folders", "auto"),
            "data.layout",
            "classification needs 'class_folders'",
        )
    else:
        _check(
            d.layout != "class_folders",
            "data.layout",
            "segmentation needs an image+mask layout, not 'class_folders'",
        )


def _check_augment(cfg: Config) -> None:
    d, a = cfg.data, cfg.augment
    for name in (
        "hflip",
        "vflip",
        "rotate90",
        "affine",
        "brightness_contrast",
        "gamma",
        "noise",
        "elastic",
        "grid_distortion",
        "missing_sequence",
    ):
        p = getattr(a, name)
        _check(0.0 <= p <= 1.0, f"augment.{name}", f"probability must be in [0, 1], got {p}")
    _check(
        0 <= a.rotate_limit <= 180,
        "augment.rotate_limit",
        f"must be in [0, 180], got {a.rotate_limit}",
    )
    _check(0 <= a.scale_limit < 1, "augment.scale_limit", f"must be in [0, 1), got {a.scale_limit}")
    _check(
        a.missing_sequence == 0 or (d.channels > 1 and 0 <= a.reference_channel < d.channels),
        "augment.reference_channel",
        f"must name one of data.channels={d.channels} channels (and there must be several) "
        f"when augment.missing_sequence > 0, got {a.reference_channel}",
    )


def _check_model(cfg: Config) -> None:
    m = cfg.model
    _check_choice("model.norm", m.norm, MODEL_NORMS)
    _check(m.max_filters >= 1, "model.max_filters", f"must be >= 1, got {m.max_filters}")
    _check(m.num_classes >= 1, "model.num_classes", f"must be >= 1, got {m.num_classes}")
    _check(m.base_filters >= 1, "model.base_filters", f"must be >= 1, got {m.base_filters}")
    _check(1 <= m.depth <= 7, "model.depth", f"must be in [1, 7], got {m.depth}")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _check(m.l2 >= 0.0, "model.l2", f"must be >= 0, got {m.l2}")
    _check(m.l1 >= 0.0, "model.l1", f"must be >= 0, got {m.l1}")
    _check(m.alpha > 0, "model.alpha", f"must be > 0, got {m.alpha}")
    _check(m.fine_tune_after >= 0, "model.fine_tune_after", "must be >= 0")
    _check(
        not m.fine_tune_after or m.freeze_backbone,
        "model.fine_tune_after",
        "needs model.freeze_backbone: true (there is nothing to unfreeze)",
    )
    _check(0.0 < m.bn_momentum < 1.0, "model.bn_momentum", "must be in (0, 1)")
    _check_choice("model.upsampling", m.upsampling, ("transpose", "resize"))


def _check_train(cfg: Config) -> None:
    d, m, t = cfg.data, cfg.model, cfg.train
    _check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate}")
    _check_choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _check_choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _check_choice("train.distribute", t.distribute, DISTRIBUTE)
    _check_choice("train.lr_scaling", t.lr_scaling, LR_SCALINGS)
    if isinstance(t.mixed_precision, str):
        _check_choice("train.mixed_precision", t.mixed_precision, PRECISIONS)
    _check(t.restart_epochs > 0, "train.restart_epochs", "must be > 0")
    _check(t.clipnorm >= 0, "train.clipnorm", "must be >= 0 (0: no clipping)")
    _check(t.early_stopping >= 0, "train.early_stopping", "must be >= 0 (0: off)")
    _check(t.validation_freq >= 1, "train.validation_freq", "must be >= 1 (1: every epoch)")
    _check(
        0 <= t.warmup_epochs < t.epochs, "train.warmup_epochs", "must be >= 0 and < train.epochs"
    )
    _check(0 <= t.min_lr_fraction <= 1, "train.min_lr_fraction", "must be in [0, 1]")
    _check(0 <= t.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
    _check(0 <= t.oversample_tumour < 1, "train.oversample_tumour", "must be in [0, 1)")
    if t.patch_size and m.name != "unet3d":
        _check(
            len(t.patch_size) == 2
            and all(8 <= p <= s for p, s in zip(t.patch_size, d.image_size, strict=True)),
            "train.patch_size",
            f"expected [height, width], each >= 8 and at most data.image_size {d.image_size}, "
            f"got {excerpt(t.patch_size)}",
        )
        _check(
            d.task == "segmentation" and m.name == "unet",
            "train.patch_size",
            f"trains a U-Net on crops: needs data.task 'segmentation' and model.name 'unet', "
            f"got {d.task} with '{m.name}'",
        )
        _check(
            all(p % 2**m.depth == 0 for p in t.patch_size),
            "train.patch_size",
            f"{excerpt(t.patch_size)} must be divisible by 2**model.depth = {2**m.depth}",
        )
    _check_choice("train.monitor_mode", t.monitor_mode, MONITOR_MODES)
    _check(t.steps_per_execution >= 1, "train.steps_per_execution", "must be >= 1")


def _check_volume(cfg: Config) -> None:
    v = cfg.volume
    _check_choice("volume.normalization", v.normalization, VOLUME_NORMALIZATIONS)
    _check_choice("volume.label_resampling", v.label_resampling, LABEL_RESAMPLING)
    _check(
        not v.target_spacing or (len(v.target_spacing) == 3 and min(v.target_spacing) > 0),
        "volume.target_spacing",
        f"expected [] or three spacings > 0 (mm), got {excerpt(v.target_spacing)}",
    )
    _check(
        not v.intensity_clip
        or (len(v.intensity_clip) == 2 and v.intensity_clip[0] < v.intensity_clip[1]),
        "volume.intensity_clip",
        f"expected [] or [low, high] with low < high, got {excerpt(v.intensity_clip)}",
    )
    _check(0.0 <= v.foreground_share <= 1.0, "volume.foreground_share", "must be in [0, 1]")
    _check(v.batches_per_epoch >= 1, "volume.batches_per_epoch", "must be >= 1")
    _check(0.0 <= v.overlap < 1.0, "volume.overlap", f"must be in [0, 1), got {v.overlap}")
    _check(v.sw_batch >= 1, "volume.sw_batch", f"must be >= 1, got {v.sw_batch}")
    _check(v.image_order in (0, 1, 2, 3, 4, 5), "volume.image_order", "must be in 0..5")
    if cfg.model.name == "unet3d":
        patch = cfg.train.patch_size
        _check(
            not patch or (len(patch) == 3 and min(patch) >= 8),
            "train.patch_size",
            f"unet3d: expected [] or [depth, height, width], each >= 8, got {excerpt(patch)}",
        )
        _check(
            all(p % 2**cfg.model.depth == 0 for p in patch),
            "train.patch_size",
            f"{excerpt(patch)} must be divisible by 2**model.depth = {2**cfg.model.depth}",
        )


def _check_rest(cfg: Config) -> None:
    """cv, export, predict and run."""
    _check(cfg.cv.folds >= 2, "cv.folds", f"must be >= 2, got {cfg.cv.folds}")
    _check(
        all(1 <= k <= cfg.cv.folds for k in cfg.cv.only),
        "cv.only",
        f"fold numbers must be in 1..{cfg.cv.folds}, got {excerpt(cfg.cv.only)}",
    )
    _check(cfg.export.tolerance > 0, "export.tolerance", "must be > 0")
    _check(
        cfg.evaluation.nsd_tolerance_mm > 0,
        "evaluation.nsd_tolerance_mm",
        f"must be > 0, got {cfg.evaluation.nsd_tolerance_mm}",
    )
    _check(0 < cfg.predict.threshold < 1, "predict.threshold", "must be in (0, 1)")
    _check(cfg.predict.batch_size >= 1, "predict.batch_size", "must be >= 1")
    _check(
        "/" not in cfg.run.name and "\\" not in cfg.run.name and cfg.run.name not in (".", ".."),
        "run.name",
        f"must be a plain folder name, got {excerpt(cfg.run.name)}",
    )
