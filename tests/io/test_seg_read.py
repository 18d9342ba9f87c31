"""Reading label maps back: a DICOM SEG round trip (medseg's writer -> read_seg_labels) with
anisotropic spacing, SEGs that leave out empty end slices, and the one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.data.synthetic3d import lps_affine, write_dicom_series, write_nifti_volume
from medseg.errors import DataError
from medseg.io import read_dicom_series
from medseg.io.seg import place_on_grid, read_label_map, read_seg_labels, union_grid
from medseg.io.writers import write_seg

SHAPE = (6, 16, 12)  # slice, row, col
SPACING = (2.5, 0.8, 1.2)  # mm, anisotropic


def _three_structures() -> np.ndarray:
    """Labels 1..3 in separate blocks; label 1 on the first and 3 on the last slice."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[0:3, 2:6, 2:5] = 1
    labels[2:5, 8:13, 3:9] = 2
    labels[4:6, 3:6, 8:11] = 3
    return labels


def _series(tmp_path: Path) -> tuple[list[str], np.ndarray]:
    """A DICOM series on the grid of SHAPE/SPACING; its files in slice order and its affine."""
    image = np.random.default_rng(0).normal(100, 10, SHAPE)
    write_dicom_series(tmp_path / "series", image, SPACING, lps_affine(SHAPE, SPACING, (5, 0, 0)))
    (series,) = read_dicom_series(tmp_path / "series")
    return list(series.meta.source), np.asarray(series.meta.affine)


def test_seg_round_trip_gives_the_labels_spacing_and_affine(tmp_path):
    files, affine = _series(tmp_path)
    labels = _three_structures()
    names = {1: "a", 2: "b", 3: "c"}
    path = write_seg(tmp_path / "seg.dcm", labels, files, segment_names=names)

    got, meta = read_seg_labels(path)
    np.testing.assert_array_equal(got, labels)
    np.testing.assert_allclose(meta.spacing, SPACING, atol=1e-6)
    np.testing.assert_allclose(meta.affine, affine, atol=1e-4)
    assert meta.extra["segments"] == names
    same, same_meta = read_label_map(path)  # the any-kind reader takes the SEG path
    np.testing.assert_array_equal(same, labels)
    assert same_meta.spacing == meta.spacing


def test_seg_without_empty_end_slices_is_placed_back_on_the_series_grid(tmp_path):
    files, affine = _series(tmp_path)
    labels = _three_structures()
    labels[[0, 1, 5]] = 0  # the SEG stores slices 2..4 only (empty frames left out)
    path = write_seg(tmp_path / "seg.dcm", labels, files, segment_names={1: "a", 2: "b", 3: "c"})

    got, meta = read_seg_labels(path)
    assert got.shape == (3, *SHAPE[1:])
    shape, grid = union_grid(got.shape, meta.affine, SHAPE, affine)
    assert shape == SHAPE
    np.testing.assert_allclose(grid, affine, atol=1e-4)
    np.testing.assert_array_equal(place_on_grid(got, meta.affine, shape, grid), labels)
    shifted = affine.copy()
    shifted[:3, 3] += 0.5 * affine[:3, 1]  # half a row away: not on the same lattice
    assert union_grid(got.shape, meta.affine, SHAPE, shifted) is None


def test_nifti_and_png_label_maps(tmp_path):
    from PIL import Image

    labels = _three_structures()
    path = write_nifti_volume(tmp_path / "case.nii.gz", labels, lps_affine(SHAPE, SPACING))
    got, meta = read_label_map(path)
    np.testing.assert_array_equal(got, labels)
    np.testing.assert_allclose(meta.spacing, SPACING, atol=1e-6)
    Image.fromarray(labels[3]).save(tmp_path / "slice.png")
    got, meta = read_label_map(tmp_path / "slice.png")
    np.testing.assert_array_equal(got, labels[3])
    assert meta.spacing is None and meta.affine is None


def test_refusals_name_the_file_in_one_line(tmp_path):
    files, _ = _series(tmp_path)
    with pytest.raises(DataError) as e:
        read_label_map(files[0])
    assert str(e.value) == f"{files[0]}: a DICOM file that is not a DICOM SEG holds no label map"
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not a dicom file at all")
    with pytest.raises(DataError, match=r"bad\.dcm: a DICOM file that is not a DICOM SEG") as e:
        read_label_map(bad)
    with pytest.raises(DataError) as e:
        read_seg_labels(bad)
    assert str(e.value).startswith(f"{bad}: not a readable DICOM SEG (")
    assert "\n" not in str(e.value)
    fractions = tmp_path / "fractions.nii.gz"
    write_nifti_volume(fractions, np.full(SHAPE, 0.5, np.float32), lps_affine(SHAPE, SPACING))
    with pytest.raises(DataError) as e:
        read_label_map(fractions)
    assert str(e.value) == f"{fractions}: label values are not non-negative integers"
