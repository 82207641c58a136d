"""The Ray driver's options and its bookkeeping of work in flight (plain data)."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from ray import ObjectRef
from ray.actor import ActorHandle

from ..pipeline.extraction.extract import PreparedSlide
from ..pipeline.slides.inputs import SlideInput


class Stage(enum.Enum):
    """What an object ref in flight stands for."""

    PREPARE = "prepare"  #: the slide's prepare task (-> PreparedSlide)
    WRITE = "write"  #: a tile batch read, segmented, measured and queued at the writer (-> rows so far)
    COMMIT = "commit"  #: the writer's commit of the slide (-> the slide's record)
    ABORT = "abort"  #: the writer of a failed slide removing its temporary file (-> None)


@dataclass(frozen=True)
class InFlight:
    """One ref in flight: its stage, slide and slide attempt, and for a batch its actor and index."""

    stage: Stage
    slide_id: str
    actor: int | None = None
    batch: int | None = None
    generation: int = 0


@dataclass
class SlideState:
    """A slide in flight (``generation``: how many times it started again after a lost worker)."""

    item: SlideInput
    started: float
    generation: int = 0
    prepared_ref: ObjectRef[PreparedSlide] | None = None
    prepared: PreparedSlide | None = None
    writer: ActorHandle[Any] | None = None
    ranges: list[tuple[int, int]] = field(default_factory=list)
    submitted: int = 0
    written: int = 0
    #: Rows its writer holds so far (what the progress bar counts before the slide commits).
    rows: int = 0
    #: Batches whose worker died, to send again (alone), and each batch's deaths so far.
    retry: deque[int] = field(default_factory=deque)
    deaths: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RayOptions:
    """How the driver uses the cluster (None: scaled to the cluster's resources, as they change)."""

    #: Tiles per batch (default: 4 through segmentation actors; 1 in the fused CPU tasks, where a
    #: batch costs no extra hop and small ones leave no core idle at the end of a slide).
    tiles_per_batch: int | None = None
    #: Slides open at once (default: 2, plus one per 16 CPUs).
    max_slides: int | None = None
    #: Tile batches in flight (default: 6, or 2 per CPU on larger clusters).
    max_batches: int | None = None
    actors: int | None = None
    #: GPU segmentation actors to request even if no GPU node is up yet (an autoscaling
    #: GPU group starting at 0); None: one per GPU present.
    gpu_actors: int | None = None
    #: Most segmentation actors however large the cluster grows (None: no bound).
    max_actors: int | None = None
    #: The resource segmentation actors hold one unit of when the cluster has it.
    accelerator: str = "GPU"
    #: Tries of a batch (or a slide) whose worker died, before the slide fails.
    max_tries: int = 3
    #: Seconds the run waits with no segmentation actor running (none can be placed) before it stops.
    actor_wait_s: float = 600.0
    #: Seconds between reads of the cluster's resources.
    refresh_s: float = 5.0
    #: Tell an autoscaler the resources of the pending work (``ray.autoscaler.sdk.request_resources``).
    request_resources: bool = True
    #: On a cluster without accelerators, read, segment and measure each batch in one CPU task
    #: (segmenter cached per worker) instead of passing tiles through segmentation actors.
    fuse_cpu: bool = True

    def scaled(self, cluster: dict[str, float]) -> RayOptions:
        """These options with the defaults filled in for a cluster's resources."""
        cpus = max(1, int(cluster.get("CPU", 1)))
        return replace(self, max_slides=self.max_slides or 2 + cpus // 16,
                       max_batches=self.max_batches or max(6, 2 * cpus))  # fmt: skip
