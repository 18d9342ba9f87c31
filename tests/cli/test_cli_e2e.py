"""The vertical slice through the CLI, as a user runs it:
data synth -> train (1 epoch, 32x32) -> evaluate -> export -> reload SavedModel -> predict.

The commands run in the test process (``tests.conftest.run_cli``); one test checks that they print
what the console command ``python -m medseg.cli`` prints in a process of its own."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import REPO, run_cli, run_cli_subprocess

pytestmark = pytest.mark.slow

TINY = [
    "--set",
    "data.image_size=[32,32]",
    "--set",
    "model.base_filters=4",
    "--set",
    "model.depth=2",
    "--set",
    "train.epochs=1",
    "--set",
    "train.warmup_epochs=0",
    "--set",
    "train.batch_size=8",
    "--set",
    "data.test_fraction=0.2",
]


def _ok(proc):
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    shutil.copytree(REPO / "configs", work / "configs")
    _ok(
        run_cli(
            "data",
            "synth",
            "--out",
            "data/synthetic",
            "--size",
            "48",
            "--patients",
            "6",
            "--slices",
            "6",
            "--per-class",
            "4",
            cwd=work,
        )
    )
    return work


@pytest.fixture(scope="module")
def trained(workdir):
    proc = _ok(run_cli("train", "-c", "configs/demo.yaml", "--name", "tiny", *TINY, cwd=workdir))
    return workdir / "runs" / "tiny", proc


def test_train_writes_the_run_folder(trained):
    run, proc = trained
    for rel in (
        "config.yaml",
        "splits.json",
        "checkpoints/best.keras",
        "checkpoints/last.keras",
        "logs/history.csv",
        "metrics.json",
        "plots/curves.png",
        "state.json",
    ):
        assert (run / rel).is_file(), rel
    assert any((run / "logs" / "tensorboard").rglob("events.out.tfevents*"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["image_size"] == [32, 32] and cfg["train"]["epochs"] == 1
    assert cfg["medseg"]["config_hash"]
    with open(run / "logs" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and "val_dice" in rows[0]
    metrics = json.loads((run / "metrics.json").read_text())["val"]
    assert 0.0 <= metrics["dice"] <= 1.0 and 0.0 <= metrics["iou"] <= metrics["dice"] + 1e-9
    splits = json.loads((run / "splits.json").read_text())
    groups = {k: set(v) for k, v in splits["groups"].items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert "run: " in proc.stdout


def test_rerunning_a_finished_run_refuses_to_overwrite(trained, workdir):
    proc = run_cli("train", "-c", "configs/demo.yaml", "--name", "tiny", *TINY, cwd=workdir)
    assert proc.returncode == 2
    assert "runs/tiny" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_on_test_split(trained, workdir):
    run, _ = trained
    proc = _ok(run_cli("evaluate", str(run), "--split", "test", cwd=workdir))
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test"}
    test = metrics["test"]
    assert test["split"] == "test" and test["n_images"] > 0 and test["n_groups"] >= 1
    assert f"dice={test['dice']:.4f}" in proc.stdout


def test_export_reload_and_predict(trained, workdir, pydicom_files):
    import tensorflow as tf

    run, _ = trained
    _ok(run_cli("export", str(run), "--out", "models/tiny", cwd=workdir))
    export = workdir / "models" / "tiny"
    card = json.loads((export / "medseg.json").read_text())
    assert card["task"] == "segmentation" and card["input"]["model_size"] == [32, 32]
    assert card["verification"]["max_abs_diff"] <= card["verification"]["tolerance"]
    assert card["split_hash"] == json.loads((run / "splits.json").read_text())["hash"]

    # The SavedModel takes raw pixels of any size and returns masks at that size.
    loaded = tf.saved_model.load(str(export / "saved_model"))
    raw = np.random.default_rng(0).uniform(0, 255, (3, 40, 56, 3)).astype("float32")
    out = loaded.signatures["serve"](image=tf.constant(raw))
    assert out["probabilities"].shape == (3, 40, 56, 1)
    assert out["mask"].shape == (3, 40, 56)
    probs = out["probabilities"].numpy()
    assert probs.min() >= 0 and probs.max() <= 1
    np.testing.assert_array_equal(out["mask"].numpy(), (probs[..., 0] > 0.5).astype("int32"))

    # Exporting again without --overwrite is refused.
    again = run_cli("export", str(run), "--out", "models/tiny", cwd=workdir)
    assert again.returncode == 2 and "--overwrite" in again.stderr

    patient = sorted((workdir / "data/synthetic/segmentation").iterdir())[0]
    proc = run_cli(
        "predict",
        "--model",
        "models/tiny",
        str(patient),
        str(pydicom_files / "CT_small.dcm"),
        str(pydicom_files / "MR_truncated.dcm"),
        "--out",
        "preds",
        cwd=workdir,
    )
    assert proc.returncode == 1, proc.stderr  # one bad input: the job ran, a case failed
    assert "MR_truncated" in proc.stderr and "Traceback" not in proc.stderr
    rows = list(csv.DictReader((workdir / "preds" / "predictions.csv").read_text().splitlines()))
    by_status = {r["case_id"]: r["status"] for r in rows}
    n_slices = len([p for p in patient.iterdir() if not p.stem.endswith("_mask")])
    assert len(rows) == n_slices + 2
    assert by_status["MR_truncated"] == "error" and by_status["CT_small"] == "ok"
    ct = next(r for r in rows if r["case_id"] == "CT_small")
    mask = np.array(Image.open(workdir / "preds" / "CT_small" / "mask.png"))
    assert mask.shape == (int(ct["height"]), int(ct["width"])) == (128, 128)
    assert set(np.unique(mask)) <= {0, 255}
    assert int(ct["foreground_pixels"]) == int((mask > 0).sum())
    assert (workdir / "preds" / "CT_small" / "overlay.png").is_file()
    js = json.loads((workdir / "preds" / "predictions.json").read_text())
    assert [r["case_id"] for r in js] == [r["case_id"] for r in rows]


def test_predict_refuses_a_non_empty_output_folder(trained, workdir, pydicom_files):
    run, _ = trained
    out = workdir / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    proc = run_cli(
        "predict",
        "--model",
        str(run),
        str(pydicom_files / "MR_small.dcm"),
        "--out",
        str(out),
        cwd=workdir,
    )
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "earlier results"


def test_bad_config_is_one_line_and_exit_2(workdir):
    proc = run_cli("train", "-c", "configs/demo.yaml", "--set", "train.epochz=3", cwd=workdir)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("medseg: error")]
    assert len(lines) == 1 and "train.epochz" in lines[0] and "epochs" in lines[0]
    assert "Traceback" not in proc.stderr


def test_help_for_every_verb(workdir):
    for verb in (["demo"], ["train"], ["evaluate"], ["export"], ["predict"], ["data", "synth"]):
        proc = _ok(run_cli(*verb, "--help", cwd=workdir))
        assert "usage: medseg" in proc.stdout


def test_data_audit_through_the_cli(workdir):
    proc = _ok(
        run_cli("data", "audit", "data/synthetic/classification", "--out", "audit1", cwd=workdir)
    )
    report = json.loads((workdir / "audit1" / "audit.json").read_text())
    assert report["layout"] == "class_folders" and report["n_images"] == 4 * 4 + 4 * 1
    assert {"n_groups", "classes", "near_duplicate_groups", "problems"} <= set(report)
    assert (workdir / "audit1" / "montage.png").is_file()
    assert "class_folders" in proc.stdout
    # From a config: its data.root and layout.
    cfg = workdir / "audit.yaml"
    cfg.write_text("data:\n  root: data/synthetic/segmentation\n  layout: lgg\n")
    proc = _ok(run_cli("data", "audit", str(cfg), cwd=workdir))
    assert "lgg" in proc.stdout
    missing = run_cli("data", "audit", "no/such/folder", cwd=workdir)
    assert missing.returncode == 2 and "no/such/folder" in missing.stderr


def _timeless(text: str) -> str:
    """``text`` with its numbers masked (timings differ between two runs of a command)."""
    return re.sub(r"\d+(\.\d+)?", "N", text)


def test_in_process_runs_print_what_the_console_command_prints(workdir):
    """``run_cli`` against the entry point in a new process: the same exit code, output and log
    lines (with the CLI's own logging set-up), for a success, ``--quiet``, a medseg error and a
    usage error (``data`` verbs: no TensorFlow to start)."""
    runs = (
        ["data", "audit", "data/synthetic/classification"],
        ["--quiet", "data", "audit", "data/synthetic/classification"],
        ["data", "audit", "no/such/folder"],
        ["data", "audit"],
    )
    mine = [run_cli(*args, cwd=workdir) for args in runs]
    for args, proc in zip(runs, mine, strict=True):
        console = run_cli_subprocess(*args, cwd=workdir)
        assert proc.returncode == console.returncode, args
        assert _timeless(proc.stdout) == _timeless(console.stdout), args
        assert _timeless(proc.stderr) == _timeless(console.stderr), args
    assert [proc.returncode for proc in mine] == [0, 0, 2, 2]
    assert "medseg: scanned data/synthetic/classification" in mine[0].stderr
    assert mine[1].stderr == "" and _timeless(mine[1].stdout) == _timeless(mine[0].stdout)


def test_hub_classifier_through_the_cli(workdir):
    """make-hub-module -> train the TF-Hub classifier -> export -> predict class probabilities."""
    _ok(
        run_cli(
            "models",
            "make-hub-module",
            "--out",
            "hub/mnv2",
            "--input-size",
            "32",
            "--alpha",
            "0.35",
            cwd=workdir,
        )
    )
    assert (workdir / "hub" / "mnv2" / "saved_model.pb").is_file()
    _ok(
        run_cli(
            "train",
            "-c",
            "configs/brain-tumor-mobilenetv2.yaml",
            "--name",
            "cls",
            "--set",
            "data.root=data/synthetic/classification",
            "--set",
            "data.image_size=[32,32]",
            "--set",
            "model.hub_handle=hub/mnv2",
            "--set",
            "train.epochs=1",
            "--set",
            "train.warmup_epochs=0",
            "--set",
            "train.batch_size=4",
            "--set",
            "data.val_fraction=0.25",
            cwd=workdir,
        )
    )
    run = workdir / "runs" / "cls"
    metrics = json.loads((run / "metrics.json").read_text())["val"]
    assert metrics["class_names"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert (run / "plots" / "confusion_val.png").is_file() and (
        run / "plots" / "roc_val.png"
    ).is_file()
    assert "HubLayer" in (run / "model_summary.txt").read_text()

    _ok(run_cli("export", str(run), "--out", "models/cls", cwd=workdir))
    card = json.loads((workdir / "models" / "cls" / "medseg.json").read_text())
    assert card["task"] == "classification" and card["classes"] == metrics["class_names"]
    images = workdir / "data" / "synthetic" / "classification" / "Testing" / "glioma"
    _ok(run_cli("predict", "--model", "models/cls", str(images), "--out", "cls_preds", cwd=workdir))
    rows = list(
        csv.DictReader((workdir / "cls_preds" / "predictions.csv").read_text().splitlines())
    )
    assert len(rows) == len(list(images.iterdir())) and all(r["status"] == "ok" for r in rows)
    for r in rows:
        p = [float(r[f"p_{c}"]) for c in card["classes"]]
        assert abs(sum(p) - 1) < 1e-3 and r["class"] == card["classes"][int(np.argmax(p))]
    # Grad-CAM needs an inner feature map, which a TF-Hub module does not expose: the run
    # fails up front with one line, before writing any case.
    explain = run_cli(
        "predict",
        "--model",
        "models/cls",
        str(images),
        "--out",
        "cls_explain",
        "--explain",
        cwd=workdir,
    )
    assert explain.returncode == 2 and "TF-Hub" in explain.stderr
    assert not (workdir / "cls_explain" / "predictions.csv").exists()
