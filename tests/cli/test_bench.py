"""Tests for medseg.bench and ``medseg bench``: FLOP counting by hand, the JSON contract, the
PyTorch-reference plumbing (with a stand-in script) and bad options."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
from keras import layers  # noqa: E402

from medseg.bench import DEFAULT_CONFIGS, count_flops, load_bench_config  # noqa: E402
from medseg.errors import ConfigError  # noqa: E402
from tests.conftest import REPO, run_cli  # noqa: E402


def test_count_flops_by_hand():
    x = keras.Input((8, 8, 2))
    y = layers.Conv2D(4, 3, padding="same")(x)  # 2 * 64 px * 9 * 2 * 4 = 9216
    y = layers.DepthwiseConv2D(3, padding="same")(y)  # 2 * 64 * 9 * 4 = 4608
    y = layers.Conv2DTranspose(3, 2, strides=2)(y)  # 2 * 64 (input px) * 4 * 4 * 3 = 6144
    y = layers.GlobalAveragePooling2D()(y)
    y = layers.Dense(5)(y)  # 2 * 3 * 5 = 30
    assert count_flops(keras.Model(x, y)) == 9216 + 4608 + 6144 + 30


def test_count_flops_descends_into_nested_models():
    inner_in = keras.Input((4, 4, 1))
    inner = keras.Model(inner_in, layers.Conv2D(2, 1)(inner_in))  # 2 * 16 * 1 * 2 = 64
    x = keras.Input((4, 4, 1))
    outer = keras.Model(x, layers.Conv2D(1, 1)(inner(x)))  # 2 * 16 * 2 * 1 = 64
    assert count_flops(outer) == 128


def test_reference_unet_flops_match_the_issue():
    """The benchmark's U-Net is the reference network: ~24 GFLOP forward (~72 training)."""
    from medseg.models.registry import build_model

    model = build_model(load_bench_config("unet", None, []), 1)
    assert 23.5e9 < count_flops(model) < 24.5e9
    assert abs(model.count_params() - 7.76e6) < 0.02e6  # the PyTorch reference: 7,763,041


def test_default_bench_configs_load():
    for name, path in DEFAULT_CONFIGS.items():
        assert path.is_file()
        cfg = load_bench_config(name, None, ["train.steps_per_execution=2"])
        assert cfg.train.steps_per_execution == 2
    with pytest.raises(ConfigError, match="unknown benchmark 'vit'"):
        load_bench_config("vit", None, [])


FAKE_TORCH = """
import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
assert args["--size"] == "32" and args["--batch"] == "2", args
print("noise")
print(json.dumps({"plain_train_img_s": 2.0, "plain_infer_img_s": 4.0}))
"""


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory) -> dict[str, Path]:
    """The two benchmark configs, tiny: 32x32, batch 2, a small U-Net, and the classifier's
    backbone frozen (tracing MobileNetV2's gradients is most of the classifier's time; the
    benchmark's JSON is the same)."""
    root = tmp_path_factory.mktemp("bench")
    unet = (REPO / "configs" / "bench-unet.yaml").read_text()
    unet = unet.replace("[256, 256]", "[32, 32]").replace("base_filters: 32", "base_filters: 4")
    unet = unet.replace("batch_size: 8", "batch_size: 2").replace("depth: 4", "depth: 2")
    cls = (REPO / "configs" / "bench-classifier.yaml").read_text()
    cls = cls.replace("[224, 224]", "[32, 32]").replace("batch_size: 16", "batch_size: 2")
    cls = cls.replace("dropout: 0.2", "dropout: 0.2\n  freeze_backbone: true")
    (root / "unet.yaml").write_text(unet)
    (root / "cls.yaml").write_text(cls)
    (root / "fake_torch.py").write_text(FAKE_TORCH)
    (root / "bad_torch.py").write_text("import sys\nsys.exit('no torch here')\n")
    return {"root": root, "unet": root / "unet.yaml", "cls": root / "cls.yaml"}


@pytest.mark.slow
def test_bench_cli_json_contract(tiny_configs):
    root = tiny_configs["root"]
    proc = run_cli(
        "bench", "--unet-config", str(tiny_configs["unet"]),
        "--classifier-config", str(tiny_configs["cls"]), "--seconds", "1",
        "--predict-config", str(tiny_configs["unet"]),
        "--torch-python", sys.executable, "--torch-script", str(root / "fake_torch.py"),
        "--out", str(root / "bench.json"),
        cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((root / "bench.json").read_text()) == result
    assert result["matmul_peak_gflops"] > 1
    pred = result["predict"]  # batch inference end to end beside the model alone
    assert {"model_img_s", "end_to_end_img_s", "ratio", "peak_rss_mb"} <= set(pred)
    assert pred["model_img_s"] > 0 and pred["end_to_end_img_s"] > 0 and pred["peak_rss_mb"] > 0
    assert pred["ratio"] == pytest.approx(pred["end_to_end_img_s"] / pred["model_img_s"], 0.01)
    for part in ("images", "volumes"):
        assert pred[part]["end_to_end_img_s"] > 0 and pred[part]["ratio"] > 0
    assert pred["images"]["one_at_a_time_img_s"] > 0
    for name in ("unet", "classifier"):
        r = result[name]
        for key in ("train_img_s", "infer_img_s", "pipeline_img_s", "peak_rss_mb", "gflop_per_img"):
            assert r[key] > 0, (name, key)
        assert set(r["infer_paths"]) == {"keras", "keras_folded", "savedmodel", "tflite"}
        assert r["infer_img_s"] == max(r["infer_paths"].values())
        assert r["infer_paths"][r["infer_best_path"]] == r["infer_img_s"]
        assert r["train_peak_fraction"] == pytest.approx(
            3 * r["gflop_per_img"] * r["train_img_s"] / result["matmul_peak_gflops"]
        )
    assert result["torch_reference"]["plain_train_img_s"] == 2.0
    assert result["vs_torch"]["train"] == pytest.approx(result["unet"]["train_img_s"] / 2.0)
    assert result["vs_torch"]["infer"] == pytest.approx(result["unet"]["infer_img_s"] / 4.0)


@pytest.mark.slow
def test_bench_failing_torch_reference_is_a_clear_error(tiny_configs):
    root = tiny_configs["root"]
    proc = run_cli(
        "bench", "--only", "unet", "--unet-config", str(tiny_configs["unet"]),
        "--torch-python", sys.executable, "--torch-script", str(root / "bad_torch.py"),
        cwd=root,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "bad_torch.py failed" in proc.stderr and "no torch here" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_unknown_inference_path_is_a_usage_error(tmp_path):
    proc = run_cli("bench", "--infer-paths", "keras,onnx", "--no-torch", cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown path(s) onnx" in proc.stderr
