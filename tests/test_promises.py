"""What the README promises and no other test checked, through the CLI (``medseg.cli.main``, run
in-process) on the tiny synthetic set: ``train --resume`` finishes an interrupted run,
``--overwrite`` replaces a finished run, an export that fails its verification is discarded,
``predict --explain`` writes Grad-CAM heatmaps for a classifier, and ``cv --executor ray``."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import TINY_UNET, as_cli_sets


def _history_epochs(run: Path) -> list[int]:
    """The epochs in a run's ``logs/history.csv``, in file order."""
    with open(run / "logs" / "history.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def _status(run: Path) -> str:
    return json.loads((run / "state.json").read_text())["status"]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by relative path, with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def _interrupt_after(epoch: int):
    """A Keras callback that stops training as Ctrl-C would, at the end of ``epoch`` (0-based),
    after medseg's own callbacks have written that epoch's log row, checkpoints and backup."""
    import keras

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, at, logs=None):
            if at == epoch:
                raise KeyboardInterrupt

    return Interrupt()


# ----------------------------------------------------------------------------- train --resume


@pytest.mark.slow
def test_train_resume_finishes_an_interrupted_run(workdir, monkeypatch, capfd):
    from medseg.cli import main
    from medseg.config import load_config
    from medseg.training.train import train

    monkeypatch.chdir(workdir)
    cfg = load_config("configs/demo.yaml", [*TINY_UNET, "train.epochs=2", "run.name=interrupted"])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[_interrupt_after(0)])
    run = workdir / "runs" / "interrupted"
    assert _status(run) == "running" and _history_epochs(run) == [0]
    assert not (run / "metrics.json").exists()
    first_row = (run / "logs" / "history.csv").read_text().splitlines()[1]
    capfd.readouterr()

    assert main(["train", "--resume", "runs/interrupted"]) == 0
    out = capfd.readouterr().out
    assert "Epoch 2/2" in out and "Epoch 1/2" not in out  # continued, epoch 1 not trained again
    assert _history_epochs(run) == [0, 1]
    assert (run / "logs" / "history.csv").read_text().splitlines()[1] == first_row
    assert _status(run) == "done"
    assert "val" in json.loads((run / "metrics.json").read_text())
    assert not (run / "checkpoints" / "backup").exists()  # removed when the run is done


# ----------------------------------------------------------------------------- --overwrite


@pytest.mark.slow
def test_overwrite_replaces_a_finished_run(workdir, monkeypatch, capsys):
    from medseg.cli import main

    monkeypatch.chdir(workdir)
    args = ["train", "-c", "configs/demo.yaml", "--name", "replaced"]
    args += as_cli_sets([*TINY_UNET, "train.epochs=1"])
    assert main(args) == 0
    run = workdir / "runs" / "replaced"
    (run / "notes.txt").write_text("the user's own file in the old run")
    before = _files(run)
    capsys.readouterr()

    # Without --overwrite (and with another config): refused, the finished run untouched.
    changed = [*args, "--set", "train.learning_rate=0.002"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "runs/replaced" in err and "--overwrite" in err
    assert _files(run) == before

    # With --overwrite: a new run of the new config; nothing of the old folder is left.
    assert main([*changed, "--overwrite"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["learning_rate"] == 0.002
    assert _history_epochs(run) == [0] and _status(run) == "done"
    assert not (run / "notes.txt").exists()
    assert _files(run)["checkpoints/last.keras"] != before["checkpoints/last.keras"]


# ----------------------------------------------------------------------------- export


def _failing_verification(monkeypatch, run: Path) -> list:
    """Make the SavedModel check of ``export_run`` report 10x the run's export tolerance; returns
    the list its calls are recorded in."""
    from medseg.inference.export import export_run

    tolerance = yaml.safe_load((run / "config.yaml").read_text())["export"]["tolerance"]
    calls = []

    def verify_export(*args, **kwargs):
        calls.append(args)
        return 10 * tolerance

    monkeypatch.setattr(sys.modules[export_run.__module__], "verify_export", verify_export)
    return calls


def _leftovers(out: Path) -> list[str]:
    """Export folders or temporary folders of ``out`` in its parent."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.lstrip(".").startswith(out.name))


@pytest.mark.slow
def test_an_export_that_fails_verification_is_discarded(
    tiny_unet_run, tmp_path, monkeypatch, capsys
):
    from medseg.cli import main
    from medseg.errors import ModelError
    from medseg.inference.export import export_run

    calls = _failing_verification(monkeypatch, tiny_unet_run)
    out = tmp_path / "models" / "tiny"
    out.parent.mkdir()
    with pytest.raises(ModelError, match=r"differs from the Keras model.*export discarded"):
        export_run(tiny_unet_run, out)
    assert calls and _leftovers(out) == []

    capsys.readouterr()
    assert main(["export", str(tiny_unet_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "export discarded" in err and "Traceback" not in err
    assert _leftovers(out) == []


@pytest.mark.slow
def test_a_failed_export_keeps_the_export_it_would_overwrite(tiny_unet_run, tmp_path, monkeypatch):
    from medseg.errors import ModelError
    from medseg.inference.export import export_run

    out = tmp_path / "tiny"
    export_run(tiny_unet_run, out)
    good = _files(out)
    _failing_verification(monkeypatch, tiny_unet_run)
    with pytest.raises(ModelError, match="export discarded"):
        export_run(tiny_unet_run, out, overwrite=True)
    assert _files(out) == good and _leftovers(out) == ["tiny"]


# ----------------------------------------------------------------------------- predict --explain


@pytest.mark.slow
def test_predict_explain_writes_a_heatmap_per_case_for_a_classifier(workdir, monkeypatch):
    from medseg.cli import main

    monkeypatch.chdir(workdir)
    sets = [
        "data.root=data/synthetic/classification",
        "data.image_size=[32,32]",
        "model.alpha=0.35",
        "train.epochs=1",
        "train.warmup_epochs=0",
        "train.batch_size=4",
        "data.val_fraction=0.25",
        "augment.enabled=false",
    ]
    train = ["train", "-c", "configs/brain-tumor-mobilenetv2.yaml", "--name", "explained"]
    assert main([*train, *as_cli_sets(sets)]) == 0

    images = workdir / "data" / "synthetic" / "classification" / "Testing"
    args = ["predict", "--model", "runs/explained", str(images), "--out", "explain"]
    assert main([*args, "--explain", "--no-progress"]) == 0
    out = workdir / "explain"
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sources = sorted(images.rglob("*.png"))
    assert len(rows) == len(sources) == 4 and all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert row["gradcam"] == f"{row['case_id']}/gradcam.png"
        with Image.open(out / row["gradcam"]) as im:
            heat = np.asarray(im.convert("RGB"))
        assert heat.shape == (48, 48, 3)  # the case's own size (tiny_synth: 48x48)
        assert heat.std() > 0  # a heatmap over the image, not a blank picture


# ----------------------------------------------------------------------------- cv --executor ray


@pytest.mark.slow
def test_cv_on_ray_through_the_cli(workdir, monkeypatch, caplog):
    pytest.importorskip("ray")
    from medseg.cli import main

    caplog.set_level(logging.INFO, logger="medseg")
    monkeypatch.chdir(workdir)
    args = ["cv", "-c", "configs/demo.yaml", "--name", "cv-ray", "--folds", "2"]
    args += ["--executor", "ray", *as_cli_sets([*TINY_UNET, "train.epochs=1"])]
    assert main(args) == 0
    root = workdir / "runs" / "cv-ray"
    summary = json.loads((root / "cv_summary.json").read_text())
    assert summary["k"] == 2 and summary["folds_done"] == [1, 2]
    assert len(summary["metrics"]["dice"]["folds"]) == 2
    for k in (1, 2):
        assert _status(root / f"fold_{k}") == "done"
        assert (root / f"fold_{k}" / "oof.csv").is_file()
    assert (root / "report.md").is_file()
    # the folds ran as Ray tasks, not through the local executor
    assert "2 folds submitted to Ray" in caplog.text
