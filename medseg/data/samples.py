"""What a dataset scanner produces, and the folder helpers every scanner shares.

* :class:`Sample`: one training or evaluation example (an image or a slice of a volume).
* :class:`ScanResult`: the samples of a dataset folder, its class names and its problems.
* :class:`ScanProblem`: a file or folder a scanner cannot use; the scanner records its message in
  :attr:`ScanResult.problems` (or raises it as :class:`~medseg.errors.DataError` when strict).
* :func:`natural_key`: the sort order of file names (``a_2`` before ``a_10``).

The scanners themselves live in :mod:`medseg.data.scan` (2D layouts, layout detection, grouping),
:mod:`medseg.data.scan_dicom` and :mod:`medseg.data.scan_nifti`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medseg.errors import DataError

logger = logging.getLogger(__name__)


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


class ScanProblem(Exception):
    """A file, series or study cannot be used; the message says why (no patient ids in it)."""


def add_problem(result: ScanResult, message: str, strict: bool) -> None:
    """Record ``message`` in ``result.problems``, or raise it as a DataError when ``strict``."""
    if strict:
        raise DataError(message)
    result.problems.append(message)


def first_problems(result: ScanResult, n: int = 3) -> str:
    """``; problems: a | b | c`` (the first ``n``) for an error message, or ``''`` when none."""
    if not result.problems:
        return ""
    return "; problems: " + " | ".join(result.problems[:n])


def relative_id(path: Path, root: Path) -> str:
    """``path`` relative to the dataset ``root``, with ``/`` separators (a sample id)."""
    return path.relative_to(root).as_posix()


def require_dir(root: Path) -> None:
    """Raise a DataError unless ``root`` is a folder that can be listed."""
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    entries(root)


def entries(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted; a folder that cannot be listed is an error, not empty."""
    try:
        return sorted(folder.iterdir())
    except PermissionError:
        raise DataError(f"{folder}: permission denied; cannot list the folder") from None
    except OSError as e:
        raise DataError(f"{folder}: cannot list the folder ({e.strerror or e})") from None


def subdirs(folder: Path) -> list[Path]:
    """The sub-folders of ``folder`` that are not hidden, sorted."""
    return [p for p in entries(folder) if p.is_dir() and not p.name.startswith(".")]


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically (``a_2`` before ``a_10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
