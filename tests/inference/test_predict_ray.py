"""Batch prediction on Ray (``medseg predict --executor ray``): the same output folder as the local
executor, file for file; a case that fails once is retried and ends ok; a killed worker loses no
case; a bad input is an error row in both; a missing Ray is one clear error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage

from medseg.errors import ConfigError
from medseg.inference.predict import predict
from tests.inference.test_predict import make_series, write_pngs


@pytest.fixture(scope="module")
def ray_local():
    """A small local Ray instance (2 CPUs) for the module; predict uses it as it is."""
    ray = pytest.importorskip("ray")
    from medseg.raytools import LOCAL_OBJECT_STORE_BYTES

    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            log_to_driver=False,
        )
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tiny_unet_run) -> Path:
    """The session's tiny U-Net run folder (tests/conftest.py)."""
    return tiny_unet_run


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    """Three PNGs, a NIfTI volume, a folder with two DICOM series and one unreadable file."""
    root = tmp_path_factory.mktemp("ray_inputs")
    write_pngs(root / "pngs", 3)
    (root / "pngs" / "broken.png").write_bytes(b"this is not a PNG")
    affine = np.diag([0.8, -0.8, 2.0, 1.0])
    vol = np.random.default_rng(0).uniform(0, 255, (32, 30, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, affine), root / "vol.nii.gz")
    make_series(root / "study", 5, series_number=3, seed=1)
    make_series(root / "study", 4, series_number=7, tilt=0.0, seed=2)
    return root


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def _same_outputs(a: Path, b: Path) -> None:
    """Same files; masks and overlays pixel for pixel; table rows equal (floats within 1e-6)."""
    assert _files(a) == _files(b)
    for name in sorted(_files(a)):
        if name.endswith(".png"):
            x, y = (np.asarray(PILImage.open(d / name)) for d in (a, b))
            assert np.array_equal(x, y), name
        elif name.endswith(".nii.gz"):
            x, y = nib.load(a / name), nib.load(b / name)
            assert np.array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj)), name
            assert np.allclose(x.affine, y.affine), name
        elif name.endswith(".dcm"):
            x, y = pydicom.dcmread(a / name), pydicom.dcmread(b / name)
            assert np.array_equal(x.pixel_array, y.pixel_array), name
    rows_a = json.loads((a / "predictions.json").read_text())
    rows_b = json.loads((b / "predictions.json").read_text())
    assert [r["case_id"] for r in rows_a] == [r["case_id"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert set(ra) == set(rb), ra["case_id"]
        for key, value in ra.items():
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, abs=1e-6), (ra["case_id"], key)
            else:
                assert rb[key] == value, (ra["case_id"], key)
    assert (a / "predictions.csv").read_text() == (b / "predictions.csv").read_text()


@pytest.mark.slow
def test_ray_gives_the_local_outputs_despite_a_failure_and_a_crash(
    ray_local, tiny_model, batch, tmp_path, monkeypatch
):
    inputs = [batch / "pngs", batch / "vol.nii.gz", batch / "study"]
    local = predict(tiny_model, inputs, tmp_path / "local", batch_size=4, progress=False)
    # img0 fails once (then its retry succeeds); reading the first series kills its worker,
    # which held the whole study folder: both series are retried on the other worker.
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("MEDSEG_RAY_FAULTS", "fail:img0,crash:study_3")
    monkeypatch.setenv("MEDSEG_RAY_FAULTS_DIR", str(markers))
    on_ray = predict(
        tiny_model, inputs, tmp_path / "ray", batch_size=4, progress=False, executor="ray"
    )
    assert {p.name for p in markers.iterdir()} == {"fail-img0", "crash-study_3"}

    ids = ["broken", "img0", "img1", "img2", "vol", "study_3", "study_7"]
    for result in (local, on_ray):
        rows = {r["case_id"]: r for r in result.rows}
        assert sorted(rows) == sorted(ids)
        assert [r for r in rows if rows[r]["status"] != "ok"] == ["broken"]
        assert "broken.png" in rows["broken"]["error"]
        assert result.n_slices == 3 + 4 + 5 + 4
        assert result.wall_seconds > 0 and result.model_seconds > 0
    assert not [p for p in (tmp_path / "ray").iterdir() if p.name.startswith(".")]
    _same_outputs(tmp_path / "local", tmp_path / "ray")


@pytest.mark.slow
def test_cli_predict_on_ray_reports_the_bad_file_and_exits_1(
    ray_local, tiny_model, batch, tmp_path, capsys
):
    from medseg.cli import main

    out = tmp_path / "out"
    pngs = batch / "pngs"
    args = ["predict", "-m", str(tiny_model), str(pngs), "--out", str(out), "--no-progress"]
    code = main([*args, "--executor", "ray", "--ray-workers", "1"])
    assert code == 1
    assert "broken.png" in capsys.readouterr().err
    rows = json.loads((out / "predictions.json").read_text())
    assert {r["case_id"]: r["status"] for r in rows} == {
        "broken": "error",
        "img0": "ok",
        "img1": "ok",
        "img2": "ok",
    }


def test_missing_ray_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from medseg.cli import main

    write_pngs(tmp_path / "in", 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'medseg\[ray\]'"):
        predict(tmp_path / "model", [tmp_path / "in"], tmp_path / "out", executor="ray")
    assert not (tmp_path / "out").exists()
    args = [
        "predict",
        "-m",
        str(tmp_path / "model"),
        str(tmp_path / "in"),
        "-o",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert "needs Ray" in err and "Traceback" not in err


@pytest.mark.slow
def test_ray_continues_an_interrupted_batch(ray_local, tiny_model, batch, tmp_path, monkeypatch):
    from medseg.inference.cases import CaseReader

    inputs, out = [batch / "pngs", batch / "vol.nii.gz"], tmp_path / "out"
    read = CaseReader.read

    def interrupted(self, case):
        if case.case_id == "img2":
            raise KeyboardInterrupt  # the local batch is killed before its 4th case
        return read(self, case)

    monkeypatch.setattr(CaseReader, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):  # one case at a time: img0 and img1 are then done
        predict(tiny_model, inputs, out, progress=False, queue_depth=0)
    monkeypatch.setattr(CaseReader, "read", read)
    assert not (out / "predictions.csv").exists()

    result = predict(tiny_model, inputs, out, progress=False, executor="ray", ray_workers=1)
    assert [r["case_id"] for r in result.rows] == ["broken", "img0", "img1", "img2", "vol"]
    assert result.n_slices == 1 + 4  # img2 and vol only: the others were done
    assert [r["status"] for r in result.rows] == ["error", "ok", "ok", "ok", "ok"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["img0", "img1", "img2", "vol", "predictions.csv", "predictions.json"]
    )
