"""Batch inference on a Ray cluster (``medseg predict --executor ray``).

The cases of :func:`medseg.inference.cases.collect_cases` are spread over a pool of Ray actors.
Each actor loads the model (export or run folder) once, into a
:class:`~medseg.inference.predictor.Predictor`, and then predicts case after case with the same
code as the local executor (:func:`medseg.inference.case.run_case`): the same per-case
folders and files, written into a hidden temporary folder and renamed into place when the case
succeeds. The driver collects the rows and writes ``predictions.csv`` / ``predictions.json`` with
:func:`~medseg.io.writers.write_tables`, in the order of the cases, so the output folder
is the same as the local executor's (up to floating-point noise of the model on different
hardware). The series of one DICOM folder go to one actor together.

Where it runs: a local Ray instance over this machine's CPUs by default (shut down at the end);
``address="auto"`` on a node of a running cluster, or ``"ray://head:10001"`` through Ray Client.
When Ray is already initialised in the process, that instance is used as it is. The pool has one
actor per GPU of the cluster (one GPU each), else one per CPU (one CPU each, with TensorFlow
limited to that many threads), or ``workers`` actors (without GPUs, at most one per CPU);
never more than there are units of work.

Requirements on a cluster:

* the output folder, the inputs and the model must be on storage that every worker sees under the
  same path (a shared filesystem: NFS, Lustre, a mounted bucket, ...). Workers read the inputs and
  write the case folders there directly; only the table rows come back through Ray. A worker that
  cannot see the output folder or the model fails at start-up with a message saying so. Relative
  paths are resolved against the driver's working directory, which must therefore exist on the
  workers too (or use absolute paths);
* medseg (same version) and its dependencies must be installed on every node.

Failures: a case whose row comes back with ``status`` ``error`` is retried once (on another actor
when there is one); if the retry fails too, its row (with the error naming the file) is the
result, exactly as the local executor reports it. An actor that dies (killed, out of memory, a
lost node) loses no case: the cases it held are retried on the other actors and a fresh actor
replaces it (at most as many replacements as the pool has actors); a case whose actor died twice
while holding it becomes an error row saying so. Nothing is dropped: every case has a row.
A full disk (:class:`~medseg.errors.OutputError` in an actor) stops the batch, as it does
locally. Given the batch record (:class:`~medseg.inference.batch.Batch`), the cases of an
interrupted batch that already have a row are not predicted again, and every final row is recorded
as it arrives, so rerunning the same command (with either executor) continues a batch.

Testing hook: ``MEDSEG_RAY_FAULTS="fail:<case-id>,crash:<case-id>"`` together with
``MEDSEG_RAY_FAULTS_DIR=<folder>`` (both read by the actors; the driver passes them on) makes
reading that case raise (``fail``) or kill the actor's process (``crash``), once per marker
folder (:mod:`medseg.inference.ray_worker`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import ConfigError, MedsegError
from medseg.inference.batch import Batch, PredictResult, progress_bar
from medseg.inference.ray_worker import FAULT_ENV, PredictWorker
from medseg.raytools import describe, import_ray, init_ray

if TYPE_CHECKING:
    from medseg.inference.case import Options
    from medseg.inference.cases import Case
    from medseg.inference.predictor import Predictor

logger = logging.getLogger(__name__)

#: Attempts of a case before its error row is final (the first try and one retry).
ATTEMPTS = 2
#: Units of work queued on one actor at a time (one running, one waiting: no idle gap).
IN_FLIGHT_PER_ACTOR = 2


@dataclass
class _Unit:
    """Cases (indices into the case list) that one actor predicts in one call."""

    cases: list[int]
    avoid: int | None = None  # the actor whose attempt failed: retry elsewhere when possible


def _units(cases: list[Case | None]) -> list[_Unit]:
    """One unit per case to predict (``None``: a case that has its row), except the series of
    one clean DICOM folder, which go together (the reader reads such a folder once for all its
    series)."""
    units: list[_Unit] = []
    folder_unit: dict[Path, _Unit] = {}
    for i, case in enumerate(cases):
        if case is None or case.kind == "error":
            continue
        if case.kind == "series" and case.folder_clean and case.folder is not None:
            if case.folder in folder_unit:
                folder_unit[case.folder].cases.append(i)
                continue
            folder_unit[case.folder] = unit = _Unit([i])
            units.append(unit)
        else:
            units.append(_Unit([i]))
    return units


def _error_row(case: Case, message: str) -> dict:
    """The row of a case that never got a row from an actor (the columns
    :func:`~medseg.inference.case.run_case` gives every row)."""
    row: dict = {"case_id": case.case_id, "source": case.source, "status": "error"}
    row["error"] = message
    if case.kind == "series":
        row.update(input_type="dicom_series", series_number=case.series_number)
    return row


def _start(ray, refs: list) -> list[dict]:
    """The answers of starting actors to ``refs`` (``info`` or ``prepare`` calls).

    Raises:
        MedsegError: the error an actor met while loading the model, or ConfigError when an
            actor could not start at all (medseg missing on a node, a runtime_env failure, ...).
    """
    try:
        states = ray.get(refs)
    except Exception as e:
        raise ConfigError(f"the Ray workers could not start: {describe(e)}") from None
    for state in states:
        if state["error"] is not None:
            raise state["error"]
    return states


def _pool_size(resources: dict, workers: int | None, cpus_per_worker: float, units: int):
    """Actors to start and the GPUs of each."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    fit = int(gpus) if gpus >= 1 else max(1, int(cpus // cpus_per_worker))
    if workers is None:
        workers = fit
    elif gpus < 1 and workers > fit:
        logger.warning(
            "--ray-workers %d: the cluster has %g CPUs for %g CPU per worker; using %d workers",
            workers,
            cpus,
            cpus_per_worker,
            fit,
        )
        workers = fit
    workers = max(1, min(workers, units))
    num_gpus = min(1.0, int(gpus / workers * 1e4) / 1e4) if gpus >= 1 else 0.0
    return workers, num_gpus


class _Pool:
    """The Ray actors of a batch, started ones and dead ones alike (an actor's index is its
    place in :attr:`actors`).

    Args:
        ray: the Ray module.
        args: the arguments of every :class:`~medseg.inference.ray_worker.PredictWorker`.
        cpus_per_worker: CPUs reserved by each actor.
    """

    def __init__(self, ray, args: tuple, cpus_per_worker: float):
        self.ray, self.args, self.cpus_per_worker = ray, args, cpus_per_worker
        self.actors: list = []
        self.actor_class = None

    def new_actor(self) -> int:
        """Start one more actor; its index."""
        self.actors.append(self.actor_class.remote(*self.args))
        return len(self.actors) - 1

    def start(self, units: int, workers: int | None, opts: Options) -> tuple[list[int], Options]:
        """Start the actors for ``units`` units of work (see :func:`_pool_size`); they load the
        model and prepare for ``opts``.

        Returns:
            The actors' indices and the options resolved for the model
            (:func:`~medseg.inference.case.resolve_options`).

        Raises:
            MedsegError: an actor could not start or load the model (see :func:`_start`).
        """
        from medseg.inference.case import resolve_options

        resources = self.ray.cluster_resources()
        n, num_gpus = _pool_size(resources, workers, self.cpus_per_worker, units)
        env = {
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
            "PYTHONUNBUFFERED": "1",
        }
        env.update({k: os.environ[k] for k in FAULT_ENV if k in os.environ})
        self.actor_class = self.ray.remote(PredictWorker).options(
            num_cpus=self.cpus_per_worker,
            num_gpus=num_gpus,
            max_restarts=0,
            runtime_env={"env_vars": env},
        )
        t0 = time.perf_counter()
        live = [self.new_actor() for _ in range(n)]
        info = _start(self.ray, [self.actors[live[0]].info.remote()])[0]
        opts = resolve_options(info["task"], info["card"], opts)
        _start(self.ray, [self.actors[a].prepare.remote(opts) for a in live])
        logger.info(
            "%d Ray workers loaded %s in %.1f s (%g CPU, %g GPU each; cluster: %g CPU, %g GPU)",
            len(live),
            self.args[0],
            time.perf_counter() - t0,
            self.cpus_per_worker,
            num_gpus,
            resources.get("CPU", 0),
            resources.get("GPU", 0),
        )
        return live, opts

    def kill_all(self) -> None:
        """Kill every actor (the dead ones too)."""
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)


def _model_dir(model: str | Path | Predictor) -> str:
    """The folder every actor loads the model from (absolute)."""
    from medseg.inference.predictor import Predictor

    if isinstance(model, Predictor):
        if getattr(model, "path", None) is None:
            raise ConfigError("--executor ray needs the model's folder, not a model object")
        model = model.path
    return str(Path(model).resolve())


def predict_on_ray(
    model: str | Path | Predictor,
    cases: list[Case],
    out: str | Path,
    opts: Options,
    *,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1,
    progress: bool = True,
    batch: Batch | None = None,
) -> PredictResult:
    """Predict ``cases`` on a pool of Ray actors into ``out`` (see the module docstring).

    Called by :func:`medseg.inference.predict.predict` with ``executor="ray"``, which has checked
    the options and the output folder and collected the cases.

    Args:
        model: export folder or run folder (a loaded :class:`Predictor` gives its folder): every
            actor loads it.
        cases: the cases, in the order of the rows.
        out: output folder (created); on a cluster, on storage every worker sees.
        opts: the options of :func:`~medseg.inference.predict.predict`, before the model
            dropped those that do not apply to it.
        address: Ray cluster address (``"auto"``, ``"ray://head:10001"``, ...); default: start
            a local Ray instance over this machine's CPUs, shut down at the end.
        workers: number of actors (default: one per GPU, else one per ``cpus_per_worker`` CPUs
            of the cluster; never more than the units of work).
        cpus_per_worker: CPUs reserved by each actor (and TensorFlow threads of each).
        progress: show a progress bar over the cases on stderr (only when it is a terminal).
        batch: the batch record of :func:`~medseg.inference.predict.predict` (started here, once
            Ray is there, and finished when the tables are written): the cases it has rows for
            (an interrupted batch) are not predicted again, and every final row is recorded in
            it, as the local executor does.

    Returns:
        The rows (every case, failed ones with ``status == "error"``), slices, model seconds
        (summed over the actors) and the wall time of the batch (actor start-up excluded, as the
        local executor excludes loading the model).

    Raises:
        ConfigError: Ray is not installed, a bad ``workers``, or a worker cannot see the output
            folder or the model.
        ModelError: the model cannot be loaded (on a worker).
        OutputError: a case could not be written (a full disk): the batch stops, as locally.
    """
    if workers is not None and workers < 1:
        raise ConfigError(f"--ray-workers must be >= 1, got {workers}")
    ray = import_ray()
    from medseg.io.writers import write_tables

    model_dir = _model_dir(model)
    out = Path(out)
    if batch is not None:
        batch.start()
    out.mkdir(parents=True, exist_ok=True)
    commit = batch.commit if batch is not None else (lambda row: row)
    rows = _known_rows(cases, batch, out, opts, commit)
    units = _units([c if r is None else None for c, r in zip(cases, rows, strict=True)])
    log_level = logging.getLogger("medseg").getEffectiveLevel()
    started = init_ray(ray, address, log_level <= logging.INFO) if units else False
    args = (model_dir, str(out.resolve()), os.getcwd(), log_level, max(1, int(cpus_per_worker)))
    pool = _Pool(ray, args, cpus_per_worker)
    try:
        live, opts = pool.start(len(units), workers, opts) if units else ([], opts)
        start = time.perf_counter()
        with progress_bar(len(cases), progress) as bar:
            bar.update(sum(r is not None for r in rows))

            def finish(i: int, row: dict) -> None:
                rows[i] = commit(row)
                bar.update(1)
                if row["status"] != "ok":
                    logger.error("%s", row["error"])

            driver = _Driver(ray, pool, live, opts, finish)
            driver.run(units, cases)
        _clean_up(out, driver.crashed)
        final = [r for r in rows if r is not None]
        assert len(final) == len(cases), "a case has no row"
        write_tables(out, final)
        wall = time.perf_counter() - start
        result = PredictResult(out, final, driver.slices, driver.seconds, wall)
    finally:
        pool.kill_all()
        if started:
            ray.shutdown()
    logger.info(
        "predicted %d cases (%d failed) on Ray, %d slices: %.1f slices/s end to end (read, "
        "predict, write), %.1f slices/s in the model (summed over workers) -> %s",
        len(result.rows),
        result.n_failed,
        result.n_slices,
        result.end_to_end_slices_per_second,
        result.slices_per_second,
        out,
    )
    if batch is not None:
        batch.finish()
    return result


def _known_rows(
    cases: list[Case], batch: Batch | None, out: Path, opts: Options, commit
) -> list[dict | None]:
    """The rows the driver has before any actor starts: those of the cases an interrupted batch
    finished, and those of the cases found unreadable when they were collected (as locally);
    None for the cases to predict."""
    from medseg.inference.case import Clock, run_case
    from medseg.inference.cases import CaseReader

    done = batch.done if batch is not None else {}
    rows: list[dict | None] = [done.get(case.case_id) for case in cases]
    for i, case in enumerate(cases):
        if rows[i] is None and case.kind == "error":
            rows[i] = commit(run_case(None, case, CaseReader(), out, opts, Clock()))
    return rows


class _Driver:
    """Hands the units to the actors until every case has its final row (see the module
    docstring for the retries)."""

    def __init__(self, ray, pool: _Pool, live: list[int], opts: Options, finish):
        self.ray, self.pool, self.opts, self.finish = ray, pool, opts, finish
        self.actors = pool.actors  # grows as replacements start
        self.queue: collections.deque[_Unit] = collections.deque()
        self.live = set(live)
        self.load = dict.fromkeys(live, 0)
        self.starting: dict = {}  # prepare() ref of a replacement actor -> its index
        self.inflight: dict = {}  # run() ref -> (actor index, unit)
        self.replacements = len(live)
        self.crashed: set[str] = set()  # ids of the cases that dead actors held
        self.slices, self.seconds = 0, 0.0

    def run(self, units: list[_Unit], cases: list[Case]) -> None:
        """Predict ``units``; stops early only for an error that stops the batch.

        Raises:
            MedsegError: an error that stops the batch (a full disk) raised in an actor.
        """
        self.cases, self.attempts = cases, [0] * len(cases)
        self.queue.extend(units)
        try:
            while self.queue or self.inflight:
                self._dispatch()
                if not self.inflight and not self.starting:
                    self._no_worker_left()
                    break
                ready, _ = self.ray.wait([*self.inflight, *self.starting], num_returns=1)
                if ready[0] in self.starting:
                    self._started(ready[0])
                else:
                    self._returned(ready[0])
        except BaseException:
            for ref in [*self.inflight, *self.starting]:
                with contextlib.suppress(Exception):
                    self.ray.cancel(ref, force=True)
            raise

    def _dispatch(self) -> None:
        for a in sorted(self.live, key=lambda a: self.load[a]):
            while self.queue and self.load[a] < IN_FLIGHT_PER_ACTOR:
                unit = next((u for u in self.queue if u.avoid != a or len(self.live) == 1), None)
                if unit is None:
                    break
                self.queue.remove(unit)
                ref = self.actors[a].run.remote([self.cases[i] for i in unit.cases])
                self.inflight[ref] = (a, unit)
                self.load[a] += 1

    def _no_worker_left(self) -> None:
        """Every actor died and none can replace them: the rest fail, none is dropped."""
        while self.queue:
            for i in self.queue.popleft().cases:
                case = self.cases[i]
                self.finish(i, _error_row(case, f"{case.source}: no Ray worker left to run it"))

    def _started(self, ref) -> None:
        b = self.starting.pop(ref)
        try:
            error = self.ray.get(ref)["error"]
        except Exception as e:
            error = e
        if error is None:
            self.live.add(b)
            self.load[b] = 0
            logger.info("replacement Ray worker %d is ready", b)
        else:
            logger.warning("a replacement Ray worker failed to start: %s", error)

    def _returned(self, ref) -> None:
        from ray.exceptions import RayTaskError

        a, unit = self.inflight.pop(ref)
        self.load[a] -= 1
        try:
            results = self.ray.get(ref)
        except RayTaskError as e:  # raised by the actor's code around run_case; it lives on
            cause = getattr(e, "cause", None)
            if isinstance(cause, MedsegError):
                raise cause from None  # stops the batch, as it does locally (a full disk)
            for i in unit.cases:
                self._retry(i, f"{self.cases[i].source}: {describe(e)}", a)
            return
        except Exception as e:  # the actor died (killed, out of memory, node lost, ...)
            self._actor_died(a, e)
            self.crashed.update(self.cases[i].case_id for i in unit.cases)
            for i in unit.cases:
                message = f"{self.cases[i].source}: the Ray worker died while predicting it"
                self._retry(i, message, a)
            return
        for i, (row, slices, seconds, dt) in zip(unit.cases, results, strict=True):
            self.attempts[i] += 1
            if row["status"] != "ok" and self.attempts[i] < ATTEMPTS:
                logger.warning("%s failed (%s); retrying", row["case_id"], row["error"])
                self.queue.append(_Unit([i], a))
                continue
            self.slices += slices
            self.seconds += seconds
            logger.info("%s: %s (%.2f s, worker %d)", row["case_id"], row["status"], dt, a)
            self.finish(i, row)

    def _retry(self, i: int, message: str, avoid: int) -> None:
        self.attempts[i] += 1
        if self.attempts[i] >= ATTEMPTS:
            self.finish(i, _error_row(self.cases[i], message))
        else:
            logger.warning("%s: %s; retrying", self.cases[i].case_id, message)
            self.queue.append(_Unit([i], avoid))

    def _actor_died(self, a: int, error: BaseException) -> None:
        if a not in self.live:
            return
        self.live.discard(a)
        logger.warning("Ray worker %d died (%s)", a, describe(error))
        with contextlib.suppress(Exception):
            self.ray.kill(self.actors[a], no_restart=True)
        if self.replacements > 0:
            self.replacements -= 1
            b = self.pool.new_actor()
            self.starting[self.actors[b].prepare.remote(self.opts)] = b


def _clean_up(out: Path, case_ids: set[str]) -> None:
    """Remove the temporary folders that dead actors left for ``case_ids``."""
    if not case_ids:
        return
    for path in out.iterdir():
        name = path.name
        if name.startswith(".") and ".tmp-" in name and name[1:].split(".tmp-")[0] in case_ids:
            shutil.rmtree(path, ignore_errors=True)
