"""The Ray session a command runs in, and the way user errors come back out of Ray.

Ray appears here and in the stage modules (labeling, training, evaluation), never in the pure
compute (ensemble, losses, store codec, datasets, evaluation maths).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from .config import DistillConfig
from .errors import DistillError

log = logging.getLogger("distill")

RAY_ENV = {
    # Ray Data's per-operator progress bars drown our own progress lines.
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Train v2's controller collects each ray.train.report on its health-check poll (2 s by
    # default) and the worker blocks until then: with small epochs that poll was most of the
    # training time (2.2 s per epoch measured on the quickstart).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


@contextmanager
def ray_session(cfg: DistillConfig, quiet: bool = False):
    """Attach to RAY_ADDRESS / ray.address when given, else start an embedded local Ray.

    quiet (`distill -q`): no worker output (progress lines, replica logs) reaches the driver.
    """
    import ray

    quiet_ray_loggers()
    if ray.is_initialized():
        yield
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    log.info("ray: %s", f"connecting to {address}" if address else "starting an embedded local Ray")
    os.environ.update(RAY_ENV)  # workers of an embedded Ray inherit the driver's environment
    # Inside a submitted job the job's runtime env (jobs/runtime_env.yaml, the RayJob's
    # runtimeEnvYAML) already carries RAY_ENV: passing another one here would replace it.
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by the job supervisor
    ray.init(address=address, num_cpus=None if address else cfg.ray.num_cpus, logging_level=logging.WARNING,
             runtime_env=None if in_job else {"env_vars": RAY_ENV}, log_to_driver=not quiet)
    try:
        yield
    finally:
        # Serve caches its controller client in this process: drop it with the session we own,
        # or a second run in the same process talks to the dead controller.
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def quiet_ray_loggers() -> None:
    """Ray Serve/Data/Train narrate every step at INFO on the driver; our own lines say enough."""
    import ray.data  # noqa: F401  (these configure their loggers on import: quiet them afterwards)
    import ray.serve  # noqa: F401

    for name in ("ray.serve", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The DataContext travels with each dataset, so this also quiets Train's split coordinator.
    ray.data.DataContext.get_current().enable_progress_bars = False


def user_error(e: BaseException) -> DistillError | None:
    """Find the DistillError a Ray worker raised, through Ray's exception wrappers."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DistillError) and getattr(e, "cause", None) is None:
            return e  # the user's error itself, not Ray's wrapper around it (which prints a traceback)
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def reraise_user_error(e: BaseException, otherwise: str | None = None):
    """Re-raise the user's DistillError found inside `e` as one line; else `otherwise` as a
    DistillError when given, else `e` itself."""
    found = user_error(e)
    if found is None:
        for line in str(e).splitlines()[::-1]:
            if "DistillError: " in line:
                found = DistillError(line.split("DistillError: ", 1)[1])
                break
    if found is not None:
        raise found from None
    if otherwise is not None:
        raise DistillError(otherwise) from None
    raise e


def last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
