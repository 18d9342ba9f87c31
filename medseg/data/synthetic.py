"""Deterministic brain-MRI-like phantom datasets, written in the real datasets' on-disk layouts.

Two datasets are written under one root, so that the loaders for the real data read them unchanged:

* ``segmentation/``: the LGG layout of Buda et al. (Kaggle ``kaggle_3m``). One folder per patient,
  ``<patient>/<patient>_<slice>.tif`` (RGB uint8; channels pre-contrast T1, FLAIR, post-contrast
  T1; slices numbered from 1, not zero padded) and ``<patient>/<patient>_<slice>_mask.tif``
  (single-channel uint8, 0 or 255). Patients are named ``SYN_<institution>_<nnnn>`` with fake
  institutions ``A``/``B``/``C`` (each with its own gain and noise level), so grouping by
  institution works as for ``TCGA_<inst>_<id>_<date>``. Each patient is a 3D phantom head with
  one tumour blob spanning a contiguous run of slices; roughly half the slices have empty masks.
* ``classification/``: the Kaggle brain-tumour MRI layout,
  ``{Training,Testing}/<class>/<class>_<nnnn>.png`` with the classes :data:`CLASSES`. Mostly
  8-bit grey PNGs, about one in four RGB, as in the real folders.

``synth.json`` (written last) records the spec, the layout version and the counts. Everything is
derived from ``SynthSpec.seed`` through :class:`numpy.random.SeedSequence` keyed by what is being
made (patient index, split, class, image index), so the same spec gives byte-identical files
whatever the generation order. The image-making functions (:func:`phantom_slice`,
:func:`phantom_volume`, :func:`segmentation_patient`, :func:`classification_sample`) work in
memory and return the lesion masks too, for tests.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from medseg.errors import ConfigError, RunExistsError

logger = logging.getLogger(__name__)

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
"""Classification classes, sorted, named as in the real Kaggle brain-tumour MRI dataset."""

SPLITS = ("Training", "Testing")
INSTITUTIONS = ("A", "B", "C")
LAYOUT_VERSION = 1
"""Version of the on-disk layout written here; a change makes existing sets count as different."""

META_NAME = "synth.json"
SEG_DIR = "segmentation"
CLS_DIR = "classification"

# Tissue intensities in [0, 1] per channel: segmentation (T1, FLAIR, T1 post-contrast) and the
# single grey channel of classification images (T1 post-contrast-like).
_SEG_PALETTE = {
    "scalp": (0.80, 0.42, 0.82),
    "csf": (0.10, 0.07, 0.12),
    "gm": (0.44, 0.45, 0.46),
    "wm": (0.60, 0.41, 0.62),
}
_CLS_PALETTE = {"scalp": (0.78,), "csf": (0.10,), "gm": (0.42,), "wm": (0.55,)}


@dataclass(frozen=True)
class SynthSpec:
    """What to generate.

    Attributes:
        seed: Non-negative seed; everything is derived from it.
        size: Images are ``size`` x ``size`` pixels (at least 32).
        patients: Number of segmentation patients.
        slices_per_patient: Slices per patient (at least 4).
        images_per_class: Classification images per class in ``Training``; ``Testing`` gets
            ``images_per_class // 4`` per class (so at least 4).
    """

    seed: int = 0
    size: int = 128
    patients: int = 12
    slices_per_patient: int = 16
    images_per_class: int = 40

    def __post_init__(self) -> None:
        minimum = {
            "seed": 0,
            "size": 32,
            "patients": 1,
            "slices_per_patient": 4,
            "images_per_class": 4,
        }
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"SynthSpec.{f.name} must be an integer, got {value!r}")
            if value < minimum[f.name]:
                raise ConfigError(f"SynthSpec.{f.name} must be >= {minimum[f.name]}, got {value}")

    @property
    def testing_per_class(self) -> int:
        """Number of ``Testing`` images per class."""
        return self.images_per_class // 4

    def to_dict(self) -> dict[str, int]:
        """Returns the spec as a plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SynthSpec:
        """Builds a spec from :meth:`to_dict` output.

        Raises:
            ConfigError: On an unknown key or a bad value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown SynthSpec key(s): {', '.join(unknown)}")
        return cls(**dict(data))


_DEFAULT_SPEC = SynthSpec()


@dataclass
class SynthSummary:
    """What :func:`generate` produced (or found already there)."""

    root: Path
    segmentation_dir: Path
    classification_dir: Path
    n_seg_slices: int
    n_seg_tumour_slices: int
    n_cls_images: int
    created: bool


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


# --------------------------------------------------------------------------------------------
# Dataset items


def n_institutions(patients: int) -> int:
    """Number of fake institutions used for ``patients`` patients (at most 3)."""
    return min(len(INSTITUTIONS), patients)


def patient_name(index: int, patients: int) -> str:
    """Name of segmentation patient ``index`` (0-based), e.g. ``SYN_A_0001``."""
    institution = INSTITUTIONS[index % n_institutions(patients)]
    return f"SYN_{institution}_{index + 1:04d}"


def segmentation_patient(spec: SynthSpec, index: int) -> tuple[str, np.ndarray, np.ndarray]:
    """Makes segmentation patient ``index`` (0-based) exactly as :func:`generate` writes it.

    Returns:
        ``(name, images, masks)``: the patient name, uint8 ``(slices, size, size, 3)`` images and
        uint8 ``(slices, size, size)`` masks with values 0/255.
    """
    institution = index % n_institutions(spec.patients)
    scanner = derive_rng(spec.seed, "institution", institution)
    gain, noise = scanner.uniform(0.85, 1.1), scanner.uniform(0.015, 0.04)
    rng = derive_rng(spec.seed, "seg", index)
    images, masks = phantom_volume(
        rng, spec.size, spec.slices_per_patient, noise=noise * rng.uniform(0.9, 1.1), gain=gain
    )
    return patient_name(index, spec.patients), to_uint8(images), masks * np.uint8(255)


def classification_sample(
    spec: SynthSpec, split: str, cls: str, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Makes classification image ``index`` (0-based) of ``split``/``cls`` as :func:`generate` does.

    Returns:
        ``(pixels, mask)``: uint8 ``(size, size)`` grey or ``(size, size, 3)`` RGB pixels (about
        one in four is RGB, grey replicated, sometimes faintly tinted), and the uint8 0/1 lesion
        mask.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if cls not in CLASSES:
        raise ConfigError(f"unknown class {cls!r}; expected one of {', '.join(CLASSES)}")
    rng = derive_rng(spec.seed, "cls", SPLITS.index(split), CLASSES.index(cls), index)
    rgb = rng.random() < 0.25
    tint = rng.uniform(0.94, 1.0, size=3) if rng.random() < 0.5 else np.ones(3)
    image, mask = phantom_slice(rng, spec.size, None if cls == "notumor" else cls)
    if rgb:
        return to_uint8(image * tint), mask
    return to_uint8(image[..., 0]), mask


# --------------------------------------------------------------------------------------------
# Writing


def _save(array: np.ndarray, path: Path, fmt: str) -> None:
    # Pillow writes neither a timestamp nor software tags for TIFF/PNG: the bytes depend on pixels.
    Image.fromarray(array).save(path, format=fmt)


def _write_dataset(root: Path, spec: SynthSpec) -> dict[str, int]:
    seg_root = root / SEG_DIR
    tumour_slices = 0
    for i in range(spec.patients):
        name, images, masks = segmentation_patient(spec, i)
        folder = seg_root / name
        folder.mkdir(parents=True)
        for k in range(spec.slices_per_patient):
            _save(images[k], folder / f"{name}_{k + 1}.tif", "TIFF")
            _save(masks[k], folder / f"{name}_{k + 1}_mask.tif", "TIFF")
            tumour_slices += int(masks[k].any())
    per_split = {"Training": spec.images_per_class, "Testing": spec.testing_per_class}
    for split in SPLITS:
        for cls in CLASSES:
            folder = root / CLS_DIR / split / cls
            folder.mkdir(parents=True)
            for j in range(per_split[split]):
                pixels, _ = classification_sample(spec, split, cls, j)
                _save(pixels, folder / f"{cls}_{j + 1:04d}.png", "PNG")
    counts = {
        "seg_patients": spec.patients,
        "seg_slices": spec.patients * spec.slices_per_patient,
        "seg_tumour_slices": tumour_slices,
        "cls_training": len(CLASSES) * per_split["Training"],
        "cls_testing": len(CLASSES) * per_split["Testing"],
    }
    counts["cls_images"] = counts["cls_training"] + counts["cls_testing"]
    meta = {
        "generator": __name__,
        "layout_version": LAYOUT_VERSION,
        "spec": spec.to_dict(),
        "counts": counts,
        "classes": list(CLASSES),
        "institutions": list(INSTITUTIONS[: n_institutions(spec.patients)]),
    }
    (root / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return counts


def _read_meta(root: Path) -> dict | None:
    try:
        meta = json.loads((root / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _matches(meta: dict | None, root: Path, spec: SynthSpec) -> bool:
    return (
        meta is not None
        and meta.get("layout_version") == LAYOUT_VERSION
        and meta.get("spec") == spec.to_dict()
        and isinstance(meta.get("counts"), dict)
        and (root / SEG_DIR).is_dir()
        and (root / CLS_DIR).is_dir()
    )


def _summary(root: Path, counts: Mapping[str, Any], created: bool) -> SynthSummary:
    return SynthSummary(
        root=root,
        segmentation_dir=root / SEG_DIR,
        classification_dir=root / CLS_DIR,
        n_seg_slices=int(counts["seg_slices"]),
        n_seg_tumour_slices=int(counts["seg_tumour_slices"]),
        n_cls_images=int(counts["cls_images"]),
        created=created,
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def generate(
    out_dir: str | Path, spec: SynthSpec = _DEFAULT_SPEC, *, overwrite: bool = False
) -> SynthSummary:
    """Writes the synthetic segmentation and classification datasets under ``out_dir``.

    The set is generated into ``<out_dir>.tmp-<pid>`` and renamed into place, so ``out_dir`` is
    either absent or complete. An existing ``out_dir`` whose ``synth.json`` has the same spec and
    layout version is reused as it is.

    Args:
        out_dir: Root folder to write (``segmentation/``, ``classification/``, ``synth.json``).
        spec: What to generate.
        overwrite: Replace an existing, different ``out_dir``.

    Returns:
        The summary; ``created`` is False when an identical set was already there.

    Raises:
        RunExistsError: ``out_dir`` exists, holds something else and ``overwrite`` is False.
    """
    root = Path(os.path.abspath(out_dir))
    exists = root.exists() or root.is_symlink()
    if exists:
        meta = _read_meta(root)
        if _matches(meta, root, spec):
            assert meta is not None
            logger.info("synthetic data: reusing %s (same spec, seed %d)", root, spec.seed)
            return _summary(root, meta["counts"], created=False)
        empty_dir = root.is_dir() and not root.is_symlink() and not any(root.iterdir())
        if not (overwrite or empty_dir):
            raise RunExistsError(
                f"{root} already exists and is not a synthetic set with this spec; "
                "pass --overwrite to replace it"
            )
    started = time.perf_counter()
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    for stale in root.parent.glob(f"{root.name}.tmp-*"):  # left by a killed run
        _remove(stale)
    tmp.mkdir(parents=True)
    try:
        counts = _write_dataset(tmp, spec)
        if exists:
            old = root.with_name(f"{root.name}.old-{os.getpid()}")
            _remove(old)
            root.rename(old)
            tmp.rename(root)
            _remove(old)
        else:
            tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = _summary(root, counts, created=True)
    logger.info(
        "synthetic data: wrote %s in %.1fs: %d patients, %d slices (%d with tumour), "
        "%d classification images (seed %d, size %d)",
        root,
        time.perf_counter() - started,
        spec.patients,
        summary.n_seg_slices,
        summary.n_seg_tumour_slices,
        summary.n_cls_images,
        spec.seed,
        spec.size,
    )
    return summary
