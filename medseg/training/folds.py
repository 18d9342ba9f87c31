"""One cross-validation fold as an ordinary run: what both executors of ``medseg cv`` run.

:func:`run_fold` takes plain data (a config dict and paths), so that the local executor
(:mod:`medseg.training.cv`) calls it in this process and the Ray executor
(:mod:`medseg.training.ray_executor`) ships it to other processes or machines.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

from medseg.artifacts.cv import CV_CHECKPOINT, fold_dir
from medseg.artifacts.runs import RunDir
from medseg.config import Config, config_from_dict
from medseg.data.split import fold_manifest, load_manifest
from medseg.evaluation.evaluate import read_cases, write_cases
from medseg.evaluation.oof import GROUPS_FILE
from medseg.training.train import train

logger = logging.getLogger(__name__)


def fold_config(cfg: Config, root: Path, k: int) -> Config:
    """The config of fold ``k``: the CV config, with its run folder inside the CV run."""
    fcfg = copy.deepcopy(cfg)
    fcfg.run.root, fcfg.run.name, fcfg.run.overwrite = str(root), f"fold_{k}", False
    return fcfg


def run_fold(cfg_dict: dict, root: str, k: int, callbacks: list | None = None) -> dict:
    """Train (or resume) fold ``k`` and write its ``oof.csv`` (and, for segmentation, its
    ``oof_groups.csv``: one row per patient volume); returns the fold's val metrics.

    Takes plain data (a config dict and paths) so that executors can ship it to other
    processes or machines.
    """
    cfg = config_from_dict(cfg_dict)
    root_path = Path(root)
    manifest = load_manifest(root_path / "splits.json")
    fdir = fold_dir(root_path, k)
    run = RunDir(fdir)
    if fdir.exists() and not run.state():
        # killed before the fold wrote its state: nothing of it can be resumed
        logger.warning("%s: incomplete fold folder without state, starting it again", fdir)
        shutil.rmtree(fdir)
    if run.state().get("status") != "done":
        metrics = train(
            fold_config(cfg, root_path, k),
            callbacks,
            manifest=fold_manifest(manifest, k - 1),
            eval_checkpoint=CV_CHECKPOINT,
        ).metrics
    else:
        metrics = run.metrics()["val"]
    write_cases(fdir / "oof.csv", read_cases(fdir / "cases_val.csv"), {"fold": k})
    groups = fdir / "groups_val.csv"  # segmentation: one row per patient volume
    if groups.is_file():
        write_cases(fdir / GROUPS_FILE, read_cases(groups), {"fold": k})
    else:  # classification, or a fold evaluated by an older medseg: no stale copy
        (fdir / GROUPS_FILE).unlink(missing_ok=True)
    return metrics
