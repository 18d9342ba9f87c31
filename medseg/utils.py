"""Small helpers every layer may use: atomic writes and hashing.

Every file medseg writes goes through :func:`atomic_write_bytes` (or a wrapper): the data is written
to a temporary name in the same folder and renamed into place, so a killed process never leaves a
half-written file under the final name. Temporary names start with a dot and contain ``.tmp``
(:data:`TEMP_NAME`); :func:`remove_stale_temps` sweeps the ones a killed process left behind.

A full disk (``ENOSPC``) or an exceeded quota (``EDQUOT``) while writing becomes an
:class:`~medseg.errors.OutputError` naming the file, and the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError, DataError, OutputError, RunExistsError

logger = logging.getLogger(__name__)

#: errno values that mean "the output disk (or the user's quota) is full".
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

#: Names of medseg's temporary files and folders: ``.<name>.<random>.tmp`` (atomic writes),
#: ``.<stem>.tmp-<pid>[.<suffix>]`` (writers with a file name of their own, checkpoints, case
#: folders, exports).
TEMP_NAME = re.compile(r"^\..+\.tmp(-\d+(\..+)?)?$")


def is_disk_full(error: BaseException) -> bool:
    """Is ``error`` (or an error it was raised from) an ``OSError`` for a full disk or quota?"""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(error, OutputError):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def disk_full_error(path: str | Path) -> OutputError:
    """The one-line error for a full disk while writing ``path``."""
    return OutputError(
        f"{path}: no space left on the output disk (or quota exceeded); nothing partial was "
        "kept under this name. Free some space or choose another output folder, then run the "
        "same command again"
    )


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename.

    Raises:
        OutputError: the disk is full (the temporary file is removed, ``path`` is untouched).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(path) from e
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(path) from e
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path, *, missing_ok: bool = False) -> dict | None:
    """Read a JSON object that medseg wrote (a manifest, a card, a summary, a table).

    Args:
        path: the file.
        missing_ok: return ``None`` when the file does not exist, instead of raising.

    Raises:
        DataError: the file is missing (unless ``missing_ok``), unreadable, not JSON, or not a
            JSON object; the message names the file.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


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
    except Exception as e:
        if is_disk_full(e) and not isinstance(e, OutputError):
            raise disk_full_error(path) from e
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def remove_stale_temps(folder: str | Path, recursive: bool = True) -> int:
    """Remove the temporary files and folders (:data:`TEMP_NAME`) that a killed medseg process
    left in ``folder``; returns how many were removed.

    Call it only on medseg's own output folders (a run folder, a prediction output folder),
    before writing there again.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = folder.rglob(".*") if recursive else folder.glob(".*")
    stale = sorted((p for p in found if TEMP_NAME.match(p.name)), key=lambda p: len(p.parts))
    removed = 0
    for p in stale:
        if not p.exists() and not p.is_symlink():
            continue  # inside a folder removed just before
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed += 1
    if removed:
        logger.info("%s: removed %d temporary files left by an interrupted run", folder, removed)
    return removed


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


def check_output_folder(out: Path, inputs: tuple, overwrite: bool) -> None:
    """Refuse, with one line, an output folder that is (or holds) one of ``inputs`` (None
    entries are skipped), a file, or an existing folder without ``overwrite``.

    Raises:
        ConfigError: ``out`` would replace an input.
        DataError: ``out`` is a file.
        RunExistsError: ``out`` exists and ``overwrite`` is false.
    """
    target = Path(out).resolve()
    for folder in inputs:
        if folder is not None and (
            target == Path(folder).resolve() or target in Path(folder).resolve().parents
        ):
            raise ConfigError(
                f"{out}: is (or holds) the input {folder}: the output folder would replace the "
                "input; choose another folder"
            )
    if Path(out).exists() and not Path(out).is_dir():
        raise DataError(f"{out}: is a file, not a folder for the results")
    if Path(out).exists() and not overwrite:
        raise RunExistsError(f"{out}: already exists; pass --overwrite to replace it")


def replace_folder(tmp: str | Path, dest: str | Path) -> Path:
    """Move a finished temporary folder into place as ``dest``, replacing what was there.

    The caller writes everything into ``tmp`` (a sibling of ``dest``, on the same file
    system) and decided beforehand whether ``dest`` may be replaced; the rename itself is atomic.
    """
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest
