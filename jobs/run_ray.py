"""Cohort driver on Ray: bounded in-flight work, per-slide atomic commits, resume.

Per slide: a task prepares it (open, tissue, fit, plan); tile batches flow
read task -> segmentation actor -> measure task -> the slide's writer actor, which
writes rows in plan order; when every batch is in, the writer commits the slide.
At most ``max_slides`` slides and ``max_batches`` batches are in flight, so driver
and object-store memory stay flat however long the cohort.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import ObjectRef
from ray.actor import ActorHandle
from tqdm import tqdm

from ..actors.resources import WorkerResources
from ..actors.segment import SegmentActor, SlideWriterActor, batches, measure_task, prepare_task, read_task
from ..pipeline.common.errors import NucleiscopeError
from ..pipeline.extraction.config import ExtractConfig
from ..pipeline.extraction.extract import PreparedSlide
from ..pipeline.extraction.identity import RunIdentity
from ..pipeline.measure.outputs import consolidate
from ..pipeline.segmentation.protocol import Segmenter
from ..pipeline.slides.inputs import SlideInput
from .cluster import task_cause
from .run_local import CohortResult, pending_items, record_failure, start_run

log = logging.getLogger(__name__)

#: Called as (cohort, event, slide_id) with event "batch", "done" or "failed".
EventFn = Callable[["RayCohort", str, str], None]


class Stage(enum.Enum):
    """What an object ref in flight stands for."""

    PREPARE = "prepare"  #: the slide's prepare task (-> PreparedSlide)
    WRITE = "write"  #: a tile batch read, segmented, measured and queued at the writer (-> rows so far)
    COMMIT = "commit"  #: the writer's commit of the slide (-> the slide's record)
    ABORT = "abort"  #: the writer of a failed slide removing its temporary file (-> None)


@dataclass(frozen=True)
class InFlight:
    """One ref in flight: its stage and slide, and for a batch its actor and index."""

    stage: Stage
    slide_id: str
    actor: int | None = None
    batch: int | None = None


@dataclass
class SlideState:
    """A slide in flight."""

    item: SlideInput
    started: float
    prepared_ref: ObjectRef[PreparedSlide] | None = None
    prepared: PreparedSlide | None = None
    writer: ActorHandle[Any] | None = None
    ranges: list[tuple[int, int]] = field(default_factory=list)
    submitted: int = 0
    written: int = 0


@dataclass(frozen=True)
class RayOptions:
    """How the driver uses the cluster (None: scaled to the cluster's CPUs at start)."""

    tiles_per_batch: int = 4
    #: Slides open at once (default: 2, plus one per 16 CPUs).
    max_slides: int | None = None
    #: Tile batches in flight (default: 6, or 2 per CPU on larger clusters).
    max_batches: int | None = None
    actors: int | None = None
    #: GPU segmentation actors to request even if no GPU node is up yet (an autoscaling
    #: GPU group starting at 0); None: one per GPU present.
    gpu_actors: int | None = None

    def scaled(self, cluster: dict[str, float]) -> RayOptions:
        """These options with the defaults filled in for a cluster's resources."""
        cpus = max(1, int(cluster.get("CPU", 1)))
        return RayOptions(
            tiles_per_batch=self.tiles_per_batch,
            max_slides=self.max_slides or 2 + cpus // 16,
            max_batches=self.max_batches or max(6, 2 * cpus),
            actors=self.actors,
            gpu_actors=self.gpu_actors,
        )


class RayCohort:
    """One cohort run on an initialised Ray cluster."""

    #: Seconds an interrupted run waits for its writers to remove their temporary files.
    ABORT_WAIT_S = 10.0

    def __init__(self, out: str, config: ExtractConfig, identity: RunIdentity,
                 options: RayOptions, on_event: EventFn | None = None) -> None:
        cluster = ray.cluster_resources()  # type: ignore[no-untyped-call]
        self.out, self.config, self.options = out, config, options.scaled(cluster)
        self.max_slides, self.max_batches = self.options.max_slides or 2, self.options.max_batches or 6
        self.identity = identity
        self.on_event = on_event
        self.resources = WorkerResources.for_cluster(cluster, options.actors, gpu_actors=options.gpu_actors)
        actor = SegmentActor.options(  # type: ignore[attr-defined]
            num_cpus=self.resources.actor_num_cpus, num_gpus=self.resources.actor_num_gpus
        )
        self.actors: list[ActorHandle[Any]] = [
            actor.remote(config.segmenter, config.model_path, config.tta) for _ in range(self.resources.actors)
        ]
        self.load = [0] * len(self.actors)
        self.pending: dict[ObjectRef[Any], InFlight] = {}
        self.aborting: dict[ObjectRef[None], ActorHandle[Any]] = {}
        self.batches_in_flight = 0
        self.active: dict[str, SlideState] = {}
        self.done = self.failed = self.nuclei = 0
        self.bar: tqdm[Any] = tqdm(total=0, unit="slide", disable=True)
        self.tile_bar: tqdm[Any] = tqdm(unit="tile", disable=True)

    def run(self, items: Sequence[SlideInput], show_progress: bool) -> tuple[int, int]:
        queue = deque(items)
        self.bar = tqdm(total=len(items), unit="slide", disable=not show_progress)
        self.tile_bar = tqdm(unit="tile", disable=not show_progress, position=1)
        started = time.perf_counter()
        try:
            while queue or self.active or self.aborting:
                while queue and len(self.active) < self.max_slides:
                    self._start(queue.popleft())
                self._submit_batches()
                if not self.pending:
                    continue
                ready, _ = ray.wait(list(self.pending), num_returns=1)
                self._handle(ready[0])
                rate = self.nuclei / max(time.perf_counter() - started, 1e-9)
                self.bar.set_postfix(nuclei=self.nuclei, nuclei_per_s=f"{rate:.0f}")
        except BaseException:
            for state in list(self.active.values()):
                self._abort_writer(state)
            self._end_aborted_writers(self.ABORT_WAIT_S)
            raise
        finally:
            self.bar.close()
            self.tile_bar.close()
        return self.done, self.failed

    def _start(self, item: SlideInput) -> None:
        state = SlideState(item, time.perf_counter())
        ref = prepare_task.options(num_cpus=self.resources.task_num_cpus).remote(
            item.uri, item.slide_id, item.mpp, self.config)
        state.prepared_ref = ref
        self.active[item.slide_id] = state
        self.pending[ref] = InFlight(Stage.PREPARE, item.slide_id)

    def _submit_batches(self) -> None:
        for state in list(self.active.values()):
            while state.prepared is not None and state.submitted < len(state.ranges):
                if self.batches_in_flight >= self.max_batches:
                    return
                self._submit(state, state.submitted)
                state.submitted += 1

    def _submit(self, state: SlideState, index: int) -> None:
        start, stop = state.ranges[index]
        cpus = self.resources.task_num_cpus
        assert state.prepared is not None and state.prepared_ref is not None and state.writer is not None
        read = read_task.options(num_cpus=cpus).remote(state.prepared_ref, start, stop, self.config)
        actor = min(range(len(self.actors)), key=lambda a: self.load[a])
        self.load[actor] += 1
        predicted: ObjectRef[Any] = self.actors[actor].predict.remote(read, state.prepared.seg_mpp, state.prepared.stats)
        measured = measure_task.options(num_cpus=cpus).remote(
            state.prepared_ref, start, stop, self.config, read, predicted)
        ref = state.writer.write.remote(index, measured)
        self.pending[ref] = InFlight(Stage.WRITE, state.item.slide_id, actor, index)
        self.batches_in_flight += 1

    def _handle(self, ref: ObjectRef[Any]) -> None:
        flight = self.pending.pop(ref)
        if flight.stage is Stage.ABORT:
            self._writer_aborted(ref)
            return
        if flight.stage is Stage.WRITE:
            assert flight.actor is not None
            self.load[flight.actor] -= 1
            self.batches_in_flight -= 1
        state = self.active.get(flight.slide_id)
        if state is None:  # the slide failed already; late results are dropped
            return
        try:
            value = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a failures row
            self._fail(state, exc)
            return
        if flight.stage is Stage.PREPARE:
            self._prepared(state, value)
        elif flight.stage is Stage.WRITE:
            assert flight.batch is not None
            self._written(state, flight.batch)
        else:
            self._committed(state, value)

    def _written(self, state: SlideState, batch: int) -> None:
        state.written += 1
        self.tile_bar.update(state.ranges[batch][1] - state.ranges[batch][0])
        if self.on_event is not None:
            self.on_event(self, "batch", state.item.slide_id)
        if state.written == len(state.ranges):
            self._commit(state)

    def _commit(self, state: SlideState) -> None:
        assert state.writer is not None
        commit: ObjectRef[dict[str, Any]] = state.writer.commit.remote(time.perf_counter() - state.started)
        self.pending[commit] = InFlight(Stage.COMMIT, state.item.slide_id)

    def _prepared(self, state: SlideState, prepared: PreparedSlide) -> None:
        state.prepared = prepared
        state.ranges = list(batches(len(prepared.plan.tiles), self.options.tiles_per_batch))
        state.writer = SlideWriterActor.remote(self.out, prepared, self.config, self.identity)  # type: ignore[attr-defined]
        self.tile_bar.total = (self.tile_bar.total or 0) + len(prepared.plan.tiles)
        if not state.ranges:
            self._commit(state)

    def _committed(self, state: SlideState, record: dict[str, Any]) -> None:
        slide_id = state.item.slide_id
        self.done += 1
        self.nuclei += int(record["nuclei_count"])
        log.info("slide %s: %d nuclei in %.1f s", slide_id, record["nuclei_count"], record["seconds_total"])
        if state.writer is not None:
            ray.kill(state.writer)
            state.writer = None
        self._finish(state, "done")

    def _fail(self, state: SlideState, exc: BaseException) -> None:
        record_failure(self.out, self.config, state.item, task_cause(exc))
        self._abort_writer(state)
        self.failed += 1
        self._finish(state, "failed")

    def _abort_writer(self, state: SlideState) -> None:
        """Ask a failed slide's writer to remove its temporary file, without waiting: the
        writer is ended when its abort returns (after any writes queued before it)."""
        if state.writer is None:
            return
        ref: ObjectRef[None] = state.writer.abort.remote()
        self.aborting[ref] = state.writer
        self.pending[ref] = InFlight(Stage.ABORT, state.item.slide_id)
        state.writer = None

    def _writer_aborted(self, ref: ObjectRef[None]) -> None:
        writer = self.aborting.pop(ref)
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001 - the writer may be gone already
            log.warning("a failed slide's writer could not remove its temporary file")
        ray.kill(writer)

    def _end_aborted_writers(self, timeout_s: float) -> None:
        """Wait at most ``timeout_s`` for outstanding aborts, then end every such writer."""
        if self.aborting:
            ray.wait(list(self.aborting), num_returns=len(self.aborting), timeout=timeout_s)
        for writer in self.aborting.values():
            ray.kill(writer)
        self.aborting.clear()

    def _finish(self, state: SlideState, outcome: str) -> None:
        self.active.pop(state.item.slide_id, None)
        self.bar.update(1)
        if self.on_event is not None:
            self.on_event(self, outcome, state.item.slide_id)


def run_cohort_ray(
    items: Sequence[SlideInput], out: str, config: ExtractConfig, segmenter: Segmenter, *,
    options: RayOptions | None = None, show_progress: bool = True, on_event: EventFn | None = None,
) -> CohortResult:
    """Process the slides of ``items`` not yet committed with this config (Ray must be up)."""
    if not ray.is_initialized():
        raise NucleiscopeError("Ray is not initialised (jobs.cluster.init_ray starts or joins one)")
    options = options or RayOptions()
    gpus = WorkerResources.for_cluster(ray.cluster_resources(), options.actors,  # type: ignore[no-untyped-call]
                                       gpu_actors=options.gpu_actors).actor_num_gpus  # fmt: skip
    identity = start_run(out, config, segmenter, items, device="cuda" if gpus else "cpu")
    todo = pending_items(items, out, identity, config)
    if not todo:  # nothing to do: start no actor (on a cluster it could boot a GPU node for nothing)
        consolidate(out, storage_options=config.storage_options)
        return CohortResult(0, 0, len(items), out)
    cohort = RayCohort(out, config, identity, options, on_event)
    try:
        done, failed = cohort.run(todo, show_progress)
    finally:
        for actor in cohort.actors:
            ray.kill(actor)
        consolidate(out, storage_options=config.storage_options)
    return CohortResult(done, failed, len(items) - len(todo), out)
