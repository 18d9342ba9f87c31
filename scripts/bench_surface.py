"""Time HD95 + ASSD + NSD (medseg.evaluation.surface.mask_metrics) on one 256x256x30 case.

Issue 28's target: HD95 + NSD of one 256x256x30 case in under 0.5 s on this machine. Three
cases of that size (anisotropic spacing 0.94 x 0.94 in-plane, 5 mm slices, as a brain MRI
series), each a prediction against a reference that differs from it by a shifted, dilated copy:

* ``lesion``: a tumour-sized ellipsoid (about 40 x 36 x 8 voxels);
* ``brain``: a brain-sized ellipsoid (about 200 x 170 x 26 voxels), the largest surfaces;
* ``scattered``: the lesion plus 30 small false-positive islands over the whole volume (the
  joint bounding box is then the whole volume).

Prints one JSON object: per case the best and median of ``--repeats`` timings in seconds and the
metrics, so a run can be compared with another run on the same machine.

    .venv/bin/python scripts/bench_surface.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import ndimage

from medseg.evaluation.surface import mask_metrics

SHAPE = (30, 256, 256)  # (slices, rows, columns)
SPACING = (5.0, 0.94, 0.94)


def ellipsoid(centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    """A boolean ellipsoid of ``radii`` voxels around ``centre`` in a SHAPE volume."""
    grid = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))
    return inside <= 1.0


def cases(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    lesion = ellipsoid((15, 120, 140), (4, 18, 20))
    brain = ellipsoid((15, 128, 128), (13, 100, 85))
    out = {}
    for name, truth in (("lesion", lesion), ("brain", brain)):
        pred = ndimage.binary_dilation(np.roll(truth, (0, 2, -3), axis=(0, 1, 2)), iterations=1)
        out[name] = (pred, truth)
    scattered = out["lesion"][0].copy()
    for _ in range(30):
        z, y, x = (int(rng.integers(0, n - 4)) for n in SHAPE)
        scattered[z : z + 2, y : y + 4, x : x + 4] = True
    out["scattered"] = (scattered, lesion)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tolerance-mm", type=float, default=1.0)
    args = parser.parse_args()
    result: dict = {"shape": list(SHAPE), "spacing_mm": list(SPACING), "cases": {}}
    for name, (pred, truth) in cases().items():
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            metrics = mask_metrics(pred, truth, SPACING, args.tolerance_mm)
            times.append(time.perf_counter() - t0)
        result["cases"][name] = {
            "seconds_best": round(min(times), 4),
            "seconds_median": round(float(np.median(times)), 4),
            "voxels_pred": int(pred.sum()),
            "voxels_truth": int(truth.sum()),
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()},
        }
    result["target_seconds"] = 0.5
    result["all_under_target"] = all(c["seconds_median"] < 0.5 for c in result["cases"].values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
