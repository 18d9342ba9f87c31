"""K-fold cross-validation (``medseg cv``): one fresh model per fold, resumable, with a report.

The folder it writes (``runs/<name>/`` with ``splits.json``, ``fold_<k>/`` run folders and their
``oof.csv``, ``ensemble.json``, ``test_metrics.json``, the summary and the report) is described
and opened by :mod:`medseg.artifacts.cv`.

Rerunning the same command skips finished folds and resumes an unfinished one from its last
completed epoch; nothing already finished is trained again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medseg.artifacts.cv import (
    CV_CHECKPOINT,
    ENSEMBLE_NAME,
    cv_started,
    fold_dir,
    fold_done,
    open_cv_run,
)
from medseg.artifacts.runs import RunDir, load_run_model, run_scope
from medseg.config import Config
from medseg.data.pipeline import load_arrays
from medseg.data.scan import scan_from_config
from medseg.data.split import load_manifest, make_kfold, select, write_manifest
from medseg.errors import ConfigError
from medseg.evaluation.evaluate import score, write_cases
from medseg.evaluation.report3d import write_volumetric_report
from medseg.models.ensemble import mean_probabilities
from medseg.training.distributed import resolve_cluster
from medseg.training.folds import run_fold
from medseg.training.volumetric import is_volumetric
from medseg.utils import atomic_write_json

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


@dataclass
class CVResult:
    """Where a cross-validation run is and what it found."""

    path: Path
    folds_done: list[int]
    summary: dict


def _open_cv_run(cfg: Config) -> Path:
    """Create the CV run folder, or reopen it when its config is the same (resume), holding its
    lock (:func:`medseg.artifacts.cv.open_cv_run`)."""
    return open_cv_run(cfg)


def _cv_manifest(cfg: Config, root: Path) -> dict:
    path = root / "splits.json"
    if path.exists():
        return load_manifest(path)
    scan = scan_from_config(cfg.data)
    scan.log_problems()
    manifest = make_kfold(
        scan.samples,
        cfg.cv.folds,
        seed=cfg.train.seed,
        test_fraction=cfg.data.test_fraction,
        stratify=not is_volumetric(cfg),  # 3D cases all hold every structure
    )
    manifest["class_names"] = scan.class_names
    manifest["layout"] = scan.layout
    write_manifest(path, manifest)
    return load_manifest(path)


def _ensemble_on_test(cfg: Config, root: Path, manifest: dict, folds: list[int]) -> dict | None:
    """Evaluate the mean-probability ensemble of the fold models on the held-out test split."""
    test_ids = manifest.get("splits", {}).get("test", [])
    if not test_ids:
        return None
    samples = select(scan_from_config(cfg.data).samples, manifest, "test")
    members, data = [], None
    for k in folds:
        model = load_run_model(RunDir(fold_dir(root, k)), CV_CHECKPOINT)
        if data is None:
            data = load_arrays(samples, cfg.data, model.output_shape[-1])
        members.append(model.predict(data.images, batch_size=cfg.predict.batch_size, verbose=0))
    probs = mean_probabilities(members)
    result, rows, group_rows = score(
        probs,
        data,
        cfg.data.task,
        cfg.predict.threshold,
        manifest.get("class_names", []),
        tolerance=cfg.evaluation.nsd_tolerance_mm,
    )
    result.update(split="test", ensemble=[f"fold_{k}" for k in folds])
    write_cases(root / "test_cases.csv", rows)
    if group_rows:
        write_cases(root / "test_groups.csv", group_rows)
    atomic_write_json(root / "test_metrics.json", result)
    return result


def run_cv(
    cfg: Config,
    *,
    only: list[int] | None = None,
    executor: str = "local",
    address: str | None = None,
    callbacks: list | None = None,
    report: Callable[[Path], dict] | None = None,
) -> CVResult:
    """Run (or resume) K-fold cross-validation of ``cfg`` into ``runs/<name>/``.

    Args:
        cfg: the resolved config; ``cv.folds`` folds, ``cv.only`` restricts which are trained.
        only: fold numbers (1-based) to train now, overriding ``cv.only``.
        executor: ``local`` (folds one after another, in this process) or ``ray`` (folds as
            tasks on a Ray cluster, see :mod:`medseg.training.ray_executor`).
        address: Ray cluster address (``ray`` only; default: start a local Ray instance).
        callbacks: extra Keras callbacks for every fold (local executor).
        report: function writing the summary and report (default
            :func:`medseg.evaluation.report.write_report`).

    Returns:
        The run folder, the folds finished so far and the summary of those folds.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor: '{executor}' is not one of {', '.join(EXECUTORS)}")
    if resolve_cluster(cfg) is not None:
        raise ConfigError(
            "TF_CONFIG: medseg cv does not train folds across several workers (that is medseg "
            "train's); unset TF_CONFIG, or run the folds on a Ray cluster with --executor ray"
        )
    # the CV folder's lock; a CV stopped before any fold trained an epoch is removed
    with run_scope(cfg, started=cv_started):
        return _run_cv(cfg, _open_cv_run(cfg), only, executor, address, callbacks, report)


def _run_cv(cfg, root, only, executor, address, callbacks, report) -> CVResult:
    """:func:`run_cv` in its open CV folder ``root``."""
    manifest = _cv_manifest(cfg, root)
    k = len(manifest["folds"])
    todo = only or cfg.cv.only or list(range(1, k + 1))
    bad = [f for f in todo if not 1 <= f <= k]
    if bad:
        raise ConfigError(f"cv.only: fold {bad[0]} does not exist; folds are 1..{k}")
    pending = [f for f in todo if not fold_done(root, f)]
    for f in sorted(set(todo) - set(pending)):
        logger.info("fold %d/%d already finished, skipped", f, k)
    cfg_dict = cfg.to_dict()
    if executor == "ray":
        from medseg.training.ray_executor import run_folds_on_ray

        run_folds_on_ray(cfg_dict, root, pending, address=address)
    else:
        for f in pending:
            logger.info("fold %d/%d", f, k)
            run_fold(cfg_dict, str(root), f, callbacks)
    done = [f for f in range(1, k + 1) if fold_done(root, f)]
    atomic_write_json(
        root / ENSEMBLE_NAME,
        {
            "combine": "mean_probability",
            "folds": [
                {"fold": f, "model": f"fold_{f}/checkpoints/{CV_CHECKPOINT}.keras"} for f in done
            ],
        },
    )
    if len(done) == k:
        _ensemble_on_test(cfg, root, manifest, done)
    if report is None and is_volumetric(cfg):
        report = write_volumetric_report
    elif report is None:
        from medseg.evaluation.report import write_report

        report = write_report
    summary = report(root)
    return CVResult(root, done, summary)
