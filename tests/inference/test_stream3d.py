"""Streaming batch prediction with a 3D model (medseg.inference.predict3d): the same rows and
bytes as one case at a time, at most three volumes in memory, the case being written committed
on an interrupt, and ``kill -9`` then the same call finishing every case once."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage

import medseg.inference.predict3d as predict3d
from medseg.data.synthetic3d import lps_affine, phantom3d, write_dicom_series, write_nifti_volume
from medseg.inference.batch import BATCH_STATE, Batch
from medseg.inference.cases import collect_cases
from medseg.inference.predict3d import predict_volumes
from medseg.inference.volumetric import VolumePredictor
from tests.conftest import REPO, kill_when, start_process

SHAPE, SPACING = (20, 24, 16), (2.0, 1.0, 1.5)


class ThresholdVolumes(VolumePredictor):
    """A 3D "model" without TensorFlow: label 1 above the volume's mean, 2 above mean + std."""

    def __init__(self, delay: float = 0.0):  # no model folder
        self.card, self.module, self.source = {}, None, Path("threshold")
        self._set_names({0: "background", 1: "Anterior", 2: "Posterior"}, {0: "MRI"}, 1)
        self.delay = delay
        self.calls = 0

    def predict(self, array, spacing, affine=None):
        self.calls += 1
        time.sleep(self.delay)
        x = np.asarray(array, np.float64)[..., 0]
        labels = (x > x.mean()).astype(np.uint8) + (x > x.mean() + x.std())
        return {"probabilities": np.zeros((*x.shape, 3), np.float32), "labels": labels}


def write_volumes(folder: Path, n: int, *, series: int = 1, broken: bool = True) -> Path:
    """``n`` NIfTI phantoms and ``series`` DICOM series of them (whole numbers, so both read
    back the same values), a 2D PNG and a broken NIfTI file (both fail for a 3D model)."""
    folder.mkdir(parents=True, exist_ok=True)
    affine = lps_affine(SHAPE, SPACING, angles_deg=(0.0, 0.0, 6.0))
    for i in range(n + series):
        image, _ = phantom3d(SHAPE, seed=i)
        image = np.round(image[..., 0] * 1000).astype(np.float32)
        if i < n:
            write_nifti_volume(folder / f"vol{i:02d}.nii.gz", image, affine)
        else:
            write_dicom_series(folder / f"series{i:02d}", image, SPACING, affine, seed=i)
    if broken:
        (folder / "broken.nii.gz").write_bytes(b"not a nifti file")
        PILImage.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "flat.png")
    return folder


def _predict(folder: Path, out: Path, model=None, **kw):
    cases = collect_cases([folder])
    batch = Batch.open(out, "test", overwrite=False)
    model = model or ThresholdVolumes()
    return predict_volumes(model, cases, out, batch, progress=False, **kw)


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _same_outputs(a: Path, b: Path) -> None:
    """Every file the same bytes; a DICOM SEG the same but for its UIDs and times."""
    ta, tb = _tree(a), _tree(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        if name.endswith("seg.dcm"):
            sa, sb = pydicom.dcmread(a / name), pydicom.dcmread(b / name)
            assert sa.PixelData == sb.PixelData, name
            assert [s.SegmentLabel for s in sa.SegmentSequence] == [
                s.SegmentLabel for s in sb.SegmentSequence
            ]
            continue
        assert ta[name] == tb[name], name


@pytest.mark.parametrize("largest", [False, True])
def test_streamed_volumes_are_the_same_bytes_as_one_at_a_time(tmp_path, largest):
    folder = write_volumes(tmp_path / "in", 3)
    one = _predict(folder, tmp_path / "one", queue_depth=0, largest_component=largest)
    streamed = _predict(folder, tmp_path / "streamed", largest_component=largest)
    assert one.rows == streamed.rows
    assert [r["status"] for r in streamed.rows].count("error") == 2  # broken.nii.gz, flat.png
    assert {r["input_type"] for r in streamed.rows} == {"volume", "dicom_series"}
    assert one.n_slices == streamed.n_slices == 4 * SHAPE[0]
    _same_outputs(tmp_path / "one", tmp_path / "streamed")
    assert not (tmp_path / "streamed" / BATCH_STATE).exists()


def test_at_most_three_volumes_are_in_flight(tmp_path, monkeypatch):
    folder = write_volumes(tmp_path / "in", 6, series=0, broken=False)
    in_flight, peak = [0], [0]
    read, write = predict3d._read_job, predict3d._write_job

    def counted_read(*args):
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        return read(*args)

    def counted_write(*args):
        time.sleep(0.05)  # a slow writer must hold the model back, not pile volumes up
        row = write(*args)
        in_flight[0] -= 1
        return row

    monkeypatch.setattr(predict3d, "_read_job", counted_read)
    monkeypatch.setattr(predict3d, "_write_job", counted_write)
    result = _predict(folder, tmp_path / "out")
    assert result.n_failed == 0 and len(result.rows) == 6
    assert 2 <= peak[0] <= 3, peak  # one read ahead, one in the model, one being written


def test_an_interrupt_commits_the_case_being_written_and_the_same_call_finishes(
    tmp_path, monkeypatch
):
    folder = write_volumes(tmp_path / "in", 6, series=0, broken=False)
    out = tmp_path / "out"
    model = ThresholdVolumes()
    real = ThresholdVolumes.predict

    def interrupted(self, *args, **kwargs):
        if self.calls == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ThresholdVolumes, "predict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _predict(folder, out, model)
    committed = sorted(p.stem for p in (out / BATCH_STATE / "rows").glob("*.json"))
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != BATCH_STATE)
    assert committed == folders == ["vol00", "vol01", "vol02"]
    assert not [p for p in out.iterdir() if "tmp" in p.name]
    monkeypatch.setattr(ThresholdVolumes, "predict", real)
    again = ThresholdVolumes()
    result = _predict(folder, out, again)
    assert [r["case_id"] for r in result.rows] == [f"vol{i:02d}" for i in range(6)]
    assert again.calls == 3 and result.n_slices == 3 * SHAPE[0]  # done cases not predicted


def test_a_full_disk_while_writing_stops_the_stream_and_the_same_call_finishes(
    tmp_path, monkeypatch
):
    import errno

    folder = write_volumes(tmp_path / "in", 4, series=0, broken=False)
    out = tmp_path / "out"
    real = predict3d.write_volume_masks
    calls = [0]

    def full(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(predict3d, "write_volume_masks", full)
    from medseg.errors import OutputError

    with pytest.raises(OutputError, match="vol01"):
        _predict(folder, out)
    assert sorted(p.stem for p in (out / BATCH_STATE / "rows").glob("*.json")) == ["vol00"]
    monkeypatch.setattr(predict3d, "write_volume_masks", real)
    result = _predict(folder, out)
    assert result.n_failed == 0 and result.n_slices == 3 * SHAPE[0]


_KILLED = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from tests.inference.test_stream3d import ThresholdVolumes, _predict
    _predict(Path(sys.argv[1]), Path(sys.argv[2]), ThresholdVolumes(delay=0.3))
    """
)


def test_kill_9_during_a_streamed_3d_predict_then_the_same_call_finishes(tmp_path):
    n = 12
    folder = write_volumes(tmp_path / "in", n, series=0, broken=False)
    out = tmp_path / "out"
    script = tmp_path / "run.py"
    script.write_text(_KILLED.format(repo=str(REPO)))
    rows_dir = out / BATCH_STATE / "rows"

    def committed() -> list[str]:
        return sorted(p.stem for p in rows_dir.glob("*.json")) if rows_dir.is_dir() else []

    proc = start_process(
        [sys.executable, str(script), str(folder), str(out)], REPO, tmp_path / "run.log"
    )
    kill_when(proc, lambda: len(committed()) >= 3, "3 finished cases")
    done = committed()
    assert len(done) < n, "the batch finished before it was killed"
    folders = {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert set(done) <= folders and len(folders - set(done)) <= 1  # commit right after rename
    before = {c: (out / c / "mask.nii.gz").stat().st_mtime_ns for c in done}
    model = ThresholdVolumes()
    result = _predict(folder, out, model)
    assert [r["case_id"] for r in result.rows] == [f"vol{i:02d}" for i in range(n)]
    assert model.calls == n - len(done)
    assert len(json.loads((out / "predictions.json").read_text())) == n
    for case, mtime in before.items():
        assert (out / case / "mask.nii.gz").stat().st_mtime_ns == mtime, case
    assert not (out / BATCH_STATE).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".") and "tmp" in p.name]


@pytest.mark.slow
def test_a_tiny_unet3d_streams_nifti_and_dicom_to_the_same_bytes(tmp_path):
    """A real 3D U-Net (random weights, no training) through the sliding-window graph."""
    import keras

    from medseg.artifacts.runs import create_run
    from medseg.config import load_config
    from medseg.data.fingerprint import VolumePlan
    from medseg.models.unet3d import build_unet3d
    from medseg.utils import atomic_write_json

    keras.utils.set_random_seed(3)
    overrides = ["model.name=unet3d", "data.layout=msd", "data.channels=1"]
    overrides += ["model.num_classes=3", "model.base_filters=2", "model.depth=2"]
    overrides += ["train.patch_size=[16,16,16]", "volume.sw_batch=2"]
    overrides += [f"run.root={tmp_path / 'runs'}", "run.name=tiny3d"]
    run, _ = create_run(load_config(None, overrides))
    build_unet3d(1, 3, base_filters=2, depth=2).save(run.best_model)
    plan = VolumePlan(
        target_spacing=list(SPACING), patch_size=[16, 16, 16], normalization="zscore",
        intensity_clip=[], channel_mean=[], channel_std=[],
        labels={0: "background", 1: "Anterior", 2: "Posterior"}, channels={0: "MRI"},
        modality="MR",
    )  # fmt: skip
    atomic_write_json(run.plan_path, plan.to_dict())
    folder = write_volumes(tmp_path / "in", 2, series=1, broken=False)
    model = VolumePredictor(run.path)
    one = _predict(folder, tmp_path / "one", model, queue_depth=0, largest_component=True)
    streamed = _predict(folder, tmp_path / "streamed", model, largest_component=True)
    assert one.n_failed == 0 and one.rows == streamed.rows
    assert any(float(r["volume_ml_anterior"]) > 0 for r in one.rows)
    _same_outputs(tmp_path / "one", tmp_path / "streamed")
