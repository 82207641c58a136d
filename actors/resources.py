"""Resource requests of the Ray workers, as data (decided by the driver from the cluster)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..pipeline.common.errors import ConfigError


@dataclass(frozen=True)
class WorkerResources:
    """CPU/GPU requests of segmentation actors and CPU tasks, and the actor count.

    On a GPU cluster each segmentation actor holds one GPU (and one CPU). An
    accelerator known to Ray by another resource name (``actor_resource``, e.g. a
    custom ``"neuron_cores"``) is held the same way, one unit per actor, with no CPU
    slot of its own. On CPUs the actors ask for no CPU slot of their own (their
    network/threshold pass runs beside the tasks) so that even a one-CPU cluster
    makes progress.
    """

    actors: int
    actor_num_cpus: float
    actor_num_gpus: float
    task_num_cpus: float
    #: A resource other than GPU that each actor holds one unit of, or None.
    actor_resource: str | None = None

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ConfigError(f"need at least one segmentation actor, got {self.actors}")
        if min(self.actor_num_cpus, self.actor_num_gpus, self.task_num_cpus) < 0:
            raise ConfigError("resource requests must be >= 0")

    def actor_options(self) -> dict[str, Any]:
        """Keyword arguments of ``SegmentActor.options`` for these requests."""
        options: dict[str, Any] = {"num_cpus": self.actor_num_cpus, "num_gpus": self.actor_num_gpus}
        if self.actor_resource:
            options["resources"] = {self.actor_resource: 1.0}
        return options

    def actor_bundle(self) -> dict[str, float]:
        """One actor's request as a resource bundle (for the autoscaler); {} when it asks for nothing."""
        bundle = {"CPU": self.actor_num_cpus, "GPU": self.actor_num_gpus}
        if self.actor_resource:
            bundle[self.actor_resource] = 1.0
        return {k: v for k, v in bundle.items() if v > 0}

    @classmethod
    def for_cluster(
        cls, cluster: dict[str, float], actors: int | None = None, *, gpu_actors: int | None = None,
        accelerator: str = "GPU", max_actors: int | None = None,
    ) -> WorkerResources:
        """Sensible requests for a cluster's total resources (``ray.cluster_resources()``).

        ``gpu_actors`` asks for at least that many one-GPU actors whatever the cluster
        holds now, so that an autoscaler starts GPU nodes for them; more when more GPUs
        are up. ``accelerator`` names the resource an actor holds one of ("GPU" unless
        the cluster calls its accelerators otherwise). ``max_actors`` caps the count.
        """
        if gpu_actors is not None and gpu_actors < 1:
            raise ConfigError(f"gpu_actors must be >= 1, got {gpu_actors}")
        if max_actors is not None and max_actors < 1:
            raise ConfigError(f"max_actors must be >= 1, got {max_actors}")
        held = int(cluster.get(accelerator, 0))
        cap = max_actors or 1 << 30
        custom = None if accelerator == "GPU" else accelerator
        cpus = max(1, int(cluster.get("CPU", 1)))
        if gpu_actors is not None or held > 0:
            count = actors or max(held, gpu_actors or 0)
            if custom:
                return cls(min(count, cap), 0.0, 0.0, 1.0, custom)
            # Each GPU actor holds a CPU too, unless that would leave none for the tasks that
            # feed it (a 1-CPU, 1-GPU machine would otherwise wait for ever).
            actor_cpus = 1.0 if cpus > min(count, cap) else 0.0
            return cls(min(count, cap), actor_cpus, 1.0, 1.0)
        return cls(min(actors or max(1, cpus // 4), cap), 0.0, 0.0, 1.0)
