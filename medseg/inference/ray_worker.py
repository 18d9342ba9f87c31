"""The Ray actor of ``medseg predict --executor ray``: one loaded model that predicts cases.

The driver (:mod:`medseg.inference.ray_predict`) starts a pool of :class:`PredictWorker` actors.
Each loads the model once, into a :class:`~medseg.inference.predictor.Predictor`, and predicts
the cases it is handed with :func:`medseg.inference.case.run_case`, as the local executor does.
TensorFlow is imported only once its start-up output is muted, so this module imports it (and the
modules that do) lazily.

Testing hook: ``MEDSEG_RAY_FAULTS="fail:<case-id>,crash:<case-id>"`` together with
``MEDSEG_RAY_FAULTS_DIR=<folder>`` (:data:`FAULT_ENV`; the driver passes them on) makes reading
that case raise (``fail``) or kill the actor's process (``crash``), once per marker folder.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import ConfigError, MedsegError, ModelError
from medseg.raytools import worker_logging

if TYPE_CHECKING:
    from medseg.inference.case import Options
    from medseg.inference.cases import Case
    from medseg.inference.predictor import Predictor

logger = logging.getLogger(__name__)

#: Environment variables of the testing hook, passed on to the actors when set.
FAULT_ENV = ("MEDSEG_RAY_FAULTS", "MEDSEG_RAY_FAULTS_DIR")


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


class PredictWorker:
    """Body of a Ray actor: one loaded model that predicts cases into ``out``.

    Never raises from ``__init__``: a start-up error is kept and returned by :meth:`prepare`, so
    that the driver can report it as the medseg error it is.
    """

    def __init__(self, model: str, out: str, cwd: str, log_level: int, threads: int):
        self.host = socket.gethostname()
        self.error: MedsegError | None = None
        self.predictor: Predictor | None = None
        self.opts: Options | None = None
        self.out = Path(out)
        self.reader = None
        worker_logging(log_level)
        # The driver reports the outcome of every case; the actors would say it twice.
        logging.getLogger("medseg.inference.case").setLevel(logging.CRITICAL)
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
            from medseg.inference.cases import CaseReader
            from medseg.inference.predictor import Predictor

            self.reader = CaseReader()
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

    def prepare(self, opts: Options) -> dict:
        """Take the resolved options and build what they need; returns the start-up error."""
        if self.error is None and self.predictor is not None:
            from medseg.inference.case import prepare_model

            try:
                prepare_model(self.predictor, opts)
                self.opts = opts
            except MedsegError as e:
                self.error = e
        return {"error": self.error, "host": self.host, "pid": os.getpid()}

    def run(self, cases: list[Case]) -> list[tuple[dict, int, float, float]]:
        """Predict ``cases``; per case: the row, slices, model seconds, case seconds."""
        if self.predictor is None or self.opts is None:
            raise ModelError(f"Ray worker {self.host} has no model ({self.error})")
        from medseg.inference.case import Clock, run_case

        results = []
        for case in cases:
            clock, t0 = Clock(), time.perf_counter()
            row = run_case(self.predictor, case, self.reader, self.out, self.opts, clock)
            results.append((row, clock.slices, clock.seconds, time.perf_counter() - t0))
        return results
