"""The 3D leg of ``medseg demo``: a 3D U-Net from synthetic volumes to files a viewer opens.

1. Write a synthetic MSD dataset (:mod:`medseg.data.synthetic3d`: two touching structures,
   anisotropic voxels, oblique grids, a ``dataset.json``) into ``data/synthetic3d/train``, and
   one held-out volume both as NIfTI and as a DICOM MR series into ``data/synthetic3d/heldout``.
2. Train ``unet3d`` on patches at the fingerprint's spacing (``configs/demo3d.yaml``) and score
   the validation cases whole, per structure, in mm.
3. Export a SavedModel that takes a raw volume of any shape and spacing.
4. Predict the held-out NIfTI and DICOM series: label NIfTI in the source geometry, a DICOM SEG
   with one segment per structure, each structure's volume in mL in ``predictions.csv``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from medseg.config import load_config
from medseg.data.synthetic3d import (
    lps_affine,
    phantom3d,
    write_dicom_series,
    write_msd_dataset,
    write_nifti_volume,
)
from medseg.inference.export import export_run
from medseg.inference.predict import PredictResult, predict
from medseg.training.train import train

logger = logging.getLogger(__name__)

#: Cases of the synthetic training set, and the seed of the held-out volume.
TRAIN_CASES = 12
HELDOUT_SEED = 1000
SHAPE = (24, 28, 20)
SPACING = (2.0, 1.0, 1.5)


@dataclass
class Demo3DResult:
    run_dir: Path
    export_dir: Path
    predictions: PredictResult
    val_metrics: dict
    seconds: float


def write_demo_volumes(root: str | Path) -> tuple[Path, list[Path]]:
    """The synthetic training set (reused when there) and the held-out inputs to predict."""
    root = Path(root)
    train_dir = root / "train"
    if not (train_dir / "dataset.json").is_file():
        write_msd_dataset(train_dir, n_cases=TRAIN_CASES, shape=SHAPE, spacing=SPACING, seed=0)
    heldout = root / "heldout"
    nifti, series = heldout / "phantom_heldout.nii.gz", heldout / "phantom_heldout_dicom"
    if not nifti.is_file() or not series.is_dir():
        image, _ = phantom3d(SHAPE, seed=HELDOUT_SEED)
        affine = lps_affine(SHAPE, SPACING)
        heldout.mkdir(parents=True, exist_ok=True)
        write_nifti_volume(nifti, image[..., 0], affine)
        write_dicom_series(series, image[..., 0], SPACING, affine, seed=HELDOUT_SEED)
    return train_dir, [nifti, series]


def run_demo3d(
    config: str | Path = "configs/demo3d.yaml",
    overrides: list[str] | None = None,
    data_dir: str | Path = "data/synthetic3d",
) -> Demo3DResult:
    """Run the 3D demo chain and return where everything went (see the module docstring)."""
    t0 = time.perf_counter()
    cfg = load_config(config, overrides)
    logger.info("[3D 1/4] synthetic volumes -> %s", data_dir)
    train_dir, inputs = write_demo_volumes(data_dir)
    cfg.data.root = str(train_dir)
    logger.info("[3D 2/4] training unet3d (%d epochs)", cfg.train.epochs)
    result = train(cfg)
    logger.info("[3D 3/4] exporting a SavedModel")
    export_dir = export_run(result.run.path, Path(cfg.export.dir) / result.run.path.name)
    logger.info("[3D 4/4] predicting a NIfTI volume and a DICOM series")
    preds = predict(export_dir, inputs, result.run.path / "predictions")
    return Demo3DResult(
        result.run.path, export_dir, preds, result.metrics, time.perf_counter() - t0
    )
