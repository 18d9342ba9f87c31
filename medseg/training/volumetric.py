"""3D training (``model.name: unet3d``): patches at the planned spacing, whole-volume validation.

What :func:`medseg.training.train.train` runs for a 3D config:

1. the dataset's ``dataset.json`` describes labels and channels (:mod:`medseg.io.msd`); the
   split manifest puts each case (its own patient group) on one side;
2. the fingerprint of the *training* cases (:mod:`medseg.data.fingerprint`) gives the plan's
   defaults: target spacing, patch size, normalisation; ``fingerprint.json`` and ``plan.json``
   go into the run folder (a resumed run reloads them);
3. every case is normalised and resampled to the target spacing once, in memory
   (:func:`medseg.data.resample.prepare_case`); training draws random, augmented patches from
   them (:func:`medseg.data.patches.patch_dataset`), a share centred on each structure;
4. each epoch's validation loss and per-structure Dice come from fixed patches of the validation
   cases (cheap enough to monitor every epoch);
5. at the end the chosen checkpoint predicts every validation case whole, at its own
   resolution, by sliding window (:class:`medseg.inference.volumetric.VolumePredictor`, the
   same code a served model runs), and each structure is scored in mm
   (:func:`medseg.evaluation.score3d.score_volumes`), with and without keeping each
   structure's largest component: ``cases_val.csv`` and ``metrics.json``.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from medseg.artifacts.runs import RunDir, create_run
from medseg.config import Config
from medseg.data.fingerprint import VolumePlan, compute_fingerprint, flip_warning, make_plan
from medseg.data.patches import PatchSampler, downsampled_targets, patch_dataset
from medseg.data.resample import prepare_case
from medseg.data.scan import scan_from_config
from medseg.data.scan_msd import MsdScanResult
from medseg.data.split import load_manifest, make_split, write_manifest
from medseg.errors import ConfigError, ModelError
from medseg.evaluation.plots import plot_history
from medseg.evaluation.score3d import score_volumes
from medseg.io.msd import DatasetDescription, MsdCase, read_case_image, read_case_labels
from medseg.models.losses import get_loss
from medseg.models.metrics import training_metrics
from medseg.models.registry import build_model
from medseg.models.unet3d import deep_supervision_weights
from medseg.training.callbacks import run_callbacks, validation_epochs
from medseg.training.optim import build_optimizer
from medseg.training.result import TrainResult
from medseg.utils import atomic_write_json, read_json

logger = logging.getLogger(__name__)

#: Validation patches per case for the per-epoch validation loss (one on a structure, one random).
VAL_PATCHES_PER_CASE = 2


def is_volumetric(cfg: Config) -> bool:
    """Whether ``cfg`` trains a 3D model (patches, sliding windows) rather than a 2D one."""
    return cfg.model.name == "unet3d"


@dataclass
class _Cases:
    """The prepared (normalised, resampled) volumes of one split, in manifest order."""

    ids: list[str]
    images: list[np.ndarray]
    labels: list[np.ndarray]


def scan_for_config(cfg: Config) -> MsdScanResult:
    """Scan the config's ``dataset.json`` dataset once, and set ``cfg.data.channels`` and
    ``cfg.model.num_classes`` from its description (a 3D config takes both from it)."""
    if cfg.data.layout not in ("msd", "auto"):
        raise ConfigError(
            f"data.layout: unet3d trains on a dataset described by dataset.json (layout 'msd'), "
            f"got '{cfg.data.layout}'"
        )
    if cfg.data.task != "segmentation":
        raise ConfigError(f"data.task: unet3d segments, got '{cfg.data.task}'")
    if cfg.data.test_fraction:
        raise ConfigError(
            "data.test_fraction: a held-out test split is not supported for unet3d yet; keep "
            "test cases in another folder and score them with medseg evaluate"
        )
    scan = scan_from_config(cfg.data)
    if not isinstance(scan, MsdScanResult) or scan.description is None:
        raise ConfigError(f"data.root: {cfg.data.root} has no dataset.json (layout 'msd')")
    cfg.data.channels = len(scan.description.channels)
    cfg.model.num_classes = len(scan.description.labels)
    return scan


def _manifest(cfg: Config, run: RunDir, resumed: bool, manifest: dict | None, samples) -> dict:
    if resumed and run.splits_path.exists():
        return load_manifest(run.splits_path)
    if manifest is None:
        manifest = make_split(
            samples, cfg.data.val_fraction, 0.0, seed=cfg.train.seed, stratify=False
        )
        manifest["layout"] = "msd"
    write_manifest(run.splits_path, manifest)
    return manifest


def _plan(
    cfg: Config, run: RunDir, resumed: bool, description: DatasetDescription, train_ids: list
) -> VolumePlan:
    """The run's plan: reloaded when resuming, else made from the training cases' fingerprint."""
    if resumed and run.plan_path.exists():
        return VolumePlan.from_dict(read_json(run.plan_path))
    train_set = set(train_ids)
    subset = [c for c in description.cases if c.case_id in train_set]
    only_train = DatasetDescription(**{**vars(description), "cases": subset})
    fingerprint = compute_fingerprint(only_train)
    plan = make_plan(fingerprint, cfg)
    atomic_write_json(run.fingerprint_path, fingerprint)
    atomic_write_json(run.plan_path, plan.to_dict())
    logger.info(
        "plan: spacing %s mm, patch %s, normalisation %s (%d training cases)",
        plan.target_spacing,
        plan.patch_size,
        plan.normalization,
        len(subset),
    )
    warning = flip_warning(fingerprint, cfg.augment)
    if warning:
        logger.warning("%s", warning)
    return plan


def _load_cases(cfg: Config, cases: list[MsdCase], plan: VolumePlan) -> _Cases:
    """Read, normalise and resample ``cases`` to the plan's spacing (two threads)."""
    n_channels = len(plan.channels)

    def load(case: MsdCase) -> tuple[np.ndarray, np.ndarray]:
        image = read_case_image(case, n_channels)
        labels = read_case_labels(case, plan.labels)
        return prepare_case(
            image.array,
            image.meta.spacing,
            labels,
            plan,
            order=cfg.volume.image_order,
            label_mode=cfg.volume.label_resampling,
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        loaded = list(pool.map(load, cases))
    return _Cases([c.case_id for c in cases], [a for a, _ in loaded], [b for _, b in loaded])


def _one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k, dtype=np.float32)[labels]


def _val_dataset(cfg: Config, data: _Cases, plan: VolumePlan) -> tf.data.Dataset:
    """Fixed validation patches (the same every epoch): one on a structure, one random, per
    case; with deep supervision the targets are the same three scales as training's."""
    k = len(plan.labels)
    sampler = PatchSampler(
        data.images, data.labels, plan.patch_size, k, foreground_share=0.5, seed=cfg.train.seed
    )
    rng = np.random.default_rng(cfg.train.seed + 1)
    xs, ys = [], []
    for _ in range(VAL_PATCHES_PER_CASE * len(data.ids)):
        x, y = sampler.sample(rng)
        xs.append(x)
        ys.append(_one_hot(y, k))
    x, y = np.stack(xs), np.stack(ys)
    if cfg.model.deep_supervision:
        # the same targets as the training stream's (nearest: every 2nd, 4th voxel)
        target = tuple(np.asarray(t) for t in downsampled_targets(y))
        return tf.data.Dataset.from_tensor_slices((x, target)).batch(cfg.train.batch_size)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(cfg.train.batch_size)


def _compiled(cfg: Config, plan: VolumePlan, steps: int) -> keras.Model:
    k = len(plan.labels)
    model = build_model(cfg, k)
    names = [plan.labels[i] for i in sorted(plan.labels)]
    loss = get_loss(cfg.train)
    metrics = training_metrics("segmentation", k, class_names=names)
    if cfg.model.deep_supervision:
        model.compile(
            optimizer=build_optimizer(cfg.train, steps),
            loss=[loss, get_loss(cfg.train), get_loss(cfg.train)],
            loss_weights=deep_supervision_weights(),
            metrics=[metrics, [], []],
            jit_compile=cfg.train.jit_compile,
        )
    else:
        model.compile(
            optimizer=build_optimizer(cfg.train, steps),
            loss=loss,
            metrics=metrics,
            jit_compile=cfg.train.jit_compile,
            steps_per_execution=cfg.train.steps_per_execution,
        )
    return model


def train_volumetric(
    cfg: Config,
    callbacks: list | None = None,
    *,
    manifest: dict | None = None,
    eval_checkpoint: str = "best",
) -> TrainResult:
    """Train a 3D model into a run folder and score it on the whole validation volumes.

    The arguments and the result are :func:`medseg.training.train.train`'s, which calls this
    for a 3D config (see the module docstring for what happens).

    Raises:
        ConfigError: the config does not describe a 3D segmentation on an msd dataset.
        DataError: a case cannot be read.
        ModelError: the loss became NaN.
    """
    scan = scan_for_config(cfg)
    description, by_id = scan.description, scan.cases
    run, resumed = create_run(cfg)
    logger.info("run folder: %s", run.path)
    manifest = _manifest(cfg, run, resumed, manifest, scan.samples)
    splits = manifest["splits"]
    plan = _plan(cfg, run, resumed, description, splits["train"])
    train_data = _load_cases(cfg, [by_id[i] for i in splits["train"]], plan)
    val_data = _load_cases(cfg, [by_id[i] for i in splits["val"]], plan)
    steps = cfg.volume.batches_per_epoch
    train_ds = patch_dataset(
        train_data.images,
        train_data.labels,
        plan.patch_size,
        len(plan.labels),
        cfg.train.batch_size,
        cfg.augment,
        cfg.volume.foreground_share,
        seed=cfg.train.seed,
        deep_supervision=cfg.model.deep_supervision,
    )
    model = _compiled(cfg, plan, steps)
    logger.info(
        "training unet3d (%s parameters) on %d cases (%d val), %d epochs x %d batches of %d "
        "patches %s",
        f"{model.count_params():,}",
        len(train_data.ids),
        len(val_data.ids),
        cfg.train.epochs,
        steps,
        cfg.train.batch_size,
        "x".join(map(str, plan.patch_size)),
    )
    history = model.fit(
        train_ds,
        steps_per_epoch=steps,
        validation_data=_val_dataset(cfg, val_data, plan),
        validation_freq=validation_epochs(cfg.train.epochs, cfg.train.validation_freq),
        epochs=cfg.train.epochs,
        callbacks=run_callbacks(cfg, run, resumed, callbacks or []),
        verbose=1 if sys.stdout.isatty() else 2,
        shuffle=False,  # patches are drawn at random
    )
    losses = history.history.get("loss", [])
    if losses and not math.isfinite(losses[-1]):
        raise ModelError(
            f"{run.path}: the training loss became {losses[-1]} in epoch {len(losses)}; lower "
            "train.learning_rate or set train.clipnorm"
        )
    plot_history(run.logs / "history.csv", run.plots / "curves.png")
    val_cases = [by_id[i] for i in splits["val"]]
    metrics = score_volumes(
        run.path, val_cases, run.path, checkpoint=eval_checkpoint,
        tolerance_mm=cfg.evaluation.nsd_tolerance_mm,
    )["val"]  # fmt: skip
    run.set_state("done", cfg.hash())
    shutil.rmtree(run.checkpoints / "backup", ignore_errors=True)
    return TrainResult(run=run, history=history.history, metrics=metrics)
