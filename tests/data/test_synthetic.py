"""Tests for medseg.data.synthetic: determinism, on-disk layout, mask alignment, reuse/overwrite."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medseg.data import synthetic
from medseg.data.phantoms import CLASSES, phantom_slice, phantom_volume
from medseg.data.synthetic import (
    LAYOUT_VERSION,
    SynthSpec,
    classification_sample,
    generate,
    segmentation_patient,
)
from medseg.errors import ConfigError, RunExistsError

SPEC = SynthSpec(seed=3, size=48, patients=4, slices_per_patient=8, images_per_class=8)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SynthSummary:
    return generate(tmp_path_factory.mktemp("synth") / "set", SPEC)


def _seg_slices(root: Path) -> list[tuple[Path, np.ndarray, np.ndarray]]:
    out = []
    for patient in sorted(p for p in root.iterdir() if p.is_dir()):
        n = len(list(patient.glob("*_mask.tif")))
        for k in range(1, n + 1):
            image = np.asarray(Image.open(patient / f"{patient.name}_{k}.tif"))
            mask = np.asarray(Image.open(patient / f"{patient.name}_{k}_mask.tif"))
            out.append((patient, image, mask))
    return out


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_identical_bytes(tmp_path: Path, dataset: synthetic.SynthSummary) -> None:
    again = generate(tmp_path / "again", SPEC)
    first, second = _hashes(dataset.root), _hashes(again.root)
    assert len(first) > 100
    assert first == second


def test_different_seed_gives_different_files(tmp_path: Path) -> None:
    small = dict(size=32, patients=2, slices_per_patient=4, images_per_class=4)
    a = _hashes(generate(tmp_path / "a", SynthSpec(seed=1, **small)).root)
    b = _hashes(generate(tmp_path / "b", SynthSpec(seed=2, **small)).root)
    images = [k for k in a if k.endswith((".png", ".tif")) and not k.endswith("_mask.tif")]
    assert images and set(a) == set(b)  # same layout ...
    assert all(a[k] != b[k] for k in images)  # ... different pixels everywhere


def test_files_carry_no_timestamps(dataset: synthetic.SynthSummary) -> None:
    tif = next(dataset.segmentation_dir.rglob("*_1.tif"))
    with Image.open(tif) as image:
        assert 306 not in image.tag_v2  # TIFF DateTime
    for png in dataset.classification_dir.rglob("*.png"):
        assert b"tIME" not in png.read_bytes()


def test_items_do_not_depend_on_generation_order() -> None:
    late = segmentation_patient(SPEC, 3)
    for i in range(3):
        segmentation_patient(SPEC, i)
    again = segmentation_patient(SPEC, 3)
    assert late[0] == again[0]
    np.testing.assert_array_equal(late[1], again[1])
    a = classification_sample(SPEC, "Testing", "glioma", 1)[0]
    classification_sample(SPEC, "Testing", "glioma", 0)
    np.testing.assert_array_equal(a, classification_sample(SPEC, "Testing", "glioma", 1)[0])


def test_written_files_match_in_memory_items(dataset: synthetic.SynthSummary) -> None:
    name, images, masks = segmentation_patient(SPEC, 1)
    folder = dataset.segmentation_dir / name
    for k in range(SPEC.slices_per_patient):
        np.testing.assert_array_equal(
            np.asarray(Image.open(folder / f"{name}_{k + 1}.tif")), images[k]
        )
        np.testing.assert_array_equal(
            np.asarray(Image.open(folder / f"{name}_{k + 1}_mask.tif")), masks[k]
        )
    pixels, _ = classification_sample(SPEC, "Training", "meningioma", 2)
    png = dataset.classification_dir / "Training" / "meningioma" / "meningioma_0003.png"
    np.testing.assert_array_equal(np.asarray(Image.open(png)), pixels)


# ---------------------------------------------------------------------------------------------
# Layout


def test_segmentation_layout_matches_lgg(dataset: synthetic.SynthSummary) -> None:
    patients = sorted(p for p in dataset.segmentation_dir.iterdir())
    assert len(patients) == SPEC.patients
    institutions = set()
    for patient in patients:
        assert patient.is_dir() and re.fullmatch(r"SYN_[ABC]_\d{4}", patient.name)
        institutions.add(patient.name.split("_")[1])
        pattern = re.compile(rf"{re.escape(patient.name)}_([1-9]\d*)(_mask)?\.tif")
        images, masks = set(), set()
        for f in patient.iterdir():
            match = pattern.fullmatch(f.name)
            assert match, f.name
            (masks if match.group(2) else images).add(int(match.group(1)))
        assert images == masks == set(range(1, SPEC.slices_per_patient + 1))
        with Image.open(patient / f"{patient.name}_1.tif") as image:
            assert (image.mode, image.format) == ("RGB", "TIFF")
        with Image.open(patient / f"{patient.name}_1_mask.tif") as mask:
            assert (mask.mode, mask.format) == ("L", "TIFF")
    assert len(institutions) >= 2


def test_classification_layout_matches_kaggle(dataset: synthetic.SynthSummary) -> None:
    root = dataset.classification_dir
    assert sorted(p.name for p in root.iterdir()) == ["Testing", "Training"]
    modes = []
    for split, per_class in (("Training", 8), ("Testing", 2)):
        assert tuple(sorted(p.name for p in (root / split).iterdir())) == CLASSES
        for cls in CLASSES:
            files = sorted((root / split / cls).iterdir())
            assert len(files) == per_class
            for f in files:
                assert re.fullmatch(rf"{cls}_\d{{4}}\.png", f.name)
                with Image.open(f) as image:
                    assert image.format == "PNG" and image.size == (SPEC.size, SPEC.size)
                    modes.append(image.mode)
    assert set(modes) == {"L", "RGB"}
    assert modes.count("L") > modes.count("RGB")


def test_rgb_is_about_one_in_four_and_nearly_grey() -> None:
    spec = SynthSpec(size=32)
    samples = [classification_sample(spec, "Training", "notumor", i)[0] for i in range(160)]
    rgb = [s for s in samples if s.ndim == 3]
    assert 0.12 < len(rgb) / len(samples) < 0.38
    for s in rgb:
        assert s.shape == (32, 32, 3)
        spread = s.astype(int).max(axis=2) - s.astype(int).min(axis=2)
        assert spread.max() <= 0.07 * 255


def test_synth_json_written_with_true_counts(dataset: synthetic.SynthSummary) -> None:
    meta = json.loads((dataset.root / "synth.json").read_text())
    assert meta["spec"] == SPEC.to_dict()
    assert meta["layout_version"] == LAYOUT_VERSION
    assert SynthSpec.from_dict(meta["spec"]) == SPEC
    slices = _seg_slices(dataset.segmentation_dir)
    assert meta["counts"]["seg_slices"] == dataset.n_seg_slices == len(slices)
    tumour = sum(bool(m.any()) for _, _, m in slices)
    assert meta["counts"]["seg_tumour_slices"] == dataset.n_seg_tumour_slices == tumour
    pngs = list(dataset.classification_dir.rglob("*.png"))
    assert meta["counts"]["cls_images"] == dataset.n_cls_images == len(pngs) == 40


# ---------------------------------------------------------------------------------------------
# Image content


def test_masks_align_with_brighter_flair(dataset: synthetic.SynthSummary) -> None:
    checked = 0
    for _, image, mask in _seg_slices(dataset.segmentation_dir):
        assert image.shape == (SPEC.size, SPEC.size, 3) and mask.shape == image.shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
        inside = mask > 0
        if inside.sum() < 10:
            continue
        ring = ndimage.binary_dilation(inside, iterations=2) & ~inside
        flair = image[..., 1].astype(float)
        assert flair[inside].mean() > flair[ring].mean() + 5
        checked += 1
    assert checked >= 5


def test_some_slices_empty_some_not_and_tumour_runs_contiguous(
    dataset: synthetic.SynthSummary,
) -> None:
    fraction_empty = 1 - dataset.n_seg_tumour_slices / dataset.n_seg_slices
    assert 0.25 < fraction_empty < 0.75
    for i in range(SPEC.patients):
        _, _, masks = segmentation_patient(SPEC, i)
        present = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
        assert present.size >= 1
        assert present[-1] - present[0] + 1 == present.size  # one contiguous run


def test_head_shrinks_towards_end_slices() -> None:
    rng = np.random.default_rng(0)
    images, masks = phantom_volume(rng, 48, 9)
    assert images.shape == (9, 48, 48, 3) and images.dtype == np.float32
    assert masks.shape == (9, 48, 48) and set(np.unique(masks)) <= {0, 1}
    area = (images.max(axis=3) > 0.2).reshape(9, -1).sum(axis=1)
    assert area[4] > area[0] and area[4] > area[-1]
    assert images[:, :2, :2].mean() < 0.1  # background near zero


def test_volume_lesions_vary_in_size() -> None:
    volumes = [phantom_volume(np.random.default_rng(s), 64, 8)[1].sum() for s in range(12)]
    assert max(volumes) > 4 * min(volumes)


def _lesion_stats(cls: str | None, n: int = 24, size: int = 64) -> list[dict[str, float]]:
    stats = []
    for i in range(n):
        image, mask = phantom_slice(np.random.default_rng(i), size, cls)
        image, inside = image[..., 0], mask.astype(bool)
        assert image.shape == mask.shape == (size, size)
        if not inside.any():
            stats.append({})
            continue
        ring = ndimage.binary_dilation(inside, iterations=2) & ~inside
        head = ndimage.binary_fill_holes(image > 0.2)
        hy, hx = np.argwhere(head).mean(axis=0)
        my, mx = np.argwhere(inside).mean(axis=0)
        stats.append(
            {
                "contrast": float(image[inside].mean() - image[ring].mean()),
                "area": float(inside.sum()),
                "dx": float(mx - hx) / size,
                "dy": float(my - hy) / size,
                "edge": float(ndimage.distance_transform_edt(head)[inside].min()),
            }
        )
    return stats


def test_notumor_has_no_lesion_and_others_have_bright_lesions() -> None:
    assert all(s == {} for s in _lesion_stats("notumor"))
    assert all(s == {} for s in _lesion_stats(None))
    for cls in ("glioma", "meningioma", "pituitary"):
        stats = _lesion_stats(cls)
        assert all(s and s["contrast"] > 0.03 for s in stats), cls


def test_lesion_location_follows_class() -> None:
    glioma, meningioma, pituitary = (
        _lesion_stats(c) for c in ("glioma", "meningioma", "pituitary")
    )
    median = {k: lambda s, k=k: float(np.median([x[k] for x in s])) for k in ("area", "edge")}
    # pituitary: small, near the midline, below the centre
    assert all(abs(s["dx"]) < 0.08 and s["dy"] > 0.08 for s in pituitary)
    assert median["area"](pituitary) < median["area"](glioma)
    # glioma: off the midline, in a hemisphere
    assert np.mean([abs(s["dx"]) for s in glioma]) > 0.08
    # meningioma: against the skull, gliomas and pituitary lesions deeper inside
    assert max(s["edge"] for s in meningioma) < min(s["edge"] for s in pituitary)
    assert median["edge"](meningioma) < 0.5 * median["edge"](glioma)


def test_phantom_slice_rejects_unknown_class() -> None:
    with pytest.raises(ConfigError):
        phantom_slice(np.random.default_rng(0), 32, "astrocytoma")


# ---------------------------------------------------------------------------------------------
# Reuse, overwrite, atomic writes, spec validation


def test_identical_spec_is_reused_without_rewriting(tmp_path: Path) -> None:
    spec = SynthSpec(size=32, patients=2, slices_per_patient=4, images_per_class=4)
    out = tmp_path / "set"
    first = generate(out, spec)
    assert first.created
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    second = generate(str(out), spec)
    assert not second.created
    assert second == synthetic.SynthSummary(**{**vars(first), "created": False})
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert _siblings(out) == []


def test_different_spec_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "set"
    generate(out, SynthSpec(size=32, patients=2, slices_per_patient=4, images_per_class=4))
    other = SynthSpec(seed=9, size=32, patients=3, slices_per_patient=4, images_per_class=4)
    with pytest.raises(RunExistsError, match="--overwrite") as info:
        generate(out, other)
    assert str(out) in str(info.value)
    assert json.loads((out / "synth.json").read_text())["spec"]["seed"] == 0

    summary = generate(out, other, overwrite=True)
    assert summary.created and summary.n_seg_slices == 12
    assert json.loads((out / "synth.json").read_text())["spec"] == other.to_dict()
    assert len(list(summary.segmentation_dir.iterdir())) == 3
    assert _siblings(out) == []


def test_foreign_folder_is_protected_but_empty_folder_is_used(tmp_path: Path) -> None:
    spec = SynthSpec(size=32, patients=1, slices_per_patient=4, images_per_class=4)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RunExistsError):
        generate(foreign, spec)
    assert (foreign / "notes.txt").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate(empty, spec).created
    assert (empty / "synth.json").is_file()


def test_failure_leaves_no_temp_folder_and_no_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(spec: SynthSpec, index: int) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "segmentation_patient", boom)
    out = tmp_path / "set"
    with pytest.raises(RuntimeError, match="disk full"):
        generate(out, SynthSpec(size=32, patients=1, slices_per_patient=4, images_per_class=4))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"size": 8}, {"seed": -1}, {"patients": 0}, {"slices_per_patient": 2}, {"size": 32.0}],
)
def test_bad_spec_is_a_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SynthSpec(**kwargs)
    with pytest.raises(ConfigError, match="colour"):
        SynthSpec.from_dict({"colour": 1})
