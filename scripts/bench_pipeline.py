#!/usr/bin/env python
"""Input-pipeline throughput of medseg.data.pipeline on the real datasets.

Two cases, each with the augmentation of its config:

* ``lgg``: the LGG FLAIR set with ``configs/lgg-unet.yaml``, image size overridden to 256x256;
* ``brain_tumor``: the brain-tumour MRI class folders at 224x224 with
  ``configs/brain-tumor-mobilenetv2.yaml``.

For each, on an evenly spaced subset of ``--limit`` samples:

* ``decode``: :func:`medseg.data.pipeline.load_arrays` (read, convert channels, resize, normalise)
  in images/s;
* ``iterate``: one warm-up batch of the shuffled, augmented ``tf.data`` pipeline
  (:func:`make_dataset` + :func:`build_augment`), then images/s over ``--iter-images`` images
  (median of ``--repeats`` runs);
  ``iterate_no_augment`` is the same without augmentation (what albumentations costs).

Prints a line per measurement, and last one JSON object on one line.

    .venv/bin/python scripts/bench_pipeline.py --limit 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"

CASES = {
    "lgg": {
        "config": "lgg-unet.yaml",
        "folder": "lgg-mri-segmentation/kaggle_3m",
        "image_size": [256, 256],
    },
    "brain_tumor": {
        "config": "brain-tumor-mobilenetv2.yaml",
        "folder": "brain-tumor-mri",
        "image_size": [224, 224],
    },
}


def _subset(samples: list, limit: int) -> list:
    """``limit`` samples spread evenly through the scan order (all patients / classes)."""
    if limit <= 0 or len(samples) <= limit:
        return list(samples)
    step = len(samples) / limit
    return [samples[int(i * step)] for i in range(limit)]


def _iterate(ds, n_images: int, repeats: int) -> dict:
    """Images/s over about ``n_images`` images after one warm-up batch (repeating epochs).

    Measured ``repeats`` times, each on a fresh iterator; ``images_per_s`` is the median.
    """
    rates, warmups, seen = [], [], 0
    for _ in range(repeats):
        it = iter(ds.repeat())
        t0 = time.perf_counter()
        next(it)
        warmups.append(time.perf_counter() - t0)
        seen, t0 = 0, time.perf_counter()
        while seen < n_images:
            x, _ = next(it)
            seen += int(x.shape[0])
        rates.append(seen / (time.perf_counter() - t0))
    return {
        "images": seen,
        "images_per_s": round(statistics.median(rates), 1),
        "runs_images_per_s": [round(r, 1) for r in rates],
        "warmup_batch_s": round(statistics.median(warmups), 3),
    }


def bench_case(
    name: str, data_root: Path, limit: int, iter_images: int, batch_size: int, repeats: int
) -> dict:
    from medseg.config import load_config
    from medseg.data.augment import build_augment
    from medseg.data.pipeline import load_arrays, make_dataset
    from medseg.data.scan import scan_dataset

    case = CASES[name]
    root = data_root / case["folder"]
    if not root.is_dir():
        return {"skipped": f"{root} not found"}
    size = case["image_size"]
    cfg = load_config(
        REPO / "configs" / case["config"],
        overrides=[f"data.image_size=[{size[0]}, {size[1]}]"],
    )
    cfg.data.root = str(root)
    batch = batch_size or cfg.train.batch_size
    # Grouping does not change throughput: keep the layout's groups (no perceptual hashing).
    scan = scan_dataset(cfg.data.root, cfg.data.layout, group_by="folder")
    samples = _subset(scan.samples, limit)

    load_arrays(samples[:4], cfg.data, cfg.model.num_classes)  # warm-up: TF's first ops
    t0 = time.perf_counter()
    data = load_arrays(samples, cfg.data, cfg.model.num_classes)
    decode_s = time.perf_counter() - t0
    n = len(data.samples)
    out: dict = {
        "config": f"configs/{case['config']}",
        "image_size": size,
        "channels": cfg.data.channels,
        "batch_size": batch,
        "samples": n,
        "problems": len(data.problems),
        "decode": {
            "images": n,
            "seconds": round(decode_s, 3),
            "images_per_s": round(n / decode_s, 1),
        },
    }
    print(f"{name}: decode+preprocess {n} images: {n / decode_s:.1f} images/s", flush=True)
    kwargs = {
        "task": cfg.data.task,
        "num_classes": cfg.model.num_classes,
        "batch_size": batch,
        "shuffle": True,
        "seed": cfg.train.seed,
    }
    if cfg.data.task == "segmentation":
        kwargs["oversample_tumour"] = cfg.train.oversample_tumour
    augment = build_augment(cfg.augment, seed=cfg.train.seed)
    out["augment"] = [type(t).__name__ for t in augment.transforms] if augment else []
    for key, aug in (("iterate", augment), ("iterate_no_augment", None)):
        out[key] = _iterate(make_dataset(data, augment=aug, **kwargs), iter_images, repeats)
        print(f"{name}: {key}: {out[key]['images_per_s']} images/s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help="../shared/data")
    parser.add_argument("--limit", type=int, default=512, help="samples per case (0: all)")
    parser.add_argument("--iter-images", type=int, default=384, help="images timed per run")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the config's batch size")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per iteration test")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    result = {
        "host": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "numpy": np.__version__,
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "gpus": len(tf.config.list_physical_devices("GPU")),
        },
        "limit": args.limit,
        "iter_images": args.iter_images,
        "repeats": args.repeats,
        "cases": {},
    }
    for name in args.cases:
        result["cases"][name] = bench_case(
            name, args.data_root, args.limit, args.iter_images, args.batch_size, args.repeats
        )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
