#!/usr/bin/env python
"""Per-patient Dice of LGG runs, split by whether the patient's MRI sequences are complete.

In the LGG set (Buda et al.) each slice stores pre-contrast, FLAIR and post-contrast images as its
three channels; where a sequence was missing, the FLAIR image was copied into its channel. This
script finds those patients (a channel equal to the FLAIR channel in most slices) and prints, for
each run folder given (a ``medseg cv`` run, or a ``medseg tune`` variant folder), the mean
per-patient Dice of the complete and the incomplete patients, from the folds' ``oof.csv``.
Patients are counted, never named. Prints one JSON object.

    .venv/bin/python scripts/lgg_missing_sequences.py \
        ../shared/data/lgg-mri-segmentation/kaggle_3m \
        runs/lgg-recipe/tune/last runs/lgg-missing-seq/tune/last
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from medseg.data.scan import scan_dataset
from medseg.io import read_image
from medseg.models.metrics import dice_from_counts

FLAIR = 1


def sequence_pattern(root: str) -> dict[str, str]:
    """Patient -> ``complete``, ``all_flair`` or ``one_copied`` (majority over its slices)."""
    votes: dict[str, list[int]] = defaultdict(list)
    for sample in scan_dataset(root, "lgg").samples:
        x = read_image(sample.image).array
        copies = sum(np.array_equal(x[..., c], x[..., FLAIR]) for c in (0, 2))
        votes[sample.group].append(copies)
    names = {0: "complete", 1: "one_copied", 2: "all_flair"}
    return {g: names[int(np.median(v))] for g, v in votes.items()}


def per_patient_dice(run: Path) -> dict[str, float]:
    """Volume Dice per patient from ``fold_*/oof.csv`` (1.0 where both masks are empty)."""
    files = sorted(run.glob("fold_*/oof.csv"))
    if not files:
        raise SystemExit(f"{run}: no fold_*/oof.csv (not a medseg cv run or tune variant)")
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                s = sums[row["group"]]
                s[0] += int(row["tp"])
                s[1] += int(row["fp"])
                s[2] += int(row["fn"])
    return {g: dice_from_counts(*counts) for g, counts in sums.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="kaggle_3m folder")
    parser.add_argument("runs", nargs="+", type=Path, help="cv run or tune variant folders")
    args = parser.parse_args(argv)
    pattern = sequence_pattern(args.root)
    out: dict = {
        "patients": {
            p: sum(v == p for v in pattern.values()) for p in sorted(set(pattern.values()))
        }
    }
    for run in args.runs:
        dice = per_patient_dice(run)
        row: dict = {"all": round(float(np.mean(list(dice.values()))), 4), "n": len(dice)}
        for name in sorted(set(pattern.values())):
            values = [d for g, d in dice.items() if pattern.get(g) == name]
            row[name] = {
                "n": len(values),
                "mean": round(float(np.mean(values)), 4) if values else None,
            }
        incomplete = [d for g, d in dice.items() if pattern.get(g) != "complete"]
        row["incomplete"] = {
            "n": len(incomplete),
            "mean": round(float(np.mean(incomplete)), 4) if incomplete else None,
            "below_0.5": int(sum(d < 0.5 for d in incomplete)),
        }
        out[str(run)] = row
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
