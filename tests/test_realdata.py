"""Scanners on the real datasets in ../shared/data (skipped when the folder is absent)."""

from __future__ import annotations

import pytest

from medseg.data.scan import scan_dataset
from medseg.data.split import make_split
from medseg.io import read_image, read_mask

pytestmark = pytest.mark.realdata


def test_lgg_layout_groups_by_patient(shared_data):
    root = shared_data / "lgg-mri-segmentation" / "kaggle_3m"
    scan = scan_dataset(root, "lgg")
    patients = {s.group for s in scan.samples}
    assert len(patients) == 46 and all(p.startswith("TCGA_") for p in patients)
    assert len(scan.samples) == 3428 // 2 and not scan.problems
    sample = scan.samples[0]
    image = read_image(sample.image)
    assert image.array.shape == (256, 256, 3)
    assert set(read_mask(sample.target).ravel().tolist()) <= {0, 1}
    manifest = make_split(scan.samples, 0.2, 0.0, seed=0)
    by_id = {s.id: s.group for s in scan.samples}
    train = {by_id[i] for i in manifest["splits"]["train"]}
    val = {by_id[i] for i in manifest["splits"]["val"]}
    assert train and val and not (train & val)


def test_brain_tumour_class_folders(shared_data):
    scan = scan_dataset(shared_data / "brain-tumor-mri", "class_folders")
    assert scan.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    counts = [sum(s.target == i for s in scan.samples) for i in range(4)]
    assert counts == [1321, 1339, 1591, 1457]
    assert {s.split for s in scan.samples} == {"Training"}


@pytest.mark.slow
def test_every_brain_tumour_image_reads(shared_data):
    from medseg.io import to_channels

    scan = scan_dataset(shared_data / "brain-tumor-mri", "class_folders", group_by="none")
    channels = {1: 0, 3: 0}
    for s in scan.samples:
        image = read_image(s.image)
        assert image.array.ndim == 3 and image.array.dtype.name == "float32", s.image
        channels[image.array.shape[-1]] += 1
        assert to_channels(image.array, 3).shape[-1] == 3
    assert sum(channels.values()) == 5708
    assert channels[1] > 0 and channels[3] > 0  # the folders mix grey and RGB JPEGs
