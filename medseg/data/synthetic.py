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
whatever the generation order. The image-making functions (:func:`segmentation_patient`,
:func:`classification_sample`, and the phantoms they draw,
:func:`medseg.data.phantoms.phantom_volume` and :func:`~medseg.data.phantoms.phantom_slice`) work
in memory and return the lesion masks too, for tests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medseg.data.phantoms import CLASSES, derive_rng, phantom_slice, phantom_volume, to_uint8
from medseg.errors import ConfigError, RunExistsError

logger = logging.getLogger(__name__)

SPLITS = ("Training", "Testing")
INSTITUTIONS = ("A", "B", "C")
LAYOUT_VERSION = 1
"""Version of the on-disk layout written here; a change makes existing sets count as different."""

META_NAME = "synth.json"
SEG_DIR = "segmentation"
CLS_DIR = "classification"


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
