"""Dataset fingerprint, the 3D plan, the msd scanner and the msd audit."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.config import Config
from medseg.data.audit import audit, format_audit
from medseg.data.augment3d import flip_axes
from medseg.data.fingerprint import (
    MAX_PATCH_VOXELS,
    VolumePlan,
    compute_fingerprint,
    default_patch_size,
    flip_warning,
    label_order,
    make_plan,
)
from medseg.data.scan import detect_layout, scan_dataset
from medseg.data.scan_msd import MsdScanResult, describe, sample_images, scan_msd
from medseg.data.synthetic3d import write_msd_dataset, write_nifti_volume
from medseg.errors import ConfigError, DataError
from medseg.io import read_case_image, read_case_labels, read_dataset_json, read_image, read_mask

SPACING = (2.0, 1.0, 1.5)
SHAPE = (12, 14, 10)


@pytest.fixture(scope="module")
def msd(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fp") / "ds"
    return write_msd_dataset(root, n_cases=4, shape=SHAPE, spacing=SPACING, oblique=False)


def _fingerprint(**overrides) -> dict:
    """A hand-made fingerprint (what make_plan reads)."""
    fp = {
        "n_cases": 10,
        "spacing": {"median": [2.0, 1.0, 1.5], "min": [2.0, 1.0, 1.5], "max": [2.0, 1.0, 1.5]},
        "shape": {"median": [20, 50, 20], "min": [18, 45, 19], "max": [22, 55, 21]},
        "extent_mm": {"median": [40.0, 50.0, 30.0], "min": [36, 45, 28.5], "max": [44, 55, 31.5]},
        "intensity": [
            {"channel": 0, "p0_5": -900.0, "p50": 40.0, "p99_5": 1200.0, "mean": 55.0, "std": 80.0}
        ],
        "labels": {"0": "background", "1": "liver"},
        "channels": {"0": "CT"},
        "modality": "MR",
    }
    fp.update(overrides)
    return fp


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_values(msd):
    d = read_dataset_json(msd)
    fp = compute_fingerprint(d, workers=2)
    shapes, counts, foreground = [], np.zeros(3), []
    for case in d.cases:
        image = read_case_image(case, 1).array[..., 0]
        labels = read_case_labels(case, d.labels)
        shapes.append(labels.shape)
        counts += np.bincount(labels.ravel(), minlength=3)
        foreground.append(image[labels > 0])
    shapes = np.array(shapes)
    assert fp["n_cases"] == 4
    assert fp["spacing"] == {k: list(SPACING) for k in ("median", "min", "max")}
    assert fp["shape"]["median"] == pytest.approx(np.median(shapes, axis=0).tolist())
    assert fp["shape"]["min"] == shapes.min(axis=0).tolist()
    assert fp["shape"]["max"] == shapes.max(axis=0).tolist()
    assert all(SHAPE[a] <= fp["shape"]["min"][a] for a in range(3))
    assert fp["extent_mm"]["median"] == pytest.approx(
        (np.median(shapes * np.array(SPACING), axis=0)).tolist()
    )
    share = fp["class_share"]
    assert list(share) == ["background", "anterior", "posterior"]
    assert [share[k] for k in share] == pytest.approx((counts / counts.sum()).tolist(), abs=1e-6)
    # fewer foreground voxels than the sampling cap: every one is used
    values = np.concatenate(foreground).astype(np.float64)
    (it,) = fp["intensity"]
    assert it["n_voxels"] == values.size and it["name"] == "MRI"
    assert it["mean"] == pytest.approx(values.mean(), rel=1e-6)
    assert it["std"] == pytest.approx(values.std(), rel=1e-6)
    assert it["p50"] == pytest.approx(np.percentile(values, 50))
    assert it["p0_5"] < it["p50"] < it["p99_5"]
    assert fp["labels"] == {"0": "background", "1": "anterior", "2": "posterior"}
    assert fp["modality"] == "MR" and fp["channels"] == {"0": "MRI"}
    text = json.dumps(fp)  # JSON-able, without file names or case ids
    assert "phantom" not in text and str(msd) not in text and ".nii" not in text


def test_fingerprint_max_cases_and_problems(tmp_path, msd):
    d = read_dataset_json(msd)
    assert compute_fingerprint(d, max_cases=2)["n_cases"] == 2
    root = shutil.copytree(msd, tmp_path / "ds")
    d = read_dataset_json(root)
    bad = d.cases[2]
    labels = read_mask(bad.label)
    labels[0, 0, 0] = 9
    write_nifti_volume(bad.label, labels, read_image(bad.images[0]).meta.affine)
    with pytest.raises(DataError, match="label values \\[9\\]"):
        compute_fingerprint(d)
    problems: list[str] = []
    fp = compute_fingerprint(d, problems=problems)
    assert fp["n_cases"] == 3 and len(problems) == 1 and "phantom_002" in problems[0]


# --------------------------------------------------------------------------- plan


def test_plan_defaults_from_fingerprint():
    cfg = Config()
    cfg.model.depth = 3  # multiples of 8
    plan = make_plan(_fingerprint(), cfg)
    assert plan.target_spacing == [2.0, 1.0, 1.5]
    assert plan.patch_size == [24, 56, 24]  # 20, 50, 20 voxels rounded up to multiples of 8
    assert plan.normalization == "zscore"
    assert plan.intensity_clip == plan.channel_mean == plan.channel_std == []
    assert plan.labels == {0: "background", 1: "liver"} and plan.num_classes == 2
    assert plan.channels == {0: "CT"} and plan.from_config == []


def test_plan_overrides():
    cfg = Config()
    cfg.model.depth = 3
    cfg.volume.target_spacing = [1.0, 1.0, 1.0]
    plan = make_plan(_fingerprint(), cfg)
    assert plan.patch_size == [40, 56, 32]  # 40, 50, 30 mm at 1 mm
    assert plan.from_config == ["target_spacing"]
    cfg.train.patch_size = [16, 32, 16]
    cfg.volume.normalization = "none"
    plan = make_plan(_fingerprint(), cfg)
    assert plan.patch_size == [16, 32, 16] and plan.normalization == "none"
    assert plan.from_config == ["target_spacing", "patch_size", "normalization"]
    cfg.train.patch_size = [64, 64]
    with pytest.raises(ConfigError, match="train.patch_size"):
        make_plan(_fingerprint(), cfg)


def test_plan_ct():
    cfg = Config()
    plan = make_plan(_fingerprint(modality="CT"), cfg)
    assert plan.normalization == "ct"
    assert plan.intensity_clip == [-900.0, 1200.0]
    assert plan.channel_mean == [55.0] and plan.channel_std == [80.0]
    assert plan.from_config == []
    cfg.volume.intensity_clip = [-100.0, 300.0]
    plan = make_plan(_fingerprint(modality="CT"), cfg)
    assert plan.intensity_clip == [-100.0, 300.0] and plan.from_config == ["intensity_clip"]
    cfg.volume.normalization = "zscore"
    assert make_plan(_fingerprint(modality="CT"), cfg).intensity_clip == []


def test_patch_size_cap():
    patch = default_patch_size([300.0, 200.0, 260.0], 16)
    assert math.prod(patch) <= MAX_PATCH_VOXELS
    assert all(p % 16 == 0 for p in patch)
    assert patch == [128, 128, 128]
    assert default_patch_size([3.0, 40.0, 17.0], 16) == [16, 48, 32]


def test_plan_dict_round_trip():
    plan = make_plan(_fingerprint(modality="CT"), Config())
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["labels"] == {"0": "background", "1": "liver"} and d["from_config"] == []
    assert VolumePlan.from_dict(d) == plan
    del d["patch_size"]
    with pytest.raises(ConfigError, match="missing key.*patch_size"):
        VolumePlan.from_dict(d)


# --------------------------------------------------------------------------- scan, audit


def test_scan_msd(msd):
    assert detect_layout(msd) == "msd"
    result = scan_dataset(msd, "auto")
    assert isinstance(result, MsdScanResult) and result.layout == "msd"
    assert [s.id for s in result.samples] == [f"phantom_00{i}" for i in range(4)]
    sample = result.samples[1]
    assert sample.group == sample.id and sample.index is None
    assert sample_images(sample) == (msd / "imagesTr" / "phantom_001.nii.gz",)
    assert sample.target == str(msd / "labelsTr" / "phantom_001.nii.gz")
    assert result.case(sample).case_id == "phantom_001"
    assert result.description.labels == describe(msd).labels
    with pytest.raises(DataError, match="phash"):
        scan_dataset(msd, "msd", group_by="phash")


def test_scan_msd_channels_and_problems(tmp_path):
    root = write_msd_dataset(tmp_path / "ds", n_cases=2, shape=SHAPE, channels=2)
    result = scan_msd(root)
    assert [p.name for p in sample_images(result.samples[0])] == [
        "phantom_000_0000.nii.gz",
        "phantom_000_0001.nii.gz",
    ]
    label = result.case(result.samples[1]).label
    labels = read_mask(label)
    write_nifti_volume(label, labels[:-1], read_image(label).meta.affine)
    result = scan_msd(root)
    assert [s.id for s in result.samples] == ["phantom_000"]
    assert len(result.problems) == 1 and "label shape" in result.problems[0]
    with pytest.raises(DataError, match="label shape"):
        scan_msd(root, strict=True)


def test_audit_msd(tmp_path, msd):
    report = audit(msd, out_dir=tmp_path / "out")
    assert report["layout"] == "msd" and report["n_images"] == 4 and report["problems"] == []
    assert report["fingerprint"]["spacing"]["median"] == list(SPACING)
    assert report["plan"]["target_spacing"] == list(SPACING)
    assert report["plan"]["normalization"] == "zscore"
    assert (tmp_path / "out" / "montage.png").stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert saved["plan"] == report["plan"]
    text = format_audit(report)
    assert "plan patch" in text and "(fingerprint)" in text and "anterior" in text
    cfg = Config()
    cfg.volume.target_spacing = [1.0, 1.0, 1.0]
    report = audit(msd, "msd", config=cfg)
    assert report["plan"]["target_spacing"] == [1.0, 1.0, 1.0]
    assert "[1, 1, 1] (config)" in format_audit(report)


def test_real_hippocampus(shared_data):
    root = shared_data / "msd-hippocampus"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    d = read_dataset_json(root)
    assert len(d.cases) == 180
    assert d.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert d.modality == "MR"
    fp = compute_fingerprint(d, max_cases=30)
    assert fp["spacing"]["median"] == [1.0, 1.0, 1.0]
    assert 30 <= fp["shape"]["median"][0] <= 40


# --------------------------------------------------------------------------- label order


def test_label_order_of_the_phantoms(msd):
    # the phantoms' two structures lie at fixed places: their order is kept on some axis
    order = compute_fingerprint(read_dataset_json(msd))["label_order"]
    assert order["n_cases"] == 4 and len(order["axes"]) == 3
    assert all(0.5 <= v <= 1.0 for v in order["axes"]) and max(order["axes"]) == 1.0


def test_label_order_counts_the_majority_order_per_axis():
    same = [(1.0, 5.0, 2.0), (3.0, 1.0, 2.5)]  # label 1 below label 2 on axis 0, above on 1
    swapped = [(3.0, 5.0, 2.5), (1.0, 1.0, 2.0)]  # axis 0 swapped, axis 2 swapped too
    cases = [same] * 3 + [swapped] + [[(0.0, 0.0, 0.0), None]]  # the last lacks label 2
    order = label_order(cases)
    assert order == {"axes": [0.75, 1.0, 0.75], "n_cases": 4}
    assert label_order([[(1.0, 2.0, 3.0)]] * 3) is None  # one structure: no order
    assert label_order([[(1.0, 2.0, 3.0), None]]) is None  # no case holds both


def test_flip_warning_names_the_flips_along_kept_axes():
    fp = _fingerprint(label_order={"axes": [1.0, 0.5, 0.95], "n_cases": 10})
    flips = Config().augment
    flips.dflip = flips.vflip = flips.hflip = 0.5
    warning = flip_warning(fp, flips)
    assert "augment.dflip (100% of cases)" in warning and "augment.hflip (95%" in warning
    assert "vflip" not in warning
    flips.dflip = flips.hflip = 0.0
    assert flip_warning(fp, flips) is None  # only the row axis flips, and order is not kept there
    flips.hflip, flips.enabled = 0.5, False
    assert flip_warning(fp, flips) is None  # augmentation off: no flip at all
    assert flip_warning(_fingerprint(), Config().augment) is None  # one structure


def test_flip_axes():
    cfg = Config().augment
    assert flip_axes(cfg) == [2]  # the default: hflip 0.5, the column axis
    cfg.dflip, cfg.vflip, cfg.hflip = 0.2, 0.0, 0.0
    assert flip_axes(cfg) == [0]
    cfg.enabled = False
    assert flip_axes(cfg) == []
