"""The ``msd`` layout: a ``dataset.json`` with ``imagesTr/`` and ``labelsTr/`` (MSD, nnU-Net).

One :class:`~medseg.data.samples.Sample` per case: the whole volume, not its slices.

* ``id`` and ``group``: the case id (MSD has no patient ids: each case is its own group);
* ``image``: the case's image file, or for one file per channel (``_0000`` ... ``_000N``) the
  files joined with :data:`os.pathsep` (:func:`sample_images` splits them again);
* ``target``: the label file; ``index``: None.

The result is a :class:`MsdScanResult`: a :class:`~medseg.data.samples.ScanResult` that also
carries the :class:`~medseg.io.msd.DatasetDescription` (label names, channel names, modality and
the :class:`~medseg.io.msd.MsdCase` of every sample, by case id), so that training can read a
sample's channels with :func:`medseg.io.msd.read_case_image`. :func:`describe` reads the
description alone.

Cases whose label shape differs from the image shape, or whose channel count differs from
``dataset.json``'s, are problems (raised with ``strict``), checked from the NIfTI headers alone.
A malformed ``dataset.json`` or a missing listed file always raises.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medseg.data.samples import Sample, ScanResult, add_problem, first_problems, require_dir
from medseg.errors import DataError
from medseg.io.msd import (
    DatasetDescription,
    MsdCase,
    header_shape,
    read_case_shape,
    read_dataset_json,
)


@dataclass
class MsdScanResult(ScanResult):
    """A :class:`ScanResult` with the dataset's description.

    Attributes:
        description: what ``dataset.json`` says (labels, channels, modality, cases); only the
            cases that became samples are in :attr:`cases`.
    """

    description: DatasetDescription | None = None

    @property
    def cases(self) -> dict[str, MsdCase]:
        """The usable cases by case id (the samples' ``id``/``group``)."""
        if self.description is None:
            return {}
        ids = {s.id for s in self.samples}
        return {c.case_id: c for c in self.description.cases if c.case_id in ids}

    def case(self, sample: Sample) -> MsdCase:
        """The :class:`MsdCase` of one of this result's samples.

        Raises:
            DataError: the sample is not one of this dataset's cases.
        """
        found = self.cases.get(sample.id)
        if found is None:
            raise DataError(f"{self.root}: sample {sample.id} is not a case of this dataset")
        return found


def describe(root: str | Path) -> DatasetDescription:
    """The :class:`~medseg.io.msd.DatasetDescription` of the dataset at ``root``."""
    return read_dataset_json(root)


def sample_images(sample: Sample) -> tuple[Path, ...]:
    """The image file(s) of an ``msd`` sample, one per channel file (see the module docstring)."""
    return tuple(Path(p) for p in sample.image.split(os.pathsep))


def scan_msd(root: str | Path, strict: bool = False) -> MsdScanResult:
    """Scan an MSD/nnU-Net dataset folder: one sample per labelled case.

    Args:
        root: the folder holding ``dataset.json``.
        strict: raise on the first unusable case instead of listing it in ``problems``.

    Raises:
        DataError: the folder or ``dataset.json`` is missing or malformed, a listed file is
            missing, no case is usable, or (strict) a case's shapes disagree.
    """
    root = Path(root)
    require_dir(root)
    description = read_dataset_json(root)
    result = MsdScanResult(root=root, layout="msd", samples=[], description=description)
    n_channels = description.n_channels
    for case in description.cases:
        if case.label is None:
            add_problem(result, f"{case.images[0]}: case {case.case_id} has no label", strict)
            continue
        try:
            shape, channels = read_case_shape(case)
            label_shape, _ = header_shape(case.label)
        except DataError as e:
            add_problem(result, str(e), strict)
            continue
        if channels != n_channels:
            add_problem(
                result,
                f"{case.images[0]}: case {case.case_id} has {channels} channel(s), dataset.json "
                f"declares {n_channels}",
                strict,
            )
            continue
        if label_shape != shape:
            add_problem(
                result,
                f"{case.label}: label shape {label_shape} differs from image shape {shape}",
                strict,
            )
            continue
        result.samples.append(
            Sample(
                id=case.case_id,
                image=os.pathsep.join(str(p) for p in case.images),
                target=str(case.label),
                group=case.case_id,
            )
        )
    if not result.samples:
        raise DataError(f"{root}: no usable labelled case in dataset.json{first_problems(result)}")
    return result
