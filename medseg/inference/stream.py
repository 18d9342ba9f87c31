"""The streaming engine of the local executor of ``medseg predict``: reading, the model and
writing overlap, and 2D images from many files share model calls.

Three kinds of work run at once (stdlib :mod:`concurrent.futures` thread pools):

* **readers** (:data:`READERS` threads) read and decode the next cases and cut them as the model
  takes them (:func:`medseg.inference.case.prepare_case`), in case order;
* **the model** runs in the calling thread, ``batch_size`` slices per call: the slices of
  consecutive cases of one shape are put together, so a folder of 2D images is predicted
  ``batch_size`` images a call instead of one (a volume's slices go in the same calls, and a
  call may hold the end of one case and the start of the next); a shape change, or nothing more
  to wait for, sends a shorter call;
* **one writer** thread post-processes and writes each case whose slices have all been
  predicted (:func:`medseg.inference.case.finish_case`: its hidden temporary folder renamed into
  place when all its files are written) and then records it in the batch
  (:meth:`medseg.inference.batch.Batch.commit`). Cases are committed by this one thread, each
  right after its folder was renamed, so a ``kill -9`` leaves at most one case folder without
  its record (predicted again by the same command) and never a record without its folder.

Memory is bounded by the **queue depth**: at most ``queue_depth`` cases (default
``2 * batch_size``) are in flight (read ahead, waiting for or in the model, being written),
whatever the number of files; of them at most :data:`VOLUMES_IN_FLIGHT` volumes.

Failures stay per case, as in the one-case-at-a-time path: a case that cannot be read, or whose
post-processing or writing fails, gets an ``error`` row; when a model call that holds several
cases fails, each of them is predicted again on its own, so only the case that fails the model
gets the error. A full disk or an output that became read-only stops the batch with the
:class:`~medseg.errors.OutputError` of the writer. The rows come back in case order, so the
tables are those of the one-case-at-a-time path (:func:`medseg.inference.case.run_case`), and
the masks are the same bytes: each slice goes through the same model, post-processing and
writers.

MC-dropout (``mc_samples``) and Grad-CAM (``explain``) cases are not streamed: their extra model
passes are per case anyway (the local executor runs them one at a time, see
:func:`medseg.inference.predict.predict`). A 2.5D model is streamed: a 2D image's neighbours are
read by the reader with the image.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.inference.batch import Batch
from medseg.inference.case import (
    Clock,
    Options,
    PreparedCase,
    call_model,
    case_errors,
    finish_case,
    output_part,
    prepare_case,
)
from medseg.inference.cases import Case, CaseReader
from medseg.inference.predictor import BasePredictor
from medseg.io import image_suffix

logger = logging.getLogger(__name__)

#: Reader threads: decoding (PIL, zlib, pydicom's pixel handlers) releases the GIL in part.
READERS = 2
#: Volumes (NIfTI files, DICOM series, multi-frame files) in flight at once. One keeps the peak
#: memory of a folder of volumes that of one case at a time (tests/training/test_crash_safety.py:
#: two volumes at once, one read while the other is written, peak at ~7 volumes' worth of
#: arrays against ~5); 2D images still stream around a volume.
VOLUMES_IN_FLIGHT = 1
_VOLUME_SUFFIXES = (".nii", ".nii.gz")


def default_queue_depth(batch_size: int) -> int:
    """The default queue depth in cases: two model calls' worth of 2D images."""
    return max(2, 2 * batch_size)


@dataclass
class _Slot:
    """A read case on its way through the model."""

    index: int
    prepared: PreparedCase
    volume: bool  # counted against VOLUMES_IN_FLIGHT
    sent: int = 0  # slices already sent to the model
    parts: list[np.ndarray] = field(default_factory=list)

    @property
    def shape(self) -> tuple:
        assert self.prepared.images is not None
        return self.prepared.images.shape[1:]

    @property
    def remaining(self) -> int:
        assert self.prepared.images is not None
        return len(self.prepared.images) - self.sent


def _volume_like(case: Case) -> bool:
    """Whether a case is a volume before it is read (a series, a NIfTI file)."""
    return case.kind == "series" or (
        case.kind == "file" and image_suffix(case.paths[0]) in _VOLUME_SUFFIXES
    )


class _Stream:
    """The state of one streamed batch (see the module docstring)."""

    def __init__(self, predictor, cases, out, opts, batch, clock, depth, bar):
        self.predictor, self.cases, self.out, self.opts = predictor, cases, out, opts
        self.batch, self.clock, self.depth, self.bar = batch, clock, depth, bar
        self.rows: list[dict | None] = [batch.done.get(c.case_id) for c in cases]
        self.todo = deque(i for i, r in enumerate(self.rows) if r is None)
        self.reads: deque[tuple[int, bool, Future]] = deque()
        self.waiting: deque[_Slot] = deque()
        self.writes: dict[Future, tuple[int, bool]] = {}
        self.in_flight = self.volumes = 0
        self.reader = CaseReader()
        bar.update(len(cases) - len(self.todo))

    def run(self, readers: ThreadPoolExecutor, writer: ThreadPoolExecutor) -> list[dict]:
        self.readers, self.writer = readers, writer
        while self.todo or self.reads or self.waiting or self.writes:
            self._collect(block=False)
            self._admit()
            segments = self._segments()
            if self._full(segments):
                self._model_call(segments)
            elif self.reads:
                self._take_read()  # waits for the next case in order
            elif self.todo and self.writes:
                self._collect(block=True)  # a case written frees room for the next read
            elif segments:
                self._model_call(segments)  # nothing more to wait for: a shorter call
            else:
                self._collect(block=True)
        return [r for r in self.rows if r is not None]

    def _admit(self) -> None:
        """Start reading the next cases while the queue depth allows."""
        while self.todo and self.in_flight < self.depth:
            case = self.cases[self.todo[0]]
            volume = _volume_like(case)
            if volume and self.volumes >= VOLUMES_IN_FLIGHT:
                return
            index = self.todo.popleft()
            self.in_flight += 1
            self.volumes += volume
            future = self.readers.submit(
                prepare_case, self.predictor, case, self.reader, self.out, self.opts, self.clock
            )
            self.reads.append((index, volume, future))

    def _take_read(self) -> None:
        index, volume, future = self.reads.popleft()
        prepared = future.result()  # an OutputError stops the batch
        if prepared.is_volume and not volume:  # a multi-frame file, a multi-page TIFF
            volume = True
            self.volumes += 1
        slot = _Slot(index, prepared, volume)
        if prepared.failed or slot.remaining == 0:
            self._write(slot)
        else:
            self.waiting.append(slot)

    def _segments(self) -> list[tuple[_Slot, int, int]]:
        """The next model call: up to ``batch_size`` slices of the waiting cases of the first
        one's shape, in order (none when no case waits)."""
        if not self.waiting:
            return []
        step = self.opts.batch_size
        segments, n = [], 0
        shape = self.waiting[0].shape
        for slot in self.waiting:
            if slot.shape != shape or n == step:
                break
            take = min(step - n, slot.remaining)
            segments.append((slot, slot.sent, slot.sent + take))
            n += take
        return segments

    def _full(self, segments: list[tuple[_Slot, int, int]]) -> bool:
        """Whether ``segments`` fill a model call (or a shape change ends one)."""
        if not segments:
            return False
        n = sum(b - a for _, a, b in segments)
        return n == self.opts.batch_size or len(segments) < len(self.waiting)

    def _model_call(self, segments: list[tuple[_Slot, int, int]]) -> None:
        if len(segments) == 1:
            self._call_alone(*segments[0])
            return
        images = np.concatenate([s.prepared.images[a:b] for s, a, b in segments])
        try:
            out = self._predict(images)
        except Exception:  # each case again on its own: only the failing case fails
            logger.debug(
                "a model call of %d cases failed; predicting them one by one", len(segments)
            )
            for segment in segments:
                self._call_alone(*segment)
            return
        offset = 0
        for slot, a, b in segments:
            part = {k: v[offset : offset + b - a] for k, v in out.items()}
            self._take(slot, b, part)
            offset += b - a

    def _call_alone(self, slot: _Slot, a: int, b: int) -> None:
        prepared = slot.prepared
        assert prepared.images is not None
        with case_errors(prepared.case, self.out, prepared.row):
            self._take(slot, b, self._predict(prepared.images[a:b]))
        if prepared.row["status"] != "ok":  # failed in the model: written as an error row
            self.waiting.remove(slot)
            self._write(slot)

    def _predict(self, images: np.ndarray) -> dict:
        return call_model(self.predictor, images, self.clock)

    def _take(self, slot: _Slot, end: int, out: dict) -> None:
        """Keep a case's share of a model output; write the case when it is complete."""
        slot.parts.append(output_part(self.predictor, self.opts, out))
        slot.sent = end
        if slot.remaining == 0:
            self.waiting.remove(slot)
            self._write(slot)

    def _write(self, slot: _Slot) -> None:
        """Hand a case to the writer (the model is done with it: its input is dropped)."""
        slot.prepared.release_inputs()
        future = self.writer.submit(_write_case, slot.prepared, self.out, slot.parts, self.batch)
        self.writes[future] = (slot.index, slot.volume)

    def _collect(self, block: bool) -> None:
        """Take the rows of the cases written and committed so far."""
        if not self.writes:
            return
        if block:
            wait(list(self.writes), return_when=FIRST_COMPLETED)
        for future in [f for f in self.writes if f.done()]:
            index, volume = self.writes.pop(future)
            self.rows[index] = future.result()  # an OutputError stops the batch
            self.in_flight -= 1
            self.volumes -= volume
            self.bar.update(1)


def _write_case(prepared: PreparedCase, out: Path, parts: list, batch: Batch) -> dict:
    """The writer's work on one case: its folder (:func:`finish_case`), then its record."""
    return batch.commit(finish_case(prepared, out, parts))


def stream_cases(
    predictor: BasePredictor,
    cases: list[Case],
    out: Path,
    opts: Options,
    batch: Batch,
    clock: Clock,
    bar,
    queue_depth: int | None = None,
) -> list[dict]:
    """Predict ``cases`` with reading, the model and writing overlapped; their rows in case order.

    Cases that ``batch`` holds as done are not predicted again (their recorded rows are
    returned); every other case is committed to ``batch`` when its folder is in place.

    Args:
        predictor: the model.
        cases: the cases, in the order of the tables.
        out: the output folder of the batch.
        opts: the options, as :func:`medseg.inference.case.resolve_options` left them (no
            ``mc_samples``, no ``explain``).
        batch: the batch record (started).
        clock: counts the slices and the seconds in the model.
        bar: a progress bar (``update(n)``), advanced as cases finish.
        queue_depth: the most cases in flight at once (default
            :func:`default_queue_depth`).

    Returns:
        One row per case, in the order of ``cases``.

    Raises:
        OutputError: the output disk is full, or the output became read-only (the cases
            committed before it stay done; the same call continues the batch).
    """
    depth = queue_depth or default_queue_depth(opts.batch_size)
    state = _Stream(predictor, cases, out, opts, batch, clock, depth, bar)
    readers = ThreadPoolExecutor(READERS, thread_name_prefix="medseg-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="medseg-write")
    try:
        return state.run(readers, writer)
    finally:  # on an error or an interrupt: the case being written finishes, no more start
        readers.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
