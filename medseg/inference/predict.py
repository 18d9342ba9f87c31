"""Batch inference on files and folders (``medseg predict``).

Cases
    :func:`collect_cases` turns the inputs (files and folders) into cases. A file given by name
    is one case. A folder is walked (sub-folders too; hidden files and folders, ``DICOMDIR``
    and obvious non-images such as ``.txt``/``.json`` are skipped; files named ``*_mask.*`` are
    masks of a dataset and are skipped with a count in the log). In each folder:

    * the single-frame DICOM files (``.dcm`` or the ``DICM`` marker; headers are read first)
      are grouped by SeriesInstanceUID: a group of two or more files with image positions is a
      DICOM series case, read with :func:`medseg.io.read_dicom_series` (several series in one
      folder are several cases; a series is read within its own folder, a series spread over
      sub-folders gives one case per folder). A group of one file, and the files of a group
      without any ImagePositionPatient (projection images, secondary captures), are 2D cases;
    * multi-frame DICOM files and NIfTI files are volume cases, plain images (PNG, JPEG, TIFF,
      BMP) 2D cases (a multi-page TIFF is a volume);
    * a file whose DICOM header cannot be read, or a ``.dcm`` file that is not DICOM, is an
      error case: it gets a row with ``status`` ``error`` and the file in ``error``.

    Case ids are file-name safe and unique (``_2``, ``_3``, ... on a clash): the file name
    without its suffix for files; ``<folder>_<SeriesNumber>`` for a series (or
    ``<folder>_<8 hex digits of the SHA-256 of the SeriesInstanceUID>`` when the series has no
    number or shares it with another series of the folder). DICOM header values that identify
    the patient (PatientName, PatientID, birth and study dates, ...) are never used in names,
    tables or logs, unless ``keep_identifiers`` asks for DICOM cases named after the PatientID
    (still file-name safe) and ``patient_id``/``patient_name``/``study_date`` columns.

Prediction
    Volumes are predicted slice by slice, cut along the model's ``data.slice_axis`` as in
    training (axis 0, 1 or 2 of the ``(slice, row, col, C)`` array of :mod:`medseg.io`; see
    :func:`medseg.data.volumes.reslice`), ``batch_size`` slices per model call, and stacked back
    in the source geometry. Binary masks use the model's threshold, or ``threshold`` when given
    (applied to the returned probabilities); multi-class masks are the argmax. A 2.5D model
    (``data.context_slices`` = ``k``) gets each slice with its ``k`` neighbours on each side:
    the neighbouring slices of a volume, or, for a 2D image, the neighbouring 2D images of its
    folder in natural file-name order (a folder of slices is one volume, as in the ``lgg``
    layout; edges repeated as in training). ``min_lesion_voxels`` and
    ``largest_component`` then post-process the mask (:mod:`medseg.inference.postprocess`:
    connected components in 3D for volumes, in 2D for images).

Outputs under ``<out>/<case-id>/`` (written into a hidden temporary folder that is renamed into
place when the case succeeds, so a failed or killed case leaves no partial folder):

* segmentation, 2D: ``mask.png`` (binary: 0/255; label maps: the labels) and ``overlay.png``;
* segmentation, volumes: ``mask.nii.gz`` in the source geometry (NIfTI input: the input's own
  voxel order and affine; DICOM: voxel order (col, row, slice) with the series' affine in RAS;
  see :func:`medseg.io.writers.write_mask_nifti`) and ``overlay.png`` of the slice with
  the most foreground; for a DICOM series also ``seg.dcm``, a DICOM SEG (BINARY, segment
  ``"tumour"`` for a binary model) referencing the source SOP instances;
* classification: the class probabilities, in the tables only; for a volume (series, NIfTI,
  multi-frame) the probabilities are the mean over its slices.

Cases are read and predicted one at a time (a series reads only its own files), so memory holds
one case whatever the size of the batch. A batch that is interrupted (``kill -9``, a full disk)
is continued by the same call: finished cases are recorded in ``<out>/.medseg-predict/`` and not
predicted again (:class:`_Batch`); a full disk stops the batch with an
:class:`~medseg.errors.OutputError` naming the case folder, leaving no partial file.

``predictions.csv`` and ``predictions.json`` hold one row per case with ``status`` ``ok`` or
``error`` and the error message: a case that fails (a :class:`~medseg.errors.MedsegError`, or any
other exception, reported as ``<type>: <message>``) is reported, never dropped, and the batch goes
on. Rows of segmentation cases carry ``foreground_pixels`` (voxels), ``foreground_fraction``,
``foreground_mm2`` (2D, spacing known) or ``foreground_ml`` (volumes, spacing known) and, for
volumes, ``slices_with_foreground``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.overlay import overlay
from medseg.data.scan import natural_key
from medseg.data.volumes import context_indices, reslice, stack_slices, unreslice
from medseg.errors import (
    ConfigError,
    DataError,
    MedsegError,
    ModelError,
    OutputError,
    RunExistsError,
)
from medseg.inference.explain import heatmap_overlay
from medseg.inference.postprocess import apply_threshold, check_threshold, postprocess
from medseg.inference.uncertainty import (
    mc_predict,
    predictive_entropy,
    segmentation_uncertainty,
    uncertainty_display,
)
from medseg.io import (
    IMAGE_SUFFIXES,
    Image,
    image_suffix,
    is_dicom,
    read_dicom_files,
    read_image,
    to_channels,
)
from medseg.io.base import PLAIN_SUFFIXES, raise_walk_error
from medseg.io.dicom_series import NON_IMAGE_NAMES, NON_IMAGE_SUFFIXES
from medseg.io.writers import (
    write_mask_nifti,
    write_mask_png,
    write_png,
    write_seg,
    write_tables,
)
from medseg.utils import (
    atomic_write_json,
    disk_full_error,
    is_disk_full,
    remove_stale_temps,
    safe_name,
)

logger = logging.getLogger(__name__)


class Predictor:
    """A loaded model that maps raw NHWC pixels to probabilities and masks or labels.

    Accepts an export folder (``saved_model/`` + ``medseg.json``), a run folder (its checkpoint
    with the same in-graph preprocessing that export uses) or a ``medseg cv`` run folder (the
    mean-probability ensemble of its fold checkpoints, as ``medseg export`` would build it).

    Args:
        path: the folder.
        checkpoint: ``best`` or ``last`` (run and CV folders).
        tta: also average over the horizontal flip (run and CV folders; an export was built
            with or without it, see its ``medseg.json``).

    Attributes:
        channels: channels of one slice the model takes (raw images are converted to them).
        context_slices: ``k`` of a 2.5D model (``data.context_slices``): it takes each slice
            with ``k`` neighbours on each side, ``channels * (2k + 1)`` channels; 0 for 2D.
    """

    context_slices: int = 0

    def __init__(self, path: str | Path, *, checkpoint: str = "best", tta: bool = False):
        import tensorflow as tf

        path = Path(path)
        self.path = path
        self._keras: list | None = None
        self._gradcam = None
        if (path / "medseg.json").is_file() and (path / "saved_model").is_dir():
            try:
                self.card = json.loads((path / "medseg.json").read_text())
                if "task" not in self.card or "channels" not in self.card["input"]:
                    raise ValueError("no 'task' or 'input.channels'")
            except (OSError, ValueError, TypeError, KeyError) as e:
                reason = " ".join(str(e).split())[:200]
                card = path / "medseg.json"
                raise ModelError(f"{card}: not a readable medseg model card ({reason})") from None
            if tta and not (self.card.get("tta") or {}).get("enabled"):
                raise ConfigError(
                    f"{path}: this export has no test-time augmentation; export the run again "
                    "with --tta, or leave --tta out"
                )
            try:
                loaded = tf.saved_model.load(str(path / "saved_model"))
                self._fn = loaded.signatures["serve"]
            except Exception as e:
                raise ModelError(f"{path}: cannot load the SavedModel ({e})") from None
            self._loaded = loaded
            from medseg.inference.export import prep_from_card

            self.prep = prep_from_card(self.card)
        elif (path / "config.yaml").is_file():
            from medseg.artifacts.cv import load_ensemble
            from medseg.artifacts.runs import load_run_model, open_run
            from medseg.data.split import load_manifest
            from medseg.inference.export import preprocessing, serving_function
            from medseg.models.fold import fold_batch_norm
            from medseg.models.loading import load_keras_model

            if checkpoint not in ("best", "last"):
                raise ConfigError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
            run = open_run(path)
            cfg = run.config()
            if (path / "ensemble.json").is_file():
                files = [f.parent / f"{checkpoint}.keras" for f in load_ensemble(path)]
                missing = [f for f in files if not f.is_file()]
                if missing:
                    raise ModelError(f"{missing[0]}: fold checkpoint not found")
                models = [load_keras_model(f) for f in files]
            else:
                models = [load_run_model(run, checkpoint)]
            model = models[0]
            splits = load_manifest(run.splits_path) if run.splits_path.exists() else {}
            self.card = {
                "task": cfg.data.task,
                "classes": splits.get("class_names", []),
                "input": {"channels": int(model.input_shape[-1])},
                "threshold": cfg.predict.threshold,
                "num_outputs": int(model.output_shape[-1]),
                "layout": cfg.data.layout,
                "slice_axis": cfg.data.slice_axis,
                "context_slices": cfg.data.context_slices,
                "checkpoint": checkpoint,
                "tta": {"enabled": bool(tta)},
                "ensemble": {"folds": len(models)} if len(models) > 1 else None,
            }
            self.prep = preprocessing(cfg)
            self._keras = models
            folded = [fold_batch_norm(m) for m in models]
            self._fn = serving_function(
                folded,
                cfg.data.task,
                self.prep,
                cfg.predict.threshold,
                tta=tta,
            )
        else:
            raise ModelError(
                f"{path}: not a medseg export (saved_model/ + medseg.json) or run folder"
            )
        self.task: str = self.card["task"]
        # 2.5D models (data.context_slices = k) take 2k + 1 slices of `channels` channels each
        self.context_slices = int(self.card.get("context_slices") or 0)
        self.channels: int = int(self.card["input"]["channels"]) // (2 * self.context_slices + 1)
        self.classes: list[str] = list(self.card.get("classes") or [])

    def model_input(self, images: np.ndarray) -> np.ndarray:
        """``[N, H, W, C]`` raw pixels (the slices of one volume, in order, for a 2.5D model)
        -> what the model takes: the model's channels per slice, neighbours stacked."""
        return stack_slices(to_channels(images, self.channels), self.context_slices)

    def keras_models(self) -> list:
        """The Keras model(s) behind this predictor (one per fold for an ensemble export), for
        the tools that need the Keras graph: MC-dropout and Grad-CAM."""
        if self._keras is None:
            from medseg.models.loading import load_keras_model

            keras_card = self.card.get("keras") or {}
            files = keras_card.get("files") or []
            if not files:
                raise ModelError(
                    f"{self.path}: this export has no Keras copy (model.keras); re-export it, "
                    "or pass the run folder as --model"
                )
            hashes = keras_card.get("sha256") or {}
            # only files inside the export folder; checksum from the card; safe mode
            self._keras = [load_keras_model(self._inside(f), hashes.get(f) or None) for f in files]
        return self._keras

    def _inside(self, name: str) -> Path:
        """``name`` (from the model card) as a file inside the export folder, never outside."""
        path = (self.path / name).resolve()
        if not path.is_relative_to(self.path.resolve()):
            raise ModelError(
                f"{self.path / 'medseg.json'}: names a file outside the export folder: {name}"
            )
        return path

    def gradcam(self):
        """A Grad-CAM explainer of the (first) Keras model, built once."""
        if self._gradcam is None:
            from medseg.inference.explain import GradCAM

            self._gradcam = GradCAM(self.keras_models()[0])
        return self._gradcam

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on float32 ``[N, H, W, C]`` raw pixels."""
        out = self._fn(image=np.ascontiguousarray(images, np.float32))
        return {k: np.asarray(v) for k, v in out.items()}


class EnsemblePredictor:
    """The mean of several models' probabilities, as one :class:`Predictor` (``--with``).

    For recipes trained as separate runs whose out-of-fold ensemble ``medseg tune --with``
    measured (e.g. a 2D and a 2.5D U-Net): each member is fed as it is served (its own
    channels and neighbouring slices), its probabilities at the input resolution are averaged,
    and binary masks are the mean above the first model's threshold (multi-class: the argmax).
    :meth:`model_input` puts the members' inputs side by side along the channel axis, so the
    slices of a volume can be batched as for one model; :meth:`__call__` splits them again.

    Args:
        members: the loaded models, first the one whose threshold and card are used.

    Raises:
        DataError: the models' tasks, classes or numbers of outputs differ.
        ConfigError: the models cut volumes along different axes (``data.slice_axis``).
    """

    def __init__(self, members: list[Predictor]):
        first = members[0]
        check_same_outputs(members)
        axes = {int(m.card.get("slice_axis") or 0) for m in members}
        if len(axes) > 1:
            raise ConfigError(
                f"{first.path}: the models cut volumes along different axes (data.slice_axis "
                f"{sorted(axes)}); an ensemble needs one slice axis"
            )
        self.members = members
        self.path = first.path
        self.task: str = first.task
        self.classes: list[str] = first.classes
        self.threshold = float(first.card.get("threshold", 0.5))
        # the widest neighbourhood: a 2D member takes the middle slice of it
        self.context_slices: int = max(m.context_slices for m in members)
        self._widths = [int(m.card["input"]["channels"]) for m in members]
        self.card = dict(first.card, ensemble_of=[str(m.path) for m in members])

    def model_input(self, images: np.ndarray) -> np.ndarray:
        """``[N, H, W, C]`` raw pixels -> every member's input, concatenated along channels."""
        return np.concatenate([m.model_input(images) for m in self.members], axis=-1)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run every member on its part of :meth:`model_input`; the mean probabilities."""
        start, probs = 0, []
        for member, width in zip(self.members, self._widths, strict=True):
            probs.append(member(images[..., start : start + width])["probabilities"])
            start += width
        mean = np.mean(probs, axis=0).astype(np.float32)
        if self.task == "classification":
            return {"probabilities": mean, "label": mean.argmax(-1).astype(np.int32)}
        if mean.shape[-1] == 1:
            mask = (mean[..., 0] > self.threshold).astype(np.int32)
        else:
            mask = mean.argmax(-1).astype(np.int32)
        return {"probabilities": mean, "mask": mask}

    def keras_models(self) -> list:
        raise ConfigError(
            "--mc-samples and --explain take one model; not an ensemble of models (--with)"
        )

    def gradcam(self):
        return self.keras_models()


def check_same_outputs(members: list[Predictor]) -> None:
    """Refuse to average models of different tasks, classes or numbers of outputs.

    Raises:
        DataError: naming the first model that differs from the first one.
    """
    first = members[0]
    for m in members[1:]:
        same = m.task == first.task and m.classes == first.classes
        same = same and m.card.get("num_outputs") == first.card.get("num_outputs")
        if not same:
            raise DataError(
                f"{m.path}: its task, classes or outputs differ from those of {first.path}; an "
                "ensemble averages the probabilities of models of the same outputs"
            )


@dataclass
class PredictResult:
    """Summary of a batch: the output folder, the rows of ``predictions.csv`` and the speed.

    Attributes:
        out_dir: the output folder.
        rows: one dict per case (``status`` ``ok`` or ``error``).
        n_slices: images and volume slices that went through the model.
        model_seconds: time spent in model calls (reading and writing not included).
        wall_seconds: the whole batch, end to end (read + preprocess + predict + write).
    """

    out_dir: Path
    rows: list[dict]
    n_slices: int = 0
    model_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return sum(r["status"] != "ok" for r in self.rows)

    @property
    def slices_per_second(self) -> float:
        """Model throughput over the batch (0 when nothing was predicted)."""
        return self.n_slices / self.model_seconds if self.model_seconds > 0 else 0.0

    @property
    def end_to_end_slices_per_second(self) -> float:
        """Slices/s of the whole batch: reading, preprocessing, the model and writing."""
        return self.n_slices / self.wall_seconds if self.wall_seconds > 0 else 0.0


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One unit of prediction: an image file, a volume file, a DICOM series, or an error.

    Attributes:
        case_id: file-name safe, unique id; the case's outputs go to ``<out>/<case_id>/``.
        source: the file, or the folder of a series, as the user gave it.
        kind: ``"file"`` (read with :func:`medseg.io.read_image`), ``"series"`` (read with
            :func:`medseg.io.read_dicom_series`) or ``"error"`` (could not be read at all).
        paths: the file, or the files of the series (in file-name order).
        error: why an ``"error"`` case cannot be read.
        series_number: SeriesNumber of a series case.
    """

    case_id: str
    source: str
    kind: str
    paths: tuple[Path, ...]
    error: str = ""
    series_number: int | None = None
    series_uid: str | None = field(default=None, repr=False)
    folder: Path | None = field(default=None, repr=False)
    # The folder holds nothing but the DICOM series it was split into.
    folder_clean: bool = field(default=False, repr=False)
    # PatientID, PatientName, StudyDate: only with keep_identifiers (see collect_cases)
    identifiers: dict | None = field(default=None, repr=False)


@dataclass
class _Header:
    """What case discovery needs from a DICOM file's header (never patient data)."""

    path: Path
    series_uid: str | None
    series_number: int | None
    frames: int
    positioned: bool


def collect_cases(inputs: list[str | Path], *, keep_identifiers: bool = False) -> list[Case]:
    """Expand files and folders into cases (see the module docstring), with unique ids.

    Args:
        inputs: files and folders.
        keep_identifiers: name DICOM cases after the patient, ``<PatientID>_<usual id>``
            (made file-name safe: no separators, at most 64 characters), and carry
            ``patient_id``, ``patient_name`` and ``study_date`` into the rows. Off by default:
            case ids, tables and logs then hold no DICOM patient or study data.

    Raises:
        DataError: an input does not exist, or a folder holds no supported file.
    """
    cases: list[Case] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found, masks = _walk(item)
            if masks:
                logger.info("%s: skipping %d mask files (*_mask.*)", item, masks)
            if not found:
                raise DataError(f"{item}: folder holds no image or DICOM files")
            cases.extend(found)
        elif item.is_file():
            cases.append(Case(_stem(item), str(item), "file", (item,)))
        else:
            raise DataError(f"{item}: input not found")
    if keep_identifiers:
        _name_after_patients(cases)
    seen: set[str] = set()
    for case in cases:
        base = safe_name(case.case_id)
        case_id, n = base, 1
        while case_id in seen:
            n += 1
            case_id = f"{base}_{n}"
        seen.add(case_id)
        case.case_id = case_id
    return cases


def _walk(root: Path) -> tuple[list[Case], int]:
    cases: list[Case] = []
    masks = 0
    for folder, dirs, files in os.walk(root, onerror=raise_walk_error):  # never skip silently
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found, n = _folder_cases(Path(folder), sorted(files))
        cases.extend(found)
        masks += n
    return cases, masks


def _folder_cases(folder: Path, names: list[str]) -> tuple[list[Case], int]:
    """The cases directly in ``folder`` and the number of mask files skipped."""
    singles: list[Case] = []  # files and errors, in file-name order
    headers: list[_Header] = []
    masks = 0
    clean = True  # every file _scan of read_dicom_series would look at is a series slice
    for name in names:
        path = folder / name
        if name.startswith(".") or name.lower() in NON_IMAGE_NAMES:
            continue
        suffix = image_suffix(path)
        if suffix in NON_IMAGE_SUFFIXES:
            continue
        if _stem(path).endswith("_mask"):
            masks += 1
            clean = False
            continue
        dicom = suffix == ".dcm" or (suffix not in IMAGE_SUFFIXES and is_dicom(path))
        if not dicom:
            clean = False
            if suffix in IMAGE_SUFFIXES:
                singles.append(Case(_stem(path), str(path), "file", (path,)))
            else:
                logger.debug("%s: skipped (not an image)", path)
            continue
        try:
            header = _read_header(path)
        except DataError as e:
            clean = False
            singles.append(Case(_stem(path), str(path), "error", (path,), error=str(e)))
            continue
        if header is None:  # a DICOM object without an image (SR, ...); the reader skips it too
            continue
        if header.frames > 1 or header.series_uid is None:
            clean = False
            singles.append(Case(_stem(path), str(path), "file", (path,)))
        else:
            headers.append(header)

    groups: dict[str, list[_Header]] = {}
    for header in headers:
        groups.setdefault(header.series_uid, []).append(header)
    series: list[list[_Header]] = []
    for group in groups.values():
        if len(group) > 1 and any(h.positioned for h in group):
            series.append(group)
        else:
            if len(group) > 1:
                logger.info(
                    "%s: %d DICOM files of one series without ImagePositionPatient; predicted "
                    "as separate 2D images",
                    folder,
                    len(group),
                )
                clean = False
            singles.extend(Case(_stem(h.path), str(h.path), "file", (h.path,)) for h in group)
    singles.sort(key=lambda c: c.paths[0].name)

    numbers = [g[0].series_number for g in series]
    series.sort(key=lambda g: (g[0].series_number is None, g[0].series_number or 0, g[0].path))
    cases = []
    folder_name = folder.resolve().name
    for group in series:
        uid, number = group[0].series_uid, group[0].series_number
        if number is not None and numbers.count(number) == 1:
            tag = str(number)
        else:
            tag = hashlib.sha256(str(uid).encode()).hexdigest()[:8]
        cases.append(
            Case(
                f"{folder_name}_{tag}",
                str(folder),
                "series",
                tuple(h.path for h in group),
                series_number=number,
                series_uid=uid,
                folder=folder,
                folder_clean=clean,
            )
        )
    return cases + singles, masks


def _read_header(path: Path) -> _Header | None:
    """The header of a DICOM file (no pixel data); None for DICOM objects without an image.

    Raises:
        DataError: the file is empty, not DICOM, or its header is truncated or corrupt.
    """
    import pydicom
    from pydicom.uid import UID

    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    marker = is_dicom(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=not marker)
            rows, columns = ds.get("Rows"), ds.get("Columns")
            uid = ds.get("SeriesInstanceUID")
            number = ds.get("SeriesNumber")
            frames = ds.get("NumberOfFrames")
            positioned = "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds
            sop = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    except Exception as e:
        reason = str(e).split("\n")[0].strip() or type(e).__name__
        raise DataError(f"{path}: DICOM header is truncated or corrupt ({reason})") from None
    if rows is None or columns is None:
        if not marker:
            raise DataError(f"{path}: not a DICOM image (no 'DICM' marker and no image size)")
        kind = UID(str(sop)).name if sop else ""
        if kind and kind != str(sop) and "Image" not in kind:
            logger.warning("%s: skipped, a DICOM object without an image (%s)", path, kind)
            return None
        raise DataError(f"{path}: DICOM header is truncated or corrupt (no Rows/Columns)")
    return _Header(
        path=path,
        series_uid=str(uid) if uid else None,
        series_number=_int_or_none(number),
        frames=max(_int_or_none(frames) or 1, 1),
        positioned=positioned,
    )


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


def _stem(path: Path) -> str:
    """File name without its suffix (both of ``.nii.gz``)."""
    name = path.name
    if image_suffix(path) == ".nii.gz":
        return name[: -len(".nii.gz")]
    return path.stem


def _name_after_patients(cases: list[Case]) -> None:
    """``keep_identifiers``: prefix the ids of DICOM cases with their PatientID and attach the
    patient's identifiers (the ids are made file-name safe afterwards)."""
    import pydicom

    for case in cases:
        if case.kind not in ("series", "file") or not (
            case.kind == "series" or is_dicom(case.paths[0])
        ):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(
                    case.paths[0],
                    stop_before_pixels=True,
                    specific_tags=["PatientID", "PatientName", "StudyDate"],
                )
        except Exception:  # the reader reports unreadable files in the case's row
            continue
        ids = {
            "patient_id": str(ds.get("PatientID") or ""),
            "patient_name": str(ds.get("PatientName") or ""),
            "study_date": str(ds.get("StudyDate") or ""),
        }
        case.identifiers = ids
        if ids["patient_id"]:
            case.case_id = f"{ids['patient_id']}_{case.case_id}"


# --------------------------------------------------------------------------- reading


class _Reader:
    """Reads cases, one at a time: a series case reads only its own files, so memory holds one
    case's pixels whatever the number of cases or of series in a folder."""

    def read(self, case: Case) -> Image:
        if case.kind != "series":
            return read_image(case.paths[0])
        return _read_series_alone(case)


def _read_series_alone(case: Case) -> Image:
    """Read the files of one series on their own (its folder may hold other, broken files)."""
    assert case.folder is not None
    images = read_dicom_files(case.paths, folder=case.folder)
    if len(images) != 1:
        raise DataError(f"{case.folder}: the files of series {case.series_number} split apart")
    image = images[0]
    image.meta.extra["folder"] = str(case.folder)
    return image


# --------------------------------------------------------------------------- predicting


@dataclass
class _Options:
    batch_size: int
    overlays: bool
    threshold: float | None
    largest_component: bool
    min_lesion_voxels: int
    mc_samples: int = 0
    explain: bool = False


@dataclass
class _Clock:
    slices: int = 0
    seconds: float = 0.0


def _run_model(
    predictor: Predictor | EnsemblePredictor, images: np.ndarray, opts: _Options, clock: _Clock
):
    """Yield the model outputs for ``images`` (:meth:`Predictor.model_input`), in batches."""
    for i in range(0, len(images), opts.batch_size):
        batch = images[i : i + opts.batch_size]
        t0 = time.perf_counter()
        out = predictor(batch)
        clock.seconds += time.perf_counter() - t0
        clock.slices += len(batch)
        yield out


def _folder_slices(folder: Path) -> list[Path]:
    """The 2D image files (PNG, JPEG, TIFF, BMP; no ``*_mask.*``) of ``folder`` in natural
    file-name order: the slices of one volume for a 2.5D model."""
    files = [
        p
        for p in folder.iterdir()
        if not p.name.startswith(".")
        and image_suffix(p) in PLAIN_SUFFIXES
        and not _stem(p).endswith("_mask")
        and p.is_file()
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def _context_input(
    predictor: Predictor | EnsemblePredictor, image: Image, case: Case
) -> np.ndarray:
    """The 2.5D model input ``[1, H, W, C * (2k + 1)]`` of a 2D image: the image with its
    ``k`` neighbours on each side among the slices of its folder (:func:`_folder_slices`),
    stacked as in training (edges repeated)."""
    k = predictor.context_slices
    path = case.paths[0]
    slices = _folder_slices(path.parent) if image_suffix(path) in PLAIN_SUFFIXES else []
    names = [p.name for p in slices]
    if path.name not in names or len(slices) < 2 * k + 1:
        raise DataError(
            f"{case.source}: a 2D image, but the model takes {2 * k + 1} neighbouring slices "
            f"(data.context_slices={k}) and its folder holds {len(slices)} 2D slice file(s); "
            "give it a volume (NIfTI file, DICOM series) or a folder of a volume's slices "
            "(PNG/TIFF, one volume per folder, in file-name order)"
        )
    raw = []
    for i in context_indices(len(slices), k)[names.index(path.name)]:
        other = slices[i]
        array = image.array if other.name == path.name else read_image(other).array
        if array.shape != image.array.shape:
            raise DataError(
                f"{other}: shape {array.shape} differs from its neighbouring slice "
                f"{case.source} {image.array.shape}; a 2.5D model needs equal slices"
            )
        raw.append(array)
    return predictor.model_input(np.stack(raw))[k : k + 1]


def _predict_case(
    predictor: Predictor | EnsemblePredictor,
    image: Image,
    case: Case,
    case_dir: Path,
    opts: _Options,
    clock: _Clock,
) -> dict:
    source = image.array if image.is_volume else image.array[np.newaxis]
    row: dict = {"slices": len(source), "height": source.shape[1], "width": source.shape[2]}
    # a volume is cut along the model's data.slice_axis, as in training; masks go back
    axis = int(predictor.card.get("slice_axis") or 0) if image.is_volume else 0
    volume = reslice(source, axis)
    if predictor.context_slices and not image.is_volume:
        images = _context_input(predictor, image, case)
    else:
        images = predictor.model_input(volume)
    if predictor.task == "classification":
        probs = [o["probabilities"] for o in _run_model(predictor, images, opts, clock)]
        mean = np.concatenate(probs).mean(axis=0)  # a volume: the mean over its slices
        names = predictor.classes or [str(i) for i in range(len(mean))]
        row.update(label=int(mean.argmax()), **{"class": names[int(mean.argmax())]})
        row.update({f"p_{n}": round(float(p), 6) for n, p in zip(names, mean, strict=True)})
        if opts.mc_samples:
            r = mc_predict(
                predictor.keras_models(),
                images,
                opts.mc_samples,
                prep=predictor.prep,
                batch_size=opts.batch_size,
            )
            row["uncertainty"] = round(float(predictive_entropy(r["mean"].mean(axis=0))), 6)
        if opts.explain:
            k = len(volume) // 2
            heat = predictor.gradcam()(
                images[k : k + 1], class_index=row["label"], prep=predictor.prep
            )
            case_dir.mkdir(parents=True, exist_ok=True)
            write_png(case_dir / "gradcam.png", heatmap_overlay(volume[k], heat[0]))
            row["gradcam"] = f"{case.case_id}/gradcam.png"
        return row

    n_out = int(predictor.card.get("num_outputs", 1))
    binary = n_out == 1
    dtype = np.uint8 if n_out <= 256 else np.int32
    parts = []
    for out in _run_model(predictor, images, opts, clock):
        if binary and opts.threshold is not None:
            parts.append(apply_threshold(out["probabilities"], opts.threshold))
        else:
            parts.append(out["mask"].astype(dtype))
    mask = unreslice(np.concatenate(parts).astype(dtype), axis)
    if image.is_volume:
        mask = postprocess(
            mask,
            min_size_voxels=opts.min_lesion_voxels,
            largest_component=opts.largest_component,
        )
    else:
        mask[0] = postprocess(
            mask[0],
            min_size_voxels=opts.min_lesion_voxels,
            largest_component=opts.largest_component,
        )

    per_slice = (mask > 0).reshape(len(mask), -1).sum(axis=1)
    fg = int(per_slice.sum())
    row.update(foreground_pixels=fg, foreground_fraction=round(fg / mask.size, 6))
    spacing = image.meta.spacing
    case_dir.mkdir(parents=True, exist_ok=True)
    if image.is_volume:
        row["slices_with_foreground"] = int((per_slice > 0).sum())
        if spacing and len(spacing) == 3:
            row["foreground_ml"] = round(fg * float(np.prod(spacing)) / 1000.0, 4)
        row["mask_geometry"] = write_mask_nifti(case_dir / "mask.nii.gz", mask, image.meta)
        row["mask"] = f"{case.case_id}/mask.nii.gz"
        if case.kind == "series":
            write_seg(
                case_dir / "seg.dcm",
                mask,
                image.meta.source,
                segment_names=_segment_names(predictor, n_out),
                series_number=case.series_number,
            )
            row["seg"] = f"{case.case_id}/seg.dcm"
    else:
        if spacing:
            row["foreground_mm2"] = round(fg * float(np.prod(spacing)), 3)
        write_mask_png(case_dir / "mask.png", mask[0], binary)
        row["mask"] = f"{case.case_id}/mask.png"
    k = int(per_slice.argmax()) if fg else len(mask) // 2
    if opts.overlays:
        write_png(case_dir / "overlay.png", overlay(source[k], mask[k]))
        if image.is_volume:
            row["overlay_slice"] = k
    if opts.mc_samples:
        r = mc_predict(
            predictor.keras_models(),
            images,
            opts.mc_samples,
            prep=predictor.prep,
            batch_size=opts.batch_size,
        )
        variance = unreslice(r["variance_map"], axis)
        row["uncertainty"] = round(float(segmentation_uncertainty(variance, mask > 0)), 6)
        if image.is_volume:
            write_mask_nifti(case_dir / "uncertainty.nii.gz", variance, image.meta, continuous=True)
            row["uncertainty_volume"] = f"{case.case_id}/uncertainty.nii.gz"
        display = uncertainty_display(variance[k])
        write_png(case_dir / "uncertainty.png", heatmap_overlay(source[k], display))
        row["uncertainty_map"] = f"{case.case_id}/uncertainty.png"
    return row


def _segment_names(predictor: Predictor | EnsemblePredictor, n_out: int) -> dict[int, str]:
    if n_out == 1:
        return {1: "tumour"}
    classes = predictor.classes
    return {k: classes[k] if k < len(classes) else f"label {k}" for k in range(1, n_out)}


def _commit(tmp_dir: Path, case_dir: Path) -> None:
    """Move a finished case's temporary folder into place (nothing when it holds nothing)."""
    if not tmp_dir.is_dir():
        return
    if not any(tmp_dir.iterdir()):
        tmp_dir.rmdir()
        return
    if case_dir.exists():
        shutil.rmtree(case_dir)
    os.replace(tmp_dir, case_dir)


def _run_case(
    predictor: Predictor | EnsemblePredictor,
    case: Case,
    reader: _Reader,
    out: Path,
    opts: _Options,
    clock: _Clock,
) -> dict:
    row: dict = {"case_id": case.case_id, "source": case.source, "status": "ok", "error": ""}
    if case.identifiers:  # only with keep_identifiers
        row.update(case.identifiers)
    if case.kind == "series":
        row.update(input_type="dicom_series", series_number=case.series_number)
    if case.kind == "error":
        row.update(status="error", error=case.error)
        logger.error("%s", case.error)
        return row
    tmp_dir = out / f".{case.case_id}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        image = reader.read(case)
        if case.kind != "series":
            row["input_type"] = "volume" if image.is_volume else "image"
        row.update(_predict_case(predictor, image, case, tmp_dir, opts, clock))
        _commit(tmp_dir, out / case.case_id)
    except OutputError as e:
        # a full disk stops the batch: every case after this one would fail the same way
        raise disk_full_error(out / case.case_id) from e
    except MedsegError as e:
        row.update(status="error", error=str(e))
        logger.error("%s", e)
    except Exception as e:  # one bad case must not stop the batch
        if is_disk_full(e):
            raise disk_full_error(out / case.case_id) from e
        message = f"{type(e).__name__}: {e}"
        row.update(status="error", error=f"{case.source}: {message}")
        logger.error("%s: unexpected error: %s", case.case_id, message)
        logger.debug("%s: traceback", case.case_id, exc_info=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("%s: %s (%.2f s)", case.case_id, row["status"], time.perf_counter() - t0)
    return row


def _resolve_options(task: str, card: dict, opts: _Options) -> _Options:
    """``opts`` without the options that do not apply to this model (each with a warning)."""
    threshold, explain = opts.threshold, opts.explain
    if threshold is not None and (task != "segmentation" or int(card.get("num_outputs", 1)) != 1):
        logger.warning(
            "threshold %.3g ignored: it applies to binary segmentation models", threshold
        )
        threshold = None
    if explain and task != "classification":
        logger.warning("--explain applies to classifiers; ignored for this %s model", task)
        explain = False
    return dataclasses.replace(opts, threshold=threshold, explain=explain)


def _prepare_model(predictor: Predictor | EnsemblePredictor, opts: _Options) -> None:
    """Build what ``opts`` needs from the model (Grad-CAM, MC-dropout), so that problems of
    the model with these options fail the run before any case is written."""
    if opts.explain:
        predictor.gradcam()
    if opts.mc_samples:
        from medseg.inference.uncertainty import mc_dropout_model

        for m in predictor.keras_models():
            mc_dropout_model(m)


# --------------------------------------------------------------------------- resumable batches

#: Hidden folder in the output folder of a batch that has not finished (see :class:`_Batch`).
BATCH_STATE = ".medseg-predict"


def _batch_signature(model, inputs: list[str | Path], opts: dict) -> str:
    """What a batch predicts: the model, the inputs and the options that change the outputs."""
    if isinstance(model, (str, Path)):
        model_id = str(Path(model).resolve())
    else:
        model_id = str(getattr(model, "path", None) or type(model).__name__)
    body = {"model": model_id, "inputs": [str(Path(i).resolve()) for i in inputs], **opts}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class _Batch:
    """The progress of a batch, kept in ``<out>/.medseg-predict/`` until it has finished.

    ``state.json`` records what is predicted (:func:`_batch_signature`) and ``rows/<case>.json``
    each finished case's row, written after the case's folder was renamed into place. A batch
    killed part way (``kill -9``, a full disk, a power cut) is continued by the same command: the
    cases with a row are not predicted again, the temporary files of the killed process are
    removed, and ``predictions.csv`` lists every case once. The folder is removed when the tables
    are written; an output folder without it is a finished batch, which only ``overwrite``
    writes into again.
    """

    def __init__(self, out: Path, signature: str):
        self.out, self.signature = out, signature
        self.dir = out / BATCH_STATE
        self.done: dict[str, dict] = {}
        self.resuming = False

    @classmethod
    def open(cls, out: Path, signature: str, overwrite: bool) -> _Batch:
        """Check the output folder before anything is written there.

        Raises:
            RunExistsError: ``out`` holds other files (a finished batch, or an unfinished batch
                of other inputs, model or options) and ``overwrite`` is false.
        """
        batch = cls(out, signature)
        state = _read_json(batch.dir / "state.json")
        if state is not None and not overwrite:
            if state.get("signature") != signature:
                raise RunExistsError(
                    f"{out}: holds an unfinished prediction of other inputs, model or options; "
                    "rerun that command to finish it, or pass --overwrite"
                )
            batch.resuming = True
            batch.done = batch._rows()
            return batch
        others = out.is_dir() and any(p.name != BATCH_STATE for p in out.iterdir())
        if others and not overwrite:
            raise RunExistsError(
                f"{out}: output folder is not empty; pass --overwrite to write there"
            )
        return batch

    def _rows(self) -> dict[str, dict]:
        rows = {}
        for path in sorted((self.dir / "rows").glob("*.json")):
            row = _read_json(path)
            if not isinstance(row, dict) or "case_id" not in row:
                continue
            missing = [
                k for k in ("mask", "seg") if row.get(k) and not (self.out / row[k]).is_file()
            ]
            if not missing:
                rows[row["case_id"]] = row
        return rows

    def start(self) -> None:
        """Create the output folder and record the batch (or, resuming, clean up after the
        killed process)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resuming:
            remove_stale_temps(self.out, recursive=False)
            remove_stale_temps(self.dir)
            logger.info(
                "%s: continuing an interrupted prediction; %d cases already done",
                self.out,
                len(self.done),
            )
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        atomic_write_json(self.dir / "state.json", {"signature": self.signature})

    def commit(self, row: dict) -> dict:
        """Record a finished case's row; returns it."""
        atomic_write_json(self.dir / "rows" / f"{row['case_id']}.json", row)
        return row

    def finish(self) -> None:
        """The tables are written: the batch is finished."""
        shutil.rmtree(self.dir, ignore_errors=True)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


#: Where :func:`predict` runs the cases.
EXECUTORS = ("local", "ray")


def predict(
    model: str | Path | Predictor,
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    overlays: bool = True,
    overwrite: bool = False,
    threshold: float | None = None,
    largest_component: bool = False,
    min_lesion_voxels: int = 0,
    progress: bool = True,
    mc_samples: int = 0,
    explain: bool = False,
    keep_identifiers: bool = False,
    executor: str = "local",
    address: str | None = None,
    ray_workers: int | None = None,
    ensemble_with: list[str | Path] | tuple = (),
) -> PredictResult:
    """Predict every case of ``inputs`` with ``model``; write per-case outputs and the tables.

    Args:
        model: export folder or run folder (or a loaded :class:`Predictor`).
        inputs: files and folders (see :func:`collect_cases`).
        out_dir: output folder; must be new or empty unless ``overwrite``, or hold the
            unfinished batch of the same call (model, inputs, options), which is continued.
        batch_size: images or volume slices per model call.
        overlays: write overlay PNGs.
        overwrite: allow writing into a non-empty ``out_dir`` (a case folder of the same id is
            replaced).
        threshold: foreground threshold in (0, 1) for binary segmentation models, applied to
            the probabilities instead of the model's own (``medseg.json`` / run config);
            ignored, with a warning, for multi-class and classification models.
        largest_component: keep only the largest connected foreground component of each case
            (3D for volumes).
        min_lesion_voxels: remove connected foreground components smaller than this (voxels,
            pixels for 2D images).
        progress: show a progress bar over the cases on stderr (only when it is a terminal).
        mc_samples: MC-dropout passes per case (0: off): adds an ``uncertainty`` column (mean
            voxel variance over the predicted lesion, or the predictive entropy of a
            classifier) and ``uncertainty.png`` (segmentation); needs a model with dropout.
        explain: classifiers: write ``gradcam.png`` (Grad-CAM of the predicted class).
        keep_identifiers: name DICOM cases after the PatientID and add ``patient_id``,
            ``patient_name`` and ``study_date`` to the tables (see :func:`collect_cases`).
            Off by default: no DICOM patient or study data reaches names, tables or logs.
        executor: ``local`` (cases one after another, in this process) or ``ray`` (cases spread
            over a pool of Ray actors that each load the model once; same outputs, see
            :mod:`medseg.inference.ray_predict`).
        address: Ray cluster address (``ray`` only; default: start a local Ray instance).
        ray_workers: number of Ray actors (``ray`` only; default: one per GPU of the cluster,
            else one per CPU).
        ensemble_with: more models (export, run or CV folders) of the same outputs: predict
            with the mean of all the models' probabilities (:class:`EnsemblePredictor`), e.g.
            the 2D and 2.5D recipes whose ensemble ``medseg tune --with`` measured. Not with
            ``mc_samples``, ``explain`` or the ``ray`` executor.

    Returns:
        The output folder, the per-case rows (failed cases have ``status == "error"``) and the
        model throughput.

    Raises:
        RunExistsError: ``out_dir`` is not empty (a finished batch, or an unfinished batch of
            another call) and ``overwrite`` is false.
        OutputError: the output disk is full (the batch can be continued by the same call).
        ConfigError: a bad ``batch_size``, ``threshold``, ``min_lesion_voxels`` or
            ``executor``, ``executor="ray"`` without Ray installed, or ``ensemble_with`` with
            ``mc_samples``, ``explain`` or ``executor="ray"``.
        DataError: an input does not exist, or a folder holds no supported file, or the
            ``ensemble_with`` models' outputs differ from the model's.
        ModelError: the model cannot be loaded.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor: '{executor}' is not one of {', '.join(EXECUTORS)}")
    if mc_samples == 1 or mc_samples < 0:
        raise ConfigError(f"mc_samples must be 0 (off) or >= 2, got {mc_samples}")
    if min_lesion_voxels < 0:
        raise ConfigError(f"min_lesion_voxels must be >= 0, got {min_lesion_voxels}")
    if ensemble_with and (mc_samples or explain or executor == "ray"):
        raise ConfigError(
            "--with (an ensemble of models) works with the local executor, without "
            "--mc-samples and --explain"
        )
    if threshold is not None:
        try:
            threshold = check_threshold(threshold)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    out = Path(out_dir)
    signature = _batch_signature(
        model,
        inputs,
        {
            "overlays": overlays,
            "threshold": threshold,
            "largest_component": largest_component,
            "min_lesion_voxels": min_lesion_voxels,
            "mc_samples": mc_samples,
            "explain": explain,
            "keep_identifiers": keep_identifiers,
            **({"with": [str(Path(m).resolve()) for m in ensemble_with]} if ensemble_with else {}),
        },
    )
    batch = _Batch.open(out, signature, overwrite)  # a finished batch needs overwrite
    cases = collect_cases(inputs, keep_identifiers=keep_identifiers)
    opts = _Options(
        batch_size,
        overlays,
        threshold,
        largest_component,
        int(min_lesion_voxels),
        int(mc_samples),
        explain,
    )
    if executor == "ray":
        from medseg.inference.ray_predict import predict_on_ray

        result = predict_on_ray(
            model,
            cases,
            out,
            opts,
            address=address,
            workers=ray_workers,
            progress=progress,
            batch=batch,  # started once Ray is there; skips and records cases like local
        )
        batch.finish()
        return result
    if address or ray_workers:
        logger.warning("--address and --ray-workers apply to --executor ray; ignored")
    predictor = model if isinstance(model, (Predictor, EnsemblePredictor)) else Predictor(model)
    if ensemble_with:
        predictor = EnsemblePredictor([predictor, *(Predictor(m) for m in ensemble_with)])
    opts = _resolve_options(predictor.task, predictor.card, opts)
    _prepare_model(predictor, opts)
    start = time.perf_counter()
    batch.start()
    reader, clock, rows = _Reader(), _Clock(), []
    show = progress and sys.stderr.isatty()
    bar = tqdm(cases, desc="predict", unit="case", file=sys.stderr, disable=not show)
    redirect = logging_redirect_tqdm() if show else contextlib.nullcontext()
    with redirect, bar:
        for case in bar:
            row = batch.done.get(case.case_id)  # finished before an interruption
            if row is None:
                row = batch.commit(_run_case(predictor, case, reader, out, opts, clock))
            rows.append(row)
    write_tables(out, rows)
    batch.finish()
    result = PredictResult(out, rows, clock.slices, clock.seconds, time.perf_counter() - start)
    logger.info(
        "predicted %d cases (%d failed), %d slices: %.1f slices/s end to end (read, predict, "
        "write), %.1f slices/s in the model -> %s",
        len(rows),
        result.n_failed,
        clock.slices,
        result.end_to_end_slices_per_second,
        result.slices_per_second,
        out,
    )
    return result
