"""Cutting volumes into 2D slices along a chosen axis, and stacking them back.

Readers return volumes as (slice, row, col[, C]) arrays; for an axially stored scan the slice axis
runs from inferior to superior. :func:`reslice` puts the chosen axis first: 0 keeps axial slices,
1 gives coronal and 2 sagittal slices, flipped so that superior is at the top of each 2D image
(as a viewer shows them). :func:`unreslice` is its exact inverse, for writing predictions back in
the source geometry. :func:`stack_slices` gives each slice its neighbours as channels (2.5D
input, ``data.context_slices``).
"""

from __future__ import annotations

import numpy as np


def reslice(volume: np.ndarray, axis: int) -> np.ndarray:
    """``volume`` (D, H, W[, C]) with ``axis`` first; superior up for coronal/sagittal slices."""
    if axis == 0:
        return volume
    if axis not in (1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    return np.moveaxis(volume, axis, 0)[:, ::-1]


def unreslice(slices: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`reslice`."""
    if axis == 0:
        return slices
    if axis not in (1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    return np.moveaxis(slices[:, ::-1], 0, axis)


def context_indices(length: int, k: int) -> np.ndarray:
    """``[length, 2k + 1]``: the slices stacked for each slice of a volume (edges repeated)."""
    offsets = np.arange(-k, k + 1)
    return np.clip(np.arange(length)[:, None] + offsets[None, :], 0, length - 1)


def stack_slices(volume: np.ndarray, k: int) -> np.ndarray:
    """``[D, H, W, C]`` slices -> ``[D, H, W, C * (2k + 1)]``: each slice with its ``k``
    neighbours on each side as channels, first-to-last (``data.context_slices``)."""
    if k == 0:
        return volume
    d, h, w, c = volume.shape
    stacked = volume[context_indices(d, k)]  # [D, 2k+1, H, W, C]
    return np.ascontiguousarray(np.moveaxis(stacked, 1, 3).reshape(d, h, w, c * (2 * k + 1)))
