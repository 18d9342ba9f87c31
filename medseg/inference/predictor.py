"""The loaded model behind prediction and evaluation: one interface, two kinds.

:class:`Predictor` serves one model folder (an export, a run or a cross-validation run, see
:func:`medseg.artifacts.exports.folder_kind`); :class:`EnsemblePredictor` averages several
(``--with``). Both are a :class:`BasePredictor`, which is all that prediction and evaluation use:
raw NHWC pixels in (:meth:`~BasePredictor.model_input`, :meth:`~BasePredictor.__call__`),
probabilities and masks or labels out, and the Keras models for MC-dropout and Grad-CAM.
"""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

from medseg.artifacts.exports import (
    SAVED_MODEL,
    SERVE_SIGNATURE,
    folder_kind,
    inside_export,
    read_card,
)
from medseg.data.preprocess import Preprocessing
from medseg.data.volumes import stack_slices
from medseg.errors import ConfigError, DataError, ModelError
from medseg.io import to_channels
from medseg.models.ensemble import mean_probabilities


class BasePredictor(abc.ABC):
    """What prediction and evaluation need of a model, whatever serves it.

    Attributes:
        path: the model folder (the first model's, for an ensemble).
        task: ``segmentation`` or ``classification``.
        classes: class names (empty when the run recorded none).
        card: the model card: an export's ``medseg.json``, or the same fields for a run folder.
        context_slices: ``k`` of a 2.5D model (``data.context_slices``): it takes each slice
            with ``k`` neighbours on each side; 0 for 2D.
        preprocessing: what the Keras models take (None where there is no Keras model).
    """

    path: Path | None = None
    task: str
    classes: list[str]
    card: dict
    context_slices: int = 0
    preprocessing: Preprocessing | None = None
    _gradcam = None

    @property
    def threshold(self) -> float:
        """Foreground threshold of binary masks: the model card's (0.5 when it has none)."""
        return float(self.card.get("threshold", 0.5))

    @abc.abstractmethod
    def model_input(self, images: np.ndarray) -> np.ndarray:
        """``[N, H, W, C]`` raw pixels (the slices of one volume, in order, for a 2.5D model)
        -> what :meth:`__call__` takes."""

    @abc.abstractmethod
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on :meth:`model_input`: ``probabilities`` and ``mask`` or ``label``."""

    @abc.abstractmethod
    def keras_models(self) -> list:
        """The Keras model(s) behind this predictor, for MC-dropout and Grad-CAM.

        Raises:
            ConfigError, ModelError: there are none to give.
        """

    def gradcam(self):
        """A Grad-CAM explainer of the (first) Keras model, built once."""
        if self._gradcam is None:
            from medseg.inference.explain import GradCAM

            self._gradcam = GradCAM(self.keras_models()[0])
        return self._gradcam


class Predictor(BasePredictor):
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

    Raises:
        ModelError: not a model folder, or its model cannot be loaded.
        ConfigError: a bad ``checkpoint``, or ``tta`` with an export built without it.
    """

    def __init__(self, path: str | Path, *, checkpoint: str = "best", tta: bool = False):
        self.path = Path(path)
        self._keras: list | None = None
        kind = folder_kind(self.path)
        if kind == "export":
            self._load_export(tta)
        else:
            self._load_run(kind, checkpoint, tta)
        self.task: str = self.card["task"]
        # 2.5D models (data.context_slices = k) take 2k + 1 slices of `channels` channels each
        self.context_slices = int(self.card.get("context_slices") or 0)
        self.channels: int = int(self.card["input"]["channels"]) // (2 * self.context_slices + 1)
        self.classes: list[str] = list(self.card.get("classes") or [])

    def _load_export(self, tta: bool) -> None:
        import tensorflow as tf

        self.card = read_card(self.path)
        if tta and not (self.card.get("tta") or {}).get("enabled"):
            raise ConfigError(
                f"{self.path}: this export has no test-time augmentation; export the run again "
                "with --tta, or leave --tta out"
            )
        try:
            loaded = tf.saved_model.load(str(self.path / SAVED_MODEL))
            self._fn = loaded.signatures[SERVE_SIGNATURE]
        except Exception as e:
            raise ModelError(f"{self.path}: cannot load the SavedModel ({e})") from None
        self._loaded = loaded
        self.preprocessing = Preprocessing.from_card(self.card)

    def _load_run(self, kind: str, checkpoint: str, tta: bool) -> None:
        from medseg.artifacts.cv import load_ensemble
        from medseg.artifacts.runs import load_run_model, open_run
        from medseg.data.split import load_manifest
        from medseg.inference.serving import serving_function
        from medseg.models.fold import fold_batch_norm
        from medseg.models.loading import load_keras_model

        if checkpoint not in ("best", "last"):
            raise ConfigError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
        run = open_run(self.path)
        cfg = run.config()
        if kind == "cv":
            files = [f.parent / f"{checkpoint}.keras" for f in load_ensemble(self.path)]
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
        self.preprocessing = Preprocessing.from_config(cfg.data)
        self._keras = models
        folded = [fold_batch_norm(m) for m in models]
        self._fn = serving_function(
            folded, cfg.data.task, self.preprocessing, cfg.predict.threshold, tta=tta
        )

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
            self._keras = [
                load_keras_model(inside_export(self.path, f), hashes.get(f) or None) for f in files
            ]
        return self._keras

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on float32 ``[N, H, W, C]`` raw pixels."""
        out = self._fn(image=np.ascontiguousarray(images, np.float32))
        return {k: np.asarray(v) for k, v in out.items()}


class EnsemblePredictor(BasePredictor):
    """The mean of several models' probabilities, as one predictor (``--with``).

    For recipes trained as separate runs whose out-of-fold ensemble ``medseg tune --with``
    measured (e.g. a 2D and a 2.5D U-Net): each member is fed as it is served (its own
    channels and neighbouring slices), its probabilities at the input resolution are averaged
    (:func:`medseg.models.ensemble.mean_probabilities`), and binary masks are the mean above the
    first model's threshold (multi-class: the argmax). :meth:`model_input` puts the members'
    inputs side by side along the channel axis, so the slices of a volume can be batched as for
    one model; :meth:`__call__` splits them again.

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
        mean = mean_probabilities(probs)
        if self.task == "classification":
            return {"probabilities": mean, "label": mean.argmax(-1).astype(np.int32)}
        if mean.shape[-1] == 1:
            mask = (mean[..., 0] > self.threshold).astype(np.int32)
        else:
            mask = mean.argmax(-1).astype(np.int32)
        return {"probabilities": mean, "mask": mask}

    def keras_models(self) -> list:
        """None to give: MC-dropout and Grad-CAM take one model.

        Raises:
            ConfigError: always.
        """
        raise ConfigError(
            "--mc-samples and --explain take one model; not an ensemble of models (--with)"
        )


def check_same_outputs(members: list[BasePredictor]) -> None:
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
