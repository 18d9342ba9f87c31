"""`medseg export`: single runs, cross-validation ensembles, flip TTA and TFLite, each checked
against the Keras models computed here (not with export.py's helpers), and the SavedModel served
in a process that never imports medseg."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg.config import load_config
from medseg.data.preprocess import preprocess_images, restore_size
from medseg.errors import ConfigError, RunExistsError
from medseg.inference.export import export_run
from medseg.training.cv import run_cv
from tests.conftest import REPO

pytestmark = pytest.mark.slow

TINY = [
    "data.image_size=[32,32]",
    "model.base_filters=4",
    "model.depth=2",
    "train.batch_size=8",
    "train.epochs=1",
    "train.warmup_epochs=0",
    "augment.enabled=false",
]
RAW_SIZE = (40, 56)  # not the model size: the graph resizes in and out
TOL = 1e-4
TFLITE_TOL = 1e-3


def _raw(channels: int, n: int = 3, size=RAW_SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, *size, channels)).astype(np.float32)


def _prep(card: dict) -> dict:
    return {
        "size": tuple(card["input"]["model_size"]),
        "method": card["normalization"],
        "window": tuple(card["window"]) if card["window"] else None,
        "policy": card["input"]["resize"],
    }


def _keras(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False), np.float64)


def _flip_mean(model, x: np.ndarray, seg: bool) -> np.ndarray:
    flipped = _keras(model, np.ascontiguousarray(x[:, :, ::-1]))
    return (_keras(model, x) + (flipped[:, :, ::-1] if seg else flipped)) / 2


def _serve(export, raw: np.ndarray) -> dict:
    loaded = tf.saved_model.load(str(export / "saved_model"))
    return {k: v.numpy() for k, v in loaded.signatures["serve"](image=tf.constant(raw)).items()}


def _tflite(path, x: np.ndarray) -> np.ndarray:
    interp = tf.lite.Interpreter(model_path=str(path))
    interp.resize_tensor_input(interp.get_input_details()[0]["index"], list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"])


def _to_raw_size(p: np.ndarray, card: dict, hw=RAW_SIZE) -> np.ndarray:
    return restore_size(
        tf.constant(p, tf.float32), hw, _prep(card)["size"], card["input"]["resize"]
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def cv_run(work, tiny_synth):
    """A 2-fold CV of a tiny U-Net (1 epoch per fold), without the report."""
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            *TINY,
            "cv.folds=2",
            "data.test_fraction=0.2",
            f"data.root={tiny_synth / 'segmentation'}",
            f"run.root={work / 'runs'}",
            "run.name=cv2",
        ],
    )
    root = run_cv(cfg, report=lambda root: {}).path
    summary = {"k": 2, "folds_done": [1, 2], "metrics": {"dice": {"pooled": 0.25}}, "junk": 1}
    (root / "cv_summary.json").write_text(json.dumps(summary))
    return root


@pytest.fixture(scope="module")
def seg_export(work, cv_run):
    """Fold 1 of the CV (an ordinary run folder) exported with TTA, SavedModel and TFLite."""
    return export_run(cv_run / "fold_1", work / "seg_tta", tta=True, formats="both")


@pytest.fixture(scope="module")
def cls_export(work, tiny_cls_run):
    """The session's tiny MobileNetV2 classifier on a TF-Hub module (32x32, alpha 0.35, 1 epoch;
    batch-norm momentum 0, so its outputs depend on the input), exported with TTA and TFLite."""
    return export_run(tiny_cls_run, work / "cls", tta=True, formats=("savedmodel", "tflite"))


@pytest.fixture(scope="module")
def cv_export(work, cv_run):
    return export_run(cv_run, work / "cv", formats="both")  # has ensemble.json: an ensemble


def test_segmentation_tta_matches_keras_on_another_size(seg_export, cv_run):
    card = json.loads((seg_export / "medseg.json").read_text())
    assert card["tta"]["enabled"] and card["tta"]["transforms"] == ["identity", "horizontal_flip"]
    assert card["ensemble"] is None and card["formats"] == ["savedmodel", "tflite"]
    assert card["keras"]["files"] == ["model.keras"]
    assert card["verification"]["max_abs_diff"] <= card["verification"]["tolerance"]
    ckpt = cv_run / "fold_1" / "checkpoints" / "best.keras"
    assert (seg_export / "model.keras").read_bytes() == ckpt.read_bytes()

    model = keras.models.load_model(seg_export / "model.keras", compile=False)
    raw = _raw(card["input"]["channels"])
    out = _serve(seg_export, raw)
    x = preprocess_images(tf.constant(raw), **_prep(card)).numpy()
    tta = _flip_mean(model, x, seg=True)
    want = _to_raw_size(tta, card)
    assert out["probabilities"].shape == (3, *RAW_SIZE, 1) and out["mask"].shape == (3, *RAW_SIZE)
    assert np.max(np.abs(out["probabilities"] - want)) < TOL
    np.testing.assert_array_equal(out["mask"], (out["probabilities"][..., 0] > 0.5).astype(int))
    # the flip really changes the answer, so the comparison above can tell TTA from no TTA
    assert np.max(np.abs(_to_raw_size(_keras(model, x), card) - want)) > 10 * TOL

    # TFLite: the model part, on the preprocessed batch at the model size
    tfl = card["tflite"]
    assert tfl["input"] == "preprocessed" and tfl["input_shape"] == [-1, 32, 32, 3]
    assert tfl["verification"]["max_abs_diff"] <= tfl["verification"]["tolerance"]
    got = _tflite(seg_export / "model.tflite", x)
    assert got.shape == (3, 32, 32, 1)
    assert np.max(np.abs(got - tta)) < TFLITE_TOL


def test_refuses_to_overwrite_then_replaces_without_tta(seg_export, cv_run):
    with pytest.raises(RunExistsError, match="--overwrite"):
        export_run(cv_run / "fold_1", seg_export)
    assert json.loads((seg_export / "medseg.json").read_text())["tta"]["enabled"]
    with pytest.raises(ConfigError, match="ensemble"):
        export_run(cv_run / "fold_1", seg_export.with_name("nope"), ensemble=True)
    with pytest.raises(ConfigError, match="format"):
        export_run(cv_run / "fold_1", seg_export.with_name("nope"), formats=("onnx",))
    assert not seg_export.with_name("nope").exists()

    only = export_run(cv_run / "fold_1", seg_export.with_name("tflite_only"), formats="tflite")
    card = json.loads((only / "medseg.json").read_text())
    assert not (only / "saved_model").exists() and (only / "model.tflite").is_file()
    assert card["formats"] == ["tflite"] and card["verification"] is None
    assert card["tflite"]["verification"]["max_abs_diff"] < TFLITE_TOL

    plain = export_run(cv_run / "fold_1", seg_export.with_name("seg_plain"))
    card = json.loads((plain / "medseg.json").read_text())
    assert not card["tta"]["enabled"] and card["tflite"] is None
    assert not (plain / "model.tflite").exists()
    model = keras.models.load_model(plain / "model.keras", compile=False)
    raw = _raw(card["input"]["channels"], seed=1)
    x = preprocess_images(tf.constant(raw), **_prep(card)).numpy()
    got = _serve(plain, raw)["probabilities"]
    assert np.max(np.abs(got - _to_raw_size(_keras(model, x), card))) < TOL


def test_classifier_export_and_tflite(cls_export, tiny_cls_run):
    card = json.loads((cls_export / "medseg.json").read_text())
    assert card["task"] == "classification" and len(card["classes"]) == 4
    assert "TF-Hub module" in card["keras"]["note"]
    model = keras.models.load_model(tiny_cls_run / "checkpoints" / "best.keras", compile=False)
    raw = _raw(3, size=(45, 37))
    out = _serve(cls_export, raw)
    x = preprocess_images(tf.constant(raw), **_prep(card)).numpy()
    want = _flip_mean(model, x, seg=False)
    assert card["tta"]["enabled"] and out["probabilities"].shape == (3, 4)
    assert want.std(axis=0).max() > 1e-3  # input-dependent, so the comparisons mean something
    assert np.max(np.abs(out["probabilities"] - want)) < TOL
    np.testing.assert_array_equal(out["label"], want.argmax(-1))
    assert card["tflite"]["output_shape"] == [-1, 4]
    assert np.max(np.abs(_tflite(cls_export / "model.tflite", x) - want)) < TFLITE_TOL


def test_cv_ensemble_is_the_mean_of_the_folds(cv_export, cv_run):
    card = json.loads((cv_export / "medseg.json").read_text())
    ens = card["ensemble"]
    assert ens["combine"] == "mean_probability"
    assert [f["fold"] for f in ens["folds"]] == [1, 2]
    assert [f["keras"] for f in ens["folds"]] == ["folds/fold_1.keras", "folds/fold_2.keras"]
    assert ens["folds"][0]["source"] == "fold_1/checkpoints/best.keras"
    assert ens["cv_manifest_hash"] == json.loads((cv_run / "splits.json").read_text())["hash"]
    assert ens["cv_summary"] == {
        "k": 2,
        "folds_done": [1, 2],
        "metrics": {"dice": {"pooled": 0.25}},
    }
    assert card["metrics"]["test"]["ensemble"] == ["fold_1", "fold_2"]
    assert not card["tta"]["enabled"] and not (cv_export / "model.keras").exists()
    assert card["formats"] == ["savedmodel", "tflite"]

    folds = [
        keras.models.load_model(cv_run / f"fold_{k}" / "checkpoints" / "best.keras", compile=False)
        for k in (1, 2)
    ]
    raw = _raw(card["input"]["channels"], seed=2)
    x = preprocess_images(tf.constant(raw), **_prep(card)).numpy()
    each = [_to_raw_size(_keras(m, x), card).numpy() for m in folds]
    got = _serve(cv_export, raw)["probabilities"]
    assert np.max(np.abs(got - (each[0] + each[1]) / 2)) < TOL
    assert np.max(np.abs(each[0] - each[1])) > 4 * TOL  # the mean is not just one of the folds
    at_model_size = [_keras(m, x) for m in folds]
    got = _tflite(cv_export / "model.tflite", x)
    assert np.max(np.abs(got - (at_model_size[0] + at_model_size[1]) / 2)) < TFLITE_TOL


def test_serving_without_medseg(seg_export, cls_export, cv_export, tmp_path):
    """The SavedModels serve raw pixels in a plain TensorFlow process (medseg never imported)."""
    cases = {"seg": (seg_export, (2, 50, 30, 3)), "cls": (cls_export, (2, 33, 41, 3))}
    cases["cv"] = (cv_export, (1, 32, 32, 3))
    for name, (_, shape) in cases.items():
        np.save(tmp_path / f"{name}.npy", _raw(shape[-1], shape[0], shape[1:3], seed=3))
    script = textwrap.dedent(
        f"""
        import sys, numpy as np, tensorflow as tf
        for name, path in {[(n, str(p / "saved_model")) for n, (p, _) in cases.items()]!r}:
            serve = tf.saved_model.load(path).signatures["serve"]
            out = serve(image=tf.constant(np.load(name + ".npy")))
            np.savez(name + "_out.npz", **{{k: v.numpy() for k, v in out.items()}})
        assert "medseg" not in sys.modules, "medseg was imported"
        print("served", flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "served" in proc.stdout, proc.stderr[-3000:]
    for name, (export, _) in cases.items():
        raw = np.load(tmp_path / f"{name}.npy")
        mine = _serve(export, raw)
        theirs = np.load(tmp_path / f"{name}_out.npz")
        assert set(theirs.files) == set(mine)
        for k in mine:
            np.testing.assert_allclose(theirs[k], mine[k], atol=1e-6)
