"""``score_folders`` (``medseg evaluate --pred DIR --truth DIR``) on tiny folders of label maps
written here: NIfTI with anisotropic spacing, PNG (pixels), a DICOM SEG prediction; the rows
against ``case_rows`` on the same arrays, patient groups, both intervals, and each refusal."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.data.synthetic3d import lps_affine, write_nifti_volume
from medseg.errors import DataError, RunExistsError
from medseg.evaluation.files import bca_interval, score_folders
from medseg.evaluation.volumetric import case_rows
from tests.conftest import run_cli

SHAPE = (12, 16, 10)  # slice, row, col
SPACING = (2.0, 1.0, 1.5)  # mm
LABELS = {1: "label_1", 2: "label_2"}
IDS = [f"case_{i:03d}" for i in range(4)]


def _truth(k: int) -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[3 : 8 + k % 2, 4:10, 2:6] = 1
    labels[5:10, 8 : 13 - k % 2, 6:9] = 2
    return labels


def _pred(k: int) -> np.ndarray:
    """The truth moved by ``k`` voxels (rows, structure 1) and cut (structure 2); case 3 misses
    structure 2 (HD95 missing)."""
    labels = np.zeros(SHAPE, np.uint8)
    truth = _truth(k)
    labels[np.roll(truth == 1, k, axis=1)] = 1
    two = truth == 2
    two[:, :, 8] = False
    labels[two & (k != 3)] = 2
    return labels


def _write(folder: Path, arrays: dict[str, np.ndarray], spacing=SPACING) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for cid, labels in arrays.items():
        write_nifti_volume(folder / f"{cid}.nii.gz", labels, lps_affine(labels.shape, spacing))
    return folder


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    pred = _write(tmp_path / "pred", {c: _pred(k) for k, c in enumerate(IDS)})
    truth = _write(tmp_path / "truth", {c: _truth(k) for k, c in enumerate(IDS)})
    (pred / "dataset.json").write_text("{}")  # nnU-Net writes one into its predictions: ignored
    return pred, truth


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rows_match_case_rows_and_groups_give_patients(tmp_path, folders):
    pred, truth = folders
    groups = tmp_path / "groups.csv"
    groups.write_text("case,patient\n" + "".join(f"{c},p{k // 2}\n" for k, c in enumerate(IDS)))
    result = score_folders(pred, truth, tmp_path / "out", groups=groups, n_boot=200)

    rows = _csv(tmp_path / "out" / "cases.csv")
    expected = [
        r
        for k, c in enumerate(IDS)
        for r in case_rows(c, f"p{k // 2}", _pred(k), _truth(k), SPACING, LABELS, 1.0)
    ]
    assert [(r["id"], r["structure"]) for r in rows] == [
        (r["id"], r["structure"]) for r in expected
    ]
    for got, want in zip(rows, expected, strict=True):
        assert got["group"] == want["group"] and got["unit"] == "mm"
        for col in ("dice", "hd95_mm", "assd_mm", "nsd_1mm", "volume_diff_ml"):
            np.testing.assert_allclose(float(got[col]), want[col], rtol=1e-9, equal_nan=True)
    assert np.isnan(float(rows[-1]["hd95_mm"])) and rows[-1]["empty"] == "pred"

    patients = _csv(tmp_path / "out" / "groups.csv")
    assert [(r["group"], r["structure"]) for r in patients] == [
        ("p0", "label_1"), ("p0", "label_2"), ("p1", "label_1"), ("p1", "label_2")
    ]  # fmt: skip
    dice_p1 = np.mean([float(r["dice"]) for r in rows if r["group"] == "p1" and r["label"] == "1"])
    assert float(patients[2]["dice"]) == pytest.approx(dice_p1)
    assert result["n_cases"] == 4 and result["n_patients"] == 2 and result["unit"] == "mm"
    assert result["labels"] == {"1": "label_1", "2": "label_2"}
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (
        metrics["ci_percentile"]["label_1"]["dice"]
        == result["summary"]["structures"]["label_1"]["dice"]["ci"]
    )
    assert set(metrics["ci_bca"]) == {"label_1", "label_2", "macro"}
    assert {"ci_percentile", "ci_bca"} == set(metrics["ci_methods"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| statistic | Dice | HD95 (mm) | ASSD (mm) | NSD@1mm |" in report
    assert "## label_2 (label 2)" in report and "95% CI BCa" in report


def test_labels_from_dataset_json_and_groups_file_checked(tmp_path):
    root = tmp_path / "Task04"
    truth = _write(root / "labelsTr", {c: _truth(k) for k, c in enumerate(IDS[:2])})
    _write(root / "imagesTr", {f"{c}_0000": _truth(k) for k, c in enumerate(IDS[:2])})
    (root / "dataset.json").write_text(
        json.dumps({"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "A", "2": "P"}})
    )
    pred = _write(tmp_path / "pred", {c: _pred(k) for k, c in enumerate(IDS[:2])})
    result = score_folders(pred, truth, tmp_path / "out", n_boot=0)
    assert list(result["summary"]["structures"]) == ["A", "P"]
    assert result["labels_from"] == str(root / "dataset.json")
    groups = tmp_path / "groups.csv"
    groups.write_text(f"case,patient\n{IDS[0]}.nii.gz,p0\n")
    with pytest.raises(DataError) as e:
        score_folders(pred, truth, tmp_path / "out2", groups=groups)
    assert _message(e) == f"{groups}: 1 case(s) have no patient ({IDS[1]})"


def test_bca_interval_is_scipy_bca_on_patients():
    from scipy import stats

    rng = np.random.default_rng(1)
    values = rng.uniform(0.6, 0.95, 12)
    got = bca_interval(values, np.arange(12), n_boot=500, seed=3)
    want = stats.bootstrap((values,), np.mean, n_resamples=500, method="BCa", rng=3)
    np.testing.assert_allclose(got, want.confidence_interval, rtol=1e-9)
    assert bca_interval(values, np.zeros(12), n_boot=500, seed=3) is None  # one patient


def test_png_pair_is_scored_in_pixels(tmp_path):
    from PIL import Image

    for side, make in (("pred", _pred), ("truth", _truth)):
        (tmp_path / side).mkdir()
        for k, cid in enumerate(IDS[:3]):
            Image.fromarray(make(k)[6]).save(tmp_path / side / f"{cid}.png")
    result = score_folders(tmp_path / "pred", tmp_path / "truth", tmp_path / "out", n_boot=0)
    assert result["unit"] == "px" and result["n_cases"] == 3
    row = _csv(tmp_path / "out" / "cases.csv")[0]
    want = case_rows(IDS[0], IDS[0], _pred(0)[6], _truth(0)[6], None, LABELS, 1.0)[0]
    assert row["unit"] == "px" and float(row["hd95_px"]) == pytest.approx(want["hd95_px"])
    assert "HD95 (px)" in (tmp_path / "out" / "report.md").read_text()


def test_seg_prediction_against_nifti_truth(tmp_path):
    from medseg.data.synthetic3d import write_dicom_series
    from medseg.io import read_dicom_series
    from medseg.io.writers import write_seg

    affine = lps_affine(SHAPE, SPACING)
    write_dicom_series(tmp_path / "series", np.zeros(SHAPE), SPACING, affine)
    (series,) = read_dicom_series(tmp_path / "series")
    (tmp_path / "pred").mkdir()
    write_seg(tmp_path / "pred" / "case_000.dcm", _pred(0), series.meta.source)  # slices 3..9
    _write(tmp_path / "truth", {"case_000": _truth(0)})
    score_folders(tmp_path / "pred", tmp_path / "truth", tmp_path / "out", n_boot=0)
    got = _csv(tmp_path / "out" / "cases.csv")
    want = case_rows("case_000", "case_000", _pred(0), _truth(0), SPACING, LABELS)
    assert [float(r["dice"]) for r in got] == pytest.approx([r["dice"] for r in want])


def _message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_refusals(tmp_path, folders):
    pred, truth = folders
    out = tmp_path / "out"
    shutil.copy(truth / "case_000.nii.gz", truth / "case_009.nii.gz")
    with pytest.raises(DataError) as e:
        score_folders(pred, truth, out)
    assert _message(e) == (
        f"{pred} and {truth}: unmatched cases: 0 prediction(s) without truth (none), "
        "1 truth file(s) without prediction (case_009)"
    )
    (truth / "case_009.nii.gz").unlink()

    _write(pred, {"case_001": _pred(1)[:, :, :8]})
    with pytest.raises(DataError) as e:
        score_folders(pred, truth, out)
    assert _message(e) == (
        "case case_001: prediction shape (12, 16, 8) differs from the truth's (12, 16, 10) "
        "(case_001.nii.gz, case_001.nii.gz)"
    )
    _write(pred, {"case_001": _pred(1)}, spacing=(2.0, 1.0, 1.0))
    with pytest.raises(DataError) as e:
        score_folders(pred, truth, out)
    assert _message(e) == (
        "case case_001: prediction spacing (2, 1, 1) mm differs from the truth's (2, 1, 1.5) mm"
    )
    moved = lps_affine(SHAPE, SPACING)
    moved[:3, 3] += [0.0, 0.0, 5.0]
    write_nifti_volume(pred / "case_001.nii.gz", _pred(1), moved)
    with pytest.raises(DataError) as e:
        score_folders(pred, truth, out)
    assert _message(e) == (
        "case case_001: prediction affine (position/orientation) differs from the truth's "
        "by up to 5 mm"
    )
    unknown = _pred(1)
    unknown[0, 0, 0] = 3
    _write(pred, {"case_001": unknown})
    with pytest.raises(DataError) as e:
        score_folders(pred, truth, out)
    assert _message(e) == (
        "case case_001: prediction label values [3] are not among the labels [0, 1, 2] "
        "(the values of the truth maps)"
    )
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written

    _write(pred, {"case_001": _pred(1)})
    shutil.copy(pred / "case_000.nii.gz", pred / "case_000_0000.nii.gz")  # an image channel
    with pytest.raises(DataError) as e:
        score_folders(pred, truth, out)
    assert _message(e) == (
        f"{pred}: case_000_0000 looks like an nnU-Net image channel (_0000), not a label map; "
        "give the folder of label maps (labelsTr, or the predictions)"
    )
    (pred / "case_000_0000.nii.gz").unlink()
    score_folders(pred, truth, out, n_boot=0)
    with pytest.raises(RunExistsError) as e:
        score_folders(pred, truth, out)
    assert _message(e) == f"{out}: already exists; pass --overwrite to replace it"
    score_folders(pred, truth, out, n_boot=0, overwrite=True)


@pytest.mark.slow
def test_cli_evaluate_pred_truth(tmp_path, folders):
    pred, truth = folders
    args = ["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", "out"]
    r = run_cli(*args, "--n-boot", "50", "--tolerance-mm", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "cases.csv", "groups.csv", "metrics.json", "report.md"
    }  # fmt: skip
    assert "nsd_2mm" in _csv(tmp_path / "out" / "cases.csv")[0]
    assert "label_1" in r.stdout and "written:" in r.stdout
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    both = run_cli("evaluate", "runs/x", "--pred", str(pred), "--truth", str(truth), cwd=tmp_path)
    assert both.returncode == 2 and "runs/x" in both.stderr
    half = run_cli("evaluate", "--pred", str(pred), "--out", "o2", cwd=tmp_path)
    assert half.returncode == 2 and "missing --truth DIR" in half.stderr


@pytest.mark.slow
def test_cli_compare_is_wired(tmp_path, folders):
    pred, truth = folders
    cmp = ["evaluate", "--compare", str(truth), str(pred), "--truth", str(truth), "--out", "cmp"]
    r = run_cli(*cmp, "--n-boot", "50", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cmp" / "comparison.json").is_file() and "written: cmp" in r.stdout
    mixed = run_cli(*cmp, "--pred", str(pred), cwd=tmp_path)
    assert mixed.returncode == 2 and "--compare and --pred: give one" in mixed.stderr
