"""Grouped folds exported for nnU-Net (``splits_final.json``) and MONAI (datalist with ``fold``)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from medseg.cli.split_cmd import add_split_verb, cmd_split
from medseg.data.scan import scan_dataset
from medseg.data.split import load_manifest
from medseg.data.split_export import export_cases, export_splits, grouped_kfold
from medseg.data.synthetic3d import write_msd_dataset
from medseg.errors import DataError, RunExistsError

K = 3


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory) -> Path:
    """6 two-channel 8x8x8 cases in nnU-Net's ``_0000``/``_0001`` files, and one test case."""
    root = write_msd_dataset(
        tmp_path_factory.mktemp("msd") / "Task99", n_cases=6, shape=(8, 8, 8), channels=2
    )
    (root / "imagesTs").mkdir()
    for c in range(2):
        src = root / "imagesTr" / f"phantom_000_{c:04d}.nii.gz"
        (root / "imagesTs" / f"phantom_900_{c:04d}.nii.gz").write_bytes(src.read_bytes())
    meta = json.loads((root / "dataset.json").read_text())
    meta["test"] = ["./imagesTs/phantom_900.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _check_folds(folds: list[dict], group_of: dict[str, str]) -> None:
    """Each fold's val and train partition the cases; no group crosses a fold boundary."""
    vals = [v for f in folds for v in f["val"]]
    assert sorted(vals) == sorted(group_of), "the val parts together hold every case once"
    for f in folds:
        assert sorted(f["train"] + f["val"]) == sorted(group_of)
        assert not {group_of[i] for i in f["train"]} & {group_of[i] for i in f["val"]}
    fold_of_group: dict[str, set[int]] = {}
    for n, f in enumerate(folds):
        for i in f["val"]:
            fold_of_group.setdefault(group_of[i], set()).add(n)
    assert all(len(v) == 1 for v in fold_of_group.values())


def test_lgg_folds_are_grouped_for_nnunet_and_monai(tiny_synth, tmp_path):
    scan = scan_dataset(tiny_synth / "segmentation", "lgg")
    manifest = grouped_kfold(scan, K, seed=1)
    group_of = {s.id: s.group for s in scan.samples}
    folds = json.loads(export_splits(scan, manifest, "nnunet", tmp_path / "s.json").read_text())
    assert len(folds) == K
    _check_folds(folds, group_of)

    datalist = json.loads(export_splits(scan, manifest, "monai", tmp_path / "d.json").read_text())
    entries = datalist["training"]
    assert sorted(e["fold"] for e in entries) == sorted(
        n for n, f in enumerate(folds) for _ in f["val"]
    )
    by_image = {e["image"]: e["fold"] for e in entries}
    assert {i: by_image[i] for f in folds for i in f["val"]} == {
        i: n for n, f in enumerate(folds) for i in f["val"]
    }
    root = tiny_synth / "segmentation"
    assert all((root / e["image"]).is_file() and (root / e["label"]).is_file() for e in entries)
    assert "testing" not in datalist

    medseg_path = export_splits(scan, manifest, "medseg", tmp_path / "m.json")
    assert load_manifest(medseg_path)["folds"] == manifest["folds"]


def test_msd_ids_are_nnunet_case_ids_and_monai_paths_resolve(msd_root, tmp_path):
    scan = scan_dataset(msd_root, "auto")
    # a case stored one file per channel (its Sample.image joins them with os.pathsep): the
    # manifest hashes every channel file
    manifest = grouped_kfold(scan, K, seed=0)
    assert len(manifest["hashes"]) == 6
    assert all(h.count(":") == 2 for h in manifest["hashes"].values()), "image0:image1:mask"
    folds = json.loads(export_splits(scan, manifest, "nnunet", tmp_path / "s.json").read_text())
    # nnU-Net's identifier: the file name without the channel suffix and the file ending
    expected = {
        re.sub(r"_\d{4}$", "", f.name.removesuffix(".nii.gz"))
        for f in (msd_root / "imagesTr").iterdir()
    }
    assert len(expected) == 6
    _check_folds(folds, {i: i for i in expected})

    datalist = json.loads(export_splits(scan, manifest, "monai", tmp_path / "d.json").read_text())
    assert datalist["labels"] == {"0": "background", "1": "anterior", "2": "posterior"}
    assert {e["fold"] for e in datalist["training"]} == set(range(K))
    for e in datalist["training"]:
        assert len(e["image"]) == 2, "one path per channel file"
        assert all((msd_root / p).is_file() for p in [*e["image"], e["label"]])
        assert not Path(e["label"]).is_absolute()
    assert datalist["testing"] == [
        {"image": ["imagesTs/phantom_900_0000.nii.gz", "imagesTs/phantom_900_0001.nii.gz"]}
    ]


def test_leaking_manifest_and_existing_file_are_refused(tiny_synth, tmp_path):
    scan = scan_dataset(tiny_synth / "segmentation", "lgg")
    manifest = grouped_kfold(scan, K, seed=0)
    out = export_splits(scan, manifest, "nnunet", tmp_path / "s.json")
    with pytest.raises(RunExistsError, match="s.json"):
        export_splits(scan, manifest, "nnunet", out)
    export_splits(scan, manifest, "nnunet", out, overwrite=True)

    broken = json.loads(json.dumps(manifest))
    moved = broken["folds"][0]["val"].pop()  # one slice of a patient into another fold
    broken["folds"][1]["val"].append(moved)
    with pytest.raises(DataError, match="leaks"):
        export_cases(scan, broken)


@pytest.mark.slow
def test_cli_split_prints_counts_without_ids(tiny_synth, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_split_verb(parser.add_subparsers(dest="data_verb"))
    root = tiny_synth / "segmentation"
    out = tmp_path / "splits_final.json"
    argv = ["split", str(root), "--folds", "3", "--export", "nnunet", "--out", str(out)]
    assert cmd_split(parser.parse_args(argv)) == 0
    printed = capsys.readouterr().out
    assert re.findall(r"^fold (\d): 2 groups, \d+ cases$", printed, re.M) == ["0", "1", "2"]
    patients = {p.name for p in root.iterdir() if p.is_dir()}
    assert not any(p in printed for p in patients)
    assert len(json.loads(out.read_text())) == 3
    with pytest.raises(RunExistsError):
        cmd_split(parser.parse_args(argv))
