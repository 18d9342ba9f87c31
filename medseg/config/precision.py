"""The Keras dtype policy that ``train.mixed_precision`` names, and the CPU feature behind it."""

from __future__ import annotations

from pathlib import Path

from medseg.config.sections import TrainConfig


def cpu_has_amx(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU has AMX bfloat16 tiles (the ``amx_bf16`` flag of Linux's cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    return any(
        line.startswith("flags") and "amx_bf16" in line.split() for line in text.splitlines()
    )


def _gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def precision_policy(train: TrainConfig) -> str:
    """The Keras dtype policy that ``train.mixed_precision`` names.

    ``false`` and ``true`` are the older spellings of ``float32`` and ``mixed_float16``;
    ``auto`` is ``mixed_bfloat16`` on a CPU with AMX when no GPU is visible, else ``float32``
    (the one case where bfloat16 was measured faster on CPU; on GPUs name the policy).
    """
    value = train.mixed_precision
    if isinstance(value, bool):
        return "mixed_float16" if value else "float32"
    if value == "auto":
        return "mixed_bfloat16" if cpu_has_amx() and not _gpu_visible() else "float32"
    return value
