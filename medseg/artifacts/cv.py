"""Cross-validation folders: the layout that ``medseg cv`` writes and every reader opens.

Layout::

    runs/<name>/config.yaml          resolved config
    runs/<name>/splits.json          k-fold manifest (no group in two folds; test groups apart)
    runs/<name>/fold_<k>/            an ordinary run folder per fold (k = 1..K), trained on the
                                     fold's own manifest, plus oof.csv (its out-of-fold cases)
                                     and, for 2D segmentation, oof_groups.csv (per patient)
    runs/<name>/ensemble.json        the fold models, combined by mean probability
    runs/<name>/test_metrics.json    the ensemble on the held-out test split (when there is one),
                                     with test_cases.csv and test_groups.csv
    runs/<name>/cv_summary.json, report.md, report.html, plots/

Training (:mod:`medseg.training.cv`) writes these folders (opened by :func:`open_cv_run`, which
holds the CV folder's lock: one process at a time trains a CV's folds); evaluation and inference
read them through the functions here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

import medseg
from medseg import locks
from medseg.artifacts.runs import (
    RunDir,
    clear_folder,
    default_run_name,
    has_trained,
    lock_run_folder,
    run_opened,
    stored_config_hash,
)
from medseg.config import Config
from medseg.errors import RunExistsError
from medseg.utils import atomic_write_text, read_json

logger = logging.getLogger(__name__)

#: The file that makes a run folder a cross-validation folder: its fold models.
ENSEMBLE_NAME = "ensemble.json"
#: The checkpoint whose out-of-fold predictions are scored and which the ensemble holds: "best"
#: would be chosen on the held-out fold itself (an optimistic score), "last" is not.
CV_CHECKPOINT = "last"


def fold_dir(root: Path, k: int) -> Path:
    """Folder of fold ``k`` (1-based)."""
    return root / f"fold_{k}"


def fold_done(root: Path, k: int) -> bool:
    """Has fold ``k`` finished training and written its out-of-fold cases?"""
    run = RunDir(fold_dir(root, k))
    return run.state().get("status") == "done" and (run.path / "oof.csv").is_file()


def load_ensemble(run_dir: str | Path) -> list[Path]:
    """Paths of the fold models recorded in a CV run's ``ensemble.json``.

    Raises:
        DataError: ``ensemble.json`` is missing, unreadable or not a JSON object; the message
            names the file.
    """
    root = Path(run_dir)
    spec = read_json(root / ENSEMBLE_NAME)
    return [root / f["model"] for f in spec["folds"]]


def cv_started(root: Path) -> bool:
    """Has any fold of the CV in ``root`` finished an epoch (progress worth keeping)?"""
    return (Path(root) / ENSEMBLE_NAME).is_file() or any(
        has_trained(d) for d in Path(root).glob("fold_*")
    )


def open_cv_run(cfg: Config) -> Path:
    """Create the CV run folder, or reopen it when its config is the same (resume), holding
    its lock (released by :func:`medseg.artifacts.runs.run_scope`, with ``cv_started``).

    Raises:
        RunExistsError: the folder holds a CV of another config, or is not a CV folder, and
            ``run.overwrite`` is not set.
        FolderInUseError: another process is running this CV (:mod:`medseg.locks`).
    """
    name = cfg.run.name or default_run_name(cfg)
    cfg.run.name = name
    root = Path(cfg.run.root) / name
    config_path = root / "config.yaml"
    try:
        if lock_run_folder(root) and cfg.run.overwrite:
            logger.info("overwriting %s", root)
            clear_folder(root)
        if config_path.exists():
            if stored_config_hash(config_path) != cfg.hash():
                raise RunExistsError(
                    f"{root}: holds a cross-validation run of another config; pick another "
                    "run.name or pass --overwrite"
                )
            logger.info("resuming cross-validation in %s", root)
        elif any(p.name != locks.LOCK_NAME for p in root.iterdir()):
            raise RunExistsError(f"{root}: folder exists and is not a cross-validation run")
        else:
            body = {
                "medseg": {"version": medseg.__version__, "config_hash": cfg.hash(), "kind": "cv"},
                **cfg.to_dict(),
            }
            atomic_write_text(config_path, yaml.safe_dump(body, sort_keys=False))
    except BaseException:
        locks.release(root)
        raise
    run_opened(root)
    return root
