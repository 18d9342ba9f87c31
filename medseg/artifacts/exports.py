"""Export folders: the contract that ``medseg export`` writes and every reader relies on.

Layout::

    <export>/saved_model/         SavedModel, signatures ``serve`` and ``model``
    <export>/model.tflite         TFLite file of the ``model`` signature
    <export>/model.keras          copy of the Keras checkpoint (one run), or
    <export>/folds/fold_<k>.keras the fold checkpoints (an ensemble)
    <export>/medseg.json          model card

:func:`folder_kind` tells an export from the run folders that prediction and evaluation also
accept (:mod:`medseg.artifacts.runs`, :mod:`medseg.artifacts.cv`); :func:`read_card` reads a
model card and :func:`inside_export` resolves the files it names.
"""

from __future__ import annotations

import json
from pathlib import Path

from medseg.artifacts.cv import ENSEMBLE_NAME
from medseg.errors import ModelError

CARD_NAME = "medseg.json"
SAVED_MODEL = "saved_model"
TFLITE_NAME = "model.tflite"
KERAS_NAME = "model.keras"
FOLDS_DIR = "folds"
#: Signature of the SavedModel from raw pixels to probabilities and masks or labels.
SERVE_SIGNATURE = "serve"
#: Signature of the SavedModel from the preprocessed batch to probabilities (the TFLite graph).
MODEL_SIGNATURE = "model"
#: The file of every run folder (the resolved config).
RUN_CONFIG = "config.yaml"


def folder_kind(path: str | Path) -> str:
    """What kind of model folder ``path`` is.

    Returns:
        ``"export"`` (``medseg.json`` and ``saved_model/``), ``"cv"`` (a run folder with
        ``ensemble.json``) or ``"run"`` (a run folder: ``config.yaml``).

    Raises:
        ModelError: ``path`` is none of these.
    """
    path = Path(path)
    if (path / CARD_NAME).is_file() and (path / SAVED_MODEL).is_dir():
        return "export"
    if (path / RUN_CONFIG).is_file():
        return "cv" if (path / ENSEMBLE_NAME).is_file() else "run"
    raise ModelError(f"{path}: not a medseg export (saved_model/ + medseg.json) or run folder")


def read_card(folder: str | Path) -> dict:
    """The model card (``medseg.json``) of an export folder.

    Raises:
        ModelError: the card cannot be read, is not JSON, or has no ``task`` or
            ``input.channels``; the message names the file.
    """
    card_path = Path(folder) / CARD_NAME
    try:
        card = json.loads(card_path.read_text())
        if "task" not in card or "channels" not in card["input"]:
            raise ValueError("no 'task' or 'input.channels'")
    except (OSError, ValueError, TypeError, KeyError) as e:
        reason = " ".join(str(e).split())[:200]
        raise ModelError(f"{card_path}: not a readable medseg model card ({reason})") from None
    return card


def inside_export(folder: str | Path, name: str) -> Path:
    """``name`` (a file named by the model card) as a file inside the export folder.

    Raises:
        ModelError: ``name`` points outside the export folder.
    """
    folder = Path(folder)
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ModelError(f"{folder / CARD_NAME}: names a file outside the export folder: {name}")
    return path
