"""Processes in the wild: folder locks (two processes on one run folder or ``--out``), runs that
fail before their first epoch, SIGTERM treated like Ctrl-C, and global options anywhere on the
command line.

The subprocess tests (``slow``) print lines starting with ``PROCESS-NUMBERS`` (run with ``-s``).
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg import locks
from medseg.errors import DataError, OutputError
from medseg.locks import LOCK_NAME, FolderInUseError, FolderLock
from tests.conftest import REPO, TINY_UNET, as_cli_sets, run_cli, start_cli

TINY = as_cli_sets(TINY_UNET)
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}

# --------------------------------------------------------------------------- helpers


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the command ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _finish(proc: subprocess.Popen, timeout: float = 300.0) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _history(path: Path) -> list[int]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def _first_epoch(text: str) -> int:
    """The first epoch (0-based) a command's output shows being trained."""
    return int(re.findall(r"^Epoch (\d+)/\d+", text, flags=re.M)[0]) - 1


def _pngs(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((40, 48), 20, np.uint8)
        img[5 + i % 20 : 15 + i % 20, 10:20] = 250
        Image.fromarray(img).save(folder / f"img{i:03d}.png")


def _numbers(line: str) -> None:
    print(f"PROCESS-NUMBERS {line}")


_HOLDER = (
    "import sys, time; from medseg.locks import FolderLock; "
    "FolderLock(sys.argv[1], 'run folder').acquire(); print('held', flush=True); time.sleep(60)"
)


# --------------------------------------------------------------------------- locks


def test_a_held_folder_is_refused_naming_the_owner_and_released_without_a_trace(tmp_path):
    folder = tmp_path / "new" / "out"
    with FolderLock(folder, "output folder") as lock:
        assert lock.created and (folder / LOCK_NAME).is_file()
        owner = json.loads((folder / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"]
        with pytest.raises(FolderInUseError) as e:
            FolderLock(folder, "output folder").acquire()
    message = str(e.value)
    assert message.startswith(f"{folder}: this output folder is in use by another medseg ")
    assert f"(pid {os.getpid()} on " in message and "\n" not in message
    assert not folder.exists()  # created by the lock, empty: removed with it
    (tmp_path / "kept").mkdir()
    with FolderLock(tmp_path / "kept"):
        (tmp_path / "kept" / "result.txt").write_text("x")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["result.txt"]


def test_hold_is_reentrant_in_a_process_and_release_frees_it(tmp_path):
    a = locks.hold(tmp_path / "run", "run folder")
    assert locks.hold(tmp_path / "run") is a and locks.held(tmp_path / "run") is a
    locks.release(tmp_path / "run")
    assert locks.held(tmp_path / "run") is None and not (tmp_path / "run").exists()
    locks.release(tmp_path / "run")  # nothing held: nothing happens


def test_a_lock_of_another_process_is_honoured_until_it_dies_then_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)],
        env={**ENV, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError, match=rf"\(pid {holder.pid} on "):
            FolderLock(folder, "run folder").acquire()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert (folder / LOCK_NAME).is_file()  # a kill -9 leaves the file; the kernel, no lock
    with caplog.at_level("INFO", logger="medseg.locks"), FolderLock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"took over a stale lock of (pid {holder.pid} on" in caplog.text


def test_without_flock_the_file_is_the_lock_and_dead_owners_are_detected(tmp_path, monkeypatch):
    import fcntl
    import socket

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": host}))
    with FolderLock(folder) as lock:  # a dead process on this host: stale
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(FolderInUseError, match=rf"pid {os.getpid()} on {host}"):
            FolderLock(folder).acquire()  # alive (this process)
    assert not (folder / LOCK_NAME).exists()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "elsewhere"}))
    with pytest.raises(FolderInUseError, match=rf"pid {dead.pid} on elsewhere"):
        FolderLock(folder).acquire()  # another host's process cannot be checked: honoured


def test_a_folder_that_cannot_be_created_is_an_output_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=rf"^{tmp_path / 'file'}: is a file"):
        FolderLock(tmp_path / "file").acquire()
    if os.geteuid() == 0:
        return  # root writes into read-only folders
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(OutputError, match=r"cannot create the output folder or its lock file"):
        FolderLock(tmp_path / "ro" / "out", "output folder").acquire()


# --------------------------------------------------------------------------- failed runs


def _cfg(root: Path, data_root: Path, name: str, *extra: str):
    from medseg.config import load_config

    sets = [*TINY_UNET, "train.epochs=1", f"run.root={root}", f"run.name={name}"]
    return load_config(None, [*sets, f"data.root={data_root}", *extra])


def test_a_run_failing_before_its_first_epoch_leaves_no_folder_and_frees_its_name(
    tmp_path, tiny_synth
):
    from medseg.artifacts.runs import create_run, run_scope
    from medseg.training.train import train

    runs = tmp_path / "runs"
    with pytest.raises(DataError, match="missing"):
        train(_cfg(runs, tmp_path / "missing", "r1"))
    assert not (runs / "r1").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        train(_cfg(runs, tmp_path / "empty", "r1"))  # no samples
    assert not (runs / "r1").exists()
    # the same name, the root corrected, no --overwrite: a new run
    cfg = _cfg(runs, tiny_synth / "segmentation", "r1")
    with run_scope(cfg):
        run, resumed = create_run(cfg)
        assert not resumed and run.state()["status"] == "running"
    assert not (run.path / LOCK_NAME).exists()  # released with the scope


def test_a_run_with_a_finished_epoch_is_kept_when_it_stops(tmp_path, tiny_synth):
    from medseg.artifacts.runs import create_run, run_scope

    cfg = _cfg(tmp_path / "runs", tiny_synth / "segmentation", "r2")
    with pytest.raises(KeyboardInterrupt), run_scope(cfg):
        run, _ = create_run(cfg)
        run.last_model.write_bytes(b"an epoch")
        raise KeyboardInterrupt
    assert run.state()["status"] == "running" and run.last_model.is_file()
    assert not (run.path / LOCK_NAME).exists()
    with pytest.raises(RuntimeError), run_scope(cfg):  # resumed, then stops: still kept
        assert create_run(cfg)[1] is True
        raise RuntimeError("stopped")
    assert run.last_model.is_file()


def test_a_cv_failing_before_any_fold_trained_leaves_no_folder(tmp_path):
    from medseg.training.cv import run_cv

    cfg = _cfg(tmp_path / "runs", tmp_path / "missing", "cv1", "cv.folds=2")
    with pytest.raises(DataError):
        run_cv(cfg)
    assert not (tmp_path / "runs" / "cv1").exists()


def test_a_run_folder_another_process_holds_is_refused_and_left_alone(tmp_path, tiny_synth):
    from medseg.artifacts.runs import create_run, run_scope

    folder = tmp_path / "runs" / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)],
        env={**ENV, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = _cfg(tmp_path / "runs", tiny_synth / "segmentation", "busy")
        in_use = rf"run folder is in use .*pid {holder.pid}"
        with pytest.raises(FolderInUseError, match=in_use), run_scope(cfg):
            create_run(cfg)
        assert [p.name for p in folder.iterdir()] == [LOCK_NAME]  # nothing written, kept
    finally:
        holder.kill()
        holder.wait(timeout=30)


# --------------------------------------------------------------------------- CLI: options, signals


def test_global_options_are_accepted_before_and_after_the_verb_and_sub_verb():
    from medseg.cli.parser import build_parser

    parser = build_parser()
    for argv in (
        ["--debug", "train"],
        ["train", "--debug"],
        ["data", "audit", "x", "--debug"],
        ["data", "--debug", "audit", "x"],
        ["models", "make-hub-module", "--out", "m", "--debug"],
    ):
        args = parser.parse_args(argv)
        assert args.debug and not args.quiet, argv
    args = parser.parse_args(["-q", "predict", "-m", "m", "x", "--out", "o"])
    assert args.quiet and not args.debug
    args = parser.parse_args(["predict", "-m", "m", "x", "--out", "o", "-q", "--debug"])
    assert args.quiet and args.debug
    assert not parser.parse_args(["train"]).debug


def test_debug_after_the_verb_shows_the_traceback(tmp_path):
    result = run_cli("data", "audit", str(tmp_path / "missing"), "--debug", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("medseg: error: ")


def test_sigterm_becomes_an_interrupt_with_exit_143(tmp_path, monkeypatch):
    from medseg.cli import EXIT_SIGTERM, sigterm_as_interrupt
    from medseg.cli.commands import COMMANDS

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt() as received:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert received == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) == previous

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    monkeypatch.setitem(COMMANDS, "data", terminated)
    result = run_cli("data", "synth", "--out", str(tmp_path / "s"), cwd=tmp_path)
    assert result.returncode == EXIT_SIGTERM == 143
    assert "medseg: interrupted (SIGTERM); what had finished is kept" in result.stderr
    assert signal.getsignal(signal.SIGTERM) == previous


# --------------------------------------------------------------------------- subprocesses


@pytest.mark.slow
def test_two_trains_on_one_run_name_one_proceeds_the_other_exits_2_at_once(workdir):
    args = ["train", "-c", "configs/demo.yaml", "--name", "twice", *TINY]
    args += ["--set", "train.epochs=1"]
    procs = [start_cli(args, workdir, workdir / f"twice-{i}.log") for i in range(2)]
    started = time.time()
    ended: dict[int, float] = {}
    while len(ended) < 2 and time.time() - started < 300:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.time() - started
        time.sleep(0.02)
    codes = [_finish(p) for p in procs]
    logs = [(workdir / f"twice-{i}.log").read_text() for i in range(2)]
    assert sorted(codes) == [0, 2], logs
    loser = codes.index(2)
    assert "this run folder is in use by another medseg process (pid " in logs[loser]
    assert f"(pid {procs[1 - loser].pid} on " in logs[loser]
    assert ended[loser] < 5.0, ended
    run = workdir / "runs" / "twice"
    assert json.loads((run / "state.json").read_text())["status"] == "done"
    assert _history(run / "logs" / "history.csv") == [0] and not (run / LOCK_NAME).exists()
    _numbers(f"two trains, one run: exit codes {codes}; the second refused in {ended[loser]:.1f} s")


@pytest.mark.slow
def test_two_predicts_on_one_out_one_proceeds_the_other_exits_2_at_once(tiny_unet_run, tmp_path):
    _pngs(tmp_path / "in", 6)
    out = tmp_path / "out"
    args = ["predict", "--model", str(tiny_unet_run), str(tmp_path / "in"), "--out", str(out)]
    first = start_cli([*args, "--no-progress"], tmp_path, tmp_path / "p0.log")
    _wait_for(first, lambda: (out / LOCK_NAME).is_file(), "the first predict's lock")
    t0 = time.time()
    second = start_cli([*args, "--no-progress"], tmp_path, tmp_path / "p1.log")
    code2 = _finish(second, timeout=60)
    refused_in = time.time() - t0
    code1 = _finish(first)
    log1, log2 = (tmp_path / "p0.log").read_text(), (tmp_path / "p1.log").read_text()
    assert (code1, code2) == (0, 2), (log1[-3000:], log2[-3000:])
    assert f"{out}: this output folder is in use by another medseg process (pid {first.pid}" in log2
    assert refused_in < 5.0
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert not (out / LOCK_NAME).exists()
    _numbers(f"two predicts, one --out: exit codes {[code1, code2]}; refused in {refused_in:.1f} s")


@pytest.mark.slow
def test_sigterm_during_train_then_the_same_command_redoes_at_most_one_epoch(workdir):
    epochs = 8
    args = ["train", "-c", "configs/demo.yaml", "--name", "termed", *TINY]
    args += ["--set", f"train.epochs={epochs}"]
    run = workdir / "runs" / "termed"
    history = run / "logs" / "history.csv"
    proc = start_cli(args, workdir, workdir / "termed.log")
    _wait_for(proc, lambda: len(_history(history)) >= 2, "two epochs")
    done = len(_history(history))  # epochs logged when the signal is sent (or one more)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc, timeout=60) == 143
    log = (workdir / "termed.log").read_text()
    assert "medseg: interrupted (SIGTERM)" in log and "Traceback" not in log
    done = max(done, len(_history(history)))
    assert json.loads((run / "state.json").read_text())["status"] == "running"
    assert not (run / LOCK_NAME).exists()

    again = run_cli(*args, cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    redone = done - _first_epoch(again.stdout)
    assert 0 <= redone <= 1, (done, again.stdout[:2000])
    assert _history(history) == list(range(epochs))
    assert json.loads((run / "state.json").read_text())["status"] == "done"
    _numbers(f"SIGTERM in train: {done} epochs finished at the signal, {redone} redone")


@pytest.mark.slow
def test_sigterm_during_cv_then_the_same_command_redoes_at_most_one_epoch(workdir):
    args = ["cv", "-c", "configs/demo.yaml", "--folds", "2", "--name", "termed-cv", *TINY]
    args += ["--set", "train.epochs=3"]
    root = workdir / "runs" / "termed-cv"
    history = root / "fold_1" / "logs" / "history.csv"
    proc = start_cli(args, workdir, workdir / "termed-cv.log")
    _wait_for(proc, lambda: len(_history(history)) >= 1, "fold 1's first epoch")
    done = len(_history(history))  # epochs logged when the signal is sent (or one more)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc, timeout=60) == 143
    done = max(done, len(_history(history)))
    assert not (root / LOCK_NAME).exists() and not (root / "fold_1" / LOCK_NAME).exists()

    again = run_cli(*args, cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    redone = done - _first_epoch(again.stdout)
    assert 0 <= redone <= 1, (done, again.stdout[:2000])
    for k in (1, 2):
        assert _history(root / f"fold_{k}" / "logs" / "history.csv") == [0, 1, 2]
    assert json.loads((root / "cv_summary.json").read_text())["folds_done"] == [1, 2]
    _numbers(f"SIGTERM in cv: fold 1 had {done} epochs at the signal, {redone} redone")


@pytest.mark.slow
def test_sigterm_during_predict_then_the_same_command_redoes_no_finished_case(
    tiny_unet_run, tmp_path
):
    n = 150
    _pngs(tmp_path / "in", n)
    out = tmp_path / "out"
    args = ["predict", "--model", str(tiny_unet_run), str(tmp_path / "in"), "--out", str(out)]
    args.append("--no-progress")
    rows = out / ".medseg-predict" / "rows"

    def committed() -> list[str]:
        return sorted(p.stem for p in rows.glob("*.json")) if rows.is_dir() else []

    proc = start_cli(args, tmp_path, tmp_path / "predict.log")
    _wait_for(proc, lambda: len(committed()) >= 5, "five finished cases")
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc, timeout=60) == 143
    done = committed()
    assert len(done) < n, "predict finished before the signal"
    before = {
        p: p.stat().st_mtime_ns for case in done for p in (out / case).rglob("*") if p.is_file()
    }
    assert before and not (out / LOCK_NAME).exists()

    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(done)} cases already done" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished cases: untouched
    with open(out / "predictions.csv", newline="") as f:
        ids = [r["case_id"] for r in csv.DictReader(f)]
    assert len(ids) == n == len(set(ids))
    _numbers(f"SIGTERM in predict: {len(done)} of {n} cases finished at the signal, 0 redone")
