"""Training-time augmentation with albumentations, built from :class:`~medseg.config.AugmentConfig`.

Geometric transforms (flips, 90-degree rotations, affine, elastic, grid distortion) are applied to
image and mask together, the mask with nearest-neighbour interpolation so labels stay labels;
intensity transforms (missing sequence, brightness/contrast, gamma, noise) to the image only. With
a patch size (``train.patch_size``) a random crop of that size ends the pipeline. The pipeline is
seeded (``A.Compose(seed=...)``), used for the training split only, and sees
normalised images.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from medseg.config import AugmentConfig


class MissingSequence(A.ImageOnlyTransform):
    """Overwrite a random non-empty set of channels with the reference channel.

    Multi-sequence MRI stored as channels sometimes has a missing sequence filled with another
    one: in the LGG set of Buda et al. four of the 46 shared patients have the FLAIR image in all
    three channels and two more in the post-contrast channel, and a model trained only on complete
    scans misses their tumours. Albumentations has channel dropout and shuffling but no such copy.

    With 2.5D input (``data.context_slices``) the image is a stack of slices of
    ``channels_per_slice`` channels each; the same channels are then replaced in every slice of
    the stack, as in a scan with a missing sequence.

    Args:
        reference: index of the channel that is always present (1: FLAIR in the LGG images),
            within one slice.
        p: probability per image.
        channels_per_slice: channels of one slice (None: the whole image is one slice).

    Example:
        >>> aug = MissingSequence(reference=1, p=1.0)
        >>> out = aug(image=np.random.rand(8, 8, 3).astype(np.float32))["image"]
    """

    def __init__(self, reference: int = 1, p: float = 0.5, channels_per_slice: int | None = None):
        super().__init__(p=p)
        self.reference = reference
        self.channels_per_slice = channels_per_slice

    def _slice_channels(self, image: np.ndarray) -> tuple[int, int]:
        total = image.shape[-1] if image.ndim == 3 else 1
        n = self.channels_per_slice or total
        if total % n:
            raise ValueError(f"MissingSequence: {total} channels are not slices of {n}")
        if not 0 <= self.reference < n:
            raise ValueError(f"MissingSequence: reference channel {self.reference} of {n}")
        return n, total // n

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        n, _ = self._slice_channels(data["image"])
        others = [c for c in range(n) if c != self.reference]
        if not others:
            return {"channels": []}
        k = self.py_random.randint(1, len(others))
        return {"channels": sorted(self.py_random.sample(others, k))}

    def apply(self, img: np.ndarray, channels: list[int], **params) -> np.ndarray:
        if not channels:
            return img
        n, slices = self._slice_channels(img)
        out = img.copy()
        for s in range(slices):
            ref = s * n + self.reference
            out[..., [s * n + c for c in channels]] = img[..., ref : ref + 1]
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("reference", "channels_per_slice")


def build_augment(
    cfg: AugmentConfig,
    seed: int = 0,
    channels_per_slice: int | None = None,
    patch_size: tuple[int, int] | list[int] | None = None,
) -> A.Compose | None:
    """An albumentations pipeline for the config, or None when it would do nothing.

    Args:
        cfg: the augmentation section.
        seed: seeds the pipeline's random draws.
        channels_per_slice: ``data.channels`` when the images are 2.5D stacks of slices
            (``data.context_slices``), for the missing-sequence transform.
        patch_size: ``[height, width]`` of a random crop applied after every other transform
            (``train.patch_size``), kept when ``cfg.enabled`` is false; None or empty: no crop.
    """
    crop = [A.RandomCrop(*patch_size, p=1.0)] if patch_size else []
    if not cfg.enabled:
        return A.Compose(crop, seed=seed) if crop else None
    transforms: list = []
    if cfg.missing_sequence > 0:
        transforms.append(
            MissingSequence(
                reference=cfg.reference_channel,
                p=cfg.missing_sequence,
                channels_per_slice=channels_per_slice,
            )
        )
    if cfg.hflip > 0:
        transforms.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        transforms.append(A.VerticalFlip(p=cfg.vflip))
    if cfg.rotate90 > 0:
        transforms.append(A.RandomRotate90(p=cfg.rotate90))
    if cfg.affine > 0:
        transforms.append(
            A.Affine(
                scale=(1 - cfg.scale_limit, 1 + cfg.scale_limit),
                rotate=(-cfg.rotate_limit, cfg.rotate_limit),
                translate_percent=(-0.05, 0.05),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                p=cfg.affine,
            )
        )
    if cfg.brightness_contrast > 0:
        transforms.append(
            A.RandomBrightnessContrast(
                brightness_limit=0.1, contrast_limit=0.1, p=cfg.brightness_contrast
            )
        )
    if cfg.elastic > 0:
        transforms.append(
            A.ElasticTransform(
                alpha=30,
                sigma=6,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                p=cfg.elastic,
            )
        )
    if cfg.grid_distortion > 0:
        transforms.append(
            A.GridDistortion(
                num_steps=5,
                distort_limit=0.2,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                p=cfg.grid_distortion,
            )
        )
    if cfg.gamma > 0:
        transforms.append(A.RandomGamma(gamma_limit=(80, 120), p=cfg.gamma))
    if cfg.noise > 0:
        transforms.append(A.GaussNoise(std_range=(0.01, 0.05), p=cfg.noise))
    # last: the geometric transforms see the whole image, so their borders are cropped away
    transforms += crop
    if not transforms:
        return None
    return A.Compose(transforms, seed=seed)


def apply_augment(
    aug: A.Compose, image: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Augment one HxWxC float32 image (and its HxW mask)."""
    if mask is None:
        return aug(image=image)["image"].astype(np.float32), None
    out = aug(image=image, mask=mask)
    return out["image"].astype(np.float32), out["mask"]
