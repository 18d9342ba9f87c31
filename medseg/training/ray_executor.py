"""Cross-validation folds as Ray tasks (``medseg cv --executor ray``).

Each pending fold becomes one Ray task that calls :func:`medseg.training.folds.run_fold` with plain
data (the config as a dict, the run folder as a path), so folds train in parallel on the CPUs or
GPUs of one machine (a local Ray instance) or of a Ray cluster (``--address auto`` on a cluster
node, or ``ray://head:10001`` through Ray Client).

Requirements on a cluster:

* the CV run folder (``run.root``) and the dataset (``data.root``) must be on storage that every
  worker sees under the same path, i.e. a shared filesystem (NFS, Lustre, a mounted bucket, ...).
  Workers write their fold folders there directly; nothing is copied back through Ray. A worker
  that cannot see the run folder fails its fold with a message saying so. Relative paths are
  resolved against the driver's working directory, which must therefore exist on the workers too
  (or use absolute paths).
* medseg (same version) and its dependencies must be installed on every node.

A fold that raises is retried once; since :func:`~medseg.training.folds.run_fold` resumes from the
fold's last completed epoch, the retry does not start over. A fold that still fails does not stop
the other folds: they run to the end, and then :class:`FoldError` names every failed fold with the
original error message. Rerunning the same ``medseg cv`` command resumes the failed folds and skips
the finished ones.

Training stays deterministic with ``train.deterministic``: :func:`medseg.training.train.train`
seeds Python/NumPy/TensorFlow and enables TensorFlow op determinism inside the worker process, so
a fold trained on Ray gives the same numbers as the same fold trained locally on the same kind of
machine.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from medseg.errors import ConfigError, MedsegError
from medseg.raytools import describe, import_ray, init_ray, worker_logging

logger = logging.getLogger(__name__)


class FoldError(MedsegError):
    """One or more cross-validation folds failed on Ray (after their retry).

    Attributes:
        fold: the first failed fold (1-based).
        failures: fold number -> original error, as ``"ExceptionType: message"``.
    """

    def __init__(self, failures: dict[int, str], finished: list[int] | None = None):
        self.failures = dict(sorted(failures.items()))
        self.fold = next(iter(self.failures))
        parts = [f"fold {k} failed: {msg}" for k, msg in self.failures.items()]
        msg = "; ".join(parts)
        if finished:
            msg += f" (folds {', '.join(map(str, sorted(finished)))} finished)"
        msg += "; rerun the same command to resume the failed folds"
        super().__init__(msg)


def _fold_task(cfg_dict: dict, root: str, k: int, cwd: str, log_level: int) -> dict:
    """Body of the Ray task of fold ``k``: runs in a worker process, possibly on another host."""
    worker_logging(log_level)
    host = socket.gethostname()
    if not (Path(root) / "splits.json").is_file():
        raise ConfigError(
            f"{root}/splits.json is not visible on Ray worker {host}: the cross-validation run "
            "folder (run.root) must be on storage that every Ray worker sees under the same path "
            "(a shared filesystem on a cluster)"
        )
    if log_level > logging.DEBUG:
        from medseg.utils import import_tensorflow_quietly

        import_tensorflow_quietly()
    from medseg.training.folds import run_fold

    start = time.monotonic()
    old_cwd = os.getcwd()
    # relative paths in the config (data.root) mean the driver's working directory
    if os.path.isdir(cwd):
        os.chdir(cwd)
    try:
        metrics = run_fold(cfg_dict, root, k)
    finally:
        os.chdir(old_cwd)
    return {"val": metrics, "host": host, "seconds": time.monotonic() - start}


def run_folds_on_ray(
    cfg_dict: dict,
    root: Path | str,
    folds: list[int],
    *,
    address: str | None = None,
    num_cpus_per_fold: float = 1,
    num_gpus_per_fold: float | None = None,
) -> dict[int, dict]:
    """Train (or resume) cross-validation ``folds`` of the run in ``root`` as Ray tasks.

    Args:
        cfg_dict: the resolved CV config (:meth:`medseg.config.Config.to_dict`).
        root: the CV run folder, holding ``splits.json``; on a cluster it must be on a shared
            filesystem that every worker sees under the same path.
        folds: fold numbers (1-based) to train.
        address: address of a running Ray cluster (``"auto"``, ``"ray://head:10001"``, ...);
            default: start a local Ray instance over this machine's CPUs, shut down at the end.
            When Ray is already initialised in this process, that instance is used as it is.
        num_cpus_per_fold: CPUs reserved by each fold task (how many folds run at once).
        num_gpus_per_fold: GPUs reserved by each fold task; default 1 when the cluster has
            GPUs, else 0.

    Returns:
        Fold number -> validation metrics of the fold, for every fold in ``folds``.

    Raises:
        ConfigError: Ray is not installed.
        FoldError: a fold failed twice (the original error and its retry); the message names
            the fold and the original error. The other folds ran to the end first.
    """
    folds = sorted(set(folds))
    if not folds:
        return {}
    ray = import_ray()
    log_level = logging.getLogger("medseg").getEffectiveLevel()
    verbose = log_level <= logging.INFO
    started = init_ray(ray, address, verbose)
    try:
        if num_gpus_per_fold is None:
            num_gpus_per_fold = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(_fold_task).options(
            name="medseg_cv_fold",
            num_cpus=num_cpus_per_fold,
            num_gpus=num_gpus_per_fold,
            max_retries=1,
            retry_exceptions=True,
            runtime_env={
                "env_vars": {
                    "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
                    "PYTHONUNBUFFERED": "1",
                }
            },
        )
        root_str = str(Path(root).resolve())
        refs = {task.remote(cfg_dict, root_str, k, os.getcwd(), log_level): k for k in folds}
        total = ray.cluster_resources()
        logger.info(
            "%d folds submitted to Ray (%g CPU, %g GPU each; cluster: %g CPU, %g GPU)",
            len(refs),
            num_cpus_per_fold,
            num_gpus_per_fold,
            total.get("CPU", 0),
            total.get("GPU", 0),
        )
        results, failures = _collect(ray, refs)
        if failures:
            raise FoldError(failures, finished=list(results))
        return dict(sorted(results.items()))
    finally:
        if started:
            ray.shutdown()


def _collect(ray, refs: dict) -> tuple[dict[int, dict], dict[int, str]]:
    """Wait for every fold task: fold -> validation metrics of those that finished, and fold ->
    error of those that failed after their retry. Cancels the rest when interrupted."""
    from medseg.evaluation.evaluate import headline

    results: dict[int, dict] = {}
    failures: dict[int, str] = {}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            k = refs[ready[0]]
            try:
                out = ray.get(ready[0])
            except Exception as e:  # RayTaskError, WorkerCrashedError, ...
                failures[k] = describe(e)
                logger.error("fold %d failed after its retry: %s", k, failures[k])
                continue
            results[k] = out["val"]
            logger.info(
                "fold %d finished on %s in %.0f s (%d/%d done)%s",
                k,
                out["host"],
                out["seconds"],
                len(results) + len(failures),
                len(refs),
                f": {headline(out['val'])}" if headline(out["val"]) else "",
            )
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return results, failures
