"""Resampling to a target spacing and back, and volume normalisation, on synthetic ellipsoids."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from medseg.data.resample import (
    normalize_volume,
    prepare_case,
    resample_image,
    resample_labels,
    resize_image,
    resize_labels,
    target_shape,
)
from medseg.errors import ConfigError, DataError

#: Largest relative change of a structure's volume (mm^3, structures of 2-3 mL on 2 x 1 x 1.5 mm
#: voxels) that resampling to 1 mm may cause: nearest keeps it within 0.4% here; linear
#: interpolation of the one-hot maps rounds convex edges off (-2% and -3.4% here).
VOLUME_TOLERANCE = {"nearest": 0.03, "linear": 0.05}


@dataclass
class _Plan:
    """Stand-in for ``medseg.data.fingerprint.VolumePlan`` (the fields resample.py reads)."""

    target_spacing: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    patch_size: list[int] = field(default_factory=lambda: [16, 16, 16])
    normalization: str = "zscore"
    intensity_clip: list[float] = field(default_factory=list)
    channel_mean: list[float] = field(default_factory=list)
    channel_std: list[float] = field(default_factory=list)
    labels: dict[int, str] = field(
        default_factory=lambda: {0: "background", 1: "Anterior", 2: "Posterior"}
    )
    channels: dict[int, str] = field(default_factory=lambda: {0: "MRI"})
    modality: str = "MR"


def make_plan(**kwargs) -> object:
    """The real ``VolumePlan`` when it exists, else the stand-in, with ``kwargs`` set."""
    values = {**_Plan().__dict__, **kwargs}
    try:
        from medseg.data.fingerprint import VolumePlan
    except ImportError:
        return _Plan(**values)
    return VolumePlan(**values)


def ellipsoids(shape=(24, 32, 32), spacing=(2.0, 1.0, 1.5)) -> np.ndarray:
    """Two structures (labels 1 and 2) shaped as ellipsoids of about 12 and 9 mm radius, placed
    off-centre, in a volume of ``shape`` voxels at ``spacing`` mm."""
    centres = np.indices(shape, dtype=np.float64).transpose(1, 2, 3, 0) + 0.5
    mm = centres * np.asarray(spacing)
    labels = np.zeros(shape, dtype=np.uint8)
    for value, centre, radii in ((1, (18, 12, 14), (10, 8, 9)), (2, (28, 20, 30), (9, 7, 8))):
        inside = (((mm - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) < 1
        labels[inside] = value
    return labels


def volume_mm3(labels: np.ndarray, spacing, value: int) -> float:
    return float((labels == value).sum() * np.prod(spacing))


def centroid_mm(labels: np.ndarray, spacing, value: int) -> np.ndarray:
    """Centroid of a structure in mm from the volume's corner (voxel centres at i + 0.5)."""
    return (np.argwhere(labels == value).mean(axis=0) + 0.5) * np.asarray(spacing)


def test_target_shape_keeps_the_field_of_view():
    assert target_shape((20, 30, 24), (2, 1, 1.5), (1, 1, 1)) == (40, 30, 36)
    assert target_shape((20, 30, 24, 3), (1, 1, 1), (1, 1, 1)) == (20, 30, 24)
    assert target_shape((3, 5, 7), (1, 1, 1), (2.5, 3, 4)) == (1, 2, 2)
    assert target_shape((1, 1, 1), (1, 1, 1), (4, 4, 4)) == (1, 1, 1)
    with pytest.raises(DataError, match="target_spacing"):
        target_shape((4, 4, 4), (1, 1, 1), (1, 0, 1))
    with pytest.raises(DataError, match="spacing"):
        target_shape((4, 4, 4), (1, 1), (1, 1, 1))


def test_round_trip_at_the_same_spacing_is_the_identity():
    labels = ellipsoids()
    rng = np.random.default_rng(0)
    image = np.stack([labels * 100.0 + rng.normal(0, 5, labels.shape), -labels * 3.0], -1)
    spacing = (2.0, 1.0, 1.5)
    for mode in ("nearest", "linear"):
        same = resample_labels(labels, spacing, spacing, mode, num_classes=3)
        np.testing.assert_array_equal(same, labels)
        assert same.dtype == labels.dtype and same is not labels
        np.testing.assert_array_equal(resize_labels(labels, labels.shape, mode), labels)
    back = resample_image(image, spacing, spacing)
    np.testing.assert_array_equal(back, image.astype(np.float32))
    assert back.dtype == np.float32
    np.testing.assert_array_equal(resize_image(image, image.shape[:3], order=1), back)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_volume_is_kept_at_another_spacing_and_back(mode):
    source, target = (2.0, 1.0, 1.5), (1.0, 1.0, 1.0)
    labels = ellipsoids(spacing=source)
    fine = resample_labels(labels, source, target, mode, num_classes=3)
    assert fine.shape == (48, 32, 48) and fine.dtype == np.uint8
    back = resize_labels(fine, labels.shape, mode, num_classes=3)
    assert back.shape == labels.shape
    assert set(np.unique(fine)) == set(np.unique(back)) == {0, 1, 2}
    for value in (1, 2):
        ref = volume_mm3(labels, source, value)
        assert abs(volume_mm3(fine, target, value) / ref - 1) < VOLUME_TOLERANCE[mode]
        assert abs(volume_mm3(back, source, value) / ref - 1) < VOLUME_TOLERANCE[mode]
        # voxel centres are aligned, so the structure does not move: by less than a tenth of a
        # source voxel (linear), or half a target voxel (nearest: an output voxel centred
        # between two input voxels takes one of them)
        shift = centroid_mm(fine, target, value) - centroid_mm(labels, source, value)
        bound = 0.1 * np.asarray(source) if mode == "linear" else 0.5 * np.asarray(target)
        assert np.all(np.abs(shift) < bound), shift
    assert (back == labels).mean() > 0.97


def test_resample_image_per_channel_with_edges_kept():
    labels = ellipsoids()
    image = np.stack([labels.astype(np.float32) * 10, np.full(labels.shape, 7.0)], -1)
    out = resample_image(image, (2.0, 1.0, 1.5), (1.0, 2.0, 1.0), order=3)
    assert out.shape == (48, 16, 48, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 1], 7.0, atol=1e-5)
    linear = resample_image(image, (2.0, 1.0, 1.5), (1.0, 2.0, 1.0), order=1)
    assert linear[..., 0].min() >= 0 and linear[..., 0].max() <= 20 + 1e-4
    with pytest.raises(DataError, match="D x H x W x C"):
        resample_image(labels, (1, 1, 1), (2, 2, 2))


def test_resize_labels_rejects_an_unknown_mode():
    with pytest.raises(ConfigError, match="label_resampling"):
        resize_labels(ellipsoids(), (8, 8, 8), mode="cubic")


def test_normalize_volume_zscore_per_channel():
    rng = np.random.default_rng(1)
    image = np.stack(
        [rng.normal(50, 10, (8, 9, 10)), np.full((8, 9, 10), 3.0), rng.normal(-2, 0.5, (8, 9, 10))],
        -1,
    ).astype(np.float64)
    out = normalize_volume(image, make_plan(normalization="zscore"))
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(out[..., [0, 2]].reshape(-1, 2).std(0), 1, atol=1e-4)
    np.testing.assert_array_equal(out[..., 1], 0)  # a constant channel: no division by zero
    assert image[0, 0, 0, 1] == 3.0  # the input is left alone


def test_normalize_volume_ct_and_none():
    image = np.array([-2000.0, -100.0, 0.0, 40.0, 3000.0]).reshape(1, 1, 5, 1)
    plan = make_plan(
        normalization="ct", intensity_clip=[-200.0, 300.0], channel_mean=[50.0], channel_std=[100.0]
    )
    out = normalize_volume(image, plan)
    np.testing.assert_allclose(out.ravel(), [-2.5, -1.5, -0.5, -0.1, 2.5], rtol=1e-6)
    same = normalize_volume(image, make_plan(normalization="none"))
    np.testing.assert_array_equal(same, image.astype(np.float32))
    assert same.dtype == np.float32
    with pytest.raises(ConfigError, match="normalization"):
        normalize_volume(image, make_plan(normalization="minmax"))
    with pytest.raises(ConfigError, match="intensity_clip"):
        normalize_volume(image, make_plan(normalization="ct", channel_mean=[0], channel_std=[1]))
    with pytest.raises(ConfigError, match="channel_mean"):
        normalize_volume(
            np.zeros((2, 2, 2, 2)),
            make_plan(
                normalization="ct", intensity_clip=[0, 1], channel_mean=[0, 1, 2], channel_std=[1]
            ),
        )


def test_prepare_case_normalises_then_resamples():
    spacing = (2.0, 1.0, 1.5)
    labels = ellipsoids(spacing=spacing)
    rng = np.random.default_rng(2)
    image = (labels * 200.0 + rng.normal(100, 20, labels.shape))[..., None]
    plan = make_plan(target_spacing=[1.0, 1.5, 1.5], normalization="zscore")
    out, out_labels = prepare_case(image, spacing, labels, plan, order=1, label_mode="linear")
    assert out.shape == (48, 21, 32, 1) and out.dtype == np.float32
    assert out_labels is not None and out_labels.shape == (48, 21, 32)
    expected = resample_image(normalize_volume(image, plan), spacing, plan.target_spacing, 1)
    np.testing.assert_allclose(out, expected)
    np.testing.assert_array_equal(
        out_labels, resample_labels(labels, spacing, plan.target_spacing, "linear", 3)
    )
    only, none = prepare_case(image, spacing, None, plan)
    assert none is None and only.shape == (48, 21, 32, 1)
    with pytest.raises(DataError, match="label map shape"):
        prepare_case(image, spacing, labels[:-1], plan)


def test_standard_orientation_turns_a_sagittal_volume_like_an_axial_nifti(tmp_path):
    from medseg.data.resample import from_standard, standard_orientation, to_standard
    from medseg.data.synthetic3d import lps_affine, write_nifti_volume
    from medseg.io import read_image

    rng = np.random.default_rng(0)
    image = rng.random((6, 7, 8)).astype(np.float32)
    affine = lps_affine(image.shape, (2.0, 1.0, 1.5))
    axial = read_image(write_nifti_volume(tmp_path / "a.nii.gz", image, affine))
    # what the NIfTI reader returns is already standard
    assert standard_orientation(axial.meta.affine) == ((0, 1, 2), (False, False, False))
    # the same voxels stored with the axes swapped and one reversed (as a sagittal series)
    stored = image.transpose(2, 1, 0)[:, ::-1]
    index_to_axial = np.zeros((4, 4))
    index_to_axial[2, 0] = 1.0  # stored axis 0 is axial col
    index_to_axial[1, 1], index_to_axial[1, 3] = -1.0, image.shape[1] - 1  # reversed row
    index_to_axial[0, 2] = 1.0  # stored axis 2 is axial slice
    index_to_axial[3, 3] = 1.0
    axes, flips = standard_orientation(affine @ index_to_axial)
    assert axes == (2, 1, 0) and flips == (False, True, False)
    np.testing.assert_array_equal(to_standard(stored, axes, flips), image)
    np.testing.assert_array_equal(from_standard(image, axes, flips), stored)
    with_channels = stored[..., None]
    np.testing.assert_array_equal(to_standard(with_channels, axes, flips)[..., 0], image)
