"""Leak-proof splits and the split manifest.

Samples are split by :attr:`~medseg.data.samples.Sample.group` (patient or near-duplicate group)
with scikit-learn's group-aware splitters, so no group ever lands on both sides. The result is a
split manifest (``splits.json`` in every run folder) that training, evaluation and reports all read.
:func:`make_split` gives train/val/test::

    {
      "version": 1,
      "method": "group_shuffle",          # or "stratified_group"
      "stratify": null,                   # or "class" / "tumour": what the labels were
      "seed": 0,
      "val_fraction": 0.2,
      "test_fraction": 0.0,
      "splits": {"train": [ids...], "val": [ids...], "test": [ids...]},
      "groups": {"train": [groups...], "val": [...], "test": [...]},
      "hashes": {"<id>": "<sha256 of image>:<sha256 of mask>", ...},
      "hash": "<sha256 of everything above>"
    }

:func:`make_kfold` gives K folds over the groups that are not held out for testing::

    {
      "version": 1,
      "method": "stratified_group_kfold",  # or "group_kfold" when stratifying is impossible
      "stratify": "tumour", "seed": 0, "k": 5, "test_fraction": 0.0,
      "splits": {"test": [ids...]},
      "folds": [{"train": [ids...], "val": [ids...]}, ...],
      "groups": {"test": [groups...]}, "fold_groups": [[val groups of fold 0], ...],
      "hashes": {...}, "hash": "..."
    }

Stratification: classification stratifies on the class index; segmentation on whether the
sample's *group* has any foreground in its masks (each mask file or volume is read once; a group
is positive as soon as one of its masks is). File hashes of volume samples (one per slice) are
computed once per file or DICOM folder (a folder hashes the names and bytes of its sorted files).

:func:`check_no_leak` raises when a group is on both sides of any train/val/test or fold boundary;
the split makers and :func:`select` call it. :func:`load_manifest` checks the manifest's own hash,
so a hand-edited or truncated manifest is rejected, and :func:`check_manifest_files` compares the
stored file hashes with the data on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupKFold, GroupShuffleSplit, StratifiedGroupKFold

from medseg.data.samples import Sample
from medseg.data.scan_msd import sample_images
from medseg.errors import DataError
from medseg.utils import atomic_write_json, file_sha256

MANIFEST_VERSION = 1

logger = logging.getLogger(__name__)


def _can_stratify(y: np.ndarray, groups: np.ndarray, n_splits: int) -> str | None:
    """None when every label is found in at least ``n_splits`` groups, else the reason why not."""
    labels = sorted(set(y.tolist()))
    if len(labels) < 2:
        return f"every group has the same label ({labels[0] if labels else 'none'})"
    for label in labels:
        n = len(set(groups[y == label].tolist()))
        if n < n_splits:
            return f"label {label} is found in only {n} group(s), fewer than {n_splits} parts"
    return None


def _group_split(
    samples: list[Sample], fraction: float, seed: int, y: np.ndarray | None = None
) -> tuple[list[Sample], list[Sample], bool]:
    """Split off about ``fraction`` of the groups, stratified on ``y`` when it is given and
    possible; returns (rest, held, stratified)."""
    groups = np.array([s.group for s in samples])
    n_groups = len(set(groups.tolist()))
    if n_groups < 2:
        raise DataError(f"cannot split {len(samples)} samples: they form only {n_groups} group(s)")
    idx = np.arange(len(samples))
    n_splits = max(2, min(n_groups, round(1 / fraction)))
    why = _can_stratify(y, groups, n_splits) if y is not None else None
    if y is not None and why is None:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        rest, held = next(splitter.split(idx, y, groups))
        stratified = True
    else:
        if y is not None:
            logger.warning("split by group without stratification: %s", why)
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        rest, held = next(splitter.split(idx, groups=groups))
        stratified = False
    return [samples[i] for i in rest], [samples[i] for i in held], stratified


def path_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a folder: names and bytes of its files, sorted."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    files = sorted(
        f
        for f in path.rglob("*")
        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
    )
    for f in files:
        h.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def sample_hash(sample: Sample, cache: dict[str, str] | None = None) -> str:
    """SHA-256 of the sample's image (and mask) file or folder, ``image:mask`` (each channel
    file of a multi-file MSD case in turn: ``image0:image1:mask``).

    ``cache`` (path -> hash) lets the slices of one volume share one hash computation.
    """
    cache = {} if cache is None else cache
    images = [sample.image]
    if os.pathsep in sample.image and not Path(sample.image).exists():
        images = [str(p) for p in sample_images(sample)]  # an MSD case's channel files
    paths = images + ([sample.target] if isinstance(sample.target, str) else [])
    parts = []
    for p in paths:
        if p not in cache:
            cache[p] = path_sha256(p)
        parts.append(cache[p])
    return ":".join(parts)


def _hashes(samples: list[Sample]) -> dict[str, str]:
    cache: dict[str, str] = {}
    return {s.id: sample_hash(s, cache) for s in samples}


def _manifest_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def tumour_groups(samples: list[Sample]) -> dict[str, bool] | None:
    """Whether each group has foreground in any of its masks; None if a mask cannot be read.

    A mask file or volume is read at most once, and not at all once its group is known to be
    positive. For a volume slice, only that slice of the volume counts.
    """
    from medseg.io import read_mask

    positive: dict[str, bool] = {s.group: False for s in samples}
    volumes: dict[str, np.ndarray] = {}  # per-slice foreground of each mask volume read
    for s in samples:
        if positive[s.group] or not isinstance(s.target, str):
            continue
        try:
            if s.index is None:
                positive[s.group] = bool(np.any(read_mask(s.target)))
                continue
            if s.target not in volumes:
                vol = np.asarray(read_mask(s.target))
                volumes[s.target] = vol.reshape(vol.shape[0], -1).any(axis=1)
            fg = volumes[s.target]
            positive[s.group] = bool(s.index < len(fg) and fg[s.index])
        except DataError as e:
            logger.warning("cannot stratify on tumour: %s", e)
            return None
    return positive


def _labels(samples: list[Sample], stratify: bool | None) -> tuple[np.ndarray | None, str | None]:
    """Per-sample stratification labels and their kind (``class``/``tumour``), or (None, None).

    ``stratify=None`` keeps the old default of :func:`make_split`: classes only.
    """
    if stratify is False or not samples:
        return None, None
    if all(isinstance(s.target, int) for s in samples):
        return np.array([s.target for s in samples]), "class"
    if stratify is None or not all(isinstance(s.target, str) for s in samples):
        return None, None
    positive = tumour_groups(samples)
    if positive is None:
        return None, None
    return np.array([int(positive[s.group]) for s in samples]), "tumour"


def _subset_labels(samples: list[Sample], subset: list[Sample], y: np.ndarray | None):
    if y is None:
        return None
    pos = {s.id: i for i, s in enumerate(samples)}
    return y[[pos[s.id] for s in subset]]


def make_split(
    samples: list[Sample],
    val_fraction: float,
    test_fraction: float = 0.0,
    seed: int = 0,
    stratify: bool | None = None,
) -> dict:
    """Split samples into train/val(/test) by group and return the manifest.

    Samples whose layout already marks them ``Testing`` form the test split; otherwise
    ``test_fraction`` of the groups is held out first. ``val_fraction`` of the remaining groups
    becomes the validation split.

    Args:
        stratify: ``None`` (default): stratify classification on the class, not segmentation;
            ``True``: classes, or for masks whether the group has tumour; ``False``: never.
            Falls back to an unstratified group split (logged) when a label has too few groups.

    Raises:
        DataError: fewer than two groups to split, or (a bug) a group on both sides.
    """
    y, kind = _labels(samples, stratify)
    preset_test = [s for s in samples if s.split == "Testing"]
    pool = [s for s in samples if s.split != "Testing"]
    test = preset_test
    if not preset_test and test_fraction > 0:
        pool, test, _ = _group_split(pool, test_fraction, seed, _subset_labels(samples, pool, y))
    train, val, stratified = _group_split(
        pool,
        val_fraction / (1.0 - (test_fraction if not preset_test else 0)),
        seed + 1,
        _subset_labels(samples, pool, y),
    )
    manifest = {
        "version": MANIFEST_VERSION,
        "method": "stratified_group" if kind else "group_shuffle",
        "stratify": kind,
        "stratified": stratified,
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
        "hashes": _hashes(samples),
    }
    check_no_leak(manifest, samples)
    manifest["hash"] = _manifest_hash(manifest)
    return manifest


def make_kfold(
    samples: list[Sample],
    k: int,
    seed: int = 0,
    test_fraction: float = 0.0,
    stratify: bool = True,
) -> dict:
    """K group-disjoint folds (and an optional held-out test split); returns the manifest.

    Samples marked ``Testing`` by the layout are the test split; otherwise ``test_fraction`` of
    the groups is held out first (stratified like the folds). The other groups are dealt into
    ``k`` folds with :class:`~sklearn.model_selection.StratifiedGroupKFold` (class index, or
    "group has tumour" for masks) or, when stratification is off or impossible (a label in
    fewer than ``k`` groups, a single label, unreadable masks; the reason is logged),
    :class:`~sklearn.model_selection.GroupKFold`. Fold ``i`` validates on its val groups and
    trains on all other non-test groups. Deterministic for a given seed and sample list.

    Raises:
        DataError: ``k < 2``, or fewer non-test groups than folds.
    """
    if k < 2:
        raise DataError(f"k-fold needs k >= 2, got {k}")
    y, kind = _labels(samples, stratify)
    preset_test = [s for s in samples if s.split == "Testing"]
    pool = [s for s in samples if s.split != "Testing"]
    test = preset_test
    if not preset_test and test_fraction > 0:
        pool, test, _ = _group_split(pool, test_fraction, seed, _subset_labels(samples, pool, y))
    groups = np.array([s.group for s in pool])
    n_groups = len(set(groups.tolist()))
    if n_groups < k:
        raise DataError(
            f"cannot make {k} folds: the {len(pool)} non-test samples form only {n_groups} group(s)"
        )
    y_pool = _subset_labels(samples, pool, y)
    if y_pool is None:
        why = (
            "no labels to stratify on (no targets, or a mask was unreadable)"
            if stratify
            else "stratify=False"
        )
    else:
        why = _can_stratify(y_pool, groups, k)
    idx = np.arange(len(pool))
    if why is None:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + 1)
        parts = list(splitter.split(idx, y_pool, groups))
        method = "stratified_group_kfold"
    else:
        if stratify:
            logger.warning("k-fold by group without stratification: %s", why)
        splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed + 1)
        parts = list(splitter.split(idx, groups=groups))
        method = "group_kfold"
    folds = [
        {"train": [pool[i].id for i in sorted(tr)], "val": [pool[i].id for i in sorted(va)]}
        for tr, va in parts
    ]
    manifest = {
        "version": MANIFEST_VERSION,
        "method": method,
        "stratify": kind if method == "stratified_group_kfold" else None,
        "seed": seed,
        "k": k,
        "test_fraction": test_fraction,
        "splits": {"test": [s.id for s in test]},
        "folds": folds,
        "groups": {"test": sorted({s.group for s in test})},
        "fold_groups": [sorted({groups[i] for i in va}) for _, va in parts],
        "hashes": _hashes(samples),
    }
    check_no_leak(manifest, samples)
    manifest["hash"] = _manifest_hash(manifest)
    return manifest


def _boundaries(manifest: dict) -> list[tuple[str, list[str], str, list[str]]]:
    """Every pair of id lists that must not share a group, with their names."""
    splits = manifest.get("splits", {})
    named = [(name, ids) for name, ids in splits.items()]
    pairs = [
        (a, ia, b, ib) for n, (a, ia) in enumerate(named) for b, ib in named[n + 1 :] if ia and ib
    ]
    for i, fold in enumerate(manifest.get("folds") or []):
        tr, va = (f"fold {i} train", fold.get("train", [])), (f"fold {i} val", fold.get("val", []))
        pairs.append((*tr, *va))
        for name, ids in named:
            pairs.extend([(name, ids, *tr), (name, ids, *va)])
    return pairs


def check_no_leak(manifest: dict, samples: list[Sample]) -> None:
    """Raise if any group is on both sides of a train/val/test or fold boundary.

    Groups are those of ``samples`` (ids the samples lack are ignored).

    Raises:
        DataError: naming the group and the two splits (or folds) that share it.
    """
    group_of = {s.id: s.group for s in samples}
    for a, ids_a, b, ids_b in _boundaries(manifest):
        groups_a = {group_of[i] for i in ids_a if i in group_of}
        shared = groups_a.intersection(group_of[i] for i in ids_b if i in group_of)
        if shared:
            g = sorted(shared)[0]
            more = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
            raise DataError(f"split manifest leaks: group '{g}' is in both '{a}' and '{b}'{more}")


def fold_manifest(cv_manifest: dict, fold: int) -> dict:
    """A plain train/val/test manifest for fold ``fold`` (0-based) of a k-fold manifest.

    Each fold of ``medseg cv`` trains as an ordinary run on this manifest, so training,
    evaluation and export need not know about folds. It records where it came from
    (``cv_hash``, ``fold``) and is sealed with its own hash.
    """
    folds = cv_manifest.get("folds") or []
    if not 0 <= fold < len(folds):
        raise DataError(f"unknown fold {fold}; the manifest has {len(folds)} folds")
    out = {
        k: v
        for k, v in cv_manifest.items()
        if k not in ("folds", "fold_groups", "splits", "groups", "hash")
    }
    out["splits"] = {
        "train": list(folds[fold]["train"]),
        "val": list(folds[fold]["val"]),
        "test": list(cv_manifest.get("splits", {}).get("test", [])),
    }
    out["method"] = f"{cv_manifest.get('method', 'kfold')}:fold{fold + 1}"
    out["cv_hash"] = cv_manifest.get("hash")
    out["fold"] = fold + 1
    out["hash"] = _manifest_hash(out)
    return out


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


def select(
    samples: list[Sample], manifest: dict, split: str, fold: int | None = None
) -> list[Sample]:
    """The samples of one split (or of one fold's ``train``/``val``), in manifest order.

    The manifest is checked for leaks against the samples' groups first (:func:`check_no_leak`).

    Raises:
        DataError: unknown split or fold, a k-fold manifest without ``fold`` for train/val, a
            sample the dataset no longer has, or a group on both sides of a boundary.
    """
    folds = manifest.get("folds")
    if fold is not None:
        if not folds:
            raise DataError(f"fold {fold} requested but the split manifest has no folds")
        if not 0 <= fold < len(folds):
            raise DataError(f"unknown fold {fold}; valid: 0..{len(folds) - 1}")
    if fold is not None and split in folds[fold]:
        ids = folds[fold][split]
        name = f"fold {fold} {split}"
    elif split in manifest["splits"]:
        ids = manifest["splits"][split]
        name = split
    elif folds and split in ("train", "val"):
        raise DataError(f"split '{split}' of a {len(folds)}-fold manifest needs a fold number")
    else:
        valid = list(manifest["splits"]) + (["train", "val"] if folds else [])
        raise DataError(f"unknown split '{split}'; valid: {', '.join(valid)}")
    check_no_leak(manifest, samples)
    by_id = {s.id: s for s in samples}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(
            f"{len(missing)} sample(s) of split '{name}' are missing from the dataset, "
            f"e.g. {missing[0]}"
        )
    return [by_id[i] for i in ids]


def check_manifest_files(samples: list[Sample], manifest: dict) -> list[str]:
    """Ids whose files changed on disk since the manifest was written."""
    cache: dict[str, str] = {}
    return [
        s.id
        for s in samples
        if s.id in manifest["hashes"] and sample_hash(s, cache) != manifest["hashes"][s.id]
    ]
