"""Cohort driver on Ray: bounded in-flight work, per-slide atomic commits, resume.

Per slide: a task prepares it (open, tissue, fit, plan); tile batches flow
read task -> segmentation actor -> measure task -> the slide's writer actor, which
writes rows in plan order; when every batch is in, the writer commits the slide.
At most ``max_slides`` slides and ``max_batches`` batches are in flight, so driver
and object-store memory stay flat however long the cohort.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from tqdm import tqdm

from ..actors.resources import WorkerResources
from ..actors.segment import (
    SegmentActor,
    SlideWriterActor,
    batches,
    measure_task,
    prepare_task,
    read_task,
)
from ..pipeline.config import ExtractConfig
from ..pipeline.errors import NucleiscopeError
from ..pipeline.extract import PreparedSlide
from ..pipeline.inputs import SlideInput
from ..pipeline.outputs import clear_failure_record, consolidate
from ..pipeline.segmenters import Segmenter
from .run_local import CohortResult, pending_items, record_failure, start_run

log = logging.getLogger(__name__)

#: Called as (cohort, event, slide_id) with event "batch", "done" or "failed".
EventFn = Callable[["RayCohort", str, str], None]


@dataclass
class SlideState:
    """A slide in flight."""

    item: SlideInput
    started: float
    prepared_ref: Any = None
    prepared: PreparedSlide | None = None
    writer: Any = None
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

    def __init__(self, out: str, config: ExtractConfig, segmenter_name: str, model_id: str,
                 options: RayOptions, on_event: EventFn | None = None) -> None:
        cluster = ray.cluster_resources()  # type: ignore[no-untyped-call]
        self.out, self.config, self.options = out, config, options.scaled(cluster)
        self.segmenter_name, self.model_id = segmenter_name, model_id
        self.on_event = on_event
        self.resources = WorkerResources.for_cluster(cluster, options.actors, gpu_actors=options.gpu_actors)
        actor = SegmentActor.options(  # type: ignore[attr-defined]
            num_cpus=self.resources.actor_num_cpus, num_gpus=self.resources.actor_num_gpus
        )
        self.actors = [
            actor.remote(config.segmenter, config.model_path, config.tta) for _ in range(self.resources.actors)
        ]
        self.load = [0] * len(self.actors)
        self.pending: dict[Any, tuple[str, str, int, int]] = {}
        self.active: dict[str, SlideState] = {}
        self.done = self.failed = self.nuclei = 0

    def run(self, items: Sequence[SlideInput], show_progress: bool) -> tuple[int, int]:
        queue = deque(items)
        self.bar = tqdm(total=len(items), unit="slide", disable=not show_progress)
        self.tile_bar = tqdm(unit="tile", disable=not show_progress, position=1)
        started = time.perf_counter()
        try:
            while queue or self.active:
                while queue and len(self.active) < (self.options.max_slides or 2):
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
                self._drop_writer(state, abort=True)
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
        self.pending[ref] = ("prepare", item.slide_id, -1, -1)

    def _in_flight(self) -> int:
        return sum(1 for kind, _, _, _ in self.pending.values() if kind == "write")

    def _submit_batches(self) -> None:
        for state in list(self.active.values()):
            while state.prepared is not None and state.submitted < len(state.ranges):
                if self._in_flight() >= (self.options.max_batches or 6):
                    return
                self._submit(state, state.submitted)
                state.submitted += 1

    def _submit(self, state: SlideState, index: int) -> None:
        start, stop = state.ranges[index]
        cpus = self.resources.task_num_cpus
        read = read_task.options(num_cpus=cpus).remote(state.prepared_ref, start, stop, self.config)
        actor = min(range(len(self.actors)), key=lambda a: self.load[a])
        self.load[actor] += 1
        assert state.prepared is not None
        predicted = self.actors[actor].predict.remote(read, state.prepared.seg_mpp, state.prepared.stats)
        measured = measure_task.options(num_cpus=cpus).remote(
            state.prepared_ref, start, stop, self.config, read, predicted)
        ref = state.writer.write.remote(index, measured)
        self.pending[ref] = ("write", state.item.slide_id, actor, index)

    def _handle(self, ref: Any) -> None:
        kind, slide_id, actor, index = self.pending.pop(ref)
        if kind == "write":
            self.load[actor] -= 1
        state = self.active.get(slide_id)
        if state is None:  # the slide failed already; late results are dropped
            return
        try:
            value = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a failures row
            self._fail(state, exc)
            return
        if kind == "prepare":
            self._prepared(state, value)
        elif kind == "write":
            state.written += 1
            self.tile_bar.update(state.ranges[index][1] - state.ranges[index][0])
            if self.on_event is not None:
                self.on_event(self, "batch", slide_id)
            if state.written == len(state.ranges):
                wall = time.perf_counter() - state.started
                commit = state.writer.commit.remote(self.segmenter_name, self.model_id, wall)
                self.pending[commit] = ("commit", slide_id, -1, -1)
        else:
            self._committed(state, value)

    def _prepared(self, state: SlideState, prepared: PreparedSlide) -> None:
        state.prepared = prepared
        state.ranges = list(batches(len(prepared.plan.tiles), self.options.tiles_per_batch))
        state.writer = SlideWriterActor.remote(self.out, prepared, self.config)  # type: ignore[attr-defined]
        self.tile_bar.total = (self.tile_bar.total or 0) + len(prepared.plan.tiles)
        if not state.ranges:
            commit = state.writer.commit.remote(self.segmenter_name, self.model_id, time.perf_counter() - state.started)
            self.pending[commit] = ("commit", state.item.slide_id, -1, -1)

    def _committed(self, state: SlideState, record: dict[str, Any]) -> None:
        slide_id = state.item.slide_id
        clear_failure_record(self.out, slide_id, storage_options=self.config.storage_options)
        self.done += 1
        self.nuclei += int(record["nuclei_count"])
        log.info("slide %s: %d nuclei in %.1f s", slide_id, record["nuclei_count"], record["seconds_total"])
        self._finish(state, "done")

    def _fail(self, state: SlideState, exc: BaseException) -> None:
        record_failure(self.out, self.config, state.item, _unwrap(exc))
        self._drop_writer(state, abort=True)
        self.failed += 1
        self._finish(state, "failed")

    def _drop_writer(self, state: SlideState, *, abort: bool) -> None:
        """End a slide's writer actor (removing its temporary file first when aborting)."""
        if state.writer is None:
            return
        if abort:
            try:
                ray.get(state.writer.abort.remote())
            except Exception:  # noqa: BLE001 - the writer may be gone already
                log.warning("could not abort the writer of %s", state.item.slide_id)
        ray.kill(state.writer)
        state.writer = None

    def _finish(self, state: SlideState, outcome: str) -> None:
        self.active.pop(state.item.slide_id, None)
        if outcome == "done":
            self._drop_writer(state, abort=False)
        self.bar.update(1)
        if self.on_event is not None:
            self.on_event(self, outcome, state.item.slide_id)


def _unwrap(exc: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers."""
    seen = exc
    while isinstance(seen, ray.exceptions.RayTaskError) and getattr(seen, "cause", None) is not None:
        seen = seen.cause
    return seen


def run_cohort_ray(
    items: Sequence[SlideInput], out: str, config: ExtractConfig, segmenter: Segmenter, *,
    options: RayOptions | None = None, show_progress: bool = True, on_event: EventFn | None = None,
) -> CohortResult:
    """Process the slides of ``items`` not yet committed with this config (Ray must be up)."""
    if not ray.is_initialized():
        raise NucleiscopeError("Ray is not initialised (jobs.cluster.init_ray starts or joins one)")
    chash = start_run(out, config, segmenter, items)
    todo = pending_items(items, out, chash, config)
    cohort = RayCohort(out, config, segmenter.name, segmenter.model_id, options or RayOptions(), on_event)
    try:
        done, failed = cohort.run(todo, show_progress)
    finally:
        for actor in cohort.actors:
            ray.kill(actor)
        consolidate(out, storage_options=config.storage_options)
    return CohortResult(done, failed, len(items) - len(todo), out)
