"""Keras callbacks whose files survive a kill: written under a temporary name, then renamed.

Keras' ``ModelCheckpoint``, ``BackupAndRestore`` and ``CSVLogger`` write their files in place, so a
process killed mid-write leaves a truncated ``.keras``, ``.weights.h5`` or half a CSV row that the
next run cannot use. These versions write to a temporary name and rename it into place; the
checkpoints are committed with their SHA-256 (:func:`medseg.models.loading.commit_checkpoint`) and
the backup is checked against it before a resumed run loads it. A full disk while saving becomes an
:class:`~medseg.errors.OutputError` naming the checkpoint, with the temporary file removed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from pathlib import Path

import keras
import numpy as np

from medseg.artifacts.runs import RunDir
from medseg.config import Config
from medseg.errors import OutputError
from medseg.models.loading import commit_checkpoint, verify_checkpoint
from medseg.utils import atomic_write_text, disk_full_error, is_disk_full


def _temp_sibling(path: str) -> str:
    """A temporary name beside ``path`` that keeps its (possibly double) suffix."""
    head, name = os.path.split(path)
    stem, dot, suffix = name.partition(".")
    return os.path.join(head, f".{stem}.tmp-{os.getpid()}{dot}{suffix}")


def _discard(tmp: str, final: str, error: BaseException) -> None:
    """Remove a half-written temporary file; turn a full disk into an ``OutputError``."""
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    if is_disk_full(error) and not isinstance(error, OutputError):
        raise disk_full_error(final) from error


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` that writes to a temporary file and renames it into place.

    With ``save_best_only``, an epoch whose logs lack ``monitor`` (not validated, with
    ``fit(validation_freq=...)``) is skipped without Keras's warning.
    """

    _sha256: str | None = None  # of the file this callback committed last

    def on_epoch_end(self, epoch, logs=None):
        if self.save_best_only and self.monitor not in (logs or {}):
            return
        super().on_epoch_end(epoch, logs)

    def _save_model(self, epoch, batch, logs):
        final = self.filepath
        tmp = _temp_sibling(final)
        self.filepath = tmp
        try:
            super()._save_model(epoch, batch, logs)
        except Exception as e:
            _discard(tmp, final, e)
            raise
        finally:
            self.filepath = final
        if os.path.exists(tmp):
            self._sha256 = commit_checkpoint(tmp, final, previous=self._sha256)


class ValidatedEarlyStopping(keras.callbacks.EarlyStopping):
    """``EarlyStopping`` that counts only the epochs whose logs hold ``monitor``.

    With ``fit(validation_freq=N)`` the other epochs are not validated: they neither use up
    the patience nor warn that the metric is missing.
    """

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor in (logs or {}):
            super().on_epoch_end(epoch, logs)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` whose weights and metadata files are replaced atomically.

    The weights are renamed into place before the metadata: a kill between the two leaves the
    newer weights with the older epoch count, so at most one epoch is repeated. A resumed run
    checks the weights against their recorded SHA-256 before loading them
    (:class:`~medseg.errors.ModelError` naming the file when they differ).

    The backup is kept when ``fit`` ends (``delete_checkpoint`` is false by default; the run
    deletes it once it is done), so that a process killed after training but before the final
    evaluation resumes with zero epochs left instead of training again. A ``fit`` stopped early
    (early stopping) with a finite loss is recorded as complete for the same reason.
    """

    _sha256: str | None = None

    def __init__(self, backup_dir, **kwargs):
        kwargs.setdefault("delete_checkpoint", False)
        super().__init__(backup_dir, **kwargs)
        self._last_loss: float | None = None

    def on_train_begin(self, logs=None):
        if os.path.exists(self._weights_path):
            verify_checkpoint(self._weights_path)
        super().on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        self._last_loss = None if loss is None else float(loss)
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        epochs = (self.params or {}).get("epochs")
        stopped = getattr(self.model, "stop_training", False)
        finite = self._last_loss is not None and np.isfinite(self._last_loss)
        if stopped and finite and epochs and self._current_epoch < epochs:
            # early stopping: nothing is left to train when this run is resumed
            atomic_write_text(
                self._training_metadata_path, json.dumps({"epoch": int(epochs), "batch": 0})
            )
        super().on_train_end(logs)

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        tmp = _temp_sibling(self._weights_path)
        try:
            self.model.save_weights(filepath=tmp, overwrite=True)
        except Exception as e:
            _discard(tmp, self._weights_path, e)
            raise
        self._sha256 = commit_checkpoint(tmp, self._weights_path, previous=self._sha256)
        atomic_write_text(
            self._training_metadata_path,
            json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen}),
        )


class AtomicCSVLogger(keras.callbacks.Callback):
    """``history.csv`` with one row per epoch, rewritten atomically after every epoch.

    Same columns as ``keras.callbacks.CSVLogger`` (``epoch``, then the logged values in sorted
    order). With ``append`` (a resumed run) the rows already in the file are kept, and a row of
    an epoch that runs again replaces the old one, so the file never holds an epoch twice nor a
    half-written row.

    Args:
        filename: the CSV file.
        append: keep the rows of an earlier (interrupted) run of the same training.
    """

    def __init__(self, filename: str | Path, append: bool = False):
        super().__init__()
        self.filename = Path(filename)
        self.append = append
        self._rows: dict[int, dict] = {}

    def on_train_begin(self, logs=None):
        self._rows = {}
        if self.append and self.filename.is_file():
            with open(self.filename, newline="") as f:
                for row in csv.DictReader(f):
                    with contextlib.suppress(KeyError, TypeError, ValueError):
                        self._rows[int(row["epoch"])] = row

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch, **{k: _csv_value(v) for k, v in sorted((logs or {}).items())}}
        # Rows after this epoch belong to a run that was interrupted and is being redone.
        self._rows = {e: r for e, r in self._rows.items() if e < epoch}
        self._rows[epoch] = row
        fields = ["epoch"] + sorted({k for r in self._rows.values() for k in r} - {"epoch"})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(self._rows[e] for e in sorted(self._rows))
        atomic_write_text(self.filename, buf.getvalue())


def _csv_value(value):
    if isinstance(value, str):
        return value
    array = np.asarray(value)
    if array.ndim == 0:
        return array.item()
    return json.dumps(array.tolist())


def _history_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _best_so_far(path: Path, monitor: str, mode: str) -> float | None:
    """The best ``monitor`` value logged before a resume (so ``best.keras`` is not replaced by
    a worse epoch after it)."""
    values = [float(r[monitor]) for r in _history_rows(path) if r.get(monitor)]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def run_callbacks(cfg: Config, run: RunDir, resumed: bool, extra: list) -> list:
    """medseg's callbacks of a run: the history CSV, the last and best checkpoints, TensorBoard,
    backup-and-restore for resuming, NaN termination and early stopping, then ``extra``."""
    t = cfg.train
    history = run.logs / "history.csv"
    prior = None
    if resumed and run.best_model.exists():
        prior = _best_so_far(history, t.monitor, t.monitor_mode)
    # Everything an epoch writes (log row, checkpoints) comes before BackupAndRestore saves the
    # epoch as done: a kill in between then repeats the epoch instead of losing its records.
    callbacks = [
        AtomicCSVLogger(history, append=resumed),
        AtomicModelCheckpoint(str(run.last_model)),
        AtomicModelCheckpoint(
            str(run.best_model),
            monitor=t.monitor,
            mode=t.monitor_mode,
            save_best_only=True,
            initial_value_threshold=prior,
        ),
        keras.callbacks.TensorBoard(str(run.logs / "tensorboard"), write_graph=False),
        AtomicBackupAndRestore(str(run.checkpoints / "backup")),
        keras.callbacks.TerminateOnNaN(),
    ]
    if t.early_stopping:
        callbacks.append(
            ValidatedEarlyStopping(
                monitor=t.monitor, mode=t.monitor_mode, patience=t.early_stopping, verbose=1
            )
        )
    if cfg.model.freeze_backbone and cfg.model.fine_tune_after:
        from medseg.models.mobilenet import FineTuneAfter

        callbacks.append(FineTuneAfter(cfg.model.fine_tune_after))
    return callbacks + list(extra)


def validation_epochs(epochs: int, every: int) -> int | list[int]:
    """The 1-based epochs ``fit`` validates: every ``every``-th one and the last one.

    Example:
        >>> validation_epochs(10, 4)
        [4, 8, 10]
    """
    if every == 1:
        return 1
    return [e for e in range(1, epochs + 1) if e % every == 0 or e == epochs]
