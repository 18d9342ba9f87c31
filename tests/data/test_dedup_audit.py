"""Near-duplicate grouping (medseg.data.dedup) and the dataset audit (medseg.data.audit)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.data import dedup
from medseg.data.audit import REPORT_KEYS, audit, format_audit, pseudonym
from medseg.data.dedup import (
    dup_group_id,
    group_near_duplicates,
    hamming_pairs,
    near_duplicate_components,
    perceptual_hashes,
    phash_array,
    phash_value,
)
from medseg.data.scan import Sample, scan_dataset
from medseg.data.synthetic import CLASSES, SynthSpec, classification_sample, generate
from medseg.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _phantom(i: int, size: int = 128) -> np.ndarray:
    """An unrelated phantom per ``i`` (different class and index), uint8 grey or RGB."""
    pixels, _ = classification_sample(SynthSpec(size=size), "Training", CLASSES[i % 4], i // 4)
    return pixels


def _save(array: np.ndarray, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def _samples(paths: list[Path]) -> list[Sample]:
    return [Sample(id=p.name, image=str(p), target=0, group=p.name) for p in paths]


@pytest.fixture()
def dup_folder(tmp_path) -> dict[str, Path]:
    """Originals, re-encoded copies, a shifted + brightened copy and unrelated phantoms."""
    base = _phantom(0)
    grey = base if base.ndim == 2 else base[..., 0]
    shifted = np.clip(np.roll(grey, (1, 1), axis=(0, 1)).astype(int) + 10, 0, 255).astype(np.uint8)
    files = {
        "orig": _save(grey, tmp_path / "a_orig.png"),
        "jpeg": _save(grey, tmp_path / "b_copy.jpg", quality=90),
        "shifted": _save(shifted, tmp_path / "c_shifted.png"),
    }
    shutil.copy(files["orig"], tmp_path / "d_exact.png")
    files["exact"] = tmp_path / "d_exact.png"
    for i in range(1, 6):
        files[f"other{i}"] = _save(_phantom(i * 5 + 1), tmp_path / f"z_other{i}.png")
    return files


# --------------------------------------------------------------------------------------------
# dedup


def test_hashes_are_uint64_and_reencoding_keeps_them_close(dup_folder):
    h = perceptual_hashes([dup_folder[k] for k in ("orig", "jpeg", "shifted", "other1")])
    assert h.dtype == np.uint64 and h.shape == (4,)
    dist = np.bitwise_count(h[0] ^ h)
    assert dist[1] <= 2 and dist[2] <= 6 and dist[3] > 6, dist
    # The array path (images read by medseg.io) gives the same hash as the Pillow path.
    from medseg.io import read_image

    assert phash_array(read_image(dup_folder["jpeg"]).array) == int(h[1])


def test_groups_join_copies_and_keep_unrelated_apart(dup_folder):
    samples = _samples(sorted(dup_folder.values()))
    out = group_near_duplicates(samples, threshold=6)
    group = {s.id: s.group for s in out}
    copies = {group[dup_folder[k].name] for k in ("orig", "jpeg", "shifted", "exact")}
    assert len(copies) == 1
    (gid,) = copies
    assert gid == dup_group_id([dup_folder["orig"].name, dup_folder["jpeg"].name])
    assert gid.startswith("dup-") and len(gid) == 4 + 12
    for k in ("other1", "other2", "other3", "other4", "other5"):
        assert group[dup_folder[k].name] == dup_folder[k].name  # singletons keep their id
    assert [s.id for s in out] == [s.id for s in samples]  # order kept


def test_groups_do_not_depend_on_order(dup_folder):
    samples = _samples(sorted(dup_folder.values()))
    reference = {s.id: s.group for s in group_near_duplicates(samples)}
    shuffled = samples[:]
    random.Random(3).shuffle(shuffled)
    assert shuffled != samples
    assert {s.id: s.group for s in group_near_duplicates(shuffled)} == reference


def test_threshold_zero_groups_only_identical_hashes(dup_folder):
    samples = _samples(sorted(dup_folder.values()))
    hashes = perceptual_hashes([s.image for s in samples])
    by_id = dict(zip([s.id for s in samples], hashes.tolist(), strict=True))
    group = {s.id: s.group for s in group_near_duplicates(samples, threshold=0)}
    orig, shifted = dup_folder["orig"].name, dup_folder["shifted"].name
    assert group[orig] == group[dup_folder["exact"].name] != orig
    assert by_id[shifted] != by_id[orig] and group[shifted] == shifted
    for a in group:
        for b in group:
            assert (group[a] == group[b]) == (by_id[a] == by_id[b]), (a, b)


def test_existing_groups_stay_together(dup_folder):
    # Two "patients": near-duplicates across them join the patients; others keep their names.
    paths = sorted(dup_folder.values())
    samples = [
        Sample(id=p.name, image=str(p), target=0, group="P1" if p.name < "c" else "P2")
        for p in paths
    ]
    samples.append(
        Sample(id="z_other1_again", image=str(dup_folder["other1"]), target=0, group="P3")
    )
    out = {s.id: s.group for s in group_near_duplicates(samples)}
    p1 = {out[s.id] for s in samples if s.group == "P1"}
    p2 = {out[s.id] for s in samples if s.group == "P2"}
    assert p1 == p2 and next(iter(p1)).startswith("dup-")  # the copies link P1 and P2
    assert out["z_other1_again"] == out[dup_folder["other1"].name]


def test_components_match_brute_force_across_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=40, dtype=np.uint64)
    flips = np.left_shift(np.uint64(1), rng.integers(0, 64, size=(120, 3)).astype(np.uint64))
    # Near copies: 0-3 flipped bits of a base hash.
    noisy = base[rng.integers(0, 40, 120)] ^ (flips * (rng.random((120, 3)) < 0.5)).sum(
        axis=1, dtype=np.uint64
    )
    hashes = np.concatenate([base, noisy])
    monkeypatch.setattr(dedup, "_BLOCK_ELEMENTS", 7 * len(hashes))  # 7 rows per block
    rows, cols = hamming_pairs(hashes, 2)
    full = np.array([[bin(int(a) ^ int(b)).count("1") for b in hashes] for a in hashes])
    expected = {(i, j) for i, j in zip(*np.nonzero(full <= 2), strict=True) if i < j}
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == expected
    labels = near_duplicate_components(hashes, 2)
    from scipy.sparse.csgraph import connected_components

    n, ref = connected_components(full <= 2, directed=False)
    assert len(set(labels.tolist())) == n
    assert all((labels[i] == labels[j]) == (ref[i] == ref[j]) for i in range(160) for j in range(i))


def test_unreadable_file_raises_naming_it(tmp_path, dup_folder):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="broken.png"):
        perceptual_hashes([dup_folder["orig"], bad])
    with pytest.raises(ValueError, match="hash_size"):
        perceptual_hashes([dup_folder["orig"]], hash_size=16)


def test_sixteen_bit_images_are_stretched_not_clipped(tmp_path):
    grey = _phantom(2)
    grey = grey if grey.ndim == 2 else grey[..., 0]
    wide = (grey.astype(np.uint16) * 200).astype(np.uint16)  # up to 51000: clipped by "L"
    h8 = phash_value(Image.fromarray(grey))
    h16 = perceptual_hashes([_save(wide, tmp_path / "wide.png")])[0]
    assert bin(h8 ^ int(h16)).count("1") <= 2


# --------------------------------------------------------------------------------------------
# audit on synthetic data


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit") / "synthetic"
    generate(root, SynthSpec(size=48, patients=4, slices_per_patient=6, images_per_class=6))
    return root


@pytest.fixture()
def cls_copy(synth, tmp_path) -> Path:
    root = tmp_path / "classification"
    shutil.copytree(synth / "classification", root)
    return root


def test_audit_counts_classes_and_writes_outputs(synth, tmp_path):
    out = tmp_path / "out"
    report = audit(synth / "classification", "class_folders", out_dir=out)
    assert report["n_images"] == report["n_readable"] == 28
    assert report["classes"] == {c: 7 for c in CLASSES}
    assert report["classes_by_split"] == {
        "Training": {c: 6 for c in CLASSES},
        "Testing": {c: 1 for c in CLASSES},
    }
    assert report["splits"] == {"Training": 24, "Testing": 4}
    assert report["images"]["sizes"] == {"48x48": 28}
    assert sum(report["images"]["channels"].values()) == 28
    assert report["intensity"]["n_images"] == 28 and report["intensity"]["min"] >= 0
    assert report["intensity"]["max"] <= 255
    # Unmodified phantoms are all different: no duplicates, no leaks, one group per image.
    assert report["near_duplicate_groups"]["n_groups"] == 0
    assert report["leaks"]["n_groups"] == 0 and report["cross_class_duplicates"]["n_pairs"] == 0
    assert report["n_groups"] == 28 and report["problems"] == []
    saved = json.loads((out / "audit.json").read_text())
    assert set(REPORT_KEYS) <= set(saved)
    assert saved["n_images"] == 28
    with Image.open(out / "montage.png") as im:
        assert im.format == "PNG" and im.size[0] > 200
    table = format_audit(report)
    assert "glioma 7" in table and "near-dups" in table and "leaks Training/Testing" in table


def test_audit_reports_planted_leak_and_cross_class_copy(cls_copy):
    train_img = cls_copy / "Training" / "glioma" / "glioma_0002.png"
    leak = cls_copy / "Testing" / "glioma" / "leaked_copy.jpg"
    Image.open(train_img).convert("RGB").save(leak, quality=90)  # re-encoded copy in Testing
    mislabelled = cls_copy / "Training" / "notumor" / "relabelled.png"
    shutil.copy(cls_copy / "Training" / "meningioma" / "meningioma_0003.png", mislabelled)

    report = audit(cls_copy, "class_folders")
    leaks = report["leaks"]
    assert leaks["n_groups"] == 1 and leaks["n_pairs"] == 1 and leaks["n_confirmed_pairs"] == 1
    assert leaks["groups"] == [
        {
            "Training": ["Training/glioma/glioma_0002.png"],
            "Testing": ["Testing/glioma/leaked_copy.jpg"],
        }
    ]
    assert leaks["n_images_by_split"] == {"Training": 1, "Testing": 1}
    cross = report["cross_class_duplicates"]
    assert cross["n_groups"] == 1 and cross["n_confirmed_pairs"] == 1
    pair = cross["closest_pairs"][0]
    assert {pair["a"], pair["b"]} == {
        "Training/meningioma/meningioma_0003.png (meningioma)",
        "Training/notumor/relabelled.png (notumor)",
    }
    assert pair["distance"] == 0 and pair["correlation"] > 0.99
    nd = report["near_duplicate_groups"]
    assert nd["n_groups"] == 2 and nd["largest"] == [2, 2]
    assert nd["within_class"]["glioma"] == 1  # the leak is a glioma/glioma pair
    assert report["n_groups"] == 30 - 2  # 30 images, two pairs joined


def test_audit_lists_broken_file_with_its_name(cls_copy):
    (cls_copy / "Training" / "pituitary" / "broken.png").write_text("this is not a PNG")
    report = audit(cls_copy, "class_folders")
    assert report["n_images"] == 29 and report["n_readable"] == 28
    assert any("Training/pituitary/broken.png" in p for p in report["problems"])
    assert report["n_groups"] == 29  # the unreadable image is still its own group


def test_audit_segmentation_masks(synth, tmp_path):
    root = tmp_path / "segmentation"
    shutil.copytree(synth / "segmentation", root)
    masks = sorted(root.glob("*/*_mask.tif"))
    odd = masks[3]
    values = np.zeros((48, 48), np.uint8)
    values[10:20, 10:20] = 7
    Image.fromarray(values).save(odd)
    small = masks[8]
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(small)
    (root / masks[0].parent.name / "orphan_mask.tif").write_bytes(masks[1].read_bytes())

    out = tmp_path / "out"
    report = audit(root, "lgg", out_dir=out)
    assert report["task"] == "segmentation" and report["n_images"] == 24
    assert report["n_groups"] == 4 and report["groups"]["folder"] == 4
    rel_odd = odd.relative_to(root).as_posix()
    assert report["non_binary_masks"] == [{"mask": rel_odd, "values": [0, 7]}]
    problems = "\n".join(report["problems"])
    assert f"{rel_odd}: mask is not binary, values [0, 7]" in problems
    assert f"{small.relative_to(root).as_posix()}: mask is 48x40 but the image is 48x48" in problems
    assert "orphan_mask.tif" in problems  # a mask without an image (from the scanner)
    seg = report["segmentation"]
    expected_empty = (
        sum(not np.asarray(Image.open(m)).any() for m in masks if m not in (odd, small)) + 1
    )  # the 40x48 mask is empty too
    assert seg["n_masks"] == 24 and seg["empty_masks"] == expected_empty
    assert seg["empty_fraction"] == round(expected_empty / 24, 4)
    ff = seg["foreground_fraction"]
    assert 0 < ff["min"] <= ff["p50"] <= ff["max"] < 1
    assert report["cross_class_duplicates"] is None and report["leaks"]["splits"] == []
    assert (out / "montage.png").stat().st_size > 0
    assert set(REPORT_KEYS) <= set(json.loads((out / "audit.json").read_text()))


def test_audit_detects_the_layout(synth):
    assert audit(synth / "classification")["layout"] == "class_folders"
    assert audit(synth / "segmentation")["layout"] == "lgg"


def test_audit_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        audit(tmp_path / "nope", "class_folders")


def test_pseudonym_replaces_whole_path_components():
    from medseg.data.audit import _pseudonymise

    report = {"root": "/data/PGBM-001", "a": ["PGBM-001/s/x#1", "/d/PGBM-0010/y: bad"]}
    out = _pseudonymise(report, {"PGBM-001", "PGBM-0010"})
    assert out["a"] == [
        f"{pseudonym('PGBM-001')}/s/x#1",
        f"/d/{pseudonym('PGBM-0010')}/y: bad",
    ]
    assert out["root"] == "/data/PGBM-001" and "PGBM" not in json.dumps(out["a"])


# --------------------------------------------------------------------------------------------
# real data (skipped without ../shared/data)


def _real(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (see the project README)")
    return path


@pytest.mark.realdata
@pytest.mark.slow
def test_real_brain_tumour_audit(tmp_path):
    root = _real("brain-tumor-mri")
    report = audit(root, "class_folders", out_dir=tmp_path)
    assert report["n_images"] == report["n_readable"] == 5708
    assert report["classes"] == {
        "glioma": 1321,
        "meningioma": 1339,
        "notumor": 1591,
        "pituitary": 1457,
    }
    assert report["images"]["sizes"] == {"224x224": 5708}
    nd = report["near_duplicate_groups"]
    assert nd["n_groups"] > 500 and nd["identical_hash_groups"] > 100
    assert report["n_groups"] < 0.7 * 5708  # many images share a near-duplicate group
    assert report["leaks"]["splits"] == ["Training"] and report["leaks"]["n_groups"] == 0
    assert report["problems"] == []
    # The same grouping as scan_dataset's phash grouping (through medseg.data.dedup).
    scan = scan_dataset(root, "class_folders", group_by="phash", phash_threshold=6)
    assert len({s.group for s in scan.samples}) == report["n_groups"]


@pytest.mark.realdata
@pytest.mark.slow
def test_real_lgg_audit():
    report = audit(_real("lgg-mri-segmentation/kaggle_3m"), "lgg")
    assert report["n_images"] == 3428 // 2 and report["n_groups"] == 46
    assert report["images"]["channels"] == {"rgb": 1714}
    assert report["non_binary_masks"] == [] and report["problems"] == []
    assert 0.5 < report["segmentation"]["empty_fraction"] < 0.8


@pytest.mark.realdata
def test_real_dicom_audit_has_no_patient_ids():
    root = _real("brain-tumor-progression-dicom")
    report = audit(root, "dicom_series", image_series="T1post")
    assert report["n_images"] > 10 and report["segmentation"]["n_masks"] == report["n_images"]
    text = json.dumps({k: v for k, v in report.items() if k != "root"})
    assert "PGBM" not in text and report["pseudonymised"]
