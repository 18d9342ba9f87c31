"""The training loop: resume with optimizer state, early stopping, NaN, determinism, evaluation
on a folder, and MirroredStrategy on a CPU split into two logical devices."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

from medseg.config import load_config
from medseg.errors import ModelError, RunExistsError
from medseg.evaluation.evaluate import evaluate
from medseg.training.train import resume, train, validation_epochs

pytestmark = pytest.mark.slow

TINY = [
    "data.image_size=[32,32]",
    "model.base_filters=4",
    "model.depth=2",
    "train.batch_size=8",
    "train.warmup_epochs=0",
    "data.test_fraction=0.2",
    "augment.enabled=false",
]


def _cfg(tiny_synth, tmp_path, name, *extra):
    overrides = [
        *TINY,
        f"data.root={tiny_synth / 'segmentation'}",
        f"run.root={tmp_path}",
        f"run.name={name}",
        *extra,
    ]
    return load_config(None, overrides)


class Crash(keras.callbacks.Callback):
    """Records the optimizer state after epoch ``at`` and then kills the run."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.state = at, None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            opt = self.model.optimizer
            self.state = [np.array(v) for v in opt.variables]
            raise RuntimeError("simulated crash")


class FirstEpoch(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epoch, self.state = None, None

    def on_epoch_begin(self, epoch, logs=None):
        if self.epoch is None:
            self.epoch = epoch
            self.state = [np.array(v) for v in self.model.optimizer.variables]


def test_resume_continues_at_the_next_epoch_with_the_optimizer_state(tiny_synth, tmp_path):
    cfg = _cfg(tiny_synth, tmp_path, "r1", "train.epochs=3")
    crash = Crash(at=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, callbacks=[crash])
    run = tmp_path / "r1"
    assert json.loads((run / "state.json").read_text())["status"] == "running"

    first = FirstEpoch()
    result = resume(run, callbacks=[first])
    assert first.epoch == 2  # epochs 0 and 1 were done before the crash
    assert len(first.state) == len(crash.state)
    for restored, saved in zip(first.state, crash.state, strict=True):
        np.testing.assert_array_equal(restored, saved)  # iterations, Adam moments, ...
    rows = list(csv.DictReader((run / "logs" / "history.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert result.metrics["split"] == "val"
    with pytest.raises(RunExistsError, match="finished"):
        resume(run)


def test_early_stopping_and_nan(tiny_synth, tmp_path):
    # A learning rate of ~0 without batch norm or dropout: val_loss never improves.
    stopped = train(
        _cfg(
            tiny_synth,
            tmp_path,
            "es",
            "train.epochs=6",
            "train.early_stopping=1",
            "train.learning_rate=1e-20",
            "train.lr_schedule=constant",
            "model.batch_norm=false",
            "model.dropout=0",
        )
    )
    assert len(stopped.history["loss"]) == 2
    with pytest.raises(ModelError, match="NaN|nan|inf"):
        train(
            _cfg(
                tiny_synth,
                tmp_path,
                "nan",
                "train.epochs=2",
                "train.optimizer=sgd",
                "train.learning_rate=1e30",
                "train.lr_schedule=constant",
                "model.batch_norm=false",
            )
        )


@pytest.mark.parametrize(("checkpoint", "cache"), [("best", "true"), ("last", "false")])
def test_the_final_evaluation_is_what_medseg_evaluate_writes(
    tiny_synth, tmp_path, checkpoint, cache
):
    # train scores the chosen checkpoint with what it holds in memory; evaluate reads it all back
    result = train(
        _cfg(tiny_synth, tmp_path, "ev", "train.epochs=2", f"data.cache={cache}"),
        eval_checkpoint=checkpoint,
    )
    run = result.run.path
    files = [run / "cases_val.csv", run / "plots" / "overlays_val.png"]
    written = {f: f.read_bytes() for f in files}
    recorded = json.loads((run / "metrics.json").read_text())["val"]
    assert recorded["checkpoint"] == checkpoint
    assert recorded == json.loads(json.dumps(result.metrics))

    again = evaluate(run, split="val", checkpoint=checkpoint)
    speed = "inference_img_s"
    assert {k: v for k, v in again.items() if k != speed} == {
        k: v for k, v in recorded.items() if k != speed
    }
    assert {f: f.read_bytes() for f in files} == written


def test_validation_every_n_epochs_and_after_the_last(tiny_synth, tmp_path):
    assert validation_epochs(5, 1) == 1
    assert validation_epochs(8, 4) == [4, 8]
    assert validation_epochs(5, 2) == [2, 4, 5]
    # Validated epochs (1-based): 2, 4 and the last, 5. Val_loss never improves (learning rate
    # ~0) and patience 2 counts validated epochs only, so all five epochs run.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "val_loss not available" warnings
        result = train(
            _cfg(
                tiny_synth,
                tmp_path,
                "vf",
                "train.epochs=5",
                "train.validation_freq=2",
                "train.early_stopping=2",
                "train.learning_rate=1e-20",
                "train.lr_schedule=constant",
                "model.batch_norm=false",
                "model.dropout=0",
            )
        )
    assert len(result.history["loss"]) == 5
    assert len(result.history["val_loss"]) == 3
    run = tmp_path / "vf"
    rows = list(csv.DictReader((run / "logs" / "history.csv").read_text().splitlines()))
    assert [bool(r["val_loss"]) for r in rows] == [False, True, False, True, True]
    assert (run / "checkpoints" / "best.keras").is_file()
    assert (run / "plots" / "curves.png").is_file()
    assert result.metrics["split"] == "val"

    # patience 1: the first validation (epoch 2) sets the best, the next (epoch 4) stops it
    stopped = train(
        _cfg(
            tiny_synth,
            tmp_path,
            "vf-es",
            "train.epochs=8",
            "train.validation_freq=2",
            "train.early_stopping=1",
            "train.learning_rate=1e-20",
            "train.lr_schedule=constant",
            "model.batch_norm=false",
            "model.dropout=0",
        )
    )
    assert len(stopped.history["loss"]) == 4


@pytest.fixture
def restore_determinism():
    """enable_op_determinism is process-wide: switch it off again for the tests that follow."""
    from tensorflow.python.framework import config as tf_config

    yield
    tf_config.disable_op_determinism()


def test_deterministic_runs_repeat_exactly_and_evaluate_on_a_folder(
    tiny_synth, tmp_path, restore_determinism
):
    a = train(
        _cfg(
            tiny_synth,
            tmp_path,
            "d1",
            "train.epochs=1",
            "train.deterministic=true",
            "augment.enabled=true",
        )
    )
    b = train(
        _cfg(
            tiny_synth,
            tmp_path,
            "d2",
            "train.epochs=1",
            "train.deterministic=true",
            "augment.enabled=true",
        )
    )
    assert a.history["loss"] == b.history["loss"]
    assert (a.run.path / "model_summary.txt").read_text().count("Total params") == 1

    folder = evaluate(a.run.path, data=tiny_synth / "segmentation")
    assert folder["split"] == "folder:segmentation"
    assert folder["n_images"] == 36 and folder["n_groups"] == 6
    metrics = json.loads((a.run.path / "metrics.json").read_text())
    assert set(metrics) == {"val", "folder:segmentation"}
    assert (a.run.path / "plots" / "overlays_folder_segmentation.png").is_file()


MIRRORED = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from medseg.config import load_config
from medseg.training.train import get_strategy, train
cfg = load_config(None, sys.argv[1:])
strategy = get_strategy(cfg)
print("replicas", strategy.num_replicas_in_sync)
result = train(cfg)
print("epochs", len(result.history["loss"]))
"""


def test_mirrored_strategy_on_two_logical_cpus(tiny_synth, tmp_path):
    args = [
        *TINY,
        f"data.root={tiny_synth / 'segmentation'}",
        f"run.root={tmp_path}",
        "run.name=m1",
        "train.epochs=1",
        "train.distribute=mirrored",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", MIRRORED, *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "replicas 2" in proc.stdout and "epochs 1" in proc.stdout
    assert (tmp_path / "m1" / "checkpoints" / "best.keras").is_file()


class ComputeDtypes(keras.callbacks.Callback):
    """Records the compute dtype of the first and last convolution at the start of training."""

    def on_train_begin(self, logs=None):
        convs = [layer for layer in self.model.layers if isinstance(layer, keras.layers.Conv2D)]
        self.first, self.last = convs[0].compute_dtype, convs[-1].compute_dtype


@pytest.fixture
def float32_after():
    """Puts the process-wide Keras dtype policy back to float32 whatever the test did."""
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_a_mixed_bfloat16_run_trains_in_bfloat16_and_serves_in_float32(
    tiny_synth, tmp_path, float32_after
):
    from medseg.inference.export import export_run

    seen = ComputeDtypes()
    bf16 = "train.mixed_precision=mixed_bfloat16"
    result = train(_cfg(tiny_synth, tmp_path, "bf16", "train.epochs=1", bf16), [seen])
    # the body computed in bfloat16, the output head (and so the loss) in float32
    assert (seen.first, seen.last) == ("bfloat16", "float32")
    assert np.isfinite(result.metrics["dice"])
    # a new process (float32 policy) loads the saved model in float32: the weights are float32
    # either way, and the model is served (export_run checks the SavedModel against it) in it
    keras.mixed_precision.set_global_policy("float32")
    model = keras.models.load_model(result.run.path / "checkpoints" / "last.keras")
    assert all(layer.compute_dtype == "float32" for layer in model.layers if layer.weights)
    probs = model.predict(np.random.default_rng(0).random((2, 32, 32, 3), "float32"), verbose=0)
    assert probs.dtype == np.float32 and np.isfinite(probs).all()
    assert (export_run(result.run.path, tmp_path / "export") / "saved_model").is_dir()
    # the next run with the default policy trains in float32 again, whatever the last one set
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    train(_cfg(tiny_synth, tmp_path, "f32", "train.epochs=1"), [seen])
    assert (seen.first, seen.last) == ("float32", "float32")
