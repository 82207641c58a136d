"""Resource requests and in-flight limits the driver derives from the cluster."""

from __future__ import annotations

import pytest

from nucleiscope.actors.resources import WorkerResources
from nucleiscope.jobs.run_ray import RayOptions
from nucleiscope.pipeline.common.errors import ConfigError


def test_requests_follow_the_cluster() -> None:
    cpu = WorkerResources.for_cluster({"CPU": 16.0})
    assert (cpu.actors, cpu.actor_num_cpus, cpu.actor_num_gpus) == (4, 0.0, 0.0)
    gpu = WorkerResources.for_cluster({"CPU": 64.0, "GPU": 4.0})
    assert (gpu.actors, gpu.actor_num_cpus, gpu.actor_num_gpus) == (4, 1.0, 1.0)
    # One CPU beside one GPU: the actor takes no CPU slot, or no task could ever feed it.
    small = WorkerResources.for_cluster({"CPU": 1.0, "GPU": 1.0})
    assert (small.actors, small.actor_num_cpus, small.actor_num_gpus, small.task_num_cpus) == (1, 0.0, 1.0, 1.0)
    # An autoscaling GPU group at 0 nodes: ask for GPU actors anyway, so nodes start.
    pending = WorkerResources.for_cluster({"CPU": 8.0}, gpu_actors=3)
    assert (pending.actors, pending.actor_num_gpus) == (3, 1.0)
    with pytest.raises(ConfigError):
        WorkerResources.for_cluster({"CPU": 8.0}, gpu_actors=0)


def test_in_flight_limits_scale_with_cpus() -> None:
    small = RayOptions().scaled({"CPU": 2.0})
    assert (small.max_slides, small.max_batches) == (2, 6)
    big = RayOptions().scaled({"CPU": 256.0})
    assert (big.max_slides, big.max_batches) == (18, 512)
    fixed = RayOptions(max_slides=1, max_batches=3).scaled({"CPU": 256.0})
    assert (fixed.max_slides, fixed.max_batches) == (1, 3)
