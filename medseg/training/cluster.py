"""Multi-worker training: the cluster, from ``TF_CONFIG`` or from ``--workers``.

TensorFlow's ``MultiWorkerMirroredStrategy`` reads the cluster from the ``TF_CONFIG`` environment
variable, a JSON document such as::

    {"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]},
     "task": {"type": "worker", "index": 0}}

Every worker runs the same ``medseg train`` command with the same cluster and its own task index.
Worker 0 is the chief (or the single ``chief`` task when the cluster names one): it alone writes
the run folder. ``medseg train --workers HOST:PORT,HOST:PORT --worker-index N`` builds the same
document (:func:`tf_config_for`).

This module only parses and validates (no TensorFlow); :mod:`medseg.training.distributed` creates
the strategy and keeps the workers in step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from medseg.errors import ConfigError

JOBS = ("chief", "worker")


@dataclass(frozen=True)
class Cluster:
    """The training cluster and this process's place in it.

    Attributes:
        jobs: addresses (``host:port``) per job, ``chief`` and/or ``worker``.
        task_type: this process's job.
        task_index: this process's index within its job.
    """

    jobs: dict[str, tuple[str, ...]]
    task_type: str
    task_index: int

    @property
    def num_workers(self) -> int:
        """Training processes in the cluster (the chief task counts as one)."""
        return sum(len(v) for v in self.jobs.values())

    @property
    def worker_index(self) -> int:
        """This process's rank, 0 to ``num_workers - 1``; the chief is 0."""
        offset = len(self.jobs.get("chief", ())) if self.task_type == "worker" else 0
        return offset + self.task_index

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the run folder."""
        return self.worker_index == 0

    @property
    def address(self) -> str:
        return self.jobs[self.task_type][self.task_index]


def _check_address(address: object, where: str) -> str:
    if not isinstance(address, str):
        raise ConfigError(f"{where}: expected 'host:port', got {address!r}")
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{where}: expected 'host:port' with a port in 1..65535, got {address!r}")
    return address.strip()


def parse_tf_config(text: str, source: str = "TF_CONFIG") -> Cluster:
    """Parse and validate a ``TF_CONFIG`` document.

    Args:
        text: the JSON text.
        source: what to call it in error messages.

    Raises:
        ConfigError: not JSON, no ``cluster`` or ``task``, a job other than ``chief`` and
            ``worker``, more than one chief, a malformed or repeated address, or a task that the
            cluster does not have.
    """
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a JSON object with 'cluster' and 'task'")
    cluster = doc.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise ConfigError(
            f"{source}: needs a 'cluster' mapping, e.g. "
            '{"worker": ["host1:12345", "host2:12345"]}'
        )
    jobs: dict[str, tuple[str, ...]] = {}
    seen: set[str] = set()
    for job, addresses in cluster.items():
        if job not in JOBS:
            raise ConfigError(
                f"{source}: cluster job '{job}' is not supported; multi-worker training uses "
                "'worker' (and optionally one 'chief')"
            )
        if not isinstance(addresses, list) or not addresses:
            raise ConfigError(f"{source}: cluster.{job} must be a non-empty list of 'host:port'")
        checked = tuple(_check_address(a, f"{source}: cluster.{job}") for a in addresses)
        for a in checked:
            if a in seen:
                raise ConfigError(f"{source}: address {a} is listed twice")
            seen.add(a)
        jobs[job] = checked
    if len(jobs.get("chief", ())) > 1:
        raise ConfigError(f"{source}: cluster.chief must have exactly one address")
    task = doc.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ConfigError(
            f"{source}: needs a 'task' mapping, e.g. " + '{"type": "worker", "index": 0}'
        )
    task_type, index = task["type"], task["index"]
    if task_type not in jobs:
        raise ConfigError(
            f"{source}: task type {task_type!r} is not a job of the cluster ({', '.join(jobs)})"
        )
    if isinstance(index, bool) or not isinstance(index, int):
        raise ConfigError(f"{source}: task index must be an integer, got {index!r}")
    if not 0 <= index < len(jobs[task_type]):
        raise ConfigError(
            f"{source}: task index {index} is out of range for the {len(jobs[task_type])} "
            f"'{task_type}' address(es) (0..{len(jobs[task_type]) - 1})"
        )
    return Cluster(jobs=jobs, task_type=task_type, task_index=index)


def cluster_from_env() -> Cluster | None:
    """The cluster of the ``TF_CONFIG`` environment variable; None when it is unset or empty.

    Raises:
        ConfigError: ``TF_CONFIG`` is malformed (see :func:`parse_tf_config`).
    """
    text = os.environ.get("TF_CONFIG", "").strip()
    return parse_tf_config(text) if text else None


def tf_config_for(workers: str, index: int) -> str:
    """The ``TF_CONFIG`` document for ``--workers host:port,... --worker-index N``.

    Raises:
        ConfigError: an empty list, a malformed or repeated address, or an index out of range.
    """
    addresses = [a.strip() for a in workers.split(",") if a.strip()]
    if not addresses:
        raise ConfigError("--workers: expected host:port,host:port,...")
    for a in addresses:
        _check_address(a, "--workers")
    if len(set(addresses)) != len(addresses):
        raise ConfigError("--workers: an address is listed twice")
    if not 0 <= index < len(addresses):
        raise ConfigError(
            f"--worker-index: {index} is out of range for {len(addresses)} worker(s) "
            f"(0..{len(addresses) - 1})"
        )
    doc = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
    parse_tf_config(json.dumps(doc), source="--workers")
    return json.dumps(doc)
