"""Leak-proof splits and the split manifest.

Samples are split by :attr:`~medseg.data.scan.Sample.group` (patient or near-duplicate group) with
scikit-learn's group-aware splitters, so no group ever lands on both sides. The result is a split
manifest (``splits.json`` in every run folder) that training, evaluation and reports all read::

    {
      "version": 1,
      "method": "group_shuffle",
      "seed": 0,
      "val_fraction": 0.2,
      "test_fraction": 0.0,
      "splits": {"train": [ids...], "val": [ids...], "test": [ids...]},
      "hashes": {"<id>": "<sha256 of image>:<sha256 of mask>", ...},
      "hash": "<sha256 of the ids and file hashes of every split>"
    }

:func:`load_manifest` checks the manifest's own hash, so a hand-edited or truncated manifest is
rejected, and :func:`check_manifest_files` compares the stored file hashes with the data on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from medseg.data.scan import Sample
from medseg.errors import DataError
from medseg.utils import atomic_write_json, file_sha256

MANIFEST_VERSION = 1

logger = logging.getLogger(__name__)


def _group_split(
    samples: list[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split off about ``fraction`` of the groups; stratified by class when targets are classes."""
    groups = np.array([s.group for s in samples])
    n_groups = len(set(groups.tolist()))
    if n_groups < 2:
        raise DataError(f"cannot split {len(samples)} samples: they form only {n_groups} group(s)")
    idx = np.arange(len(samples))
    n_splits = max(2, min(n_groups, round(1 / fraction)))
    y = np.array([s.target if isinstance(s.target, int) else -1 for s in samples])
    counts = np.bincount(y[y >= 0]) if (y >= 0).all() else np.array([])
    if counts.size and counts[counts > 0].min() >= n_splits:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        rest, held = next(splitter.split(idx, y, groups))
    else:  # masks, or classes too small to stratify: plain group split
        if counts.size:
            logger.warning(
                "a class has fewer than %d images: split by group without stratification", n_splits
            )
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        rest, held = next(splitter.split(idx, groups=groups))
    return [samples[i] for i in rest], [samples[i] for i in held]


def sample_hash(sample: Sample) -> str:
    """SHA-256 of the sample's image (and mask) bytes, ``image:mask``."""
    parts = [file_sha256(sample.image)]
    if isinstance(sample.target, str):
        parts.append(file_sha256(sample.target))
    return ":".join(parts)


def _manifest_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def make_split(
    samples: list[Sample], val_fraction: float, test_fraction: float = 0.0, seed: int = 0
) -> dict:
    """Split samples into train/val(/test) by group and return the manifest.

    Samples whose layout already marks them ``Testing`` form the test split; otherwise
    ``test_fraction`` of the groups is held out first. ``val_fraction`` of the remaining groups
    becomes the validation split.
    """
    preset_test = [s for s in samples if s.split == "Testing"]
    pool = [s for s in samples if s.split != "Testing"]
    test = preset_test
    if not preset_test and test_fraction > 0:
        pool, test = _group_split(pool, test_fraction, seed)
    train, val = _group_split(
        pool, val_fraction / (1.0 - (test_fraction if not preset_test else 0)), seed + 1
    )
    manifest = {
        "version": MANIFEST_VERSION,
        "method": "stratified_group"
        if all(isinstance(s.target, int) for s in samples)
        else "group_shuffle",
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "splits": {
            "train": [s.id for s in train],
            "val": [s.id for s in val],
            "test": [s.id for s in test],
        },
        "groups": {
            name: sorted({s.group for s in part})
            for name, part in (("train", train), ("val", val), ("test", test))
        },
        "hashes": {s.id: sample_hash(s) for s in samples},
    }
    manifest["hash"] = _manifest_hash(manifest)
    return manifest


def write_manifest(path: str | Path, manifest: dict) -> Path:
    """Write the manifest atomically, resealing its hash (callers may have added fields)."""
    manifest["hash"] = _manifest_hash(manifest)
    return atomic_write_json(path, manifest)


def load_manifest(path: str | Path) -> dict:
    """Read a manifest and verify its hash.

    Raises:
        DataError: missing, unreadable, or modified since it was written.
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: split manifest not found") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: split manifest is not readable JSON ({e})") from None
    if manifest.get("version") != MANIFEST_VERSION or "hash" not in manifest:
        raise DataError(f"{path}: not a medseg split manifest (version {MANIFEST_VERSION})")
    if _manifest_hash(manifest) != manifest["hash"]:
        raise DataError(f"{path}: split manifest was modified after it was written (hash mismatch)")
    return manifest


def select(samples: list[Sample], manifest: dict, split: str) -> list[Sample]:
    """The samples of one split, in manifest order.

    Raises:
        DataError: the manifest names a sample that the dataset no longer has.
    """
    if split not in manifest["splits"]:
        raise DataError(f"unknown split '{split}'; valid: {', '.join(manifest['splits'])}")
    by_id = {s.id: s for s in samples}
    missing = [i for i in manifest["splits"][split] if i not in by_id]
    if missing:
        raise DataError(
            f"{len(missing)} sample(s) of split '{split}' are missing from the dataset, "
            f"e.g. {missing[0]}"
        )
    return [by_id[i] for i in manifest["splits"][split]]


def check_manifest_files(samples: list[Sample], manifest: dict) -> list[str]:
    """Ids whose files changed on disk since the manifest was written."""
    return [
        s.id
        for s in samples
        if s.id in manifest["hashes"] and sample_hash(s) != manifest["hashes"][s.id]
    ]
