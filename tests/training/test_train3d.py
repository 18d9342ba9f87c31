"""3D segmentation end to end on synthetic phantoms: train, cross-validate, export, predict, CLI.

The volumes (:mod:`medseg.data.synthetic3d`) have two touching structures, anisotropic voxels
(2 x 1 x 1.5 mm) and oblique grids, in the MSD layout with a ``dataset.json``. The models are tiny
(4 base filters, depth 2) and train for a few batches: these tests check the chain and its files,
not accuracy (the recipe's accuracy is measured on the real data, see docs/results.md).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medseg.config import load_config
from medseg.data.synthetic3d import (
    lps_affine,
    phantom3d,
    write_dicom_series,
    write_msd_dataset,
    write_nifti_volume,
)
from medseg.errors import ConfigError
from tests.conftest import REPO, as_cli_sets, run_cli

pytestmark = pytest.mark.slow

#: A tiny 3D U-Net trained for a few batches (the chain, not accuracy).
TINY_3D = [
    "model.base_filters=4",
    "model.depth=2",
    "model.max_filters=16",
    "train.epochs=2",
    "train.warmup_epochs=0",
    "volume.batches_per_epoch=2",
    "volume.sw_batch=2",
]
SHAPE, SPACING = (20, 24, 16), (2.0, 1.0, 1.5)


@pytest.fixture(scope="module")
def msd(tmp_path_factory) -> Path:
    return write_msd_dataset(
        tmp_path_factory.mktemp("msd") / "phantoms", n_cases=6, shape=SHAPE, spacing=SPACING
    )


def _config(msd: Path, root: Path, name: str, *extra: str):
    sets = [f"data.root={msd}", f"run.root={root}", f"run.name={name}", *TINY_3D, *extra]
    return load_config(REPO / "configs" / "demo3d.yaml", sets)


@pytest.fixture(scope="module")
def run3d(msd, tmp_path_factory):
    from medseg.training.train import train

    return train(_config(msd, tmp_path_factory.mktemp("runs"), "tiny3d"))


def test_train_writes_a_3d_run(run3d):
    run = run3d.run
    for name in ("plan.json", "fingerprint.json", "splits.json", "cases_val.csv", "metrics.json"):
        assert (run.path / name).is_file(), name
    assert run.best_model.is_file() and run.last_model.is_file()
    plan = json.loads(run.plan_path.read_text())
    assert plan["target_spacing"] == list(SPACING)  # the fingerprint's median spacing
    assert all(p % 4 == 0 for p in plan["patch_size"])  # divisible by 2**depth
    history = (run.logs / "history.csv").read_text().splitlines()[0]
    assert "val_dice_anterior" in history and "val_dice_posterior" in history
    metrics = json.loads(run.metrics_path.read_text())
    assert set(metrics["val"]["structures"]) == {"anterior", "posterior"}
    assert metrics["val"]["unit"] == "mm"
    rows = list(csv.DictReader(run.path.joinpath("cases_val.csv").open()))
    splits = json.loads(run.splits_path.read_text())["splits"]
    # every validation case, both structures, with and without post-processing
    assert len(rows) == len(splits["val"]) * 2 * 2
    assert {r["id"] for r in rows} == set(splits["val"])
    assert not set(splits["val"]) & set(splits["train"])


def test_unet3d_config_errors_name_the_key(msd, tmp_path):
    from medseg.training.train import train

    with pytest.raises(ConfigError, match="data.test_fraction"):
        train(_config(msd, tmp_path, "t", "data.test_fraction=0.2"))
    with pytest.raises(ConfigError, match="train.patch_size"):
        _config(msd, tmp_path, "t", "train.patch_size=[18,20,20]")  # 18: not divisible by 4


def _heldout(folder: Path) -> tuple[Path, Path, Path]:
    """One unseen phantom as NIfTI, as a DICOM series of the same oblique axial geometry, and as
    a DICOM series stored sagittally (slices along the patient's left-right axis, as the
    hippocampus DICOM crops are). Its intensities are whole numbers in int16 range, so all three
    files hold exactly the same values at the same places in space."""
    image, _ = phantom3d(SHAPE, seed=1000)
    image = np.round(image[..., 0] * 1000).astype(np.float32)
    affine = lps_affine(SHAPE, SPACING, angles_deg=(0.0, 0.0, 6.0))
    nifti = write_nifti_volume(folder / "heldout.nii.gz", image, affine)
    series = folder / "heldout_dicom"
    write_dicom_series(series, image, SPACING, affine, seed=3)
    sagittal = folder / "heldout_sagittal"
    # the same voxels, array axes (col, row, slice): the affine's columns swap the same way
    write_dicom_series(
        sagittal, image.transpose(2, 1, 0), SPACING[::-1], affine[:, [2, 1, 0, 3]], seed=4
    )
    return nifti, series, sagittal


def test_export_and_predict_nifti_and_dicom_give_the_same_labels(run3d, tmp_path):
    import highdicom as hd

    from medseg.inference.export import export_run
    from medseg.inference.predict import predict
    from medseg.io import read_image

    export = export_run(run3d.run.path, tmp_path / "export")
    card = json.loads((export / "medseg.json").read_text())
    assert card["dims"] == 3 and card["verification"]["max_abs_diff"] <= 1e-4
    nifti, series, sagittal = _heldout(tmp_path)
    result = predict(export, [nifti, series, sagittal], tmp_path / "out")
    assert result.n_failed == 0, result.rows
    by_source = {Path(r["source"]).name: r for r in result.rows}
    vol, ser = by_source[nifti.name], by_source[series.name]
    sag = by_source[sagittal.name]
    assert sag["shape"] == "x".join(map(str, SHAPE[::-1]))  # written in its own axis order
    # the masks, read back (in the standard orientation), are the same voxels in space: the
    # sagittal series was turned into the model's orientation before it was predicted
    a = read_image(tmp_path / "out" / vol["mask"]).array
    b = read_image(tmp_path / "out" / ser["mask"]).array
    c = read_image(tmp_path / "out" / sag["mask"]).array
    assert a.shape == b.shape == c.shape == (*SHAPE, 1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    for name in ("anterior", "posterior"):
        assert vol[f"volume_ml_{name}"] == ser[f"volume_ml_{name}"] == sag[f"volume_ml_{name}"]
    seg = hd.seg.segread(tmp_path / "out" / ser["seg"])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["anterior", "posterior"]
    table = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert {"volume_ml_anterior", "volume_ml_posterior"} <= set(table[0])


def test_predict_refuses_2d_only_options_for_a_3d_model(run3d, tmp_path):
    from medseg.inference.predict import predict

    nifti, _, _ = _heldout(tmp_path)
    with pytest.raises(ConfigError, match="--mc-samples"):
        predict(run3d.run.path, [nifti], tmp_path / "out", mc_samples=4)


def test_cv_reports_structures_out_of_fold(msd, tmp_path):
    # NSD at 2 mm instead of the default 1 mm, from training's scoring through tune's
    cfg = as_cli_sets([f"data.root={msd}", *TINY_3D, "cv.folds=2", "evaluation.nsd_tolerance_mm=2"])
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "demo3d.yaml"
    config.write_text((REPO / "configs" / "demo3d.yaml").read_text())
    proc = run_cli("cv", "--config", str(config), "--name", "cv3d", *cfg, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "runs" / "cv3d"
    summary = json.loads((root / "cv_summary.json").read_text())
    assert summary["kind"] == "volumetric" and summary["folds"] == [1, 2]
    assert summary["none"]["n_cases"] == 6  # every case scored once, out of fold
    assert set(summary["chosen"]["structures"]) == {"anterior", "posterior"}
    assert set(summary["postprocess_by_fold"].values()) <= {"none", "largest"}
    assert "out of fold" in (root / "report.md").read_text()
    tuned = run_cli("tune", str(root), cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr
    assert "chosen on the other folds" in tuned.stdout and "mirror+largest" in tuned.stdout
    tune = json.loads((root / "tune" / "tune.json").read_text())
    assert set(tune["variants"]) == {"none", "largest", "mirror", "mirror+largest"}
    assert set(tune["chosen_by_fold"]) == {"1", "2"}
    for name in ("oof.csv", "oof_mirror.csv"):
        header = (root / "fold_1" / name).read_text().splitlines()[0].split(",")
        assert "nsd_2mm" in header and "nsd_1mm" not in header, name
    # a finished CV is not trained again
    again = run_cli("cv", "--config", str(config), "--name", "cv3d", *cfg, cwd=tmp_path)
    assert again.returncode == 0 and "already finished" in again.stderr
    _check_oof_round_trip(root, msd, tmp_path, summary)


def _check_oof_round_trip(root: Path, msd: Path, tmp_path: Path, summary: dict) -> None:
    """``evaluate CV --export-oof D``, then ``evaluate --pred D/pred --truth D/truth``: the CV
    report's per-structure means (no post-processing), in the source images' geometry."""
    import nibabel as nib

    from medseg.data.scan_msd import describe

    export = tmp_path / "oof_maps"
    proc = run_cli("evaluate", str(root), "--export-oof", str(export), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((export / "oof.json").read_text())["cases_per_fold"] == {"1": 3, "2": 3}
    for case in describe(msd).cases:  # each case once, in its source image's geometry
        source = nib.load(case.images[0]).affine
        for side in ("pred", "truth"):
            written = nib.load(export / side / f"{case.case_id}.nii.gz").affine
            np.testing.assert_allclose(written, source, atol=1e-6)
    scores = tmp_path / "oof_scores"
    args = ("--pred", str(export / "pred"), "--truth", str(export / "truth"), "--out", str(scores))
    proc = run_cli("evaluate", *args, "--tolerance-mm", "2", "--n-boot", "50", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = json.loads((scores / "metrics.json").read_text())
    scored = written["summary"]
    assert scored["n_cases"] == summary["none"]["n_cases"] == 6
    assert written["labels_from"] == str(export / "dataset.json")  # the structures' names
    for name, entry in summary["none"]["structures"].items():
        mine = scored["structures"][name]
        assert abs(mine["dice"]["mean"] - entry["dice"]["mean"]) < 1e-6, name
        for metric in ("hd95_mm", "assd_mm", "nsd_2mm"):
            if entry[metric]["mean"] is not None:
                assert abs(mine[metric]["mean"] - entry[metric]["mean"]) < 1e-6, (name, metric)
    again = run_cli("evaluate", str(root), "--export-oof", str(export), cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    # refused with one line: a folder that is not a CV, an unfinished CV, a classification CV
    fake = tmp_path / "fake_cv"
    fake.mkdir()
    (fake / "splits.json").write_text((root / "splits.json").read_text())
    (fake / "config.yaml").write_text((root / "config.yaml").read_text())
    for folder, message in ((msd, "not a cross-validation folder"), (fake, "fold(s) 1, 2 of 2")):
        bad = run_cli("evaluate", str(folder), "--export-oof", str(tmp_path / "x"), cwd=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    config = "data:\n  task: classification\n  layout: class_folders\n"
    (fake / "config.yaml").write_text(config + "model:\n  name: mobilenetv2_classifier\n")
    bad = run_cli("evaluate", str(fake), "--export-oof", str(tmp_path / "x"), cwd=tmp_path)
    assert bad.returncode == 2 and "classification CV has no label maps" in bad.stderr, bad.stderr


def test_evaluate_cli_scores_a_3d_run_and_a_labelled_folder(run3d, msd, tmp_path):
    run = run3d.run.path
    proc = run_cli("evaluate", str(run), "--split", "val", "--n-boot", "50", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "HD95 mm" in proc.stdout and "anterior" in proc.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val", "val_largest"} <= set(metrics)
    out = tmp_path / "scores"
    args = ("evaluate", str(run), "--data", str(msd), "--out", str(out), "--n-boot", "50")
    proc = run_cli(*args, "--tolerance-mm", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    scored = json.loads((out / "metrics.json").read_text())
    assert scored[f"folder:{msd.name}"]["n_cases"] == 6
    rows = list(csv.DictReader((out / f"cases_folder_{msd.name}.csv").open()))
    assert {r["postprocess"] for r in rows} == {"none", "largest"}
    assert "nsd_2mm" in rows[0] and "nsd_1mm" not in rows[0]  # --tolerance-mm 2
    bad = run_cli(
        "evaluate", str(run), "--data", str(msd), "--out", str(out), "--tta", cwd=tmp_path
    )
    assert bad.returncode == 2 and "--tta" in bad.stderr
