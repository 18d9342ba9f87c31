"""``medseg tune`` (out-of-fold ablation and post-processing chosen on the other folds) and
``medseg evaluate MODEL --data FOLDER --out DIR`` (exports, CV ensembles and runs scored on any
labelled folder).

The tests that train or run the CLI are ``slow``; they share the module's CV runs (a fold of the
classifier's CV is also the classifier run of the ``evaluate`` tests), tuning and export
(fixtures), and the session's hub module (tests/conftest.py)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.config import load_config
from medseg.data.split import load_manifest, write_manifest
from medseg.evaluation.scoring import evaluate_model
from medseg.evaluation.tune import (
    THRESHOLDS,
    FoldProbs,
    Setting,
    _grid,
    _PatientTable,
    choose_setting,
    fold_probabilities,
    patient_volumes,
)
from medseg.inference.export import export_run
from medseg.inference.postprocess import postprocess
from medseg.models.metrics import confusion_counts, dice_from_counts
from medseg.training.cv import run_cv
from tests.conftest import REPO, TINY_UNET, run_cli


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


def _seg_cv(work, tiny_synth, name: str, *overrides: str):
    """A 3-fold CV of the tiny U-Net (1 epoch per fold) on the synthetic patients."""
    cfg = load_config(
        None,
        [
            *TINY_UNET,
            "train.epochs=1",
            "cv.folds=3",
            f"data.root={tiny_synth / 'segmentation'}",
            f"run.root={work / 'runs'}",
            f"run.name={name}",
            *overrides,
        ],
    )
    return run_cv(cfg).path


@pytest.fixture(scope="module")
def seg_cv(work, tiny_synth):
    """A 3-fold CV of the tiny U-Net (1 epoch per fold) on the synthetic patients."""
    return _seg_cv(work, tiny_synth, "segcv")


@pytest.fixture(scope="module")
def seg_tuned(seg_cv) -> tuple:
    """``medseg tune`` of ``seg_cv`` (50 bootstrap resamples): the finished command and the
    tune.json it wrote, as written."""
    proc = run_cli("tune", str(seg_cv), "--n-boot", "50", cwd=seg_cv.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, (seg_cv / "tune" / "tune.json").read_text()


@pytest.fixture(scope="module")
def seg_export(seg_cv, work) -> Path:
    """``seg_cv``'s fold models exported as one ensemble (their last checkpoints)."""
    return export_run(seg_cv, work / "exports" / "segcv", checkpoint="last")


@pytest.fixture(scope="module")
def cls_cv(work, tiny_synth, tiny_hub_module):
    """A 2-fold CV of the recipe's classifier on the session's hub module, tiny (32x32, 1 epoch)."""
    cfg = load_config(
        REPO / "configs" / "brain-tumor-mobilenetv2.yaml",
        [
            *TINY_UNET,
            "train.epochs=1",
            "train.batch_size=4",
            f"model.hub_handle={tiny_hub_module}",
            f"data.root={tiny_synth / 'classification'}",
            f"run.root={work / 'runs'}",
            "cv.folds=2",
            "run.name=clscv",
        ],
    )
    return run_cv(cfg).path


@pytest.fixture(scope="module")
def cls_run(cls_cv) -> Path:
    """Fold 1 of ``cls_cv``: an ordinary run folder of the tiny classifier, trained once for both
    the CV and the ``evaluate`` tests."""
    return cls_cv / "fold_1"


# --------------------------------------------------------------------------------------------
# Post-processing arithmetic


def test_patient_table_counts_equal_postprocessed_masks():
    rng = np.random.default_rng(0)
    probs = rng.uniform(0, 1, (12, 20, 20, 1)).astype(np.float32)
    probs[3:7, 5:12, 5:12, 0] += 0.5  # one blob across slices
    truth = np.zeros((12, 20, 20), np.uint8)
    truth[3:7, 6:12, 6:11] = 1
    ids = [f"p/p_{i + 1}.tif" for i in range(12)]
    volumes = patient_volumes(["p"] * 12, ids)
    table = _PatientTable(probs, truth, volumes)
    for s in _grid(("threshold", "min_lesion", "largest_component"), table.thresholds):
        mask = postprocess(
            (probs[..., 0] > s.threshold).astype(np.uint8),
            min_size_voxels=s.min_lesion_voxels,
            largest_component=s.largest_component,
        )
        assert table.counts("p", s) == confusion_counts(mask > 0, truth > 0), s


def test_patient_volumes_order_slices_naturally():
    ids = ["a/a_10.tif", "a/a_2.tif", "b/b_1.tif", "a/a_1.tif"]
    assert patient_volumes(["a", "a", "b", "a"], ids) == {"a": [3, 1, 0], "b": [2]}


def test_choose_setting_keeps_the_default_on_a_tie():
    truth = np.zeros((2, 8, 8), np.uint8)
    truth[:, 2:5, 2:5] = 1
    probs = (truth[..., None] * 0.95 + 0.01).astype(np.float32)  # every threshold is perfect
    table = _PatientTable(probs, truth, {"p": [0, 1]})
    grid = _grid(("threshold", "min_lesion", "largest_component"), table.thresholds)
    assert choose_setting([table], grid) == Setting()


def test_choose_setting_reaches_low_thresholds_for_an_under_confident_model():
    # tumour at 0.15, one scattered false alarm at 0.12: only a threshold below 0.12 finds the
    # tumour, and the largest component then removes the false alarm
    truth = np.zeros((3, 10, 10), np.uint8)
    truth[:, 2:6, 2:6] = 1
    probs = np.where(truth[..., None] > 0, 0.15, 0.01).astype(np.float32)
    probs[1, 8, 8, 0] = 0.12
    table = _PatientTable(probs, truth, {"p": [0, 1, 2]})
    grid = _grid(("threshold", "min_lesion", "largest_component"), table.thresholds)
    chosen = choose_setting([table], grid)
    assert chosen.threshold < 0.12 and (chosen.largest_component or chosen.min_lesion_voxels > 1)
    assert table.counts("p", chosen) == (48, 0, 0)


class _FixedModel:
    """Stands in for a Keras model: ``predict`` returns the given probabilities."""

    def __init__(self, probs: np.ndarray):
        self.probs = probs

    def predict(self, images, batch_size=None, verbose=0):
        return self.probs


def test_groups_csv_scores_each_patient_as_one_volume(tmp_path):
    # two patients of 4 slices, given out of slice order; the prediction is the truth shifted by
    # a few pixels in different slices, so the stacked volume's HD95 is not any slice's
    from medseg.artifacts.runs import RunDir
    from medseg.data.pipeline import ArrayData
    from medseg.data.samples import Sample
    from medseg.evaluation import surface
    from medseg.evaluation.evaluate import evaluate_arrays

    truth = np.zeros((8, 24, 24), np.uint8)
    truth[1:4, 6:14, 6:14] = 1
    truth[4:7, 8:18, 5:12] = 1
    pred = truth.copy()
    pred[1] = np.roll(truth[1], 3, axis=1)
    pred[5] = np.roll(truth[5], -4, axis=0)
    pred[6, 2:4, 2:4] = 1  # a false alarm away from the lesion
    slices = [("a", i) for i in range(4)] + [("b", i) for i in range(4)]
    samples = [Sample(f"{g}/{g}_{i + 1}.tif", "", "", g) for g, i in slices]
    order = [3, 0, 2, 1, 7, 5, 4, 6]
    data = ArrayData(
        images=np.zeros((8, 24, 24, 1), np.float32)[order],
        targets=truth[order],
        samples=[samples[i] for i in order],
    )
    cfg = load_config(None, ["evaluation.nsd_tolerance_mm=2"])
    probs = pred[order][..., None].astype(np.float32)
    result = evaluate_arrays(RunDir(tmp_path), cfg, _FixedModel(probs), data, split="val")
    rows = {r["group"]: r for r in _rows(tmp_path / "groups_val.csv")}
    assert sorted(rows) == ["a", "b"] and "hd95" not in _rows(tmp_path / "cases_val.csv")[0]
    hd95s = []
    for g, part in (("a", slice(0, 4)), ("b", slice(4, 8))):
        want = surface.mask_metrics(pred[part], truth[part], None, 2.0)
        assert float(rows[g]["hd95_px"]) == pytest.approx(surface.hd95(pred[part], truth[part]))
        assert float(rows[g]["assd_px"]) == pytest.approx(want["assd"])
        assert float(rows[g]["nsd_2px"]) == pytest.approx(want["nsd"])
        assert float(rows[g]["dice"]) == pytest.approx(want["dice"])
        assert rows[g]["unit"] == "px" and rows[g]["empty"] == "" and rows[g]["slices"] == "4"
        hd95s.append(want["hd95"])
    assert result["hd95_per_group_mean"] == pytest.approx(np.mean(hd95s))
    assert result["surface_unit"] == "px" and result["nsd_tolerance"] == 2.0
    assert "hd95_per_image_mean" not in result
    assert "larger of the two directed" in result["surface"]["labels"]["hd95_per_group_mean"]


# --------------------------------------------------------------------------------------------
# medseg tune


@pytest.mark.slow
def test_cv_scores_the_last_checkpoint(seg_cv):
    ensemble = json.loads((seg_cv / "ensemble.json").read_text())
    assert all(f["model"].endswith("last.keras") for f in ensemble["folds"])
    for k in (1, 2, 3):
        metrics = json.loads((seg_cv / f"fold_{k}" / "metrics.json").read_text())
        assert metrics["val"]["checkpoint"] == "last"
    # HD95 per patient volume: the summary's mean is that of the folds' oof_groups.csv values
    summary = json.loads((seg_cv / "cv_summary.json").read_text())
    groups = [r for k in (1, 2, 3) for r in _rows(seg_cv / f"fold_{k}" / "oof_groups.csv")]
    assert len(groups) == summary["n_groups"] and summary["surface"]["unit"] == "px"
    values = [float(r["hd95_px"]) for r in groups if np.isfinite(float(r["hd95_px"]))]
    pooled = summary["metrics"]["hd95_per_group_mean"]["pooled"]
    assert pooled == (pytest.approx(np.mean(values)) if values else None)
    assert summary["surface"]["hd95_missing"] == len(groups) - len(values)


@pytest.mark.slow
def test_export_oof_of_a_2d_cv_round_trips_through_pred_and_truth(seg_cv, work):
    """Each patient's out-of-fold slices as one NIfTI volume; scored as any tool's predictions
    they give back the CV report's per-patient Dice and its per-patient HD95."""
    out = work / "oof2d"
    proc = run_cli("evaluate", str(seg_cv), "--export-oof", str(out), cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = json.loads((out / "oof.json").read_text())
    summary = json.loads((seg_cv / "cv_summary.json").read_text())
    names = [n for ids in exported["folds"].values() for n in ids]
    assert len(names) == exported["n_cases"] == summary["n_groups"] == 6
    assert all(n.startswith("patient_") for n in names)  # no patient identifier in file names
    import nibabel as nib

    oof = [r for k in (1, 2, 3) for r in _rows(seg_cv / f"fold_{k}" / "oof.csv")]
    for side, column in (("truth", "true_pixels"), ("pred", "pred_pixels")):
        voxels = sum(
            int((nib.load(out / side / f"{n}.nii.gz").get_fdata() > 0).sum()) for n in names
        )
        assert voxels == sum(int(r[column]) for r in oof), side  # the pixels the CV counted
    scores = work / "oof2d_scores"
    args = ["--pred", str(out / "pred"), "--truth", str(out / "truth"), "--out", str(scores)]
    proc = run_cli("evaluate", *args, "--n-boot", "0", cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scored = json.loads((scores / "metrics.json").read_text())["summary"]["structures"]
    mine = scored["foreground"]
    dice = summary["metrics"]["dice_per_group_mean"]["pooled"]
    assert mine["dice"]["mean"] == pytest.approx(dice, abs=1e-6)
    hd95 = summary["metrics"]["hd95_per_group_mean"]["pooled"]  # px, or None when all missing
    assert mine["hd95_mm"]["mean"] == (None if hd95 is None else pytest.approx(hd95, abs=1e-6))


@pytest.mark.slow
def test_tune_cli_scores_every_variant_out_of_fold(seg_cv, seg_tuned):
    proc, written = seg_tuned
    assert "| last_tta_postprocess |" in proc.stdout and "recommended" in proc.stdout
    result = json.loads(written)
    names = [v["name"] for v in result["variants"]]
    assert names == [
        "best",
        "last",
        "last_tta",
        "last_threshold",
        "last_min_lesion",
        "last_largest_component",
        "last_tta_postprocess",
    ]
    assert result["best_variant"] != "best"  # never the optimistic one
    all_ids = sorted(r["id"] for k in (1, 2, 3) for r in _rows(seg_cv / f"fold_{k}" / "oof.csv"))
    for v in result["variants"]:
        rows = [r for k in (1, 2, 3) for r in _rows(seg_cv / v["folder"] / f"fold_{k}" / "oof.csv")]
        assert sorted(r["id"] for r in rows) == all_ids  # every sample exactly once
        lo, hi = v["metrics"]["dice_per_group_mean"]["ci95"]
        assert lo <= v["metrics"]["dice_per_group_mean"]["value"] <= hi
        for k in (1, 2, 3):  # each variant's post-processed patient volumes
            assert "hd95_px" in _rows(seg_cv / v["folder"] / f"fold_{k}" / "oof_groups.csv")[0]
    # "last" at threshold 0.5 is what medseg cv itself scored: the same counts per slice
    for k in (1, 2, 3):
        ours = {r["id"]: r for r in _rows(seg_cv / "tune" / "last" / f"fold_{k}" / "oof.csv")}
        for r in _rows(seg_cv / f"fold_{k}" / "oof.csv"):
            assert [ours[r["id"]][c] for c in ("tp", "fp", "fn")] == [r["tp"], r["fp"], r["fn"]]
    assert (seg_cv / "tune" / "ablation.md").read_text().startswith("| variant |")
    assert (seg_cv / "tune" / result["best_variant"] / "report.md").is_file()


@pytest.mark.slow
def test_tune_chooses_post_processing_on_the_other_folds_only(seg_cv, seg_tuned):
    result = json.loads(seg_tuned[1])
    joint = next(v for v in result["variants"] if v["name"] == "last_tta_postprocess")
    from medseg.artifacts.runs import open_run
    from medseg.data.scan import scan_from_config

    cfg = open_run(seg_cv).config()
    manifest = load_manifest(seg_cv / "splits.json")
    samples = scan_from_config(cfg.data).samples
    folds = {k: fold_probabilities(seg_cv, k, cfg, manifest, samples) for k in (1, 2, 3)}

    def mean_dice(fps: list[FoldProbs], s: Setting) -> float:
        # brute force: post-process every patient volume and pool its counts
        scores = []
        for fp in fps:
            p = fp.probs["last_tta"][..., 0].astype(np.float32)
            for idx in patient_volumes(fp.groups, fp.ids).values():
                vol = postprocess(
                    (p[idx] > s.threshold).astype(np.uint8),
                    min_size_voxels=s.min_lesion_voxels,
                    largest_component=s.largest_component,
                )
                scores.append(dice_from_counts(*confusion_counts(vol > 0, fp.truth[idx] > 0)))
        return float(np.mean(scores))

    grid = _grid(("threshold", "min_lesion", "largest_component"), THRESHOLDS)
    for k in (1, 2, 3):
        others = [folds[j] for j in (1, 2, 3) if j != k]
        chosen = Setting(**joint["settings_per_fold"][str(k)])
        best = max(mean_dice(others, s) for s in grid)
        assert mean_dice(others, chosen) == pytest.approx(best, abs=1e-9)


@pytest.mark.slow
def test_tune_classifier_variants(cls_cv):
    from medseg.evaluation.tune import tune

    result = tune(cls_cv, n_boot=50)
    assert [v["name"] for v in result["variants"]] == ["best", "last", "last_tta"]
    assert result["recommended"] is None
    for v in result["variants"]:
        rows = [r for k in (1, 2) for r in _rows(cls_cv / v["folder"] / f"fold_{k}" / "oof.csv")]
        acc = np.mean([r["target"] == r["pred"] for r in rows])
        assert v["metrics"]["accuracy"]["value"] == pytest.approx(acc)
    # the last checkpoint's rows are what medseg cv wrote (same predictions)
    ours = {r["id"]: r["pred"] for r in _rows(cls_cv / "tune" / "last" / "fold_1" / "oof.csv")}
    assert {r["id"]: r["pred"] for r in _rows(cls_cv / "fold_1" / "oof.csv")} == ours
    assert (cls_cv / "tune" / result["best_variant"] / "plots").is_dir()


@pytest.mark.slow
def test_tune_refuses_an_unfinished_cv(work):
    proc = run_cli("tune", str(work / "nowhere"), cwd=work)
    assert proc.returncode == 2 and "not a finished cross-validation run" in proc.stderr


@pytest.fixture(scope="module")
def seg_cv_other(work, tiny_synth):
    """Another recipe (wider U-Net, flips) on the same 3 folds as ``seg_cv``."""
    flips = ("augment.enabled=true", "augment.hflip=0.5")
    return _seg_cv(work, tiny_synth, "segcv_other", "model.base_filters=6", *flips)


@pytest.mark.slow
def test_tune_with_another_run_scores_the_mean_of_both_runs_fold_models(
    seg_cv, seg_cv_other, seg_tuned
):
    from medseg.evaluation.tune import tune

    tune(seg_cv_other, n_boot=0)  # its own probabilities, cached in its tune/probs
    own = seg_tuned[1]
    assert (seg_cv / "tune" / "tune.json").read_text() == own
    proc = run_cli(
        "tune", str(seg_cv), "--with", str(seg_cv_other), "--n-boot", "0", cwd=seg_cv.parent
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ens = seg_cv / "tune-with-segcv_other"  # named by its partner
    assert f"written: {ens / 'tune.json'}" in proc.stdout
    # how to serve it: each run exported, predicted together
    for run in (seg_cv, seg_cv_other):
        assert f"medseg export {run} --checkpoint last" in proc.stdout
    assert "medseg predict --model models/segcv --with models/segcv_other" in proc.stdout
    written = (ens / "tune.json").read_text()
    result = json.loads(written)
    assert result["ensemble_with"] == [str(seg_cv_other)]
    assert result["folder"] == "tune-with-segcv_other"
    assert (seg_cv / "tune" / "tune.json").read_text() == own  # the run's own tuning: as it was
    from medseg.evaluation.tune import _mean_over_runs, all_fold_probabilities

    _, manifest, folds = all_fold_probabilities(seg_cv)
    mean = _mean_over_runs(seg_cv, manifest, folds, [seg_cv_other])
    assert manifest == load_manifest(seg_cv_other / "splits.json")
    for k in (1, 2, 3):
        a = np.load(seg_cv / "tune" / "probs" / f"fold_{k}.npz")
        b = np.load(seg_cv_other / "tune" / "probs" / f"fold_{k}.npz")
        assert list(a["ids"]) == list(b["ids"]) == mean[k].ids
        for view in ("best", "last", "last_tta"):
            pa, pb = a[f"p_{view}"].astype(np.float32), b[f"p_{view}"].astype(np.float32)
            assert np.abs(pa - pb).max() > 1e-3  # two different models: not a vacuous mean
            np.testing.assert_allclose(
                mean[k].probs[view].astype(np.float32), (pa + pb) / 2, atol=1e-3
            )
        # the ensemble's rows are its mean probabilities thresholded at 0.5
        fg = mean[k].probs["last"].astype(np.float32)[..., 0] > 0.5
        rows = _rows(ens / "last" / f"fold_{k}" / "oof.csv")
        assert [int(r["pred_pixels"]) for r in rows] == [int(f.sum()) for f in fg]
    # the mean of a run with itself is the run
    alone = tune(seg_cv, n_boot=0)
    with_itself = tune(seg_cv, n_boot=0, ensemble_with=[seg_cv])
    for v, w in zip(alone["variants"], with_itself["variants"], strict=True):
        assert v["metrics"] == w["metrics"]
    # ... and scoring it with another partner left the first ensemble's results as they were
    assert with_itself["folder"] == "tune-with-segcv"
    assert (ens / "tune.json").read_text() == written


@pytest.fixture(scope="module")
def seg_cv_other_folds(seg_cv, work) -> Path:
    """``seg_cv`` copied, with its folds renumbered in splits.json (fold k holds what was fold
    k + 1): a finished CV run of the same task and data whose fold k saw other patients."""
    other = work / "runs" / "segcv_other_folds"
    shutil.copytree(seg_cv, other)
    manifest = load_manifest(other / "splits.json")
    for key in ("folds", "fold_groups"):
        manifest[key] = manifest[key][1:] + manifest[key][:1]
    write_manifest(other / "splits.json", manifest)
    return other


@pytest.mark.slow
def test_tune_with_a_run_on_other_folds_is_refused(seg_cv, seg_cv_other_folds):
    other = seg_cv_other_folds
    proc = run_cli("tune", str(seg_cv), "--with", str(other), "--n-boot", "0", cwd=seg_cv.parent)
    assert proc.returncode != 0 and str(other) in proc.stderr and "folds differ" in proc.stderr


# --------------------------------------------------------------------------------------------
# medseg evaluate MODEL --data FOLDER --out DIR


@pytest.mark.slow
def test_cv_ensemble_and_its_export_score_the_same_on_a_labelled_folder(
    seg_cv, seg_export, work, tiny_synth
):
    data = tiny_synth / "segmentation"
    direct = evaluate_model(seg_cv, data, work / "ev_cv", checkpoint="last", n_boot=100)
    served = evaluate_model(seg_export, data, work / "ev_export", n_boot=100)
    assert direct["dice"] == pytest.approx(served["dice"], abs=1e-3)
    assert direct["dice_per_group_mean"] == pytest.approx(served["dice_per_group_mean"], abs=1e-3)
    cases = _rows(work / "ev_export" / "cases.csv")
    groups = _rows(work / "ev_export" / "groups.csv")
    assert len(cases) == served["n_images"] == 36 and len(groups) == served["n_groups"] == 6
    for g in groups:  # each patient's Dice is its slices' counts pooled
        mine = [c for c in cases if c["group"] == g["group"]]
        tp, fp, fn = (sum(int(c[k]) for c in mine) for k in ("tp", "fp", "fn"))
        assert float(g["dice"]) == pytest.approx(dice_from_counts(tp, fp, fn), abs=1e-6)
    lo, hi = served["dice_per_group_mean_ci95"]
    assert lo <= served["dice_per_group_mean"] <= hi
    assert (work / "ev_export" / "plots" / "group_dice.png").is_file()
    assert {"hd95_px", "assd_px", "nsd_1px", "empty"} <= set(groups[0])
    assert served["surface"]["resolution"] == "the images' native resolution"
    # the native resolution of the folder's images, not the model's 32x32
    assert sum(int(c["true_pixels"]) for c in cases) > 0
    first = next(c for c in cases if int(c["true_pixels"]))
    assert int(first["tp"]) + int(first["fn"]) == int(first["true_pixels"])


@pytest.mark.slow
def test_largest_component_never_adds_foreground(seg_cv, work, tiny_synth):
    data = tiny_synth / "segmentation"
    plain = work / "ev_plain"
    lcc = work / "ev_lcc"
    evaluate_model(seg_cv, data, plain, checkpoint="last", threshold=0.3, n_boot=0)
    evaluate_model(
        seg_cv, data, lcc, checkpoint="last", threshold=0.3, largest_component=True, n_boot=0
    )
    before = {r["group"]: int(r["tp"]) + int(r["fp"]) for r in _rows(plain / "groups.csv")}
    after = {r["group"]: int(r["tp"]) + int(r["fp"]) for r in _rows(lcc / "groups.csv")}
    assert all(after[g] <= before[g] for g in before)


@pytest.mark.slow
def test_evaluate_cli_classifier_on_a_labelled_folder(cls_run, work, tiny_synth):
    data = tiny_synth / "classification"
    out = work / "ev_cls"
    proc = run_cli(
        "evaluate",
        str(cls_run),
        "--data",
        str(data),
        "--out",
        str(out),
        "--n-boot",
        "50",
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    cases = _rows(out / "cases.csv")
    assert metrics["n_images"] == len(cases) > 0
    acc = np.mean([r["target"] == r["pred"] for r in cases])
    assert metrics["accuracy"] == pytest.approx(acc)
    assert np.sum(metrics["confusion_matrix"]) == len(cases)
    for name in ("confusion.png", "roc.png", "reliability.png"):
        assert (out / "plots" / name).is_file()
    # the same folder again: refused, then replaced with --overwrite
    again = run_cli("evaluate", str(cls_run), "--data", str(data), "--out", str(out), cwd=work)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    # segmentation-only options are refused for a classifier
    bad = run_cli(
        "evaluate",
        str(cls_run),
        "--data",
        str(data),
        "--out",
        str(work / "x"),
        "--largest-component",
        cwd=work,
    )
    assert bad.returncode == 2 and "segmentation models only" in bad.stderr


@pytest.mark.slow
def test_evaluate_refuses_a_folder_with_other_classes(cls_run, work, tiny_synth):
    other = work / "other_classes"
    src = tiny_synth / "classification"
    shutil.copytree(src, other)
    name = sorted(p.name for p in (other / "Training").iterdir())[0]
    for split in ("Training", "Testing"):
        (other / split / name).rename(other / split / "zzz_unknown")
    proc = run_cli(
        "evaluate", str(cls_run), "--data", str(other), "--out", str(work / "y"), cwd=work
    )
    assert proc.returncode == 2
    assert str(other) in proc.stderr and "differ from the model's classes" in proc.stderr


@pytest.mark.slow
def test_evaluate_an_export_needs_data_and_out(seg_export, work):
    proc = run_cli("evaluate", str(seg_export), cwd=work)
    assert proc.returncode == 2 and "--data FOLDER and --out DIR" in proc.stderr
    proc = run_cli(
        "evaluate", str(seg_export), "--data", str(work), "--out", str(work / "z"), "--tta",
        cwd=work,
    )  # fmt: skip
    assert proc.returncode == 2 and "no test-time augmentation" in proc.stderr


@pytest.mark.slow
def test_evaluate_with_another_model_scores_the_mean_of_their_probabilities(
    seg_cv, seg_cv_other, work, tiny_synth
):
    from medseg.data.scan import scan_dataset
    from medseg.inference.predictor import Predictor
    from medseg.io import read_image

    data = tiny_synth / "segmentation"
    samples = scan_dataset(data, "lgg").samples
    raw = np.stack([read_image(s.image).array for s in samples])
    a, b = (Predictor(run, checkpoint="last") for run in (seg_cv, seg_cv_other))
    pa, pb = (p(p.model_input(raw))["probabilities"][..., 0] for p in (a, b))
    assert np.abs(pa - pb).max() > 1e-3  # two different models: not a vacuous mean
    mean = (pa + pb) / 2
    thr = float(np.quantile(mean, 0.9))  # one-epoch nets: a threshold that gives masks
    out = work / "ev_with"
    args = ["--checkpoint", "last", "--threshold", str(thr), "--n-boot", "0"]
    proc = run_cli(
        "evaluate", str(seg_cv), "--with", str(seg_cv_other), "--data", str(data),
        "--out", str(out), *args, cwd=work,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["id"]: r for r in _rows(out / "cases.csv")}
    assert len(rows) == len(samples)
    for s, m in zip(samples, mean, strict=True):
        assert int(rows[s.id]["pred_pixels"]) == pytest.approx(int((m > thr).sum()), abs=2)
    assert json.loads((out / "metrics.json").read_text())["ensemble_with"] == [str(seg_cv_other)]
    bad = run_cli("evaluate", str(seg_cv), "--with", str(seg_cv_other), cwd=work)
    assert bad.returncode == 2 and "--data FOLDER" in bad.stderr
