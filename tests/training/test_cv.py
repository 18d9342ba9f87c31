"""`medseg cv`: group-disjoint folds covering every sample once, out-of-fold files that the
summary is computed from, a held-out test split, and surviving a SIGKILL in fold 2."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from medseg.models.metrics import dice_from_counts
from tests.conftest import TINY_UNET, as_cli_sets, run_cli

pytestmark = pytest.mark.slow

TINY = as_cli_sets(TINY_UNET)


def _cv(workdir, name, *sets):
    """``medseg cv`` on the tiny data: 3 folds, run ``name``, extra ``--set`` values."""
    extra = as_cli_sets(list(sets))
    return run_cli(
        "cv", "-c", "configs/demo.yaml", "--folds", "3", "--name", name, *TINY, *extra, cwd=workdir
    )


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_three_folds_through_the_cli(workdir):
    proc = _cv(workdir, "cv3", "train.epochs=1", "data.test_fraction=0.2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = workdir / "runs" / "cv3"
    manifest = json.loads((root / "splits.json").read_text())
    assert manifest["k"] == 3 and len(manifest["folds"]) == 3

    oof = [r for k in (1, 2, 3) for r in _rows(root / f"fold_{k}" / "oof.csv")]
    ids = [r["id"] for r in oof]
    test_ids = set(manifest["splits"]["test"])
    all_ids = {i for f in manifest["folds"] for part in f.values() for i in part} | test_ids
    assert len(ids) == len(set(ids))  # every sample predicted out-of-fold exactly once
    assert set(ids) == all_ids - test_ids and test_ids
    groups_by_fold = {}
    for r in oof:
        groups_by_fold.setdefault(r["group"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in groups_by_fold.values())  # a patient in one fold only

    # The summary is computed from the out-of-fold files: recompute pooled Dice by hand.
    summary = json.loads((root / "cv_summary.json").read_text())
    tp, fp, fn = (sum(int(r[c]) for r in oof) for c in ("tp", "fp", "fn"))
    assert summary["metrics"]["dice"]["pooled"] == pytest.approx(dice_from_counts(tp, fp, fn))
    # one row per patient volume in each fold's oof_groups.csv, counts matching oof.csv
    patients = [r for k in (1, 2, 3) for r in _rows(root / f"fold_{k}" / "oof_groups.csv")]
    assert sorted(r["group"] for r in patients) == sorted(groups_by_fold)
    assert sum(int(r["tp"]) for r in patients) == tp and summary["surface"]["unit"] == "px"
    assert (root / "report.md").is_file() and (root / "report.html").is_file()
    ensemble = json.loads((root / "ensemble.json").read_text())
    assert [f["fold"] for f in ensemble["folds"]] == [1, 2, 3]
    test = json.loads((root / "test_metrics.json").read_text())
    assert test["split"] == "test" and test["n_images"] == len(test_ids)
    assert test["surface_unit"] == "px" and (root / "test_groups.csv").is_file()
    assert "report:" in proc.stdout

    # Rerunning the finished command trains nothing and keeps every file.
    before = (root / "fold_1" / "checkpoints" / "best.keras").stat().st_mtime_ns
    again = _cv(workdir, "cv3", "train.epochs=1", "data.test_fraction=0.2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished" in again.stderr
    assert (root / "fold_1" / "checkpoints" / "best.keras").stat().st_mtime_ns == before


def test_sigkill_during_fold_2_then_rerun_loses_nothing(workdir):
    args = [
        sys.executable,
        "-m",
        "medseg.cli",
        "cv",
        "-c",
        "configs/demo.yaml",
        "--folds",
        "3",
        "--name",
        "killed",
        *TINY,
        "--set",
        "train.epochs=4",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    root = workdir / "runs" / "killed"
    proc = subprocess.Popen(
        args,
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        # wait until fold 2 has finished at least one epoch, then kill -9
        while (
            not (root / "fold_2" / "logs" / "history.csv").is_file()
            or len((root / "fold_2" / "logs" / "history.csv").read_text().splitlines()) < 2
        ):
            assert proc.poll() is None, "cv ended before fold 2 was under way"
            assert time.time() < deadline, "fold 2 never started"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    fold1 = {p.name: p.read_bytes() for p in (root / "fold_1").iterdir() if p.is_file()}
    assert (
        "oof.csv" in fold1
        and json.loads((root / "fold_2" / "state.json").read_text())["status"] == "running"
    )

    again = _cv(workdir, "killed", "train.epochs=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (root / "fold_1").iterdir() if p.is_file()} == fold1
    history = _rows(root / "fold_2" / "logs" / "history.csv")
    assert [int(r["epoch"]) for r in history] == [0, 1, 2, 3]  # resumed, not restarted
    for k in (1, 2, 3):
        assert json.loads((root / f"fold_{k}" / "state.json").read_text())["status"] == "done"
    summary = json.loads((root / "cv_summary.json").read_text())
    assert summary["folds_done"] == [1, 2, 3]
