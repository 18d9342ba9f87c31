"""Distribution strategies, and what keeps the workers of a multi-worker run in step.

One machine: ``MirroredStrategy`` over its GPUs (``train.distribute``: ``auto`` with several GPUs,
or ``mirrored``). Several machines: ``MultiWorkerMirroredStrategy`` (MWMS) over the cluster of
``TF_CONFIG`` (:mod:`medseg.training.cluster`), each worker one process running the same command.

MWMS must be created before TensorFlow runs anything else in the process (it starts the
process's gRPC server and collective runtime), so :func:`medseg.training.train.train` creates the
strategy first, and a process keeps its one MWMS for any later :func:`train` call. A worker that
never starts would leave the others waiting inside TensorFlow, deaf to SIGTERM and Ctrl-C: they
give up after ``MEDSEG_WORKER_TIMEOUT`` seconds (default 600) with a :class:`ConfigError`.

Workers stay in step in three places:

* :func:`check_workers_agree` after the setup: every worker must have finished it (a worker that
  failed, e.g. on a finished run folder, makes the others stop instead of waiting for it forever)
  and loaded the same train/val samples in the same order (the split is made from ``train.seed``
  on every worker, or read by the chief from the run folder when resuming).
* :class:`SyncFromChief` at the start of ``fit``: the chief's weights, optimizer state and epoch
  (restored from its backup when resuming) are copied to every worker, so that a resumed run goes
  on from the same state everywhere without the other workers needing the chief's files.
* ``fit`` itself: gradients are all-reduced every step, so the weights stay identical; the logged
  metrics (and so early stopping and NaN checks) are the same on every worker.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from medseg.config import Config
from medseg.errors import ConfigError, DataError
from medseg.training.cluster import Cluster, cluster_from_env

logger = logging.getLogger(__name__)

# The process's MultiWorkerMirroredStrategy: TensorFlow allows one per process.
_MULTIWORKER: list[tuple[Cluster, tf.distribute.Strategy]] = []
# How long a worker waits for the others to start (seconds), unless MEDSEG_WORKER_TIMEOUT says.
DEFAULT_WORKER_TIMEOUT = 600.0


@dataclass
class Placement:
    """The strategy a run trains under, and this process's place in the cluster.

    Attributes:
        strategy: the distribution strategy.
        cluster: the multi-worker cluster; None when training in one process.
    """

    strategy: tf.distribute.Strategy
    cluster: Cluster | None = None

    @property
    def multiworker(self) -> bool:
        return self.cluster is not None

    @property
    def num_workers(self) -> int:
        return self.cluster.num_workers if self.cluster else 1

    @property
    def worker_index(self) -> int:
        return self.cluster.worker_index if self.cluster else 0

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the run folder (always, in one process)."""
        return self.cluster is None or self.cluster.is_chief


def resolve_cluster(cfg: Config) -> Cluster | None:
    """The multi-worker cluster to train on, from ``train.distribute`` and ``TF_CONFIG``.

    Returns:
        The cluster for ``multiworker``, and for ``auto`` when ``TF_CONFIG`` names several
        workers; else None (one process).

    Raises:
        ConfigError: ``TF_CONFIG`` is malformed; ``multiworker`` without ``TF_CONFIG``; or
            ``none``/``mirrored`` with a ``TF_CONFIG`` of several workers (each process would
            train on its own and write the same run folder).
    """
    cluster = cluster_from_env()
    n = cluster.num_workers if cluster else 1
    mode = cfg.train.distribute
    if mode == "multiworker":
        if cluster is None:
            raise ConfigError(
                "train.distribute: 'multiworker' needs the cluster: set TF_CONFIG or pass "
                "medseg train --workers HOST:PORT,... --worker-index N"
            )
        return cluster
    if mode == "auto":
        return cluster if n > 1 else None
    if n > 1:
        raise ConfigError(
            f"train.distribute: '{mode}' trains in one process, but TF_CONFIG names {n} workers; "
            "use 'auto' or 'multiworker', or unset TF_CONFIG"
        )
    return None


def local_strategy(cfg: Config) -> tf.distribute.Strategy:
    """The one-machine strategy of ``train.distribute``.

    ``auto`` mirrors over the GPUs when more than one is visible, else uses the default strategy;
    ``mirrored`` mirrors over every visible GPU, or every logical CPU device when there is no GPU
    (how the tests exercise it on a CPU split into logical devices).
    """
    gpus = tf.config.list_logical_devices("GPU")
    if cfg.train.distribute == "none" or (cfg.train.distribute == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    logger.info("MirroredStrategy over %d devices: %s", len(devices), ", ".join(devices))
    return tf.distribute.MirroredStrategy(devices=devices)


def multiworker_strategy(cluster: Cluster) -> tf.distribute.Strategy:
    """This process's ``MultiWorkerMirroredStrategy`` for ``cluster`` (created once).

    Creating it starts this worker's server at its address and waits until every worker of the
    cluster has started.

    Raises:
        ConfigError: TensorFlow already ran something in this process, or the process already
            joined another cluster.
    """
    if _MULTIWORKER:
        known, strategy = _MULTIWORKER[0]
        if known != cluster:
            raise ConfigError(
                "TF_CONFIG: this process already joined another cluster (TensorFlow allows one "
                "per process); start a new process for each worker of the new cluster"
            )
        return strategy
    timeout = worker_timeout()
    logger.info(
        "multi-worker training: worker %d of %d (%s), waiting up to %g s for the other workers",
        cluster.worker_index,
        cluster.num_workers,
        cluster.address,
        timeout,
    )

    _configure_coordination(cluster, timeout)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as e:
        if "startup" not in str(e):
            raise
        raise ConfigError(
            "train.distribute: multi-worker training must start before TensorFlow runs anything "
            "else in the process; run one `medseg train` process per worker"
        ) from None
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError):
        others = ", ".join(a for job in cluster.jobs.values() for a in job if a != cluster.address)
        raise ConfigError(
            f"TF_CONFIG: the other workers ({others}) did not all start within {timeout:g} s; "
            "start `medseg train` with the same cluster on every worker (MEDSEG_WORKER_TIMEOUT "
            "sets the wait)"
        ) from None
    _MULTIWORKER.append((cluster, strategy))
    logger.info(
        "MultiWorkerMirroredStrategy: %d replicas in sync over %d workers",
        strategy.num_replicas_in_sync,
        cluster.num_workers,
    )
    return strategy


def _configure_coordination(cluster: Cluster, timeout: float) -> None:
    """Configure TensorFlow's coordination service as MWMS would, plus a start-up deadline.

    Without it a worker waits forever inside TensorFlow (deaf to Ctrl-C and SIGTERM) for a worker
    that never starts. With ``cluster_register_with_barrier`` every task's registration waits
    for all of them, for at most ``timeout`` seconds, and then fails with
    ``DeadlineExceededError``. Uses TensorFlow internals (2.21); without them, no deadline.
    """
    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.distribute import multi_worker_util
        from tensorflow.python.eager import context

        ctx = context.context()
        if ctx.coordination_service is not None:
            return
        spec = tf.train.ClusterSpec(
            {job: list(addresses) for job, addresses in cluster.jobs.items()}
        )
        ctx.configure_coordination_service(
            service_type="standalone",
            service_leader=multi_worker_util.coordination_leader(spec),
            coordinated_jobs=[
                coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(addresses))
                for job, addresses in cluster.jobs.items()
            ],
            cluster_register_timeout_in_ms=int(timeout * 1000),
        )
        ctx._coordination_service_config.cluster_register_with_barrier = True
    except (ImportError, AttributeError) as e:  # another TensorFlow version
        logger.debug("no start-up deadline for the workers: %s", e)


def worker_timeout() -> float:
    """Seconds a worker waits for the others to start: ``MEDSEG_WORKER_TIMEOUT`` or 600.

    Raises:
        ConfigError: ``MEDSEG_WORKER_TIMEOUT`` is not a positive number.
    """
    text = os.environ.get("MEDSEG_WORKER_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_WORKER_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ConfigError(f"MEDSEG_WORKER_TIMEOUT: expected seconds > 0, got {text!r}")
    return value


def lost_worker(error: tf.errors.OpError) -> ConfigError | None:
    """A readable error for a collective op that failed because another worker went away."""
    lost = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError)
    if not isinstance(error, lost):
        return None
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message or str(error))
    first = text.strip().splitlines()[0][:300]
    return ConfigError(
        f"TF_CONFIG: lost contact with another worker ({type(error).__name__}: {first}); "
        "rerun the same command on every worker to resume from the last completed epoch"
    )


def make_placement(cfg: Config) -> Placement:
    """The strategy for ``cfg`` and this process's place in the cluster.

    Call it before any other TensorFlow work in the process (see the module notes).
    """
    cluster = resolve_cluster(cfg)
    if cluster is not None:
        return Placement(multiworker_strategy(cluster), cluster)
    return Placement(local_strategy(cfg))


def _all_sum(
    strategy: tf.distribute.Strategy, tensors: list[tf.Tensor], first_replica_only: bool = False
) -> list[np.ndarray]:
    """Sum ``tensors`` over every replica of every worker (``first_replica_only``: take the
    first replica's, i.e. the chief's, values: a broadcast)."""

    def replica_fn(*xs):
        ctx = tf.distribute.get_replica_context()
        if first_replica_only:
            keep = tf.equal(ctx.replica_id_in_sync_group, 0)
            xs = tuple(tf.where(keep, x, tf.zeros_like(x)) for x in xs)
        return [ctx.all_reduce(tf.distribute.ReduceOp.SUM, x) for x in xs]

    @tf.function
    def run():
        return strategy.run(replica_fn, args=tuple(tensors))

    out = run()
    return [strategy.experimental_local_results(t)[0].numpy() for t in out]


def samples_digest(*sample_lists) -> str:
    """SHA-256 over the ids of the samples, in order (what each worker must agree on)."""
    h = hashlib.sha256()
    for samples in sample_lists:
        for s in samples:
            h.update(s.id.encode())
            h.update(b"\0")
        h.update(b"\1")
    return h.hexdigest()


def check_workers_agree(
    placement: Placement, failure: BaseException | None, digest: str | None
) -> None:
    """Collective check after the setup: every worker got through it, with the same samples.

    Every worker must call it (a worker whose setup failed too, with ``failure`` set, before
    raising its own error), so that nobody waits for a worker that has stopped.

    Raises:
        ConfigError: another worker failed its setup (its own output says why).
        DataError: the workers loaded different training or validation samples.
    """
    if not placement.multiworker:
        return
    w = placement.num_workers
    failed = np.zeros(w)
    code = np.zeros(32)
    if failure is not None or digest is None:
        failed[placement.worker_index] = 1.0
    else:
        code = np.frombuffer(bytes.fromhex(digest), np.uint8).astype(np.float64)
    vec = tf.constant(np.concatenate([failed, code, code**2]), tf.float64)
    try:
        (total,) = _all_sum(placement.strategy, [vec])
    except tf.errors.OpError as e:
        lost = lost_worker(e)
        if lost is None or failure is not None:
            raise
        raise lost from None
    if failure is not None:
        return
    bad = [str(i) for i in np.flatnonzero(total[:w])]
    if bad:
        raise ConfigError(
            f"worker {', '.join(bad)} of {w} failed while setting up the run (its output says "
            "why); stopping this worker too"
        )
    n = placement.strategy.num_replicas_in_sync
    s, s2 = total[w : w + 32], total[w + 32 :]
    if not np.array_equal(n * s2, s * s):
        raise DataError(
            "the workers loaded different training/validation samples: every worker must see the "
            "same dataset at data.root and run the same config (same train.seed)"
        )
    logger.info("all %d workers set up with the same %s split", w, digest[:12])


def broadcast_from_chief(strategy: tf.distribute.Strategy, variables: list) -> None:
    """Give every worker the chief's values of ``variables`` (Keras or TF variables)."""
    if not variables:
        return
    values = [
        tf.convert_to_tensor(v.value if isinstance(v, keras.Variable) else v) for v in variables
    ]
    groups: dict[bool, list[int]] = {True: [], False: []}
    for i, t in enumerate(values):
        groups[t.dtype == tf.float32].append(i)
    packed, order = [], []
    for is_f32, idx in groups.items():
        if not idx:
            continue
        dtype = tf.float32 if is_f32 else tf.float64
        packed.append(tf.concat([tf.reshape(tf.cast(values[i], dtype), [-1]) for i in idx], 0))
        order.append(idx)
    sums = _all_sum(strategy, packed, first_replica_only=True)
    for flat, idx in zip(sums, order, strict=True):
        offset = 0
        for i in idx:
            size = int(np.prod(values[i].shape))
            part = flat[offset : offset + size].reshape(values[i].shape.as_list())
            offset += size
            if not values[i].dtype.is_floating:
                part = np.rint(part)
            variables[i].assign(tf.cast(part, values[i].dtype))


class SyncFromChief(keras.callbacks.Callback):
    """At the start of ``fit``, copy the chief's weights, optimizer state and epoch to every
    worker (after ``BackupAndRestore`` restored them on the chief when resuming)."""

    def __init__(self, strategy: tf.distribute.Strategy):
        super().__init__()
        self.strategy = strategy

    def on_train_begin(self, logs=None):
        model = self.model
        optimizer = model.optimizer
        if optimizer is not None and not optimizer.built:
            with self.strategy.scope():
                optimizer.build(model.trainable_variables)
        variables = list(model.weights) + (list(optimizer.variables) if optimizer else [])
        epoch = tf.Variable(float(model._initial_epoch or 0), dtype=tf.float64)
        broadcast_from_chief(self.strategy, [*variables, epoch])
        model._initial_epoch = int(epoch.numpy()) or None
        if model._initial_epoch:
            logger.info("all workers continue at epoch %d", model._initial_epoch + 1)


def batch_norm_statistics(model: keras.Model) -> list:
    """The moving means and variances of the model's batch-norm layers."""
    return [
        v
        for v in model.non_trainable_weights
        if v.name in ("moving_mean", "moving_variance") and v.dtype == "float32"
    ]


def average_over_replicas(strategy: tf.distribute.Strategy, variables: list) -> None:
    """Set each of ``variables`` to its mean over every replica of every worker.

    Each replica reads its own copy (they differ where Keras updates a variable locally, as it
    does batch-norm statistics).
    """
    if not variables:
        return
    shapes = [tuple(v.shape) for v in variables]

    def replica_fn():
        ctx = tf.distribute.get_replica_context()
        flat = tf.concat([tf.reshape(tf.convert_to_tensor(v.value), [-1]) for v in variables], 0)
        return ctx.all_reduce(tf.distribute.ReduceOp.MEAN, flat)

    @tf.function
    def run():
        return strategy.run(replica_fn)

    flat = strategy.experimental_local_results(run())[0].numpy()
    offset = 0
    for v, shape in zip(variables, shapes, strict=True):
        size = int(np.prod(shape))
        v.assign(flat[offset : offset + size].reshape(shape))
        offset += size


class SyncBatchNormStatistics(keras.callbacks.Callback):
    """Average the batch-norm moving statistics over all replicas before each validation and
    at the end of each epoch (before the checkpoints are written).

    Keras updates them on each replica from that replica's batch only, so the workers' copies
    drift apart. The moving averages are linear in the batch statistics, so averaging them once
    an epoch gives the same values as averaging every step: the moving average of the mean of
    the replicas' batch means (and variances).
    """

    def __init__(self, strategy: tf.distribute.Strategy):
        super().__init__()
        self.strategy = strategy
        self._stale = False

    def on_epoch_begin(self, epoch, logs=None):
        self._stale = True

    def _sync(self):
        if self._stale:
            average_over_replicas(self.strategy, batch_norm_statistics(self.model))
            self._stale = False

    def on_test_begin(self, logs=None):
        self._sync()

    def on_epoch_end(self, epoch, logs=None):
        self._sync()


def weights_digest(model: keras.Model) -> str:
    """Short SHA-256 of the model's weights (logged by every worker at the end of training: the
    same on all of them)."""
    h = hashlib.sha256()
    for w in model.get_weights():
        a = np.ascontiguousarray(w)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def prepare_for_multiworker(model: keras.Model) -> None:
    """Let ``fit``/``evaluate`` run ``model`` under ``MultiWorkerMirroredStrategy``.

    Two Keras (3.15) code paths fail under MWMS, both about reducing per-replica values:

    * the logs a train/test step returns (each replica's running loss and metrics) are
      averaged with ``strategy.reduce("MEAN", v, axis=0)``, which fails on scalars ("Invalid
      reduction dimension 0 for input with 0 dimensions", tensorflow/tensorflow#72388): they
      are averaged over the replicas of all workers with ``axis=None`` instead, so every worker
      sees the same step logs (a NaN loss on one stops all). The epoch logs that callbacks see
      are read from the metric variables, summed over all replicas.
    * a model created under a strategy is built from the first batch ``strategy.reduce``-d as
      an (images, targets) pair, which MWMS cannot do for a nested value ("Attempt to convert
      a value (PerReplica...)"). The build only needs shapes and dtypes, so it gets the first
      replica's batch instead (no collective op).
    """
    _patch_keras_step_reduction()
    original = model._maybe_symbolic_build

    def build(iterator=None, data_batch=None):
        if iterator is not None and data_batch is None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(
                    lambda x: x.values[0] if isinstance(x, tf.distribute.DistributedValues) else x,
                    next(it),
                )
                break
        return original(data_batch=data_batch)

    model._maybe_symbolic_build = build


def _patch_keras_step_reduction() -> None:
    """Average scalar step logs over all replicas under MWMS (see :func:`prepare_for_multiworker`).

    Replaces Keras' ``reduce_per_replica`` in its TensorFlow trainer module for ``reduction=
    "auto"`` under a multi-worker strategy only; everything else goes to the original.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica
    if getattr(original, "_medseg_multiworker", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction != "auto" or not tf_trainer._collective_all_reduce_multi_worker(strategy):
            return original(values, strategy, reduction)

        def mean(v):
            if isinstance(v, tf.distribute.DistributedValues):
                return strategy.reduce("MEAN", v, axis=None)
            return v

        return tf.nest.map_structure(mean, values)

    reduce_per_replica._medseg_multiworker = True
    tf_trainer.reduce_per_replica = reduce_per_replica
