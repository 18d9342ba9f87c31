"""2.5D input (``data.context_slices``): each slice with its neighbours as channels, built the
same way for training, tuning, scoring an export and predicting on a volume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from medseg.config import load_config
from medseg.data.augment import MissingSequence
from medseg.data.pipeline import load_arrays, slice_order
from medseg.data.preprocess import preprocess_images
from medseg.data.scan import Sample, natural_key, scan_dataset
from medseg.data.volumes import context_indices, stack_slices
from medseg.errors import ConfigError, DataError
from medseg.inference.predictor import EnsemblePredictor, Predictor
from medseg.io import read_image
from tests.conftest import TINY_UNET, run_cli


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


CTX = ["data.context_slices=1", "data.normalization=percentile_channel"]


def _volume(d: int = 4) -> np.ndarray:
    """[d, 2, 2, 3]: value = slice index + channel / 10."""
    return (np.arange(d)[:, None, None, None] + np.arange(3) / 10 + np.zeros((d, 2, 2, 3))).astype(
        np.float32
    )


def test_stack_slices_orders_neighbours_first_to_last_and_repeats_the_edges():
    vol = _volume()
    out = stack_slices(vol, 1)
    assert out.shape == (4, 2, 2, 9)
    np.testing.assert_allclose(out[0, 0, 0], [0, 0.1, 0.2, 0, 0.1, 0.2, 1, 1.1, 1.2], atol=1e-6)
    np.testing.assert_allclose(out[3, 1, 1, ::3], [2, 3, 3])
    np.testing.assert_array_equal(out[2, ..., 3:6], vol[2])  # the centre block is the slice
    assert stack_slices(vol, 0) is vol
    np.testing.assert_array_equal(
        context_indices(3, 2), [[0, 0, 0, 1, 2], [0, 0, 1, 2, 2], [0, 1, 2, 2, 2]]
    )


def test_slice_order_per_patient_folder_and_per_volume():
    def s(image: str, index: int | None = None) -> Sample:
        return Sample(id=image, image=image, target="m", group="g", index=index)

    samples = [
        s("/d/p1/p1_10.tif"),
        s("/d/p1/p1_9.tif"),
        s("/d/p2/p2_1.tif"),
        s("/d/p1/p1_1.tif"),
        s("/d/v.nii.gz", 2),
        s("/d/v.nii.gz", 0),
        s("/d/v.nii.gz", 1),
    ]
    assert slice_order(samples) == [[3, 1, 0], [2], [5, 6, 4]]


@pytest.mark.parametrize("method", ["percentile_channel", "window", "none"])
def test_normalising_the_stack_equals_stacking_normalised_slices(method: str):
    # Training normalises each slice, then stacks; an export normalises the raw stack it is
    # given. The allowed normalisations give the same numbers both ways.
    raw = np.random.default_rng(0).uniform(0, 900, (5, 12, 10, 3)).astype(np.float32)

    def prep(x):
        return preprocess_images(tf.constant(x), (8, 8), method, window=(40.0, 400.0)).numpy()

    np.testing.assert_allclose(prep(stack_slices(raw, 1)), stack_slices(prep(raw), 1), atol=1e-5)


def test_minmax_over_the_stack_differs_and_is_refused():
    raw = np.random.default_rng(1).uniform(0, 900, (5, 12, 10, 3)).astype(np.float32)
    raw[0] *= 0.2  # slices of different brightness

    def prep(x):
        return preprocess_images(tf.constant(x), (8, 8), "minmax").numpy()

    assert not np.allclose(prep(stack_slices(raw, 1)), stack_slices(prep(raw), 1), atol=1e-3)
    with pytest.raises(ConfigError, match=r"data\.normalization"):
        load_config(None, ["data.context_slices=1", "data.normalization=minmax"])


def test_config_input_channels_and_checks():
    cfg = load_config(None, CTX)
    assert (cfg.data.channels, cfg.data.input_channels) == (3, 9)
    assert load_config(None, [*CTX, "data.context_slices=2"]).data.input_channels == 15
    assert load_config(None, []).data.input_channels == 3
    bad = {
        "data.context_slices": [["data.context_slices=5"], ["data.layout=pairs"]],
        "data.cache": [["data.cache=false"]],
    }
    for key, cases in bad.items():
        for extra in cases:
            with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
                load_config(None, [*CTX, *extra])
    with pytest.raises(ConfigError, match=r"data\.context_slices"):
        cls = ["data.task=classification", "data.layout=class_folders", "model.name=mobilenetv2"]
        load_config(None, [*CTX, *cls])


def test_missing_sequence_replaces_the_same_channels_in_every_slice():
    img = np.random.default_rng(2).random((8, 8, 9)).astype(np.float32)
    aug = MissingSequence(reference=1, p=1.0, channels_per_slice=3)
    aug.set_random_seed(0)
    out = aug(image=img)["image"]
    changed = [
        sorted(c for c in range(3) if not np.array_equal(out[..., 3 * s + c], img[..., 3 * s + c]))
        for s in range(3)
    ]
    assert changed[0] and changed[0] == changed[1] == changed[2]
    for s in range(3):
        np.testing.assert_array_equal(out[..., 3 * s + 1], img[..., 3 * s + 1])
        for c in changed[s]:  # each slice's own reference channel, not another slice's
            np.testing.assert_array_equal(out[..., 3 * s + c], img[..., 3 * s + 1])
    with pytest.raises(ValueError, match="not slices of 3"):
        aug(image=img[..., :8])


def test_load_arrays_stacks_the_neighbours_of_the_same_patient(tiny_synth):
    root = tiny_synth / "segmentation"
    samples = scan_dataset(root, "lgg").samples
    plain_cfg = load_config(None, [f"data.root={root}", "data.image_size=[32,32]", *CTX[1:]])
    ctx_cfg = load_config(None, [f"data.root={root}", "data.image_size=[32,32]", *CTX])
    plain = load_arrays(samples, plain_cfg.data, 1)
    ctx = load_arrays(samples, ctx_cfg.data, 1)
    assert ctx.images.shape == (*plain.images.shape[:3], 9)
    np.testing.assert_array_equal(ctx.targets, plain.targets)
    orders = slice_order(samples)
    assert len(orders) == len({s.group for s in samples})
    for order in orders:
        assert len({samples[i].group for i in order}) == 1  # never across patients
        for j, i in enumerate(order):
            prev, nxt = order[max(j - 1, 0)], order[min(j + 1, len(order) - 1)]
            np.testing.assert_array_equal(ctx.images[i][..., :3], plain.images[prev])
            np.testing.assert_array_equal(ctx.images[i][..., 3:6], plain.images[i])
            np.testing.assert_array_equal(ctx.images[i][..., 6:], plain.images[nxt])


@pytest.mark.slow
def test_a_2p5d_unet_trains_tunes_exports_scores_and_predicts(tiny_synth, tmp_path):
    from medseg.evaluation.scoring import evaluate_model
    from medseg.evaluation.tune import tune
    from medseg.inference.export import export_run
    from medseg.inference.predict import predict
    from medseg.training.cv import run_cv

    root = tiny_synth / "segmentation"
    overrides = [f"data.root={root}", *TINY_UNET, *CTX, "train.epochs=1", "cv.folds=2"]
    overrides += [f"run.root={tmp_path / 'runs'}", "run.name=ctx", "augment.enabled=true"]
    overrides += ["augment.missing_sequence=0.5", "augment.hflip=0.5"]
    run = run_cv(load_config(None, overrides)).path
    n = len(scan_dataset(root, "lgg").samples)

    # out-of-fold tuning reads the folds' slices with their neighbours
    result = tune(run, n_boot=0)
    for v in result["variants"]:
        rows = [r for k in (1, 2) for r in _rows(run / v["folder"] / f"fold_{k}" / "oof.csv")]
        assert len(rows) == n

    export = export_run(run, tmp_path / "export", checkpoint="last")
    card = json.loads((export / "medseg.json").read_text())
    assert card["context_slices"] == 1 and card["input"]["channels"] == 9

    # a one-epoch net is under-confident: a threshold at its 90th percentile on one patient's
    # stacked slices gives masks worth comparing
    patient = sorted(p for p in root.iterdir() if p.is_dir())[0]
    slices = [p for p in patient.glob("*.tif") if not p.stem.endswith("_mask")]
    slices.sort(key=lambda p: natural_key(p.name))
    predictor = Predictor(export)
    raw = np.stack([read_image(p).array for p in slices])
    thr = float(np.quantile(predictor(predictor.model_input(raw))["probabilities"], 0.9))

    # the export stacks the raw slices it is given and scores the folder like the CV folds
    served = evaluate_model(export, root, tmp_path / "ev_export", threshold=thr, n_boot=0)
    direct = evaluate_model(
        run, root, tmp_path / "ev_run", checkpoint="last", threshold=thr, n_boot=0
    )
    served_rows = _rows(tmp_path / "ev_export" / "cases.csv")
    direct_rows = {r["id"]: r for r in _rows(tmp_path / "ev_run" / "cases.csv")}
    assert len(served_rows) == len(direct_rows) == n
    assert sum(int(r["pred_pixels"]) for r in served_rows) > 0  # not empty masks compared
    for r in served_rows:
        assert int(r["pred_pixels"]) == pytest.approx(
            int(direct_rows[r["id"]]["pred_pixels"]), abs=2
        )
    assert served["dice"] == pytest.approx(direct["dice"], abs=1e-3)
    assert served["dice_per_group_mean"] == pytest.approx(direct["dice_per_group_mean"], abs=1e-3)

    # a patient folder of 2D slices is one volume: each slice predicted with its neighbours,
    # as the scoring above did
    result = predict(export, [patient], tmp_path / "pred_folder", threshold=thr, progress=False)
    scored = {r["id"]: r for r in _rows(tmp_path / "ev_export" / "cases.csv")}
    assert result.n_failed == 0 and len(result.rows) == len(list(patient.glob("*_mask.*")))
    assert any(r["foreground_pixels"] for r in result.rows)
    for r in result.rows:
        assert r["foreground_pixels"] == int(
            scored[f"{patient.name}/{r['case_id']}.tif"]["pred_pixels"]
        )

    # a volume is stacked like the training slices; a lone 2D image cannot be
    vol = np.random.default_rng(3).uniform(0, 255, (40, 36, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "vol.nii.gz")
    png = tmp_path / "one.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(png)
    result = predict(export, [tmp_path / "vol.nii.gz", png], tmp_path / "pred", progress=False)
    rows = {r["case_id"]: r for r in result.rows}
    assert rows["vol"]["status"] == "ok" and rows["vol"]["slices"] == 5
    assert rows["one"]["status"] == "error" and "neighbouring slices" in rows["one"]["error"]
    assert "one.png" in rows["one"]["error"]
    assert nib.load(result.out_dir / "vol" / "mask.nii.gz").shape == (40, 36, 5)


class _Member:
    """A stand-in model: foreground probability = mean of its input channels / 10 + ``bias``."""

    model_input = Predictor.model_input

    def __init__(self, name: str, k: int, bias: float, num_outputs: int = 1):
        self.path, self.task, self.classes = Path(name), "segmentation", []
        self.context_slices, self.channels, self.bias = k, 1, bias
        self.card = {"input": {"channels": 2 * k + 1}, "num_outputs": num_outputs, "threshold": 0.3}
        self.seen: list[np.ndarray] = []

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.seen.append(images)
        return {"probabilities": images.mean(-1, keepdims=True) / 10 + self.bias}


def test_ensemble_predictor_feeds_each_model_its_own_input_and_averages():
    flat, ctx = _Member("flat", 0, 0.0), _Member("ctx", 1, 0.1)
    ens = EnsemblePredictor([flat, ctx])
    assert ens.context_slices == 1 and ens.threshold == 0.3
    vol = _volume()[..., :1]  # [4, 2, 2, 1]: value = slice index
    x = ens.model_input(vol)
    assert x.shape == (4, 2, 2, 4)  # 1 channel for the 2D model, 3 for the 2.5D one
    out = ens(x)
    np.testing.assert_array_equal(flat.seen[0], vol)
    np.testing.assert_array_equal(ctx.seen[0], stack_slices(vol, 1))
    # slice i: 2D i/10; 2.5D mean(i-1, i, i+1)/10 + 0.1 (edges repeated)
    neighbours = np.array([1 / 3, 1, 2, 8 / 3])
    expected = (np.arange(4) / 10 + neighbours / 10 + 0.1) / 2
    np.testing.assert_allclose(out["probabilities"][:, 0, 0, 0], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["mask"][:, 0, 0], expected > 0.3)
    with pytest.raises(DataError, match="other.*outputs differ"):
        EnsemblePredictor([flat, _Member("other", 0, 0.0, num_outputs=3)])
    with pytest.raises(ConfigError, match="--with"):
        ens.keras_models()


@pytest.mark.slow
def test_predict_with_a_2d_and_a_2p5d_model_averages_their_probabilities(
    tiny_synth, tiny_unet_run, tmp_path
):
    from medseg.training.train import train

    root = tiny_synth / "segmentation"
    overrides = [f"data.root={root}", *TINY_UNET, *CTX, "train.epochs=1"]
    overrides += [f"run.root={tmp_path / 'runs'}", "run.name=ctx"]
    ctx_run = train(load_config(None, overrides)).run.path
    patient = sorted(p for p in root.iterdir() if p.is_dir())[0]
    slices = [p for p in patient.glob("*.tif") if not p.stem.endswith("_mask")]
    slices.sort(key=lambda p: natural_key(p.name))
    raw = np.stack([read_image(p).array for p in slices])
    vol = np.random.default_rng(5).uniform(0, 255, (32, 30, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "vol.nii.gz")
    vol_raw = read_image(tmp_path / "vol.nii.gz").array

    flat, ctx = Predictor(tiny_unet_run), Predictor(ctx_run)
    pa, pb = (p(p.model_input(raw))["probabilities"][..., 0] for p in (flat, ctx))
    assert np.abs(pa - pb).max() > 1e-3  # two different models: not a vacuous mean
    mean = (pa + pb) / 2
    thr = float(np.quantile(mean, 0.9))  # one-epoch nets: a threshold that gives masks
    vol_mean = np.mean([p(p.model_input(vol_raw))["probabilities"] for p in (flat, ctx)], 0)

    out = tmp_path / "pred"
    args = ["--model", str(tiny_unet_run), "--with", str(ctx_run), "--threshold", str(thr)]
    proc = run_cli("predict", *args, str(patient), str(tmp_path / "vol.nii.gz"), "--out",
                   str(out), "--no-progress", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["case_id"]: r for r in _rows(out / "predictions.csv")}
    assert len(rows) == len(slices) + 1
    assert sum(int(r["foreground_pixels"]) for r in rows.values()) > 0
    for path, m in zip(slices, mean, strict=True):
        assert int(rows[path.stem]["foreground_pixels"]) == pytest.approx(
            int((m > thr).sum()), abs=2
        )
    assert int(rows["vol"]["foreground_pixels"]) == pytest.approx(
        int((vol_mean > thr).sum()), abs=2
    )
    bad = run_cli("predict", *args, "--mc-samples", "2", str(patient), "--out",
                  str(tmp_path / "bad"), cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and "--with" in bad.stderr
