"""Surface metrics: analytic spheres with anisotropic spacing, a brute-force all-pairs reference on
random masks, the empty-mask rules, 2D, label maps and speed."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from medseg.errors import ConfigError, DataError
from medseg.evaluation.surface import (
    assd,
    boundary,
    dice,
    hd95,
    mask_metrics,
    nsd,
    structure_metrics,
    surface_distances,
)


def spheres(spacing, radii, half=16.0):
    """Concentric balls of ``radii`` (mm) centred on a grid of ``spacing`` spanning +-half mm."""
    axes = [np.arange(-half, half + s / 2, s) for s in spacing]
    grid = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(sum(g**2 for g in grid))
    return [r <= radius for radius in radii]


def brute_boundary(mask):
    """Foreground voxels with a background voxel among their 3^n - 1 neighbours (outside the
    array is background), by shifting a zero-padded copy: independent of binary_erosion."""
    padded = np.pad(mask, 1)
    interior = np.ones(mask.shape, bool)
    for offset in itertools.product((-1, 0, 1), repeat=mask.ndim):
        window = tuple(slice(1 + o, 1 + o + n) for o, n in zip(offset, mask.shape, strict=True))
        interior &= padded[window]
    return mask & ~interior


def brute_metrics(pred, truth, spacing, tolerance):
    """HD95, ASSD and NSD from all-pairs distances between boundary voxel centres in mm."""
    pts_p = np.argwhere(brute_boundary(pred)) * np.asarray(spacing)
    pts_t = np.argwhere(brute_boundary(truth)) * np.asarray(spacing)
    pairs = cdist(pts_p, pts_t)
    to_t, to_p = pairs.min(axis=1), pairs.min(axis=0)
    both = np.concatenate([to_t, to_p])
    return {
        "hd95": max(np.percentile(to_t, 95), np.percentile(to_p, 95)),
        "assd": both.mean(),
        # Distances equal to the tolerance count as within it (cdist and the distance transform
        # may round a tie such as hypot(0.9, 1.2) = 1.5 differently).
        "nsd": np.mean(both <= tolerance + 1e-9),
        "dice": 2 * (pred & truth).sum() / (pred.sum() + truth.sum()),
    }


def random_mask(rng, shape, box):
    """A blobby random mask (smoothed noise, so it has an interior) inside ``box`` (slices) of a
    ``shape`` array."""
    mask = np.zeros(shape, bool)
    noise = ndimage.gaussian_filter(rng.random(tuple(s.stop - s.start for s in box)), 1.5)
    mask[box] = noise > np.median(noise)
    return mask


@pytest.mark.parametrize("spacing", [(2.0, 1.0, 0.5), (0.5, 0.5, 0.5)])
def test_concentric_spheres_are_3mm_apart(spacing):
    inner, outer = spheres(spacing, (10.0, 13.0))
    m = mask_metrics(inner, outer, spacing, tolerance_mm=1.0)
    voxel = max(spacing)
    assert abs(m["hd95"] - 3.0) <= voxel
    assert abs(m["assd"] - 3.0) <= voxel
    assert m["nsd"] == 0.0  # every boundary voxel is ~3 mm from the other surface
    assert nsd(inner, outer, spacing, tolerance_mm=3.0 + 2 * voxel) == 1.0
    assert m["dice"] == pytest.approx(2 * 10**3 / (10**3 + 13**3), abs=0.03)
    assert m["empty"] == ""


def test_spacing_is_applied_per_axis():
    spacing = (2.0, 1.0, 0.5)
    inner, outer = spheres(spacing, (10.0, 13.0))
    # The same arrays read with the axes' spacings swapped are no longer concentric spheres.
    swapped = hd95(inner, outer, spacing[::-1])
    assert abs(swapped - 3.0) > 1.0
    # No spacing: unit voxels, the same as a spacing of 1 on each axis.
    in_voxels = hd95(inner, outer, None)
    assert in_voxels == hd95(inner, outer, (1.0, 1.0, 1.0))
    assert abs(in_voxels - 3.0) > 1.0


def test_identical_masks():
    (ball,) = spheres((1.0, 1.0, 1.0), (6.0,), half=8.0)
    assert hd95(ball, ball, (1, 1, 1)) == 0.0
    assert assd(ball, ball, (1, 1, 1)) == 0.0
    assert nsd(ball, ball, (1, 1, 1), tolerance_mm=0.0) == 1.0
    assert dice(ball, ball) == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_random_masks_match_an_all_pairs_reference(seed):
    rng = np.random.default_rng(seed)
    shape, spacing = (22, 20, 18), (1.7, 0.9, 0.6)
    # Masks in parts of the array (one touching its edge) so that the crop matters.
    pred = random_mask(rng, shape, (slice(2, 14), slice(0, 12), slice(5, 17)))
    truth = random_mask(rng, shape, (slice(6, 19), slice(5, 17), slice(1, 13)))
    ref = brute_metrics(pred, truth, spacing, tolerance=1.5)
    got = mask_metrics(pred, truth, spacing, tolerance_mm=1.5)
    for key in ("hd95", "assd", "nsd", "dice"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    np.testing.assert_array_equal(boundary(pred), brute_boundary(pred))


def test_directed_distances_in_c_order():
    pred = np.zeros((5, 6), bool)
    truth = np.zeros((5, 6), bool)
    pred[2, 1] = True
    truth[2, 4] = True
    to_t, to_p = surface_distances(pred, truth, (2.0, 0.5))
    np.testing.assert_allclose(to_t, [1.5])
    np.testing.assert_allclose(to_p, [1.5])


def test_2d_matches_the_reference():
    rng = np.random.default_rng(7)
    shape, spacing = (20, 24), (0.8, 1.3)
    pred = random_mask(rng, shape, (slice(0, 12), slice(4, 20)))
    truth = random_mask(rng, shape, (slice(5, 18), slice(2, 14)))
    ref = brute_metrics(pred, truth, spacing, tolerance=1.0)
    got = mask_metrics(pred, truth, spacing)
    for key in ("hd95", "assd", "nsd", "dice"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key


def test_2d_circles_in_pixels():
    yy, xx = np.mgrid[-20:21, -20:21]
    r = np.hypot(yy, xx)
    m = mask_metrics(r <= 8, r <= 12, None, tolerance_mm=1.0)
    assert abs(m["hd95"] - 4.0) <= 1.0
    assert abs(m["assd"] - 4.0) <= 1.0


def test_empty_mask_rules():
    full = np.zeros((6, 6, 6), bool)
    full[2:4, 2:4, 2:4] = True
    empty = np.zeros_like(full)
    both = mask_metrics(empty, empty, (1, 1, 1))
    assert both == {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0, "empty": "both"}
    for pred, truth, which in ((empty, full, "pred"), (full, empty, "truth")):
        m = mask_metrics(pred, truth, (1, 1, 1))
        assert m["empty"] == which
        assert m["dice"] == 0.0 and m["nsd"] == 0.0
        assert np.isnan(m["hd95"]) and np.isnan(m["assd"])
    to_t, to_p = surface_distances(full, empty)
    assert np.isinf(to_t).all() and len(to_t) == 8 and len(to_p) == 0


def test_structure_metrics_per_label_and_volumes():
    spacing = (2.0, 1.0, 0.5)
    truth = np.zeros((8, 10, 12), np.uint8)
    truth[1:4, 2:6, 2:8] = 1  # 3*4*6 = 72 voxels of 1 mm^3
    truth[5:7, 2:6, 2:8] = 2
    pred = truth.copy()
    pred[pred == 2] = 0  # structure 2 missed
    pred[0, 0, 0] = 1  # one voxel more of structure 1
    out = structure_metrics(pred, truth, spacing, {0: "background", 1: "A", 2: "B", 3: "C"})
    assert list(out) == ["A", "B", "C"]
    a, b, c = out["A"], out["B"], out["C"]
    assert a["unit"] == "mm" and a["empty"] == ""
    assert a["volume_truth_ml"] == pytest.approx(0.072)
    assert a["volume_pred_ml"] == pytest.approx(0.073)
    assert a["volume_diff_ml"] == pytest.approx(0.001)
    assert b["empty"] == "pred" and np.isnan(b["hd95"]) and b["dice"] == 0.0
    assert b["volume_diff_ml"] == pytest.approx(-0.048)
    assert c["empty"] == "both" and c["dice"] == 1.0 and c["hd95"] == 0.0
    px = structure_metrics(pred, truth, None, {1: "A"})["A"]
    assert px["unit"] == "px" and px["volume_pred_ml"] is None and px["voxels_pred"] == 73


def test_bad_inputs_name_the_problem():
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(DataError, match="shape"):
        hd95(a, np.zeros((4, 4, 5), bool), (1, 1, 1))
    with pytest.raises(DataError, match="spacing"):
        hd95(a, a, (1, 1))
    with pytest.raises(ConfigError, match="tolerance_mm"):
        nsd(a, a, (1, 1, 1), tolerance_mm=-1)


def test_128_cube_is_fast():
    (inner, outer) = spheres((1.0, 1.0, 1.0), (40.0, 43.0), half=63.5)
    assert inner.shape == (128, 128, 128)
    start = time.perf_counter()
    m = mask_metrics(inner, outer, (1.0, 1.0, 1.0))
    elapsed = time.perf_counter() - start
    assert abs(m["hd95"] - 3.0) <= 1.0
    assert elapsed < 5.0, f"{elapsed:.2f} s"
