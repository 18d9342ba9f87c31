"""Cross-validation on Ray: the same folds as the local executor, number for number, and a
failing fold reported by number with its original error."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from medseg.config import load_config
from medseg.training.cv import _cv_manifest, _open_cv_run, run_cv

pytest.importorskip("ray")

pytestmark = pytest.mark.slow

TINY = [
    "data.image_size=[32,32]",
    "model.base_filters=4",
    "model.depth=2",
    "train.epochs=1",
    "train.batch_size=8",
    "train.warmup_epochs=0",
    "cv.folds=2",
    "train.deterministic=true",
    "augment.enabled=false",
]


def _cfg(data_root, tmp_path, name):
    return load_config(
        None, [*TINY, f"data.root={data_root}", f"run.root={tmp_path}", f"run.name={name}"]
    )


@pytest.fixture
def restore_determinism():
    """enable_op_determinism is process-wide: switch it off again for the tests that follow."""
    from tensorflow.python.framework import config as tf_config

    yield
    tf_config.disable_op_determinism()


def _report():
    """write_report when medseg.evaluation.report has it, else a stand-in returning {}."""
    if importlib.util.find_spec("medseg.evaluation.report") is None:
        return lambda root: {}
    report = importlib.import_module("medseg.evaluation.report")
    return getattr(report, "write_report", lambda root: {})


#: Keys of timings (throughput, durations), which differ from run to run.
TIMINGS = ("inference_img_s", "seconds")


def _numbers(a, b, where=""):
    """Assert that two JSON trees have the same keys and numbers within 1e-6 (timings aside)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            if not any(t in key for t in TIMINGS):
                _numbers(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _numbers(x, y, f"{where}[{i}]")
    elif isinstance(a, (int, float)) and not isinstance(a, bool):
        assert b == pytest.approx(a, abs=1e-6, nan_ok=True), where


def test_ray_folds_match_the_local_executor(tiny_synth, tmp_path, restore_determinism):
    data = tiny_synth / "segmentation"
    report = _report()
    local = run_cv(_cfg(data, tmp_path, "local"), executor="local", report=report)
    on_ray = run_cv(_cfg(data, tmp_path, "ray"), executor="ray", report=report)
    assert local.folds_done == on_ray.folds_done == [1, 2]
    for k in (1, 2):
        a, b = local.path / f"fold_{k}", on_ray.path / f"fold_{k}"
        assert (a / "oof.csv").read_text() == (b / "oof.csv").read_text()
        val_a = json.loads((a / "metrics.json").read_text())["val"]
        val_b = json.loads((b / "metrics.json").read_text())["val"]
        _numbers(val_a, val_b, f"fold_{k}.val")
    if (local.path / "cv_summary.json").is_file():
        _numbers(
            json.loads((local.path / "cv_summary.json").read_text()),
            json.loads((on_ray.path / "cv_summary.json").read_text()),
            "cv_summary",
        )
    # finished folds are skipped: a rerun on Ray starts no task and changes nothing
    again = run_cv(_cfg(data, tmp_path, "ray"), executor="ray", report=report)
    assert again.folds_done == [1, 2]


def test_a_failing_fold_is_named_with_its_error(tiny_synth, tmp_path, restore_determinism):
    from medseg.errors import MedsegError
    from medseg.training.ray_executor import FoldError, run_folds_on_ray

    data = tmp_path / "data"
    shutil.copytree(tiny_synth / "segmentation", data)
    cfg = _cfg(data, tmp_path, "broken")
    root = _open_cv_run(cfg)
    _cv_manifest(cfg, root)
    shutil.rmtree(data)  # the data vanished after the manifest was written
    with pytest.raises(FoldError, match=r"fold 2 failed: \w+Error: .*") as info:
        run_folds_on_ray(cfg.to_dict(), root, [2])
    assert isinstance(info.value, MedsegError)
    assert info.value.fold == 2 and list(info.value.failures) == [2]
    assert "Traceback" not in str(info.value)
    assert str(data) in str(info.value)
