"""Batch inference on a Ray cluster (``medseg predict --executor ray``).

The cases of :func:`medseg.inference.predict.collect_cases` are spread over a pool of Ray actors.
Each actor loads the model (export or run folder) once, into a
:class:`~medseg.inference.predict.Predictor`, and then predicts case after case with the same
code as the local executor (:func:`medseg.inference.predict._run_case`): the same per-case
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
locally. Given the batch record of :func:`~medseg.inference.predict.predict`, the cases of an
interrupted batch that already have a row are not predicted again, and every final row is recorded
as it arrives, so rerunning the same command (with either executor) continues a batch.

Testing hook: ``MEDSEG_RAY_FAULTS="fail:<case-id>,crash:<case-id>"`` together with
``MEDSEG_RAY_FAULTS_DIR=<folder>`` (both read by the actors; the driver passes them on) makes
reading that case raise (``fail``) or kill the actor's process (``crash``), once per marker
folder.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import ConfigError, MedsegError, ModelError
from medseg.raytools import describe, import_ray, init_ray, worker_logging

if TYPE_CHECKING:  # the actors import TensorFlow (via predict) only once its output is muted
    from medseg.inference.predict import Case, Predictor, PredictResult, _Batch, _Options

logger = logging.getLogger(__name__)

#: Attempts of a case before its error row is final (the first try and one retry).
ATTEMPTS = 2
#: Units of work queued on one actor at a time (one running, one waiting: no idle gap).
IN_FLIGHT_PER_ACTOR = 2
#: Environment variables of the testing hook, passed on to the actors when set.
FAULT_ENV = ("MEDSEG_RAY_FAULTS", "MEDSEG_RAY_FAULTS_DIR")


# --------------------------------------------------------------------------- the actor


def _fault(kind: str, case_id: str) -> bool:
    """Whether the testing hook asks for fault ``kind`` on ``case_id`` now (once per marker)."""
    spec, folder = os.environ.get(FAULT_ENV[0], ""), os.environ.get(FAULT_ENV[1], "")
    if not spec or not folder or f"{kind}:{case_id}" not in spec.split(","):
        return False
    try:
        fd = os.open(Path(folder) / f"{kind}-{case_id}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


class _FaultyReader:
    """A case reader with the testing hook in front of it (see the module docstring)."""

    def __init__(self, reader):
        self.reader = reader

    def read(self, case: Case):
        if _fault("crash", case.case_id):
            logger.warning("%s: MEDSEG_RAY_FAULTS: killing this worker", case.case_id)
            os._exit(1)
        if _fault("fail", case.case_id):
            raise RuntimeError("injected failure (MEDSEG_RAY_FAULTS)")
        return self.reader.read(case)


class _PredictWorker:
    """Body of a Ray actor: one loaded model that predicts cases into ``out``.

    Never raises from ``__init__``: a start-up error is kept and returned by :meth:`prepare`, so
    that the driver can report it as the medseg error it is.
    """

    def __init__(self, model: str, out: str, cwd: str, log_level: int, threads: int):
        self.host = socket.gethostname()
        self.error: MedsegError | None = None
        self.predictor: Predictor | None = None
        self.opts: _Options | None = None
        self.out = Path(out)
        self.reader = None
        worker_logging(log_level)
        # The driver reports the outcome of every case; the actors would say it twice.
        logging.getLogger("medseg.inference.predict").setLevel(logging.CRITICAL)
        try:
            if os.path.isdir(cwd):
                os.chdir(cwd)  # relative paths mean the driver's working directory
            for what, path in (("output folder", out), ("model", model)):
                if not Path(path).exists():
                    raise ConfigError(
                        f"{path}: the {what} is not visible on Ray worker {self.host}; it must "
                        "be on storage that every Ray worker sees under the same path"
                    )
            self._tensorflow(log_level, threads)
            from medseg.inference.predict import Predictor, _Reader

            self.reader = _Reader()
            if os.environ.get(FAULT_ENV[0]):
                self.reader = _FaultyReader(self.reader)
            self.predictor = Predictor(model)
        except MedsegError as e:
            self.error = e
        except Exception as e:
            self.error = ModelError(
                f"{model}: cannot load the model on Ray worker {self.host} "
                f"({type(e).__name__}: {e})"
            )

    @staticmethod
    def _tensorflow(log_level: int, threads: int) -> None:
        """Import TensorFlow (its C++ start-up lines muted, unless debugging), limit it to
        ``threads`` threads and let it grow into the GPU memory."""
        if log_level > logging.DEBUG:
            from medseg.utils import import_tensorflow_quietly

            import_tensorflow_quietly()
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as e:  # TensorFlow already initialised: keep its settings
            logger.debug("TensorFlow settings of the Ray worker unchanged: %s", e)

    def info(self) -> dict:
        """The model's task and card (the driver resolves the options with them)."""
        if self.error is not None or self.predictor is None:
            return {"error": self.error, "host": self.host}
        return {
            "error": None,
            "host": self.host,
            "task": self.predictor.task,
            "card": self.predictor.card,
        }

    def prepare(self, opts: _Options) -> dict:
        """Take the resolved options and build what they need; returns the start-up error."""
        if self.error is None and self.predictor is not None:
            from medseg.inference.predict import _prepare_model

            try:
                _prepare_model(self.predictor, opts)
                self.opts = opts
            except MedsegError as e:
                self.error = e
        return {"error": self.error, "host": self.host, "pid": os.getpid()}

    def run(self, cases: list[Case]) -> list[tuple[dict, int, float, float]]:
        """Predict ``cases``; per case: the row, slices, model seconds, case seconds."""
        if self.predictor is None or self.opts is None:
            raise ModelError(f"Ray worker {self.host} has no model ({self.error})")
        from medseg.inference.predict import _Clock, _run_case

        results = []
        for case in cases:
            clock, t0 = _Clock(), time.perf_counter()
            row = _run_case(self.predictor, case, self.reader, self.out, self.opts, clock)
            results.append((row, clock.slices, clock.seconds, time.perf_counter() - t0))
        return results


# --------------------------------------------------------------------------- the driver


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
    """The row of a case that never got a row from an actor (the columns :func:`_run_case`
    gives every row)."""
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


def predict_on_ray(
    model: str | Path | Predictor,
    cases: list[Case],
    out: str | Path,
    opts: _Options,
    *,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1,
    progress: bool = True,
    batch: _Batch | None = None,
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
        batch: the batch record of :func:`~medseg.inference.predict.predict` (started here,
            once Ray is there): the cases it has rows for (an interrupted batch) are not
            predicted again, and every final row is recorded in it, as the local executor does.

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
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from medseg.inference.predict import (
        Predictor,
        PredictResult,
        _Clock,
        _Reader,
        _resolve_options,
        _run_case,
    )
    from medseg.io.writers import write_tables

    if isinstance(model, Predictor):
        if getattr(model, "path", None) is None:
            raise ConfigError("--executor ray needs the model's folder, not a model object")
        model = model.path
    model_dir = str(Path(model).resolve())
    out = Path(out)
    if batch is not None:
        batch.start()
    out.mkdir(parents=True, exist_ok=True)
    out_dir = str(out.resolve())
    log_level = logging.getLogger("medseg").getEffectiveLevel()
    verbose = log_level <= logging.INFO
    done = batch.done if batch is not None else {}
    commit = batch.commit if batch is not None else (lambda row: row)
    rows: list[dict | None] = [done.get(case.case_id) for case in cases]
    for i, case in enumerate(cases):
        if rows[i] is None and case.kind == "error":  # unreadable at discovery: as locally
            rows[i] = commit(_run_case(None, case, _Reader(), out, opts, _Clock()))  # type: ignore[arg-type]
    units = _units([c if r is None else None for c, r in zip(cases, rows, strict=True)])

    started = init_ray(ray, address, verbose) if units else False
    actors: list = []
    try:
        resources = ray.cluster_resources() if units else {}
        n, num_gpus = (
            _pool_size(resources, workers, cpus_per_worker, len(units)) if units else (0, 0)
        )
        env = {
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
            "PYTHONUNBUFFERED": "1",
        }
        env.update({k: os.environ[k] for k in FAULT_ENV if k in os.environ})
        actor_class = ray.remote(_PredictWorker).options(
            num_cpus=cpus_per_worker,
            num_gpus=num_gpus,
            max_restarts=0,
            runtime_env={"env_vars": env},
        )
        args = (model_dir, out_dir, os.getcwd(), log_level, max(1, int(cpus_per_worker)))

        def new_actor():
            actors.append(actor_class.remote(*args))
            return len(actors) - 1

        t0 = time.perf_counter()
        pool = [new_actor() for _ in range(n)] if units else []
        if pool:
            info = _start(ray, [actors[pool[0]].info.remote()])[0]
            opts = _resolve_options(info["task"], info["card"], opts)
            _start(ray, [actors[a].prepare.remote(opts) for a in pool])
            logger.info(
                "%d Ray workers loaded %s in %.1f s (%g CPU, %g GPU each; cluster: %g CPU, %g GPU)",
                len(pool),
                model_dir,
                time.perf_counter() - t0,
                cpus_per_worker,
                num_gpus,
                resources.get("CPU", 0),
                resources.get("GPU", 0),
            )
        start = time.perf_counter()
        show = progress and sys.stderr.isatty()
        bar = tqdm(total=len(cases), desc="predict", unit="case", file=sys.stderr, disable=not show)
        redirect = logging_redirect_tqdm() if show else contextlib.nullcontext()
        with redirect, bar:
            bar.update(sum(r is not None for r in rows))

            def finish(i: int, row: dict) -> None:
                rows[i] = commit(row)
                bar.update(1)
                if row["status"] != "ok":
                    logger.error("%s", row["error"])

            driver = _Driver(ray, actors, pool, opts, new_actor, finish)
            driver.run(units, cases)
        _clean_up(out, driver.crashed)
        final = [r for r in rows if r is not None]
        assert len(final) == len(cases), "a case has no row"
        write_tables(out, final)
        wall = time.perf_counter() - start
        result = PredictResult(out, final, driver.slices, driver.seconds, wall)
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
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
    return result


class _Driver:
    """Hands the units to the actors until every case has its final row (see the module
    docstring for the retries)."""

    def __init__(self, ray, actors: list, pool: list[int], opts: _Options, new_actor, finish):
        self.ray, self.actors, self.opts = ray, actors, opts
        self.new_actor, self.finish = new_actor, finish
        self.queue: collections.deque[_Unit] = collections.deque()
        self.live = set(pool)
        self.load = dict.fromkeys(pool, 0)
        self.starting: dict = {}  # prepare() ref of a replacement actor -> its index
        self.inflight: dict = {}  # run() ref -> (actor index, unit)
        self.replacements = len(pool)
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
        except RayTaskError as e:  # raised by the actor's code around _run_case; it lives on
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
            b = self.new_actor()
            self.starting[self.actors[b].prepare.remote(self.opts)] = b


def _clean_up(out: Path, case_ids: set[str]) -> None:
    """Remove the temporary folders that dead actors left for ``case_ids``."""
    if not case_ids:
        return
    for path in out.iterdir():
        name = path.name
        if name.startswith(".") and ".tmp-" in name and name[1:].split(".tmp-")[0] in case_ids:
            shutil.rmtree(path, ignore_errors=True)
