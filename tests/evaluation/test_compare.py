"""``medseg evaluate --compare A B``: paired differences with a paired patient-bootstrap interval,
the Wilcoxon p-value, verdicts in each metric's direction, the refusals and the written files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medseg.errors import ConfigError, DataError, RunExistsError
from medseg.evaluation.compare import (
    NO_DIFFERENCE,
    compare,
    format_comparison,
    verdict,
)
from medseg.evaluation.evaluate import write_cases
from medseg.evaluation.stats import group_resamples, percentile_interval
from medseg.evaluation.volumetric import case_rows

LABELS = {1: "anterior", 2: "posterior"}


def phantom(shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A tiny two-structure truth and a prediction with the anterior block shifted."""
    truth = np.zeros((8, 10, 12), np.uint8)
    truth[1:4, 2:7, 2:9] = 1
    truth[4:7, 2:7, 2:9] = 2
    pred = np.zeros_like(truth)
    pred[1:4, 2 + shift : 7 + shift, 2:9] = 1
    pred[4:7, 2:7, 2:9] = 2
    return pred, truth


#: One real row of case_rows: the column layout every synthetic row copies.
TEMPLATE = case_rows("c", "c", *phantom(1), (2.0, 1.0, 1.5), LABELS)[0]


def rows_of(values: dict[str, np.ndarray], n: int, unit: str = "mm", two_per: int = 0) -> list:
    """Rows of ``n`` cases x 2 structures with the given per-case metric values (``dice``,
    ``hd95``, ...: arrays of ``n``; the same for both structures); the first ``two_per`` patients
    have two cases each."""
    rows = []
    for i in range(n):
        patient = f"p{i // 2}" if i < 2 * two_per else f"p{i}"
        for structure in LABELS.values():
            row = {k: v for k, v in TEMPLATE.items() if not k.endswith(("_mm", "_ml", "_1mm"))}
            row.update(id=f"case_{i:03d}", group=patient, structure=structure, unit=unit)
            for name in ("dice", "hd95", "assd", "nsd"):
                column = {"dice": "dice", "nsd": f"nsd_1{unit}"}.get(name, f"{name}_{unit}")
                row[column] = float(values.get(name, values["dice"])[i])
            rows.append(row)
    return rows


def write_eval(folder, rows) -> None:
    """An evaluate output folder: its per-case, per-structure cases.csv."""
    write_cases(folder / "cases.csv", rows)


def two_outputs(tmp_path, a_values, b_values, n, **kw):
    write_eval(a := tmp_path / "a", rows_of(a_values, n, **kw))
    write_eval(b := tmp_path / "b", rows_of(b_values, n, **kw))
    return a, b


def test_b_better_everywhere_and_files(tmp_path):
    rng = np.random.default_rng(1)
    n = 16  # > 13 patients: scipy's Wilcoxon with ties is asymptotic (fast), not a permutation
    dice = rng.uniform(0.6, 0.85, n)
    hd = rng.uniform(2.0, 6.0, n)
    a = {"dice": dice, "hd95": hd, "assd": hd / 3, "nsd": dice}
    b = {"dice": dice + 0.05, "hd95": hd - 0.5, "assd": hd / 3 - 0.1, "nsd": dice + 0.05}
    pa, pb = two_outputs(tmp_path, a, b, n, two_per=2)  # 14 patients, two with two cases
    result = compare(pa, pb, tmp_path / "cmp", n_boot=300, seed=0)

    assert result["n_cases"] == n and result["n_patients"] == 14
    for name in ("anterior", "posterior", "macro"):
        e = result["results"][name]
        dice_e = e["dice"]
        assert dice_e["diff"] == pytest.approx(0.05)
        assert dice_e["mean_b"] - dice_e["mean_a"] == pytest.approx(0.05)
        assert dice_e["ci"] == pytest.approx([0.05, 0.05])  # the same gain on every patient
        assert dice_e["p_value"] < 0.001 and dice_e["verdict"] == "B better"
        assert e["hd95_mm"]["diff"] == pytest.approx(-0.5)
        assert e["hd95_mm"]["better"] == "lower" and e["hd95_mm"]["verdict"] == "B better"
        assert e["assd_mm"]["verdict"] == e["nsd_1mm"]["verdict"] == "B better"
    assert result["zero_method"] == "wilcox"

    out = tmp_path / "cmp"
    assert (
        json.loads((out / "comparison.json").read_text())["results"]["macro"]["dice"]["verdict"]
        == "B better"
    )
    md = (out / "comparison.md").read_text()
    assert "| anterior | Dice, higher better |" in md and "HD95 (mm), lower better" in md
    with open(out / "paired.csv", newline="") as f:
        paired = list(csv.DictReader(f))
    assert len(paired) == 14 * 3  # patients x (two structures + macro)
    first = next(r for r in paired if r["patient"] == "p0" and r["structure"] == "anterior")
    assert first["n_cases"] == "2"
    assert float(first["dice_a"]) == pytest.approx(dice[:2].mean(), abs=1e-6)
    assert float(first["dice_diff"]) == pytest.approx(0.05, abs=1e-6)
    text = format_comparison(result)
    assert "B better" in text and "zero_method='wilcox'" in text and "16 cases" in text


def test_hd95_direction_lower_is_better(tmp_path):
    rng = np.random.default_rng(2)
    n = 14
    dice = rng.uniform(0.6, 0.8, n)
    hd = rng.uniform(2.0, 5.0, n)
    a = {"dice": dice, "hd95": hd}
    b = {"dice": dice + 0.02, "hd95": hd + 1.0}  # B: higher Dice, but larger distances
    result = compare(*two_outputs(tmp_path, a, b, n), tmp_path / "cmp", n_boot=200)
    macro = result["results"]["macro"]
    assert macro["dice"]["verdict"] == "B better"
    assert macro["hd95_mm"]["diff"] == pytest.approx(1.0)
    assert macro["hd95_mm"]["verdict"] == "A better"
    assert verdict([0.1, 0.3], "lower") == "A better"
    assert verdict([-0.3, -0.1], "lower") == "B better"
    assert verdict([-0.3, -0.1], "higher") == "A better"
    assert verdict([-0.1, 0.2], "higher") == NO_DIFFERENCE


def test_noise_around_zero_is_no_difference(tmp_path):
    rng = np.random.default_rng(3)
    n = 14
    dice = rng.uniform(0.6, 0.8, n)
    half = rng.uniform(0.01, 0.03, n // 2)
    noise = np.concatenate([half, -half])  # symmetric: mean 0, balanced signed ranks
    rng.shuffle(noise)
    hd = np.full(n, 3.0)
    hd[0] = np.nan  # a missing distance in A (an empty mask): the pair is left out and counted
    result = compare(
        *two_outputs(tmp_path, {"dice": dice, "hd95": hd}, {"dice": dice + noise, "hd95": hd}, n),
        tmp_path / "cmp",
        n_boot=300,
    )
    e = result["results"]["anterior"]["dice"]
    assert e["ci"][0] < 0 < e["ci"][1]
    assert e["p_value"] > 0.5 and e["verdict"] == NO_DIFFERENCE
    h = result["results"]["anterior"]["hd95_mm"]
    assert h["missing_pairs"] == 1 and h["n_pairs"] == n - 1
    assert h["zero_differences"] == n - 1 and h["p_value"] is None and h["diff"] == 0
    assert NO_DIFFERENCE in format_comparison(result)


def test_paired_interval_is_narrower_than_unpaired(tmp_path):
    rng = np.random.default_rng(4)
    n = 20
    dice = rng.uniform(0.3, 0.95, n)  # patients differ a lot; A and B move together
    b_dice = dice + 0.02 + rng.normal(0.0, 0.005, n)
    pa, pb = two_outputs(tmp_path, {"dice": dice}, {"dice": b_dice}, n)
    result = compare(pa, pb, tmp_path / "cmp", n_boot=500, seed=0)
    lo, hi = result["results"]["anterior"]["dice"]["ci"]

    def boot_means(x, seed):
        return [float(m @ x / m.sum()) for m in group_resamples(n, 500, seed)]

    unpaired = percentile_interval(np.array(boot_means(b_dice, 1)) - np.array(boot_means(dice, 2)))
    assert hi - lo < 0.2 * (unpaired[1] - unpaired[0])
    assert unpaired[0] < 0 < unpaired[1]  # unpaired, the same data show nothing
    assert result["results"]["anterior"]["dice"]["verdict"] == "B better"


def test_two_2d_evaluate_outputs_compare_per_patient_dice(tmp_path):
    for side, shift in (("a", 0.0), ("b", 0.04)):
        folder = tmp_path / side
        groups = [{"group": f"p{i}", "slices": 5, "dice": 0.5 + 0.03 * i + shift} for i in range(8)]
        write_cases(folder / "groups.csv", groups)
        (folder / "metrics.json").write_text("{}")
    result = compare(tmp_path / "a", tmp_path / "b", tmp_path / "cmp", n_boot=200)
    assert result["metrics"] == ["dice"] and result["kind_a"] == "groups"
    assert list(result["results"]) == ["foreground"]
    assert result["results"]["foreground"]["dice"]["verdict"] == "B better"


def test_refusals(tmp_path):
    n = 6
    dice = np.linspace(0.5, 0.8, n)
    a, b = two_outputs(tmp_path, {"dice": dice}, {"dice": dice}, n)
    write_eval(c := tmp_path / "fewer", rows_of({"dice": dice}, n - 2))
    write_eval(px := tmp_path / "px", rows_of({"dice": dice}, n, unit="px"))
    with pytest.raises(DataError) as e:
        compare(a, c, tmp_path / "o1")
    assert str(e.value) == (
        "A and B are not scored on the same cases: 2 (case_004, case_005) only in A, 0 only in B"
    )
    with pytest.raises(DataError, match=r"^A and B differ in units: mm in A, px in B$"):
        compare(a, px, tmp_path / "o2")
    (tmp_path / "preds").mkdir()
    with pytest.raises(ConfigError, match="not an evaluate output .* give --truth DIR"):
        compare(a, tmp_path / "preds", tmp_path / "o3")
    with pytest.raises(ConfigError, match="would replace the input"):
        compare(a, b, a, overwrite=True)
    compare(a, b, tmp_path / "done", n_boot=0)
    with pytest.raises(RunExistsError, match="exists; pass --overwrite"):
        compare(a, b, tmp_path / "done")
    result = compare(a, b, tmp_path / "done", n_boot=0, overwrite=True)
    assert result["results"]["macro"]["dice"]["ci"] is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_prediction_folders_against_truth(tmp_path):
    pytest.importorskip(
        "medseg.evaluation.files", reason="score_folders (issue 28, item 3) not built yet"
    )
    nib = pytest.importorskip("nibabel")
    affine = np.diag([2.0, 1.0, 1.5, 1.0])
    expected = {"a": [], "b": []}
    (tmp_path / "truth").mkdir()
    for i in range(4):
        _, truth = phantom()
        nib.save(nib.Nifti1Image(truth, affine), tmp_path / "truth" / f"case_{i}.nii.gz")
        for side, shift in (("a", 1), ("b", 0)):
            pred = phantom(shift if i % 2 == 0 else 0)[0]
            folder = tmp_path / side
            folder.mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(pred, affine), folder / f"case_{i}.nii.gz")
            expected[side] += [r["dice"] for r in case_rows("c", "c", pred, truth, None, LABELS)]
    result = compare(
        tmp_path / "a", tmp_path / "b", tmp_path / "cmp", truth=tmp_path / "truth", n_boot=100
    )
    assert result["kind_a"] == result["kind_b"] == "predictions" and result["unit"] == "mm"
    macro = result["results"]["macro"]["dice"]
    assert macro["mean_a"] == pytest.approx(np.mean(expected["a"]), abs=1e-6)
    assert macro["mean_b"] == pytest.approx(np.mean(expected["b"]), abs=1e-6)
    assert (tmp_path / "cmp" / "a" / "cases.csv").is_file()
    assert (tmp_path / "cmp" / "b" / "cases.csv").is_file()


def test_a_3d_cv_folder_is_compared_on_its_out_of_fold_rows(tmp_path):
    """A finished 3D CV: its folds' oof.csv rows (postprocess "none" only) are side A."""
    rng = np.random.default_rng(3)
    n = 16
    dice = rng.uniform(0.6, 0.85, n)
    both = ("none", "largest")
    rows = [{**r, "postprocess": p} for r in rows_of({"dice": dice}, n) for p in both]
    cv = tmp_path / "cv"
    for k, part in ((1, rows[: len(rows) // 2]), (2, rows[len(rows) // 2 :])):
        write_cases(cv / f"fold_{k}" / "oof.csv", part, {"fold": k})
    (cv / "cv_summary.json").write_text(json.dumps({"kind": "volumetric"}))
    write_eval(b := tmp_path / "b", rows_of({"dice": dice + 0.05}, n))
    result = compare(cv, b, tmp_path / "cmp", n_boot=200, seed=0)
    assert result["n_cases"] == n  # every case once, not twice (largest rows left out)
    assert result["results"]["macro"]["dice"]["diff"] == pytest.approx(0.05)
    (cv / "fold_2" / "oof.csv").unlink()
    with pytest.raises(DataError, match="unfinished cross-validation"):
        compare(cv, b, tmp_path / "cmp2", n_boot=0)
