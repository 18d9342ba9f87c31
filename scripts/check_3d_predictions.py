"""Check 3D predictions on unlabelled scans against a labelled dataset: volumes and orientation.

For scans without labels (e.g. the three hippocampus DICOM series in
../shared/data/msd-hippocampus-dicom) two things can still be checked against the training labels
of the same kind of crop:

* each structure's predicted volume (mL) lies inside the range of that structure's volumes in the
  labelled dataset;
* the structures lie on the same axes: the direction from one structure's centroid to the
  other's, in patient coordinates (LPS mm, from each file's affine), agrees with the labelled
  dataset's (cosine similarity to its mean direction).

Usage::

    python scripts/check_3d_predictions.py --dataset ../shared/data/msd-hippocampus \\
        --predictions preds/hippocampus-dicom

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from medseg.data.scan_msd import describe
from medseg.io import read_image
from medseg.io.msd import read_case_image, read_case_labels


def _centroid_lps(labels: np.ndarray, value: int, affine: np.ndarray) -> np.ndarray | None:
    idx = np.argwhere(labels == value)
    if len(idx) == 0:
        return None
    centre = np.append(idx.mean(axis=0), 1.0)
    return (affine @ centre)[:3]


def _direction(labels: np.ndarray, affine: np.ndarray, a: int, b: int) -> np.ndarray | None:
    ca, cb = _centroid_lps(labels, a, affine), _centroid_lps(labels, b, affine)
    if ca is None or cb is None:
        return None
    d = cb - ca
    return d / (np.linalg.norm(d) or 1.0)


def reference(dataset: Path) -> dict:
    """Per-structure volume ranges and the mean structure-to-structure direction of a dataset."""
    description = describe(dataset)
    names = {k: v for k, v in description.labels.items() if k > 0}
    volumes: dict[str, list[float]] = {name: [] for name in names.values()}
    directions = []
    first, second = sorted(names)[:2]
    for case in description.cases:
        image = read_case_image(case, len(description.channels))
        labels = read_case_labels(case, description.labels)
        voxel_ml = float(np.prod(image.meta.spacing)) / 1000.0
        for k, name in names.items():
            volumes[name].append(float((labels == k).sum()) * voxel_ml)
        d = _direction(labels, image.meta.affine, first, second)
        if d is not None:
            directions.append(d)
    mean = np.mean(directions, axis=0)
    return {
        "cases": len(description.cases),
        "volume_ml_range": {n: [min(v), max(v)] for n, v in volumes.items()},
        "direction_lps": (mean / np.linalg.norm(mean)).tolist(),
        "direction_cosine_range": [
            float(min(d @ mean / np.linalg.norm(mean) for d in directions)),
            float(max(d @ mean / np.linalg.norm(mean) for d in directions)),
        ],
        "labels": {str(k): v for k, v in names.items()},
    }


def check(predictions: Path, ref: dict) -> list[dict]:
    """One entry per predicted case: volumes, whether each is in range, direction cosine."""
    rows = list(csv.DictReader((predictions / "predictions.csv").open()))
    mean = np.array(ref["direction_lps"])
    labels = {int(k): v for k, v in ref["labels"].items()}
    first, second = sorted(labels)[:2]
    out = []
    for row in rows:
        entry: dict = {"case_id": row["case_id"], "status": row["status"]}
        if row["status"] != "ok":
            out.append(entry)
            continue
        mask = read_image(predictions / row["mask"])
        lab = np.rint(mask.array[..., 0]).astype(int)
        d = _direction(lab, mask.meta.affine, first, second)
        entry["direction_cosine"] = None if d is None else float(d @ mean)
        for name, (lo, hi) in ref["volume_ml_range"].items():
            ml = float(row[f"volume_ml_{name.lower()}"])
            entry[f"volume_ml_{name.lower()}"] = ml
            entry[f"in_range_{name.lower()}"] = bool(lo <= ml <= hi)
        out.append(entry)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, help="labelled dataset folder (dataset.json)")
    ap.add_argument("--predictions", required=True, help="output folder of medseg predict")
    args = ap.parse_args()
    ref = reference(Path(args.dataset))
    print(json.dumps({"reference": ref, "cases": check(Path(args.predictions), ref)}))


if __name__ == "__main__":
    main()
