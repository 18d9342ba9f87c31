"""`medseg demo` runs the whole chain and reports where everything went (shrunk to seconds)."""

from __future__ import annotations

import csv
import json
import re
import shutil

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def test_demo_runs_the_chain(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    proc = run_cli(
        "demo",
        "--set",
        "data.image_size=[32,32]",
        "--set",
        "train.epochs=2",
        "--set",
        "model.base_filters=4",
        "--set",
        "model.depth=2",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    run_dir = tmp_path / re.search(r"run folder:\s+(\S+)", out).group(1)
    export_dir = tmp_path / re.search(r"SavedModel:\s+(\S+)", out).group(1)
    dice = float(re.search(r"test patients: Dice ([0-9.]+)", out).group(1))

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert abs(metrics["test"]["dice"] - dice) < 5e-4
    assert (export_dir / "saved_model" / "saved_model.pb").is_file()
    assert json.loads((export_dir / "medseg.json").read_text())["run"] == run_dir.name

    rows = list(
        csv.DictReader((run_dir / "predictions" / "predictions.csv").read_text().splitlines())
    )
    ids = {r["case_id"] for r in rows}
    assert {"MR_small", "CT_small"} <= ids  # real DICOM scans shipped inside pydicom
    assert len(ids) == 6 and all(r["status"] == "ok" for r in rows)
    for case in ("MR_small", "CT_small"):
        assert (run_dir / "predictions" / case / "mask.png").is_file()
    # The synthetic set is generated once and reused by a second demo.
    again = run_cli(
        "demo",
        "--set",
        "data.image_size=[32,32]",
        "--set",
        "train.epochs=1",
        "--set",
        "train.warmup_epochs=0",
        "--set",
        "model.base_filters=4",
        "--set",
        "model.depth=2",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    assert "synthetic data: reusing" in again.stderr
    assert len(list((tmp_path / "runs").iterdir())) == 2  # a new run, the first one kept
