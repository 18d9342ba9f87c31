"""Dataset fingerprint and the plan of a 3D run (nnU-Net's experiment planning is the model).

:func:`compute_fingerprint` reads every case of a ``dataset.json`` dataset once and summarises
what the plan needs, in a JSON-able dict (never file names or case ids):

* ``n_cases``; ``spacing`` and ``shape`` (voxels at the source spacing): ``median``, ``min``,
  ``max`` per (slice, row, col) axis; ``extent_mm`` (shape x spacing), the same statistics;
* ``intensity``: per channel, over foreground voxels (label > 0) of all cases (at most
  :data:`FOREGROUND_SAMPLES` voxels per case, drawn with a fixed seed, as nnU-Net's
  ``DatasetFingerprintExtractor`` does): percentiles 0.5, 50, 99.5, ``mean``, ``std``, ``min``,
  ``max``;
* ``class_share``: each label's share of all voxels, by label name;
* ``label_order``: with two foreground labels or more, per (slice, row, col) axis the share of
  cases in which the labels' centroids lie in the dataset's usual order along that axis (the
  lowest share over the pairs of labels), over the ``n_cases`` holding every label. Near 1, the
  structures keep their order along the axis (the anterior hippocampus always on the same side
  of the posterior), and a flip along it makes a patch no scan looks like
  (:func:`flip_warning`);
* ``labels``, ``channels`` (number as text -> name) and ``modality``.

:class:`VolumePlan` holds the values a 3D run works with (target spacing, patch size,
normalisation); :func:`make_plan` fills it from the fingerprint, and any value set in the
config overrides the fingerprint's (the plan's ``from_config`` names those).
"""

from __future__ import annotations

import itertools
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.config import Config
from medseg.data.augment3d import flip_axes
from medseg.errors import ConfigError, DataError
from medseg.io.msd import DatasetDescription, MsdCase, read_case_image, read_case_labels

logger = logging.getLogger(__name__)

#: Foreground voxels per case (per channel) that intensity statistics are computed over.
FOREGROUND_SAMPLES = 10_000
#: Largest patch, in voxels: 128**3.
MAX_PATCH_VOXELS = 128**3
#: Share of cases from which on structures count as keeping their order along an axis.
ORDER_KEPT = 0.9
#: Percentiles of the foreground intensities in the fingerprint.
PERCENTILES = (0.5, 50.0, 99.5)
NORMALIZATIONS = ("zscore", "ct", "none")
# Seed of the foreground sampling (one stream per case).
_SEED = 1234


@dataclass
class VolumePlan:
    """What a 3D run works with; JSON-able via :meth:`to_dict` / :meth:`from_dict`.

    Attributes:
        target_spacing: (slice, row, col) mm the model works at.
        patch_size: (D, H, W) training patch and sliding window.
        normalization: ``zscore`` (per channel, per volume, over all voxels:
            ``(x - mean) / max(std, 1e-8)``), ``ct`` (clip to ``intensity_clip``, then
            ``(x - channel_mean) / channel_std``) or ``none``.
        intensity_clip: ``ct``: ``[low, high]``; else ``[]``.
        channel_mean: ``ct``: foreground mean per channel; else ``[]``.
        channel_std: ``ct``: foreground std per channel; else ``[]``.
        labels: label number -> name, background (0) included.
        channels: channel number -> name.
        modality: ``"MR"``, ``"CT"``, ...
        from_config: the fields above that the config set (the others came from the
            fingerprint).
    """

    target_spacing: list[float]
    patch_size: list[int]
    normalization: str
    intensity_clip: list[float]
    channel_mean: list[float]
    channel_std: list[float]
    labels: dict[int, str]
    channels: dict[int, str]
    modality: str
    from_config: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Classes of the softmax head: the labels, background included."""
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (label and channel numbers as text keys)."""
        out = asdict(self)
        out["labels"] = {str(k): v for k, v in self.labels.items()}
        out["channels"] = {str(k): v for k, v in self.channels.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VolumePlan:
        """The plan of a :meth:`to_dict` dict (e.g. a run's ``plan.json``).

        Raises:
            ConfigError: a key is missing or a value has the wrong form.
        """
        required = [f for f in cls.__dataclass_fields__ if f != "from_config"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"plan: missing key(s) {missing}")
        try:
            plan = cls(
                target_spacing=[float(v) for v in d["target_spacing"]],
                patch_size=[int(v) for v in d["patch_size"]],
                normalization=str(d["normalization"]),
                intensity_clip=[float(v) for v in d["intensity_clip"]],
                channel_mean=[float(v) for v in d["channel_mean"]],
                channel_std=[float(v) for v in d["channel_std"]],
                labels={int(k): str(v) for k, v in d["labels"].items()},
                channels={int(k): str(v) for k, v in d["channels"].items()},
                modality=str(d["modality"]),
                from_config=[str(v) for v in d.get("from_config", [])],
            )
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"plan: malformed value ({e})") from None
        if len(plan.target_spacing) != 3 or len(plan.patch_size) != 3:
            raise ConfigError("plan: target_spacing and patch_size need 3 values each")
        if plan.normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"plan: normalization '{plan.normalization}' is not one of {NORMALIZATIONS}"
            )
        return plan


# --------------------------------------------------------------------------- fingerprint


def compute_fingerprint(
    description: DatasetDescription,
    max_cases: int | None = None,
    workers: int = 2,
    *,
    problems: list[str] | None = None,
) -> dict[str, Any]:
    """Read the cases of ``description`` and summarise them (see the module docstring).

    Args:
        description: the dataset (:func:`medseg.io.msd.read_dataset_json`).
        max_cases: only this many cases, evenly spaced through the sorted list (None: all).
        workers: reading threads.
        problems: when given, a case that cannot be used is left out and its problem appended
            here instead of raised.

    Returns:
        The fingerprint, a JSON-able dict.

    Raises:
        DataError: a case cannot be read, its labels are not those of ``dataset.json`` or its
            label map's shape differs from its image's (unless ``problems`` is given), or no
            case is usable.
    """
    cases = [c for c in description.cases if c.label is not None]
    if max_cases is not None and 0 < max_cases < len(cases):
        picks = np.linspace(0, len(cases) - 1, max_cases).round().astype(int)
        cases = [cases[i] for i in sorted(set(picks.tolist()))]

    def one(item: tuple[int, MsdCase]) -> dict[str, Any] | None:
        try:
            return _case_summary(item[1], item[0], description)
        except DataError as e:
            if problems is None:
                raise
            problems.append(str(e))
            return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        summaries = [s for s in pool.map(one, enumerate(cases)) if s is not None]
    if not summaries:
        raise DataError(f"{description.root}: no usable labelled case to fingerprint")
    spacings = np.array([s["spacing"] for s in summaries], dtype=np.float64)
    shapes = np.array([s["shape"] for s in summaries], dtype=np.float64)
    counts = np.sum([s["counts"] for s in summaries], axis=0)
    total = float(counts.sum())
    fingerprint = {
        "n_cases": len(summaries),
        "spacing": _stats(spacings),
        "shape": _stats(shapes),
        "extent_mm": _stats(spacings * shapes),
        "intensity": [
            _intensity(c, name, [s["foreground"][c] for s in summaries])
            for c, name in sorted(description.channels.items())
        ],
        "class_share": {
            name: round(float(counts[k]) / total, 6) for k, name in description.labels.items()
        },
        "label_order": label_order([s["centroids"] for s in summaries]),
        "labels": {str(k): v for k, v in description.labels.items()},
        "channels": {str(k): v for k, v in description.channels.items()},
        "modality": description.modality,
        "foreground_samples_per_case": FOREGROUND_SAMPLES,
    }
    logger.info(
        "fingerprint of %s: %d cases, median spacing %s, median shape %s",
        description.name,
        len(summaries),
        fingerprint["spacing"]["median"],
        fingerprint["shape"]["median"],
    )
    return fingerprint


def _case_summary(case: MsdCase, index: int, description: DatasetDescription) -> dict[str, Any]:
    image = read_case_image(case, description.n_channels)
    labels = read_case_labels(case, description.labels)
    if labels.shape != image.array.shape[:3]:
        raise DataError(
            f"{case.label}: label shape {labels.shape} differs from image shape "
            f"{image.array.shape[:3]}"
        )
    spacing = image.meta.spacing
    if spacing is None or len(spacing) != 3:
        raise DataError(f"{case.images[0]}: no voxel spacing in the header")
    foreground = labels > 0
    rng = np.random.default_rng([_SEED, index])
    n = int(foreground.sum())
    pick = rng.choice(n, size=min(n, FOREGROUND_SAMPLES), replace=False) if n else []
    samples = [image.array[..., c][foreground][pick] for c in range(image.array.shape[-1])]
    counts = np.bincount(labels.ravel(), minlength=len(description.labels))
    foreground_labels = sorted(k for k in description.labels if k > 0)
    present = [k for k in foreground_labels if counts[k] > 0]
    centres = ndimage.center_of_mass(np.ones(labels.shape), labels, present) if present else []
    centroids = dict(zip(present, centres, strict=True))
    return {
        "spacing": [float(s) for s in spacing],
        "shape": list(labels.shape),
        "counts": counts,
        "foreground": samples,
        "centroids": [centroids.get(k) for k in foreground_labels],
    }


def label_order(centroids: list[list[tuple[float, ...] | None]]) -> dict[str, Any] | None:
    """How consistently the foreground labels keep their order along each axis.

    Args:
        centroids: per case, each foreground label's centroid (voxel coordinates), or None
            where the case lacks the label.

    Returns:
        None with fewer than two foreground labels or no case holding them all; else
        ``{"axes": [share per axis], "n_cases": n}``: per axis the lowest, over the pairs of
        labels, share of the ``n`` cases in which the pair lies in its majority order.
    """
    complete = [c for c in centroids if len(c) >= 2 and all(v is not None for v in c)]
    if not complete:
        return None
    points = np.asarray(complete, dtype=np.float64)  # [case, label, axis]
    shares = []
    for axis in range(points.shape[2]):
        worst = 1.0
        for a, b in itertools.combinations(range(points.shape[1]), 2):
            signs = np.sign(points[:, a, axis] - points[:, b, axis])
            worst = min(worst, max(np.mean(signs > 0), np.mean(signs < 0)))
        shares.append(round(float(worst), 4))
    return {"axes": shares, "n_cases": len(complete)}


def flip_warning(fingerprint: dict[str, Any], augment_cfg: Any) -> str | None:
    """A warning when training flips an axis along which the structures keep their order.

    Args:
        fingerprint: a :func:`compute_fingerprint` result.
        augment_cfg: the ``augment`` section (``enabled``, ``dflip``, ``vflip``, ``hflip``).

    Returns:
        One line naming the flips and the shares of cases (see ``label_order``), or None.
    """
    order = fingerprint.get("label_order") or {}
    shares = order.get("axes") or []
    keys = ("augment.dflip", "augment.vflip", "augment.hflip")
    kept = [a for a in flip_axes(augment_cfg) if a < len(shares) and shares[a] >= ORDER_KEPT]
    if not kept:
        return None
    named = ", ".join(f"{keys[a]} ({100 * shares[a]:.0f}% of cases)" for a in kept)
    return (
        f"the labelled structures keep their order along the axes of {named}: a flipped "
        "patch is one no scan looks like; set these flips to 0"
    )


def _stats(values: np.ndarray) -> dict[str, list[float]]:
    """Median, min and max per column, rounded to 4 decimals."""
    return {
        "median": [round(float(v), 4) for v in np.median(values, axis=0)],
        "min": [round(float(v), 4) for v in values.min(axis=0)],
        "max": [round(float(v), 4) for v in values.max(axis=0)],
    }


def _intensity(channel: int, name: str, parts: list[np.ndarray]) -> dict[str, Any]:
    values = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])
    out: dict[str, Any] = {"channel": channel, "name": name, "n_voxels": int(values.size)}
    if values.size == 0:
        logger.warning("channel %d (%s): no foreground voxel in any case", channel, name)
        return out | {"p0_5": None, "p50": None, "p99_5": None, "mean": None, "std": None}
    p_low, p_mid, p_high = np.percentile(values, PERCENTILES)
    return out | {
        "p0_5": float(p_low),
        "p50": float(p_mid),
        "p99_5": float(p_high),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


# --------------------------------------------------------------------------- plan


def make_plan(fingerprint: dict[str, Any], cfg: Config) -> VolumePlan:
    """The plan of a 3D run: the config's values where set, the fingerprint's otherwise.

    * target spacing: ``volume.target_spacing`` or the median spacing;
    * patch size: ``train.patch_size`` or the median extent at the target spacing, each axis
      rounded up to a multiple of ``2**model.depth`` and shrunk (largest axis first, keeping
      multiples) until the patch has at most :data:`MAX_PATCH_VOXELS` voxels;
    * normalization: ``volume.normalization``; ``auto`` is ``ct`` for CT, ``zscore`` otherwise;
    * ``ct`` only: intensity clip ``volume.intensity_clip`` or the foreground 0.5/99.5
      percentiles (lowest/highest over the channels), and the foreground mean/std per channel.

    Raises:
        DataError: the fingerprint lacks what the plan needs (e.g. ``ct`` without foreground
            statistics).
        ConfigError: ``train.patch_size`` is set but not 3 values.
    """
    try:
        median_spacing = [float(v) for v in fingerprint["spacing"]["median"]]
        extent = fingerprint.get("extent_mm", {}).get("median")
        if extent is None:
            shape = fingerprint["shape"]["median"]
            extent = [float(s) * float(p) for s, p in zip(shape, median_spacing, strict=True)]
        labels = {int(k): str(v) for k, v in fingerprint["labels"].items()}
        channels = {int(k): str(v) for k, v in fingerprint["channels"].items()}
        modality = str(fingerprint.get("modality", ""))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"fingerprint: missing or malformed entry ({e})") from None
    from_config = []
    vol = cfg.volume
    target = [float(v) for v in vol.target_spacing] or median_spacing
    if vol.target_spacing:
        from_config.append("target_spacing")
    if cfg.train.patch_size:
        patch = [int(v) for v in cfg.train.patch_size]
        if len(patch) != 3:
            raise ConfigError(f"train.patch_size: a 3D plan needs [D, H, W], got {patch}")
        from_config.append("patch_size")
    else:
        shape_at_target = [e / t for e, t in zip(extent, target, strict=True)]
        patch = default_patch_size(shape_at_target, 2**cfg.model.depth)
    normalization = vol.normalization
    if normalization == "auto":
        normalization = "ct" if modality.upper() == "CT" else "zscore"
    else:
        from_config.append("normalization")
    clip: list[float] = []
    mean: list[float] = []
    std: list[float] = []
    if normalization == "ct":
        stats = fingerprint.get("intensity") or []
        if not stats or any(s.get("mean") is None for s in stats):
            raise DataError("fingerprint: 'ct' normalisation needs foreground intensity statistics")
        if vol.intensity_clip:
            clip = [float(v) for v in vol.intensity_clip]
            from_config.append("intensity_clip")
        else:
            clip = [min(s["p0_5"] for s in stats), max(s["p99_5"] for s in stats)]
        mean = [float(s["mean"]) for s in stats]
        std = [max(float(s["std"]), 1e-8) for s in stats]
    return VolumePlan(
        target_spacing=target,
        patch_size=patch,
        normalization=normalization,
        intensity_clip=clip,
        channel_mean=mean,
        channel_std=std,
        labels=labels,
        channels=channels,
        modality=modality,
        from_config=from_config,
    )


def default_patch_size(shape: list[float], multiple: int) -> list[int]:
    """``shape`` rounded up to multiples of ``multiple``, capped at :data:`MAX_PATCH_VOXELS`.

    While the patch is too large, its largest axis shrinks by ``multiple`` (never below one
    ``multiple``).
    """
    patch = [max(multiple, math.ceil(round(s, 3) / multiple) * multiple) for s in shape]
    while math.prod(patch) > MAX_PATCH_VOXELS:
        axis = int(np.argmax(patch))
        if patch[axis] <= multiple:
            break
        patch[axis] -= multiple
    return patch
