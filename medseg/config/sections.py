"""The sections of a config: one dataclass per YAML section, with defaults and the allowed
choices of each enumerated key."""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

TASKS = ("segmentation", "classification")
LAYOUTS = ("auto", "lgg", "pairs", "class_folders", "dicom_series", "nifti", "msd")
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
MODEL_NORMS = ("batch", "instance", "none")
VOLUME_NORMALIZATIONS = ("auto", "zscore", "ct", "none")
LABEL_RESAMPLING = ("nearest", "linear")


@dataclass
class DataConfig:
    """Where the data is and how images reach the model.

    Attributes:
        task: ``segmentation`` or ``classification``.
        layout: dataset layout: ``lgg`` (``<patient>/<name>.tif`` + ``<name>_mask.tif``),
            ``pairs`` (``images/`` + ``masks/`` with matching stems), ``class_folders``
            (``<class>/*.png``, optionally under ``Training/`` and ``Testing/``),
            ``dicom_series`` (``<patient>/<study>/<series>/*.dcm``, image series + mask series)
            ``nifti`` (``images/<case>.nii.gz`` + ``labels/<case>.nii.gz``), ``msd`` (a
            ``dataset.json`` with ``imagesTr/`` and ``labelsTr/``, Medical Segmentation
            Decathlon and nnU-Net style: 3D volumes, several channels and labels), or ``auto``
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

    For 3D patches (``unet3d``) ``hflip``, ``vflip`` and ``dflip`` flip the column, row and
    slice axes; ``affine`` rotates (``rotate_limit`` degrees about each axis) and scales
    (``scale_limit``); ``elastic``, ``gamma`` and ``noise`` are probabilities per patch.

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
    dflip: float = 0.0
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
        norm: ``unet3d``: normalisation after each convolution, ``batch``, ``instance`` or
            ``none`` (2D models use ``batch_norm``).
        deep_supervision: ``unet3d``: also train on the outputs of the two coarser decoder
            levels (weights 1/2, 1/4); the served model keeps only the full-resolution output.
        max_filters: ``unet3d``: cap on the filters of a level (nnU-Net uses 320).
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
    norm: str = "batch"
    deep_supervision: bool = False
    max_filters: int = 320


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
            ``focal_tversky``, ``bce_tversky``, ``categorical_crossentropy``; ``dice_ce`` for
            ``unet3d``: cross-entropy plus the soft Dice of the foreground classes).
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
class VolumeConfig:
    """3D (``unet3d``) data handling: spacing, normalisation, patches and sliding windows.

    Empty values are taken from the dataset fingerprint (``medseg data audit`` shows it) and the
    resolved values are recorded in the run's ``plan.json``; any value set here overrides them.
    The patch size is ``train.patch_size`` (empty: from the fingerprint).

    Attributes:
        target_spacing: voxel spacing (mm, slice/row/col) the model works at; empty: the
            dataset's median spacing.
        normalization: ``zscore`` (per channel, per volume: MRI), ``ct`` (clip to
            ``intensity_clip`` then z-score with the dataset's foreground mean and std), ``none``,
            or ``auto`` (``ct`` for CT, ``zscore`` otherwise, from ``dataset.json``'s modality).
        intensity_clip: ``ct``: [low, high] HU; empty: the 0.5 and 99.5 foreground percentiles.
        foreground_share: share of training patches centred on a foreground voxel (the classes
            in turn); the others are placed at random.
        batches_per_epoch: training batches in one epoch (patches are drawn at random).
        overlap: sliding-window overlap between neighbouring windows, in [0, 1).
        gaussian: weight each window's prediction with a Gaussian (sigma 1/8 of the window)
            instead of uniformly.
        mirror_tta: also predict on the 7 flipped copies of each window and average.
        sw_batch: windows per model call.
        image_order: spline order for resampling images: 1 linear, 3 cubic (training data; the
            served model resamples linearly in-graph).
        label_resampling: ``nearest`` or ``linear`` (on one-hot maps) for label maps.
    """

    target_spacing: list[float] = field(default_factory=list)
    normalization: str = "auto"
    intensity_clip: list[float] = field(default_factory=list)
    foreground_share: float = 0.33
    batches_per_epoch: int = 50
    overlap: float = 0.5
    gaussian: bool = True
    mirror_tta: bool = False
    sw_batch: int = 4
    image_order: int = 3
    label_resampling: str = "nearest"


@dataclass
class CVConfig:
    """K-fold cross-validation (``medseg cv``): folds are grouped by patient."""

    folds: int = 5
    only: list[int] = field(default_factory=list)


@dataclass
class EvaluationConfig:
    """How segmentations are scored (not part of the config hash: it does not change a model).

    Attributes:
        nsd_tolerance_mm: tolerance of the normalised surface Dice (NSD), in mm (in pixels or
            voxels where the images carry no spacing).
    """

    nsd_tolerance_mm: float = 1.0


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
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
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
        """Short SHA-256 of the resolved config, ignoring the run and evaluation sections
        (where results go and how they are scored change no model: a run resumes, and is
        re-scored, under other values)."""
        d = self.to_dict()
        d.pop("run")
        d.pop("evaluation")
        blob = yaml.safe_dump(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


SECTIONS: dict[str, type] = {
    name: tp for name, tp in typing.get_type_hints(Config).items() if name != "source"
}
