"""`medseg demo` runs the whole chain and reports where everything went (shrunk to seconds)."""

from __future__ import annotations

import csv
import json
import re
import shutil

import pytest

from tests.conftest import REPO, as_cli_sets, run_cli

pytestmark = pytest.mark.slow

#: The demo, shrunk to under two minutes on 2 CPU cores but still learning: 48x48 slices, a U-Net
#: of 8 base filters and depth 3, 4 epochs at a 3x learning rate without warm-up. It reached
#: pooled test Dice 0.80 in a trial run (0.76 with 3 epochs; the full demo: about 0.88), while
#: the earlier 32x32 / 4 filters / depth 2 / 2 epochs learnt nothing (Dice 0.000) and passed.
SHRUNK_DEMO = [
    "data.image_size=[48,48]",
    "model.base_filters=8",
    "model.depth=3",
    "train.epochs=4",
    "train.warmup_epochs=0",
    "train.learning_rate=0.003",
]

#: Pooled Dice on the held-out test patients that the shrunk demo must reach. A model that
#: learns nothing scores 0 (all background) or about twice the tumour fraction (all foreground:
#: tumour is 0.4% of the synthetic pixels, so under 0.01); 0.6 is far above both and leaves
#: about 0.2 of margin under the trial run.
DICE_FLOOR = 0.6

#: The 3D leg, shrunk: 3 epochs of 10 batches (the full leg: 6 x 20, about 1.7 min).
SHRUNK_3D = ["train.epochs=3", "volume.batches_per_epoch=10"]


def test_demo_runs_the_chain(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    sets_3d = [a for o in SHRUNK_3D for a in ("--set-3d", o)]
    proc = run_cli("demo", *as_cli_sets(SHRUNK_DEMO), *sets_3d, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    run_dir = tmp_path / re.search(r"run folder:\s+(\S+)", out).group(1)
    export_dir = tmp_path / re.search(r"SavedModel:\s+(\S+)", out).group(1)
    dice = float(re.search(r"test patients: Dice ([0-9.]+)", out).group(1))
    assert dice >= DICE_FLOOR, f"the demo did not learn: test Dice {dice} < {DICE_FLOOR}\n{out}"

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
    _check_3d_leg(tmp_path, out)
    # The synthetic set is generated once and reused by a second demo.
    again = run_cli(
        "demo",
        "--skip-3d",
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
    # a new 2D run, the first one and the 3D run kept
    assert len(list((tmp_path / "runs").iterdir())) == 3


def _check_3d_leg(tmp_path, out: str) -> None:
    """The 3D leg trained, exported and predicted the NIfTI volume and the DICOM series."""
    import highdicom as hd

    run_dir = tmp_path / re.search(r"3D run folder:\s+(\S+)", out).group(1)
    export_dir = tmp_path / re.search(r"3D SavedModel:\s+(\S+)", out).group(1)
    assert json.loads((export_dir / "medseg.json").read_text())["dims"] == 3
    assert (run_dir / "plan.json").is_file()
    rows = list(
        csv.DictReader((run_dir / "predictions" / "predictions.csv").read_text().splitlines())
    )
    assert {r["input_type"] for r in rows} == {"volume", "dicom_series"}
    assert all(r["status"] == "ok" for r in rows)
    series = next(r for r in rows if r["input_type"] == "dicom_series")
    seg = hd.seg.segread(run_dir / "predictions" / series["seg"])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["anterior", "posterior"]
    volume = next(r for r in rows if r["input_type"] == "volume")
    # the same phantom as NIfTI and as DICOM: the same structures, the same size (+-5%)
    for name in ("anterior", "posterior"):
        a, b = float(volume[f"volume_ml_{name}"]), float(series[f"volume_ml_{name}"])
        assert a > 0 and abs(a - b) <= 0.05 * a, (name, a, b)
