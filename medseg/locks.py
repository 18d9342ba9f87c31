"""Folder locks: one medseg process at a time writes a run folder, a CV folder or a ``--out``.

A lock is the file :data:`LOCK_NAME` inside the folder, holding the owner's process id, host,
command and start time (JSON), so that a refused second process can say who holds it.

Mechanism: the file is opened and locked with ``fcntl.flock`` (exclusive, non-blocking). The
kernel releases an ``flock`` when its process ends, however it ends (``kill -9``, a crash, a
power cut of a local disk), so a lock can never outlive its owner: a lock file whose ``flock``
is free is stale by definition, and the next process takes it over (logging the dead owner).
``flock`` works on local file systems and on NFS (the Linux client maps it onto NFS locks).
Where the file system has no locks at all (``flock`` fails with ``ENOLCK``/``EOPNOTSUPP``, e.g.
Lustre mounted without ``flock``), the file itself is the lock: it is created with ``O_EXCL``
and a lock file whose process is no longer alive on this host is stale and replaced; one of
another host is honoured (remove the file by hand once that process has gone).

A process releases its lock when the work ends: the file is removed (then unlocked), and a
folder that the lock created and that is still empty is removed too. Readers of medseg's
folders skip :data:`LOCK_NAME` (it is a hidden file, never a case, run or output).

Only the standard library: this module sits at the lowest layer, beside :mod:`medseg.utils`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from medseg.errors import MedsegError, OutputError

logger = logging.getLogger(__name__)

#: The lock file's name inside a locked folder.
LOCK_NAME = ".medseg.lock"

#: errno values of ``flock`` on a file system without locks: fall back to the O_EXCL file.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderInUseError(MedsegError):
    """Another live medseg process holds the folder's lock; the message names the folder and
    the owner (process id, host)."""


def _holder_text(info: dict) -> str:
    """``pid 123 on host, `medseg train ...`, since 12:00:01`` from a lock file's content."""
    if not info.get("pid"):
        return "another medseg process"
    parts = [f"pid {info['pid']} on {info.get('host') or 'an unknown host'}"]
    if info.get("command"):
        parts.append(f"`{str(info['command'])[:120]}`")
    if info.get("started"):
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            parts.append(
                "since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
            )
    return "another medseg process (" + ", ".join(parts) + ")"


def _read_info(path: Path) -> dict:
    """The owner recorded in a lock file; ``{}`` when it is empty, unreadable or not ours."""
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read(4096) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _alive(pid: int) -> bool:
    """Is process ``pid`` running on this host?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _my_info() -> dict:
    command = " ".join(["medseg", *sys.argv[1:]]) if sys.argv else "medseg"
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.time(),
    }


class FolderLock:
    """An exclusive lock on a folder, held by this process until :meth:`release`.

    Use it as a context manager (``with FolderLock(folder) as lock:``), or :meth:`acquire` and
    :meth:`release`.

    Attributes:
        folder: the locked folder.
        created: whether acquiring the lock created the folder.
        what: what the folder is, for the refusal ("run folder", "output folder").
    """

    def __init__(self, folder: str | Path, what: str = "folder"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.created = False
        self._fd: int | None = None
        self._flock = True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Create the folder if needed and take its lock.

        Raises:
            FolderInUseError: another live process holds the lock.
            OutputError: the folder or its lock file cannot be created (read-only file system,
                no permission); the message names the path.
        """
        if self.held:
            return self
        try:
            if self.folder.exists() and not self.folder.is_dir():
                raise OutputError(f"{self.folder}: is a file, not a folder")
            self.created = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            for _ in range(5):  # the owner may release (and remove) the file meanwhile
                if self._try_lock():
                    break
            else:  # pragma: no cover - only under a storm of concurrent starts
                raise FolderInUseError(f"{self.folder}: its lock changed hands repeatedly; retry")
        except OSError as e:
            raise OutputError(
                f"{e.filename or self.path}: cannot create the {self.what} or its lock file "
                f"({e.strerror or e})"
            ) from None
        return self

    def _try_lock(self) -> bool:
        """One attempt; True when the lock is ours, False when the file was replaced
        meanwhile (try again); raises when another process holds it."""
        if not self._flock:
            return self._try_exclusive_create()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._in_use(_read_info(self.path)) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_FLOCK:
                raise
            logger.debug("%s: no flock on this file system (%s); using the file", self.path, e)
            self._flock = False
            return self._try_exclusive_create()
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous owner removed the file between our open and our lock
            os.close(fd)
            return False
        previous = _read_info(self.path)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            logger.info(
                "%s: took over a stale lock of %s, which is no longer running",
                self.folder,
                _holder_text(previous).removeprefix("another medseg process "),
            )
        self._write(fd)
        return True

    def _try_exclusive_create(self) -> bool:
        """The fallback without ``flock``: the file's existence is the lock."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            info = _read_info(self.path)
            here = info.get("host") == socket.gethostname()
            pid = info.get("pid")
            if not (here and isinstance(pid, int) and not _alive(pid)):
                raise self._in_use(info) from None
            logger.info("%s: removing a stale lock of %s", self.folder, _holder_text(info))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return False
        self._write(fd)
        return True

    def _write(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_my_info()).encode(), 0)
        self._fd = fd

    def _in_use(self, info: dict) -> FolderInUseError:
        return FolderInUseError(
            f"{self.folder}: this {self.what} is in use by {_holder_text(info)}; wait for it to "
            f"finish or choose another {self.what} (a lock of a process that has ended is "
            f"taken over automatically)"
        )

    def release(self) -> None:
        """Remove the lock file and unlock; remove the folder too if the lock created it and
        nothing else was written there. Does nothing when the lock is not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    os.unlink(self.path)  # while still locked: nobody locks a removed file
        finally:
            os.close(fd)  # releases the flock
        if self.created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


#: The locks this process holds, by resolved folder (see :func:`hold`).
_HELD: dict[Path, FolderLock] = {}


def _key(folder: str | Path) -> Path:
    return Path(folder).resolve()


def hold(folder: str | Path, what: str = "folder") -> FolderLock:
    """Take ``folder``'s lock for this process until :func:`release` (re-entrant: a folder this
    process already holds is returned as is). The CLI takes a run folder's lock before it
    starts TensorFlow, and the run's own code takes it again, at no cost.

    Raises:
        FolderInUseError: another live process holds the lock.
        OutputError: the folder or the lock file cannot be created.
    """
    key = _key(folder)
    lock = _HELD.get(key)
    if lock is not None and lock.held:
        return lock
    lock = FolderLock(folder, what).acquire()
    _HELD[key] = lock
    return lock


def held(folder: str | Path) -> FolderLock | None:
    """The lock this process holds on ``folder`` through :func:`hold`, if any."""
    lock = _HELD.get(_key(folder))
    return lock if lock is not None and lock.held else None


def release(folder: str | Path) -> None:
    """Release a lock taken with :func:`hold` (nothing happens when none is held)."""
    lock = _HELD.pop(_key(folder), None)
    if lock is not None:
        lock.release()
