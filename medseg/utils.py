"""Small helpers every layer may use: atomic writes and hashing.

Every file medseg writes goes through :func:`atomic_write_bytes` (or a wrapper): the data is written
to a temporary name in the same folder and renamed into place, so a killed process never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it to ``path`` when the block succeeds.

    For writers that insist on a file name of their own (Pillow, nibabel): they write to the
    yielded path, which keeps ``path``'s suffix so that format detection still works.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{''.join(path.suffixes)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, max_len: int = 64) -> str:
    """A file-name-safe version of ``text`` (no separators, no leading dots, bounded length)."""
    name = _UNSAFE.sub("_", text).strip("._") or "case"
    if len(name) > max_len:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        name = f"{name[: max_len - 9]}_{digest}"
    return name


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and probe its devices with C++ stderr muted.

    TensorFlow's C++ runtime writes start-up lines (oneDNN notes, "could not find CUDA drivers",
    cuInit failures on machines without a GPU) straight to file descriptor 2, before any Python
    logging setting applies. Python-level errors still surface as exceptions.
    """
    import sys

    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
