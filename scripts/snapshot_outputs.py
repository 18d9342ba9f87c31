#!/usr/bin/env python
"""Run demo, cv, evaluate and predict on synthetic data and print a digest of what they wrote.

Used to check that a refactoring leaves behaviour unchanged: run it on two checkouts (e.g. with
``PYTHONPATH=<checkout>``) and compare the JSON it prints; ``--diff A.json B.json`` lists the
differences. Training is deterministic (``train.deterministic``) and tiny; timings, dates and
absolute paths are left out of the digest, everything else (metrics, tables, masks, model cards)
is kept: JSON and CSV values exactly, images and volumes as hashes of their decoded arrays.

Usage::

    python scripts/snapshot_outputs.py WORKDIR > after.json
    python scripts/snapshot_outputs.py --diff before.json after.json
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Keys whose values change from run to run (times, dates, machine, paths).
VOLATILE = re.compile(
    r"(seconds|_s$|img_s|slices_per|time|date|created|host|path|version|elapsed|started|"
    r"finished|duration|rss|source|signature|dir$|sha256|hash|runs$|run$)",
    re.I,
)
TINY = [
    "data.image_size=[48,48]",
    "model.base_filters=4",
    "model.depth=2",
    "train.epochs=2",
    "train.deterministic=true",
    "train.warmup_epochs=0",
]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _medseg(work: Path, *args: str) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "medseg.cli", "--quiet", *args]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    print(f"$ medseg {' '.join(args)} -> {proc.returncode}", file=sys.stderr)
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"medseg {args[0]} failed")


def run_all(work: Path) -> None:
    """The four commands of the check, in ``work`` (a copy of configs/ goes there)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(REPO / "configs", work / "configs")
    _medseg(work, "demo", *_sets(TINY))
    runs = sorted(p for p in (work / "runs").iterdir() if p.is_dir())
    demo_run = runs[0].name
    _medseg(work, "evaluate", f"runs/{demo_run}", "--split", "val", "--checkpoint", "last")
    cv_sets = [*TINY, "cv.folds=2", "train.epochs=1"]
    _medseg(work, "cv", "-c", "configs/demo.yaml", "--name", "cv2", *_sets(cv_sets))
    _medseg(
        work, "evaluate", "runs/cv2", "--data", "data/synthetic/segmentation", "--out", "eval_cv2"
    )
    _medseg(
        work,
        "predict",
        "-m",
        "runs/cv2",
        "data/synthetic/segmentation",
        "--out",
        "pred_cv2",
        "--no-progress",
    )


def _norm(obj):
    if isinstance(obj, dict):
        return {k: _norm(v) for k, v in sorted(obj.items()) if not VOLATILE.search(str(k))}
    if isinstance(obj, list):
        return [_norm(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def _array_digest(path: Path) -> str:
    import numpy as np

    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        arr = np.asarray(nib.load(str(path)).dataobj)
    elif path.suffix == ".dcm":
        import pydicom

        arr = pydicom.dcmread(path).pixel_array
    else:
        from PIL import Image

        arr = np.asarray(Image.open(path))
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]


def digest(work: Path) -> dict:
    """Relative path -> normalised content of every output file under ``work``."""
    out = {}
    for path in sorted(work.rglob("*")):
        rel = path.relative_to(work).as_posix()
        if not path.is_file() or rel.startswith(("configs/", "data/")) or "/logs/" in rel:
            continue
        rel = re.sub(r"\d{8}-\d{6}", "<stamp>", rel)
        if path.suffix == ".json":
            out[rel] = _norm(json.loads(path.read_text()))
        elif path.suffix == ".csv":
            rows = list(csv.DictReader(path.open()))
            out[rel] = [_norm(r) for r in rows]
        elif path.suffix in (".png", ".dcm") or path.name.endswith((".nii.gz", ".nii")):
            out[rel] = _array_digest(path)
        elif path.suffix in (".yaml", ".md"):
            text = re.sub(r"\d+(\.\d+)? ?(s|min|ms)\b", "<t>", path.read_text())
            text = re.sub(r"(config_hash: )\w+|\d{8}-\d{6}", r"\1", text)
            out[rel] = hashlib.sha256(re.sub(r"/\S+", "<p>", text).encode()).hexdigest()[:16]
        else:
            out[rel] = "present"
    return out


def diff(a: dict, b: dict) -> list[str]:
    lines = [f"only before: {k}" for k in sorted(set(a) - set(b))]
    lines += [f"only after: {k}" for k in sorted(set(b) - set(a))]
    lines += [f"differs: {k}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", nargs="?", help="working folder (emptied first)")
    ap.add_argument("--diff", nargs=2, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--no-run", action="store_true", help="digest WORK as it is, run nothing")
    args = ap.parse_args()
    if args.diff:
        a, b = (json.loads(Path(p).read_text()) for p in args.diff)
        lines = diff(a, b)
        print("\n".join(lines) or f"identical: {len(a)} files")
        return 1 if lines else 0
    work = Path(args.work).resolve()
    if not args.no_run:
        run_all(work)
    print(json.dumps(digest(work), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
