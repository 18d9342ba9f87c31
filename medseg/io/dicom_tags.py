"""Small helpers that turn pydicom attribute values into plain Python values.

pydicom values may be missing, empty strings, multi-valued, or garbage in a damaged file; these
helpers never raise on such values and give ``None`` instead. Shared by the DICOM header reader
(:mod:`medseg.io.headers`), the single-file reader (:mod:`medseg.io.dicom`) and the series
reader (:mod:`medseg.io.dicom_series`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID


def floats(value: Any, count: int) -> tuple[float, ...] | None:
    """``value`` as a tuple of exactly ``count`` finite floats, else None."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return values if len(values) == count and all(np.isfinite(values)) else None


def first_float(value: Any) -> float | None:
    """First number of a single or multi-valued attribute, else None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, (str, bytes, int, float)):
        try:
            value = next(iter(value))
        except (TypeError, StopIteration):
            return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def int_or_none(value: Any) -> int | None:
    """:func:`first_float` truncated to an int, else None."""
    number = first_float(value)
    return int(number) if number is not None else None


def str_or_none(value: Any) -> str | None:
    """``value`` as a stripped string; None when absent or blank."""
    text = str(value).strip() if value is not None else ""
    return text or None


def first_line(error: Exception) -> str:
    """The first two lines of an exception's message on one line (its type when empty)."""
    text = " ".join(str(error).split("\n")[:2]).strip()
    return text or type(error).__name__


def functional_value(ds: Dataset, sequence: str, keyword: str, frame: int = 0) -> Any:
    """Attribute value from the top level, else shared, else the frame's functional groups."""
    if keyword in ds:
        return ds.get(keyword)
    for groups_keyword, index in (
        ("SharedFunctionalGroupsSequence", 0),
        ("PerFrameFunctionalGroupsSequence", frame),
    ):
        groups = ds.get(groups_keyword)
        if not groups or index >= len(groups):
            continue
        items = groups[index].get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return None


def frame_count(ds: Dataset) -> int:
    """NumberOfFrames, or 1 when absent, blank or not positive."""
    value = int_or_none(ds.get("NumberOfFrames"))
    return value if value and value > 0 else 1


def sop_class_name(ds: Dataset) -> str | None:
    """Name of the SOP class (e.g. ``"CT Image Storage"``); None when absent or unknown.

    Reads SOPClassUID, else the file meta's MediaStorageSOPClassUID. An unknown or corrupt
    UID gives None (its value may hold any bytes, so it is never quoted in messages).
    """
    sop = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    try:
        kind = UID(str(sop)).name if sop else ""
    except Exception:  # a corrupt UID value
        kind = ""
    return kind if kind and kind != str(sop) else None
