"""Ray support shared by the Ray executors of cross-validation and batch prediction.

Importing Ray (with an install hint when it is missing), starting or joining a Ray instance,
forwarding medseg's log records from workers, and describing a task's error in one line.
Ray itself is imported only when these functions are called.
"""

from __future__ import annotations

import logging
import os

from medseg.errors import ConfigError

logger = logging.getLogger(__name__)

#: Object store size of a local Ray instance: only configs and metric dicts pass through it.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


def import_ray():
    """Import Ray, or raise a :class:`ConfigError` that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError(
            f"--executor ray needs Ray, which is not installed ({e}); "
            "install it with: pip install 'medseg[ray]'"
        ) from None
    return ray


def init_ray(ray, address: str | None, verbose: bool) -> bool:
    """Connect to the cluster at ``address``, or start a local Ray instance over this machine's
    CPUs; an instance already initialised in this process is used as it is.

    Returns:
        Whether this call started (or connected) Ray, i.e. whether the caller shuts it down.
    """
    if ray.is_initialized():
        if address:
            logger.warning(
                "Ray is already initialised in this process; ignoring address %s", address
            )
        return False
    init_args = {"log_to_driver": verbose, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **init_args)
    else:
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            **init_args,
        )
    return True


def worker_logging(level: int) -> None:
    """Send medseg's log records in a Ray worker to stderr (Ray forwards it to the driver)."""
    log = logging.getLogger("medseg")
    if not any(getattr(h, "_medseg_ray", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("medseg: %(message)s"))
        handler._medseg_ray = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)


def describe(error: BaseException) -> str:
    """``"Type: message"`` of the error a task raised, without Ray's remote traceback."""
    from ray.exceptions import RayTaskError

    if isinstance(error, RayTaskError):
        cause = getattr(error, "cause", None)
        if cause is not None:
            return f"{type(cause).__name__}: {cause}"
        lines = [line for line in str(error).splitlines() if line.strip()]
        return f"{error.function_name}: {lines[-1].strip() if lines else 'failed'}"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].strip() if lines else ''}".rstrip(": ")
