"""One typed configuration tree for every medseg command.

A config is a YAML file whose top-level sections map onto the dataclasses below (``data``,
``augment``, ``model``, ``train``, ``cv``, ``export``, ``predict``, ``run``). Every key is optional:
missing keys keep their defaults. Command lines override single values with
``--set section.key=value``; the value is parsed as YAML and then checked against the field's type.

Unknown sections or keys, values of the wrong type and impossible values (negative epochs,
``k < 2``, ...) raise :class:`medseg.errors.ConfigError` naming the key and, for unknown keys,
listing the valid ones.

Example:
    >>> cfg = load_config("configs/demo.yaml", overrides=["train.epochs=3"])
    >>> cfg.train.epochs
    3
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medseg.errors import ConfigError

TASKS = ("segmentation", "classification")
LAYOUTS = ("auto", "lgg", "pairs", "class_folders", "dicom_series", "nifti")
NORMALIZATIONS = ("minmax", "percentile", "percentile_channel", "zscore", "window", "none")
GROUP_BY = ("auto", "folder", "phash", "none")
RESIZE_POLICIES = ("stretch", "pad")
OPTIMIZERS = (
    "adam",
    "adamw",
    "sgd",
    "momentum",
    "nesterov",
    "rmsprop",
    "adagrad",
    "adadelta",
    "nadam",
)
LR_SCHEDULES = ("cosine", "cosine_restarts", "constant")
DISTRIBUTE = ("auto", "none", "mirrored", "multiworker")
LR_SCALINGS = ("linear", "none")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", "auto")
MONITOR_MODES = ("min", "max")


@dataclass
class DataConfig:
    """Where the data is and how images reach the model.

    Attributes:
        task: ``segmentation`` or ``classification``.
        layout: dataset layout: ``lgg`` (``<patient>/<name>.tif`` + ``<name>_mask.tif``),
            ``pairs`` (``images/`` + ``masks/`` with matching stems), ``class_folders``
            (``<class>/*.png``, optionally under ``Training/`` and ``Testing/``),
            ``dicom_series`` (``<patient>/<study>/<series>/*.dcm``, image series + mask series)
            ``nifti`` (``images/<case>.nii.gz`` + ``labels/<case>.nii.gz``), or ``auto``
            (detected from the folder's structure).
        root: dataset folder (relative paths are relative to the working directory).
        image_series: ``dicom_series``: substring of the SeriesDescription (or folder name) of
            the image series, e.g. ``T1post``.
        mask_series: ``dicom_series``: substring of the mask series' description, e.g.
            ``MaskTumor``.
        slice_axis: volumes (DICOM series, NIfTI): the axis 2D samples are cut along, of the
            (slice, row, col) volume the readers return: 0 axial, 1 coronal, 2 sagittal for
            axially stored scans (superior is kept at the top of coronal/sagittal slices).
        group_by: how samples are grouped for splits: ``folder`` (patient folder, DICOM
            PatientID, NIfTI case), ``phash`` (near-duplicate images share a group: for data
            without patient ids), ``none`` (each image alone) or ``auto`` (``phash`` for class
            folders, ``folder`` otherwise).
        phash_threshold: largest Hamming distance between 64-bit perceptual hashes that counts
            as a near-duplicate.
        image_size: ``[height, width]`` the model sees.
        resize: ``stretch`` (resize to image_size) or ``pad`` (keep the aspect ratio, pad with
            zeros).
        channels: channels of one image (slice); grey images are repeated, RGB is converted.
        context_slices: 2.5D input for slices of a volume or of a patient folder (``lgg``): the
            ``k`` slices on each side are stacked as channels around the slice itself, so the
            model sees ``channels * (2k + 1)`` channels (:attr:`input_channels`), neighbours
            first-to-last, the edge slice repeated at the volume's ends. 0: plain 2D.
        normalization: per-image intensity normalisation: ``minmax`` (to [0, 1]), ``percentile``
            (clip to the 0.5th-99.5th percentile, then [0, 1]), ``percentile_channel`` (the same
            per channel: MRI sequences stacked as channels), ``zscore``, ``window`` (CT:
            clip to ``window`` = [centre, width], then [0, 1]) or ``none``.
        window: ``[centre, width]`` for ``normalization: window``, e.g. [40, 400] (soft tissue).
        cache: keep decoded, preprocessed images in memory (fast; needs RAM); when false, images
            are decoded again every epoch.
        val_fraction: fraction of groups (patients) held out for validation.
        test_fraction: fraction of groups held out as a test split (0 for none).
        strict: fail on the first unusable file instead of reporting it and continuing.
    """

    task: str = "segmentation"
    layout: str = "lgg"
    root: str = "data/synthetic/segmentation"
    image_series: str = ""
    mask_series: str = "MaskTumor"
    slice_axis: int = 0
    group_by: str = "auto"
    phash_threshold: int = 6
    image_size: list[int] = field(default_factory=lambda: [128, 128])
    resize: str = "stretch"
    channels: int = 3
    context_slices: int = 0
    normalization: str = "minmax"
    window: list[float] = field(default_factory=lambda: [40.0, 400.0])
    cache: bool = True
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    strict: bool = False

    @property
    def input_channels(self) -> int:
        """Channels of the model input: ``channels`` per slice times the stacked slices."""
        return self.channels * (2 * self.context_slices + 1)


@dataclass
class AugmentConfig:
    """Training-time augmentation (albumentations); probabilities are per image.

    ``missing_sequence`` is the probability of overwriting one or more channels with the
    ``reference_channel`` (the FLAIR of the LGG images), as in scans whose missing sequences were
    filled with FLAIR (6 of the 46 shared LGG patients).
    """

    enabled: bool = True
    hflip: float = 0.5
    vflip: float = 0.0
    rotate90: float = 0.0
    affine: float = 0.3
    rotate_limit: float = 15.0
    scale_limit: float = 0.1
    brightness_contrast: float = 0.3
    gamma: float = 0.0
    noise: float = 0.0
    elastic: float = 0.0
    grid_distortion: float = 0.0
    missing_sequence: float = 0.0
    reference_channel: int = 1


@dataclass
class ModelConfig:
    """Which network to build (see ``medseg.models.registry``) and its shape.

    Attributes:
        name: registered model name.
        num_classes: 1 for a binary mask (sigmoid head); >= 2 for label maps or classes (softmax).
        base_filters: filters of the first U-Net level, doubled at each level down.
        depth: number of down-sampling levels.
        dropout: dropout rate after each block (0 disables it).
        batch_norm: conv -> batch norm -> activation when true.
        upsampling: ``transpose`` (transposed conv) or ``resize`` (resize + conv).
        l1: L1 penalty on the output layer's kernel (0 disables it).
        l2: L2 penalty: on conv kernels (U-Net) or on the dense head (classifier); 0 disables it.
        bn_momentum: batch-norm momentum (Keras uses 0.99, keras.applications' MobileNetV2
            0.999: too slow to settle in short runs from scratch, so inference-mode outputs
            collapse).
        hub_handle: MobileNetV2 models: a TF-Hub feature-vector module (URL or local
            SavedModel folder, e.g. one written by ``medseg models make-hub-module``); empty
            builds the backbone from ``keras.applications``.
        weights: ``keras.applications`` backbone weights: empty (random initialisation) or the
            path of a local weights file.
        alpha: MobileNetV2 width multiplier (0.35, 0.5, 0.75, 1.0, 1.3, 1.4).
        freeze_backbone: keep the pretrained backbone's weights fixed (head only).
        fine_tune_after: with ``freeze_backbone``, unfreeze the backbone after this many epochs
            (0: never).
    """

    name: str = "unet"
    num_classes: int = 1
    base_filters: int = 16
    depth: int = 4
    dropout: float = 0.1
    batch_norm: bool = True
    upsampling: str = "transpose"
    l1: float = 0.0
    l2: float = 0.0
    bn_momentum: float = 0.9
    hub_handle: str = ""
    weights: str = ""
    alpha: float = 1.0
    freeze_backbone: bool = False
    fine_tune_after: int = 0


@dataclass
class TrainConfig:
    """How to fit the model.

    Attributes:
        epochs: passes over the training split.
        batch_size: images per step on one machine (split across its GPUs). With ``N``
            workers (multi-worker training) each worker takes ``batch_size`` images per step,
            so a step sees ``N * batch_size`` images.
        optimizer: one of ``OPTIMIZERS``.
        learning_rate: peak learning rate for a step of ``batch_size`` images (see
            ``lr_scaling``).
        lr_scaling: ``linear``: with ``N`` workers the peak learning rate is ``N *
            learning_rate`` (the step sees ``N`` times the images; set ``warmup_epochs`` so that
            the warm-up ramps up to it); ``none``: ``learning_rate`` whatever the cluster.
        lr_schedule: ``cosine`` (cosine decay to ``min_lr_fraction`` of the peak after a linear
            warm-up), ``cosine_restarts`` (SGDR: cosine cycles of ``restart_epochs``, each
            restarting at the peak) or ``constant``.
        restart_epochs: length of the first cycle of ``cosine_restarts``.
        clipnorm: clip each gradient to this L2 norm (0: no clipping).
        early_stopping: stop when ``monitor`` has not improved for this many epochs (0: off);
            with ``validation_freq`` above 1, for this many validated epochs.
        validation_freq: validate every this many epochs, and after the last one. The
            ``val_*`` curves, ``best.keras`` and early stopping see only those epochs;
            cross-validation scores ``last``, so on a slow CPU the validation time (about an
            eighth of an epoch of the LGG recipe) goes to training instead. 1: every epoch.
        deterministic: seed Python/NumPy/TF and enable TensorFlow op determinism (slower).
        distribute: ``auto`` (``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` names
            several workers, else ``MirroredStrategy`` when several GPUs are visible),
            ``mirrored`` (always, over all visible devices of this machine), ``multiworker``
            (``MultiWorkerMirroredStrategy``; needs ``TF_CONFIG`` or ``medseg train --workers``)
            or ``none``. ``none`` and ``mirrored`` refuse a ``TF_CONFIG`` of several workers.
        warmup_epochs: epochs of linear warm-up (cosine only).
        min_lr_fraction: final learning rate as a fraction of the peak.
        loss: registered loss name (``bce_dice``, ``dice``, ``bce``, ``focal``, ``tversky``,
            ``focal_tversky``, ``bce_tversky``, ``categorical_crossentropy``).
        label_smoothing: for classification losses.
        class_weights: weight classification classes by inverse frequency in the training split.
        oversample_tumour: segmentation: fraction of each training batch drawn from slices whose
            mask has foreground (0 keeps the data's own mix).
        patch_size: segmentation with ``model.name: unet``: train on random ``[height, width]``
            crops of the ``data.image_size`` images (as nnU-Net trains on patches), validate and
            predict on whole images; each step costs about the patch's share of the pixels.
            Empty: whole images.
        monitor: metric that picks ``best.keras`` (``val_loss``, ``val_dice``, ...).
        monitor_mode: ``min`` or ``max``.
        seed: seed for splits, shuffling, augmentation and weight initialisation.
        mixed_precision: Keras dtype policy for training: ``float32`` (or ``false``),
            ``mixed_float16`` (or ``true``; GPUs, slower on CPU), ``mixed_bfloat16`` (GPUs and
            CPUs with AMX, such as recent Intel Xeons: 0.85 of the float32 96x96 step of the LGG
            recipe there, ``scripts/bench_patch_step.py``; slower on CPUs without AMX, such as
            the AMD EPYC of docs/performance.md), or ``auto``: ``mixed_bfloat16`` on a CPU with
            AMX and no GPU, ``float32`` otherwise. The output head and the loss stay float32,
            the weights are float32 either way; saved models load (and are served) in the
            loading process's policy, float32 unless set. See :func:`precision_policy`.
        jit_compile: XLA-compile the train step (GPUs; slower on this CPU).
        steps_per_execution: train steps per call into the graph.
    """

    epochs: int = 10
    batch_size: int = 16
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    lr_scaling: str = "linear"
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    min_lr_fraction: float = 0.01
    restart_epochs: float = 5.0
    clipnorm: float = 0.0
    early_stopping: int = 0
    validation_freq: int = 1
    deterministic: bool = False
    distribute: str = "auto"
    loss: str = "bce_dice"
    label_smoothing: float = 0.0
    class_weights: bool = False
    oversample_tumour: float = 0.0
    patch_size: list[int] = field(default_factory=list)
    monitor: str = "val_loss"
    monitor_mode: str = "min"
    seed: int = 0
    mixed_precision: bool | str = False
    jit_compile: bool = False
    steps_per_execution: int = 1


@dataclass
class CVConfig:
    """K-fold cross-validation (``medseg cv``): folds are grouped by patient."""

    folds: int = 5
    only: list[int] = field(default_factory=list)


@dataclass
class ExportConfig:
    """Where ``medseg export`` writes SavedModels, and how it checks them."""

    dir: str = "models"
    tolerance: float = 1e-4


@dataclass
class PredictConfig:
    """Batch inference options.

    Attributes:
        threshold: probability above which a pixel is foreground (binary models).
        batch_size: slices or images per model call.
        overlays: write overlay PNGs beside the masks.
    """

    threshold: float = 0.5
    batch_size: int = 8
    overlays: bool = True


@dataclass
class RunConfig:
    """Where results go.

    Attributes:
        name: run folder name under ``root``; empty means ``<config name>-<timestamp>``.
        root: folder that holds run folders.
        overwrite: replace an existing run folder of the same name.
    """

    name: str = ""
    root: str = "runs"
    overwrite: bool = False


@dataclass
class Config:
    """The whole configuration tree."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source: str = ""  # the YAML file this config came from (informational)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every section (what ``config.yaml`` in a run folder holds)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def to_yaml(self) -> str:
        """The resolved config as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Short SHA-256 of the resolved config, ignoring the run section."""
        d = self.to_dict()
        d.pop("run")
        blob = yaml.safe_dump(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


SECTIONS: dict[str, type] = {
    name: tp for name, tp in typing.get_type_hints(Config).items() if name != "source"
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert the safe cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no decimal point) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean '{name}.{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown key '{name}.{key}'; {hint}valid keys in '{name}': {', '.join(valid)}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**kwargs)


def cpu_has_amx(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU has AMX bfloat16 tiles (the ``amx_bf16`` flag of Linux's cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    return any(
        line.startswith("flags") and "amx_bf16" in line.split() for line in text.splitlines()
    )


def _gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def precision_policy(train: TrainConfig) -> str:
    """The Keras dtype policy that ``train.mixed_precision`` names.

    ``false`` and ``true`` are the older spellings of ``float32`` and ``mixed_float16``;
    ``auto`` is ``mixed_bfloat16`` on a CPU with AMX when no GPU is visible, else ``float32``
    (the one case where bfloat16 was measured faster on CPU; on GPUs name the policy).
    """
    value = train.mixed_precision
    if isinstance(value, bool):
        return "mixed_float16" if value else "float32"
    if value == "auto":
        return "mixed_bfloat16" if cpu_has_amx() and not _gpu_visible() else "float32"
    return value


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}")


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> Config:
    """Reject impossible values; returns ``cfg`` unchanged when it is valid."""
    d, a, m, t = cfg.data, cfg.augment, cfg.model, cfg.train
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
        f"expected [centre, width] with width > 0, got {d.window}",
    )
    _check(
        len(d.image_size) == 2 and all(s >= 8 for s in d.image_size),
        "data.image_size",
        f"expected [height, width], each >= 8, got {d.image_size}",
    )
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
    if t.patch_size:
        _check(
            len(t.patch_size) == 2
            and all(8 <= p <= s for p, s in zip(t.patch_size, d.image_size, strict=True)),
            "train.patch_size",
            f"expected [height, width], each >= 8 and at most data.image_size {d.image_size}, "
            f"got {t.patch_size}",
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
            f"{t.patch_size} must be divisible by 2**model.depth = {2**m.depth}",
        )
    _check_choice("train.monitor_mode", t.monitor_mode, MONITOR_MODES)
    _check(t.steps_per_execution >= 1, "train.steps_per_execution", "must be >= 1")
    _check(cfg.cv.folds >= 2, "cv.folds", f"must be >= 2, got {cfg.cv.folds}")
    _check(
        all(1 <= k <= cfg.cv.folds for k in cfg.cv.only),
        "cv.only",
        f"fold numbers must be in 1..{cfg.cv.folds}, got {cfg.cv.only}",
    )
    _check(cfg.export.tolerance > 0, "export.tolerance", "must be > 0")
    _check(0 < cfg.predict.threshold < 1, "predict.threshold", "must be in (0, 1)")
    _check(cfg.predict.batch_size >= 1, "predict.batch_size", "must be >= 1")
    _check(
        "/" not in cfg.run.name and "\\" not in cfg.run.name and cfg.run.name not in (".", ".."),
        "run.name",
        f"must be a plain folder name, got {cfg.run.name!r}",
    )
    return cfg


def config_from_dict(raw: dict[str, Any] | None, source: str = "") -> Config:
    """Build and validate a :class:`Config` from a nested dict (e.g. parsed YAML)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source or 'config'}: expected a mapping of sections, got {raw!r}")
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), list(SECTIONS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown section '{name}'{f' in {source}' if source else ''}; "
                f"{hint}valid sections: {', '.join(SECTIONS)}"
            )
        sections[name] = _build_section(name, SECTIONS[name], value)
    return validate(Config(**sections, source=source))


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error as one line: the problem and where it is (PyYAML's text spans lines)."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into (``[section, key]``, parsed YAML value)."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({_yaml_problem(e)})") from None
    return parts, parsed


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides.

    Args:
        path: YAML file; its top level maps section names to keys.
        overrides: ``section.key=value`` strings applied after the file, in order.

    Returns:
        The validated config.

    Raises:
        ConfigError: missing or malformed file, unknown key, wrong type or impossible value.
    """
    raw: dict[str, Any] = {}
    source = ""
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({_yaml_problem(e)})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save "
                f"the config as UTF-8"
            ) from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the config file ({e.strerror or e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    overridden: set[str] = set()
    for text in overrides or []:
        (section, key), value = parse_override(text)
        overridden.add(f"{section}.{key}")
        if section not in SECTIONS:
            raise ConfigError(
                f"--set {text!r}: unknown section '{section}'; "
                f"valid sections: {', '.join(SECTIONS)}"
            )
        sec = raw.get(section) or {}
        if not isinstance(sec, dict):
            raise ConfigError(
                f"{source or 'config'}: section '{section}' must be a mapping of keys"
            )
        sec[key] = value
        raw[section] = sec
    try:
        return config_from_dict(raw, source=source)
    except ConfigError as e:
        # Name the file too, unless the bad key came from --set or the message already does.
        message = str(e)
        from_set = any(message.startswith(k) or f"'{k}'" in message for k in overridden)
        if source and source not in message and not from_set:
            raise ConfigError(f"{source}: {message}") from None
        raise
