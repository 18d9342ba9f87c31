"""Shared fixtures: tiny synthetic data, pydicom's bundled scans, the real data folder, the
models that several modules test (trained once per session) and the CLI runners."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.schedule import DurationRecorder, group_of, ordered

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
def tiny_hub_module(tmp_path_factory) -> Path:
    """A tiny MobileNetV2 TF-Hub module (32x32, alpha 0.35; batch-norm momentum 0 calibrates the
    moving statistics in one epoch, so outputs depend on the input), for the session."""
    from medseg.models.hub import make_hub_module

    out = tmp_path_factory.mktemp("hub") / "mobilenetv2_035_32"
    return make_hub_module(out, input_size=32, alpha=0.35, bn_momentum=0.0)


@pytest.fixture(scope="session")
def tiny_cls_run(tiny_synth, tiny_hub_module, tmp_path_factory) -> Path:
    """A run folder of the recipe's classifier on ``tiny_hub_module`` (32x32, one epoch, a quarter
    of the training images for validation), shared by the session: use it, do not change it."""
    from medseg.config import load_config
    from medseg.training.train import train

    overrides = [*TINY_UNET, "train.epochs=1", "train.batch_size=4", "data.val_fraction=0.25"]
    overrides += [f"model.hub_handle={tiny_hub_module}", "run.name=cls"]
    overrides += [f"data.root={tiny_synth / 'classification'}"]
    overrides += [f"run.root={tmp_path_factory.mktemp('runs')}"]
    return train(load_config(REPO / "configs" / "brain-tumor-mobilenetv2.yaml", overrides)).run.path


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


@dataclass(frozen=True)
class CliRun:
    """A finished ``medseg`` command: its exit code and what it wrote (like a finished process)."""

    returncode: int
    stdout: str
    stderr: str


#: Loggers whose level or handlers a CLI run sets (its logging set-up, ``train``): restored after.
_CLI_LOGGERS = ("", "pydicom", "highdicom", "tensorflow")


def _quiet(args: tuple[str, ...]) -> bool:
    """Whether ``--quiet`` (``-q``) is among the options before the verb."""
    for arg in args:
        if not arg.startswith("-"):
            return False
        if arg in ("-q", "--quiet"):
            return True
    return False


@contextlib.contextmanager
def _process_state_restored():
    """Undo what a CLI run changes in this process: environment variables, logger levels and
    handlers, Keras' global dtype policy and graph state, TensorFlow's op determinism."""
    env = dict(os.environ)
    loggers = [logging.getLogger(name) for name in _CLI_LOGGERS]
    levels = [(log, log.level, list(log.handlers)) for log in loggers]
    determinism = None
    if "tensorflow" in sys.modules:
        from tensorflow.python.framework import config as tf_config

        determinism = tf_config.is_op_determinism_enabled()
    try:
        yield
    finally:
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)
        for log, level, handlers in levels:
            log.setLevel(level)
            log.handlers[:] = handlers
        if "keras" in sys.modules:
            import keras

            keras.mixed_precision.set_global_policy("float32")
            keras.backend.clear_session()
        if "tensorflow" in sys.modules and not determinism:
            from tensorflow.python.framework import config as tf_config

            tf_config.disable_op_determinism()


def run_cli(*args: str, cwd: Path) -> CliRun:
    """Run ``medseg ARGS`` from ``cwd`` in this process (``medseg.cli.main``) and return what it
    printed and its exit code, as :func:`run_cli_subprocess` would without starting TensorFlow
    again.

    Log records reach the captured stderr as in the console command: the CLI's
    ``logging.basicConfig`` does nothing under pytest (pytest has put its own handlers on the
    root logger), so its root handler and level are set up here for the call. ``SystemExit``
    (argparse's ``--help`` and usage errors) becomes the exit code.
    """
    from medseg.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("medseg: %(message)s"))
    here = Path.cwd()
    with _process_state_restored():
        root = logging.getLogger()
        root.setLevel(logging.WARNING if _quiet(args) else logging.INFO)
        root.addHandler(handler)
        os.chdir(cwd)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(list(args))
                except SystemExit as e:
                    if isinstance(e.code, str):
                        print(e.code, file=sys.stderr)
                    code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            os.chdir(here)
    return CliRun(code, out.getvalue(), err.getvalue())


def load_make_corpus():
    """The bad-input corpus' generator, ``tests/data/bad/make_corpus.py`` (a script, loaded as a
    module): its ``build``, ``write_models`` and file builders."""
    import importlib.util

    path = REPO / "tests" / "data" / "bad" / "make_corpus.py"
    spec = importlib.util.spec_from_file_location("medseg_bad_corpus", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def start_process(argv: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start ``argv`` in its own session (so that :func:`kill_when` kills its whole group), its
    output to ``log``."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(REPO)
    with open(log, "wb") as f:
        return subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def start_cli(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """``python -m medseg.cli ARGS`` from ``cwd`` in a new process (:func:`start_process`)."""
    return start_process([sys.executable, "-m", "medseg.cli", *args], cwd, log)


def kill_when(
    proc: subprocess.Popen, ready, what: str, timeout: float = 120.0, delay: float = 0.0
) -> None:
    """Poll ``ready()`` every 20 ms; SIGKILL the process group ``delay`` seconds after it is
    true (the process must still be running then)."""
    import signal
    import time

    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the command ended before {what}"
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, f"the command ended before the kill after {what}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def run_cli_subprocess(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m medseg.cli ARGS`` in a new process, as a user would (for the tests whose
    subject is the process: its entry point, its own logging set-up, signals, exit codes)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "medseg.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pytest_addoption(parser):
    parser.addoption(
        "--store-durations",
        action="store_true",
        help="write each test file's seconds into tests/durations.json (the workers' order)",
    )


def pytest_configure(config):
    if config.getoption("--store-durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(DurationRecorder(), "medseg-durations")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``-n 2 --dist loadgroup --no-loadscope-reorder``, as
    ``scripts/test.sh`` runs), keep each file's tests on one worker, so a module's fixtures (a
    trained model, a CV run) are built once, and the files that start Ray on the same worker, so
    two local Ray instances never overlap; queue the longest files first (tests/schedule.py)."""
    groups = [group_of(item.nodeid) for item in items]
    for item, group in zip(items, groups, strict=True):
        item.add_marker(pytest.mark.xdist_group(group))
    items[:] = ordered(items, groups)
