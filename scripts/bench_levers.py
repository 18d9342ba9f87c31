#!/usr/bin/env python
"""The speed levers of docs/performance.md, each measured with ``medseg bench``.

Runs ``medseg bench --no-torch`` once per variant (a config override or an environment setting),
one after another so they never share the CPU, and prints one JSON object as its last line:
``{variant: {"unet": {...}, "classifier": {...}}}`` with each model's train/inference/pipeline
images/s. The baseline variant also times TFLite.

    .venv/bin/python scripts/bench_levers.py [--seconds 20] [--only baseline,xla]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAST_PATHS = "keras,keras_folded,savedmodel"

# name: (medseg bench arguments, environment)
VARIANTS = {
    "baseline": (["--infer-paths", FAST_PATHS + ",tflite"], {}),
    "steps_per_execution_4": (["--set", "train.steps_per_execution=4"], {}),
    "xla": (["--set", "train.jit_compile=true"], {}),
    "mixed_float16": (["--set", "train.mixed_precision=mixed_float16"], {}),
    "mixed_bfloat16": (["--set", "train.mixed_precision=mixed_bfloat16"], {}),
    "batch_x2": ([], {}),  # batch sizes set per model below
    "inter_op_1": ([], {"TF_NUM_INTEROP_THREADS": "1"}),
    "onednn_off": ([], {"TF_ENABLE_ONEDNN_OPTS": "0"}),
    "bfc_allocator": ([], {"TF_CPU_ALLOCATOR_USE_BFC": "true"}),
}
BATCH_X2 = {"unet": 16, "classifier": 32}
KEYS = ("train_img_s", "infer_img_s", "infer_best_path", "infer_paths", "pipeline_img_s")


def run(name: str, seconds: float) -> dict:
    args, env = VARIANTS[name]
    out = {}
    for model in ("unet", "classifier"):
        extra = list(args)
        if name == "batch_x2":
            extra += ["--set", f"train.batch_size={BATCH_X2[model]}"]
        if "--infer-paths" not in extra:
            extra += ["--infer-paths", FAST_PATHS]
        cmd = [sys.executable, "-m", "medseg.cli", "-q", "bench", "--no-torch", "--only", model]
        cmd += ["--seconds", str(seconds), *extra]
        proc = subprocess.run(
            cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            out[model] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            res = json.loads(lines[-1])
            out[model] = {k: res[model][k] for k in KEYS}
            out["matmul_peak_gflops"] = res["matmul_peak_gflops"]
        print(name, model, json.dumps(out[model]), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--only", help="comma-separated variants (default: all)")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(VARIANTS)
    print(json.dumps({name: run(name, a.seconds) for name in names}))


if __name__ == "__main__":
    main()
