"""3D augmentation of training patches: one spatial transform for the image and its label map,
then intensity transforms on the image.

Where each transform comes from:

* flips (``augment.dflip`` / ``vflip`` / ``hflip``: slice, row, col axes): numpy
  (albumentations 2.0.8 has no single-axis 3D flip; its ``CubicSymmetry`` also rotates by
  90 degrees, which anatomy with a left-right axis does not want);
* rotation (``augment.affine``, up to ``rotate_limit`` degrees about each axis) and isotropic
  scaling (``scale_limit``): a matrix from :class:`scipy.spatial.transform.Rotation`;
* elastic deformation (``augment.elastic``): a smooth random displacement field of a few voxels,
  random control-point displacements every :data:`ELASTIC_GRID` voxels spline-interpolated with
  :func:`scipy.ndimage.zoom` (as TorchIO's ``RandomElasticDeformation``);
* flips, rotation, scaling and the displacement are composed into ONE coordinate map, applied
  with :func:`scipy.ndimage.map_coordinates` once to the image (spline ``order``) and once to
  the labels (order 0); a patch that no rotation, scaling or deformation touches is only flipped
  and cropped (exact, no interpolation);
* the central crop of a patch sampled larger than the output (so that rotated corners come from
  the volume, not from padding, as nnU-Net does): ``albumentations.CenterCrop3D``;
* gamma (``augment.gamma``: on intensities rescaled to [0, 1] and back, per channel) and
  Gaussian noise (``augment.noise``): numpy, as nnU-Net's ranges (gamma 0.7-1.5, noise variance
  up to 0.1 of the z-scored intensities).

``augment.enabled: false`` turns all of them off. Every random draw comes from the
``numpy.random.Generator`` the caller passes, so a patch is reproducible from its seed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import albumentations as A
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

#: Spacing (voxels) of the elastic deformation's control points.
ELASTIC_GRID = 8
#: Largest displacement (voxels) of an elastic control point.
ELASTIC_MAGNITUDE = 3.0
#: Range of the gamma exponent.
GAMMA_RANGE = (0.7, 1.5)
#: Largest variance of the Gaussian noise (z-scored intensities).
NOISE_VARIANCE = 0.1


def _spatial_enabled(cfg: Any) -> bool:
    return bool(cfg.enabled) and (cfg.affine > 0 or cfg.elastic > 0)


def sampling_shape(patch_size: Sequence[int], cfg: Any) -> tuple[int, int, int]:
    """The patch to sample so that, after the largest rotation and the smallest scale of ``cfg``
    (and the elastic displacement), the central ``patch_size`` crop still lies inside it.

    Args:
        patch_size: (D, H, W) of the training patch.
        cfg: the ``augment`` section (an ``AugmentConfig``).

    Returns:
        (D, H, W), at least ``patch_size`` (equal when no rotation, scaling or elastic
        deformation is configured).
    """
    size = np.asarray(patch_size[:3], dtype=np.float64)
    if not _spatial_enabled(cfg):
        return tuple(int(s) for s in size)  # type: ignore[return-value]
    extent = size.copy()
    if cfg.affine > 0:
        limit = float(cfg.rotate_limit)
        half = size / 2
        corners = np.array(list(itertools.product(*[(-h, h) for h in half])))
        for angles in itertools.product((-limit, 0.0, limit), repeat=3):
            rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
            reach = np.abs(corners @ rot.T).max(axis=0) * 2
            extent = np.maximum(extent, reach)
        extent /= max(1 - float(cfg.scale_limit), 0.5)
    if cfg.elastic > 0:
        extent += 2 * ELASTIC_MAGNITUDE
    extent = np.minimum(np.ceil(extent), 2 * size)
    return tuple(int(s) for s in extent)  # type: ignore[return-value]


def _elastic_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A (3, D, H, W) smooth displacement field (voxels), at most :data:`ELASTIC_MAGNITUDE`."""
    grid = tuple(max(2, int(np.ceil(s / ELASTIC_GRID)) + 1) for s in shape)
    magnitude = rng.uniform(0.0, ELASTIC_MAGNITUDE)
    out = np.empty((3, *shape), dtype=np.float32)
    for axis in range(3):
        control = rng.uniform(-magnitude, magnitude, size=grid).astype(np.float32)
        factors = [s / g for s, g in zip(shape, grid, strict=True)]
        ndimage.zoom(control, factors, output=out[axis], order=3, mode="nearest", grid_mode=True)
    return out


def _draw_matrix(cfg: Any, rng: np.random.Generator, flips: np.ndarray) -> np.ndarray | None:
    """The 3x3 output -> input matrix (rotation, scale, flips), or None for flips only."""
    if not (cfg.affine > 0 and rng.random() < cfg.affine):
        return None
    angles = rng.uniform(-cfg.rotate_limit, cfg.rotate_limit, size=3)
    scale = rng.uniform(1 - cfg.scale_limit, 1 + cfg.scale_limit)
    rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    return (rot / scale) @ np.diag(flips)


@lru_cache(maxsize=32)
def _center_crop(size: tuple[int, int, int]) -> A.Compose:
    return A.Compose([A.CenterCrop3D(size=size, p=1.0)])


def _flip_and_crop(
    image: np.ndarray, labels: np.ndarray, flips: np.ndarray, out_shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    axes = tuple(int(a) for a in np.flatnonzero(flips < 0))
    if axes:
        image, labels = np.flip(image, axes), np.flip(labels, axes)
    if tuple(image.shape[:3]) != out_shape:
        out = _center_crop(out_shape)(volume=image, mask3d=labels)
        image, labels = out["volume"], out["mask3d"]
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def _warp(
    image: np.ndarray,
    labels: np.ndarray,
    coords: np.ndarray,
    order: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Image (spline ``order``) and labels (order 0) sampled at ``coords`` (3, D, H, W)."""
    channels = [
        ndimage.map_coordinates(
            image[..., c], coords, order=order, mode="constant", cval=0.0, output=np.float32
        )
        for c in range(image.shape[-1])
    ]
    warped = ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
    return np.stack(channels, axis=-1), warped.astype(labels.dtype, copy=False)


def _spatial(
    image: np.ndarray,
    labels: np.ndarray,
    cfg: Any,
    rng: np.random.Generator,
    out_shape: tuple[int, int, int],
    order: int,
) -> tuple[np.ndarray, np.ndarray]:
    flip_p = (cfg.dflip, cfg.vflip, cfg.hflip)
    flips = np.array([-1.0 if p > 0 and rng.random() < p else 1.0 for p in flip_p])
    matrix = _draw_matrix(cfg, rng, flips)
    elastic = cfg.elastic > 0 and rng.random() < cfg.elastic
    if matrix is None and not elastic:
        return _flip_and_crop(image, labels, flips, out_shape)
    matrix = np.diag(flips) if matrix is None else matrix
    out_centre = (np.asarray(out_shape, dtype=np.float64) - 1) / 2
    in_centre = (np.asarray(image.shape[:3], dtype=np.float64) - 1) / 2
    grid = np.indices(out_shape, dtype=np.float32).reshape(3, -1)
    coords = matrix @ (grid - out_centre[:, None]) + in_centre[:, None]
    coords = coords.reshape(3, *out_shape).astype(np.float32)
    if elastic:
        coords += _elastic_field(rng, out_shape)
    return _warp(image, labels, coords, order)


def _gamma(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(*GAMMA_RANGE)
    for c in range(image.shape[-1]):
        channel = image[..., c]
        low, high = float(channel.min()), float(channel.max())
        span = max(high - low, 1e-8)
        image[..., c] = np.power((channel - low) / span, gamma) * span + low
    return image


def flip_axes(augment_cfg: Any) -> list[int]:
    """The spatial axes (0 slice, 1 row, 2 col) that training flips: those whose flip
    probability (``dflip``, ``vflip``, ``hflip``) is above 0, none when augmentation is off.
    Mirror test-time augmentation flips these axes only (as nnU-Net's mirror axes)."""
    if not augment_cfg.enabled:
        return []
    probabilities = (augment_cfg.dflip, augment_cfg.vflip, augment_cfg.hflip)
    return [axis for axis, p in enumerate(probabilities) if p > 0]


def augment_patch(
    image: np.ndarray,
    labels: np.ndarray,
    augment_cfg: Any,
    rng: np.random.Generator,
    out_shape: Sequence[int] | None = None,
    order: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """One random augmentation of a training patch (see the module docstring).

    Args:
        image: D x H x W x C float32 patch (normalised intensities).
        labels: D x H x W integer label map of the same patch.
        augment_cfg: the ``augment`` section (an ``AugmentConfig``: ``enabled``, ``hflip``,
            ``vflip``, ``dflip``, ``affine``, ``rotate_limit``, ``scale_limit``, ``elastic``,
            ``gamma``, ``noise``).
        rng: the source of every random draw.
        out_shape: (D, H, W) of the result, the centre of the input (None: the input's shape);
            sample the input at :func:`sampling_shape` so that rotated corners hold data.
        order: spline order of the image's interpolation (1 or 3); labels use order 0.

    Returns:
        (float32 image, label map in ``labels``' dtype) of ``out_shape``; the label values stay
        those of the input (and 0 where the transform reaches outside the patch).
    """
    shape = tuple(int(s) for s in (out_shape or image.shape)[:3])
    image = np.asarray(image, dtype=np.float32)
    if not augment_cfg.enabled:
        return _flip_and_crop(image, labels, np.ones(3), shape)  # type: ignore[arg-type]
    image, labels = _spatial(image, labels, augment_cfg, rng, shape, order)  # type: ignore[arg-type]
    if augment_cfg.gamma > 0 and rng.random() < augment_cfg.gamma:
        image = _gamma(image.copy(), rng)
    if augment_cfg.noise > 0 and rng.random() < augment_cfg.noise:
        std = np.sqrt(rng.uniform(0.0, NOISE_VARIANCE))
        image = image + rng.normal(0.0, std, size=image.shape).astype(np.float32)
    return image.astype(np.float32, copy=False), labels
