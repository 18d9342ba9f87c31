"""Small helpers every layer may use: atomic writes, hashing and the text of tables.

Every file medseg writes goes through :func:`atomic_write_bytes` (or a wrapper): the data is written
to a temporary name in the same folder and renamed into place, so a killed process never leaves a
half-written file under the final name. Temporary names start with a dot and contain ``.tmp``
(:data:`TEMP_NAME`); :func:`remove_stale_temps` sweeps the ones a killed process left behind.

A full disk (``ENOSPC``) or an exceeded quota (``EDQUOT``) while writing becomes an
:class:`~medseg.errors.OutputError` naming the file, and the temporary file is removed; so does
a read-only file system (``EROFS``) or a missing permission (``EACCES``, ``EPERM``)
(:func:`output_error`). :func:`check_writable` finds the same problems before any work starts.

Tables (CSV and JSON) hold text as :func:`table_cell` makes it: a file name that is not valid
UTF-8 is written with its undecodable bytes as backslash escapes (``scan_\\xff\\xfe.png``,
:func:`display_text`), and a CSV text cell that a spreadsheet would read as a formula (it starts
with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return) gets a leading single quote
(:func:`spreadsheet_safe`, OWASP's advice against CSV injection); numbers stay numbers.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
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

#: errno values that mean "this place may not be written": a read-only file system, a missing
#: permission.
NOT_WRITABLE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})

#: First characters of a text cell that a spreadsheet would read as a formula (OWASP's list).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

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


def _read_only(path: Path) -> bool:
    """Whether ``path`` lies on a file system mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def not_writable_error(path: str | Path, error: OSError | None = None) -> OutputError:
    """The one-line error for an output ``path`` that may not be written (a read-only file
    system, a missing permission)."""
    read_only = error.errno == errno.EROFS if error is not None else _read_only(Path(path))
    reason = "read-only file system" if read_only else "permission denied"
    return OutputError(
        f"{display_text(str(path))}: cannot write there ({reason}); choose another output folder "
        "or make this one writable, then run the same command again"
    )


def output_error(path: str | Path, error: BaseException) -> OutputError | None:
    """The one-line :class:`~medseg.errors.OutputError` naming ``path`` for an error raised while
    writing it (or an error it was raised from): a full disk or quota, a read-only file system,
    a missing permission; None for any other error."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OutputError):
            return error
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return disk_full_error(path)
        if isinstance(error, OSError) and error.errno in NOT_WRITABLE_ERRNOS:
            return not_writable_error(path, error)
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def check_writable(folder: str | Path) -> None:
    """Check, before any work, that medseg can create files in ``folder`` (or create ``folder``
    in its nearest existing parent).

    Raises:
        OutputError: the folder (or the parent it would be created in) lies on a read-only file
            system or may not be written by this user; the message names it.
        DataError: ``folder``, or a parent of it, is a file.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"{display_text(str(existing))}: is a file, not a folder for the results")
    mode = os.W_OK | os.X_OK | (os.R_OK if existing == folder else 0)  # a rerun lists it
    if os.access(existing, mode) and not _read_only(existing):
        return
    if existing == folder:
        raise not_writable_error(folder)
    reason = "read-only file system" if _read_only(existing) else "permission denied"
    raise OutputError(
        f"{display_text(str(folder))}: cannot create the output folder: "
        f"{display_text(str(existing))} may not be written ({reason}); choose another output folder"
    )


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename.

    Raises:
        OutputError: the disk is full, the file system is read-only or the folder may not be
            written (the temporary file is removed, ``path`` is untouched); the message names
            ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise (output_error(path, e) or e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        mapped = output_error(path, e) if isinstance(e, OSError) else None
        if mapped is not None:
            raise mapped from e
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (output_error(path, e) or e) from e
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{''.join(path.suffixes)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as e:
        mapped = None if isinstance(e, OutputError) else output_error(path, e)
        if mapped is not None:
            raise mapped from e
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
    """A file-name-safe version of ``text`` (no separators, no leading dots or dashes, bounded
    length): never read as an option by a shell command or as a formula by a spreadsheet."""
    name = _UNSAFE.sub("_", text).lstrip("._-").rstrip("._") or "case"
    if len(name) > max_len:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        name = f"{name[: max_len - 9]}_{digest}"
    return name


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def display_text(text: str) -> str:
    """``text`` as it can be written to a UTF-8 table or a log line: the bytes of a file name
    that are not valid UTF-8 (which Python keeps as surrogate escapes, ``os.fsdecode``) and
    control characters (a newline in a file name would forge a log line) become backslash
    escapes, e.g. the name ``b"scan_\\xff\\xfe.png"`` -> ``"scan_\\\\xff\\\\xfe.png"``; other
    text is returned as it is."""
    try:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", shown)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text == text.strip()


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell that a spreadsheet cannot run: text that starts like a formula
    (:data:`FORMULA_STARTS`: ``=``, ``+``, ``-``, ``@``, tab, carriage return) gets a leading
    single quote (OWASP's advice against CSV injection), e.g. ``"=HYPERLINK(...)"`` ->
    ``"'=HYPERLINK(...)"``. Numbers, and text that is a plain number such as ``"-0.5"``, are
    returned as they are, as is every other value."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _is_number(value):
        return "'" + value
    return value


def spreadsheet_unquote(value: Any) -> Any:
    """Undo :func:`spreadsheet_safe` for a cell read back from a CSV file medseg wrote."""
    if isinstance(value, str) and value.startswith("'") and spreadsheet_safe(value[1:]) == value:
        return value[1:]
    return value


def table_cell(value: Any) -> Any:
    """A value as medseg writes it into a CSV cell: text through :func:`display_text` and
    :func:`spreadsheet_safe`; other values unchanged."""
    if isinstance(value, str):
        return spreadsheet_safe(display_text(value))
    return value


def display_row(row: dict) -> dict:
    """A table row whose text values (and keys) went through :func:`display_text` (for JSON
    tables and for what is printed)."""
    return {
        display_text(k) if isinstance(k, str) else k: display_text(v) if isinstance(v, str) else v
        for k, v in row.items()
    }


def csv_text(fieldnames: list[str], rows: list[dict], **writer_options: Any) -> str:
    """The CSV text of ``rows`` under the header ``fieldnames``, every cell (the header too)
    through :func:`table_cell`: the one way medseg writes a CSV table.

    Args:
        fieldnames: the columns, in order.
        rows: one dict per line (missing keys are empty cells).
        writer_options: more options of :class:`csv.DictWriter` (``extrasaction``, ...).
    """
    safe_fields = [table_cell(f) for f in fieldnames]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(safe_fields)
    dict_writer = csv.DictWriter(buf, fieldnames=fieldnames, **writer_options)
    for row in rows:
        dict_writer.writerow({k: table_cell(v) for k, v in row.items()})
    return buf.getvalue()


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


def check_outside_inputs(out: str | Path, inputs: list | tuple) -> None:
    """Refuse, with one line, an output folder that is an input folder, lies inside one, or
    holds an input (None entries of ``inputs`` are skipped). Outputs never mix with inputs: a
    rerun would otherwise read the previous run's outputs as new inputs, and an output could
    replace an input.

    Raises:
        ConfigError: ``out`` is, is inside, or holds one of ``inputs``; the message says which.
    """
    target = Path(out).resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        if target == source:
            where = f"is the input folder {item}"
        elif source in target.parents and source.is_dir():
            where = f"lies inside the input folder {item}"
        elif target in source.parents:
            where = f"holds the input {item}"
        else:
            continue
        raise ConfigError(
            f"{display_text(str(out))}: the output folder {display_text(where)}; its outputs "
            "would mix with the inputs (and a rerun would read them as inputs): choose an output "
            "folder outside the inputs"
        )


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
    try:
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    except OSError as e:
        raise (output_error(dest, e) or e) from e
    return dest
