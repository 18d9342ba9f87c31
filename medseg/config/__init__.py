"""One typed configuration tree for every medseg command.

A config is a YAML file whose top-level sections map onto the dataclasses of
:mod:`medseg.config.sections` (``data``, ``augment``, ``model``, ``train``, ``cv``, ``export``,
``predict``, ``run``). Every key is optional: missing keys keep their defaults. Command lines
override single values with ``--set section.key=value``; the value is parsed as YAML and then
checked against the field's type (:mod:`medseg.config.loading`).

Unknown sections or keys, values of the wrong type and impossible values (negative epochs,
``k < 2``, ...) raise :class:`medseg.errors.ConfigError` naming the key and, for unknown keys,
listing the valid ones (:mod:`medseg.config.checks`).

Example:
    >>> cfg = load_config("configs/demo.yaml", overrides=["train.epochs=3"])
    >>> cfg.train.epochs
    3
"""

from medseg.config.checks import validate
from medseg.config.loading import config_from_dict, load_config, parse_override
from medseg.config.precision import cpu_has_amx, precision_policy
from medseg.config.sections import (
    DISTRIBUTE,
    GROUP_BY,
    LAYOUTS,
    LR_SCALINGS,
    LR_SCHEDULES,
    MONITOR_MODES,
    NORMALIZATIONS,
    OPTIMIZERS,
    PRECISIONS,
    RESIZE_POLICIES,
    SECTIONS,
    TASKS,
    AugmentConfig,
    Config,
    CVConfig,
    DataConfig,
    EvaluationConfig,
    ExportConfig,
    ModelConfig,
    PredictConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "DISTRIBUTE",
    "GROUP_BY",
    "LAYOUTS",
    "LR_SCALINGS",
    "LR_SCHEDULES",
    "MONITOR_MODES",
    "NORMALIZATIONS",
    "OPTIMIZERS",
    "PRECISIONS",
    "RESIZE_POLICIES",
    "SECTIONS",
    "TASKS",
    "AugmentConfig",
    "CVConfig",
    "Config",
    "DataConfig",
    "EvaluationConfig",
    "ExportConfig",
    "ModelConfig",
    "PredictConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "cpu_has_amx",
    "load_config",
    "parse_override",
    "precision_policy",
    "validate",
]
