#!/usr/bin/env python
"""What a training step on a patch (``train.patch_size``) costs against one on a whole image,
and in each dtype policy (``train.mixed_precision``).

Builds the recipe's U-Net (``configs/lgg-unet.yaml``) in 2D and 2.5D (``data.context_slices=1``),
each once for whole images and once for patches, in each asked-for policy, and times their
training steps on random batches alternately, so that a change in the machine's speed hits all
of them alike. Prints one JSON object: the median seconds per step of each, the patch-to-whole
ratio in 2D and 2.5D per policy, and each policy's step time against the first one's.

    .venv/bin/python scripts/bench_patch_step.py [--steps 25] [--patch N]
        [--precision float32,mixed_bfloat16]

The patch is the config's ``train.patch_size`` unless ``--patch N`` asks for N x N; the policy
is the config's ``train.mixed_precision`` unless ``--precision`` lists others.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import keras
import numpy as np

from medseg.config import load_config, precision_policy
from medseg.models.losses import get_loss
from medseg.models.registry import build_model
from medseg.training.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "lgg-unet.yaml"))
    ap.add_argument("--steps", type=int, default=25, help="timed steps per model")
    ap.add_argument("--patch", type=int, default=None, help="patch side in pixels")
    ap.add_argument("--precision", default=None, help="policies, comma-separated")
    args = ap.parse_args()
    cfg = load_config(args.config, [])
    patch_size = [args.patch] * 2 if args.patch else cfg.train.patch_size
    if not patch_size:
        ap.error(f"{args.config} has no train.patch_size: give --patch N")
    names = args.precision.split(",") if args.precision else [cfg.train.mixed_precision]
    # the config checks each name (an unknown one is a ConfigError listing the valid ones)
    policies = [
        precision_policy(load_config(args.config, [f"train.mixed_precision={n}"]).train)
        for n in names
    ]
    rng = np.random.default_rng(0)
    models = {}
    for policy in policies:
        keras.mixed_precision.set_global_policy(policy)  # the layers built now keep it
        for ctx in (0, 1):
            for patch in ([], patch_size):
                sets = [f"data.context_slices={ctx}", f"train.patch_size={patch}"]
                cfg = load_config(args.config, sets)
                model = build_model(cfg, 1)
                model.compile(optimizer=build_optimizer(cfg.train, 100), loss=get_loss(cfg.train))
                h, w = patch or cfg.data.image_size
                batch = cfg.train.batch_size
                x = rng.normal(size=(batch, h, w, cfg.data.input_channels)).astype(np.float32)
                y = (rng.random((batch, h, w, 1)) > 0.9).astype(np.float32)
                for _ in range(2):  # tracing and warm-up
                    model.train_on_batch(x, y)
                key = f"{'2.5d' if ctx else '2d'}_{'patch' if patch else 'whole'}"
                if len(policies) > 1:
                    key = f"{policy}_{key}"
                models[key] = (model, x, y)
    keras.mixed_precision.set_global_policy("float32")
    times: dict[str, list[float]] = {key: [] for key in models}
    for _ in range(args.steps):
        for key, (model, x, y) in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[key].append(time.perf_counter() - start)
    med = {key: float(np.median(t)) for key, t in times.items()}
    out = {f"{key}_s_per_step": round(t, 4) for key, t in med.items()}
    prefixes = [f"{p}_" for p in policies] if len(policies) > 1 else [""]
    for prefix in prefixes:
        for dim in ("2d", "2.5d"):
            ratio = med[f"{prefix}{dim}_patch"] / med[f"{prefix}{dim}_whole"]
            out[f"{prefix}{dim}_patch_to_whole"] = round(ratio, 3)
    for prefix in prefixes[1:]:
        for key in ("2d_whole", "2d_patch", "2.5d_whole", "2.5d_patch"):
            ratio = med[f"{prefix}{key}"] / med[f"{prefixes[0]}{key}"]
            out[f"{prefix}{key}_to_{policies[0]}"] = round(ratio, 3)
    out.update(patch=patch_size, precision=policies, steps=args.steps, config=args.config)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
