"""Datasets described by a ``dataset.json``: Medical Segmentation Decathlon and nnU-Net style.

Two dialects are read (:func:`read_dataset_json`):

* **MSD** (and nnU-Net v1): ``"modality": {"0": "MRI"}``, ``"labels": {"0": "background",
  "1": "Anterior"}`` and ``"training": [{"image": "./imagesTr/x.nii.gz", "label":
  "./labelsTr/x.nii.gz"}, ...]``. The listed image is either one file (3D, or 4D whose 4th axis
  holds the channels, as the Decathlon ships BraTS and Prostate) or, as nnU-Net v1 converted
  datasets store it, one file per channel next to the listed name: ``x_0000.nii.gz`` ...
  ``x_000N.nii.gz``.
* **nnU-Net v2**: ``"channel_names": {"0": "T2"}``, ``"labels": {"background": 0, "x": 1}``,
  ``"file_ending": ".nii.gz"`` and no ``training`` list: the cases are the files
  ``imagesTr/<case>_<4 digits><file_ending>`` with their labels in
  ``labelsTr/<case><file_ending>``.

Labels must be numbered 0..N with 0 the background; nnU-Net v2's region-based labels (lists)
and its ``ignore`` label are refused. Every listed file must exist. Any problem raises
:class:`~medseg.errors.DataError` with one line naming ``dataset.json`` (or the file) and what is
wrong.

A case's channels are read with :func:`read_case_image` (a 4D file gives its channels; several
files are stacked on the channel axis after checking that their shapes and affines agree), its
label map with :func:`read_case_labels`. Both use :mod:`medseg.io.nifti`, so the arrays are in
the (slice, row, col) convention of every medseg reader.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.errors import DataError
from medseg.io.base import Image
from medseg.io.nifti import read_nifti_image, read_nifti_mask

logger = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
DEFAULT_FILE_ENDING = ".nii.gz"

# Channel names that mean a magnetic resonance image (matched per word, case-insensitively).
_MR_NAMES = re.compile(
    r"\b(MRI?|T1\w*|T2\w*|FLAIR|ADC|DWI|PD\w*|SWI|DCE|BOLD|CINE|DIXON|HBV|NMR|MAGNETIC)\b",
    re.IGNORECASE,
)
_CT_NAMES = re.compile(r"\bCT\b", re.IGNORECASE)
_CHANNEL_SUFFIX = re.compile(r"^(.+)_(\d{4})$")
# Relative tolerance when comparing the affines of a case's channel files (mm and direction).
_AFFINE_TOLERANCE = 1e-3


@dataclass
class MsdCase:
    """One case of a ``dataset.json`` dataset.

    Attributes:
        case_id: the file name without its channel suffix and file ending (``hippocampus_001``).
        images: one file per channel (``<case>_0000`` ... ``_000N``), or one 3D or 4D file.
        label: the label map file, or None (unlabelled case).
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass
class DatasetDescription:
    """What a ``dataset.json`` says, with the cases found on disk.

    Attributes:
        root: the dataset folder (where ``dataset.json`` is).
        name: the dataset's name (the folder name when the file has none).
        labels: label number -> name, 0..N, 0 the background.
        channels: channel number -> name (``{0: "MRI"}``).
        cases: the training cases, sorted by case id.
        file_ending: ``.nii.gz`` (or the nnU-Net v2 ``file_ending``).
        modality: ``"CT"`` when a channel is CT, ``"MR"`` when the channels are MR sequences,
            else the first channel's name.
    """

    root: Path
    name: str
    labels: dict[int, str]
    channels: dict[int, str]
    cases: list[MsdCase]
    file_ending: str
    modality: str = ""

    @property
    def num_classes(self) -> int:
        """Classes of a softmax head: the labels, background included."""
        return len(self.labels)

    @property
    def n_channels(self) -> int:
        """Channels of every case."""
        return len(self.channels)


def read_dataset_json(root: str | Path) -> DatasetDescription:
    """Read ``<root>/dataset.json`` (MSD or nnU-Net v2) and find its cases.

    Args:
        root: the dataset folder, or the ``dataset.json`` file itself.

    Returns:
        The description, cases sorted by id.

    Raises:
        DataError: missing or malformed ``dataset.json``, missing keys, labels or channels not
            numbered 0..N, or a listed (or needed) image or label file that does not exist.
    """
    root = Path(root)
    path = root if root.name == DATASET_JSON and root.is_file() else root / DATASET_JSON
    root = path.parent
    raw = _load_json(path)
    channels = _parse_channels(path, raw)
    labels = _parse_labels(path, raw)
    ending = raw.get("file_ending", DEFAULT_FILE_ENDING)
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DataError(f"{path}: 'file_ending' must be a suffix such as '.nii.gz', got {ending!r}")
    if "training" in raw:
        cases = _listed_cases(path, raw["training"], len(channels), ending)
    else:
        cases = _found_cases(path, len(channels), ending)
    if not cases:
        raise DataError(f"{path}: no training cases (empty 'training' list or imagesTr/)")
    declared = raw.get("numTraining")
    if isinstance(declared, int) and declared != len(cases):
        logger.warning("%s: numTraining is %d but %d cases were found", path, declared, len(cases))
    name = raw.get("name")
    description = DatasetDescription(
        root=root,
        name=str(name) if name else root.name,
        labels=labels,
        channels=channels,
        cases=sorted(cases, key=lambda c: c.case_id),
        file_ending=ending,
        modality=modality_of(channels),
    )
    logger.debug("%s: %d cases, %d channels, labels %s", path, len(cases), len(channels), labels)
    return description


def read_dataset_labels(path: str | Path) -> dict[int, str]:
    """Only the ``labels`` of a ``dataset.json`` file (MSD or nnU-Net v2 style), for folders of
    label maps that have no images beside them (a prediction or evaluation folder).

    Raises:
        DataError: the file is missing or malformed, or its labels are (as
            :func:`read_dataset_json`).
    """
    path = Path(path)
    return _parse_labels(path, _load_json(path))


def modality_of(channels: dict[int, str]) -> str:
    """``"CT"`` when any channel name is CT, ``"MR"`` for MR sequence names, else the first name."""
    names = [channels[k] for k in sorted(channels)]
    if any(_CT_NAMES.search(n) for n in names):
        return "CT"
    if names and all(_MR_NAMES.search(n) for n in names):
        return "MR"
    return names[0] if names else ""


def read_case_image(case: MsdCase, n_channels: int) -> Image:
    """Read every channel of ``case`` as one DxHxWxC float32 :class:`Image`.

    Args:
        case: the case (one 3D/4D file, or one file per channel).
        n_channels: the channels ``dataset.json`` declares.

    Raises:
        DataError: unreadable file, channel files whose shapes or affines differ, a channel file
            that holds several channels, or a channel count other than ``n_channels``.
    """
    first = read_nifti_image(case.images[0])
    if len(case.images) == 1:
        image = first
    else:
        arrays = [first.array]
        for path in case.images[1:]:
            other = read_nifti_image(path)
            _check_same_geometry(case.images[0], first, path, other)
            arrays.append(other.array)
        if any(a.shape[-1] != 1 for a in arrays):
            raise DataError(
                f"{case.images[0]}: case {case.case_id} has one file per channel, but a file "
                f"holds several channels ({[a.shape[-1] for a in arrays]})"
            )
        extra = dict(first.meta.extra, channels_from="files")
        meta = replace(
            first.meta,
            source=tuple(str(p) for p in case.images),
            photometric=None,
            extra=extra,
        )
        image = Image(array=np.concatenate(arrays, axis=-1), meta=meta)
    channels = image.array.shape[-1]
    if channels != n_channels:
        raise DataError(
            f"{case.images[0]}: case {case.case_id} has {channels} channel(s), dataset.json "
            f"declares {n_channels}"
        )
    return image


def read_case_labels(case: MsdCase, labels: dict[int, str]) -> np.ndarray:
    """The label map of ``case`` as uint8 DxHxW (same orientation as :func:`read_case_image`).

    Raises:
        DataError: the case has no label file, the file is unreadable, or it holds values that
            are not integers or not in ``labels`` (the message lists them).
    """
    if case.label is None:
        raise DataError(f"case {case.case_id}: no label file")
    values = read_nifti_mask(case.label)
    if np.issubdtype(values.dtype, np.floating):
        rounded = np.round(values)
        if not np.all(np.isfinite(values)) or not np.array_equal(rounded, values):
            raise DataError(f"{case.label}: label values are not integers")
        values = rounded.astype(np.int64)
    present = np.unique(values)
    unknown = sorted(int(v) for v in present if int(v) not in labels)
    if unknown:
        raise DataError(
            f"{case.label}: label values {unknown[:10]} are not in dataset.json's labels "
            f"{sorted(labels)}"
        )
    return values.astype(np.uint8)


def read_case_shape(case: MsdCase) -> tuple[tuple[int, int, int], int]:
    """The (D, H, W) shape of ``case``'s image as :func:`read_case_image` returns it, and its
    channels, from the NIfTI headers alone (no voxel data is read).

    Raises:
        DataError: a header is unreadable or not 3D/4D, or the channel files' shapes differ.
    """
    shapes = [header_shape(p) for p in case.images]
    spatial = shapes[0][0]
    for path, (other, _) in zip(case.images[1:], shapes[1:], strict=True):
        if other != spatial:
            raise DataError(
                f"{path}: shape {other} differs from {case.images[0].name}'s {spatial} "
                f"(channels of one case must share their grid)"
            )
    channels = sum(c for _, c in shapes)
    return spatial, channels


def header_shape(path: Path) -> tuple[tuple[int, int, int], int]:
    """(D, H, W) in medseg's array order and the channel count of a NIfTI file, from its header.

    Raises:
        DataError: the header is unreadable, not 3D/4D or its affine is singular.
    """
    try:
        img = nib.load(str(path))
        shape = tuple(int(d) for d in img.shape)
        ornt = nib.io_orientation(img.affine)
    except Exception as e:  # nibabel raises several types for broken files
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataError(f"{path}: unreadable NIfTI header ({reason})") from None
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (3, 4):
        raise DataError(f"{path}: expected a 3D volume (or 3D + channels), shape is {shape}")
    canonical = [0, 0, 0]
    for axis, (target, _flip) in enumerate(ornt[:3]):
        canonical[int(target)] = shape[axis]
    channels = shape[3] if len(shape) == 4 else 1
    return (canonical[2], canonical[1], canonical[0]), channels


# --------------------------------------------------------------------------- parsing


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: file not found (an MSD/nnU-Net dataset needs a dataset.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the file ({e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _numbered(path: Path, key: str, raw: Any) -> dict[int, str]:
    """``{"0": "MRI", "1": "T2"}`` -> ``{0: "MRI", 1: "T2"}``, numbered 0..N."""
    if not isinstance(raw, dict) or not raw:
        raise DataError(f'{path}: \'{key}\' must be a non-empty object such as {{"0": "MRI"}}')
    out: dict[int, str] = {}
    for k, v in raw.items():
        if not str(k).strip().isdigit() or not isinstance(v, str):
            raise DataError(f"{path}: '{key}' entry {k!r}: {v!r} is not a number -> name")
        out[int(k)] = v
    if sorted(out) != list(range(len(out))):
        raise DataError(f"{path}: '{key}' numbers {sorted(out)} are not 0..{len(out) - 1}")
    return dict(sorted(out.items()))


def _parse_channels(path: Path, raw: dict[str, Any]) -> dict[int, str]:
    for key in ("channel_names", "modality"):
        if key in raw:
            return _numbered(path, key, raw[key])
    raise DataError(f"{path}: missing key 'modality' (MSD) or 'channel_names' (nnU-Net v2)")


def _parse_labels(path: Path, raw: dict[str, Any]) -> dict[int, str]:
    if "labels" not in raw:
        raise DataError(f"{path}: missing key 'labels'")
    labels = raw["labels"]
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: 'labels' must be a non-empty object")
    if all(isinstance(v, str) for v in labels.values()):  # MSD: {"0": "background"}
        out = _numbered(path, "labels", labels)
    else:  # nnU-Net v2: {"background": 0}
        out = {}
        for name, value in labels.items():
            if isinstance(value, list | tuple):
                raise DataError(
                    f"{path}: label '{name}' is a region {value}; region-based labels are not "
                    f"supported"
                )
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataError(f"{path}: label '{name}' has value {value!r}, expected a number")
            if name == "ignore":
                raise DataError(f"{path}: the nnU-Net 'ignore' label is not supported")
            if value in out:
                raise DataError(f"{path}: labels '{out[value]}' and '{name}' share value {value}")
            out[value] = name
        out = dict(sorted(out.items()))
        if sorted(out) != list(range(len(out))):
            raise DataError(f"{path}: 'labels' numbers {sorted(out)} are not 0..{len(out) - 1}")
    if len(out) < 2:
        raise DataError(f"{path}: 'labels' needs the background (0) and at least one structure")
    return out


def _strip_ending(name: str, ending: str) -> str | None:
    if name.lower().endswith(ending.lower()) and len(name) > len(ending):
        return name[: -len(ending)]
    return None


def _listed_cases(path: Path, training: Any, n_channels: int, ending: str) -> list[MsdCase]:
    """Cases of an MSD ``training`` list."""
    root = path.parent
    if not isinstance(training, list):
        raise DataError(f"{path}: 'training' must be a list of {{image, label}} objects")
    cases = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise DataError(f"{path}: training entry {i} has no 'image' file name")
        listed = root / entry["image"]
        case_id = _strip_ending(listed.name, ending) or listed.name.split(".")[0]
        images = _listed_images(path, listed, case_id, n_channels, ending)
        label = entry.get("label")
        if label is not None and not isinstance(label, str):
            raise DataError(f"{path}: training entry {i} has a 'label' that is not a file name")
        label_path = (root / label) if label else None
        if label_path is not None and not label_path.is_file():
            raise DataError(f"{path}: listed label {label} does not exist")
        cases.append(MsdCase(case_id=case_id, images=images, label=label_path))
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"{path}: cases listed twice in 'training': {twice[:5]}")
    return cases


def _listed_images(
    path: Path, listed: Path, case_id: str, n_channels: int, ending: str
) -> tuple[Path, ...]:
    """The listed file itself, or its ``_0000 ... _000N`` channel files (nnU-Net v1)."""
    if listed.is_file():
        return (listed,)
    channel_files = tuple(listed.parent / f"{case_id}_{c:04d}{ending}" for c in range(n_channels))
    missing = [p for p in channel_files if not p.is_file()]
    if not missing:
        return channel_files
    rel = listed.relative_to(path.parent).as_posix()
    if len(missing) < len(channel_files):
        raise DataError(
            f"{path}: channel file {missing[0].name} of listed image {rel} does not exist"
        )
    raise DataError(f"{path}: listed image {rel} does not exist (nor {channel_files[0].name})")


def _found_cases(path: Path, n_channels: int, ending: str) -> list[MsdCase]:
    """nnU-Net v2: the cases are the ``imagesTr/<case>_<4 digits><ending>`` files."""
    root = path.parent
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DataError(f"{path}: no 'training' list and no imagesTr/ folder next to it")
    found: dict[str, dict[int, Path]] = {}
    for f in sorted(images_dir.iterdir()):
        stem = _strip_ending(f.name, ending)
        if stem is None or f.name.startswith(".") or not f.is_file():
            continue
        m = _CHANNEL_SUFFIX.match(stem)
        if m is None:
            raise DataError(
                f"{path}: imagesTr/{f.name} is not named <case>_<4 digits>{ending} (nnU-Net v2)"
            )
        found.setdefault(m.group(1), {})[int(m.group(2))] = f
    cases = []
    for case_id, files in sorted(found.items()):
        if sorted(files) != list(range(n_channels)):
            want = [f"{case_id}_{c:04d}{ending}" for c in range(n_channels) if c not in files]
            extra = sorted(c for c in files if c >= n_channels)
            problem = f"missing {want[0]}" if want else f"extra channel(s) {extra}"
            raise DataError(
                f"{path}: case {case_id} in imagesTr/: {problem} ({n_channels} channel(s) declared)"
            )
        label = labels_dir / f"{case_id}{ending}"
        if not label.is_file():
            raise DataError(f"{path}: label labelsTr/{label.name} of case {case_id} does not exist")
        images = tuple(files[c] for c in range(n_channels))
        cases.append(MsdCase(case_id=case_id, images=images, label=label))
    return cases


def _check_same_geometry(path_a: Path, a: Image, path_b: Path, b: Image) -> None:
    if a.array.shape[:3] != b.array.shape[:3]:
        raise DataError(
            f"{path_b}: shape {b.array.shape[:3]} differs from {path_a.name}'s "
            f"{a.array.shape[:3]} (channels of one case must share their grid)"
        )
    affine_a = np.asarray(a.meta.affine, dtype=np.float64)
    affine_b = np.asarray(b.meta.affine, dtype=np.float64)
    scale = max(1.0, float(np.abs(affine_a).max()))
    if not np.allclose(affine_a, affine_b, rtol=0.0, atol=_AFFINE_TOLERANCE * scale):
        raise DataError(
            f"{path_b}: affine differs from {path_a.name}'s (channels of one case must share "
            f"their grid)"
        )
