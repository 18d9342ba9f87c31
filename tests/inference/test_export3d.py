"""The volumetric predictor (:class:`VolumeModule`, :class:`VolumePredictor`) and the 3D export,
on a tiny 3D U-Net with random weights and a hand-written run folder; the graph is checked
against a NumPy/SciPy pipeline (medseg.data.resample) computed here."""

from __future__ import annotations

import json
import logging
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from medseg.artifacts.runs import create_run
from medseg.config import load_config
from medseg.data.fingerprint import VolumePlan
from medseg.data.resample import normalize_volume, resize_image, target_shape
from medseg.errors import ConfigError, DataError, ModelError, RunExistsError
from medseg.inference import export3d
from medseg.inference.export import export_run
from medseg.inference.export3d import export_volumetric
from medseg.inference.sliding_window import sliding_window_inference
from medseg.inference.volumetric import (
    VolumeModule,
    VolumePredictor,
    normalize_graph,
    structure_volumes_ml,
    tta_axes,
)
from medseg.models.unet3d import build_unet3d
from medseg.utils import atomic_write_json, file_sha256

pytestmark = pytest.mark.slow

LABELS = {0: "background", 1: "Anterior", 2: "Posterior"}
PATCH = [16, 16, 16]
TARGET = [1.0, 0.8, 1.2]  # anisotropic target grid
TOL = 1e-4


def _plan(**changes) -> VolumePlan:
    fields = {
        "target_spacing": list(TARGET),
        "patch_size": list(PATCH),
        "normalization": "zscore",
        "intensity_clip": [],
        "channel_mean": [],
        "channel_std": [],
        "labels": dict(LABELS),
        "channels": {0: "MRI"},
        "modality": "MR",
    }
    return VolumePlan(**{**fields, **changes})


@pytest.fixture(scope="module")
def model() -> keras.Model:
    keras.utils.set_random_seed(3)
    return build_unet3d(1, 3, base_filters=2, depth=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model):
    """A 3D run folder as training leaves it: config.yaml, plan.json, best.keras, metrics."""
    root = tmp_path_factory.mktemp("runs3d")
    overrides = [
        "model.name=unet3d",
        "data.layout=msd",
        "data.channels=1",
        "model.num_classes=3",
        "model.base_filters=2",
        "model.depth=2",
        "train.patch_size=[16,16,16]",
        "volume.sw_batch=3",
        f"run.root={root}",
        "run.name=tiny3d",
        f"export.dir={root / 'exports'}",
    ]
    run, _ = create_run(load_config(None, overrides))
    model.save(run.best_model)
    atomic_write_json(run.plan_path, _plan().to_dict())
    atomic_write_json(run.metrics_path, {"val": {"dice_mean": 0.5}})
    return run.path


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """The run exported through ``medseg export``'s entry point (dispatched to 3D)."""
    return export_run(run_dir, tmp_path_factory.mktemp("exp") / "tiny3d")


def _volume(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)  # structures, not only noise
    return (400 + 300 * smooth / smooth.std() + rng.normal(size=shape)).astype(np.float32)[
        ..., None
    ]


# ------------------------------------------------------------------ VolumeModule


def test_module_at_another_spacing_returns_the_input_shape_and_matches_scipy(model):
    """normalise -> linear resample to the plan's grid -> sliding window -> linear resample back
    (probabilities) -> arg-max, the resampling done here with scipy (medseg.data.resample)."""
    plan = _plan()
    module = VolumeModule(model, plan, overlap=0.5, sw_batch=2)
    x, spacing = _volume((19, 27, 11)), [1.3, 0.65, 1.7]
    out = module(tf.constant(x), tf.constant(spacing, tf.float32))
    assert out["probabilities"].shape == (19, 27, 11, 3) and out["labels"].shape == (19, 27, 11)

    grid = target_shape(x.shape, spacing, TARGET)
    assert grid != (19, 27, 11)
    z = resize_image(normalize_volume(x, plan), grid, order=1)
    win = sliding_window_inference(z[None], model, PATCH, 0.5, 2, True, num_classes=3)[0]
    want = resize_image(win.numpy(), (19, 27, 11), order=1)
    np.testing.assert_allclose(out["probabilities"].numpy(), want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, atol=1e-5)
    labels = out["labels"].numpy()
    assert (labels == want.argmax(-1)).mean() > 0.999
    assert len(np.unique(labels)) > 1  # the check means something: not one label everywhere


def test_labels_are_identical_whether_resampling_is_skipped_or_not(model):
    """At the plan's spacing the graph skips resampling; a spacing off by 1e-4 takes the
    resampling branch onto the same grid, which must change nothing."""
    module = VolumeModule(model, _plan(), sw_batch=4)
    x = tf.constant(_volume((21, 17, 24), seed=1))
    skipped = module(x, tf.constant(TARGET, tf.float32))
    resampled = module(x, tf.constant(np.float32(TARGET) * np.float32(1 + 1e-4)))
    np.testing.assert_array_equal(skipped["labels"].numpy(), resampled["labels"].numpy())
    np.testing.assert_array_equal(
        skipped["probabilities"].numpy(), resampled["probabilities"].numpy()
    )


def test_a_volume_smaller_than_the_window(model):
    module = VolumeModule(model, _plan(), sw_batch=1)
    out = module(tf.constant(_volume((7, 9, 30), seed=2)), tf.constant([2.0, 0.8, 1.2]))
    assert out["labels"].shape == (7, 9, 30)


@pytest.mark.parametrize(
    "plan",
    [
        _plan(),
        _plan(
            normalization="ct",
            intensity_clip=[-100.0, 300.0],
            channel_mean=[50.0],
            channel_std=[80.0],
        ),  # fmt: skip
        _plan(normalization="none"),
    ],
    ids=["zscore", "ct", "none"],
)
def test_in_graph_normalisation_is_the_training_one(plan):
    x = np.random.default_rng(4).uniform(-500, 800, (9, 8, 7, 1)).astype(np.float32)
    got = normalize_graph(tf.constant(x), plan).numpy()
    np.testing.assert_allclose(got, normalize_volume(x, plan), rtol=1e-5, atol=1e-5)


def test_a_plan_that_does_not_fit_the_model_is_refused(model):
    with pytest.raises(ModelError, match="does not fit the plan"):
        VolumeModule(model, _plan(labels={0: "background", 1: "Hippocampus"}))


def test_structure_volumes_in_ml():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:2] = 1  # 200 voxels
    labels[5, :3, :] = 2  # 30 voxels
    got = structure_volumes_ml(labels, (2.0, 0.5, 1.5), {0: "background", **{1: "A", 2: "P"}})
    assert got == pytest.approx({"A": 200 * 1.5 / 1000, "P": 30 * 1.5 / 1000})
    assert structure_volumes_ml(labels, (1, 1, 1), {1: "A", 3: "X"}) == {"A": 0.2, "X": 0.0}


# ------------------------------------------------------------------ export


def test_export_equals_the_keras_path_on_an_odd_shape_and_spacing(run_dir, exported):
    from_run, from_export = VolumePredictor(run_dir), VolumePredictor(exported)
    x, spacing = _volume((23, 15, 19), seed=5), (1.4, 0.7, 0.9)
    a, b = from_run.predict(x, spacing), from_export.predict(x, spacing)
    assert a["labels"].shape == (23, 15, 19) and a["labels"].dtype == np.uint8
    assert np.abs(a["probabilities"] - b["probabilities"]).max() <= TOL
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert from_export.labels == LABELS == from_run.labels
    assert from_export.num_classes == 3 and from_export.channels == 1


def test_the_model_card(run_dir, exported):
    card = json.loads((exported / "medseg.json").read_text())
    assert card["dims"] == 3 and card["task"] == "segmentation" and card["model"] == "unet3d"
    assert card["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert card["channels"] == {"0": "MRI"} and card["input"]["channels"] == 1
    assert VolumePlan.from_dict(card["plan"]) == _plan()
    assert card["sliding_window"]["patch_size"] == PATCH
    assert card["sliding_window"]["sw_batch"] == 3  # volume.sw_batch of the run's config
    assert card["metrics"] == {"val": {"dice_mean": 0.5}}
    v = card["verification"]
    assert v["max_abs_diff"] <= v["tolerance"] and len(v["inputs"]) == 2
    assert v["inputs"][0]["spacing"] != TARGET  # checked off the plan's grid too
    assert card["keras"]["sha256"]["model.keras"] == file_sha256(exported / "model.keras")
    assert file_sha256(exported / "model.keras") == file_sha256(run_dir / "checkpoints/best.keras")


def test_export_refuses_to_overwrite_unless_asked(run_dir, exported, tmp_path):
    with pytest.raises(RunExistsError, match="exists"):
        export_volumetric(run_dir, exported)
    out = tmp_path / "copy"
    shutil.copytree(exported, out)
    export_volumetric(run_dir, out, overwrite=True, mirror=True)
    card = json.loads((out / "medseg.json").read_text())
    assert card["tta"]["enabled"] is True and card["sliding_window"]["mirror"] is True
    assert not list(tmp_path.glob(".copy.tmp-*"))


def test_a_failed_verification_leaves_no_export(run_dir, tmp_path, monkeypatch):
    bad = {"max_abs_diff": 0.5, "label_agreement": 0.0, "inputs": []}
    monkeypatch.setattr(export3d, "verify_volumetric_export", lambda *a, **k: bad)
    with pytest.raises(ModelError, match="differs from the Keras path"):
        export_volumetric(run_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_3d_export_options_that_do_not_apply_are_refused(run_dir, exported, tmp_path):
    with pytest.raises(ConfigError, match="unet3d"):
        export_run(run_dir, tmp_path / "x", formats="tflite")
    with pytest.raises(ConfigError, match="fixed in an export"):
        VolumePredictor(exported, overlap=0.25)


def test_predictor_refuses_bad_inputs_and_a_run_without_plan(run_dir, tmp_path):
    predictor = VolumePredictor(run_dir)
    with pytest.raises(DataError, match="model's channels"):
        predictor.predict(np.zeros((8, 8, 8, 2), np.float32), (1, 1, 1))
    with pytest.raises(DataError, match="spacing"):
        predictor.predict(np.zeros((8, 8, 8), np.float32), (1, 0, 1))
    no_plan = tmp_path / "noplan"
    shutil.copytree(run_dir, no_plan)
    (no_plan / "plan.json").unlink()
    with pytest.raises(ModelError, match="plan.json"):
        VolumePredictor(no_plan)


def test_a_cv_folder_predicts_the_mean_of_its_folds(run_dir, tmp_path):
    """A 3D cross-validation folder (ensemble.json + fold run folders sharing one plan) is the
    mean probability of its fold models; it is not exported as an ensemble."""
    root = tmp_path / "cv"
    for k in (1, 2):
        shutil.copytree(run_dir, root / f"fold_{k}")
    keras.utils.set_random_seed(7)
    build_unet3d(1, 3, base_filters=2, depth=2).save(root / "fold_2/checkpoints/best.keras")
    shutil.copy(run_dir / "config.yaml", root / "config.yaml")
    folds = [{"fold": k, "model": f"fold_{k}/checkpoints/best.keras"} for k in (1, 2)]
    atomic_write_json(root / "ensemble.json", {"combine": "mean_probability", "folds": folds})
    x, spacing = _volume((18, 20, 17), seed=6), (1.1, 0.9, 1.0)
    p1, p2, mean = (
        VolumePredictor(p).predict(x, spacing)["probabilities"]
        for p in (root / "fold_1", root / "fold_2", root)
    )
    assert np.abs(p1 - p2).max() > 0.01  # two different models
    np.testing.assert_allclose(mean, (p1 + p2) / 2, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="no ensemble"):
        export_run(root, tmp_path / "cv-export")


def test_mirror_tta_flips_only_the_axes_training_flipped(caplog):
    cfg = load_config(None, ["augment.hflip=0.5", "augment.dflip=0.3"])
    assert tta_axes(cfg, True) == [0, 2] and tta_axes(cfg, False) == []
    cfg = load_config(None, ["augment.hflip=0"])
    with caplog.at_level(logging.WARNING):
        assert tta_axes(cfg, True) == []
    assert "training flipped no axis" in caplog.text
