"""The streaming engine of ``medseg predict`` (medseg.inference.stream): the same bytes as the
one-case-at-a-time path, 2D images batched across files, bounded memory, failures per case, and
``kill -9`` then the same command on many small files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

import medseg.inference.stream as stream
from medseg.inference.batch import BATCH_STATE
from medseg.inference.predict import predict
from tests.conftest import kill_when, run_cli, start_cli
from tests.inference.test_predict import BRIGHT, IntensityModel, make_series


class MultiClassModel(IntensityModel):
    """Three labels by intensity: 0 below 300, 1 up to 800, 2 above."""

    def __init__(self):
        super().__init__()
        self.card = dict(self.card, num_outputs=3)
        self.classes = ["bg", "dim", "bright"]

    def __call__(self, images):
        x = images[..., 0].astype(np.float64)
        p = np.stack([x < 300, (x >= 300) & (x <= 800), x > 800], axis=-1).astype(np.float32)
        return {"probabilities": p, "mask": p.argmax(-1).astype(np.int32)}


class CountingModel(IntensityModel):
    """Records the batch size of each call; fails any call holding an image whose first pixel
    is ``poison``."""

    def __init__(self, poison: float | None = None, task: str = "segmentation"):
        super().__init__(task=task)
        self.calls: list[int] = []
        self.poison = poison

    def __call__(self, images):
        if self.poison is not None and (images[:, 0, 0, 0] == self.poison).any():
            raise RuntimeError("poisoned image")
        self.calls.append(len(images))
        return super().__call__(images)


def _mixed_folder(root: Path) -> Path:
    """2D PNGs of two shapes (interleaved by name), a NIfTI volume, a DICOM series, a file that
    cannot be read."""
    folder = root / "in"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(13):
        shape = (40, 48) if i % 5 else (32, 36)
        img = rng.integers(0, 60, shape).astype(np.uint16) * 10
        img[5 + i % 7 : 15 + i % 7, 10:20] = BRIGHT
        img[25:28, 30:33] = 500  # the middle class of the multi-class model
        PILImage.fromarray(img.astype(np.uint16)).save(folder / f"img{i:02d}.png")
    vol = rng.uniform(0, 400, (30, 28, 9)).astype(np.float32)
    vol[10:16, 8:14, 2:6] = BRIGHT
    nib.save(nib.Nifti1Image(vol, np.diag([0.9, 0.8, 3.0, 1.0])), folder / "vol.nii.gz")
    make_series(folder / "series", n=6)
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def _tree(out: Path) -> dict[str, bytes]:
    """Every file of an output folder, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("model_cls", [IntensityModel, MultiClassModel])
def test_streaming_writes_the_same_bytes_as_one_case_at_a_time(tmp_path, model_cls):
    folder = _mixed_folder(tmp_path)
    kw = dict(progress=False, batch_size=4, largest_component=True)
    one = predict(model_cls(), [folder], tmp_path / "one", queue_depth=0, **kw)
    streamed = predict(model_cls(), [folder], tmp_path / "streamed", **kw)
    assert [r["case_id"] for r in one.rows] == [r["case_id"] for r in streamed.rows]
    assert one.rows == streamed.rows
    assert sum(r["status"] == "error" for r in streamed.rows) == 1  # broken.png
    a, b = _tree(tmp_path / "one"), _tree(tmp_path / "streamed")
    assert sorted(a) == sorted(b)
    for name in a:  # masks, NIfTI, DICOM SEG (UIDs and times differ), overlays, tables
        if name.endswith("seg.dcm"):
            continue
        assert a[name] == b[name], name
    assert one.n_slices == streamed.n_slices == 13 + 9 + 6


def test_classification_streams_to_the_same_rows(tmp_path):
    folder = _mixed_folder(tmp_path)
    kw = dict(progress=False, batch_size=3)
    one = predict(
        IntensityModel(task="classification"), [folder], tmp_path / "a", queue_depth=0, **kw
    )
    streamed = predict(IntensityModel(task="classification"), [folder], tmp_path / "b", **kw)
    assert one.rows == streamed.rows
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == (
        tmp_path / "b" / "predictions.csv"
    ).read_bytes()


def test_2d_images_of_many_files_share_model_calls(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(20):
        PILImage.fromarray(np.full((24, 24), 10 * i, np.uint8)).save(folder / f"s{i:02d}.png")
    model = CountingModel()
    result = predict(model, [folder], tmp_path / "out", progress=False, batch_size=8)
    assert model.calls == [8, 8, 4]
    assert result.n_slices == 20 and result.n_failed == 0
    one = CountingModel()
    predict(one, [folder], tmp_path / "one", progress=False, batch_size=8, queue_depth=0)
    assert one.calls == [1] * 20


def test_a_failing_model_call_fails_only_its_case(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(10):
        img = np.full((24, 24), 100, np.uint8)
        img[0, 0] = 77 if i == 4 else 50
        PILImage.fromarray(img).save(folder / f"s{i:02d}.png")
    model = CountingModel(poison=77.0)
    result = predict(model, [folder], tmp_path / "out", progress=False, batch_size=8)
    failed = [r for r in result.rows if r["status"] != "ok"]
    assert [r["case_id"] for r in failed] == ["s04"]
    assert failed[0]["error"].endswith("RuntimeError: poisoned image")
    assert (tmp_path / "out" / "s03" / "mask.png").is_file()
    assert not (tmp_path / "out" / "s04").exists()
    assert result.n_slices == 9


def test_cases_in_flight_never_exceed_the_queue_depth(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(40):
        PILImage.fromarray(np.full((16, 16), i, np.uint8)).save(folder / f"s{i:02d}.png")
    for i in range(5):
        nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.float32), np.eye(4)), folder / f"v{i}.nii")
    live, peak, volumes, peak_volumes = set(), [0], set(), [0]
    prepare, write = stream.prepare_case, stream.finish_case

    def counted_prepare(predictor, case, *args):
        live.add(case.case_id)
        if case.case_id.startswith("v"):
            volumes.add(case.case_id)
        peak[0], peak_volumes[0] = max(peak[0], len(live)), max(peak_volumes[0], len(volumes))
        return prepare(predictor, case, *args)

    def counted_write(prepared, *args):  # every streamed case is written by finish_case
        row = write(prepared, *args)
        live.discard(prepared.case.case_id)
        volumes.discard(prepared.case.case_id)
        return row

    monkeypatch.setattr(stream, "prepare_case", counted_prepare)
    monkeypatch.setattr(stream, "finish_case", counted_write)
    result = predict(
        IntensityModel(), [folder], tmp_path / "out", progress=False, batch_size=4, queue_depth=6
    )
    assert len(result.rows) == 45 and result.n_failed == 0
    assert 1 < peak[0] <= 6, peak
    assert peak_volumes[0] <= stream.VOLUMES_IN_FLIGHT


def test_an_interrupted_stream_keeps_what_it_committed_and_the_same_call_finishes(
    tmp_path, monkeypatch
):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(30):
        PILImage.fromarray(np.full((16, 16), 40 + i, np.uint8)).save(folder / f"s{i:02d}.png")
    out = tmp_path / "out"
    calls = [0]
    model = IntensityModel()
    real = IntensityModel.__call__

    def interrupted(self, images):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(IntensityModel, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict(model, [folder], out, progress=False, batch_size=4)
    committed = sorted(p.stem for p in (out / BATCH_STATE / "rows").glob("*.json"))
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != BATCH_STATE)
    assert committed == folders and 0 < len(committed) <= 8
    monkeypatch.setattr(IntensityModel, "__call__", real)
    result = predict(model, [folder], out, progress=False, batch_size=4)
    assert [r["case_id"] for r in result.rows] == [f"s{i:02d}" for i in range(30)]
    assert result.n_slices == 30 - len(committed)  # finished cases are not predicted again


# --------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_9_during_a_streaming_predict_of_many_small_files(tiny_unet_run, tmp_path):
    n = 400
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 255, (48, 48, 3)).astype(np.uint8)
        PILImage.fromarray(img).save(folder / f"p{i:04d}.png")
    out = tmp_path / "out"
    args = ["predict", "--model", str(tiny_unet_run), str(folder), "--out", str(out)]
    args += ["--no-progress", "--batch-size", "8"]
    rows_dir = out / BATCH_STATE / "rows"

    def committed() -> list[str]:
        return sorted(p.stem for p in rows_dir.glob("*.json")) if rows_dir.is_dir() else []

    proc = start_cli(args, tmp_path, tmp_path / "predict-0.log")
    kill_when(proc, lambda: len(committed()) >= 40, "40 finished cases", timeout=300)
    done = committed()
    assert len(done) < n, "predict finished before it was killed"
    before = {c: (out / c / "mask.png").stat().st_mtime_ns for c in done}
    folders = {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}
    # the writer commits each case right after renaming its folder: at most one without a row
    assert set(done) <= folders and len(folders - set(done)) <= 1

    final = run_cli(*args, cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    ids = [r["case_id"] for r in rows]
    assert ids == [f"p{i:04d}" for i in range(n)]  # every case once, in order
    assert all(r["status"] == "ok" for r in rows)
    assert len(json.loads((out / "predictions.json").read_text())) == n
    for case, mtime in before.items():  # finished cases were not predicted again
        assert (out / case / "mask.png").stat().st_mtime_ns == mtime, case
    assert not (out / BATCH_STATE).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".") and "tmp" in p.name]
    assert f"{len(done)} cases already done" in final.stderr
