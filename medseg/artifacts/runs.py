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
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import yaml

import medseg
from medseg.config import Config, config_from_dict
from medseg.errors import ConfigError, ModelError, RunExistsError
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
            raw = yaml.safe_load(self.config_path.read_text())
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
    """Create (or reopen, to resume) the run folder for ``cfg``.

    Returns:
        The run and whether an unfinished run of the same config is being resumed.

    Raises:
        RunExistsError: the folder holds a finished run, or a run of another config, and
            ``run.overwrite`` is not set.
    """
    name = cfg.run.name or default_run_name(cfg)
    cfg.run.name = name
    run = RunDir(Path(cfg.run.root) / name)
    resumed = False
    if run.path.exists():
        state = run.state() or _state_from_config(run)
        if cfg.run.overwrite:
            logger.info("overwriting %s", run.path)
            shutil.rmtree(run.path)
        elif state.get("status") in UNFINISHED and state.get("config_hash") == cfg.hash():
            logger.info("resuming unfinished run %s", run.path)
            resumed = True
            _check_for_resume(run)
        elif state.get("status") in UNFINISHED:
            raise RunExistsError(
                f"{run.path}: an unfinished run with a different config is there; pick another "
                "run.name or pass --overwrite"
            )
        else:
            raise RunExistsError(
                f"{run.path}: run folder exists; pick another run.name or pass --overwrite"
            )
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
    return run, resumed


def _state_from_config(run: RunDir) -> dict:
    """The state of a run killed after writing ``config.yaml`` and before ``state.json``."""
    try:
        stored = yaml.safe_load(run.config_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    config_hash = (stored.get("medseg") or {}).get("config_hash")
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
