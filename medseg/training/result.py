"""What a training run returns: :class:`TrainResult` (2D and 3D training alike)."""

from __future__ import annotations

from dataclasses import dataclass

from medseg.artifacts.runs import RunDir


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        run: the run folder (on a worker other than the chief: the folder the chief writes).
        history: the Keras history.
        metrics: the validation metrics (empty on workers other than the chief).
        is_chief: whether this process wrote the run folder (always, without a cluster).
        weights: short SHA-256 of the final weights (:func:`weights_digest`): the same on every
            worker of a multi-worker run.
    """

    run: RunDir
    history: dict
    metrics: dict
    is_chief: bool = True
    weights: str = ""
