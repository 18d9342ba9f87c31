"""Training: one library function, :func:`train`, that the CLI's ``medseg train`` calls."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from medseg.artifacts.runs import RunDir, create_run, load_run_model, open_run, run_scope
from medseg.config import Config, TrainConfig, precision_policy
from medseg.data.pipeline import (
    ArrayData,
    LazyData,
    class_weights,
    load_arrays,
    load_data,
    make_dataset,
    prefetch_to_device,
    shard_length,
    training_dataset,
)
from medseg.data.samples import ScanResult
from medseg.data.scan import scan_from_config
from medseg.data.split import load_manifest, make_split, select, write_manifest
from medseg.errors import ConfigError, DataError, ModelError, RunExistsError
from medseg.evaluation.evaluate import evaluate_arrays
from medseg.evaluation.plots import plot_history
from medseg.models.losses import get_loss
from medseg.models.metrics import training_metrics
from medseg.models.registry import build_model
from medseg.training.callbacks import (
    AtomicBackupAndRestore,
    run_callbacks,
    validation_epochs,
)
from medseg.training.distributed import (
    Placement,
    SyncBatchNormStatistics,
    SyncFromChief,
    check_workers_agree,
    lost_worker,
    make_placement,
    prepare_for_multiworker,
    samples_digest,
    weights_digest,
)
from medseg.training.optim import build_optimizer
from medseg.training.result import TrainResult
from medseg.training.volumetric import is_volumetric, train_volumetric
from medseg.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


def num_outputs(cfg: Config, scan: ScanResult) -> int:
    """Model output channels: the class count for classification, else ``model.num_classes``."""
    if cfg.data.task == "classification":
        return len(scan.class_names)
    return cfg.model.num_classes


def prepare_data(
    cfg: Config, run: RunDir, resumed: bool, manifest: dict | None = None
) -> tuple[ScanResult, dict]:
    """Scan the dataset and write (or, when resuming, reload) the run's split manifest.

    ``manifest`` (e.g. one fold of a cross-validation) is used as given instead of a new split.
    """
    scan = scan_from_config(cfg.data)
    scan.log_problems()
    if resumed and run.splits_path.exists():
        manifest = load_manifest(run.splits_path)
    elif manifest is not None:
        write_manifest(run.splits_path, manifest)
    else:
        manifest = make_split(
            scan.samples,
            cfg.data.val_fraction,
            cfg.data.test_fraction,
            seed=cfg.train.seed,
            stratify=True,
        )
        manifest["class_names"] = scan.class_names
        manifest["layout"] = scan.layout
        write_manifest(run.splits_path, manifest)
    return scan, manifest


def _datasets(cfg: Config, scan: ScanResult, manifest: dict, n_out: int):
    return {
        split: load_data(select(scan.samples, manifest, split), cfg.data, n_out)
        for split in ("train", "val")
    }


def _write_problems(run: RunDir, scan: ScanResult, data: dict[str, ArrayData | LazyData]):
    problems = list(scan.problems) + [p for d in data.values() for p in d.problems]
    if problems:
        atomic_write_json(run.path / "data_problems.json", problems)
        logger.warning(
            "%d data problems listed in %s", len(problems), run.path / "data_problems.json"
        )


def get_strategy(cfg: Config) -> tf.distribute.Strategy:
    """The distribution strategy of ``train.distribute`` (and ``TF_CONFIG``).

    ``auto``: ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` names several workers, else
    ``MirroredStrategy`` over the GPUs when more than one is visible, else the default strategy;
    ``mirrored`` mirrors over every visible GPU, or every logical CPU device when there is no GPU
    (how the tests exercise it on a CPU split into logical devices); ``multiworker``: always
    ``MultiWorkerMirroredStrategy``. See :mod:`medseg.training.distributed`.
    """
    return make_placement(cfg).strategy


def _seed(cfg: Config) -> None:
    keras.utils.set_random_seed(cfg.train.seed)  # Python, NumPy and TensorFlow
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()


def _write_summary(model: keras.Model, path) -> None:
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line), expand_nested=False)
    atomic_write_text(path, "\n".join(lines) + "\n")


def train(
    cfg: Config,
    callbacks: list | None = None,
    *,
    manifest: dict | None = None,
    eval_checkpoint: str = "best",
) -> TrainResult:
    """Train the configured model into a run folder and evaluate it on the validation split.

    Rerunning with the same config and ``run.name`` (or :func:`resume`) continues an unfinished
    run from its last completed epoch, with the optimizer state and epoch counter restored.

    With a multi-worker cluster (``TF_CONFIG``, see :mod:`medseg.training.distributed`) every
    worker calls this with the same config: each trains on its own part of every epoch with
    ``train.batch_size`` images per step (the global batch is ``workers * batch_size``; with
    ``train.lr_scaling: linear`` the peak learning rate is ``workers * learning_rate``). Only the
    chief (worker 0) writes the run folder, evaluates and plots; the others write the same files
    into a temporary folder that they delete at the end. Rerunning the same command on every
    worker resumes from the chief's last completed epoch.

    Args:
        cfg: the resolved config.
        callbacks: extra Keras callbacks (after medseg's own).
        manifest: a split manifest to train on (train/val/test ids) instead of a new split;
            cross-validation passes each fold's (:func:`medseg.data.split.fold_manifest`).
        eval_checkpoint: the checkpoint evaluated on the validation split at the end. ``best``
            was chosen on that same split; cross-validation scores ``last``, whose choice did
            not look at the held-out fold.

    Returns:
        The run folder, the Keras history and the validation metrics.

    Raises:
        RunExistsError: the run folder exists (see :func:`medseg.artifacts.runs.create_run`).
        DataError: the dataset is missing or unusable, or the workers loaded different samples.
        ConfigError: the config names an unknown model, loss, ...; ``TF_CONFIG`` is malformed;
            another worker failed to set up.
        ModelError: the loss became NaN.
    """
    # First: MultiWorkerMirroredStrategy must exist before TensorFlow runs anything else.
    placement = make_placement(cfg)
    policy = precision_policy(cfg.train)
    if cfg.train.mixed_precision == "auto":
        logger.info("train.mixed_precision auto: %s", policy)
    keras.mixed_precision.set_global_policy(policy)
    _seed(cfg)
    if is_volumetric(cfg):
        if placement.multiworker:
            raise ConfigError("TF_CONFIG: unet3d does not train across several workers yet")
        with run_scope(cfg):  # the run's lock; a run stopped before its first epoch is removed
            return train_volumetric(
                cfg, callbacks, manifest=manifest, eval_checkpoint=eval_checkpoint
            )
    if placement.is_chief:
        with run_scope(cfg):
            return _train(cfg, placement, callbacks, manifest, eval_checkpoint)
    # Other workers do the same work (saving can take part in collective ops) into a
    # temporary run folder, deleted at the end.
    chief_run = RunDir(Path(cfg.run.root) / (cfg.run.name or "<chief's run>"))
    scratch = tempfile.mkdtemp(prefix=f"medseg-worker{placement.worker_index}-")
    local = copy.deepcopy(cfg)
    local.run.root, local.run.overwrite = scratch, False
    logger.info(
        "worker %d of %d: the chief writes the run folder; this worker's copy is %s (deleted "
        "at the end)",
        placement.worker_index,
        placement.num_workers,
        scratch,
    )
    try:
        with run_scope(local):
            result = _train(local, placement, callbacks, manifest, eval_checkpoint)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.run = chief_run
    return result


@dataclass
class _Prepared:
    """What a worker has set up before building the model: the run folder and the data."""

    run: RunDir
    resumed: bool
    manifest: dict
    data: dict[str, ArrayData | LazyData]
    n_out: int


def _prepare(cfg: Config, placement: Placement, manifest: dict | None) -> _Prepared:
    """Create the run folder, split and load the data; every worker reports in before any
    error is raised, so that none waits forever for a worker that stopped."""
    failure, digest = None, None
    try:
        run, resumed = create_run(cfg)
        logger.info("run folder: %s", run.path)
        scan, manifest = prepare_data(cfg, run, resumed, manifest)
        n_out = num_outputs(cfg, scan)
        data = _datasets(cfg, scan, manifest, n_out)
        _write_problems(run, scan, data)
        digest = samples_digest(data["train"].samples, data["val"].samples)
    except Exception as e:
        failure = e
    check_workers_agree(placement, failure, digest)
    if failure is not None:
        raise failure
    return _Prepared(run, resumed, manifest, data, n_out)


def _images_per_worker(cfg: Config, placement: Placement, n_train: int) -> int:
    """Training images each worker sees per epoch (all of them without a cluster)."""
    workers, batch = placement.num_workers, cfg.train.batch_size
    n_worker = shard_length(n_train, workers)
    if n_worker == 0:
        raise DataError(
            f"the training split has {n_train} images, fewer than the {workers} workers"
        )
    if n_worker < batch:
        logger.warning(
            "training split (%d images%s) is smaller than one batch (%d)",
            n_worker,
            f" per worker, of {n_train}" if workers > 1 else "",
            batch,
        )
    return n_worker


def _fit_datasets(
    cfg: Config, placement: Placement, prep: _Prepared
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """The training and validation datasets that ``fit`` reads."""
    workers = placement.num_workers
    # tf.distribute treats a dataset's batch as the global batch and splits it over the
    # replicas of all workers: each worker then takes `batch` images of its own part per step.
    common = {
        "task": cfg.data.task,
        "num_classes": prep.n_out,
        "batch_size": cfg.train.batch_size * workers,
    }
    train_ds = training_dataset(
        prep.data["train"],
        cfg,
        prep.n_out,
        common["batch_size"],
        shard=(workers, placement.worker_index) if placement.multiworker else None,
    )
    val_ds = make_dataset(prep.data["val"], **common)
    if placement.multiworker:
        # validation: every worker evaluates its share of each batch (tf.distribute shards it)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        val_ds = val_ds.with_options(options)
    else:
        train_ds = prefetch_to_device(train_ds)
    return train_ds, val_ds


def _scaled_train_config(cfg: Config, workers: int, n_worker: int, n_train: int) -> TrainConfig:
    """``cfg.train`` with the learning rate scaled to the cluster (``train.lr_scaling``)."""
    if workers <= 1:
        return cfg.train
    batch = cfg.train.batch_size
    scale = workers if cfg.train.lr_scaling == "linear" else 1
    train_cfg = dataclasses.replace(cfg.train, learning_rate=cfg.train.learning_rate * scale)
    logger.info(
        "%d workers x %d images per step = global batch %d; %d of %d training images per "
        "worker and epoch; peak learning rate %g (train.lr_scaling: %s)",
        workers,
        batch,
        batch * workers,
        n_worker,
        n_train,
        train_cfg.learning_rate,
        cfg.train.lr_scaling,
    )
    if scale > 1 and not cfg.train.warmup_epochs and cfg.train.lr_schedule == "cosine":
        logger.warning(
            "the learning rate is scaled x%d without a warm-up; consider train.warmup_epochs >= 1",
            scale,
        )
    return train_cfg


def _class_weights(cfg: Config, prep: _Prepared) -> dict[int, float] | None:
    """Inverse-frequency class weights when ``train.class_weights`` asks for them."""
    if not (cfg.train.class_weights and cfg.data.task == "classification"):
        return None
    targets = np.array([s.target for s in prep.data["train"].samples])
    weights = class_weights(targets, prep.n_out)
    logger.info("class weights: %s", weights)
    return weights


def _compiled_model(
    cfg: Config, placement: Placement, train_cfg: TrainConfig, n_out: int, steps: int
) -> keras.Model:
    """The configured model, built and compiled inside the distribution strategy."""
    with placement.strategy.scope():
        model = build_model(cfg, n_out)
        model.compile(
            optimizer=build_optimizer(train_cfg, steps),
            loss=get_loss(cfg.train),
            metrics=training_metrics(cfg.data.task, n_out),
            jit_compile=cfg.train.jit_compile,
            steps_per_execution=cfg.train.steps_per_execution,
        )
        if cfg.model.freeze_backbone and cfg.model.fine_tune_after:
            from medseg.models.mobilenet import build_optimizer_for_fine_tuning

            # Build the optimizer over the frozen backbone too, so that unfreezing it later
            # keeps the optimizer state (and a resumed run restores it).
            build_optimizer_for_fine_tuning(model)
    return model


def _fit(
    cfg: Config,
    placement: Placement,
    prep: _Prepared,
    model: keras.Model,
    datasets: tuple[tf.data.Dataset, tf.data.Dataset],
    weights: dict[int, float] | None,
    extra_callbacks: list | None,
) -> keras.callbacks.History:
    """``model.fit`` with medseg's callbacks; a lost worker or a bad file becomes a medseg
    error."""
    fit_callbacks = run_callbacks(cfg, prep.run, prep.resumed, extra_callbacks or [])
    if placement.strategy.num_replicas_in_sync > 1:
        # first: the checkpoints of the epoch then hold the averaged statistics
        fit_callbacks.insert(0, SyncBatchNormStatistics(placement.strategy))
    if placement.multiworker:
        prepare_for_multiworker(model)
        # after BackupAndRestore: the chief's restored state goes to every worker
        at = next(i for i, c in enumerate(fit_callbacks) if isinstance(c, AtomicBackupAndRestore))
        fit_callbacks.insert(at + 1, SyncFromChief(placement.strategy))
    train_ds, val_ds = datasets
    try:
        with warnings.catch_warnings():
            # the multi-worker dataset has no length: Keras warns when each epoch's data ends
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            return model.fit(
                train_ds,
                validation_data=val_ds,
                validation_freq=validation_epochs(cfg.train.epochs, cfg.train.validation_freq),
                epochs=cfg.train.epochs,
                callbacks=fit_callbacks,
                class_weight=weights,
                verbose=1 if sys.stdout.isatty() else 2,
                shuffle=False,  # the dataset reshuffles itself every epoch
            )
    except tf.errors.OpError as e:
        lost = lost_worker(e) if placement.multiworker else None
        if lost is not None:
            raise lost from None
        # With data.cache false, files are decoded inside tf.data: a bad file surfaces here.
        if "DataError" not in e.message:
            raise
        raise DataError(f"while reading training data: {e.message.splitlines()[0]}") from None


def _train(
    cfg: Config,
    placement: Placement,
    callbacks: list | None,
    manifest: dict | None,
    eval_checkpoint: str = "best",
) -> TrainResult:
    prep = _prepare(cfg, placement, manifest)
    workers, run = placement.num_workers, prep.run
    n_train, n_val = len(prep.data["train"]), len(prep.data["val"])
    n_worker = _images_per_worker(cfg, placement, n_train)
    datasets = _fit_datasets(cfg, placement, prep)
    steps = math.ceil(n_worker / cfg.train.batch_size)
    train_cfg = _scaled_train_config(cfg, workers, n_worker, n_train)
    weights = _class_weights(cfg, prep)
    model = _compiled_model(cfg, placement, train_cfg, prep.n_out, steps)
    _write_summary(model, run.path / "model_summary.txt")
    logger.info(
        "training %s (%s parameters) on %d images (%d val), %d epochs x %d steps",
        cfg.model.name,
        f"{model.count_params():,}",
        n_train,
        n_val,
        cfg.train.epochs,
        steps,
    )
    history = _fit(cfg, placement, prep, model, datasets, weights, callbacks)
    final = weights_digest(model)
    if placement.multiworker:
        logger.info("worker %d of %d: final weights %s", placement.worker_index, workers, final)
    losses = history.history.get("loss", [])
    if losses and not np.isfinite(losses[-1]):
        raise ModelError(
            f"{run.path}: the training loss became {losses[-1]} in epoch {len(losses)} and "
            "training stopped; lower train.learning_rate, set train.clipnorm, or check the data"
        )
    if not placement.is_chief:
        # its copy of the run may hold no checkpoint (a resumed run with no epoch left)
        return TrainResult(run, history.history, {}, is_chief=False, weights=final)
    if not run.best_model.exists():
        raise ConfigError(
            f"train.monitor: '{cfg.train.monitor}' was never logged, so no best model was saved "
            f"in {run.path}; logged: {', '.join(history.history)}"
        )
    plot_history(run.logs / "history.csv", run.plots / "curves.png")
    metrics = _evaluate_on_val(cfg, prep, eval_checkpoint)
    run.set_state("done", cfg.hash())
    shutil.rmtree(run.checkpoints / "backup", ignore_errors=True)  # kept until now for resume
    return TrainResult(run=run, history=history.history, metrics=metrics, weights=final)


def _evaluate_on_val(cfg: Config, prep: _Prepared, checkpoint: str) -> dict:
    """Score ``checkpoint`` on the validation split with what training holds (its config, the
    decoded validation images, the manifest's classes), as ``medseg evaluate`` would.

    The checkpoint is loaded from the run (its recorded checksum checked) rather than taken
    from the model in memory: that one holds the last epoch's weights, not the best ones, and
    lives in the distribution strategy, whose collective ops a chief cannot run alone.
    """
    val = prep.data["val"]
    if not isinstance(val, ArrayData):  # data.cache false: decoded once, now
        val = load_arrays(val.samples, cfg.data, prep.n_out)
    return evaluate_arrays(
        prep.run,
        cfg,
        load_run_model(prep.run, checkpoint),
        val,
        split="val",
        checkpoint=checkpoint,
        class_names=prep.manifest.get("class_names", []),
    )


def resume(run_dir: str | Path, callbacks: list | None = None) -> TrainResult:
    """Continue an unfinished run with the config stored in it (``medseg train --resume``).

    Raises:
        RunExistsError: the run has already finished.
    """
    run = open_run(run_dir)
    if run.state().get("status") == "done":
        raise RunExistsError(f"{run.path}: the run has finished; nothing to resume")
    cfg = run.config()
    cfg.run.root, cfg.run.name, cfg.run.overwrite = str(run.path.parent), run.path.name, False
    return train(cfg, callbacks)
