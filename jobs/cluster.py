"""Starting or joining a Ray cluster for the CLI, and reading Ray's task errors."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None, address: str | None = None, *, log_to_driver: bool = False) -> None:
    """Join ``address`` (or $RAY_ADDRESS) when given, else start a local Ray.

    Does nothing when Ray is already initialised in this process (tests share one).
    ``log_to_driver`` shows the workers' logs here (training does; extraction has its bar).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    log.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))  # type: ignore[no-untyped-call]


def task_cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, unwrapped from (nested) ``RayTaskError``s."""
    while isinstance(exc, ray.exceptions.RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc
