"""The embedded demo (``medseg demo``): the whole chain on data that needs no download.

1. Generate the synthetic phantom set (:mod:`medseg.data.synthetic`) into ``data/synthetic/``.
2. Train a small U-Net on its segmentation part (``configs/demo.yaml``), patients split into
   train / validation / test.
3. Evaluate on the held-out test patients (Dice, IoU, per-patient Dice).
4. Export a SavedModel with in-graph preprocessing under ``models/``.
5. Predict on held-out synthetic slices and on the real MR and CT scans that ship inside pydicom,
   writing masks, overlays and ``predictions.csv``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from medseg.config import load_config
from medseg.data.scan import scan_from_config
from medseg.data.synthetic import SynthSpec, generate
from medseg.evaluation.evaluate import evaluate
from medseg.inference.export import export_run
from medseg.inference.predict import PredictResult, predict
from medseg.training.train import train

logger = logging.getLogger(__name__)

PYDICOM_SCANS = ("MR_small.dcm", "CT_small.dcm")


def pydicom_test_scans() -> list[Path]:
    """Real MR and CT scans bundled with pydicom (found on disk; no network)."""
    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    return [folder / name for name in PYDICOM_SCANS if (folder / name).is_file()]


@dataclass
class DemoResult:
    run_dir: Path
    export_dir: Path
    predictions: PredictResult
    test_metrics: dict
    seconds: float


def run_demo(
    config: str | Path = "configs/demo.yaml",
    overrides: list[str] | None = None,
    synth_dir: str | Path = "data/synthetic",
    synth_spec: SynthSpec | None = None,
) -> DemoResult:
    """Run the demo chain and return where everything went.

    Args:
        config: the demo config.
        overrides: ``section.key=value`` overrides (tests use them to shrink the run).
        synth_dir: where the synthetic set is generated (reused when already there).
        synth_spec: generator settings (default: :class:`SynthSpec`'s defaults).
    """
    t0 = time.perf_counter()
    cfg = load_config(config, overrides)
    logger.info("[1/5] synthetic data -> %s", synth_dir)
    summary = generate(synth_dir, synth_spec or SynthSpec())
    cfg.data.root = str(summary.segmentation_dir)

    logger.info("[2/5] training %s (%d epochs)", cfg.model.name, cfg.train.epochs)
    result = train(cfg)

    logger.info("[3/5] evaluating on held-out test patients")
    test_metrics = evaluate(result.run.path, split="test")

    logger.info("[4/5] exporting a SavedModel")
    export_dir = export_run(result.run.path, Path(cfg.export.dir) / result.run.path.name)

    logger.info("[5/5] predicting on held-out synthetic slices and pydicom's MR/CT scans")
    manifest_test = _test_images(cfg, result.run.splits_path)
    preds = predict(
        export_dir,
        manifest_test + pydicom_test_scans(),
        result.run.path / "predictions",
        batch_size=cfg.predict.batch_size,
    )
    return DemoResult(result.run.path, export_dir, preds, test_metrics, time.perf_counter() - t0)


def _test_images(cfg, splits_path: Path, n: int = 4) -> list[Path]:
    """A few test-split images that show tumour (the ones with the largest masks)."""
    import json

    import numpy as np

    from medseg.io import read_mask

    test_ids = set(json.loads(splits_path.read_text())["splits"]["test"])
    samples = [s for s in scan_from_config(cfg.data).samples if s.id in test_ids]
    areas = [int(np.count_nonzero(read_mask(s.target))) for s in samples]
    order = np.argsort(areas)[::-1][:n]
    return [Path(samples[i].image) for i in order]
