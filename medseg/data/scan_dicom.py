"""The ``dicom_series`` layout: ``<root>/<patient>/<study>/<series>/*.dcm`` (the TCIA layout).

In each study one image series and one mask series are picked by a substring of their
SeriesDescription or folder name (``image_series``, ``mask_series``); the mask must have a slice at
every position of the image and no other (ImagePositionPatient of :func:`medseg.io.slice_positions`,
within :data:`POSITION_TOLERANCE` of the slice spacing), the same size and orientation; otherwise
the study is reported and skipped, never guessed. One sample per slice: ``image``/``target`` are
the series folders and ``index`` the slice in the order :func:`medseg.io.read_image` gives a series
folder (along the normal), the same in both volumes. The group is the patient folder. Patient ids
from DICOM headers are never put in ids or messages; the patient *folder* name is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.data.samples import (
    Sample,
    ScanProblem,
    ScanResult,
    add_problem,
    entries,
    first_problems,
    relative_id,
    require_dir,
    subdirs,
)
from medseg.errors import ConfigError, DataError
from medseg.io import DicomHeader, is_dicom, list_image_files, read_dicom_header

#: Largest distance between matching image and mask slices, as a fraction of the slice spacing.
POSITION_TOLERANCE = 0.1
# Smallest |cosine| between image and mask row/column directions that counts as the same plane.
_ORIENTATION_COS = 0.999


@dataclass
class _Series:
    folder: Path
    header: DicomHeader | None  # header of the first file (None: a DICOM object without an image)
    files: list[Path]

    @property
    def description(self) -> str:
        """SeriesDescription ('' when absent)."""
        return (self.header.series_description if self.header else None) or ""


def _dicom_files(folder: Path) -> list[Path]:
    return [
        f
        for f in list_image_files(folder, recursive=False)
        if f.suffix.lower() == ".dcm" or is_dicom(f)
    ]


def _read_header(path: Path) -> DicomHeader | None:
    """:func:`medseg.io.read_dicom_header`, its DataError raised as a ScanProblem."""
    try:
        return read_dicom_header(path)
    except DataError as e:
        raise ScanProblem(str(e)) from None


def _plane(series: _Series) -> tuple[tuple[int, int], np.ndarray | None]:
    """(rows, columns) and the 6 direction cosines of the series' first file (None if absent)."""
    header = series.header
    if header is None:
        raise ScanProblem(f"{series.files[0]}: no Rows/Columns (not an image)")
    cosines = np.array(header.orientation, dtype=np.float64) if header.orientation else None
    return header.size, cosines


def _positions(folder: Path) -> np.ndarray:
    """(D, 3) slice positions in the order medseg.io reads the series."""
    from medseg.io import slice_positions

    try:
        return np.asarray(slice_positions(folder), dtype=np.float64).reshape(-1, 3)
    except DataError as e:
        raise ScanProblem(str(e)) from None


def _norm_text(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def _matches(series: _Series, query: str) -> bool:
    q = _norm_text(query)
    return bool(q) and (q in _norm_text(series.description) or q in _norm_text(series.folder.name))


def _pick(candidates: list[_Series], query: str) -> list[_Series]:
    """Narrow several matches to the one whose description or folder *equals* the query."""
    if len(candidates) <= 1:
        return candidates
    q = _norm_text(query)
    exact = [s for s in candidates if q in (_norm_text(s.description), _norm_text(s.folder.name))]
    return exact if len(exact) == 1 else candidates


def _describe_series(series: list[_Series]) -> str:
    return ", ".join(f"'{s.folder.name}' ({s.description or 'no description'})" for s in series)


def _align(image: _Series, mask: _Series, study: Path) -> int:
    """Check that the mask has exactly the image's slices, in the same places; returns the count.

    Positions come from :func:`medseg.io.slice_positions` (the order of the volumes that
    :func:`medseg.io.read_image` / :func:`~medseg.io.read_mask` give), matched in 3D with
    :func:`medseg.io.match_slice_positions` within :data:`POSITION_TOLERANCE` x slice spacing.
    """
    from medseg.io import match_slice_positions

    (img_size, img_cos), (msk_size, msk_cos) = _plane(image), _plane(mask)
    if img_size != msk_size:
        raise ScanProblem(
            f"{study}: mask slices are {msk_size[0]}x{msk_size[1]} but image slices are "
            f"{img_size[0]}x{img_size[1]} (rows x columns)"
        )
    if img_cos is not None and msk_cos is not None:
        row, col = (
            img_cos[:3] / np.linalg.norm(img_cos[:3]),
            img_cos[3:] / np.linalg.norm(img_cos[3:]),
        )
        mrow, mcol = (
            msk_cos[:3] / np.linalg.norm(msk_cos[:3]),
            msk_cos[3:] / np.linalg.norm(msk_cos[3:]),
        )
        if float(row @ mrow) < _ORIENTATION_COS or float(col @ mcol) < _ORIENTATION_COS:
            raise ScanProblem(
                f"{study}: mask and image series have different slice orientations "
                f"(ImageOrientationPatient); study skipped"
            )
    img_pos, msk_pos = _positions(image.folder), _positions(mask.folder)
    steps = np.linalg.norm(np.diff(img_pos, axis=0), axis=1)
    spacing = float(np.median(steps)) if len(steps) else 1.0
    tol = POSITION_TOLERANCE * spacing if spacing > 0 else 1e-3
    mask_on_image = match_slice_positions(img_pos, msk_pos, tol)
    image_on_mask = match_slice_positions(msk_pos, img_pos, tol)
    if (mask_on_image < 0).any() or (image_on_mask < 0).any():
        normal = np.cross(img_cos[:3], img_cos[3:]) if img_cos is not None else None

        def where(points: np.ndarray) -> str:
            return f"{float(points @ normal):.2f} mm" if normal is not None else str(points)

        parts = []
        if (mask_on_image < 0).any():
            k = int((mask_on_image < 0).sum())
            parts.append(
                f"{k} mask slice(s) at positions the image lacks "
                f"(e.g. {where(msk_pos[mask_on_image < 0][0])})"
            )
        if (image_on_mask < 0).any():
            k = int((image_on_mask < 0).sum())
            parts.append(
                f"{k} image slice(s) without a mask slice "
                f"(e.g. {where(img_pos[image_on_mask < 0][0])})"
            )
        raise ScanProblem(
            f"{study}: mask and image slices are not aligned ({'; '.join(parts)}; "
            f"tolerance {tol:.3g} mm); study skipped"
        )
    if not np.array_equal(mask_on_image, np.arange(len(img_pos))):  # pragma: no cover
        raise ScanProblem(f"{study}: mask slices are in a different order than image slices")
    return len(img_pos)


def scan_dicom_series(
    root: str | Path,
    strict: bool = False,
    image_series: str = "",
    mask_series: str = "MaskTumor",
    slice_axis: int = 0,
) -> ScanResult:
    """Scan ``<root>/<patient>/<study>/<series>/*.dcm``: one sample per image slice.

    Args:
        root: dataset folder.
        strict: raise on the first problem instead of collecting it.
        image_series: substring (case and punctuation ignored) of the image series'
            SeriesDescription or folder name, e.g. ``T1post``. Empty: the one series of the study
            that is not the mask.
        mask_series: substring of the mask series' description or folder name, e.g.
            ``MaskTumor`` (matches ``Mask_Tumor`` too).
        slice_axis: axis of the volume the 2D samples are cut along (see
            :func:`medseg.data.volumes.reslice`).
    """
    root = Path(root)
    require_dir(root)
    if not _norm_text(mask_series):
        raise ConfigError("data.mask_series: empty; name the mask series, e.g. 'MaskTumor'")
    result = ScanResult(root=root, layout="dicom_series", samples=[])
    for patient in subdirs(root):
        studies = subdirs(patient)
        if not studies:
            add_problem(result, f"{patient}: no study folders (<patient>/<study>/<series>)", strict)
        for study in studies:
            try:
                result.samples.extend(
                    _scan_study(root, patient, study, image_series, mask_series, slice_axis)
                )
            except ScanProblem as e:
                add_problem(result, str(e), strict)
    if not result.samples:
        raise DataError(
            f"{root}: no aligned image/mask series found in the 'dicom_series' layout "
            f"(<patient>/<study>/<series>/*.dcm){first_problems(result)}"
        )
    return result


def _scan_study(
    root: Path,
    patient: Path,
    study: Path,
    image_series: str,
    mask_series: str,
    slice_axis: int = 0,
) -> list[Sample]:
    series = []
    for folder in subdirs(study):
        files = _dicom_files(folder)
        if files:
            series.append(_Series(folder, _read_header(files[0]), files))
    if not series:
        raise ScanProblem(f"{study}: no series folders with DICOM files")
    masks = _pick([s for s in series if _matches(s, mask_series)], mask_series)
    if len(masks) != 1:
        raise ScanProblem(
            f"{study}: {'several' if masks else 'no'} series match mask_series '{mask_series}'"
            f" (series: {_describe_series(masks or series)})"
        )
    others = [s for s in series if s is not masks[0]]
    if _norm_text(image_series):
        images = _pick([s for s in others if _matches(s, image_series)], image_series)
    else:
        images = others
    if len(images) != 1:
        what = f"match image_series '{image_series}'" if image_series else "could be the image"
        raise ScanProblem(
            f"{study}: {'several' if images else 'no'} series {what}"
            f" (series: {_describe_series(images or others)}); set data.image_series"
        )
    image, mask = images[0], masks[0]
    n = _align(image, mask, study)
    if slice_axis:
        rows_cols, _ = _plane(image)
        n = rows_cols[slice_axis - 1]
    rel = relative_id(image.folder, root)
    return [
        Sample(
            id=f"{rel}#{i}",
            image=str(image.folder),
            target=str(mask.folder),
            group=patient.name,
            index=i,
        )
        for i in range(n)
    ]


def has_dicom(folder: Path, limit: int = 5) -> bool:
    """Whether ``folder`` holds a DICOM file among its first ``limit`` visible files."""
    checked = 0
    for f in entries(folder):
        if not f.is_file() or f.name.startswith("."):
            continue
        if f.suffix.lower() == ".dcm" or is_dicom(f):
            return True
        checked += 1
        if checked >= limit:
            return False
    return False
