"""Multi-worker training: TF_CONFIG and --workers parsing, per-worker sharding, and two real
``medseg train`` worker processes on this machine (MultiWorkerMirroredStrategy on CPU): identical
final weights, chief-only writes, resume after both workers are killed, and a finished run
refused on every worker without a hang."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.config import load_config
from medseg.data.pipeline import ArrayData, make_dataset
from medseg.errors import ConfigError
from medseg.training.cluster import parse_tf_config, tf_config_for
from medseg.training.distributed import resolve_cluster, worker_timeout

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "data.image_size=[32,32]",
    "model.base_filters=4",
    "model.depth=2",
    "model.dropout=0.0",
    "train.batch_size=4",
    "train.warmup_epochs=0",
    "train.lr_schedule=constant",
    "data.test_fraction=0.2",
    "augment.enabled=false",
    "train.monitor=val_loss",
    "train.monitor_mode=min",
]


def _tf_config(workers: list[str], index: int, job: str = "worker") -> str:
    return json.dumps({"cluster": {job: workers}, "task": {"type": job, "index": index}})


# --- cluster parsing (no TensorFlow) ---------------------------------------------------------


def test_tf_config_is_parsed_with_the_chief_first():
    c = parse_tf_config(
        json.dumps(
            {
                "cluster": {"chief": ["h0:1000"], "worker": ["h1:1000", "h2:1000"]},
                "task": {"type": "worker", "index": 1},
            }
        )
    )
    assert (c.num_workers, c.worker_index, c.is_chief, c.address) == (3, 2, False, "h2:1000")
    c = parse_tf_config(_tf_config(["h0:1", "h1:1"], 0))
    assert (c.num_workers, c.worker_index, c.is_chief) == (2, 0, True)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"task": {"type": "worker", "index": 0}}', "needs a 'cluster'"),
        ('{"cluster": {"ps": ["h:1"]}, "task": {"type": "ps", "index": 0}}', "job 'ps'"),
        ('{"cluster": {"worker": ["h:1"]}}', "needs a 'task'"),
        (_tf_config(["h:1", "h:2"], 2), "task index 2 is out of range"),
        (_tf_config(["h:1", "h:1"], 0), "listed twice"),
        (_tf_config(["h1", "h:2"], 0), "expected 'host:port'"),
        (_tf_config(["h:99999"], 0), "port in 1..65535"),
        ('{"cluster": {"worker": ["h:1"]}, "task": {"type": "chief", "index": 0}}', "'chief'"),
    ],
)
def test_malformed_tf_config_names_the_problem(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        parse_tf_config(text)
    assert str(e.value).startswith("TF_CONFIG: ")


def test_workers_option_builds_tf_config():
    doc = json.loads(tf_config_for("10.0.0.1:2222, 10.0.0.2:2222", 1))
    assert doc == {
        "cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
        "task": {"type": "worker", "index": 1},
    }
    with pytest.raises(ConfigError, match="--worker-index: 2 is out of range"):
        tf_config_for("a:1,b:2", 2)
    with pytest.raises(ConfigError, match="--workers: expected 'host:port'"):
        tf_config_for("a:1,b", 0)


def test_distribute_setting_and_tf_config_must_agree(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="'multiworker' needs the cluster"):
        resolve_cluster(load_config(None, ["train.distribute=multiworker"]))
    assert resolve_cluster(load_config(None, [])) is None
    monkeypatch.setenv("TF_CONFIG", _tf_config(["h:1"], 0))
    assert resolve_cluster(load_config(None, [])) is None  # one worker: no MWMS for auto
    assert resolve_cluster(load_config(None, ["train.distribute=multiworker"])).num_workers == 1
    monkeypatch.setenv("TF_CONFIG", _tf_config(["h:1", "h:2"], 1))
    assert resolve_cluster(load_config(None, [])).worker_index == 1
    with pytest.raises(ConfigError, match="'mirrored' trains in one process"):
        resolve_cluster(load_config(None, ["train.distribute=mirrored"]))
    with pytest.raises(ConfigError, match="train.distribute: 'ring' is not one of"):
        load_config(None, ["train.distribute=ring"])
    with pytest.raises(ConfigError, match="train.lr_scaling"):
        load_config(None, ["train.lr_scaling=sqrt"])
    monkeypatch.setenv("MEDSEG_WORKER_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="MEDSEG_WORKER_TIMEOUT"):
        worker_timeout()


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--workers", "127.0.0.1:1,127.0.0.1:2"], None, "--workers: give both"),
        (["--worker-index", "0"], None, "--worker-index: give both"),
        (
            ["--workers", "127.0.0.1:1,127.0.0.1:2", "--worker-index", "2"],
            None,
            "--worker-index: 2 is out of range for 2 worker(s)",
        ),
        (["--workers", "127.0.0.1", "--worker-index", "0"], None, "--workers: expected"),
        ([], "{oops", "TF_CONFIG: not valid JSON"),
        (
            ["--set", "train.distribute=none"],
            _tf_config(["127.0.0.1:1", "127.0.0.1:2"], 0),
            "train.distribute: 'none' trains in one process",
        ),
    ],
)
def test_cli_rejects_bad_cluster_options(args, env, message, monkeypatch, tmp_path, capsys):
    # every case fails before TensorFlow starts a server (in this test process)
    monkeypatch.setenv("TF_CONFIG", env or "")
    code = main(["train", "--set", f"run.root={tmp_path}", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


# --- sharding ---------------------------------------------------------------------------------


def _indexed(n: int) -> ArrayData:
    images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 4, 4, 1))
    return ArrayData(images.copy(), np.zeros((n, 4, 4), np.uint8), samples=[None] * n)


def _ids(ds) -> list[int]:
    return [int(v) for x, _ in ds for v in x.numpy()[:, 0, 0, 0]]


def test_workers_take_disjoint_equal_parts_of_the_same_epoch_order():
    import tensorflow as tf

    data = _indexed(11)
    kw = {"task": "segmentation", "num_classes": 1, "batch_size": 4, "shuffle": True, "seed": 3}
    whole = _ids(make_dataset(data, **kw))
    parts = [make_dataset(data, shard=(2, i), **kw) for i in range(2)]
    ids = [_ids(p) for p in parts]
    assert len(ids[0]) == len(ids[1]) == 5  # 11 // 2: one sample left out this epoch
    assert not set(ids[0]) & set(ids[1])
    assert ids[0] == whole[0:10:2] and ids[1] == whole[1:10:2]  # the same shuffle everywhere
    assert sorted(whole) == list(range(11))
    assert _ids(parts[0]) != ids[0]  # reshuffled for the next epoch, on every worker alike
    for p in parts:
        assert p.cardinality() == tf.data.UNKNOWN_CARDINALITY
        policy = p.options().experimental_distribute.auto_shard_policy
        assert policy == tf.data.experimental.AutoShardPolicy.OFF


# --- two real worker processes ------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Workers:
    """Two ``medseg train`` processes of one cluster; each with its own run root and TMPDIR."""

    def __init__(self, tmp: Path, args: list[str], tag: str):
        self.procs: list[subprocess.Popen] = []
        self.logs = [tmp / f"{tag}.worker{i}.log" for i in range(2)]
        workers = ",".join(f"127.0.0.1:{p}" for p in _free_ports(2))
        for i in range(2):
            scratch = tmp / f"scratch{i}-{tag}"
            scratch.mkdir()
            env = {
                **os.environ,
                "CUDA_VISIBLE_DEVICES": "",
                "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONUNBUFFERED": "1",
                "MEDSEG_WORKER_TIMEOUT": "120",
                "TMPDIR": str(scratch),
            }
            env.pop("TF_CONFIG", None)
            root = tmp / ("chief" if i == 0 else f"root{i}")
            cmd = [sys.executable, "-m", "medseg.cli", "train", *args, "--set", f"run.root={root}"]
            cmd += ["--workers", workers, "--worker-index", str(i)]
            with open(self.logs[i], "w") as log:
                self.procs.append(
                    subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
                )

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"workers still running after {timeout} s:\n{self.output()}")

    def output(self, i: int | None = None) -> str:
        if i is not None:
            return self.logs[i].read_text()
        return "\n".join(
            f"--- worker {k} ---\n{log.read_text()[-3000:]}" for k, log in enumerate(self.logs)
        )

    def digest(self, i: int) -> str:
        found = re.findall(r"final weights ([0-9a-f]{16})", self.output(i))
        assert found, self.output(i)
        return found[-1]


def _epoch_done(run: Path) -> int:
    try:
        return json.loads((run / "checkpoints" / "backup" / "training_metadata.json").read_text())[
            "epoch"
        ]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_two_workers_train_resume_and_agree(tiny_synth, tmp_path):
    import keras

    import medseg.models  # noqa: F401  (registers the custom layers for load_model)
    from medseg.training.distributed import weights_digest

    args = [
        "--name",
        "mw",
        "--set",
        f"data.root={tiny_synth / 'segmentation'}",
        "--set",
        "train.epochs=3",
        *[a for kv in TINY for a in ("--set", kv)],
    ]
    run = tmp_path / "chief" / "mw"

    # 1. start both workers, kill both once the chief has backed up epoch 1
    first = Workers(tmp_path, args, "first")
    deadline = time.monotonic() + 120
    while _epoch_done(run) < 1:
        if any(p.poll() is not None for p in first.procs) or time.monotonic() > deadline:
            first.kill()
            pytest.fail(f"no epoch was backed up:\n{first.output()}")
        time.sleep(0.05)
    first.kill()
    assert json.loads((run / "state.json").read_text())["status"] == "running"

    # 2. the same command on both workers resumes from the chief's last epoch
    second = Workers(tmp_path, args, "second")
    codes = second.wait(timeout=150)
    assert codes == [0, 0], second.output()
    assert "all workers continue at epoch" in second.output(1)  # the non-chief got the state
    with open(run / "logs" / "history.csv") as f:
        assert [row.split(",")[0] for row in f.read().split()[1:]] == ["0", "1", "2"]

    # identical weights everywhere, and the chief's checkpoint is the final state
    assert second.digest(0) == second.digest(1)
    model = keras.models.load_model(run / "checkpoints" / "last.keras", compile=False)
    assert weights_digest(model) == second.digest(0)
    probs = model.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0)
    assert probs.shape == (2, 32, 32, 1) and np.isfinite(probs).all()
    assert json.loads((run / "state.json").read_text())["status"] == "done"
    assert (run / "metrics.json").is_file() and (run / "splits.json").is_file()

    # the non-chief wrote nothing: neither under its run root nor (after a clean exit) in TMPDIR
    assert not (tmp_path / "root1").exists()
    assert not list((tmp_path / "scratch1-second").iterdir())

    # 3. the run has finished: every worker refuses, none waits for the other
    third = Workers(tmp_path, args, "third")
    assert third.wait(timeout=90) == [2, 2], third.output()
    assert "run folder exists" in third.output(0)
    assert "worker 0 of 2 failed while setting up" in third.output(1)


@pytest.mark.slow
def test_a_worker_whose_peers_never_start_gives_up(tmp_path):
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MEDSEG_WORKER_TIMEOUT": "5",
    }
    workers = ",".join(f"127.0.0.1:{p}" for p in _free_ports(2))
    args = ["--set", f"run.root={tmp_path}", "--workers", workers, "--worker-index", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "did not all start within 5 s" in proc.stderr
    assert not list(tmp_path.iterdir())


MISUSE = """
import json, os, sys
import tensorflow as tf
tf.constant(1.0) + 1.0  # TensorFlow has started
os.environ["TF_CONFIG"] = sys.argv[1]
from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.training.distributed import make_placement
try:
    make_placement(load_config(None, []))
except ConfigError as e:
    print("ConfigError:", e)
"""


@pytest.mark.slow
def test_multiworker_after_other_tensorflow_work_is_a_clear_error():
    tf_config = _tf_config([f"127.0.0.1:{p}" for p in _free_ports(2)], 0)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "MEDSEG_WORKER_TIMEOUT": "20"}
    proc = subprocess.run(
        [sys.executable, "-c", MISUSE, tf_config],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "must start before TensorFlow runs anything else" in proc.stdout, proc.stderr[-3000:]
