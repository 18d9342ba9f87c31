"""Hand medseg's leak-free grouped folds to nnU-Net and MONAI.

:func:`grouped_kfold` makes the folds as ``medseg cv`` makes them
(:func:`medseg.data.split.make_kfold`: patient groups, or near-duplicate groups, never split
across folds) and :func:`export_splits` writes them in one of :data:`FORMATS`:

* ``medseg``: medseg's own ``splits.json`` manifest (sealed with its hash).
* ``nnunet``: nnU-Net v2's ``splits_final.json``, a list with one
  ``{"train": [case ids], "val": [case ids]}`` per fold; fold ``k``'s ``val`` holds the cases of
  fold ``k``, its ``train`` every other non-test case. For an MSD / nnU-Net dataset
  (``layout: msd``) the ids are nnU-Net's case identifiers: the image file name without its
  ``_0000`` channel suffix and file ending (``hippocampus_001`` for
  ``imagesTr/hippocampus_001.nii.gz``), which is also medseg's sample id for that layout. Other
  layouts get medseg's sample ids (the image path relative to the dataset root; for the slices of
  a NIfTI volume or DICOM series, the volume's path without the ``#<slice>`` suffix), so their
  nnU-Net conversion must name its cases after these ids.
* ``monai``: a MONAI datalist (``monai.data.load_decathlon_datalist``, Auto3DSeg)::

      {"name": ..., "description": ..., "labels": {"0": "background", ...},
       "modality": {"0": "MRI"}, "numTraining": N,
       "training": [{"image": "imagesTr/x.nii.gz", "label": "labelsTr/x.nii.gz", "fold": 0}, ...],
       "testing": [{"image": "imagesTs/y.nii.gz"}, ...]}

  Paths are relative to the dataset root (pass it as ``base_dir``); a case stored as one file
  per channel has a list of paths as its ``image``. ``testing`` holds the held-out test split of
  the manifest (with labels) and the test images an MSD ``dataset.json`` lists; it is left out
  when there are none. ``labels`` and ``modality`` are written when the dataset says them.

Folds are 0-based, as both tools count them. Every case lands in exactly one fold (or in the
held-out test split); a group on both sides of a fold boundary, or a volume whose slices fall in
different folds (``group_by: none``), raises :class:`~medseg.errors.DataError`. Files are written
atomically and an existing file is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from medseg.data.samples import Sample, ScanResult, natural_key
from medseg.data.scan_msd import MsdScanResult, sample_images
from medseg.data.split import check_no_leak, make_kfold, write_manifest
from medseg.errors import DataError, RunExistsError
from medseg.utils import atomic_write_json

logger = logging.getLogger(__name__)

FORMATS = ("medseg", "nnunet", "monai")
"""What :func:`export_splits` writes."""

DEFAULT_FILE_NAMES = {
    "medseg": "splits.json",
    "nnunet": "splits_final.json",
    "monai": "datalist.json",
}
"""The file name each format is usually given."""

_CHANNEL_SUFFIX = re.compile(r"^(.+)_(\d{4})$")


@dataclass(frozen=True)
class ExportCase:
    """One case of an exported split.

    Attributes:
        id: the case identifier written to nnU-Net's splits (see the module docstring).
        images: the image file(s) (or DICOM series folder), relative to the dataset root, ``/``
            separated; one per channel file.
        label: the label file relative to the root, a class index, or None.
        group: the patient or near-duplicate group.
        fold: the 0-based fold whose validation part holds the case; None: held-out test split.
    """

    id: str
    images: tuple[str, ...]
    label: str | int | None
    group: str
    fold: int | None


def grouped_kfold(
    scan: ScanResult,
    k: int,
    *,
    seed: int = 0,
    test_fraction: float = 0.0,
    stratify: bool | None = None,
) -> dict:
    """K group-disjoint folds of a scanned dataset, as ``medseg cv`` makes them.

    Args:
        scan: the scanned dataset (its samples carry the groups).
        k: number of folds.
        seed: split seed (``medseg cv`` uses ``train.seed``).
        test_fraction: fraction of groups held out as a test split first.
        stratify: stratify the folds on the class or on "group has foreground"
            (:func:`~medseg.data.split.make_kfold`); None: yes, except for ``msd`` volumes,
            which all hold every structure (as ``medseg cv`` does for 3D models).

    Returns:
        The k-fold manifest, with ``layout`` and ``class_names`` added as ``medseg cv`` adds them.

    Raises:
        DataError: ``k < 2`` or fewer groups than folds.
    """
    if stratify is None:
        stratify = scan.layout != "msd"
    manifest = make_kfold(
        scan.samples, k, seed=seed, test_fraction=test_fraction, stratify=stratify
    )
    manifest["class_names"] = scan.class_names
    manifest["layout"] = scan.layout
    return manifest


def _relative(path: str | Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _case_of(sample: Sample, scan: ScanResult, fold: int | None) -> ExportCase:
    """The case a sample belongs to (a slice of a volume belongs to the volume)."""
    if scan.layout == "msd":
        files: tuple[str | Path, ...] = sample_images(sample)
    else:
        files = (sample.image,)
    label = sample.target
    if isinstance(label, str):
        label = _relative(label, scan.root)
    case_id = sample.id.rsplit("#", 1)[0] if sample.index is not None else sample.id
    return ExportCase(
        id=case_id,
        images=tuple(_relative(f, scan.root) for f in files),
        label=label,
        group=sample.group,
        fold=fold,
    )


def _fold_of_ids(manifest: dict, known: set[str]) -> dict[str, int | None]:
    """Sample id -> 0-based validation fold (None: test split), checked against the samples."""
    folds = manifest.get("folds")
    if not folds:
        raise DataError("split manifest has no folds; make it with make_kfold (medseg cv)")
    fold_of: dict[str, int | None] = {}
    for k, fold in enumerate(folds):
        for i in fold.get("val", []):
            if i in fold_of:
                raise DataError(
                    f"split manifest: sample {i} is in the val part of folds {fold_of[i]} and {k}"
                )
            fold_of[i] = k
    for i in manifest.get("splits", {}).get("test", []):
        if i in fold_of:
            raise DataError(f"split manifest: sample {i} is both in fold {fold_of[i]} and in test")
        fold_of[i] = None
    unknown = sorted(set(fold_of) - known)
    if unknown:
        raise DataError(
            f"split manifest: {len(unknown)} sample(s) are not in the dataset, e.g. {unknown[0]}"
        )
    return fold_of


def export_cases(scan: ScanResult, manifest: dict) -> list[ExportCase]:
    """The cases of ``scan`` with the fold the k-fold ``manifest`` gives each, in scan order.

    Slices of one volume (NIfTI, DICOM series) become one case.

    Raises:
        DataError: the manifest has no folds, names samples the scan lacks, leaves a sample out,
            puts a group (or the slices of one volume) in two folds or in a fold and the test
            split.
    """
    check_no_leak(manifest, scan.samples)
    fold_of = _fold_of_ids(manifest, {s.id for s in scan.samples})
    cases: dict[str, ExportCase] = {}
    group_fold: dict[str, int | None] = {}
    for s in scan.samples:
        if s.id not in fold_of:
            raise DataError(f"split manifest: sample {s.id} is in no fold and not in test")
        fold = fold_of[s.id]
        if group_fold.setdefault(s.group, fold) != fold:
            raise DataError(
                f"split manifest leaks: group '{s.group}' is in folds {group_fold[s.group]} "
                f"and {fold}"
            )
        case = _case_of(s, scan, fold)
        seen = cases.setdefault(case.id, case)
        if seen.fold != fold:
            raise DataError(
                f"{case.id}: the slices of this volume are in folds {seen.fold} and {fold} "
                "(group_by 'none' splits volumes; use group_by 'folder')"
            )
    return list(cases.values())


def nnunet_splits(cases: list[ExportCase], k: int) -> list[dict[str, list[str]]]:
    """nnU-Net v2's ``splits_final.json`` content: one ``{"train", "val"}`` per fold.

    Fold ``f``'s ``val`` is the cases of fold ``f``; its ``train`` every other non-test case.
    Ids are sorted in natural order.
    """
    ids = sorted((c for c in cases if c.fold is not None), key=lambda c: natural_key(c.id))
    return [
        {"train": [c.id for c in ids if c.fold != f], "val": [c.id for c in ids if c.fold == f]}
        for f in range(k)
    ]


def _image_entry(case: ExportCase) -> str | list[str]:
    return case.images[0] if len(case.images) == 1 else list(case.images)


def _msd_test_images(scan: MsdScanResult) -> list[str | list[str]]:
    """The test images of an MSD/nnU-Net dataset: ``dataset.json``'s ``test`` list, or the
    ``imagesTs/`` files of an nnU-Net v2 dataset; files that do not exist are skipped (logged)."""
    description = scan.description
    if description is None:
        return []
    root, ending = description.root, description.file_ending
    raw = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    out: list[str | list[str]] = []
    if isinstance(raw.get("test"), list):
        missing = 0
        for entry in raw["test"]:
            name = entry.get("image") if isinstance(entry, dict) else entry
            if not isinstance(name, str):
                continue
            listed = root / name
            stem = listed.name[: -len(ending)] if listed.name.endswith(ending) else listed.stem
            files = (
                [listed]
                if listed.is_file()
                else [
                    listed.parent / f"{stem}_{c:04d}{ending}" for c in range(description.n_channels)
                ]
            )
            if not all(f.is_file() for f in files):
                missing += 1
                continue
            rel = [_relative(f, root) for f in files]
            out.append(rel[0] if len(rel) == 1 else rel)
        if missing:
            logger.warning("%s: %d listed test image(s) do not exist; left out", root, missing)
        return out
    test_dir = root / "imagesTs"
    if not test_dir.is_dir():
        return []
    by_case: dict[str, list[str]] = {}
    for f in sorted(test_dir.iterdir()):
        if not f.name.endswith(ending) or f.name.startswith("."):
            continue
        stem = f.name[: -len(ending)]
        m = _CHANNEL_SUFFIX.match(stem)
        by_case.setdefault(m.group(1) if m else stem, []).append(_relative(f, root))
    return [v[0] if len(v) == 1 else v for _, v in sorted(by_case.items())]


def monai_datalist(scan: ScanResult, manifest: dict, cases: list[ExportCase]) -> dict:
    """A MONAI datalist of ``cases`` with a 0-based ``fold`` key (see the module docstring)."""
    description = scan.description if isinstance(scan, MsdScanResult) else None
    out: dict = {
        "name": description.name if description else scan.root.name,
        "description": (
            f"medseg grouped {manifest.get('k')}-fold split ({manifest.get('method')}, seed "
            f"{manifest.get('seed')}); 'fold' is the 0-based fold whose validation part holds "
            "the case; paths are relative to the dataset root"
        ),
    }
    if description is not None:
        out["labels"] = {str(k): v for k, v in description.labels.items()}
        out["modality"] = {str(k): v for k, v in description.channels.items()}
    elif scan.class_names:
        out["labels"] = {str(i): name for i, name in enumerate(scan.class_names)}
    training, testing = [], []
    for c in cases:
        entry: dict = {"image": _image_entry(c)}
        if c.label is not None:
            entry["label"] = c.label
        if c.fold is None:
            testing.append(entry)
        else:
            training.append({**entry, "fold": c.fold})
    if description is not None:
        testing.extend({"image": image} for image in _msd_test_images(scan))
    out["numTraining"] = len(training)
    out["training"] = training
    if testing:
        out["numTest"] = len(testing)
        out["testing"] = testing
    return out


def fold_counts(cases: list[ExportCase], k: int) -> list[dict]:
    """Per fold (0-based) the number of groups and cases it validates on, then the held-out
    test split when there is one: ``[{"fold": 0, "groups": 2, "cases": 12}, ...,
    {"fold": "test", ...}]``."""
    parts: list[int | None] = [*range(k)]
    if any(c.fold is None for c in cases):
        parts.append(None)
    return [
        {
            "fold": "test" if f is None else f,
            "groups": len({c.group for c in cases if c.fold == f}),
            "cases": sum(c.fold == f for c in cases),
        }
        for f in parts
    ]


def export_splits(
    scan: ScanResult, manifest: dict, fmt: str, out: str | Path, *, overwrite: bool = False
) -> Path:
    """Write the folds of a k-fold ``manifest`` over ``scan`` as ``fmt`` to the file ``out``.

    Args:
        scan: the dataset the manifest was made from (:func:`grouped_kfold`).
        manifest: a k-fold manifest (:func:`grouped_kfold`, or a ``medseg cv`` run's
            ``splits.json``).
        fmt: one of :data:`FORMATS`; ``nnunet`` ids are nnU-Net's case identifiers for the
            ``msd`` layout and medseg's sample ids for the others (see the module docstring).
        out: the file to write.
        overwrite: replace an existing ``out``.

    Returns:
        ``out`` as a Path.

    Raises:
        DataError: unknown format, ``out`` is a folder, nnU-Net splits of a classification
            dataset, or a manifest that does not fit the scan (:func:`export_cases`).
        RunExistsError: ``out`` exists and ``overwrite`` is false.
    """
    out = Path(out)
    if fmt not in FORMATS:
        raise DataError(f"unknown split format '{fmt}'; valid: {', '.join(FORMATS)}")
    if out.is_dir():
        raise DataError(f"{out}: is a folder; give the file to write")
    if out.exists() and not overwrite:
        raise RunExistsError(f"{out}: file exists; pass --overwrite to replace it")
    cases = export_cases(scan, manifest)
    if fmt == "medseg":
        return write_manifest(out, manifest)
    if fmt == "nnunet":
        if any(isinstance(c.label, int) for c in cases):
            raise DataError(
                f"{scan.root}: nnU-Net splits are for segmentation; this is a "
                "classification dataset (use --export monai)"
            )
        if scan.layout != "msd":
            logger.info("%s layout: nnU-Net ids are medseg's sample ids", scan.layout)
        return atomic_write_json(out, nnunet_splits(cases, int(manifest["k"])))
    return atomic_write_json(out, monai_datalist(scan, manifest, cases))
