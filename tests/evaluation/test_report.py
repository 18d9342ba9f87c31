"""Cross-validation summary and report from synthetic OOF files (no training: NumPy only)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from medseg.errors import DataError
from medseg.evaluation import plots, stats
from medseg.evaluation.oof import load_cv, load_oof
from medseg.evaluation.report import write_report
from medseg.evaluation.stats import calibration_bins
from medseg.evaluation.summary import summarize

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
SEG_HEADER = ["id", "group", "fold", "tp", "fp", "fn", "true_pixels", "pred_pixels"]


# --------------------------------------------------------------------------------------------
# Fixture run folders, in the layout `medseg cv` writes


def _write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def _write_common(root: Path, task: str, folds: list[list[dict]], k: int | None = None) -> None:
    k = k or len(folds)
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "medseg": {"version": "0.1.0", "config_hash": "abc123", "kind": "cv"},
        "data": {"task": task, "image_size": [64, 64], "channels": 3},
        "model": {"name": "unet" if task == "segmentation" else "mobilenetv2_classifier"},
        "train": {"epochs": 3, "batch_size": 8, "loss": "bce_dice", "seed": 0},
        "cv": {"folds": k},
        "predict": {"threshold": 0.5},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    manifest = {
        "k": k,
        "folds": [{"train": [], "val": [r["id"] for r in rows]} for rows in folds]
        + [{"train": [], "val": []}] * (k - len(folds)),
        "splits": {"test": []},
        "class_names": CLASSES if task == "classification" else [],
        "seed": 0,
        "method": "group_kfold",
    }
    (root / "splits.json").write_text(json.dumps(manifest))
    for f, _rows in enumerate(folds, start=1):
        metric = "dice" if task == "segmentation" else "accuracy"
        hist = [
            {
                "epoch": e,
                "loss": 1 / (e + 1),
                metric: 0.5 + 0.1 * e,
                "val_loss": 1.2 / (e + 1) + 0.01 * f,
                f"val_{metric}": 0.45 + 0.1 * e,
            }
            for e in range(3)
        ]
        _write_csv(root / f"fold_{f}" / "logs" / "history.csv", list(hist[0]), hist)
        (root / f"fold_{f}" / "state.json").write_text('{"status": "done"}')


def make_seg_run(
    root: Path,
    folds: int = 3,
    groups: int = 4,
    slices: int = 5,
    seed: int = 0,
    quality: tuple[float, float] = (0.3, 0.95),
) -> Path:
    """Per-slice pixel counts; each group (patient) has its own quality, so groups differ."""
    rng = np.random.default_rng(seed)
    all_rows = []
    for f in range(1, folds + 1):
        rows = []
        for g in range(groups):
            q = rng.uniform(*quality)
            for s in range(slices):
                true = 0 if rng.random() < 0.3 else int(rng.integers(20, 300))
                tp = int(rng.binomial(true, q))
                fp = int(rng.integers(0, 40)) if rng.random() < 0.8 else 0
                rows.append(
                    {
                        "id": f"img_f{f}_g{g}_s{s}",
                        "group": f"PATIENT_X{f}{g:03d}",
                        "fold": f,
                        "tp": tp,
                        "fp": fp,
                        "fn": true - tp,
                        "true_pixels": true,
                        "pred_pixels": tp + fp,
                    }
                )
        all_rows.append(rows)
    return _write_seg(root, all_rows)


def _write_seg(root: Path, folds: list[list[dict]], k: int | None = None) -> Path:
    _write_common(root, "segmentation", folds, k)
    for f, rows in enumerate(folds, start=1):
        _write_csv(root / f"fold_{f}" / "oof.csv", SEG_HEADER, rows)
        (root / f"fold_{f}" / "metrics.json").write_text(json.dumps({"val": {"dice": 0.5}}))
    return root


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def make_cls_run(
    root: Path, folds: int = 3, images: int = 30, seed: int = 0, probs=None, targets=None
):
    """``images`` per fold in groups of 3; probabilities from noisy logits, or given."""
    rng = np.random.default_rng(seed)
    n = folds * images
    if targets is None:
        targets = rng.integers(0, len(CLASSES), n)
    if probs is None:
        probs = _softmax(rng.normal(size=(n, len(CLASSES))) + 2.0 * np.eye(len(CLASSES))[targets])
    all_rows = []
    for f in range(1, folds + 1):
        rows = []
        for i in range((f - 1) * images, f * images):
            rows.append(
                {
                    "id": f"img_{i}",
                    "group": f"PATIENT_C{i // 3:04d}",
                    "fold": f,
                    "target": int(targets[i]),
                    "pred": int(probs[i].argmax()),
                    **{
                        f"p_{c}": round(float(p), 6) for c, p in zip(CLASSES, probs[i], strict=True)
                    },
                }
            )
        all_rows.append(rows)
    _write_common(root, "classification", all_rows)
    header = ["id", "group", "fold", "target", "pred"] + [f"p_{c}" for c in CLASSES]
    for f, rows in enumerate(all_rows, start=1):
        _write_csv(root / f"fold_{f}" / "oof.csv", header, rows)
        (root / f"fold_{f}" / "metrics.json").write_text(json.dumps({"val": {}}))
    return root


def _csv_rows(root: Path) -> list[dict]:
    rows = []
    for path in sorted(root.glob("fold_*/oof.csv")):
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def _dice(tp, fp, fn):
    return 1.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _hand_seg(rows: list[dict]) -> dict:
    """Segmentation metrics by hand from CSV rows (strings), with plain Python."""
    tp, fp, fn = (sum(int(r[c]) for r in rows) for c in ("tp", "fp", "fn"))
    per_group: dict[str, list[int]] = {}
    for r in rows:
        acc = per_group.setdefault(r["group"], [0, 0, 0])
        for i, c in enumerate(("tp", "fp", "fn")):
            acc[i] += int(r[c])
    group_dice = [_dice(*c) for c in per_group.values()]
    nonempty = [
        _dice(int(r["tp"]), int(r["fp"]), int(r["fn"])) for r in rows if int(r["true_pixels"]) > 0
    ]
    return {
        "dice": _dice(tp, fp, fn),
        "iou": tp / (tp + fp + fn),
        "dice_per_group_mean": sum(group_dice) / len(group_dice),
        "dice_per_group_median": statistics.median(group_dice),
        "dice_per_image_mean_nonempty": sum(nonempty) / len(nonempty),
    }


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> Path:
    return make_seg_run(tmp_path_factory.mktemp("seg") / "cv-seg")


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory) -> Path:
    return make_cls_run(tmp_path_factory.mktemp("cls") / "cv-cls")


@pytest.fixture(scope="module")
def seg_summary(seg_run) -> dict:
    return summarize(seg_run, n_boot=300, seed=0)


@pytest.fixture(scope="module")
def cls_summary(cls_run) -> dict:
    return summarize(cls_run, n_boot=300, seed=0)


# --------------------------------------------------------------------------------------------
# Loading


def test_load_oof_types_and_order(seg_run, cls_run):
    rows = load_oof(seg_run)
    assert len(rows) == 3 * 4 * 5
    assert [r["fold"] for r in rows] == sorted(r["fold"] for r in rows)
    assert all(isinstance(r[c], int) for r in rows for c in SEG_HEADER[2:])
    crow = load_oof(cls_run)[0]
    assert isinstance(crow["target"], int) and isinstance(crow[f"p_{CLASSES[0]}"], float)


def test_missing_oof_names_the_file(tmp_path):
    root = make_seg_run(tmp_path / "run")
    (root / "fold_2" / "oof.csv").unlink()
    with pytest.raises(DataError, match=re.escape(str(root / "fold_2" / "oof.csv"))):
        summarize(root, n_boot=0)
    with pytest.raises(DataError, match="fold_2"):
        write_report(root)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: text.replace("true_pixels", "truth"), "missing column"),
        (lambda text: text.replace(",1,", ",x,", 1), "not a non-negative integer"),
        (lambda text: text.replace("img_f1_g0_s1,PATIENT_X1000,1", "a,PATIENT_X1000,2"), "fold=2"),
    ],
)
def test_malformed_oof_names_the_file(tmp_path, edit, message):
    root = make_seg_run(tmp_path / "run")
    path = root / "fold_1" / "oof.csv"
    path.write_text(edit(path.read_text()))
    with pytest.raises(DataError, match=message) as info:
        load_oof(root)
    assert str(path) in str(info.value)


def test_inconsistent_counts_and_overlapping_folds(tmp_path):
    root = make_seg_run(tmp_path / "run")
    path = root / "fold_1" / "oof.csv"
    rows = list(csv.DictReader(path.open()))
    rows[0]["true_pixels"] = str(int(rows[0]["true_pixels"]) + 1)
    _write_csv(path, SEG_HEADER, rows)
    with pytest.raises(DataError, match="inconsistent counts"):
        load_oof(root)
    rows[0]["true_pixels"] = str(int(rows[0]["true_pixels"]) - 1)
    other = list(csv.DictReader((root / "fold_2" / "oof.csv").open()))
    _write_csv(path, SEG_HEADER, rows + [{**other[0], "fold": "1"}])
    with pytest.raises(DataError, match="more than one"):
        load_oof(root)


def test_groups_crossing_folds_are_reported(tmp_path):
    root = make_seg_run(tmp_path / "run")
    path = root / "fold_2" / "oof.csv"
    path.write_text(path.read_text().replace("PATIENT_X2000", "PATIENT_X1000"))
    s = summarize(root, n_boot=10)
    assert s["n_groups"] == 11
    assert any(w.startswith("1 patient(s)/group(s)") for w in s["warnings"])


def test_unstarted_folds_are_skipped(tmp_path):
    root = make_seg_run(tmp_path / "run")
    shutil.rmtree(root / "fold_3")
    s = summarize(root, n_boot=10)
    assert s["k"] == 3 and s["folds_done"] == [1, 2]
    assert s["n_samples"] == 2 * 4 * 5 and len(s["metrics"]["dice"]["folds"]) == 2


# --------------------------------------------------------------------------------------------
# Segmentation numbers


def test_segmentation_matches_hand_computation(seg_run, seg_summary):
    rows = _csv_rows(seg_run)
    pooled = _hand_seg(rows)
    metrics = seg_summary["metrics"]
    assert metrics["dice"]["pooled"] == pooled["dice"]
    assert metrics["iou"]["pooled"] == pooled["iou"]
    for key, value in pooled.items():
        assert metrics[key]["pooled"] == pytest.approx(value, rel=1e-12), key
    for f in (1, 2, 3):
        hand = _hand_seg([r for r in rows if r["fold"] == str(f)])
        for key, value in hand.items():
            assert metrics[key]["folds"][f - 1] == pytest.approx(value, rel=1e-12), (key, f)
    for key, block in metrics.items():
        assert block["mean"] == pytest.approx(np.mean(block["folds"]), rel=1e-12), key
        assert block["std"] == pytest.approx(np.std(block["folds"], ddof=1), rel=1e-12), key
    assert seg_summary["n_samples"] == 60 and seg_summary["n_groups"] == 12
    assert seg_summary["k"] == 3 and seg_summary["folds_done"] == [1, 2, 3]
    assert seg_summary["n_images_nonempty"] == sum(int(r["true_pixels"]) > 0 for r in rows)
    assert "hd95" in seg_summary["not_available"]


GROUPS_HEADER = ["group", "slices", "tp", "fp", "fn", "dice", "empty", "unit"]
GROUPS_HEADER += ["hd95_px", "assd_px", "nsd_1px", "fold"]


def _add_oof_groups(root: Path, seed: int = 0) -> Path:
    """Per-patient rows (as ``medseg cv`` writes them) for every fold of a synthetic run: the
    counts summed from oof.csv, made-up distances, some missing (one mask empty)."""
    rng = np.random.default_rng(seed)
    for path in sorted(root.glob("fold_*/oof.csv")):
        fold = int(path.parent.name[5:])
        sums: dict[str, list[int]] = {}
        for r in csv.DictReader(path.open()):
            acc = sums.setdefault(r["group"], [0, 0, 0])
            for i, c in enumerate(("tp", "fp", "fn")):
                acc[i] += int(r[c])
        rows = []
        for g, (tp, fp, fn) in sorted(sums.items()):
            missing = rng.random() < 0.25
            hd = float(rng.uniform(1, 30))
            rows.append(
                {
                    "group": g,
                    "slices": 5,
                    "tp": tp,
                    "fp": fp,
                    "fn": fn,
                    "dice": _dice(tp, fp, fn),
                    "empty": "pred" if missing else "",
                    "unit": "px",
                    "hd95_px": "nan" if missing else hd,
                    "assd_px": "nan" if missing else hd / 3,
                    "nsd_1px": 0.0 if missing else float(rng.uniform(0.2, 1)),
                    "fold": fold,
                }
            )
        _write_csv(path.parent / "oof_groups.csv", GROUPS_HEADER, rows)
    return root


def _group_values(root: Path, column: str, fold: int | None = None) -> list[float]:
    paths = sorted(root.glob(f"fold_{fold or '*'}/oof_groups.csv"))
    return [float(r[column]) for p in paths for r in csv.DictReader(p.open())]


def test_surface_metrics_per_patient_volume(tmp_path):
    root = _add_oof_groups(make_seg_run(tmp_path / "run", seed=4))
    summary = summarize(root, n_boot=50, seed=0)
    metrics, surface = summary["metrics"], summary["surface"]
    for key, col in (("hd95", "hd95_px"), ("assd", "assd_px"), ("nsd", "nsd_1px")):
        values = _group_values(root, col)
        block = metrics[f"{key}_per_group_mean"]
        assert block["pooled"] == pytest.approx(np.nanmean(values), rel=1e-12), key
        assert surface[f"{key}_missing"] == int(np.isnan(values).sum())
        for f in (1, 2, 3):
            want = np.nanmean(_group_values(root, col, f))
            assert block["folds"][f - 1] == pytest.approx(want, rel=1e-12), (key, f)
        lo, hi = block["ci95"]
        assert lo <= block["pooled"] <= hi
    assert surface["hd95_missing"] > 0 and surface["nsd_missing"] == 0
    assert surface["unit"] == "px" and surface["nsd_tolerance"] == 1.0
    assert summary["not_available"] == {}
    # a bootstrap replicate counts each patient as often as it was drawn
    d = load_cv(root)
    mult = np.random.default_rng(1).integers(0, 3, len(d.groups))
    rep = stats.seg_metrics(d, mult[d.gidx].astype(float), mult)
    hd = d.group_surface["hd95"]
    ok = (mult > 0) & np.isfinite(hd)
    assert rep["hd95_per_group_mean"] == pytest.approx(np.sum(mult[ok] * hd[ok]) / mult[ok].sum())
    assert rep["hd95_missing"] == int(mult[~np.isfinite(hd)].sum())
    write_report(root, summary)
    md = (root / "report.md").read_text()
    assert "HD95 per patient volume, mean (px at the model's input size; larger of the two" in md
    assert "NSD@1px per patient volume" in md


def test_surface_metrics_never_mix_conventions(tmp_path):
    root = _add_oof_groups(make_seg_run(tmp_path / "run"))
    (root / "fold_2" / "oof_groups.csv").unlink()
    summary = summarize(root, n_boot=0)
    assert "hd95_per_group_mean" not in summary["metrics"] and summary["surface"] is None
    assert "fold_2" in summary["not_available"]["hd95"]
    # a patient row whose counts are not its oof.csv rows' sum: refused, naming file and line
    bad = _add_oof_groups(make_seg_run(tmp_path / "bad")) / "fold_3" / "oof_groups.csv"
    lines = bad.read_text().splitlines()
    cells = lines[1].split(",")
    cells[2] = str(int(cells[2]) + 1)
    bad.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    with pytest.raises(DataError, match="line 2: tp, fp, fn") as info:
        load_cv(tmp_path / "bad")
    assert str(bad) in str(info.value)


def test_fold_values_are_recomputed_not_copied(seg_run, seg_summary):
    # every fold's metrics.json says dice 0.5: the summary ignores it and warns about it
    assert 0.5 not in seg_summary["metrics"]["dice"]["folds"]
    assert any("fold_1: dice" in w for w in seg_summary["warnings"])


def test_ci_contains_estimate_and_is_seeded(seg_run, seg_summary):
    for key, block in seg_summary["metrics"].items():
        lo, hi = block["ci95"]
        assert lo <= block["pooled"] <= hi, key
        assert lo < hi, key
    again = summarize(seg_run, n_boot=300, seed=0)
    other = summarize(seg_run, n_boot=300, seed=1)
    assert again == seg_summary
    assert other["metrics"]["dice"]["ci95"] != seg_summary["metrics"]["dice"]["ci95"]
    assert summarize(seg_run, n_boot=0)["metrics"]["dice"]["ci95"] is None


def _width(summary: dict, key: str) -> float:
    lo, hi = summary["metrics"][key]["ci95"]
    return hi - lo


def test_ci_narrows_with_more_groups(tmp_path):
    small = summarize(make_seg_run(tmp_path / "small", groups=4, seed=3), n_boot=300)
    large = summarize(make_seg_run(tmp_path / "large", groups=40, seed=3), n_boot=300)
    for key in ("dice", "dice_per_group_mean"):
        assert _width(large, key) < 0.6 * _width(small, key), key


def test_bootstrap_resamples_groups_not_slices(tmp_path):
    """Identical patients (all variance within each patient) give a zero-width interval; a row
    bootstrap would not. Patients that differ from each other give a wide one."""
    slices = [(80, 10, 10), (5, 30, 60), (0, 7, 0), (50, 0, 2), (0, 0, 0)]

    def rows(fold, group, counts):
        return [
            {
                "id": f"{group}_{i}",
                "group": group,
                "fold": fold,
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "true_pixels": tp + fn,
                "pred_pixels": tp + fp,
            }
            for i, (tp, fp, fn) in enumerate(counts)
        ]

    within = [[r for g in range(4) for r in rows(f, f"P{f}{g}", slices)] for f in (1, 2, 3)]
    good, bad = [(60, 5, 5)] * 5, [(10, 40, 60)] * 5
    between = [
        [r for g in range(4) for r in rows(f, f"P{f}{g}", good if g % 2 else bad)]
        for f in (1, 2, 3)
    ]
    s_within = summarize(_write_seg(tmp_path / "within", within), n_boot=200)
    s_between = summarize(_write_seg(tmp_path / "between", between), n_boot=200)
    for key in ("dice", "iou", "dice_per_group_mean", "dice_per_image_mean_nonempty"):
        assert _width(s_within, key) == pytest.approx(0.0, abs=1e-12), key
        assert _width(s_between, key) > 0.1, key


# --------------------------------------------------------------------------------------------
# Classification numbers


def _cls_arrays(root: Path):
    rows = _csv_rows(root)
    y = np.array([int(r["target"]) for r in rows])
    p = np.array([int(r["pred"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    fold = np.array([int(r["fold"]) for r in rows])
    return y, p, probs, fold


def test_classification_matches_sklearn(cls_run, cls_summary):
    y, p, probs, fold = _cls_arrays(cls_run)
    m = cls_summary["metrics"]
    assert m["accuracy"]["pooled"] == pytest.approx(accuracy_score(y, p))
    assert m["balanced_accuracy"]["pooled"] == pytest.approx(balanced_accuracy_score(y, p))
    assert m["macro_f1"]["pooled"] == pytest.approx(f1_score(y, p, average="macro"))
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in range(4)]
    assert m["roc_auc_macro"]["pooled"] == pytest.approx(np.mean(aucs))
    prec, rec, f1, support = precision_recall_fscore_support(y, p, labels=range(4), zero_division=0)
    for c, name in enumerate(CLASSES):
        pc = cls_summary["per_class"][name]
        assert pc["precision"]["pooled"] == pytest.approx(prec[c])
        assert pc["recall"]["pooled"] == pytest.approx(rec[c])
        assert pc["f1"]["pooled"] == pytest.approx(f1[c])
        assert pc["roc_auc"]["pooled"] == pytest.approx(aucs[c])
        assert pc["support"] == support[c]
        assert pc["f1"]["ci95"][0] <= pc["f1"]["pooled"] <= pc["f1"]["ci95"][1]
    for f in (1, 2, 3):
        sel = fold == f
        assert m["accuracy"]["folds"][f - 1] == pytest.approx(accuracy_score(y[sel], p[sel]))
    folds = m["macro_f1"]["folds"]
    assert m["macro_f1"]["std"] == pytest.approx(np.std(folds, ddof=1))
    assert cls_summary["class_names"] == CLASSES
    assert np.array(cls_summary["confusion_matrix"]).sum() == 90
    assert cls_summary["n_groups"] == 30


def test_bootstrap_metrics_match_sklearn_with_weights(cls_run):
    """The NumPy metrics used for bootstrap replicates equal scikit-learn with sample weights."""
    d = load_cv(cls_run)
    y, p, probs = d.target, d.pred, d.probs
    rng = np.random.default_rng(5)
    for _ in range(3):
        mult = np.bincount(rng.integers(0, len(d.groups), len(d.groups)), minlength=len(d.groups))
        w = mult[d.gidx].astype(float)
        mine = stats.cls_weighted(d, w)
        assert mine["accuracy"] == pytest.approx(accuracy_score(y, p, sample_weight=w))
        assert mine["balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(y, p, sample_weight=w)
        )
        assert mine["macro_f1"] == pytest.approx(
            f1_score(y, p, average="macro", labels=range(4), sample_weight=w, zero_division=0)
        )
        prec, rec, f1, _ = precision_recall_fscore_support(
            y, p, labels=range(4), sample_weight=w, zero_division=0
        )
        for c, name in enumerate(CLASSES):
            assert mine[f"precision/{name}"] == pytest.approx(prec[c])
            assert mine[f"recall/{name}"] == pytest.approx(rec[c])
            assert mine[f"f1/{name}"] == pytest.approx(f1[c])
            assert mine[f"roc_auc/{name}"] == pytest.approx(
                roc_auc_score(y == c, probs[:, c], sample_weight=w), rel=1e-10
            )
    ties = stats.WeightedAUC(np.array([0.1, 0.5, 0.5, 0.9, 0.5]), np.array([0, 1, 0, 1, 1]))
    assert ties(np.ones(5)) == pytest.approx(
        roc_auc_score([0, 1, 0, 1, 1], [0.1, 0.5, 0.5, 0.9, 0.5])
    )


def test_ece_zero_when_calibrated_positive_when_overconfident(tmp_path):
    # confidence 0.7 and 0.9 in two bins; exactly 70% and 90% of them correct
    n = 30
    targets, probs = [], []
    for i in range(n):
        conf = 0.7 if i < 20 else 0.9
        cls = i % 4
        row = np.full(4, (1 - conf) / 3)
        row[cls] = conf
        correct = (i % 10) < (7 if i < 20 else 9)
        targets.append(cls if correct else (cls + 1) % 4)
        probs.append(row)
    targets, probs = np.array(targets), np.array(probs)
    calibrated = summarize(
        make_cls_run(tmp_path / "cal", 3, 10, probs=probs, targets=targets), n_boot=20
    )
    assert calibrated["metrics"]["ece"]["pooled"] == pytest.approx(0.0, abs=1e-9)
    bins = {b["upper"]: b for b in calibrated["calibration"]["bins"] if b["count"]}
    assert set(bins) == {0.7, 0.9}
    assert bins[0.7]["count"] == 20 and bins[0.7]["accuracy"] == pytest.approx(0.7)

    # the same predictions claimed with confidence 0.99: over-confident
    sharp = np.where(probs == probs.max(axis=1, keepdims=True), 0.99, 0.01 / 3)
    over = summarize(
        make_cls_run(tmp_path / "over", 3, 10, probs=sharp, targets=targets), n_boot=20
    )
    acc = over["metrics"]["accuracy"]["pooled"]
    assert over["metrics"]["ece"]["pooled"] == pytest.approx(0.99 - acc, abs=1e-6)
    assert over["metrics"]["ece"]["pooled"] > 0.1

    ece, table = calibration_bins(np.array([0.3, 0.3, 0.95]), np.array([0.0, 1.0, 1.0]))
    assert ece == pytest.approx((2 * 0.2 + 0.05) / 3)
    assert table[2]["count"] == 2  # 0.3 falls in (0.2, 0.3]


# --------------------------------------------------------------------------------------------
# Report files


@pytest.fixture(scope="module")
def written(tmp_path_factory, seg_run, cls_run, cls_summary):
    seg_run = shutil.copytree(seg_run, tmp_path_factory.mktemp("written") / "cv-seg")
    test = {"split": "test", "dice": 0.8125, "iou": 0.7, "per_group": {"PATIENT_SECRET": 0.3}}
    (seg_run / "test_metrics.json").write_text(json.dumps(test))
    seg = write_report(seg_run, summarize(seg_run, n_boot=300))
    cls = write_report(cls_run, cls_summary)
    return {"seg": (seg_run, seg), "cls": (cls_run, cls)}


def _group_names(root: Path) -> set[str]:
    return {r["group"] for r in _csv_rows(root)} | {"PATIENT_SECRET"}


@pytest.mark.parametrize("task", ["seg", "cls"])
def test_report_files(written, task):
    root, summary = written[task]
    md = (root / "report.md").read_text()
    html = (root / "report.html").read_text()
    saved = json.loads((root / "cv_summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert (
        "| metric | mean ± std over folds | 95% CI (bootstrap by patient/group) | fold values |"
        in md
    )
    block = summary["metrics"]["dice" if task == "seg" else "accuracy"]
    assert f"{block['mean']:.4f} ± {block['std']:.4f}" in md
    assert f"({block['ci95'][0]:.4f}–{block['ci95'][1]:.4f})" in md
    links = re.findall(r"\]\((plots/[^)]+\.png)\)", md)
    expected = (
        {"cv_history.png", "cv_dice_per_group.png"}
        if task == "seg"
        else {"cv_history.png", "cv_confusion.png", "cv_roc.png", "cv_reliability.png"}
    )
    assert {Path(x).name for x in links} == expected
    for link in links:
        assert (root / link).is_file() and (root / link).read_bytes()[:4] == b"\x89PNG"
    # self-contained HTML: every figure embedded, nothing fetched from elsewhere
    assert html.count('src="data:image/png;base64,') == len(links)
    assert re.findall(r'(?:src|href)="(?!data:image/png;base64,)', html) == []
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "How these numbers were computed" in md and "bootstrap" in md
    # no patient/group ids anywhere
    for name in _group_names(root):
        for text in (md, html, (root / "cv_summary.json").read_text()):
            assert name not in text
    if task == "seg":
        assert "HD95" in md
        assert saved["test"]["dice"] == 0.8125 and "per_group" not in saved["test"]
        assert "Held-out test split" in md and "0.8125" in md
    else:
        assert "| class | support | precision | recall | F1 | ROC AUC |" in md
        assert "Expected calibration error" in md


def test_output_is_deterministic(tmp_path, cls_run):
    a = shutil.copytree(make_seg_run(tmp_path / "src"), tmp_path / "a" / "run")
    b = shutil.copytree(tmp_path / "src", tmp_path / "b" / "run")
    write_report(a)
    write_report(b)
    first = {n: (a / n).read_bytes() for n in ("cv_summary.json", "report.md")}
    write_report(a)
    for name, data in first.items():
        assert (a / name).read_bytes() == data == (b / name).read_bytes(), name
    c = shutil.copytree(cls_run, tmp_path / "c" / "run")
    write_report(c, summarize(c, n_boot=100))
    md = (c / "report.md").read_text()
    write_report(c, summarize(c, n_boot=100))
    assert (c / "report.md").read_text() == md


def test_training_curves_show_validation_every_n_epochs(tmp_path, monkeypatch):
    # train.validation_freq=2: val_* blank in the epochs that were not validated
    path = tmp_path / "history.csv"
    rows = ["epoch,loss,val_loss"] + [
        f"{e},{1 - e / 10},{(0.9 - e / 20) if e % 2 else ''}" for e in range(6)
    ]
    path.write_text("\n".join(rows) + "\n")
    drawn = []
    real_plot = plots.plt.Axes.plot

    def plot(ax, *args, **kwargs):
        drawn.append([list(a) for a in args if not isinstance(a, str)])
        return real_plot(ax, *args, **kwargs)

    monkeypatch.setattr(plots.plt.Axes, "plot", plot)
    assert plots.plot_cv_history({1: path}, tmp_path / "curves.png").is_file()
    train_line, val_line = drawn
    assert train_line[0] == [1, 2, 3, 4, 5, 6]
    assert val_line[0] == [2, 4, 6]  # epochs 1, 3, 5 (0-based) were validated
    assert val_line[1] == pytest.approx([0.85, 0.75, 0.65])
