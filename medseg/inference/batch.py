"""The bookkeeping of a batch prediction, the same for every executor: what the batch is, which
cases have finished (so an interrupted batch is continued by the same call), and its result.

A batch that is interrupted (``kill -9``, a full disk) is continued by the same call: finished
cases are recorded in ``<out>/.medseg-predict/`` (:data:`BATCH_STATE`, see :class:`Batch`) and
not predicted again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import DataError, RunExistsError
from medseg.locks import LOCK_NAME
from medseg.utils import atomic_write_json, output_error, read_json, remove_stale_temps

logger = logging.getLogger(__name__)

#: Hidden folder in the output folder of a batch that has not finished (see :class:`Batch`).
BATCH_STATE = ".medseg-predict"


@dataclass
class PredictResult:
    """Summary of a batch: the output folder, the rows of ``predictions.csv`` and the speed.

    Attributes:
        out_dir: the output folder.
        rows: one dict per case (``status`` ``ok`` or ``error``).
        n_slices: images and volume slices that went through the model.
        model_seconds: time spent in model calls (reading and writing not included).
        wall_seconds: the whole batch, end to end (read + preprocess + predict + write).
    """

    out_dir: Path
    rows: list[dict]
    n_slices: int = 0
    model_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return sum(r["status"] != "ok" for r in self.rows)

    @property
    def slices_per_second(self) -> float:
        """Model throughput over the batch (0 when nothing was predicted)."""
        return self.n_slices / self.model_seconds if self.model_seconds > 0 else 0.0

    @property
    def end_to_end_slices_per_second(self) -> float:
        """Slices/s of the whole batch: reading, preprocessing, the model and writing."""
        return self.n_slices / self.wall_seconds if self.wall_seconds > 0 else 0.0


def batch_signature(model, inputs: list[str | Path], opts: dict) -> str:
    """What a batch predicts: the model, the inputs and the options that change the outputs.

    Args:
        model: the model folder, or a loaded model (its ``path`` counts, else its type).
        inputs: the files and folders of the batch.
        opts: the options that change the outputs (JSON-serialisable values).
    """
    if isinstance(model, (str, Path)):
        model_id = str(Path(model).resolve())
    else:
        model_id = str(getattr(model, "path", None) or type(model).__name__)
    body = {"model": model_id, "inputs": [str(Path(i).resolve()) for i in inputs], **opts}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _read_record(path: Path) -> dict | None:
    """A record of the batch folder; None when it is missing or unreadable (a record that a
    failing disk corrupted is not trusted: its case is predicted again)."""
    try:
        return read_json(path, missing_ok=True)
    except DataError:
        return None


class Batch:
    """The progress of a batch, kept in ``<out>/.medseg-predict/`` until it has finished.

    ``state.json`` records what is predicted (:func:`batch_signature`) and ``rows/<case>.json``
    each finished case's row, written after the case's folder was renamed into place. A batch
    killed part way (``kill -9``, a full disk, a power cut) is continued by the same command: the
    cases with a row are not predicted again, the temporary files of the killed process are
    removed, and ``predictions.csv`` lists every case once. The folder is removed when the tables
    are written; an output folder without it is a finished batch, which only ``overwrite``
    writes into again.

    Attributes:
        out: the output folder.
        done: the rows of the cases that finished before an interruption, by case id.
        resuming: whether this call continues an interrupted batch.
    """

    def __init__(self, out: Path, signature: str):
        self.out, self.signature = out, signature
        self.dir = out / BATCH_STATE
        self.done: dict[str, dict] = {}
        self.resuming = False

    @classmethod
    def open(cls, out: Path, signature: str, overwrite: bool) -> Batch:
        """Check the output folder before anything is written there.

        Raises:
            RunExistsError: ``out`` holds other files (a finished batch, or an unfinished batch
                of other inputs, model or options) and ``overwrite`` is false.
        """
        batch = cls(out, signature)
        state = _read_record(batch.dir / "state.json")
        if state is not None and not overwrite:
            if state.get("signature") != signature:
                raise RunExistsError(
                    f"{out}: holds an unfinished prediction of other inputs, model or options; "
                    "rerun that command to finish it, or pass --overwrite"
                )
            batch.resuming = True
            batch.done = batch._rows()
            return batch
        ours = (BATCH_STATE, LOCK_NAME)  # the lock of this very process (medseg.locks)
        others = out.is_dir() and any(p.name not in ours for p in out.iterdir())
        if others and not overwrite:
            raise RunExistsError(
                f"{out}: output folder is not empty; pass --overwrite to write there"
            )
        return batch

    def _rows(self) -> dict[str, dict]:
        rows = {}
        for path in sorted((self.dir / "rows").glob("*.json")):
            row = _read_record(path)
            if row is None or "case_id" not in row:
                continue
            missing = [
                k for k in ("mask", "seg") if row.get(k) and not (self.out / row[k]).is_file()
            ]
            if not missing:
                rows[row["case_id"]] = row
        return rows

    def start(self) -> None:
        """Create the output folder and record the batch (or, resuming, clean up after the
        killed process)."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise (output_error(self.out, e) or e) from e
        if self.resuming:
            remove_stale_temps(self.out, recursive=False)
            remove_stale_temps(self.dir)
            logger.info(
                "%s: continuing an interrupted prediction; %d cases already done",
                self.out,
                len(self.done),
            )
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        atomic_write_json(self.dir / "state.json", {"signature": self.signature})

    def commit(self, row: dict) -> dict:
        """Record a finished case's row; returns it."""
        atomic_write_json(self.dir / "rows" / f"{row['case_id']}.json", row)
        return row

    def finish(self) -> None:
        """The tables are written: the batch is finished."""
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator:
    """A progress bar over ``total`` cases on stderr (shown only when ``enabled`` and stderr is a
    terminal), with the log records printed above it while it runs."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    show = enabled and sys.stderr.isatty()
    bar = tqdm(total=total, desc="predict", unit="case", file=sys.stderr, disable=not show)
    redirect = logging_redirect_tqdm() if show else contextlib.nullcontext()
    with redirect, bar:
        yield bar
