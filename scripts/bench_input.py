"""How long training steps wait for their input: the share of step time spent blocked in
``next(iterator)`` for the LGG recipe (configs/lgg-unet.yaml) and the hippocampus recipe
(configs/hippocampus-unet3d.yaml), on the real data under ../shared/data.

Each recipe's training dataset is built as ``medseg train`` builds it (2D:
:func:`medseg.data.pipeline.load_data` + :func:`medseg.data.pipeline.make_dataset` with the
recipe's augmentation, patch size, oversampling and batch; 3D:
:func:`medseg.data.patches.patch_dataset` on z-scored volumes at their own 1 mm grid), and the
recipe's model takes ``train_on_batch`` steps (Adam and cross-entropy: the step's cost is the
model's). After ``--warmup`` steps, ``--steps`` steps are timed: ``wait_share`` = seconds in
``next()`` / seconds of whole steps. A recipe whose data folder is missing is skipped with its
reason. Prints one JSON object.

    .venv/bin/python scripts/bench_input.py [--steps 40] [--warmup 5] [--patients 12]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _timed_steps(model, dataset, warmup: int, steps: int) -> dict:
    it = iter(dataset)
    for _ in range(warmup):
        x, y = next(it)
        model.train_on_batch(x, y)
    waited = total = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = next(it)
        t1 = time.perf_counter()
        model.train_on_batch(x, y)
        t2 = time.perf_counter()
        waited, total = waited + t1 - t0, total + t2 - t0
    return {
        "steps": steps,
        "step_s": round(total / steps, 4),
        "wait_s_per_step": round(waited / steps, 5),
        "wait_share": round(waited / total, 4),
    }


def bench_lgg(root: Path, patients: int, warmup: int, steps: int) -> dict:
    import keras

    from medseg.config import load_config
    from medseg.data.pipeline import load_data, training_dataset
    from medseg.data.scan import scan_from_config
    from medseg.models.registry import build_model

    folder = root / "lgg-mri-segmentation" / "kaggle_3m"
    if not folder.is_dir():
        return {"skipped": f"{folder}: not found"}
    cfg = load_config(REPO / "configs" / "lgg-unet.yaml", [f"data.root={folder}"])
    samples = scan_from_config(cfg.data).samples
    keep = sorted({s.group for s in samples})[:patients]
    samples = [s for s in samples if s.group in keep]
    data = load_data(samples, cfg.data, 1)
    ds = training_dataset(data, cfg, 1, cfg.train.batch_size).repeat()  # as `medseg train`
    model = build_model(cfg, 1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    out = {"samples": len(samples), "patients": len(keep), "batch": cfg.train.batch_size}
    return out | _timed_steps(model, ds, warmup, steps)


def bench_hippocampus(root: Path, cases: int, warmup: int, steps: int) -> dict:
    import keras
    import numpy as np

    from medseg.config import load_config
    from medseg.data.patches import patch_dataset
    from medseg.io.msd import read_case_image, read_case_labels, read_dataset_json
    from medseg.models.registry import build_model

    folder = root / "msd-hippocampus"
    if not (folder / "dataset.json").is_file():
        return {"skipped": f"{folder}/dataset.json: not found"}
    cfg = load_config(REPO / "configs" / "hippocampus-unet3d.yaml", [f"data.root={folder}"])
    desc = read_dataset_json(folder)
    images, labels = [], []
    for case in desc.cases[:cases]:
        image = read_case_image(case, len(desc.channels)).array
        images.append(((image - image.mean()) / (image.std() + 1e-8)).astype(np.float32))
        labels.append(read_case_labels(case, desc.labels))
    patch = list(cfg.train.patch_size or [40, 56, 40])
    n = len(desc.labels)
    ds = patch_dataset(
        images,
        labels,
        patch,
        n,
        cfg.train.batch_size,
        cfg.augment,
        cfg.volume.foreground_share,
        seed=cfg.train.seed,
        deep_supervision=False,
    )
    cfg = load_config(
        REPO / "configs" / "hippocampus-unet3d.yaml",
        [
            f"data.root={folder}",
            f"data.channels={len(desc.channels)}",
            f"train.patch_size={patch}",
            "model.deep_supervision=false",
        ],
    )
    model = build_model(cfg, n)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    out = {"cases": len(images), "patch": patch, "batch": cfg.train.batch_size}
    return out | _timed_steps(model, ds, warmup, steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--patients", type=int, default=12, help="LGG patients loaded")
    p.add_argument("--cases", type=int, default=40, help="hippocampus volumes loaded")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from medseg.utils import import_tensorflow_quietly

    import_tensorflow_quietly()
    root = Path(args.data_root)
    result: dict = {"steps": args.steps, "warmup": args.warmup}
    for name, fn, n in (
        ("lgg", bench_lgg, args.patients),
        ("hippocampus", bench_hippocampus, args.cases),
    ):
        try:
            result[name] = fn(root, n, args.warmup, args.steps)
        except Exception as e:  # one recipe failing must not hide the other's figure
            result[name] = {"skipped": f"{type(e).__name__}: {e}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
