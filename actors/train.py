"""Ray side of training the attention model: tasks that plan sources and cut scale-labelled
tiles, and the function every Ray Train worker runs (``train_loop_per_worker``), a thin
wrapper around the shared loop ``pipeline.training.attention_run.train_attention``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch

from ..pipeline.common.devices import enable_fast_math
from ..pipeline.training.attention_run import resident_sampler, start_attention, train_attention
from ..pipeline.training.config import StreamConfig, TrainJobConfig
from ..pipeline.training.loop import ScaleTileSampler, TilePool
from ..pipeline.training.scale_tiles import (
    ScaleTiles,
    SourcePlan,
    SourceReader,
    open_source,
    plan_source,
    seed_sequence,
    window_tiles,
)

logger = logging.getLogger(__name__)

#: Consecutive failed window tasks after which a worker gives up.
MAX_TASK_FAILURES = 20


@ray.remote(max_retries=3)
def plan_source_task(uri: str, mpp: float | None, tissue_mpp: float, storage_options: dict[str, Any]) -> SourcePlan:
    """``plan_source`` in a task (its errors reach the driver as the task's cause)."""
    return plan_source(uri, mpp, tissue_mpp=tissue_mpp, storage_options=storage_options)


@functools.lru_cache(maxsize=8)
def _reader(uri: str, mpp: float | None, options_json: str) -> SourceReader:
    """One open source per task process (slides keep their file handle and read cache)."""
    return open_source(uri, mpp, storage_options=json.loads(options_json))


@ray.remote(max_retries=3)
def window_tiles_task(plan: SourcePlan, tile_px: int, stream: StreamConfig, stain_norm: bool,
                      seed: tuple[int, ...], options_json: str) -> ScaleTiles:
    """``stream.tiles_per_scale`` tiles per scale from one random tissue window of ``plan``."""
    reader = _reader(plan.uri, plan.stated_mpp, options_json)
    return window_tiles(reader, plan, tile_px=tile_px, per_scale=stream.tiles_per_scale,
                        window_um=stream.window_um, min_tissue_frac=stream.min_tissue_frac,
                        rng=seed_sequence(*seed), stain_norm=stain_norm)  # fmt: skip


class TileStream:
    """Keeps ``tasks_in_flight`` window tasks running for one worker and feeds their tiles to a pool."""

    def __init__(self, plans: Sequence[SourcePlan], job: TrainJobConfig, pool: TilePool, seed: tuple[int, ...],
                 storage_options: Mapping[str, Any]) -> None:
        self.plans = [ray.put(p) for p in plans]
        self.job, self.pool, self.seed = job, pool, seed
        self.options_json = json.dumps(dict(storage_options), sort_keys=True)
        self.rng = seed_sequence(*seed, -1)
        self.pending: list[Any] = []
        self.submitted = self.failures = 0
        self.task = window_tiles_task.options(num_cpus=job.stream.task_cpus)

    def _submit(self) -> None:
        while len(self.pending) < self.job.stream.tasks_in_flight:
            plan = self.plans[int(self.rng.integers(len(self.plans)))]
            self.pending.append(self.task.remote(plan, self.job.train.tile_px, self.job.stream,
                                                 self.job.train.stain_norm, (*self.seed, self.submitted),
                                                 self.options_json))  # fmt: skip
            self.submitted += 1

    def poll(self, timeout_s: float = 0.0) -> int:
        """Add the tiles of finished tasks to the pool and resubmit; returns tiles added."""
        self._submit()
        done, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=timeout_s)
        added = 0
        for ref in done:
            try:
                result: ScaleTiles = ray.get(ref)
            except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as exc:
                self.failures += 1
                logger.warning("a tile task failed (%d in a row): %s", self.failures, exc)
                if self.failures >= MAX_TASK_FAILURES:
                    raise RuntimeError(f"{self.failures} tile tasks failed in a row; last: {exc}") from exc
                continue
            self.failures = 0
            self.pool.add(result.tiles, result.labels)
            added += len(result.labels)
        self._submit()
        return added

    def fill(self) -> None:
        """Block until every scale of the pool is full."""
        while min(self.pool.filled) < self.pool.capacity:
            self.poll(timeout_s=1.0)


def _sampler(job: TrainJobConfig, plans: Sequence[SourcePlan], device: torch.device, seed: tuple[int, ...],
             options: Mapping[str, Any]) -> tuple[ScaleTileSampler | TilePool, TileStream | None]:
    if job.sampler == "resident":
        return resident_sampler(job, plans, device, options), None
    pool = TilePool(job.stream.pool_tiles, job.train, device)
    stream = TileStream(plans, job, pool, seed, options)
    stream.fill()
    return pool, stream


def _setup_device(job: TrainJobConfig) -> torch.device:
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        enable_fast_math(device)
    else:
        torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    return device


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker: resume or start, train to ``job.steps``, checkpoint, write the results.

    ``loop_config``: ``job`` (TrainJobConfig), ``plans`` (SourcePlans), ``run_dir`` (URL) and
    ``storage_options``.
    """
    import ray.train

    job: TrainJobConfig = loop_config["job"]
    plans: list[SourcePlan] = loop_config["plans"]
    run_dir: str = loop_config["run_dir"]
    options: dict[str, Any] = loop_config["storage_options"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _setup_device(job)
    state, rows, seconds = start_attention(job, run_dir, device, rank, world, options)
    sampler, stream = _sampler(job, plans, device, (job.train.seed, rank, state.step), options)
    train_attention(job, sampler, device, run_dir=run_dir, options=options, state=state, rows=rows,
                    seconds=seconds, rank=rank, world=world, feed=stream, trainer="nucleiscope train (Ray Train)")


__all__ = ["TileStream", "plan_source_task", "train_loop_per_worker", "window_tiles_task"]
