"""Checked loading of Keras model files: recorded checksums and Keras safe mode.

Checksums
    Every checkpoint medseg writes (``best.keras``, ``last.keras``, ``backup/latest.weights.h5``)
    is committed by :func:`commit_checkpoint`: the new file is hashed under its temporary name,
    the hash is recorded in a sidecar ``<file>.sha256`` (JSON: ``file``, ``sha256`` and
    ``previous``, the hash of the file it replaces) and only then is the file renamed into place.
    A process killed between the two steps therefore leaves either the new file or the previous
    one, and both are accepted; any other content (a truncated copy, a file edited or swapped
    by hand) is refused by :func:`verify_checkpoint` with a :class:`~medseg.errors.ModelError`
    naming the file. A file without a sidecar (written by another tool, or by an older medseg)
    is loaded with a warning in the log.

Safe mode
    :func:`load_keras_model` loads ``.keras`` files with ``keras.models.load_model(...,
    safe_mode=True)``, and first reads the file's ``config.json`` and refuses, with a
    :class:`~medseg.errors.ModelError`, anything that would run code from the file or from
    outside Keras and medseg: ``Lambda`` layers (their Python byte code), ``TFSMLayer`` (a
    SavedModel found through the file) and objects whose ``module`` is not ``keras...`` or
    ``medseg...`` (a function or class imported by name). This check does not depend on
    Keras' own safe mode, which a process may have switched off globally. A model with a
    TF-Hub backbone (:class:`medseg.models.hub.HubLayer`) loads the module from the handle
    recorded in the file; the handle is logged before loading (see the README, "Trust model").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zipfile
from pathlib import Path

from medseg.errors import ModelError
from medseg.utils import atomic_write_json, disk_full_error, file_sha256, is_disk_full

logger = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256"

#: Keras classes that carry code or load other files; never loaded from a ``.keras`` file.
UNSAFE_CLASSES = frozenset({"Lambda", "__lambda__", "TFSMLayer"})
#: Python packages whose classes and functions a ``.keras`` file may name.
SAFE_MODULES = ("keras", "medseg")


def checksum_path(path: str | Path) -> Path:
    """The sidecar that records ``path``'s SHA-256 (``<file>.sha256``)."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def commit_checkpoint(tmp: str | Path, final: str | Path, previous: str | None = None) -> str:
    """Record ``tmp``'s SHA-256 for ``final``, then rename ``tmp`` to ``final``.

    Args:
        tmp: the freshly written file (a temporary name in ``final``'s folder).
        final: where it goes.
        previous: SHA-256 of the file ``final`` holds now, if the caller knows it (else it is
            computed when ``final`` exists).

    Returns:
        The SHA-256 of the committed file.

    Raises:
        OutputError: the disk is full (``tmp`` is removed, ``final`` and its record are kept).
    """
    tmp, final = Path(tmp), Path(final)
    try:
        digest = file_sha256(tmp)
        if previous is None and final.is_file():
            previous = file_sha256(final)
        atomic_write_json(
            checksum_path(final), {"file": final.name, "sha256": digest, "previous": previous}
        )
        os.replace(tmp, final)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(e) and isinstance(e, OSError):
            raise disk_full_error(final) from e
        raise
    return digest


def verify_checkpoint(path: str | Path, expected: str | None = None) -> bool:
    """Check ``path`` against the SHA-256 recorded for it.

    Args:
        path: a model or weights file.
        expected: the SHA-256 to compare with (e.g. from a model card); default: the sidecar's.

    Returns:
        True when the file matches, False when there is nothing to compare with (no sidecar).

    Raises:
        ModelError: the file does not match its record.
    """
    path = Path(path)
    accepted: set[str] = set()
    if expected:
        accepted.add(expected)
    else:
        record_path = checksum_path(path)
        if not record_path.is_file():
            logger.warning(
                "%s: no recorded checksum (%s); loaded unverified", path, record_path.name
            )
            return False
        try:
            record = json.loads(record_path.read_text())
            accepted = {v for v in (record.get("sha256"), record.get("previous")) if v}
        except (OSError, ValueError, AttributeError):
            raise ModelError(
                f"{record_path}: checksum record is unreadable; delete it to load {path.name} "
                "unverified"
            ) from None
    if file_sha256(path) not in accepted:
        raise ModelError(
            f"{path}: file does not match the SHA-256 recorded when medseg wrote it (damaged, "
            "truncated or replaced); restore it or train/export again"
        )
    return True


def check_keras_file(path: str | Path) -> None:
    """Refuse a ``.keras`` file whose config names code (see the module docstring).

    Raises:
        ModelError: the file is not a ``.keras`` archive, or it names a ``Lambda``/``TFSMLayer``
            or a module outside Keras and medseg.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ModelError(f"{path}: not a readable .keras file ({type(e).__name__}: {e})") from None
    for obj in _objects(config):
        name = obj.get("class_name")
        if name in UNSAFE_CLASSES:
            raise ModelError(
                f"{path}: refused: the model holds a {name} layer, i.e. Python code or another "
                "model file that would run when loaded; medseg loads models in safe mode only "
                "(see README, 'Trust model')"
            )
        module = obj.get("module")
        if isinstance(module, str) and module.split(".")[0] not in SAFE_MODULES:
            raise ModelError(
                f"{path}: refused: the model names '{module}.{obj.get('config', name)}' from "
                "outside Keras and medseg, which could run code when loaded (see README, "
                "'Trust model')"
            )
        if name == "HubLayer":
            handle = (obj.get("config") or {}).get("handle")
            logger.info("%s: loads the TF-Hub module recorded in it: %s", path, handle)


def _objects(node):
    """Every dict in a JSON tree that looks like a serialised Keras object."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "class_name" in item:
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def load_keras_model(path: str | Path, expected_sha256: str | None = None, *, compile=False):
    """Load a ``.keras`` file after checking its checksum and config, in Keras safe mode.

    Args:
        path: the ``.keras`` file.
        expected_sha256: the SHA-256 it must have (default: its ``.sha256`` sidecar, if any).
        compile: restore the training configuration too.

    Raises:
        ModelError: the file is missing, does not match its checksum, holds code (``Lambda``
            and the like), or cannot be loaded; the message names the file.
    """
    import keras

    import medseg.models  # noqa: F401  (registers medseg's layers)

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    verify_checkpoint(path, expected_sha256)
    check_keras_file(path)
    try:
        return keras.models.load_model(path, compile=compile, safe_mode=True)
    except ModelError:
        raise
    except Exception as e:  # corrupt zip, unknown layer, Keras' own safe-mode refusal ...
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "safe_mode" in str(e) or "deserialization of a" in str(e):
            raise ModelError(
                f"{path}: refused: the model holds Python code that Keras' safe mode does not "
                "load (see README, 'Trust model')"
            ) from None
        raise ModelError(f"{path}: cannot load the model ({type(e).__name__}: {message})") from None
