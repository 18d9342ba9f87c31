"""Tests for medseg.bench3d and ``medseg bench --only unet3d``: the JSON contract at tiny sizes,
the comparison with the faster peer, the peer plumbing (with a stand-in script) and bad options.
The 128^3 benchmark itself is never run here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from medseg import bench3d  # noqa: E402
from medseg.errors import ConfigError, MedsegError  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

#: A peer result as the peer script prints it (plain faster at inference, MONAI at training).
PEER = {
    "windows_per_volume": 27,
    "plain_params": 5646419,
    "plain_train_patches_s": 0.5,
    "plain_sw_volumes_s": 0.10,
    "plain_sw_windows_s": 2.7,
    "monai_basicunet_params": 5658915,
    "monai_basicunet_train_patches_s": 0.8,
    "monai_basicunet_sw_volumes_s": 0.04,
    "monai_basicunet_sw_windows_s": 1.08,
}

STAND_IN = """
import json, sys
args = sys.argv[1:]
if "--fail" in open(__file__).read().split("#")[-1]:
    sys.exit("boom")
print("torch noise")
print(json.dumps({"args": args, "plain_sw_volumes_s": 1.0, "plain_train_patches_s": 1.0}))
#
"""


def test_bench_unet3d_json_contract():
    r = bench3d.bench_unet3d(volume=24, window=16, seconds=0.2)
    assert json.loads(json.dumps(r)) == r  # plain JSON
    assert r["params"] == 5646419  # the peer's plain 3D U-Net, trainable parameters
    assert r["windows_per_volume"] == 8  # starts [0, 8] on each axis
    settings = (r["volume"], r["window"], r["overlap"], r["sw_batch"], r["batch"])
    assert settings == (24, 16, 0.5, 4, 2)
    assert r["precision"] in ("float32", "mixed_bfloat16") and r["batch_norm_folded"]
    assert set(r["infer_paths"]) == set(bench3d.DEFAULT_INFER_PATHS_3D)
    assert r["infer_best_path"] == max(r["infer_paths"], key=r["infer_paths"].get)
    assert r["sw_volumes_s"] == r["infer_paths"][r["infer_best_path"]] > 0
    assert r["sw_windows_s"] == pytest.approx(8 * r["sw_volumes_s"])
    assert r["model_windows_s"] > 0 and r["train_patches_s"] > 0
    assert len(r["train_windows_patches_s"]) == 3
    assert r["sw_overhead"] == pytest.approx(1 - r["sw_windows_s"] / r["model_windows_s"])
    assert set(r["infer_cpu_s_per_volume"]) == set(r["infer_paths"])
    assert r["sw_cpu_s_per_volume"] == r["infer_cpu_s_per_volume"][r["infer_best_path"]] > 0
    assert r["model_cpu_s_per_window"] > 0 and r["train_cpu_s_per_patch"] > 0


def test_bfloat16_inference_model_keeps_the_folded_function():
    """The AMX path: folded float32 weights loaded into the unnormalised bfloat16 twin."""
    import keras

    keras.utils.set_random_seed(0)
    model = bench3d.build_bench_unet3d(3, "float32")
    fast = bench3d.inference_unet3d(model, "mixed_bfloat16")
    assert fast.layers[1].compute_dtype == "bfloat16"
    x = np.random.default_rng(0).random((1, 16, 16, 16, 1), np.float32)
    want = np.asarray(model(x, training=False))
    np.testing.assert_allclose(np.asarray(fast(x, training=False)), want, atol=0.05)


def test_compare_picks_the_faster_peer_per_figure():
    ours = {"sw_volumes_s": 0.15, "train_patches_s": 1.2}
    c = bench3d.compare_unet3d(ours, PEER)
    assert c["faster_peer"] == {"sw_volumes": "plain", "train_patches": "monai_basicunet"}
    assert c["vs_faster_peer"]["sw_volumes"] == pytest.approx(1.5)
    assert c["vs_faster_peer"]["train_patches"] == pytest.approx(1.5)
    assert c["vs_plain"]["train_patches"] == pytest.approx(2.4)
    assert c["vs_monai_basicunet"]["sw_volumes"] == pytest.approx(3.75)
    assert c["meets_goal"]
    assert not bench3d.compare_unet3d({**ours, "train_patches_s": 0.9}, PEER)["meets_goal"]


def test_compare_without_peer_figures_fails():
    with pytest.raises(MedsegError, match="no network"):
        bench3d.compare_unet3d({"sw_volumes_s": 1.0, "train_patches_s": 1.0}, {"torch": "2"})


def test_peer_plumbing_with_a_stand_in_script(tmp_path):
    script = tmp_path / "peer.py"
    script.write_text(STAND_IN)
    r = bench3d.peer_unet3d(sys.executable, 24, 16, 0.5, script, sw_batch=2)
    args = r["args"]
    assert args[args.index("--volume") + 1] == "24" and args[args.index("--window") + 1] == "16"
    assert args[args.index("--sw-batch") + 1] == "2" and args[args.index("--seconds") + 1] == "0.5"
    script.write_text(STAND_IN + "--fail")
    with pytest.raises(MedsegError, match="boom"):
        bench3d.peer_unet3d(sys.executable, 24, 16, 0.5, script)
    with pytest.raises(MedsegError, match="not found"):
        bench3d.peer_unet3d(sys.executable, 24, 16, 0.5, tmp_path / "missing.py")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 24}, "divisible by 16"),
        ({"precision": "float16"}, "precision"),
        ({"infer_paths": ("tflite",)}, "unknown tflite"),
    ],
)
def test_bad_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        bench3d.bench_unet3d(**{"volume": 24, "window": 16, "seconds": 0.1, **kwargs})


def test_cli_only_unet3d_runs_the_3d_bench_only(monkeypatch, tmp_path):
    """``medseg bench --only unet3d --peer3d-python P`` hands P to the 3D bench and prints its
    keys; no 2D model is benchmarked (both benches are stand-ins here)."""
    import medseg.bench

    seen = {}

    def fake_3d(seconds, peer_python, peer=True):
        seen.update(seconds=seconds, python=peer_python, peer=peer)
        return {"unet3d": {"sw_volumes_s": 1.0}, "peer_unet3d": None, "unet3d_vs_peer": None}

    monkeypatch.setattr(bench3d, "run_unet3d_bench", fake_3d)
    monkeypatch.setattr(medseg.bench, "_run_isolated", lambda fn, *a: 1.0)
    run = run_cli(
        "bench", "--only", "unet3d", "--peer3d-python", "/x/python", "--seconds", "3",
        cwd=Path(tmp_path),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["unet3d"] == {"sw_volumes_s": 1.0}
    assert "unet" not in result and "classifier" not in result
    assert seen == {"seconds": 3.0, "python": "/x/python", "peer": True}
