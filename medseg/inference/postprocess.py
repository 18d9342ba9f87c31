"""Post-processing of predicted masks: a different threshold, small lesions, largest component.

* :func:`apply_threshold` turns the probabilities of a binary model (one output channel) into a
  mask with a threshold of the user's choice instead of the one stored with the model.
* :func:`postprocess` removes connected components of the foreground (every label > 0 counts
  as foreground; labels inside a kept component are kept as they are) that are smaller than
  ``min_size_voxels``, and/or keeps only the largest one. Components are found with
  :func:`scipy.ndimage.label`: in 3D for a DxHxW volume (the slices of a volume are neighbours),
  in 2D for an HxW image. ``connectivity`` 1 (the default) joins voxels that share a face (6
  neighbours in 3D, 4 in 2D); ``connectivity=ndim`` also joins those that share only a corner
  (26 / 8).
"""

from __future__ import annotations

import numpy as np


def check_threshold(threshold: float) -> float:
    """``threshold`` as float, checked to lie strictly between 0 and 1.

    Raises:
        ValueError: it does not.
    """
    value = float(threshold)
    if not 0.0 < value < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return value


def apply_threshold(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground mask (uint8 0/1) where the probability of a binary model exceeds ``threshold``.

    Args:
        probabilities: ``[..., 1]`` probabilities of a binary model (the serving signature's
            ``probabilities`` output), or the same without the channel axis.
        threshold: in (0, 1); a pixel is foreground when its probability is strictly greater.

    Raises:
        ValueError: the threshold is outside (0, 1), or the probabilities have more than one
            channel (multi-class masks are the argmax; a threshold does not apply).
    """
    threshold = check_threshold(threshold)
    probs = np.asarray(probabilities)
    if probs.ndim >= 3 and probs.shape[-1] != 1:
        raise ValueError(
            f"a threshold applies to binary models (1 output channel), got {probs.shape[-1]}"
        )
    if probs.ndim >= 3:
        probs = probs[..., 0]
    return (probs > threshold).astype(np.uint8)


def postprocess(
    mask_volume: np.ndarray,
    *,
    min_size_voxels: int = 0,
    largest_component: bool = False,
    connectivity: int = 1,
) -> np.ndarray:
    """Remove small foreground components and/or keep only the largest one.

    Args:
        mask_volume: DxHxW label volume (3D components) or HxW mask (2D components), 0 is
            background.
        min_size_voxels: components with fewer voxels (pixels in 2D) are removed; 0 or 1 keeps
            all.
        largest_component: keep only the largest component (the first found on a tie); it is
            removed too when it is smaller than ``min_size_voxels``.
        connectivity: 1 for face neighbours, up to ``ndim`` for corner neighbours too.

    Returns:
        A new array of the same shape and dtype; removed voxels are 0, kept ones keep their
        labels.

    Raises:
        ValueError: the mask is not 2D or 3D, ``min_size_voxels`` is negative, or
            ``connectivity`` is not in 1..ndim.
    """
    from scipy import ndimage

    mask = np.asarray(mask_volume)
    if mask.ndim not in (2, 3):
        raise ValueError(f"postprocess needs an HxW or DxHxW mask, got shape {mask.shape}")
    if min_size_voxels < 0:
        raise ValueError(f"min_size_voxels must be >= 0, got {min_size_voxels}")
    if not 1 <= connectivity <= mask.ndim:
        raise ValueError(f"connectivity must be in 1..{mask.ndim}, got {connectivity}")
    if min_size_voxels <= 1 and not largest_component:
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    components, n = ndimage.label(mask > 0, structure=structure)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
    keep = sizes >= min_size_voxels
    if largest_component:
        largest = np.zeros(n, dtype=bool)
        largest[int(np.argmax(sizes))] = True
        keep &= largest
    lookup = np.concatenate([[False], keep])
    return np.where(lookup[components], mask, 0).astype(mask.dtype)


def largest_component_per_label(labels: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Keep, for each label > 0 separately, only its largest connected component.

    The per-structure post-processing of label maps with several structures (nnU-Net's
    "remove all but the largest component" applied to each class): unlike :func:`postprocess`,
    two touching structures are judged apart, so one never removes the other. Removed voxels
    become background.

    Args:
        labels: HxW or DxHxW integer label map.
        connectivity: 1 for face neighbours, up to ``ndim`` for corner neighbours too.

    Returns:
        A new array of the same shape and dtype.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    out = labels.copy()
    structure = ndimage.generate_binary_structure(labels.ndim, connectivity)
    for value in np.unique(labels):
        if value <= 0:
            continue
        components, n = ndimage.label(labels == value, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
        out[(components > 0) & (components != int(np.argmax(sizes)) + 1)] = 0
    return out
