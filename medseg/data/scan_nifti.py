"""The ``nifti`` layout: ``<root>/images/<case>.nii[.gz]`` + ``<root>/labels/<case>.nii[.gz]``.

nnU-Net's ``imagesTr/<case>_0000.nii.gz`` + ``labelsTr/<case>.nii.gz`` is read too. One sample
per slice along the first axis of the volume as :mod:`medseg.io` returns it (or along
``slice_axis``), counted from the headers alone; the group is the case.
"""

from __future__ import annotations

import re
from pathlib import Path

from medseg.data.samples import (
    Sample,
    ScanProblem,
    ScanResult,
    add_problem,
    entries,
    first_problems,
    relative_id,
    require_dir,
)
from medseg.errors import DataError

NIFTI_FOLDERS = (("images", "labels"), ("imagesTr", "labelsTr"))
_NNUNET_CHANNEL = re.compile(r"^(.*)_(\d{4})$")
#: medseg.io reads a NIfTI volume as (slice, row, col) = canonical (RAS) axes (k, j, i), so
#: axis ``a`` of the array the reader returns is canonical axis ``2 - a``.
NIFTI_SLICE_AXIS = 2


def _nifti_stem(path: Path) -> str | None:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def nifti_files(folder: Path) -> dict[str, Path]:
    """The visible ``.nii``/``.nii.gz`` files of ``folder`` by their name without the suffix."""
    out = {}
    for f in entries(folder):
        stem = _nifti_stem(f)
        if stem and f.is_file() and not f.name.startswith("."):
            out[stem] = f
    return out


def _canonical_shape(path: Path) -> tuple[int, ...]:
    """Spatial shape (3 axes) after reorientation to the closest canonical (RAS) axes."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(d) for d in img.shape)
    except Exception as e:  # nibabel raises several types for broken files
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ScanProblem(f"{path}: unreadable NIfTI header ({reason})") from None
    if len(shape) == 4 and shape[3] == 1 or len(shape) == 5 and shape[3:] == (1, 1):
        shape = shape[:3]
    if len(shape) not in (3, 4):
        raise ScanProblem(f"{path}: expected a 3D volume (or 3D + channels), shape is {shape}")
    if 0 in shape:
        raise ScanProblem(f"{path}: NIfTI image is empty (shape {shape})")
    try:
        ornt = nib.io_orientation(img.affine)
        targets = [int(target) for target, _flip in ornt[:3]]
    except Exception:  # NaN or singular affine
        raise ScanProblem(
            f"{path}: NIfTI affine is singular or not finite; the header is corrupt"
        ) from None
    canonical = [0, 0, 0]
    for axis, target in enumerate(targets):
        canonical[target] = shape[axis]
    return tuple(canonical)


def scan_nifti(root: str | Path, strict: bool = False, slice_axis: int = 0) -> ScanResult:
    """Scan ``images/`` + ``labels/`` (or ``imagesTr/`` + ``labelsTr/``) NIfTI volumes.

    One sample per slice along ``slice_axis`` of the volume as :func:`medseg.io.read_image`
    returns it (0: axial), counted from the header alone.
    """
    root = Path(root)
    require_dir(root)
    pairs = [(root / i, root / m) for i, m in NIFTI_FOLDERS if (root / i).is_dir()]
    if not pairs:
        raise DataError(
            f"{root}: folder not found (the 'nifti' layout needs images/ + labels/ or "
            f"imagesTr/ + labelsTr/)"
        )
    result = ScanResult(root=root, layout="nifti", samples=[])
    cases: list[tuple[str, Path, Path, tuple[int, ...]]] = []
    for img_dir, lbl_dir in pairs:
        if not lbl_dir.is_dir():
            raise DataError(f"{lbl_dir}: folder not found (labels for {img_dir.name}/)")
        labels = nifti_files(lbl_dir)
        used = set()
        for stem, f in nifti_files(img_dir).items():
            case, channel = stem, 0
            m = _NNUNET_CHANNEL.match(stem)
            if stem not in labels and m and m.group(1) in labels:
                case, channel = m.group(1), int(m.group(2))
            if case not in labels:
                add_problem(result, f"{f}: image has no label in {lbl_dir}", strict)
                continue
            if channel:
                add_problem(result, f"{f}: extra channel file ignored (only _0000 is read)", strict)
                continue
            used.add(case)
            try:
                shape = _canonical_shape(f)
                lshape = _canonical_shape(labels[case])
            except ScanProblem as e:
                add_problem(result, str(e), strict)
                continue
            if shape[:3] != lshape[:3]:
                add_problem(
                    result,
                    f"{labels[case]}: label shape {lshape} differs from image shape "
                    f"{shape[:3]} ({f.name})",
                    strict,
                )
                continue
            cases.append((case, f, labels[case], shape))
        for case in sorted(set(labels) - used):
            add_problem(result, f"{labels[case]}: label has no image in {img_dir}", strict)
    for case, f, label, shape in cases:
        depth = shape[NIFTI_SLICE_AXIS - slice_axis]
        rel = relative_id(f, root)
        result.samples.extend(
            Sample(id=f"{rel}#{i}", image=str(f), target=str(label), group=case, index=i)
            for i in range(depth)
        )
    if not result.samples:
        raise DataError(f"{root}: no image/label volume pairs found{first_problems(result)}")
    return result
