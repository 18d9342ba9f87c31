"""Per-case rows with units in their names, the per-structure and macro summary with patient
bootstrap intervals, missing values counted, and the text table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.errors import DataError
from medseg.evaluation.volumetric import case_rows, format_volumetric, summarize_volumetric

LABELS = {0: "background", 1: "Anterior", 2: "Posterior"}


def label_maps(shift: int = 0, drop_posterior: bool = False):
    """Truth and a prediction (anterior shifted by ``shift`` voxels along rows) of a tiny case."""
    truth = np.zeros((10, 12, 14), np.uint8)
    truth[2:6, 3:8, 3:9] = 1
    truth[6:9, 3:8, 3:9] = 2
    pred = np.zeros_like(truth)
    pred[2:6, 3 + shift : 8 + shift, 3:9] = 1
    if not drop_posterior:
        pred[6:9, 3:8, 3:9] = 2
    return pred, truth


def make_row(case, group, structure, dice, hd95=1.0, empty="", unit="mm", vol=0.0):
    return {
        "id": case,
        "group": group,
        "structure": structure,
        "label": 1,
        "unit": unit,
        "empty": empty,
        "dice": dice,
        f"hd95_{unit}": hd95,
        f"assd_{unit}": hd95,
        f"nsd_1{unit}": dice,
        "volume_pred_ml" if unit == "mm" else "volume_pred_px": vol,
        "volume_truth_ml" if unit == "mm" else "volume_truth_px": 0.0,
        "volume_diff_ml" if unit == "mm" else "volume_diff_px": vol,
    }


def test_case_rows_name_their_units():
    pred, truth = label_maps(shift=1)
    rows = case_rows("c1", "p1", pred, truth, (2.0, 1.0, 0.5), LABELS, tolerance_mm=1.0)
    assert [r["structure"] for r in rows] == ["Anterior", "Posterior"]
    ant, post = rows
    for col in ("hd95_mm", "assd_mm", "nsd_1mm", "volume_pred_ml", "volume_diff_ml"):
        assert col in ant
    assert ant["id"] == "c1" and ant["group"] == "p1" and ant["label"] == 1
    assert ant["hd95_mm"] == pytest.approx(1.0)  # shifted one row of 1 mm
    assert post["dice"] == 1.0 and post["hd95_mm"] == 0.0 and post["volume_diff_ml"] == 0.0
    assert ant["volume_truth_ml"] == pytest.approx(4 * 5 * 6 * 1.0 / 1000)
    px = case_rows("c1", "p1", pred, truth, None, LABELS, tolerance_mm=2.0)[0]
    assert px["unit"] == "px" and "hd95_px" in px and "nsd_2px" in px
    assert px["volume_truth_px"] == 4 * 5 * 6 and "volume_truth_ml" not in px


def test_summary_per_structure_macro_and_missing():
    rows = []
    for i in range(6):
        pred, truth = label_maps(shift=i % 2, drop_posterior=(i == 5))
        rows += case_rows(f"c{i}", f"p{i // 2}", pred, truth, (1.0, 1.0, 1.0), LABELS)
    s = summarize_volumetric(rows, n_boot=200, seed=1)
    assert s["unit"] == "mm" and s["n_cases"] == 6 and s["n_groups"] == 3
    post, ant, macro = s["structures"]["Posterior"], s["structures"]["Anterior"], s["macro"]
    # Case 5 missed the posterior: HD95 missing (left out, counted), Dice 0 counted.
    assert post["empty_pred"] == 1 and post["hd95_mm"]["missing"] == 1
    assert post["hd95_mm"]["n"] == 5 and post["hd95_mm"]["mean"] == 0.0
    assert post["dice"]["mean"] == pytest.approx(5 / 6)
    assert macro["empty_pred"] == 1 and macro["n_cases"] == 6
    # Macro: per case the mean of its structures, then over the cases.
    per_case = [np.mean([r["dice"] for r in rows if r["id"] == f"c{i}"]) for i in range(6)]
    assert macro["dice"]["mean"] == pytest.approx(np.mean(per_case))
    # Case 5's macro HD95 is its anterior's alone (the posterior's is missing).
    assert macro["hd95_mm"]["missing"] == 0
    for entry in (ant, post, macro):
        for col in s["metrics"]:
            stat = entry[col]
            if stat["ci"] is not None:
                lo, hi = stat["ci"]
                assert lo - 1e-12 <= stat["mean"] <= hi + 1e-12, col
    assert ant["dice"]["ci"][0] < ant["dice"]["ci"][1]
    assert s["structures"]["Anterior"]["abs_volume_diff_ml"]["mean"] >= 0


def test_bootstrap_resamples_groups_not_rows():
    # Each patient has one perfect and one failed case: every group resample has mean 0.5, so
    # the interval has no width. Resampling rows would give a wide interval.
    mixed = [make_row(f"c{i}", f"p{i // 2}", "A", dice=float(i % 2)) for i in range(8)]
    ci = summarize_volumetric(mixed, n_boot=300)["structures"]["A"]["dice"]["ci"]
    assert ci == pytest.approx([0.5, 0.5])
    # The same values, each patient either perfect or failed: now the interval is wide.
    split = [make_row(f"c{i}", f"p{i % 4}", "A", dice=float(i % 2)) for i in range(8)]
    ci = summarize_volumetric(split, n_boot=300)["structures"]["A"]["dice"]["ci"]
    assert ci[1] - ci[0] > 0.4


def test_summary_is_seeded_and_one_group_has_no_interval():
    rows = [make_row(f"c{i}", f"p{i}", "A", dice=i / 10) for i in range(10)]
    a = summarize_volumetric(rows, n_boot=100, seed=3)
    assert a == summarize_volumetric(rows, n_boot=100, seed=3)
    assert (
        a["structures"]["A"]["dice"]["ci"]
        != summarize_volumetric(rows, n_boot=100, seed=4)["structures"]["A"]["dice"]["ci"]
    )
    one = [make_row(f"c{i}", "p0", "A", dice=i / 10) for i in range(3)]
    assert summarize_volumetric(one, n_boot=100)["structures"]["A"]["dice"]["ci"] is None


def test_summary_reads_text_values_and_counts_empties():
    rows = [
        make_row("c0", "p0", "A", dice="0.8", hd95="2.5"),
        make_row("c1", "p1", "A", dice="0", hd95="", empty="truth"),
        make_row("c2", "p2", "A", dice="1", hd95="0", empty="both"),
    ]
    e = summarize_volumetric(rows, n_boot=50)["structures"]["A"]
    assert e["hd95_mm"]["n"] == 2 and e["hd95_mm"]["missing"] == 1
    assert e["hd95_mm"]["mean"] == pytest.approx(1.25)
    assert (e["empty_both"], e["empty_pred"], e["empty_truth"]) == (1, 0, 1)


def test_summary_refuses_inconsistent_rows():
    with pytest.raises(DataError, match="units"):
        summarize_volumetric(
            [make_row("c0", "p0", "A", 1.0), make_row("c1", "p1", "A", 1.0, unit="px")]
        )
    with pytest.raises(DataError, match="two groups"):
        summarize_volumetric([make_row("c0", "p0", "A", 1.0), make_row("c0", "p1", "B", 1.0)])
    with pytest.raises(DataError, match="two rows"):
        summarize_volumetric([make_row("c0", "p0", "A", 1.0), make_row("c0", "p0", "A", 1.0)])
    with pytest.raises(DataError, match="no volumetric rows"):
        summarize_volumetric([])


def test_format_names_units_and_structures():
    rows = []
    for i in range(4):
        pred, truth = label_maps(shift=i % 2, drop_posterior=(i == 3))
        rows += case_rows(f"c{i}", f"p{i}", pred, truth, (1.0, 1.0, 1.0), LABELS)
    text = format_volumetric(summarize_volumetric(rows, n_boot=100))
    lines = text.splitlines()
    assert "HD95 mm" in lines[0] and "NSD@1mm" in lines[0] and "mL" in lines[0]
    assert [ln.split()[0] for ln in lines[1:4]] == ["Anterior", "Posterior", "macro"]
    assert "4 cases" in lines[-1] and "prediction only 1" in lines[-1]
    assert not any(math.isnan(float(x)) for x in lines[1].split()[1:2])
    px_rows = [make_row(f"c{i}", f"p{i}", "A", 0.5, unit="px") for i in range(3)]
    assert "HD95 px" in format_volumetric(summarize_volumetric(px_rows, n_boot=10))


def test_tune_of_a_cv_trained_without_flips_does_not_mirror(tmp_path):
    # two finished folds whose training flipped no axis: tune chooses between none and largest
    # only, and never predicts again (there is no data here it could predict)
    from medseg.artifacts.runs import create_run
    from medseg.config import load_config
    from medseg.evaluation.evaluate import write_cases
    from medseg.evaluation.report3d import tune_volumetric

    root = tmp_path / "cv"
    for k in (1, 2):
        sets = ["model.name=unet3d", f"run.root={root}", f"run.name=fold_{k}", "augment.hflip=0"]
        run, _ = create_run(load_config(None, sets))
        rows = [
            {**make_row(f"c{k}{i}", f"c{k}{i}", s, d), "postprocess": p}
            for i in range(3)
            for s in ("anterior", "posterior")
            for p, d in (("none", 0.80 + 0.02 * i), ("largest", 0.81 + 0.02 * i))
        ]
        write_cases(run.path / "oof.csv", rows, {"fold": k})
    result = tune_volumetric(root, n_boot=50)
    assert result["mirror_axes"] == [] and set(result["variants"]) == {"none", "largest"}
    assert result["chosen_by_fold"] == {"1": "largest", "2": "largest"}
    assert not list(root.glob("fold_*/oof_mirror.csv"))
