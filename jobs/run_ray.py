"""Cohort driver on Ray: bounded in-flight work, per-slide atomic commits, resume.

Per slide: a task prepares it (open, tissue, fit, plan); tile batches flow
read task -> segmentation actor -> measure task -> the slide's writer actor, which
writes rows in plan order; when every batch is in, the writer commits the slide.
At most ``max_slides`` slides and ``max_batches`` batches are in flight, so driver
and object-store memory stay flat however long the cohort.

The driver follows its cluster: every ``refresh_s`` it re-reads the cluster's
resources, re-sizes the in-flight bounds and the segmentation pool
(``ray_pool.SegmentPool``) and tells an autoscaler what the pending work needs.
A killed worker costs a retry, not a slide: tasks are retried by Ray; a batch
whose segmentation actor died is sent again (alone, after its first death); a
slide whose writer died starts again on another writer (a few writers live for the whole run,
each holding the slides given to it). After ``max_tries`` tries
the slide becomes a failures row naming the tiles or the worker, and the cohort
goes on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray import ObjectRef
from ray.actor import ActorHandle
from tqdm import tqdm

from ..actors.resources import WorkerResources
from ..actors.segment import batches, measure_task, prepare_task, read_task, tiles_task
from ..pipeline.common.errors import NucleiscopeError
from ..pipeline.extraction.config import ExtractConfig
from ..pipeline.extraction.extract import PreparedSlide, SlideFailure
from ..pipeline.extraction.identity import RunIdentity
from ..pipeline.measure.outputs import consolidate
from ..pipeline.segmentation.protocol import Segmenter
from ..pipeline.slides.inputs import SlideInput
from .cluster import task_cause
from .ray_pool import SegmentPool, WorkerLostError, actor_id, is_lost_worker, lost_actor_id
from .ray_state import InFlight, RayOptions, SlideState, Stage
from .ray_writers import WriterPool
from .run_local import CohortResult, pending_items, record_failure, start_run

__all__ = ["EventFn", "RayCohort", "RayOptions", "run_cohort_ray"]

log = logging.getLogger(__name__)

#: Called as (cohort, event, slide_id) with event "batch", "retry", "done" or "failed".
EventFn = Callable[["RayCohort", str, str], None]


class RayCohort:
    """One cohort run on an initialised Ray cluster."""

    #: Seconds an interrupted run waits for its writers to remove their temporary files.
    ABORT_WAIT_S = 10.0

    def __init__(self, out: str, config: ExtractConfig, identity: RunIdentity,
                 options: RayOptions, on_event: EventFn | None = None) -> None:
        self.out, self.config, self.requested = out, config, options
        self.identity = identity
        self.on_event = on_event
        self._size_for(ray.cluster_resources())  # type: ignore[no-untyped-call]
        self.pool = SegmentPool(config, self.resources, options.actor_wait_s, self._pool_size())
        self.writers = WriterPool(out, config, identity)
        self.pending: dict[ObjectRef[Any], InFlight] = {}
        self.aborting: dict[ObjectRef[None], ActorHandle[Any]] = {}
        self.batches_in_flight = 0
        self.queue: deque[SlideInput] = deque()
        self.active: dict[str, SlideState] = {}
        self.done = self.failed = self.nuclei = 0
        self.demand: tuple[int, list[dict[str, float]]] | None = None
        self.next_refresh = time.monotonic() + options.refresh_s
        self.bar: tqdm[Any] = tqdm(total=0, unit="slide", disable=True)
        self.tile_bar: tqdm[Any] = tqdm(unit="tile", disable=True)

    @property
    def actors(self) -> list[ActorHandle[Any]]:
        """The segmentation actors now."""
        return self.pool.handles

    def _size_for(self, cluster: dict[str, float]) -> None:
        o = self.requested
        self.options = o.scaled(cluster)
        self.max_slides, self.max_batches = self.options.max_slides or 2, self.options.max_batches or 6
        self.resources = WorkerResources.for_cluster(cluster, o.actors, gpu_actors=o.gpu_actors,
                                                     accelerator=o.accelerator, max_actors=o.max_actors)  # fmt: skip
        #: No accelerator to hold: each batch runs in one CPU task, without segmentation actors.
        self.fused = o.fuse_cpu and not self.resources.actor_num_gpus and self.resources.actor_resource is None

    def _pool_size(self) -> int:
        return 0 if self.fused else self.resources.actors

    def refresh_cluster(self) -> None:
        """Re-read the cluster: in-flight bounds, pool size, the autoscaler's request."""
        self._size_for(ray.cluster_resources())  # type: ignore[no-untyped-call]
        if self.pool.size != self._pool_size():
            log.info("cluster changed: %d segmentation actors (had %d), %d batches in flight at most",
                     self._pool_size(), self.pool.size, self.max_batches)  # fmt: skip
            self.pool.resize(self._pool_size(), self.resources)
        self._request_resources()
        self.next_refresh = time.monotonic() + self.requested.refresh_s

    def _request_resources(self, clear: bool = False) -> None:
        """Ask an autoscaler for a CPU per waiting batch and the pool's actors (or for nothing)."""
        if not self.requested.request_resources:
            return
        waiting = len(self.queue) + sum(len(s.ranges) - s.written if s.prepared else 1 for s in self.active.values())
        bundle = {} if self.fused else self.resources.actor_bundle()
        demand = (0, []) if clear else (int(waiting * self.resources.task_num_cpus),
                                        [bundle] * self.resources.actors if bundle else [])  # fmt: skip
        if demand != self.demand and (self.demand is not None or not clear):
            from ray.autoscaler.sdk import request_resources

            request_resources(num_cpus=demand[0], bundles=demand[1])
            self.demand = demand

    def run(self, items: Sequence[SlideInput], show_progress: bool) -> tuple[int, int]:
        self.queue = deque(items)
        self.bar = tqdm(total=len(items), unit="slide", disable=not show_progress)
        self.tile_bar = tqdm(unit="tile", disable=not show_progress, position=1)
        started = time.perf_counter()
        try:
            self._request_resources()
            while self.queue or self.active or self.aborting:
                while self.queue and len(self.active) < self.max_slides:
                    self._start(self.queue.popleft())
                self._submit_batches()
                self._step()
                nuclei = self.nuclei + sum(s.rows for s in self.active.values())  # as batches are written
                rate = nuclei / max(time.perf_counter() - started, 1e-9)
                self.bar.set_postfix(nuclei=nuclei, nuclei_per_s=f"{rate:.0f}")
        except BaseException:
            for state in list(self.active.values()):
                self._abort_writer(state)
            self._end_aborted_writers(self.ABORT_WAIT_S)
            raise
        finally:
            self.bar.close()
            self.tile_bar.close()
            try:
                self._request_resources(clear=True)
            except Exception:  # noqa: BLE001 - never mask how the run ended
                log.warning("could not withdraw the request to the autoscaler", exc_info=True)
        return self.done, self.failed

    def _step(self) -> None:
        """Wait for one result (or the next refresh) and handle it."""
        pings = self.pool.pings
        refs = [*self.pending, *pings]
        timeout = max(0.0, self.next_refresh - time.monotonic())
        ready: list[ObjectRef[Any]] = []
        if refs:
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        else:
            time.sleep(timeout)
        if time.monotonic() >= self.next_refresh:
            self.refresh_cluster()
        for ref in ready:
            if ref in pings:
                self.pool.pinged(ref, pings[ref])
            else:
                self._handle(ref)
        self.pool.check_running()

    def _start(self, item: SlideInput, generation: int = 0) -> None:
        state = SlideState(item, time.perf_counter(), generation)
        ref = prepare_task.options(num_cpus=self.resources.task_num_cpus).remote(
            item.uri, item.slide_id, item.mpp, self.config)
        state.prepared_ref = ref
        self.active[item.slide_id] = state
        self.pending[ref] = InFlight(Stage.PREPARE, item.slide_id, generation=generation)

    def _submit_batches(self) -> None:
        """Batches to send again first (each alone on an idle actor), then new ones."""
        prepared = [s for s in self.active.values() if s.prepared is not None]
        if not any(s.retry for s in prepared):
            self.pool.undrain()
        for state in prepared:
            while state.retry and self.batches_in_flight < self.max_batches:
                key = None if self.fused else self.pool.pick(alone=True)
                if key is None and not self.fused:
                    break
                self._submit(state, state.retry.popleft(), key)
        for state in prepared:
            while state.submitted < len(state.ranges) and self.batches_in_flight < self.max_batches:
                key = None if self.fused else self.pool.pick()
                if key is None and not self.fused:
                    return
                self._submit(state, state.submitted, key)
                state.submitted += 1

    def _submit(self, state: SlideState, index: int, key: int | None) -> None:
        start, stop = state.ranges[index]
        cpus = self.resources.task_num_cpus
        assert state.prepared is not None and state.prepared_ref is not None and state.writer is not None
        measured: ObjectRef[Any]
        if key is None:  # fused: the whole batch in one task
            measured = tiles_task.options(num_cpus=cpus).remote(state.prepared_ref, start, stop, self.config)
        else:
            read = read_task.options(num_cpus=cpus).remote(state.prepared_ref, start, stop, self.config)
            predicted: ObjectRef[Any] = self.pool.take(key).predict.remote(read, state.prepared.seg_mpp,
                                                                           state.prepared.stats)  # fmt: skip
            measured = measure_task.options(num_cpus=cpus).remote(
                state.prepared_ref, start, stop, self.config, read, predicted)
        ref: ObjectRef[int] = state.writer.write.remote(state.item.slide_id, index, measured)
        self.pending[ref] = InFlight(Stage.WRITE, state.item.slide_id, key, index, state.generation)
        self.batches_in_flight += 1

    def _handle(self, ref: ObjectRef[Any]) -> None:
        flight = self.pending.pop(ref)
        if flight.stage is Stage.ABORT:
            self._writer_aborted(ref)
            return
        if flight.stage is Stage.WRITE:
            if flight.actor is not None:
                self.pool.release(flight.actor)
            self.batches_in_flight -= 1
        state = self.active.get(flight.slide_id)
        if state is None or state.generation != flight.generation:  # failed or started again: dropped
            return
        try:
            value = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a retry or a failures row
            self._failed(state, flight, exc)
            return
        if flight.stage is Stage.PREPARE:
            self._prepared(state, value)
        elif flight.stage is Stage.WRITE:
            assert flight.batch is not None
            state.rows = max(state.rows, int(value))
            self._written(state, flight.batch)
        else:
            self._committed(state, value)

    def _failed(self, state: SlideState, flight: InFlight, exc: BaseException) -> None:
        """A bad input fails its slide; a lost worker costs a retry of the batch or the slide."""
        cause = task_cause(exc)
        if not is_lost_worker(cause):
            self._fail(state, exc)
        elif flight.stage is Stage.WRITE and not self._writer_lost(state, cause) \
                and not isinstance(cause, ray.exceptions.ObjectLostError):  # fmt: skip
            assert flight.batch is not None
            self._retry_batch(state, flight.batch, cause)
        else:
            self._restart(state, flight.stage, cause)

    def _writer_lost(self, state: SlideState, cause: BaseException) -> bool:
        return state.writer is not None and lost_actor_id(cause) == actor_id(state.writer)

    def _retry_batch(self, state: SlideState, batch: int, cause: BaseException) -> None:
        segment = self.pool.lost(cause)
        deaths = state.deaths[batch] = state.deaths.get(batch, 0) + 1
        if deaths >= self.requested.max_tries:
            start, stop = state.ranges[batch]
            who = "segmentation worker" if segment else f"worker ({type(cause).__name__})"
            reason = f"{who} died {deaths} times on tiles {start}-{stop - 1}"
            self._fail(state, SlideFailure("segment" if segment else "ray", WorkerLostError(reason)))
            return
        log.warning("slide %s: a worker died on tiles %d-%d (%s); sending them again",
                    state.item.slide_id, *state.ranges[batch], type(cause).__name__)  # fmt: skip
        state.retry.append(batch)
        if self.on_event is not None:
            self.on_event(self, "retry", state.item.slide_id)

    def _restart(self, state: SlideState, stage: Stage, cause: BaseException) -> None:
        """Start the slide again from its prepare task (its writer, and its rows, are lost)."""
        if self._writer_lost(state, cause):
            what, where = "the slide's writer died", "write"
        elif isinstance(cause, ray.exceptions.ObjectLostError):
            what, where = "data it needed was lost (with its node)", "ray"
        else:
            what, where = f"its {stage.value} worker died", stage.value
        tries = state.generation + 1
        if tries >= self.requested.max_tries:
            self._fail(state, SlideFailure(where, WorkerLostError(f"{what}, {tries} times ({type(cause).__name__})")))
            return
        log.warning("slide %s: %s (%s); starting it again", state.item.slide_id, what, type(cause).__name__)
        if state.writer is not None:
            if self._writer_lost(state, cause):
                self.writers.lost(state.writer)
            else:
                state.writer.abort.remote(state.item.slide_id)
                self.writers.release(state.writer, state.item.slide_id)
        self.active.pop(state.item.slide_id)
        self._start(state.item, state.generation + 1)
        if self.on_event is not None:
            self.on_event(self, "retry", state.item.slide_id)

    def _written(self, state: SlideState, batch: int) -> None:
        state.written += 1
        self.tile_bar.update(state.ranges[batch][1] - state.ranges[batch][0])
        if self.on_event is not None:
            self.on_event(self, "batch", state.item.slide_id)
        if state.written == len(state.ranges):
            self._commit(state)

    def _commit(self, state: SlideState) -> None:
        assert state.writer is not None
        commit: ObjectRef[dict[str, Any]] = state.writer.commit.remote(state.item.slide_id,
                                                                      time.perf_counter() - state.started)
        self.pending[commit] = InFlight(Stage.COMMIT, state.item.slide_id, generation=state.generation)

    def _prepared(self, state: SlideState, prepared: PreparedSlide) -> None:
        state.prepared = prepared
        per_batch = self.options.tiles_per_batch or (1 if self.fused else 4)
        state.ranges = list(batches(len(prepared.plan.tiles), per_batch))
        assert state.prepared_ref is not None
        state.writer = self.writers.assign(state.prepared_ref, state.item.slide_id, self.max_slides)
        if state.generation == 0:
            self.tile_bar.total = (self.tile_bar.total or 0) + len(prepared.plan.tiles)
        if not state.ranges:
            self._commit(state)

    def _committed(self, state: SlideState, record: dict[str, Any]) -> None:
        slide_id = state.item.slide_id
        self.done += 1
        self.nuclei += int(record["nuclei_count"])
        log.info("slide %s: %d nuclei in %.1f s", slide_id, record["nuclei_count"], record["seconds_total"])
        if state.writer is not None:
            self.writers.release(state.writer, slide_id)
            state.writer = None
        self._finish(state, "done")

    def _fail(self, state: SlideState, exc: BaseException) -> None:
        record_failure(self.out, self.config, state.item, task_cause(exc))
        self._abort_writer(state)
        self.failed += 1
        self._finish(state, "failed")

    def _abort_writer(self, state: SlideState) -> None:
        """Ask a failed slide's writer to drop it and remove its temporary file (after any writes
        queued before), without waiting."""
        if state.writer is None:
            return
        ref: ObjectRef[None] = state.writer.abort.remote(state.item.slide_id)
        self.writers.release(state.writer, state.item.slide_id)
        self.aborting[ref] = state.writer
        self.pending[ref] = InFlight(Stage.ABORT, state.item.slide_id)
        state.writer = None

    def _writer_aborted(self, ref: ObjectRef[None]) -> None:
        writer = self.aborting.pop(ref)
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001 - the writer may be gone already
            log.warning("a failed slide's writer could not remove its temporary file")
            self.writers.lost(writer)

    def _end_aborted_writers(self, timeout_s: float) -> None:
        """Wait at most ``timeout_s`` for outstanding aborts (the writers are ended with the run)."""
        if self.aborting:
            ray.wait(list(self.aborting), num_returns=len(self.aborting), timeout=timeout_s)
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
    planned = WorkerResources.for_cluster(ray.cluster_resources(), options.actors,  # type: ignore[no-untyped-call]
                                          gpu_actors=options.gpu_actors, accelerator=options.accelerator)  # fmt: skip
    device = "cpu" if not planned.actor_num_gpus else "cuda" if options.accelerator == "GPU" else options.accelerator.lower()
    identity = start_run(out, config, segmenter, items, device=device)
    todo = pending_items(items, out, identity, config)
    if not todo:  # nothing to do: start no actor (on a cluster it could boot a GPU node for nothing)
        consolidate(out, storage_options=config.storage_options)
        return CohortResult(0, 0, len(items), out)
    cohort = RayCohort(out, config, identity, options, on_event)
    try:
        done, failed = cohort.run(todo, show_progress)
    finally:
        cohort.pool.kill_all()
        cohort.writers.kill_all()
        consolidate(out, storage_options=config.storage_options)
    return CohortResult(done, failed, len(items) - len(todo), out)
