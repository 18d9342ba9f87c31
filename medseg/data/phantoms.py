"""Brain-MRI-like phantoms in memory: a 3D head with one tumour, or one slice with a lesion.

* :func:`phantom_volume`: one segmentation patient (3D head, T1/FLAIR/T1 post-contrast channels,
  one tumour spanning a contiguous run of slices) and its masks.
* :func:`phantom_slice`: one grey classification-style slice with a lesion of a class of
  :data:`CLASSES` (or none) and its mask.
* :func:`derive_rng`: the random generator of one item, keyed by what is being made.

:mod:`medseg.data.synthetic` writes datasets of these in the real datasets' layouts.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.errors import ConfigError

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
"""Classification classes, sorted, named as in the real Kaggle brain-tumour MRI dataset."""

# Tissue intensities in [0, 1] per channel: segmentation (T1, FLAIR, T1 post-contrast) and the
# single grey channel of classification images (T1 post-contrast-like).
_SEG_PALETTE = {
    "scalp": (0.80, 0.42, 0.82),
    "csf": (0.10, 0.07, 0.12),
    "gm": (0.44, 0.45, 0.46),
    "wm": (0.60, 0.41, 0.62),
}
_CLS_PALETTE = {"scalp": (0.78,), "csf": (0.10,), "gm": (0.42,), "wm": (0.55,)}


# --------------------------------------------------------------------------------------------
# Random numbers


def derive_rng(seed: int, kind: str, *index: int) -> np.random.Generator:
    """Returns a generator that depends only on ``(seed, kind, *index)``.

    Args:
        seed: The spec's seed.
        kind: What is being made, e.g. ``"seg"`` or ``"cls"``.
        *index: Non-negative integers identifying the item.
    """
    key = (zlib.crc32(kind.encode("utf-8")), *(int(i) for i in index))
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=key))


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: Any) -> np.ndarray:
    """Low-frequency noise: gaussian-filtered white noise scaled to zero mean, unit std.

    Args:
        rng: Source of randomness.
        shape: Output shape.
        sigma: Gaussian sigma in pixels (scalar or one per axis).
    """
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)), sigma, mode="wrap")
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


# --------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class _Head:
    cx: float
    cy: float
    ax: float
    ay: float
    angle: float
    skull: float
    csf: float
    vent: float


@dataclass
class _Anatomy:
    p: np.ndarray  # head-frame coordinates scaled to this slice: the head edge is the unit circle
    q: np.ndarray
    hu: np.ndarray  # head-frame coordinates, not scaled: 1 = head semi-axis at its widest slice
    hv: np.ndarray
    r: np.ndarray  # hypot(p, q)
    head: np.ndarray  # soft weights in [0, 1]
    inner: np.ndarray  # inside the inner skull surface
    brain: np.ndarray
    cortex: np.ndarray  # 0 deep (white matter) .. 1 at the brain surface (grey matter)
    vent: np.ndarray
    r_inner: float
    r_brain: float
    pixel: float  # one pixel in units of p/q


def _sample_head(rng: np.random.Generator) -> _Head:
    return _Head(
        cx=rng.uniform(-0.05, 0.05),
        cy=rng.uniform(-0.05, 0.05),
        ax=rng.uniform(0.68, 0.80),
        ay=rng.uniform(0.80, 0.90),
        angle=rng.uniform(-0.2, 0.2),
        skull=rng.uniform(0.06, 0.10),
        csf=rng.uniform(0.02, 0.045),
        vent=rng.uniform(0.6, 1.3),
    )


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size) + 0.5) * (2.0 / size) - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    y.setflags(write=False)
    x.setflags(write=False)
    return x, y


def _inside(distance: np.ndarray, width: float) -> np.ndarray:
    """Soft inside weight: 1 well inside (distance < 0), 0 outside, linear over ``width``."""
    return np.clip(0.5 - distance / width, 0.0, 1.0)


def _anatomy(size: int, head: _Head, scale: float, vent: float) -> _Anatomy:
    x, y = _grid(size)
    dx, dy = x - head.cx, y - head.cy
    cos, sin = math.cos(head.angle), math.sin(head.angle)
    hu = (dx * cos + dy * sin) / head.ax
    hv = (-dx * sin + dy * cos) / head.ay
    p, q = hu / scale, hv / scale
    r = np.hypot(p, q)
    pixel = 2.0 / size / (min(head.ax, head.ay) * scale)
    r_inner = 1.0 - head.skull
    r_brain = r_inner - head.csf
    brain = _inside(r - r_brain, pixel)
    vent_w = np.zeros_like(r)
    if vent > 0.05:
        for side in (-1.0, 1.0):
            a = side * 0.35
            pu, qv = p - side * 0.11, q + 0.06
            sa, sb = 0.055 * vent, 0.20 * vent
            e = np.hypot(
                (pu * math.cos(a) + qv * math.sin(a)) / sa,
                (-pu * math.sin(a) + qv * math.cos(a)) / sb,
            )
            vent_w = np.maximum(vent_w, _inside(e - 1.0, pixel / sa))
        vent_w *= brain
    return _Anatomy(
        p=p,
        q=q,
        hu=hu,
        hv=hv,
        r=r,
        head=_inside(r - 1.0, pixel),
        inner=_inside(r - r_inner, pixel),
        brain=brain,
        cortex=np.clip((r - (r_brain - 0.18)) / 0.18, 0.0, 1.0),
        vent=vent_w,
        r_inner=r_inner,
        r_brain=r_brain,
        pixel=pixel,
    )


@dataclass(frozen=True)
class _Blob:
    """A star-shaped blob: inside where |d| <= 1 + sum_k a_k sin(w_k . d/|d| + phi_k).

    ``d`` is the offset from the centre divided by the radii, so the blob is an ellipse/ellipsoid
    perturbed by low-frequency angular noise (lobulated for large amplitudes). Star-shaped about the
    centre, hence connected, and in 3D it meets a contiguous run of slices.
    """

    freqs: np.ndarray  # (terms, dim)
    phases: np.ndarray  # (terms,)
    amps: np.ndarray  # (terms,)

    @classmethod
    def sample(cls, rng: np.random.Generator, dim: int, irregularity: float) -> _Blob:
        terms = 5
        freqs = rng.standard_normal((terms, dim))
        freqs /= np.linalg.norm(freqs, axis=1, keepdims=True)
        freqs *= rng.uniform(1.0, 4.0, size=(terms, 1))
        phases = rng.uniform(0.0, 2.0 * math.pi, size=terms)
        amps = irregularity * rng.uniform(0.3, 1.0, size=terms)
        return cls(freqs=freqs, phases=phases, amps=amps)

    def inside(self, offsets: Sequence[np.ndarray]) -> np.ndarray:
        rho = np.sqrt(sum(o * o for o in offsets))
        safe = np.maximum(rho, 1e-9)
        radius = np.ones_like(rho)
        for w, phase, amp in zip(self.freqs, self.phases, self.amps, strict=True):
            arg = sum(wi * o for wi, o in zip(w, offsets, strict=True)) / safe
            radius += amp * np.sin(arg + phase)
        return rho <= np.maximum(radius, 0.4)


def _rotate(a: np.ndarray, b: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    cos, sin = math.cos(angle), math.sin(angle)
    return a * cos + b * sin, -a * sin + b * cos


# --------------------------------------------------------------------------------------------
# Rendering


def _palette(rng: np.random.Generator, base: Mapping[str, tuple[float, ...]]) -> dict:
    return {
        k: np.asarray(v) * rng.uniform(0.95, 1.05, size=len(v)) for k, v in sorted(base.items())
    }


def _bias(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    strength = rng.uniform(0.0, 0.12)
    return 1.0 + strength * (x * math.cos(angle) + y * math.sin(angle))


def _render(
    anat: _Anatomy,
    palette: Mapping[str, np.ndarray],
    texture: np.ndarray,
    lesion: np.ndarray,
    lesion_gain: np.ndarray,
    bias: np.ndarray,
    noise: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Composes one HxWxC float32 slice in [0, 1]; the lesion is drawn exactly on ``lesion``."""
    t = texture[..., None]
    cortex = anat.cortex[..., None]
    tissue = (palette["wm"] * (1.0 - cortex) + palette["gm"] * cortex) * (1.0 + 0.05 * t)
    img = palette["scalp"] * (1.0 + 0.08 * t)
    for weight, value in (
        (anat.inner, palette["csf"]),
        (anat.brain, tissue),
        (anat.vent, palette["csf"]),
    ):
        w = weight[..., None]
        img = img * (1.0 - w) + value * w
    img = np.where(lesion[..., None], tissue * lesion_gain, img)
    img = img * (anat.head * bias)[..., None]
    # Rician noise: magnitude of a complex signal with gaussian noise in both parts.
    real = img + noise * rng.standard_normal(img.shape)
    imag = noise * rng.standard_normal(img.shape)
    return np.clip(np.sqrt(real * real + imag * imag), 0.0, 1.0).astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Maps a float image in [0, 1] to uint8 (rounded, clipped)."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def phantom_volume(
    rng: np.random.Generator,
    size: int,
    n_slices: int,
    *,
    noise: float = 0.03,
    gain: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Makes one segmentation patient: a 3D phantom head with one tumour.

    The head cross-section shrinks towards the first and last slices; the tumour is a perturbed
    ellipsoid (round, lobulated or elongated; small to large) inside the brain, spanning a
    contiguous run of about 30-65% of the slices, brighter in FLAIR by a per-patient contrast.

    Args:
        rng: Source of randomness (all of the patient's randomness comes from it).
        size: Slices are ``size`` x ``size``.
        n_slices: Number of slices (at least 2).
        noise: Rician noise level (std of the gaussian parts, intensities in [0, 1]).
        gain: Overall intensity gain (scanner).

    Returns:
        ``(images, masks)``: float32 ``(n_slices, size, size, 3)`` in [0, 1], channels
        (T1, FLAIR, T1 post-contrast), and uint8 ``(n_slices, size, size)`` with 1 on the tumour.
    """
    if n_slices < 2:
        raise ConfigError(f"n_slices must be >= 2, got {n_slices}")
    head = _sample_head(rng)
    palette = _palette(rng, _SEG_PALETTE)
    z_extent = rng.uniform(1.15, 1.35)
    z = np.linspace(-1.0, 1.0, n_slices)
    spacing = 2.0 / (n_slices - 1)

    # Tumour: shape, size, place, contrast.
    shape = rng.choice(3, p=[0.35, 0.4, 0.25])  # round, lobulated, elongated
    size_class = rng.choice(3, p=[0.3, 0.45, 0.25])  # small, medium, large
    radius = rng.uniform(*((0.07, 0.11), (0.11, 0.18), (0.18, 0.26))[size_class])
    radius = max(radius, 5.0 / (size * min(head.ax, head.ay)))  # at least 2.5 pixels
    elong = rng.uniform(1.4, 1.9) if shape == 2 else rng.uniform(1.0, 1.15)
    rx, ry = radius * elong, radius / elong
    irregularity = (rng.uniform(0.03, 0.08), rng.uniform(0.22, 0.38), rng.uniform(0.05, 0.12))[
        shape
    ]
    blob = _Blob.sample(rng, 3, irregularity)
    tumour_angle = rng.uniform(0.0, math.pi)
    place = rng.uniform(0.0, 2.0 * math.pi)
    dist = rng.uniform(0.1, 0.42)
    tx, ty = dist * math.cos(place), dist * math.sin(place)
    rz = rng.uniform(0.3, 0.62)
    allowed = np.flatnonzero(np.abs(z) <= max(0.85 - rz, 0.0))
    centre_slice = int(rng.choice(allowed)) if allowed.size else int(np.argmin(np.abs(z)))
    tz = z[centre_slice] + rng.uniform(-0.3, 0.3) * spacing
    contrast = rng.uniform(0.25, 0.6)
    enhancing = rng.random() < 0.3
    t1c = 1.0 + contrast * rng.uniform(0.4, 0.9) if enhancing else 1.0 - 0.3 * contrast
    base_gain = np.array([1.0 - 0.4 * contrast, 1.0 + contrast, t1c])
    heterogeneity = rng.uniform(0.03, 0.12)

    # Smooth fields shared by neighbouring slices, so the anatomy varies smoothly.
    texture = smooth_noise(rng, (n_slices, size, size), (1.0, size / 20.0, size / 20.0))
    lesion_texture = smooth_noise(rng, (n_slices, size, size), (1.0, size / 40.0, size / 40.0))
    bias = _bias(rng, size) * gain

    images = np.empty((n_slices, size, size, 3), np.float32)
    masks = np.zeros((n_slices, size, size), np.uint8)
    for k, zk in enumerate(z):
        scale = math.sqrt(1.0 - (zk / z_extent) ** 2)
        vent = head.vent * max(0.0, 1.0 - (zk / 0.55) ** 2)
        anat = _anatomy(size, head, scale, vent)
        du, dv = _rotate(anat.hu - tx, anat.hv - ty, tumour_angle)
        dz = np.full_like(du, (zk - tz) / rz)
        lesion = blob.inside((du / rx, dv / ry, dz)) & (anat.r < anat.r_brain - 0.1)
        lesion_gain = base_gain * (1.0 + heterogeneity * lesion_texture[k][..., None])
        images[k] = _render(anat, palette, texture[k], lesion, lesion_gain, bias, noise, rng)
        masks[k] = lesion
    return images, masks


def phantom_slice(
    rng: np.random.Generator,
    size: int,
    lesion: str | None = None,
    *,
    noise: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Makes one classification-style grey slice, with an optional lesion of a given class.

    Lesions follow the classes' typical location and shape: ``"glioma"`` an irregular
    intra-axial lesion in one hemisphere (sometimes with a darker necrotic core),
    ``"meningioma"`` a round, well-defined lesion against the inner skull, ``"pituitary"`` a
    small lesion near the centre-bottom (sella); ``None`` or ``"notumor"`` none.

    Args:
        rng: Source of randomness.
        size: The slice is ``size`` x ``size``.
        lesion: A class name from :data:`CLASSES` or ``None``.
        noise: Rician noise level; drawn at random when ``None``.

    Returns:
        ``(image, mask)``: float32 ``(size, size, 1)`` in [0, 1] and uint8 ``(size, size)`` with 1
        on the lesion (all zero for ``notumor``).
    """
    if lesion is not None and lesion not in CLASSES:
        raise ConfigError(f"unknown lesion class {lesion!r}; expected one of {', '.join(CLASSES)}")
    head = _sample_head(rng)
    scale = rng.uniform(0.85, 1.0)
    vent = head.vent * rng.uniform(0.0, 1.0)
    anat = _anatomy(size, head, scale, vent)
    palette = _palette(rng, _CLS_PALETTE)
    texture = smooth_noise(rng, (size, size), size / 16.0)
    lesion_texture = smooth_noise(rng, (size, size), size / 32.0)
    bias = _bias(rng, size)
    noise = rng.uniform(0.015, 0.04) if noise is None else noise
    min_radius = 2.5 * anat.pixel

    mask = np.zeros((size, size), bool)
    gain = np.ones((size, size))
    if lesion == "glioma":
        side = rng.choice([-1.0, 1.0])
        cx, cy = side * rng.uniform(0.22, 0.45), rng.uniform(-0.4, 0.3)
        radius = max(rng.uniform(0.12, 0.26), min_radius)
        elong = rng.uniform(1.0, 1.4)
        blob = _Blob.sample(rng, 2, rng.uniform(0.22, 0.4))
        du, dv = _rotate(anat.p - cx, anat.q - cy, rng.uniform(0.0, math.pi))
        offsets = (du / (radius * elong), dv * elong / radius)
        mask = blob.inside(offsets) & (anat.r < anat.r_brain - 0.05)
        contrast = rng.uniform(0.35, 0.75)
        gain = (1.0 + contrast) * (1.0 + rng.uniform(0.05, 0.15) * lesion_texture)
        if rng.random() < 0.5:  # necrotic core, ring enhancement around it
            core = blob.inside((offsets[0] * 2.2, offsets[1] * 2.2)) & mask
            gain = np.where(core, rng.uniform(0.65, 0.85), gain)
    elif lesion == "meningioma":
        angle = rng.uniform(0.0, 2.0 * math.pi)
        radius = max(rng.uniform(0.12, 0.22), min_radius)
        dist = anat.r_inner - rng.uniform(0.45, 0.7) * radius
        cx, cy = dist * math.cos(angle), dist * math.sin(angle)
        blob = _Blob.sample(rng, 2, rng.uniform(0.02, 0.06))
        mask = blob.inside(((anat.p - cx) / radius, (anat.q - cy) / radius))
        mask &= anat.r < anat.r_inner
        gain = (1.0 + rng.uniform(0.35, 0.8)) * (1.0 + 0.03 * lesion_texture)
    elif lesion == "pituitary":
        cx, cy = rng.uniform(-0.04, 0.04), rng.uniform(0.38, 0.55)
        radius = max(rng.uniform(0.06, 0.1), min_radius)
        blob = _Blob.sample(rng, 2, rng.uniform(0.03, 0.1))
        mask = blob.inside(((anat.p - cx) / radius, (anat.q - cy) / (radius * 0.85)))
        mask &= anat.r < anat.r_brain - 0.03
        gain = (1.0 + rng.uniform(0.35, 0.8)) * (1.0 + 0.05 * lesion_texture)
    image = _render(anat, palette, texture, mask, gain[..., None], bias, noise, rng)
    return image, mask.astype(np.uint8)
