"""Crash safety: ``kill -9`` during ``train``, ``cv`` and ``predict`` followed by the same command,
full disks (simulated, and a real 1 MB tmpfs when mounting is allowed), streaming prediction,
checkpoints checked against their recorded SHA-256, and ``.keras`` files loaded in safe mode only.

The subprocess tests (``slow``) print lines starting with ``CRASH-NUMBERS`` (run with ``-s``)."""

from __future__ import annotations

import copy
import csv
import errno
import hashlib
import json
import re
import shutil
import subprocess
import tracemalloc
import zipfile
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medseg.errors import ModelError, OutputError
from medseg.inference.batch import BATCH_STATE
from medseg.inference.predict import predict
from medseg.models.loading import (
    checksum_path,
    commit_checkpoint,
    load_keras_model,
    verify_checkpoint,
)
from medseg.training.callbacks import AtomicBackupAndRestore, AtomicCSVLogger
from medseg.utils import TEMP_NAME, atomic_write_text
from tests.conftest import REPO, TINY_UNET, as_cli_sets, kill_when, run_cli, start_cli
from tests.inference.test_predict import IntensityModel, write_pngs

TINY = as_cli_sets(TINY_UNET)
MR_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "MR_small.dcm"


# --------------------------------------------------------------------------- helpers


def _epochs(history: Path) -> list[int]:
    """Epoch numbers of ``history.csv`` (every row complete: all columns filled)."""
    if not history.is_file():
        return []
    with open(history, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        assert all(v not in (None, "") for v in r.values()), f"half-written row {r}"
    return [int(r["epoch"]) for r in rows]


def _temps(root: Path) -> list[Path]:
    """medseg's temporary files and folders under ``root``."""
    return [p for p in root.rglob(".*") if TEMP_NAME.match(p.name)]


def _resume_point(run: Path) -> int:
    """Epochs that a resumed run does not train again (the backup's epoch count)."""
    meta = run / "checkpoints" / "backup" / "training_metadata.json"
    return json.loads(meta.read_text())["epoch"] if meta.is_file() else 0


def _first_epoch(log: Path) -> int:
    """The first epoch (0-based) that a run's log shows being trained."""
    found = re.findall(r"^Epoch (\d+)/\d+", log.read_text(), flags=re.M)
    return int(found[0]) - 1


def _numbers(line: str) -> None:
    print(f"CRASH-NUMBERS {line}")


@pytest.fixture(scope="module")
def tiny_run(tiny_unet_run) -> Path:
    """The session's tiny U-Net run folder (tests/conftest.py); copied before any change."""
    return tiny_unet_run


# --------------------------------------------------------------------------- kill -9: train, cv


@pytest.mark.slow
def test_kill_9_during_train_then_the_same_command_loses_at_most_one_epoch(workdir):
    epochs = 10
    args = ["train", "-c", "configs/demo.yaml", "--name", "killed", *TINY]
    args += ["--set", f"train.epochs={epochs}"]
    run = workdir / "runs" / "killed"
    history = run / "logs" / "history.csv"
    previous = 0
    # first kill: right after an epoch's log row (before its backup: the worst moment);
    # second kill: 0.3 s later, during a later epoch
    for n, (kill_after, delay) in enumerate(((2, 0.0), (5, 0.3))):
        log = workdir / f"train-{n}.log"
        proc = start_cli(args, workdir, log)
        ready = lambda k=kill_after: len(_epochs(history)) >= k  # noqa: E731
        kill_when(proc, ready, f"epoch {kill_after}", delay=delay)
        logged = _epochs(history)
        assert logged == list(range(len(logged)))  # each epoch once, in order
        resume_at = _resume_point(run)
        # the epochs logged but not in the backup are trained again: at most one
        assert len(logged) - resume_at <= 1, (logged, resume_at)
        for name in ("best.keras", "last.keras"):
            assert verify_checkpoint(run / "checkpoints" / name)
        _numbers(
            f"train kill {n + 1} ({delay} s after epoch row {kill_after}): {len(logged)} epochs "
            f"logged, backup at epoch {resume_at}: {len(logged) - resume_at} logged epoch to "
            "redo (plus the unlogged part of the epoch under way)"
        )
        if n:
            # the previous run (after the first kill) started where the backup said
            assert _first_epoch(workdir / f"train-{n}.log") == previous
        previous = resume_at

    final = run_cli(*args, cwd=workdir)
    assert final.returncode == 0, final.stderr[-3000:]
    (workdir / "train-final.log").write_text(final.stdout)
    assert _first_epoch(workdir / "train-final.log") == previous
    assert _epochs(history) == list(range(epochs))
    assert json.loads((run / "state.json").read_text())["status"] == "done"
    assert not (run / "checkpoints" / "backup").exists()
    assert not _temps(run), _temps(run)
    for name in ("best.keras", "last.keras"):
        model = load_keras_model(run / "checkpoints" / name)
        assert model.output_shape[-1] == 1
    assert "val" in json.loads((run / "metrics.json").read_text())

    # The same command again: the finished run is not overwritten.
    again = run_cli(*args, cwd=workdir)
    assert again.returncode == 2 and "--overwrite" in again.stderr

    # A checkpoint changed after it was written is refused, naming the file (exit 2).
    best = run / "checkpoints" / "best.keras"
    original = best.read_bytes()
    best.write_bytes(original[:-10] + bytes(10))
    try:
        proc = run_cli("evaluate", str(run), cwd=workdir)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medseg: error")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
        assert str(best) in errors[0] and "SHA-256" in errors[0]
        proc = run_cli("export", str(run), "--out", str(workdir / "exp"), cwd=workdir)
        assert proc.returncode == 2 and "best.keras" in proc.stderr
        assert not (workdir / "exp").exists()
    finally:
        best.write_bytes(original)


@pytest.mark.slow
def test_kill_9_during_cv_fold_2_then_the_same_command_loses_at_most_one_epoch(workdir):
    args = ["cv", "-c", "configs/demo.yaml", "--folds", "2", "--name", "cvkill", *TINY]
    args += ["--set", "train.epochs=6"]
    root = workdir / "runs" / "cvkill"
    history = root / "fold_2" / "logs" / "history.csv"
    proc = start_cli(args, workdir, workdir / "cv-0.log")
    kill_when(proc, lambda: len(_epochs(history)) >= 2, "fold 2's second epoch")
    fold1 = {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in (root / "fold_1").rglob("*")
        if p.is_file() and "tensorboard" not in p.parts
    }
    logged, resume_at = _epochs(history), _resume_point(root / "fold_2")
    assert len(logged) - resume_at <= 1
    _numbers(
        f"cv kill: fold 1 done; fold 2 killed with {len(logged)} epochs logged, backup at "
        f"epoch {resume_at}: {len(logged) - resume_at} epoch to redo, fold 1 retrained: no"
    )

    final = run_cli(*args, cwd=root.parent.parent)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "fold 1/2 already finished, skipped" in final.stderr
    assert re.findall(r"^Epoch (\d+)/6", final.stdout, flags=re.M)[0] == str(resume_at + 1)
    after = {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in (root / "fold_1").rglob("*")
        if p.is_file() and "tensorboard" not in p.parts
    }
    assert after == fold1  # fold 1 untouched
    assert _epochs(history) == list(range(6))
    assert json.loads((root / "cv_summary.json").read_text())["folds_done"] == [1, 2]
    assert not _temps(root), _temps(root)
    for k in (1, 2):
        verify_checkpoint(root / f"fold_{k}" / "checkpoints" / "best.keras")


# --------------------------------------------------------------------------- kill -9: predict


def _volumes(folder: Path, n: int, size: int = 96, slices: int = 12) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        vol = rng.uniform(0, 255, (size, size, slices)).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.diag([0.9, 0.9, 3.0, 1.0])), folder / f"v{i:03d}.nii.gz")


@pytest.mark.slow
def test_kill_9_during_predict_then_the_same_command_keeps_every_finished_case(tiny_run, tmp_path):
    n = 80
    _volumes(tmp_path / "vols", n)
    out = tmp_path / "out"
    args = ["predict", "--model", str(tiny_run), str(tmp_path / "vols"), "--out", str(out)]
    args.append("--no-progress")
    rows_dir = out / BATCH_STATE / "rows"

    def committed() -> list[str]:
        return sorted(p.stem for p in rows_dir.glob("*.json")) if rows_dir.is_dir() else []

    proc = start_cli(args, tmp_path, tmp_path / "predict-0.log")
    kill_when(proc, lambda: len(committed()) >= 5, "five finished cases")
    done = committed()
    assert len(done) < n, "predict finished before it was killed"
    before = {}
    for case in done:
        mask = out / case / "mask.nii.gz"
        before[case] = (mask.stat().st_ino, mask.stat().st_mtime_ns, mask.read_bytes())
    folders = {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}
    # rows are recorded after their folder is in place: at most one folder without a row
    assert set(done) <= folders and len(folders - set(done)) <= 1

    final = run_cli(*args, cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    ids = [r["case_id"] for r in rows]
    assert sorted(ids) == [f"v{i:03d}" for i in range(n)] and len(set(ids)) == n
    assert all(r["status"] == "ok" for r in rows)
    assert len(json.loads((out / "predictions.json").read_text())) == n
    for case, (ino, mtime, data) in before.items():
        mask = out / case / "mask.nii.gz"
        assert (mask.stat().st_ino, mask.stat().st_mtime_ns) == (ino, mtime), case
        assert mask.read_bytes() == data
    assert not (out / BATCH_STATE).exists()
    assert not _temps(out), _temps(out)
    for r in rows:
        assert nib.load(out / r["mask"]).shape == (96, 96, 12)
    assert f"{len(done)} cases already done" in final.stderr
    _numbers(
        f"predict kill: {len(done)} of {n} cases finished at the kill, "
        f"{len(folders - set(done))} case folder without its row (predicted again); "
        f"after the rerun {len(set(ids))} cases, each once; finished cases recomputed: 0"
    )

    # The same command on the finished folder: refused without --overwrite.
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    # Another command into the unfinished folder of a different batch is refused too.
    (out / BATCH_STATE).mkdir()
    atomic_write_text(out / BATCH_STATE / "state.json", '{"signature": "other"}')
    other = run_cli(*args, cwd=tmp_path)
    assert other.returncode == 2 and "unfinished prediction" in other.stderr


# --------------------------------------------------------------------------- full disks


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    monkeypatch.setattr("medseg.utils.os.fsync", _enospc)
    with pytest.raises(OutputError) as info:
        atomic_write_text(target, "new")
    message = str(info.value)
    assert str(target) in message and "no space left" in message and "\n" not in message
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_predict_on_a_full_disk_stops_cleanly_and_the_same_call_finishes(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    write_pngs(tmp_path / "in", 6)
    out = tmp_path / "out"
    real_save, calls = PILImage.Image.save, []

    def save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) > 5:  # mask + overlay of two cases, then the disk is full
            _enospc()
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "save", save)
    with pytest.raises(OutputError) as info:
        predict(IntensityModel(), [tmp_path / "in"], out, progress=False)
    assert "no space left" in str(info.value) and str(out) in str(info.value)
    cases = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert cases == ["img0", "img1"]  # complete cases only: no partial folder
    for case in cases:
        assert {p.name for p in (out / case).iterdir()} == {"mask.png", "overlay.png"}
    assert not _temps(out) and not (out / "predictions.csv").exists()
    stamps = {c: (out / c / "mask.png").stat().st_mtime_ns for c in cases}

    monkeypatch.setattr(PILImage.Image, "save", real_save)  # space freed
    result = predict(IntensityModel(), [tmp_path / "in"], out, progress=False)
    assert [r["case_id"] for r in result.rows] == [f"img{i}" for i in range(6)]
    assert {c: (out / c / "mask.png").stat().st_mtime_ns for c in cases} == stamps
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MB tmpfs (needs root and mount permission; the test is skipped otherwise)."""
    where = tmp_path / "small"
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.slow
def test_predict_and_train_onto_a_full_tmpfs_fail_with_one_line(
    tiny_run, tiny_synth, tmpfs, tmp_path
):
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    (tmp_path / "noise").mkdir()
    for i in range(30):
        pixels = rng.integers(0, 255, (256, 256), dtype=np.uint8)
        PILImage.fromarray(pixels).save(tmp_path / "noise" / f"n{i:02d}.png")
    out = tmpfs / "preds"
    proc = run_cli(
        "predict",
        "--model",
        str(tiny_run),
        str(tmp_path / "noise"),
        "--out",
        str(out),
        cwd=tmp_path,
    )
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medseg: error")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "no space left" in errors[0] and str(out) in errors[0]
    assert not _temps(out), _temps(out)
    cases = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for case in cases:  # every case folder in place is complete
        assert {p.name for p in case.iterdir()} == {"mask.png", "overlay.png"}
    _numbers(
        f"disk full (1 MB tmpfs): predict exit {proc.returncode}, '{errors[0][:120]}', "
        f"{len(cases)} complete case folders kept, 0 partial files"
    )

    shutil.rmtree(out)
    filler = tmpfs / "filler"
    filler.write_bytes(bytes(1024 * 1024 - 300 * 1024))  # leave ~300 kB
    proc = run_cli(
        "train",
        "-c",
        str(REPO / "configs" / "demo.yaml"),
        *TINY,
        "--set",
        f"data.root={tiny_synth / 'segmentation'}",
        "--set",
        f"run.root={tmpfs / 'runs'}",
        "--set",
        "train.epochs=3",
        "--name",
        "full",
        cwd=tmp_path,
    )
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medseg: error")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "no space left" in errors[0] and str(tmpfs) in errors[0]
    assert not _temps(tmpfs), _temps(tmpfs)
    _numbers(f"disk full (tmpfs, ~300 kB free): train exit {proc.returncode}, '{errors[0][:160]}'")


# --------------------------------------------------------------------------- streaming


def _big_series(folder: Path, n_slices: int = 12, size: int = 224, seed: int = 0) -> None:
    src = pydicom.dcmread(MR_SMALL)
    uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 2000, (size, size)).astype(np.int16)
    for k in range(n_slices):
        ds = copy.deepcopy(src)
        ds.SeriesInstanceUID, ds.SeriesNumber = uid, seed + 1
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Rows = ds.Columns = size
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        ds.InstanceNumber = k + 1
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"s{seed}_{k:03d}.dcm")


def _peak_bytes(folder: Path, out: Path) -> int:
    tracemalloc.start()
    try:
        predict(IntensityModel(), [folder], out, progress=False, overlays=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_predict_holds_one_case_in_memory_whatever_the_number_of_cases(tmp_path):
    for n in (1, 2, 5):  # series of 12 x 224 x 224, all in one folder
        for s in range(n):
            _big_series(tmp_path / f"f{n}", seed=s)
    # first imports and caches, not traced (tracemalloc makes the imports take a minute)
    predict(IntensityModel(), [tmp_path / "f1"], tmp_path / "o1", progress=False, overlays=False)
    small = _peak_bytes(tmp_path / "f2", tmp_path / "o2")
    large = _peak_bytes(tmp_path / "f5", tmp_path / "o5")
    one_volume = 12 * 224 * 224 * 4
    assert large < 1.25 * small, (small, large)  # 2.5x the cases, about the same peak
    assert large < 6 * one_volume, (large, one_volume)
    _numbers(
        f"predict memory: peak {small / 1e6:.1f} MB for 2 series, {large / 1e6:.1f} MB for 5 "
        f"series in one folder (one volume: {one_volume / 1e6:.1f} MB)"
    )


# --------------------------------------------------------------------------- checksums


def _tiny_model() -> keras.Model:
    inp = keras.Input((4,))
    return keras.Model(inp, keras.layers.Dense(1)(inp))


def test_checkpoints_are_committed_with_their_sha256_and_checked(tmp_path, caplog):
    path = tmp_path / "best.keras"
    _tiny_model().save(tmp_path / ".best.tmp-1.keras")
    first = commit_checkpoint(tmp_path / ".best.tmp-1.keras", path)
    assert verify_checkpoint(path) and load_keras_model(path).output_shape == (None, 1)
    record = json.loads(checksum_path(path).read_text())
    assert record == {"file": "best.keras", "sha256": first, "previous": None}

    # Killed between recording the new hash and renaming: the old file is still accepted.
    _tiny_model().save(tmp_path / ".best.tmp-2.keras")
    new = hashlib.sha256((tmp_path / ".best.tmp-2.keras").read_bytes()).hexdigest()
    checksum_path(path).write_text(json.dumps({"sha256": new, "previous": first}))
    assert verify_checkpoint(path)

    # Any other content is refused, naming the file.
    data = path.read_bytes()
    path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(ModelError, match=re.escape(str(path)) + ".*SHA-256"):
        load_keras_model(path)

    # Without a record (another tool's file) it loads, with a warning.
    _tiny_model().save(tmp_path / "other.keras")
    assert load_keras_model(tmp_path / "other.keras") is not None
    assert "no recorded checksum" in caplog.text


def test_a_changed_backup_is_refused_when_training_resumes(tmp_path):
    x, y = np.ones((8, 4), np.float32), np.zeros((8, 1), np.float32)
    model = _tiny_model()
    model.compile("sgd", "mse")
    backup = tmp_path / "backup"
    model.fit(x, y, epochs=2, verbose=0, callbacks=[AtomicBackupAndRestore(str(backup))])
    weights = backup / "latest.weights.h5"
    assert verify_checkpoint(weights)  # kept after fit, with its record
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ModelError, match="latest.weights.h5"):
        model.fit(x, y, epochs=3, verbose=0, callbacks=[AtomicBackupAndRestore(str(backup))])


def test_history_csv_holds_each_epoch_once_after_a_resume(tmp_path):
    x, y = np.ones((8, 4), np.float32), np.zeros((8, 1), np.float32)
    model = _tiny_model()
    model.compile("sgd", "mse")
    path = tmp_path / "history.csv"
    model.fit(x, y, epochs=3, verbose=0, callbacks=[AtomicCSVLogger(path)])
    # an interrupted run resumed at epoch 2 (epoch 2 is logged, but not backed up)
    model.fit(x, y, initial_epoch=2, epochs=4, verbose=0, callbacks=[AtomicCSVLogger(path, True)])
    rows = list(csv.DictReader(path.read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert list(rows[0]) == ["epoch", "loss"]
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]


# --------------------------------------------------------------------------- safe loading


def _lambda_model(path: Path) -> Path:
    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Lambda(lambda t: t * 2)(inp)).save(path)
    return path


def test_a_keras_file_with_a_lambda_layer_is_refused(tmp_path):
    path = _lambda_model(tmp_path / "evil.keras")
    with pytest.raises(ModelError) as info:
        load_keras_model(path)
    message = str(info.value)
    assert str(path) in message and "Lambda" in message and "\n" not in message

    # Refused even when Keras' own safe mode was switched off in the process.
    from keras.src.saving import serialization_lib

    state = serialization_lib.global_state
    before = state.get_global_attribute("safe_mode_saving")
    keras.config.enable_unsafe_deserialization()
    try:
        with pytest.raises(ModelError, match="Lambda"):
            load_keras_model(path)
    finally:
        state.set_global_attribute("safe_mode_saving", before)


def test_a_keras_file_naming_a_function_outside_keras_is_refused(tmp_path):
    good = tmp_path / "good.keras"
    _tiny_model().save(good)
    evil = tmp_path / "evil.keras"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                dense = next(
                    layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense"
                )
                dense["config"]["activation"] = {
                    "module": "os",
                    "class_name": "function",
                    "config": "system",
                    "registered_name": "system",
                }
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(ModelError, match="refused.*'os"):
        load_keras_model(evil)


@pytest.mark.slow
def test_predict_refuses_a_run_whose_model_holds_a_lambda_layer(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    best = run / "checkpoints" / "best.keras"
    _lambda_model(best)
    commit_record = checksum_path(best)
    commit_record.unlink()  # no record: the refusal is about the code, not the checksum
    png = write_pngs(tmp_path / "in", 1)[0]
    proc = run_cli(
        "predict", "--model", str(run), str(png), "--out", str(tmp_path / "o"), cwd=tmp_path
    )
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medseg: error")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert str(best) in errors[0] and "Lambda" in errors[0]
    assert not (tmp_path / "o").exists()
