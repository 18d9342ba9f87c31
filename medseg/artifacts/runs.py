"""Run folders: where every command's results go.

Layout (see DESIGN notes)::

    runs/<name>/config.yaml     resolved config, with the medseg version and config hash
    runs/<name>/splits.json     split manifest
    runs/<name>/checkpoints/    last.keras, best.keras, backup/ (optimizer state for resume)
    runs/<name>/logs/           history.csv, TensorBoard events
    runs/<name>/metrics.json    evaluation results, by split
    runs/<name>/plots/          curves, overlays
    runs/<name>/state.json      status (running / trained / done) and the config hash

A finished run is never overwritten unless ``run.overwrite`` is set. An unfinished run whose config
hash matches is resumed (the same command, run again); one with a different config is an error.
Resuming first removes the temporary files a killed process left (:func:`medseg.utils.
remove_stale_temps`) and checks ``best.keras``/``last.keras`` against their recorded SHA-256
(:mod:`medseg.models.loading`).

One process at a time: :func:`create_run` (and :func:`medseg.artifacts.cv.open_cv_run`) take the
folder's lock (:mod:`medseg.locks`, the file ``.medseg.lock``) before looking at it; a second
process given the same run is refused with :class:`medseg.locks.FolderInUseError`. The training
holds it inside :func:`run_scope`, which releases it at the end and, when the training stops
before its first epoch (a missing ``data.root``, no samples, an interrupt), removes the run
folder: nothing of it could be resumed, and the same ``--name`` is free again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import yaml

import medseg
from medseg import locks
from medseg.config import Config, config_from_dict
from medseg.config.loading import safe_load_bounded
from medseg.errors import ConfigError, MedsegError, ModelError, RunExistsError
from medseg.locks import LOCK_NAME
from medseg.models.loading import load_keras_model, verify_checkpoint
from medseg.utils import atomic_write_json, atomic_write_text, remove_stale_temps

logger = logging.getLogger(__name__)

#: Run states that a rerun of the same command resumes: ``running`` (training) and ``trained``
#: (training finished, the final evaluation did not).
UNFINISHED = ("running", "trained")


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run folder."""

    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def splits_path(self) -> Path:
        return self.path / "splits.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best_model(self) -> Path:
        return self.checkpoints / "best.keras"

    @property
    def last_model(self) -> Path:
        return self.checkpoints / "last.keras"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def plan_path(self) -> Path:
        """3D runs: the resolved volume plan (spacing, patch, normalisation, labels)."""
        return self.path / "plan.json"

    @property
    def fingerprint_path(self) -> Path:
        """3D runs: the dataset fingerprint the plan was made from."""
        return self.path / "fingerprint.json"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    def state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def set_state(self, status: str, config_hash: str) -> None:
        atomic_write_json(
            self.state_path, {"status": status, "config_hash": config_hash, "time": time.time()}
        )

    def config(self) -> Config:
        """The resolved config stored in the run."""
        try:
            raw = safe_load_bounded(self.config_path.read_text(), str(self.config_path))
        except OSError:
            raise ConfigError(f"{self.config_path}: run has no config.yaml") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            reason = " ".join(str(e).split())[:200]
            raise ConfigError(
                f"{self.config_path}: run config is not valid YAML ({reason})"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.config_path}: run config is not a mapping of sections")
        raw.pop("medseg", None)
        return config_from_dict(raw, source=str(self.config_path))

    def metrics(self) -> dict:
        try:
            return json.loads(self.metrics_path.read_text())
        except (OSError, ValueError):
            return {}


def default_run_name(cfg: Config) -> str:
    stem = Path(cfg.source).stem if cfg.source else "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_run(cfg: Config) -> tuple[RunDir, bool]:
    """Create (or reopen, to resume) the run folder for ``cfg``, holding its lock.

    Call it inside :func:`run_scope`, which releases the lock (and removes a run that stopped
    before its first epoch).

    Returns:
        The run and whether an unfinished run of the same config is being resumed.

    Raises:
        RunExistsError: the folder holds a finished run, or a run of another config, and
            ``run.overwrite`` is not set.
        FolderInUseError: another process is writing the run (:mod:`medseg.locks`).
    """
    name = cfg.run.name or default_run_name(cfg)
    cfg.run.name = name
    run = RunDir(Path(cfg.run.root) / name)
    try:
        resumed = _open_locked(cfg, run) if lock_run_folder(run.path) else False
    except BaseException:
        locks.release(run.path)
        raise
    for d in (run.checkpoints, run.logs, run.plots):
        d.mkdir(parents=True, exist_ok=True)
    if resumed and not run.state():
        run.set_state("running", cfg.hash())
    if not resumed:
        body = {
            "medseg": {"version": medseg.__version__, "config_hash": cfg.hash()},
            **cfg.to_dict(),
        }
        atomic_write_text(run.config_path, yaml.safe_dump(body, sort_keys=False))
        run.set_state("running", cfg.hash())
    run_opened(run.path)
    return run, resumed


def _open_locked(cfg: Config, run: RunDir) -> bool:
    """A folder that holds something, locked by this process: clear it (``run.overwrite``), or
    resume it, or refuse it; returns whether the run is resumed."""
    state = run.state() or _state_from_config(run)
    if cfg.run.overwrite:
        logger.info("overwriting %s", run.path)
        clear_folder(run.path)
        return False
    if state.get("status") in UNFINISHED and state.get("config_hash") == cfg.hash():
        logger.info("resuming unfinished run %s", run.path)
        _check_for_resume(run)
        return True
    if state.get("status") in UNFINISHED:
        raise RunExistsError(
            f"{run.path}: an unfinished run with a different config is there; pick another "
            "run.name or pass --overwrite"
        )
    raise RunExistsError(
        f"{run.path}: run folder exists; pick another run.name or pass --overwrite"
    )


#: Run and CV folders this process has opened to train (see :func:`run_scope`).
_OPENED: set[Path] = set()


def lock_run_folder(path: Path) -> bool:
    """Take this process's lock on a run or CV folder (creating the folder); returns whether
    the folder holds anything besides the lock. Re-entrant (:func:`medseg.locks.hold`).

    Raises:
        FolderInUseError: another process holds the folder.
        OutputError: the folder cannot be created.
    """
    locks.hold(path, "run folder")
    return any(p.name != LOCK_NAME for p in Path(path).iterdir())


def run_opened(path: Path) -> None:
    """Record that this process opened ``path`` to train it (new, overwritten or resumed):
    :func:`run_scope` may then remove it if the training stops before its first epoch."""
    _OPENED.add(Path(path).resolve())


def clear_folder(path: Path) -> None:
    """Remove everything in ``path`` but its lock file (``run.overwrite``: the lock stays
    held)."""
    for p in Path(path).iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def has_trained(path: Path) -> bool:
    """Has the run in ``path`` finished an epoch (a ``last.keras`` or a backup of one)?"""
    run = RunDir(Path(path))
    backup = run.checkpoints / "backup" / "training_metadata.json"
    return run.last_model.is_file() or backup.is_file()


@contextlib.contextmanager
def run_scope(cfg: Config, started: Callable[[Path], bool] = has_trained) -> Iterator[None]:
    """The scope of one training into the run folder ``cfg.run.root/cfg.run.name``.

    On leaving it the run's lock is released. When the block raises (an error, Ctrl-C,
    SIGTERM) and the run this process opened has not ``started`` (no epoch finished), the run
    folder is removed: nothing in it could be resumed, and a rerun, with the cause fixed,
    starts it afresh under the same name without ``--overwrite``.

    Args:
        cfg: the run's config; ``cfg.run.name`` may be set by :func:`create_run` inside.
        started: whether a run folder holds progress worth keeping (default
            :func:`has_trained`; a CV: whether any fold has).
    """
    discard = False
    try:
        yield
    except BaseException:
        path = Path(cfg.run.root) / cfg.run.name if cfg.run.name else None
        opened = path is not None and path.resolve() in _OPENED
        if opened and locks.held(path) is not None and not started(path):
            logger.warning(
                "%s: removed: the run stopped before its first epoch, so there is nothing to "
                "resume; the same command starts it again",
                path,
            )
            with contextlib.suppress(OSError):
                clear_folder(path)
                discard = True
        raise
    finally:
        if cfg.run.name:
            path = Path(cfg.run.root) / cfg.run.name
            _OPENED.discard(path.resolve())
            locks.release(path)
            if discard:
                with contextlib.suppress(OSError):
                    path.rmdir()


def stored_config_hash(config_path: Path) -> str | None:
    """The config hash that a run's or CV's ``config.yaml`` records (``medseg.config_hash``);
    None when it records none.

    Raises:
        OSError, yaml.YAMLError, ConfigError: the file cannot be read or parsed.
    """
    stored = safe_load_bounded(config_path.read_text(), str(config_path))
    medseg_section = stored.get("medseg") if isinstance(stored, dict) else None
    return medseg_section.get("config_hash") if isinstance(medseg_section, dict) else None


def _state_from_config(run: RunDir) -> dict:
    """The state of a run killed after writing ``config.yaml`` and before ``state.json``."""
    try:
        config_hash = stored_config_hash(run.config_path)
    except (OSError, ValueError, yaml.YAMLError, MedsegError):
        return {}
    return {"status": "running", "config_hash": config_hash} if config_hash else {}


def _check_for_resume(run: RunDir) -> None:
    """Before resuming: sweep the temporary files a killed process left, and check the
    checkpoints against their recorded SHA-256.

    Raises:
        ModelError: a checkpoint does not match its record (the message names it).
    """
    remove_stale_temps(run.path)
    for path in (run.best_model, run.last_model):
        if path.is_file():
            verify_checkpoint(path)


def open_run(path: str | Path) -> RunDir:
    """An existing run folder.

    Raises:
        ConfigError: the folder is missing or is not a medseg run.
    """
    run = RunDir(Path(path))
    if not run.config_path.is_file():
        raise ConfigError(f"{run.path}: not a medseg run folder (no config.yaml)")
    return run


def load_run_model(run: RunDir, checkpoint: str = "best") -> keras.Model:
    """Load ``best.keras`` or ``last.keras`` of a run, checked against its recorded SHA-256 and
    in Keras safe mode (:func:`medseg.models.loading.load_keras_model`).

    Raises:
        ModelError: the checkpoint is missing, does not match its checksum, holds code
            (a ``Lambda`` layer) or cannot be loaded; the message names the file.
    """
    path = run.best_model if checkpoint == "best" else run.last_model
    if not path.exists():
        raise ModelError(f"{path}: checkpoint not found (has the run finished an epoch?)")
    return load_keras_model(path)


def check_model_fits(model: keras.Model, cfg, path: str | Path) -> None:
    """Refuse a model that cannot have been trained for this run's task and input.

    A segmentation model maps ``[N, H, W, C]`` to ``[N, H, W, classes]``, a classifier to
    ``[N, classes]``; the input channels must be ``data.channels``.

    Raises:
        ModelError: the model's input or output does not fit ``cfg`` (e.g. a classifier
            checkpoint in a segmentation run); the message names ``path``.
    """
    try:
        inputs, outputs = tuple(model.input_shape), tuple(model.output_shape)
    except (AttributeError, TypeError, ValueError) as e:
        raise ModelError(f"{path}: cannot tell the model's input and output shapes ({e})") from None
    task = cfg.data.task
    expected = 4 if task == "segmentation" else 2
    if len(outputs) != expected or not all(isinstance(n, int | None) for n in outputs):
        want = "[N, H, W, classes]" if task == "segmentation" else "[N, classes]"
        raise ModelError(
            f"{path}: model output shape {list(outputs)} does not fit a {task} run (expected "
            f"{want}); the checkpoint is from another task or not a medseg model"
        )
    c = cfg.data.input_channels
    if len(inputs) != 4 or inputs[-1] != c:
        raise ModelError(
            f"{path}: model input shape {list(inputs)} does not fit data.channels="
            f"{cfg.data.channels} with data.context_slices={cfg.data.context_slices} (expected "
            f"[N, H, W, {c}])"
        )
