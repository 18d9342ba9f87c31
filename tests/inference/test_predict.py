"""Batch prediction: case discovery (DICOM series, NIfTI, images, unreadable files), outputs in the
source geometry (mask.nii.gz, DICOM SEG), post-processing, failures as rows, no patient data in
names or tables.

Most tests use a stand-in model that thresholds the pixel intensities (so every expected mask is
known exactly); the slow ones train one tiny U-Net and predict with its run folder."""

from __future__ import annotations

import copy
import csv
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from pydicom.uid import generate_uid

from medseg.errors import ConfigError
from medseg.inference.cases import collect_cases
from medseg.inference.postprocess import apply_threshold, postprocess
from medseg.inference.predict import predict
from medseg.inference.predictor import Predictor
from medseg.io import read_dicom_series, read_image
from medseg.io.writers import write_seg

MR_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "MR_small.dcm"
SECRET = "SECRET^NAME"
BRIGHT = 1000  # pixel value of the "lesions" in the synthetic data; background is 100


# --------------------------------------------------------------------------- helpers


class IntensityModel(Predictor):
    """A stand-in segmentation model: foreground where the first channel exceeds ``level``."""

    def __init__(self, level: float = 500.0, task: str = "segmentation", fail_width=None):
        self.card = {"task": task, "num_outputs": 1, "threshold": 0.5, "input": {"channels": 1}}
        self.task, self.channels, self.classes = (
            task,
            1,
            ["a", "b"] if task != "segmentation" else [],
        )
        self.level, self.fail_width = level, fail_width

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        assert images.ndim == 4 and images.shape[-1] == 1
        if self.fail_width is not None and images.shape[2] == self.fail_width:
            raise RuntimeError("simulated crash inside the model")
        x = images[..., :1].astype(np.float64)
        probs = (1.0 / (1.0 + np.exp(-(x - self.level) / 50.0))).astype(np.float32)
        if self.task == "classification":
            p1 = probs.reshape(len(probs), -1).mean(axis=1)
            return {"probabilities": np.stack([1 - p1, p1], axis=1).astype(np.float32)}
        return {"probabilities": probs, "mask": (probs[..., 0] > 0.5).astype(np.int32)}


def lesion(k: int, size: int = 64) -> np.ndarray:
    """The expected foreground of spatial slice ``k``: a 6x10 block moving down 3 rows a slice."""
    m = np.zeros((size, size), np.uint8)
    m[10 + 3 * k : 16 + 3 * k, 20:30] = 1
    return m


def make_series(
    folder: Path,
    n: int = 6,
    *,
    series_number: int | None = 3,
    tilt: float = 0.3,
    seed: int = 0,
    speck_on: int | None = None,
    drop: int | None = None,
) -> dict:
    """A DICOM series from MR_small.dcm: oblique planes, a tilted-gantry stack, shuffled files.

    Slice ``k`` (in space) holds :func:`lesion` ``(k)``; files are named in a random order and
    InstanceNumbers run backwards, so only the positions give the right order (file names
    start with ``seed``: give the series of one folder different seeds). ``speck_on``
    adds a separate 2x2 bright speck on that slice; ``drop`` leaves that slice out (a gap).
    """
    rng = np.random.default_rng(seed)
    src = pydicom.dcmread(MR_SMALL)
    folder.mkdir(parents=True, exist_ok=True)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(tilt), np.sin(tilt)])
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-12.0, -20.0, 7.5])
    uid = generate_uid()
    names = rng.permutation(n)
    sops, positions = [], []
    for k in range(n):
        ds = copy.deepcopy(src)
        ds.PatientName = SECRET
        ds.PatientID = SECRET
        ds.SeriesInstanceUID = uid
        if series_number is None:
            del ds.SeriesNumber
        else:
            ds.SeriesNumber = series_number
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n - k
        position = origin + 2.5 * k * normal + 0.4 * k * col_dir  # tilted gantry
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in position]
        pixels = np.full((64, 64), 100, np.int16)
        pixels[lesion(k) > 0] = BRIGHT
        if speck_on == k:
            pixels[50:52, 50:52] = BRIGHT
        ds.PixelData = pixels.tobytes()
        if k != drop:
            ds.save_as(folder / f"IM{seed:02d}{names[k]:04d}.dcm")
        sops.append(ds.SOPInstanceUID)
        positions.append(position)
    return {"uid": uid, "sops": sops, "positions": np.array(positions), "normal": normal}


def write_pngs(folder: Path, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = np.full((40, 48), 20, np.uint8)
        img[5 + i : 15 + i, 10:20] = 250
        path = folder / f"img{i}.png"
        PILImage.fromarray(img).save(path)
        paths.append(path)
    return paths


def read_rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))


def no_secret_anywhere(out: Path) -> None:
    for path in out.rglob("*"):
        assert "SECRET" not in path.name.upper(), path
    assert "SECRET" not in (out / "predictions.csv").read_text().upper()
    assert "SECRET" not in (out / "predictions.json").read_text().upper()


# --------------------------------------------------------------------------- post-processing


def test_largest_component_is_3d_for_volumes():
    vol = np.zeros((5, 20, 20), np.uint8)
    vol[:, 2:5, 2:5] = 1  # a column through all slices: 45 voxels, 9 per slice
    vol[2, 10:14, 10:14] = 2  # one flat blob of 16 voxels (label 2 kept as label 2)
    vol[4, 18, 18] = 1  # a speck
    kept = postprocess(vol, largest_component=True)
    assert kept.dtype == vol.dtype and kept.shape == vol.shape
    np.testing.assert_array_equal(kept, np.where(vol == 1, 1, 0) * (np.arange(20) < 10))
    assert kept[:, 2:5, 2:5].sum() == 45 and kept[2, 10:14, 10:14].sum() == 0
    # Slice by slice (2D), the flat blob would win on slice 2.
    assert postprocess(vol[2], largest_component=True)[10:14, 10:14].sum() == 32
    # Corner neighbours join only with full connectivity.
    diag = np.zeros((3, 3, 3), np.uint8)
    diag[0, 0, 0] = diag[1, 1, 1] = diag[2, 2, 2] = 1
    assert postprocess(diag, largest_component=True).sum() == 1
    assert postprocess(diag, largest_component=True, connectivity=3).sum() == 3


def test_min_size_removes_small_components():
    vol = np.zeros((4, 16, 16), np.uint8)
    vol[0:2, 0:3, 0:3] = 1  # 18 voxels
    vol[3, 10:12, 10:12] = 1  # 4 voxels
    vol[1, 14, 14] = 1  # 1 voxel
    out = postprocess(vol, min_size_voxels=5)
    assert out.sum() == 18 and out[3].sum() == 0 and out[1, 14, 14] == 0
    assert postprocess(vol, min_size_voxels=4).sum() == 22
    assert postprocess(vol).sum() == 23 and postprocess(vol) is not vol
    # The largest component goes too when it is below the minimum.
    assert postprocess(vol, min_size_voxels=100, largest_component=True).sum() == 0
    with pytest.raises(ValueError):
        postprocess(vol, min_size_voxels=-1)
    with pytest.raises(ValueError):
        postprocess(vol[0, 0])


def test_apply_threshold():
    probs = np.array([[[[0.2], [0.6]], [[0.31], [0.9]]]], np.float32)
    np.testing.assert_array_equal(apply_threshold(probs, 0.3), [[[0, 1], [1, 1]]])
    np.testing.assert_array_equal(apply_threshold(probs, 0.7), [[[0, 0], [0, 1]]])
    with pytest.raises(ValueError):
        apply_threshold(probs, 1.0)
    with pytest.raises(ValueError):
        apply_threshold(np.zeros((1, 2, 2, 3)), 0.5)


# --------------------------------------------------------------------------- case discovery


def test_collect_cases_splits_series_and_reports_unreadable_files(tmp_path, pydicom_files):
    study = tmp_path / "study"
    make_series(study, 5, series_number=3, seed=1)
    make_series(study, 4, series_number=7, tilt=0.0, seed=2)
    write_pngs(study)
    (study / "img0_mask.png").write_bytes((study / "img0.png").read_bytes())
    (study / "notes.txt").write_text("ignored")
    (study / "broken.dcm").write_text("not a DICOM file at all\n" * 20)
    (study / "MR_truncated.dcm").write_bytes((pydicom_files / "MR_truncated.dcm").read_bytes())
    nested = study / "sub"
    make_series(nested, 3, series_number=None, seed=3)

    cases = collect_cases([study])
    by_id = {c.case_id: c for c in cases}
    series = [c for c in cases if c.kind == "series"]
    assert sorted(c.case_id for c in series)[:2] == ["study_3", "study_7"]
    assert len(by_id["study_3"].paths) == 5 and len(by_id["study_7"].paths) == 4
    # A series without SeriesNumber is named by a hash of its UID, never by header text.
    unnumbered = [c for c in series if c.folder == nested]
    assert len(unnumbered) == 1 and len(unnumbered[0].case_id) == len("sub_") + 8
    assert by_id["broken"].kind == "error" and "broken.dcm" in by_id["broken"].error
    assert by_id["MR_truncated"].kind == "file"  # its header is fine; the pixels fail later
    assert by_id["img0"].kind == by_id["img1"].kind == "file"
    assert "img0_mask" not in by_id and "notes" not in by_id
    assert all("SECRET" not in c.case_id.upper() for c in cases)
    assert len({c.case_id for c in cases}) == len(cases)


# --------------------------------------------------------------------------- DICOM SEG writer


def test_write_seg_references_the_source_slices_in_position_order(tmp_path):
    import highdicom as hd

    info = make_series(tmp_path / "s", 5, seed=4)
    (image,) = read_dicom_series(tmp_path / "s")
    labels = np.stack([lesion(k) for k in range(5)])
    labels[[0, 3]] = 0  # two slices without foreground
    seg_path = write_seg(tmp_path / "out" / "seg.dcm", labels, image.meta.source)

    seg = hd.seg.segread(seg_path)
    assert seg.SegmentationType == "BINARY" and seg.SegmentSequence[0].SegmentLabel == "tumour"
    refs = {
        r.ReferencedSOPInstanceUID
        for s in seg.ReferencedSeriesSequence
        for r in s.ReferencedInstanceSequence
    }
    assert refs == set(info["sops"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info["uid"]
    assert int(seg.NumberOfFrames) == 3  # empty slices are left out
    got = seg.get_pixels_by_source_instance(info["sops"], ignore_spatial_locations=True)
    np.testing.assert_array_equal(got[..., 0], labels)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left


def test_write_seg_on_a_series_without_birth_date_and_sex(tmp_path):
    """Anonymised series often lack the Type 2 PatientBirthDate/PatientSex (the hippocampus DICOM
    crops do): the SEG is still written, with them empty, and the source files are unchanged."""
    import highdicom as hd

    make_series(tmp_path / "s", 3, seed=5)
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(f)
        for keyword in ("PatientBirthDate", "PatientSex"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(f)
    before = {f.name: f.read_bytes() for f in (tmp_path / "s").iterdir()}
    (image,) = read_dicom_series(tmp_path / "s")
    labels = np.stack([lesion(k) for k in range(3)])
    seg = hd.seg.segread(write_seg(tmp_path / "seg.dcm", labels, image.meta.source))
    assert seg.PatientBirthDate == "" and seg.PatientSex == ""
    assert {f.name: f.read_bytes() for f in (tmp_path / "s").iterdir()} == before


# --------------------------------------------------------------------------- predict, stand-in


def test_predict_dicom_series_geometry_seg_and_no_patient_data(tmp_path, caplog):
    study = tmp_path / "study"
    a = make_series(study, 6, series_number=3, seed=5, speck_on=4)
    b = make_series(study, 4, series_number=7, tilt=0.0, seed=6)
    out = tmp_path / "preds"
    with caplog.at_level(logging.DEBUG):
        result = predict(IntensityModel(), [study], out, batch_size=4, progress=False)
    assert result.n_failed == 0 and [r["case_id"] for r in result.rows] == ["study_3", "study_7"]
    assert result.n_slices == 10 and result.slices_per_second > 0
    row = result.rows[0]
    assert row["input_type"] == "dicom_series" and row["slices"] == 6
    assert row["slices_with_foreground"] == 6
    expected = np.stack([lesion(k) for k in range(6)])
    expected[4, 50:52, 50:52] = 1
    assert row["foreground_pixels"] == int(expected.sum())
    assert row["foreground_ml"] == pytest.approx(expected.sum() * 2.5 * 0.3125**2 / 1000, 1e-3)

    nii = nib.load(out / "study_3" / "mask.nii.gz")
    data = np.asarray(nii.dataobj)
    assert data.shape == (64, 64, 6)  # (col, row, slice)
    np.testing.assert_array_equal(data.transpose(2, 1, 0), expected)
    # Voxel (0, 0, k) lies at slice k's ImagePositionPatient (LPS -> RAS).
    for k, pos in enumerate(a["positions"]):
        np.testing.assert_allclose(
            nii.affine @ [0, 0, k, 1], [-pos[0], -pos[1], pos[2], 1], atol=1e-3
        )

    import highdicom as hd

    seg = hd.seg.segread(out / "study_3" / "seg.dcm")
    refs = [
        r.ReferencedSOPInstanceUID
        for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    ]
    assert set(refs) == set(a["sops"]) and len(refs) == 6
    got = seg.get_pixels_by_source_instance(a["sops"], ignore_spatial_locations=True)
    np.testing.assert_array_equal(got[..., 0], expected)
    seg_b = hd.seg.segread(out / "study_7" / "seg.dcm")
    assert {
        r.ReferencedSOPInstanceUID
        for r in seg_b.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    } == set(b["sops"])
    assert (out / "study_3" / "overlay.png").is_file()

    no_secret_anywhere(out)
    assert "SECRET" not in caplog.text.upper()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_predict_postprocessing_and_threshold_reach_the_outputs(tmp_path):
    import highdicom as hd

    study = tmp_path / "study"
    info = make_series(study, 6, seed=7, speck_on=4)
    expected = np.stack([lesion(k) for k in range(6)])

    out = predict(
        IntensityModel(), [study], tmp_path / "largest", largest_component=True, progress=False
    ).out_dir
    data = np.asarray(nib.load(out / "study_3" / "mask.nii.gz").dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(data, expected)  # the speck (another component) is gone

    small = predict(
        IntensityModel(), [study], tmp_path / "min", min_lesion_voxels=5, progress=False
    )
    assert small.rows[0]["foreground_pixels"] == int(expected.sum())

    # Nothing is left: the mask and the SEG are written all empty.
    empty = predict(
        IntensityModel(), [study], tmp_path / "none", min_lesion_voxels=10**6, progress=False
    )
    assert empty.n_failed == 0 and empty.rows[0]["foreground_pixels"] == 0
    seg = hd.seg.segread(empty.out_dir / "study_3" / "seg.dcm")
    assert not seg.get_pixels_by_source_instance(info["sops"], ignore_spatial_locations=True).any()

    # A threshold of the user's choice is applied to the probabilities: background is 100,
    # sigmoid((100 - 500) / 50) = 3.4e-4, so 1e-4 makes every voxel foreground.
    low = predict(IntensityModel(), [study], tmp_path / "low", threshold=1e-4, progress=False)
    assert low.rows[0]["foreground_pixels"] == 6 * 64 * 64
    with pytest.raises(ConfigError):
        predict(IntensityModel(), [study], tmp_path / "bad", threshold=1.5)


def test_predict_nifti_keeps_the_input_affine(tmp_path):
    data = np.full((20, 24, 7), 100, np.int16)  # (i, j, k) in the file's own voxel order
    data[3:9, 5:12, 2:5] = BRIGHT
    angle = 0.4
    rot = np.array(
        [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.9, 1.1, 3.0])  # flipped x, oblique, anisotropic
    affine[:3, 3] = [30.0, -12.0, 4.0]
    src = tmp_path / "in" / "brain.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(data, affine), src)

    result = predict(IntensityModel(), [src], tmp_path / "out", progress=False)
    row = result.rows[0]
    assert row["status"] == "ok" and row["input_type"] == "volume" and row["case_id"] == "brain"
    mask = nib.load(result.out_dir / "brain" / "mask.nii.gz")
    assert mask.shape == data.shape
    np.testing.assert_allclose(mask.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), (data > 500).astype(np.uint8))
    assert row["foreground_pixels"] == 6 * 7 * 3
    assert row["foreground_ml"] == pytest.approx(126 * 0.9 * 1.1 * 3.0 / 1000, abs=1e-4)
    assert "seg" not in row  # a DICOM SEG only for DICOM series


class TopRowModel(IntensityModel):
    """Foreground on the first row of every slice it is given; records the slices' shapes."""

    def __init__(self, slice_axis: int):
        super().__init__()
        self.card = dict(self.card, slice_axis=slice_axis)
        self.shapes: list[tuple] = []

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.shapes.append(images.shape[1:3])
        probs = np.zeros(images.shape[:3] + (1,), np.float32)
        probs[:, 0] = 1.0
        return {"probabilities": probs, "mask": (probs[..., 0] > 0.5).astype(np.int32)}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_predict_cuts_volumes_along_the_models_slice_axis(tmp_path, axis):
    src = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.full((6, 7, 5), 100, np.int16), np.eye(4)), src)
    volume = read_image(src).array  # (slice, row, col, C) as medseg.io reads it
    d, h, w = volume.shape[:3]
    model = TopRowModel(axis)
    result = predict(model, [src], tmp_path / "out", progress=False)
    assert result.rows[0]["status"] == "ok"
    mask = read_image(result.out_dir / "vol" / "mask.nii.gz").array[..., 0]
    assert mask.shape == (d, h, w)
    expected = np.zeros((d, h, w), np.uint8)
    # the first row of a slice: axis 0 -> row 0; coronal/sagittal slices are cut superior up,
    # so their first row is the last slice of axis 0 (medseg.data.volumes.reslice)
    if axis == 0:
        assert set(model.shapes) == {(h, w)}
        expected[:, 0, :] = 1
    else:
        assert set(model.shapes) == {(d, (h, w)[2 - axis])}
        expected[-1] = 1
    np.testing.assert_array_equal(mask, expected)
    assert result.rows[0]["foreground_pixels"] == int(expected.sum())


def test_predict_mixed_folder_gives_error_rows_and_goes_on(tmp_path, pydicom_files):
    folder = tmp_path / "mixed"
    write_pngs(folder, 2)
    (folder / "img0_mask.png").write_bytes((folder / "img0.png").read_bytes())
    (folder / "MR_truncated.dcm").write_bytes((pydicom_files / "MR_truncated.dcm").read_bytes())
    (folder / "CT_small.dcm").write_bytes((pydicom_files / "CT_small.dcm").read_bytes())
    (folder / "notes.dcm").write_text("this is a text file, not DICOM\n" * 10)
    series = make_series(folder, 4, series_number=5, seed=11)  # read apart from the rest

    result = predict(IntensityModel(level=128), [folder], tmp_path / "out", progress=False)
    rows = {r["case_id"]: r for r in read_rows(result.out_dir)}
    assert set(rows) == {"img0", "img1", "CT_small", "MR_truncated", "notes", "mixed_5"}
    assert result.n_failed == 2
    assert rows["mixed_5"]["status"] == "ok" and rows["mixed_5"]["slices"] == "4"
    import highdicom as hd

    seg = hd.seg.segread(result.out_dir / "mixed_5" / "seg.dcm")
    got = seg.get_pixels_by_source_instance(series["sops"], ignore_spatial_locations=True)
    np.testing.assert_array_equal(got[..., 0], np.stack([lesion(k) for k in range(4)]))
    for ok in ("img0", "img1", "CT_small"):
        assert rows[ok]["status"] == "ok" and rows[ok]["error"] == ""
        assert (result.out_dir / ok / "mask.png").is_file()
    assert rows["img0"]["input_type"] == "image"
    for bad in ("MR_truncated", "notes"):
        assert rows[bad]["status"] == "error" and f"{bad}.dcm" in rows[bad]["error"]
        assert not (result.out_dir / bad).exists()
    img0 = np.array(PILImage.open(result.out_dir / "img0" / "mask.png"))
    assert img0.shape == (40, 48) and set(np.unique(img0)) == {0, 255}
    js = json.loads((result.out_dir / "predictions.json").read_text())
    assert [r["case_id"] for r in js] == [r["case_id"] for r in read_rows(result.out_dir)]


def test_a_bad_series_fails_alone(tmp_path):
    study = tmp_path / "study"
    make_series(study, 5, series_number=3, seed=12)
    make_series(study, 6, series_number=4, seed=13, drop=2)  # a missing slice
    result = predict(IntensityModel(), [study], tmp_path / "out", progress=False)
    rows = {r["case_id"]: r for r in result.rows}
    assert rows["study_3"]["status"] == "ok" and rows["study_3"]["slices_with_foreground"] == 5
    assert rows["study_4"]["status"] == "error" and result.n_failed == 1
    assert str(study) in rows["study_4"]["error"] and "missing" in rows["study_4"]["error"]
    assert "medseg-series-" not in rows["study_4"]["error"]
    assert (result.out_dir / "study_3" / "seg.dcm").is_file()
    assert not (result.out_dir / "study_4").exists()


def test_unexpected_errors_in_a_case_become_rows(tmp_path, caplog):
    folder = tmp_path / "imgs"
    write_pngs(folder, 2)
    odd = np.zeros((30, 31), np.uint8)
    PILImage.fromarray(odd).save(folder / "odd.png")
    with caplog.at_level(logging.ERROR):
        result = predict(IntensityModel(fail_width=31), [folder], tmp_path / "out", progress=False)
    rows = {r["case_id"]: r for r in result.rows}
    assert result.n_failed == 1 and rows["img0"]["status"] == rows["img1"]["status"] == "ok"
    assert rows["odd"]["status"] == "error"
    assert "RuntimeError: simulated crash" in rows["odd"]["error"]
    assert "odd.png" in rows["odd"]["error"]
    assert "RuntimeError" in caplog.text
    assert not (result.out_dir / "odd").exists()
    assert not [p for p in result.out_dir.iterdir() if p.name.startswith(".")]


def test_classification_of_a_series_is_the_mean_over_slices(tmp_path):
    study = tmp_path / "study"
    make_series(study, 4, seed=8)
    model = IntensityModel(task="classification")
    result = predict(model, [study], tmp_path / "out", progress=False)
    row = result.rows[0]
    image = read_image(next(iter(collect_cases([study]))).folder)
    per_slice = model(image.array)["probabilities"]
    assert row["p_b"] == pytest.approx(float(per_slice[:, 1].mean()), abs=1e-6)
    assert row["class"] == ("b" if per_slice[:, 1].mean() > 0.5 else "a")
    assert not (result.out_dir / row["case_id"]).exists()  # nothing but the tables


# --------------------------------------------------------------------------- a real tiny U-Net


@pytest.fixture(scope="module")
def tiny_run(tiny_unet_run) -> Path:
    """The session's tiny U-Net run folder (tests/conftest.py)."""
    return tiny_unet_run


@pytest.mark.slow
def test_predict_with_a_trained_unet_run_folder(tiny_run, tmp_path):
    import highdicom as hd

    study = tmp_path / "study"
    a = make_series(study, 6, series_number=3, seed=9)
    make_series(study, 4, series_number=7, tilt=0.0, seed=10)
    nifti = tmp_path / "vol.nii.gz"
    affine = np.diag([0.8, -0.8, 2.0, 1.0])
    affine[:3, 3] = [10.0, 5.0, -3.0]
    nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(0, 255, (32, 30, 5)), affine), nifti)
    png = write_pngs(tmp_path / "pngs", 1)[0]

    result = predict(tiny_run, [study, nifti, png], tmp_path / "out", batch_size=4, progress=False)
    print(f"tiny U-Net: {result.n_slices} slices, {result.slices_per_second:.1f} slices/s")
    assert result.n_failed == 0, result.rows
    rows = {r["case_id"]: r for r in result.rows}
    assert set(rows) == {"study_3", "study_7", "vol", "img0"}
    for case in ("study_3", "study_7"):
        assert (result.out_dir / case / "mask.nii.gz").is_file()
        seg = hd.seg.segread(result.out_dir / case / "seg.dcm")
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    seg = hd.seg.segread(result.out_dir / "study_3" / "seg.dcm")
    refs = {
        r.ReferencedSOPInstanceUID
        for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert refs == set(a["sops"])
    vol = nib.load(result.out_dir / "vol" / "mask.nii.gz")
    assert vol.shape == (32, 30, 5) and np.allclose(vol.affine, affine)
    assert (result.out_dir / "img0" / "mask.png").is_file()
    assert result.n_slices == 6 + 4 + 5 + 1
    no_secret_anywhere(result.out_dir)


@pytest.mark.slow
def test_mc_dropout_uncertainty_through_predict(tmp_path, tiny_synth):
    from medseg.config import load_config
    from medseg.inference.predict import predict
    from medseg.training.train import train

    run = train(
        load_config(
            None,
            [
                "data.image_size=[32,32]",
                "model.base_filters=4",
                "model.depth=2",
                "model.dropout=0.3",
                "train.epochs=1",
                "train.warmup_epochs=0",
                "train.batch_size=8",
                f"data.root={tiny_synth / 'segmentation'}",
                f"run.root={tmp_path}",
                "run.name=mc",
            ],
        )
    ).run.path
    patient = sorted((tiny_synth / "segmentation").iterdir())[0]
    r = predict(run, [patient], tmp_path / "out", mc_samples=4, progress=False)
    assert r.n_failed == 0
    for row in r.rows:
        assert float(row["uncertainty"]) >= 0
        assert (tmp_path / "out" / row["uncertainty_map"]).is_file()
    assert any(float(row["uncertainty"]) > 0 for row in r.rows)
    with pytest.raises(ConfigError, match="mc_samples"):
        predict(run, [patient], tmp_path / "out2", mc_samples=1)

    # A volume gets its per-voxel variance as a float NIfTI in the source geometry.
    import nibabel as nib

    affine = np.array([[0.0, 0, 2, 5], [1.2, 0, 0, -3], [0, 1.2, 0, 7], [0, 0, 0, 1]])
    vol = np.random.default_rng(0).uniform(0, 300, (40, 40, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "vol.nii.gz")
    r = predict(run, [tmp_path / "vol.nii.gz"], tmp_path / "out3", mc_samples=3, progress=False)
    row = r.rows[0]
    assert row["status"] == "ok", row["error"]
    unc = nib.load(tmp_path / "out3" / row["uncertainty_volume"])
    np.testing.assert_allclose(unc.affine, affine, atol=1e-5)
    assert unc.shape == vol.shape and unc.get_data_dtype() == np.float32
    assert float(np.asarray(unc.dataobj).min()) >= 0
