"""Batch-inference benchmark on real data; prints one JSON object as its last line.

* LGG: ``medseg predict`` over some patients' folders of the shared LGG set (2D slices), with the
  slices/s it reaches end to end, streamed and one case at a time (``queue_depth=0``, the path
  before the streaming engine), beside the model alone (``model_only_slices_per_s``: the served
  predictor on decoded batches, nothing else running) and their ratio (issue 29's >= 0.8);
* DICOM: ``medseg predict`` over the shared TCIA study (every series becomes a case); the image
  series' DICOM SEG output is read back with highdicom and compared with the study's own tumour
  mask series (aligned by slice position), giving an honest Dice of the whole chain; the same
  rates as for LGG.

    .venv/bin/python scripts/bench_predict.py --model models/lgg-unet-cpu
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _seg_volume(seg_path: Path, source_uids: list[str]) -> np.ndarray:
    """The SEG's binary mask on each source instance, in the given order (zeros where absent)."""
    import highdicom as hd

    seg = hd.seg.segread(str(seg_path))
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    out = []
    for uid in source_uids:
        if uid in referenced:
            px = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[uid],
                segment_numbers=[1],
                assert_missing_frames_are_empty=True,
            )
            out.append(px[0, ..., 0] > 0)
        else:
            out.append(None)
    shape = next(o.shape for o in out if o is not None)
    return np.stack([o if o is not None else np.zeros(shape, bool) for o in out])


def model_only_rate(model: Path, example: Path, batch_size: int, seconds: float = 10.0) -> float:
    """Slices/s of the model alone (the served predictor, nothing else running): ``batch_size``
    copies of ``example`` (an image file or a series' middle slice), already decoded and
    preprocessed, predicted again and again for about ``seconds``."""
    from medseg.inference.predictor import Predictor
    from medseg.io import read_image

    predictor = Predictor(model)
    array = read_image(example).array
    if array.ndim == 4:
        array = array[len(array) // 2]
    x = predictor.model_input(np.repeat(array[None], batch_size, axis=0))
    predictor(x)  # warm-up
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        predictor(x)
        calls += 1
    return calls * batch_size / (time.perf_counter() - t0)


def _timed_predict(model: Path, inputs: list[Path], out: Path, batch_size: int, depth) -> tuple:
    from medseg.inference.predict import predict

    t0 = time.perf_counter()
    r = predict(
        model, inputs, out, batch_size=batch_size, progress=False, queue_depth=depth
    )  # fmt: skip
    return r, time.perf_counter() - t0


def bench_lgg(model: Path, root: Path, patients: int, batch_size: int) -> dict:
    folders = sorted(p for p in root.iterdir() if p.is_dir())[:patients]
    out = Path(tempfile.mkdtemp(prefix="bench-lgg-"))
    try:
        example = next(p for p in sorted(folders[0].iterdir()) if not p.stem.endswith("_mask"))
        model_rate = model_only_rate(model, example, batch_size)
        before, _ = _timed_predict(model, folders, out / "before", batch_size, 0)
        r, wall = _timed_predict(model, folders, out / "preds", batch_size, None)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "patients": len(folders),
        "cases": len(r.rows),
        "failed": r.n_failed,
        "slices": r.n_slices,
        "model_only_slices_per_s": round(model_rate, 2),
        "in_stream_model_slices_per_s": round(r.slices_per_second, 2),
        "one_at_a_time_slices_per_s": round(before.end_to_end_slices_per_second, 2),
        "end_to_end_slices_per_s": round(r.end_to_end_slices_per_second, 2),
        "ratio": round(r.end_to_end_slices_per_second / model_rate, 3),
        "wall_s": round(wall, 2),
    }


def bench_dicom(
    model: Path, study_root: Path, image_series: str, mask_series: str, batch_size: int
) -> dict:
    import pydicom

    from medseg.io import read_image, read_mask

    studies = [
        p
        for p in study_root.rglob("*")
        if p.is_dir()
        and any(c.is_dir() and image_series.lower() in c.name.lower() for c in p.iterdir())
    ]
    if not studies:
        raise SystemExit(f"no study with a '{image_series}' series under {study_root}")
    study = studies[0]
    series = {c.name: c for c in study.iterdir() if c.is_dir()}
    image_dir = next(v for k, v in series.items() if image_series.lower() in k.lower())
    mask_dir = next(
        v
        for k, v in series.items()
        if mask_series.lower().replace("_", "") in k.lower().replace("_", "")
    )
    out = Path(tempfile.mkdtemp(prefix="bench-dicom-"))
    try:
        model_rate = model_only_rate(model, image_dir, batch_size)
        before, _ = _timed_predict(model, [image_dir], out / "before", batch_size, 0)
        r, _ = _timed_predict(model, [image_dir], out / "preds", batch_size, None)
        row = r.rows[0]
        if row["status"] != "ok":
            raise SystemExit(f"prediction failed: {row['error']}")
        image = read_image(image_dir)
        uids = [
            str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for f in image.meta.source
        ]
        pred = _seg_volume(out / "preds" / row["seg"], uids)
        truth = read_mask(mask_dir) > 0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    tp = int((pred & truth).sum())
    denom = int(pred.sum() + truth.sum())
    return {
        "series": image_dir.name,
        "slices": int(r.n_slices),
        "model_only_slices_per_s": round(model_rate, 2),
        "one_at_a_time_slices_per_s": round(before.end_to_end_slices_per_second, 2),
        "end_to_end_slices_per_s": round(r.end_to_end_slices_per_second, 2),
        "ratio": round(r.end_to_end_slices_per_second / model_rate, 3),
        "true_voxels": int(truth.sum()),
        "pred_voxels": int(pred.sum()),
        "dice_vs_mask_series": round(2 * tp / denom, 4) if denom else 1.0,
        "foreground_ml": row.get("foreground_ml"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="export folder or run folder")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--patients", type=int, default=5, help="LGG patients to predict")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-series", default="T1post")
    p.add_argument("--mask-series", default="MaskTumor")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    root = Path(args.data_root)
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "lgg": bench_lgg(
            Path(args.model),
            root / "lgg-mri-segmentation" / "kaggle_3m",
            args.patients,
            args.batch_size,
        ),
        "dicom": bench_dicom(
            Path(args.model),
            root / "brain-tumor-progression-dicom",
            args.image_series,
            args.mask_series,
            args.batch_size,
        ),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
