"""Resource requests of the Ray workers, as data (decided once by the driver)."""

from __future__ import annotations

from dataclasses import dataclass

from ..pipeline.common.errors import ConfigError


@dataclass(frozen=True)
class WorkerResources:
    """CPU/GPU requests of segmentation actors and CPU tasks, and the actor count.

    On a GPU cluster each segmentation actor holds one GPU. On CPUs the actors ask
    for no CPU slot of their own (their network/threshold pass runs beside the
    tasks) so that even a one-CPU cluster makes progress.
    """

    actors: int
    actor_num_cpus: float
    actor_num_gpus: float
    task_num_cpus: float

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ConfigError(f"need at least one segmentation actor, got {self.actors}")
        if min(self.actor_num_cpus, self.actor_num_gpus, self.task_num_cpus) < 0:
            raise ConfigError("resource requests must be >= 0")

    @classmethod
    def for_cluster(
        cls, cluster: dict[str, float], actors: int | None = None, *, gpu_actors: int | None = None
    ) -> WorkerResources:
        """Sensible requests for a cluster's total resources (``ray.cluster_resources()``).

        ``gpu_actors`` asks for that many one-GPU actors whatever the cluster holds now,
        so that an autoscaler starts GPU nodes for them.
        """
        if gpu_actors is not None:
            if gpu_actors < 1:
                raise ConfigError(f"gpu_actors must be >= 1, got {gpu_actors}")
            return cls(gpu_actors, 1.0, 1.0, 1.0)
        gpus = int(cluster.get("GPU", 0))
        cpus = max(1, int(cluster.get("CPU", 1)))
        if gpus > 0:
            return cls(actors or gpus, 1.0, 1.0, 1.0)
        return cls(actors or max(1, cpus // 4), 0.0, 0.0, 1.0)
