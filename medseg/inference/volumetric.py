"""The volumetric (3D) predictor: a raw volume of any shape and spacing in, a label map of the
same shape out, by sliding window at the model's spacing.

:class:`VolumeModule` is the graph: the ``serve`` signature of a 3D export and what a
:class:`VolumePredictor` runs for a run folder, so the two agree. Its ``tf.function`` takes

* ``volume``: float32 ``[D, H, W, C]`` raw intensities (any shape), axes (slice, row, col) as the
  readers return them;
* ``spacing``: float32 ``[3]``, the (slice, row, col) voxel spacing in mm;

and, in the graph:

1. normalises as the plan says (:func:`medseg.data.resample.normalize_volume` in TensorFlow):
   ``zscore`` per channel over the volume, ``ct`` clipped then scaled with the dataset's mean and
   std, or ``none``;
2. resamples linearly to ``plan.target_spacing`` (separable ``tf.image.resize`` calls with
   half-pixel centres and clamped edges, i.e. scipy's ``zoom(order=1, mode="nearest",
   grid_mode=True)`` as in :mod:`medseg.data.resample`; skipped when the spacing already matches);
3. predicts by sliding window (:func:`medseg.inference.sliding_window.sliding_window_inference`);
4. resamples the probabilities back to the input's shape (linear on probabilities, i.e. linear on
   one-hot maps) and takes the arg-max;

and returns ``{"probabilities": float32 [D, H, W, K], "labels": int32 [D, H, W]}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from medseg.artifacts.cv import ENSEMBLE_NAME
from medseg.artifacts.exports import SAVED_MODEL, SERVE_SIGNATURE, folder_kind, read_card
from medseg.artifacts.runs import RunDir, load_run_model, open_run
from medseg.config import Config
from medseg.data.augment3d import flip_axes
from medseg.data.fingerprint import VolumePlan
from medseg.data.resample import from_standard, standard_orientation, to_standard
from medseg.errors import ConfigError, DataError, ModelError
from medseg.inference.sliding_window import SIGMA_SCALE, mirror_flips, sliding_window_inference
from medseg.models.fold import fold_batch_norm
from medseg.models.loading import load_keras_model
from medseg.models.unet3d import inference_model
from medseg.utils import read_json

logger = logging.getLogger(__name__)

#: Smallest standard deviation a z-score divides by (as :mod:`medseg.data.resample`).
EPS = 1e-8
#: Relative spacing difference below which the volume is not resampled.
SPACING_RTOL = 1e-6
NORMALIZATIONS = ("zscore", "ct", "none")


def _per_channel(values: Sequence[float], channels: int, key: str) -> np.ndarray:
    out = np.asarray(values, dtype=np.float32).reshape(-1)
    if out.size == 1:
        out = np.repeat(out, channels)
    if out.size != channels:
        raise ConfigError(f"plan.{key}: {out.size} values for {channels} channels")
    return out


def normalize_graph(volume: tf.Tensor, plan: VolumePlan) -> tf.Tensor:
    """In-graph normalisation of a float32 ``[D, H, W, C]`` volume as ``plan.normalization``.

    Raises:
        ConfigError: an unknown normalisation, or ``ct`` without its clip, mean and std.
    """
    mode = plan.normalization
    if mode == "none":
        return volume
    if mode == "zscore":
        mean = tf.reduce_mean(volume, axis=[0, 1, 2])
        std = tf.math.reduce_std(volume, axis=[0, 1, 2])
        return (volume - mean) / tf.maximum(std, EPS)
    if mode == "ct":
        clip = [float(v) for v in plan.intensity_clip]
        if len(clip) != 2:
            raise ConfigError(f"plan.intensity_clip: [low, high] needed for ct, got {clip}")
        channels = int(volume.shape[-1])
        mean = _per_channel(plan.channel_mean, channels, "channel_mean")
        std = np.maximum(_per_channel(plan.channel_std, channels, "channel_std"), EPS)
        return (tf.clip_by_value(volume, clip[0], clip[1]) - mean) / std
    raise ConfigError(f"plan.normalization: must be one of {NORMALIZATIONS}, got {mode!r}")


def resized_shape(shape: tf.Tensor, spacing: tf.Tensor, target_spacing: Sequence[float]):
    """In-graph :func:`medseg.data.resample.target_shape`: int32 ``[3]``, rounded (half to even,
    as NumPy), at least 1."""
    size = tf.cast(shape, tf.float64) * tf.cast(spacing, tf.float64)
    size = size / tf.constant(list(target_spacing), tf.float64)
    return tf.cast(tf.maximum(tf.round(size), 1.0), tf.int32)


def resize_volume(volume: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
    """Linear resize of a float32 ``[D, H, W, C]`` volume to ``shape`` ``(D', H', W')``.

    Two ``tf.image.resize`` calls (rows and columns with the slices as the batch, then slices
    with rows x columns flattened); each is bilinear with half-pixel centres and clamped edges,
    so an axis whose size does not change is copied exactly.
    """
    shape = tf.cast(shape, tf.int32)
    x = tf.image.resize(volume, shape[1:3], method="bilinear")  # [D, H', W', C]
    d, c = tf.shape(x)[0], tf.shape(x)[3]
    flat = tf.reshape(x, tf.stack([1, d, shape[1] * shape[2], c]))
    flat = tf.image.resize(flat, tf.stack([shape[0], shape[1] * shape[2]]), method="bilinear")
    return tf.reshape(flat, tf.stack([shape[0], shape[1], shape[2], c]))


class VolumeModule(tf.Module):
    """The served 3D graph: raw volume and spacing in, probabilities and labels out.

    Args:
        model: a Keras 3D segmentation model (input ``[B, D, H, W, C]``, softmax output
            ``[B, D, H, W, K]``; only the first output of a deep-supervision model is used), or
            several (their mean probability: a cross-validation ensemble sharing one plan).
        plan: the run's :class:`~medseg.data.fingerprint.VolumePlan`.
        overlap: sliding-window overlap in ``[0, 1)``.
        sw_batch: windows per model call.
        gaussian: Gaussian importance weighting of the windows.
        mirror: mirror test-time augmentation over these spatial axes (0 slice, 1 row, 2 col;
            every combination of their flips per window; ``True``: all three, 8 flips).

    Raises:
        ModelError: the model's input channels or output classes do not fit the plan.
        ConfigError: a bad plan or sliding-window option.
    """

    def __init__(
        self,
        model: keras.Model | Sequence[keras.Model],
        plan: VolumePlan,
        *,
        overlap: float = 0.5,
        sw_batch: int = 4,
        gaussian: bool = True,
        mirror: bool | Sequence[int] = False,
    ) -> None:
        super().__init__(name="volume_module")
        models = list(model) if isinstance(model, list | tuple) else [model]
        # batch norm folded into the convolutions: the same outputs, fewer operations
        self.models = [fold_batch_norm(inference_model(m)) for m in models]
        self.channels = int(self.models[0].input_shape[-1])
        self.num_classes = len(plan.labels)
        for m in self.models:
            if int(m.input_shape[-1]) != self.channels or m.output_shape[-1] != self.num_classes:
                raise ModelError(
                    f"model {m.name}: input {list(m.input_shape)} / output "
                    f"{list(m.output_shape)} does not fit the plan ({self.num_classes} labels, "
                    f"{self.channels} channels)"
                )
        if len(plan.target_spacing) != 3 or len(plan.patch_size) != 3:
            raise ConfigError("plan: target_spacing and patch_size need three values each")
        if plan.normalization not in NORMALIZATIONS:
            raise ConfigError(f"plan.normalization: must be one of {NORMALIZATIONS}")
        self.plan = plan
        flips = mirror_flips(mirror)
        self.options = {
            "patch_size": [int(p) for p in plan.patch_size],
            "overlap": float(overlap),
            "sw_batch": int(sw_batch),
            "gaussian": bool(gaussian),
            "mirror": len(flips) > 1,
            "mirror_axes": [a - 1 for a in flips[-1]],  # the last flip flips every axis
            "sigma_scale": SIGMA_SCALE,
        }
        spec = [
            tf.TensorSpec([None, None, None, self.channels], tf.float32, name="volume"),
            tf.TensorSpec([3], tf.float32, name="spacing"),
        ]
        window = [None, *self.options["patch_size"], self.channels]
        # The models run as one function that the sliding window's loop calls, not inlined into
        # the loop: TensorFlow's graph optimiser then fuses the convolutions as it does for a
        # model called on its own (1.5-1.7x faster on CPU, measured by medseg.bench3d).
        self._windows = tf.function(
            self._predict_windows,
            input_signature=[tf.TensorSpec(window, tf.float32)],
            experimental_attributes={"_noinline": True},
        )
        self.serve = tf.function(self._serve, input_signature=spec)

    def __call__(self, volume: tf.Tensor, spacing: tf.Tensor) -> dict[str, tf.Tensor]:
        """Run :attr:`serve` (the ``tf.function``) on one volume."""
        return self.serve(volume, spacing)

    def _predict_windows(self, x: tf.Tensor) -> tf.Tensor:
        probs = [tf.cast(m(x, training=False), tf.float32) for m in self.models]
        return probs[0] if len(probs) == 1 else tf.add_n(probs) / float(len(probs))

    def _serve(self, volume: tf.Tensor, spacing: tf.Tensor) -> dict[str, tf.Tensor]:
        plan, opts = self.plan, self.options
        shape = tf.shape(volume)[:3]
        x = normalize_graph(volume, plan)
        target = tf.constant(list(plan.target_spacing), tf.float32)
        same = tf.reduce_all(tf.abs(spacing - target) <= SPACING_RTOL * target)
        grid = tf.cond(
            same, lambda: shape, lambda: resized_shape(shape, spacing, plan.target_spacing)
        )
        x = tf.cond(same, lambda: x, lambda: resize_volume(x, grid))
        probs = sliding_window_inference(
            x[None],
            self._windows,
            opts["patch_size"],
            opts["overlap"],
            opts["sw_batch"],
            opts["gaussian"],
            opts["mirror_axes"],
            num_classes=self.num_classes,
        )[0]
        probs = tf.cond(same, lambda: probs, lambda: resize_volume(probs, shape))
        probs = tf.ensure_shape(probs, [None, None, None, self.num_classes])
        return {"probabilities": probs, "labels": tf.argmax(probs, -1, output_type=tf.int32)}


def load_plan(run: RunDir) -> VolumePlan:
    """The :class:`VolumePlan` of a 3D run folder (``plan.json``).

    Raises:
        ModelError: the run has no ``plan.json`` (not a 3D run, or training never started).
        DataError: ``plan.json`` is not valid JSON.
        ConfigError: ``plan.json`` lacks a field or has a malformed one.
    """
    raw = read_json(run.plan_path, missing_ok=True)
    if raw is None:
        raise ModelError(f"{run.plan_path}: not found; a 3D (unet3d) run folder holds its plan")
    try:
        return VolumePlan.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{run.plan_path}: {e}") from None


def _same_plan(a: VolumePlan, b: VolumePlan) -> bool:
    """Whether two plans describe the same served computation (``from_config`` aside)."""
    da, db = a.to_dict(), b.to_dict()
    da.pop("from_config", None)
    db.pop("from_config", None)
    return da == db


def _cv_models(run: RunDir) -> tuple[list[keras.Model], VolumePlan]:
    """The fold models that a 3D cross-validation folder's ``ensemble.json`` lists (their last
    checkpoints, as for 2D ensembles) and their (common) plan."""
    spec = read_json(run.path / ENSEMBLE_NAME)
    models, plan = [], None
    for f in spec.get("folds", []):
        path = run.path / f["model"]
        fold = RunDir(path.parent.parent)
        fold_plan = load_plan(fold)
        if plan is not None and not _same_plan(plan, fold_plan):
            raise ModelError(
                f"{fold.plan_path}: the folds' plans differ; predict with one fold's run folder"
            )
        plan = fold_plan
        if not path.is_file():
            raise ModelError(f"{path}: checkpoint not found (has the fold finished?)")
        models.append(load_keras_model(path))
    if plan is None:
        raise ModelError(f"{run.path / ENSEMBLE_NAME}: lists no finished fold")
    return models, plan


def tta_axes(cfg: Config, mirror: bool) -> list[int]:
    """The axes mirror TTA flips for a run of config ``cfg``: those its training flipped
    (:func:`medseg.data.augment3d.flip_axes`), none when ``mirror`` is false. A model trained
    without flips is never mirrored: its flipped predictions would be of patches it never saw."""
    if not mirror:
        return []
    axes = flip_axes(cfg.augment)
    if not axes:
        logger.warning(
            "mirror TTA: training flipped no axis (augment.dflip/vflip/hflip are 0); "
            "predicting without it"
        )
    return axes


class VolumePredictor:
    """Predicts whole volumes with a 3D run folder, CV folder (mean of the folds) or export.

    A run folder is run through a :class:`VolumeModule` built from its ``checkpoint`` (a CV
    folder: the fold checkpoints its ``ensemble.json`` names, their last ones), its
    ``plan.json`` and the sliding-window options of its config (``volume.*``, overridable
    here); an export runs its SavedModel's ``serve`` signature, which is the same
    :class:`VolumeModule` (its options are fixed at export time).

    Attributes:
        labels: label number -> name, background (0) included.
        num_classes: number of labels (softmax channels).
        channels: input channels ``C``.
        channel_names: channel number -> name (``dataset.json``'s modalities).
        card: the export's model card (empty for a run folder).

    Raises:
        ModelError: the folder is not a 3D model folder, or its checkpoint cannot be loaded.
        ConfigError: sliding-window options given for an export (they are baked in).
    """

    def __init__(
        self,
        source: str | Path,
        *,
        checkpoint: str = "best",
        overlap: float | None = None,
        sw_batch: int | None = None,
        gaussian: bool | None = None,
        mirror: bool | None = None,
    ) -> None:
        self.source = Path(source)
        overrides = {"overlap": overlap, "sw_batch": sw_batch, "gaussian": gaussian}
        overrides["mirror"] = mirror
        kind = folder_kind(self.source)
        self.card: dict = {}
        if kind == "export":
            self._init_export(overrides)
            return
        run = open_run(self.source)
        cfg = run.config()
        if cfg.model.name != "unet3d":
            raise ModelError(f"{run.path}: not a 3D run (model.name is {cfg.model.name!r})")
        if kind == "cv":
            models, plan = _cv_models(run)  # ensemble.json names the checkpoints
        else:
            models, plan = [load_run_model(run, checkpoint)], load_plan(run)
        v = cfg.volume
        defaults = {
            "overlap": v.overlap,
            "sw_batch": v.sw_batch,
            "gaussian": v.gaussian,
            "mirror": v.mirror_tta,
        }
        opts = {k: defaults[k] if val is None else val for k, val in overrides.items()}
        opts["mirror"] = tta_axes(cfg, bool(opts["mirror"]))
        self.module = VolumeModule(models, plan, **opts)
        self._fn = self.module.serve
        self._set_names(plan.labels, plan.channels, self.module.channels)

    def _init_export(self, overrides: dict) -> None:
        card = read_card(self.source)
        if int(card.get("dims", 2)) != 3:
            raise ModelError(f"{self.source}: a 2D export; use medseg.inference.predictor")
        given = sorted(k for k, v in overrides.items() if v is not None)
        if given:
            raise ConfigError(
                f"{self.source}: {', '.join(given)} are fixed in an export (re-export to change)"
            )
        self.card = card
        self.module = None
        loaded = tf.saved_model.load(str(self.source / SAVED_MODEL))
        self._loaded = loaded  # keeps the signature's variables alive
        self._fn = loaded.signatures[SERVE_SIGNATURE]
        self._set_names(card["labels"], card.get("channels", {}), int(card["input"]["channels"]))

    def _set_names(self, labels: Mapping, channel_names: Mapping, channels: int) -> None:
        self.labels = {int(k): str(v) for k, v in labels.items()}
        self.num_classes = len(self.labels)
        self.channel_names = {int(k): str(v) for k, v in channel_names.items()}
        self.channels = int(channels)

    def predict(
        self, array: np.ndarray, spacing: Sequence[float], affine: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Probabilities and labels of one volume, at its own shape and in its own axis order.

        Args:
            array: ``D x H x W x C`` (or ``D x H x W`` for one channel) raw intensities.
            spacing: (slice, row, col) voxel spacing in mm.
            affine: the volume's 4x4 (slice, row, col, 1) -> LPS mm. When given, the volume is
                turned into the standard orientation the model was trained in
                (:func:`medseg.data.resample.standard_orientation`: a sagittal DICOM series
                like an axial NIfTI) and the outputs are turned back; when None, the array is
                taken to be in that orientation already.

        Returns:
            ``probabilities``: float32 ``D x H x W x K``; ``labels``: uint8 ``D x H x W``.

        Raises:
            DataError: the array is not a volume of the model's channels, or the spacing is not
                three positive numbers.
        """
        array = np.asarray(array)
        if array.ndim == 3:
            array = array[..., None]
        if array.ndim != 4 or array.shape[-1] != self.channels:
            raise DataError(
                f"volume of shape {array.shape}: expected D x H x W x {self.channels} (the "
                f"model's channels)"
            )
        spacing_arr = np.asarray(spacing, np.float32).reshape(-1)
        if (
            spacing_arr.size != 3
            or not np.all(np.isfinite(spacing_arr))
            or (spacing_arr <= 0).any()
        ):
            raise DataError(f"spacing {list(spacing)}: expected 3 positive numbers (mm)")
        axes, flips = (0, 1, 2), (False, False, False)
        if affine is not None:
            axes, flips = standard_orientation(affine)
            array, spacing_arr = to_standard(array, axes, flips), spacing_arr[list(axes)]
        out = self._fn(
            volume=tf.constant(array.astype(np.float32)), spacing=tf.constant(spacing_arr)
        )
        return {
            "probabilities": from_standard(out["probabilities"].numpy(), axes, flips),
            "labels": from_standard(out["labels"].numpy().astype(np.uint8), axes, flips),
        }


def structure_volumes_ml(
    labels: np.ndarray, spacing: Sequence[float], names: Mapping[int, str]
) -> dict[str, float]:
    """Each structure's volume in mL: voxel count x voxel volume (mm^3) / 1000.

    Args:
        labels: integer ``D x H x W`` label map.
        spacing: (slice, row, col) voxel spacing in mm.
        names: label number -> structure name; background (0) is skipped.

    Returns:
        ``{name: mL}`` for every label in ``names`` but 0 (0.0 for one absent from the map).
    """
    voxel_ml = float(np.prod(np.asarray(spacing, np.float64))) / 1000.0
    values = np.asarray(labels).ravel()
    counts = np.bincount(values[values >= 0].astype(np.int64), minlength=1)
    return {
        str(name): float(counts[k] if k < counts.size else 0) * voxel_ml
        for k, name in sorted(names.items())
        if int(k) != 0
    }
