"""Training-time augmentation with albumentations, built from :class:`~medseg.config.AugmentConfig`.

Geometric transforms (flips, 90-degree rotations, affine, elastic, grid distortion) are applied to
image and mask together, the mask with nearest-neighbour interpolation so labels stay labels;
intensity transforms (brightness/contrast, gamma, noise) to the image only. The pipeline is seeded
(``A.Compose(seed=...)``) and used for the training split only.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from medseg.config import AugmentConfig


def build_augment(cfg: AugmentConfig, seed: int = 0) -> A.Compose | None:
    """An albumentations pipeline for the config, or None when augmentation is off or empty."""
    if not cfg.enabled:
        return None
    transforms: list = []
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
