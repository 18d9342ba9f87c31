"""Keras callbacks whose files survive a kill: written under a temporary name, then renamed.

Keras' ``ModelCheckpoint`` and ``BackupAndRestore`` write their files in place, so a process
killed mid-write leaves a truncated ``.keras`` or ``.weights.h5`` that the next run cannot load.
These subclasses only change where the bytes go first.
"""

from __future__ import annotations

import json
import os

import keras

from medseg.utils import atomic_write_text


def _temp_sibling(path: str) -> str:
    """A temporary name beside ``path`` that keeps its (possibly double) suffix."""
    head, name = os.path.split(path)
    stem, dot, suffix = name.partition(".")
    return os.path.join(head, f".{stem}.tmp-{os.getpid()}{dot}{suffix}")


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` that writes to a temporary file and renames it into place."""

    def _save_model(self, epoch, batch, logs):
        final = self.filepath
        tmp = _temp_sibling(final)
        self.filepath = tmp
        try:
            super()._save_model(epoch, batch, logs)
        finally:
            self.filepath = final
        if os.path.exists(tmp):
            os.replace(tmp, final)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` whose weights and metadata files are replaced atomically.

    The weights are renamed into place before the metadata: a kill between the two leaves the
    newer weights with the older epoch count, so at most one epoch is repeated.
    """

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        tmp = _temp_sibling(self._weights_path)
        self.model.save_weights(filepath=tmp, overwrite=True)
        os.replace(tmp, self._weights_path)
        atomic_write_text(
            self._training_metadata_path,
            json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen}),
        )
