"""Batch inference on files and folders (``medseg predict``).

Inputs are image files (PNG/JPEG/TIFF/BMP), DICOM files (single- or multi-frame) and folders of
them (searched recursively; files named ``*_mask.*`` inside folders are masks of a dataset and are
skipped, with a count in the log). Each input file is one case, written to ``<out>/<case-id>/``:

* segmentation, 2D: ``mask.png`` (binary: 0/255; label maps: the labels) and ``overlay.png``;
* segmentation, volumes: ``mask.nii.gz`` (x = column, y = row, z = slice, spacing in the header)
  and ``overlay.png`` of the slice with the most foreground;
* classification: the class probabilities, in the tables only.

``predictions.csv`` and ``predictions.json`` hold one row per case with ``status`` ``ok`` or
``error`` and the error message: a case that fails is reported, never dropped. Case ids come from
the file name, made file-name safe (DICOM header ids are never used).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from medseg.data.overlay import overlay
from medseg.errors import DataError, MedsegError, ModelError, RunExistsError
from medseg.io import list_image_files, read_image, to_channels
from medseg.utils import atomic_path, atomic_write_json, atomic_write_text, safe_name

logger = logging.getLogger(__name__)


class Predictor:
    """A loaded model that maps raw NHWC pixels to probabilities and masks or labels.

    Accepts an export folder (``saved_model/`` + ``medseg.json``) or a run folder (its
    ``best.keras`` with the same in-graph preprocessing that export uses).
    """

    def __init__(self, path: str | Path):
        import tensorflow as tf

        path = Path(path)
        if (path / "medseg.json").is_file() and (path / "saved_model").is_dir():
            self.card = json.loads((path / "medseg.json").read_text())
            try:
                loaded = tf.saved_model.load(str(path / "saved_model"))
                self._fn = loaded.signatures["serve"]
            except Exception as e:
                raise ModelError(f"{path}: cannot load the SavedModel ({e})") from None
            self._loaded = loaded
        elif (path / "config.yaml").is_file():
            from medseg.inference.export import preprocessing, serving_function
            from medseg.training.evaluate import load_run_model
            from medseg.training.runs import open_run

            run = open_run(path)
            cfg = run.config()
            model = load_run_model(run)
            splits = json.loads(run.splits_path.read_text()) if run.splits_path.exists() else {}
            self.card = {
                "task": cfg.data.task,
                "classes": splits.get("class_names", []),
                "input": {"channels": int(model.input_shape[-1])},
                "threshold": cfg.predict.threshold,
                "num_outputs": int(model.output_shape[-1]),
            }
            self._fn = serving_function(
                model, cfg.data.task, preprocessing(cfg), cfg.predict.threshold
            )
        else:
            raise ModelError(
                f"{path}: not a medseg export (saved_model/ + medseg.json) or run folder"
            )
        self.task: str = self.card["task"]
        self.channels: int = int(self.card["input"]["channels"])
        self.classes: list[str] = list(self.card.get("classes") or [])

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on float32 ``[N, H, W, C]`` raw pixels."""
        out = self._fn(image=np.ascontiguousarray(images, np.float32))
        return {k: np.asarray(v) for k, v in out.items()}


@dataclass
class PredictResult:
    """Summary of a batch: the output folder and the rows of ``predictions.csv``."""

    out_dir: Path
    rows: list[dict]

    @property
    def n_failed(self) -> int:
        return sum(r["status"] != "ok" for r in self.rows)


def collect_inputs(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders into the list of input files, in order.

    Raises:
        DataError: an input does not exist, or a folder holds no supported file.
    """
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = list_image_files(item)
            masks = [f for f in found if f.stem.endswith("_mask")]
            if masks:
                logger.info("%s: skipping %d mask files (*_mask.*)", item, len(masks))
            found = [f for f in found if not f.stem.endswith("_mask")]
            if not found:
                raise DataError(f"{item}: folder holds no image or DICOM files")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: input not found")
    return files


def _case_ids(files: list[Path]) -> list[str]:
    ids, seen = [], set()
    for f in files:
        base = safe_name(f.stem)
        case, n = base, 1
        while case in seen:
            n += 1
            case = f"{base}_{n}"
        seen.add(case)
        ids.append(case)
    return ids


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        PILImage.fromarray(array).save(tmp)


def _write_nifti(path: Path, mask: np.ndarray, spacing) -> None:
    import nibabel as nib

    zooms = tuple(spacing) if spacing and len(spacing) == 3 else (1.0, 1.0, 1.0)
    data = np.transpose(mask.astype(np.uint8), (2, 1, 0))  # (slice,row,col) -> (col,row,slice)
    affine = np.diag([zooms[2], zooms[1], zooms[0], 1.0])
    img = nib.Nifti1Image(data, affine)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _predict_case(
    predictor: Predictor, path: Path, case_dir: Path, batch_size: int, write_overlays: bool
) -> dict:
    image = read_image(path)
    arr = to_channels(image.array, predictor.channels)
    volume = arr if image.is_volume else arr[np.newaxis]
    outputs = [predictor(volume[i : i + batch_size]) for i in range(0, len(volume), batch_size)]
    row: dict = {"slices": len(volume), "height": volume.shape[1], "width": volume.shape[2]}
    if predictor.task == "classification":
        probs = np.concatenate([o["probabilities"] for o in outputs]).mean(axis=0)
        names = predictor.classes or [str(i) for i in range(len(probs))]
        row.update(label=int(probs.argmax()), **{"class": names[int(probs.argmax())]})
        row.update({f"p_{n}": round(float(p), 6) for n, p in zip(names, probs, strict=True)})
        return row
    mask = np.concatenate([o["mask"] for o in outputs]).astype(np.uint8)
    binary = predictor.card.get("num_outputs", 1) == 1
    fg = int((mask > 0).sum())
    row.update(foreground_pixels=fg, foreground_fraction=round(fg / mask.size, 6))
    spacing = image.meta.spacing
    if spacing and len(spacing) == 3:
        row["foreground_ml"] = round(fg * float(np.prod(spacing)) / 1000.0, 4)
    elif spacing:
        row["foreground_mm2"] = round(fg * float(np.prod(spacing)), 3)
    case_dir.mkdir(parents=True, exist_ok=True)
    if image.is_volume:
        _write_nifti(case_dir / "mask.nii.gz", mask, spacing)
        row["mask"] = f"{case_dir.name}/mask.nii.gz"
    else:
        _write_png(case_dir / "mask.png", mask[0] * 255 if binary else mask[0])
        row["mask"] = f"{case_dir.name}/mask.png"
    if write_overlays:
        k = int((mask > 0).reshape(len(mask), -1).sum(1).argmax())
        _write_png(case_dir / "overlay.png", overlay(volume[k], mask[k]))
    return row


FIELDS = [
    "case_id",
    "source",
    "status",
    "error",
    "slices",
    "height",
    "width",
    "foreground_pixels",
    "foreground_fraction",
    "foreground_mm2",
    "foreground_ml",
    "mask",
    "label",
    "class",
]


def _write_tables(out: Path, rows: list[dict]) -> None:
    fields = FIELDS + sorted({k for r in rows for k in r if k not in FIELDS})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    atomic_write_text(out / "predictions.csv", buf.getvalue())
    atomic_write_json(out / "predictions.json", rows)


def predict(
    model: str | Path,
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    overlays: bool = True,
    overwrite: bool = False,
) -> PredictResult:
    """Predict every input with ``model`` and write per-case outputs and the tables.

    Args:
        model: export folder or run folder.
        inputs: files and folders.
        out_dir: output folder; must be new or empty unless ``overwrite``.
        batch_size: images or slices per model call.
        overlays: write overlay PNGs.
        overwrite: allow writing into a non-empty ``out_dir``.

    Returns:
        The output folder and the per-case rows (failed cases have ``status == "error"``).
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunExistsError(f"{out}: output folder is not empty; pass --overwrite to write there")
    files = collect_inputs(inputs)
    predictor = Predictor(model)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case_id, path in zip(_case_ids(files), files, strict=True):
        row = {"case_id": case_id, "source": str(path), "status": "ok", "error": ""}
        try:
            row.update(_predict_case(predictor, path, out / case_id, batch_size, overlays))
        except MedsegError as e:
            row.update(status="error", error=str(e))
            logger.error("%s", e)
        rows.append(row)
        logger.info("%s: %s", case_id, row["status"])
    _write_tables(out, rows)
    result = PredictResult(out, rows)
    logger.info("predicted %d cases (%d failed) -> %s", len(rows), result.n_failed, out)
    return result
