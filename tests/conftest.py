"""Shared fixtures: tiny synthetic data, pydicom's bundled scans, the real data folder, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """A tiny synthetic set (48x48, 6 patients x 6 slices, 4 images per class) for the session."""
    from medseg.data.synthetic import SynthSpec, generate

    root = tmp_path_factory.mktemp("synth") / "synthetic"
    generate(root, SynthSpec(size=48, patients=6, slices_per_patient=6, images_per_class=4))
    return root


#: The tiny U-Net of the fast tests (32x32, 4 base filters, depth 2), as config overrides.
TINY_UNET = [
    "data.image_size=[32,32]",
    "model.base_filters=4",
    "model.depth=2",
    "train.batch_size=8",
    "train.warmup_epochs=0",
    "augment.enabled=false",
]


def as_cli_sets(overrides: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]`` (CLI arguments)."""
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_synth) -> Path:
    """A working folder for CLI runs of one test module: a copy of configs/ and the tiny
    synthetic data at data/synthetic, as the configs expect (runs go to its runs/)."""
    import shutil

    work = tmp_path_factory.mktemp("work")
    shutil.copytree(REPO / "configs", work / "configs")
    (work / "data").mkdir()
    (work / "data" / "synthetic").symlink_to(tiny_synth)
    return work


@pytest.fixture(scope="session")
def tiny_unet_run(tiny_synth, tmp_path_factory) -> Path:
    """A run folder of the tiny U-Net trained for one epoch on ``tiny_synth`` (with a test split),
    shared by the prediction tests of the session: use it, do not change it."""
    from medseg.config import load_config
    from medseg.training.train import train

    overrides = [f"data.root={tiny_synth / 'segmentation'}", *TINY_UNET, "train.epochs=1"]
    overrides += ["data.test_fraction=0.2", f"run.root={tmp_path_factory.mktemp('runs')}"]
    return train(load_config(None, [*overrides, "run.name=tiny"])).run.path


@pytest.fixture(scope="session")
def pydicom_files() -> Path:
    """pydicom's bundled test files (globbed on disk: get_testdata_files() tries the network)."""
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets in ../shared/data; skips the test when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (see the project README)")
    return SHARED_DATA


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``medseg ARGS`` in a subprocess (as a user would) and return the finished process."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "medseg.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
