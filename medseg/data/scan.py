"""Dataset scanners: turn a dataset folder into a list of :class:`Sample`.

Layouts (``data.layout`` in the config):

* ``lgg``: the LGG FLAIR segmentation layout (Buda et al. 2019, Kaggle ``kaggle_3m``):
  ``<root>/<patient>/<name>.tif`` paired with ``<root>/<patient>/<name>_mask.tif``. The group of a
  sample is its patient folder, so no split can put slices of one patient on both sides.
* ``pairs``: ``<root>/images/<stem>.<ext>`` paired with ``<root>/masks/<stem>.<ext>`` (the mask may
  also be named ``<stem>_mask.<ext>``). Each image is its own group.
* ``class_folders``: ``<root>/<class>/*`` or ``<root>/Training/<class>/*`` and
  ``<root>/Testing/<class>/*`` (the Kaggle brain-tumour MRI layout). Class names are the sorted
  folder names. Each image is its own group.

Problems (an image without a mask, a mask without an image, an empty class folder) are collected in
:attr:`ScanResult.problems` with the file names; with ``strict=True`` the first one raises
:class:`~medseg.errors.DataError` instead. Nothing is dropped silently: the caller logs the list.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medseg.errors import DataError
from medseg.io import list_image_files

logger = logging.getLogger(__name__)

MASK_SUFFIX = "_mask"
SPLIT_FOLDERS = ("Training", "Testing")


@dataclass(frozen=True)
class Sample:
    """One training or evaluation example.

    Attributes:
        id: stable id: the image path relative to the dataset root, with ``/`` separators, and
            ``#<index>`` for a slice of a volume.
        image: path of the image file, or of a volume (NIfTI file, DICOM series folder).
        target: mask path or folder (segmentation), class index (classification) or None.
        group: patient or near-duplicate group; all samples of a group stay on one side of a split.
        split: the split the dataset layout put it in (``Training``/``Testing``), if any.
        index: for a slice of a volume, its index along the volume's first axis (the same index
            in the image and the mask volume); None for 2D images.
    """

    id: str
    image: str
    target: str | int | None
    group: str
    split: str | None = None
    index: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScanResult:
    """What a scanner found: samples, class names (classification) and problems."""

    root: Path
    layout: str
    samples: list[Sample]
    class_names: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def log_problems(self) -> None:
        """Log every problem at WARNING level (file names only)."""
        for p in self.problems:
            logger.warning("%s", p)


def _problem(result: ScanResult, message: str, strict: bool) -> None:
    if strict:
        raise DataError(message)
    result.problems.append(message)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _require_dir(root: Path) -> None:
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")


def scan_lgg(root: str | Path, strict: bool = False) -> ScanResult:
    """Scan the LGG layout ``<patient>/<name>.tif`` + ``<name>_mask.tif``."""
    root = Path(root)
    _require_dir(root)
    result = ScanResult(root=root, layout="lgg", samples=[])
    patients = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for patient in patients:
        files = list_image_files(patient, recursive=False)
        masks = {f.stem[: -len(MASK_SUFFIX)]: f for f in files if f.stem.endswith(MASK_SUFFIX)}
        images = {f.stem: f for f in files if not f.stem.endswith(MASK_SUFFIX)}
        for stem in sorted(images, key=_natural_key):
            if stem not in masks:
                _problem(
                    result, f"{images[stem]}: image has no mask ({stem}{MASK_SUFFIX}.*)", strict
                )
                continue
            result.samples.append(
                Sample(
                    id=_rel(images[stem], root),
                    image=str(images[stem]),
                    target=str(masks[stem]),
                    group=patient.name,
                )
            )
        for stem in sorted(set(masks) - set(images)):
            _problem(result, f"{masks[stem]}: mask has no image ({stem}.*)", strict)
    if not result.samples:
        raise DataError(
            f"{root}: no image/mask pairs found in the 'lgg' layout "
            f"(<patient>/<name>.tif + <name>{MASK_SUFFIX}.tif)"
        )
    return result


def scan_pairs(root: str | Path, strict: bool = False) -> ScanResult:
    """Scan ``images/`` + ``masks/`` with matching stems."""
    root = Path(root)
    _require_dir(root)
    img_dir, mask_dir = root / "images", root / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"{d}: folder not found (the 'pairs' layout needs images/ and masks/)")
    result = ScanResult(root=root, layout="pairs", samples=[])
    masks = {}
    for f in list_image_files(mask_dir):
        stem = f.relative_to(mask_dir).with_suffix("").as_posix()
        masks[stem.removesuffix(MASK_SUFFIX)] = f
    seen = set()
    for f in list_image_files(img_dir):
        stem = f.relative_to(img_dir).with_suffix("").as_posix()
        if stem not in masks:
            _problem(result, f"{f}: image has no mask in {mask_dir}", strict)
            continue
        seen.add(stem)
        result.samples.append(
            Sample(id=_rel(f, root), image=str(f), target=str(masks[stem]), group=stem)
        )
    for stem in sorted(set(masks) - seen):
        _problem(result, f"{masks[stem]}: mask has no image in {img_dir}", strict)
    if not result.samples:
        raise DataError(f"{root}: no image/mask pairs found in images/ and masks/")
    return result


def scan_class_folders(root: str | Path, strict: bool = False) -> ScanResult:
    """Scan ``<class>/*`` or ``Training/<class>/*`` + ``Testing/<class>/*``."""
    root = Path(root)
    _require_dir(root)
    split_dirs = [root / s for s in SPLIT_FOLDERS if (root / s).is_dir()]
    bases = [(d, d.name) for d in split_dirs] or [(root, None)]
    class_names = sorted(
        {c.name for base, _ in bases for c in base.iterdir() if c.is_dir() and c.name[0] != "."}
    )
    if len(class_names) < 2:
        raise DataError(
            f"{root}: classification needs at least 2 class folders, found {class_names or 'none'}"
        )
    result = ScanResult(root=root, layout="class_folders", samples=[], class_names=class_names)
    for base, split in bases:
        for index, name in enumerate(class_names):
            folder = base / name
            files = list_image_files(folder) if folder.is_dir() else []
            if not files:
                _problem(result, f"{folder}: class folder is empty or missing", strict)
            for f in files:
                rel = _rel(f, root)
                result.samples.append(
                    Sample(id=rel, image=str(f), target=index, group=rel, split=split)
                )
    if not result.samples:
        raise DataError(f"{root}: no images found in the class folders")
    return result


SCANNERS = {"lgg": scan_lgg, "pairs": scan_pairs, "class_folders": scan_class_folders}


def scan_dataset(root: str | Path, layout: str, strict: bool = False) -> ScanResult:
    """Scan ``root`` with the scanner registered for ``layout``.

    Raises:
        KeyError: unknown layout (the message lists the valid ones).
        DataError: the folder is missing, empty, or (strict) holds an unusable file.
    """
    try:
        scanner = SCANNERS[layout]
    except KeyError:
        raise KeyError(f"unknown layout '{layout}'; valid layouts: {', '.join(SCANNERS)}") from None
    result = scanner(root, strict=strict)
    logger.info(
        "scanned %s (%s): %d samples, %d groups%s",
        root,
        layout,
        len(result.samples),
        len({s.group for s in result.samples}),
        f", {len(result.problems)} problems" if result.problems else "",
    )
    return result


def _natural_key(text: str) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
