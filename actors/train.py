"""Ray side of training: tasks that plan sources and cut scale-labelled tiles, and the
loop every Ray Train worker runs (``train_loop_per_worker``).

The run folder (``run_dir``, any fsspec URL) holds ``checkpoints/step-*.pt`` (written by
rank 0, atomically), ``metrics.csv`` (one row per ``log_every`` steps, rewritten at every
checkpoint, at the end and at most every ``METRICS_FLUSH_S`` seconds), ``train.json`` and
the final ``attention_f.safetensors``. A worker group starts from the latest checkpoint
there, so a rerun of the same job, or Ray Train restarting a failed group, continues.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch

from ..pipeline.errors import ConfigError
from ..pipeline.inputs import redact
from ..pipeline.model import save_weights
from ..pipeline.scale_tiles import (
    ScaleTiles,
    SourcePlan,
    SourceReader,
    open_source,
    plan_source,
    read_whole,
    seed_sequence,
    window_tiles,
)
from ..pipeline.storage import write_bytes
from ..pipeline.train_config import SCALE_MPP, StreamConfig, TrainJobConfig
from ..pipeline.training import (
    CHECKPOINT_NAME,
    ScaleTileSampler,
    TilePool,
    TrainState,
    build_state,
    list_checkpoints,
    metrics_to_floats,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
    seed_generators,
    train_step,
    wrap_ddp,
)

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "attention_f.safetensors"
METRICS_NAME = "metrics.csv"
SUMMARY_NAME = "train.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FLUSH_S = 60.0
METRIC_KEYS = ("loss_total", "loss_scale", "loss_tv", "loss_equiv", "loss_scale_equiv",
               "scale_acc", "tau", "tau_ema", "frac_on", "lr")  # fmt: skip
COLUMNS = ("step", "seconds", "samples_per_s", *METRIC_KEYS, "tiles_streamed")
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


def public_job_dict(job: TrainJobConfig) -> dict[str, Any]:
    """``job.to_dict()`` with credentials in URLs masked (for job.json and train.json)."""
    data = job.to_dict()
    data["output"] = redact(data["output"])
    for source in data["sources"]:
        source["path"] = redact(source["path"])
    return data


def _run_url(run_dir: str, name: str) -> str:
    return f"{run_dir.rstrip('/')}/{name}"


def _metrics_csv(rows: Sequence[Mapping[str, float]]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def _resume(job: TrainJobConfig, run_dir: str, device: torch.device, rank: int,
            world: int, options: Mapping[str, Any]) -> tuple[TrainState, list[dict[str, float]], float]:
    """The state to start from (latest checkpoint of the run, or fresh), its metrics rows and seconds."""
    latest: list[str | None] = [None]
    if rank == 0:
        found = list_checkpoints(_run_url(run_dir, CHECKPOINT_DIR), storage_options=options)
        latest[0] = found[-1][1] if found else None
    if world > 1:
        torch.distributed.broadcast_object_list(latest, src=0)
    if latest[0] is None:
        return build_state(job.train, device), [], 0.0
    state, extra = read_checkpoint(latest[0], device, storage_options=options)
    if state.config != job.train:
        raise ConfigError(f"{latest[0]} was trained with other hyper-parameters than [train] of this job")
    logger.info("rank %d resumes from %s (step %d)", rank, latest[0], state.step)
    return state, list(extra.get("metrics", [])), float(extra.get("seconds", 0.0))


def _reduced(metrics: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Host floats of the metrics, averaged over the workers (a collective on every rank)."""
    if world > 1:
        keys = sorted(metrics)
        device = metrics["loss_total"].device
        stacked = torch.stack([metrics[k].detach().float().reshape(()).to(device) for k in keys])
        torch.distributed.all_reduce(stacked)
        metrics = dict(zip(keys, stacked / world))
    return metrics_to_floats(metrics)


class _Run:
    """Rank 0's bookkeeping: metrics rows, their CSV, checkpoints and final files."""

    def __init__(self, job: TrainJobConfig, run_dir: str, options: Mapping[str, Any],
                 rows: list[dict[str, float]], seconds: float) -> None:
        self.job, self.run_dir, self.options = job, run_dir, dict(options)
        self.rows, self.base_seconds = rows, seconds
        self.start = self.last_flush = time.perf_counter()

    def seconds(self) -> float:
        return self.base_seconds + time.perf_counter() - self.start

    def flush(self) -> None:
        write_bytes(self.run_dir, METRICS_NAME, _metrics_csv(self.rows), storage_options=self.options)
        self.last_flush = time.perf_counter()

    def checkpoint(self, state: TrainState) -> None:
        folder = _run_url(self.run_dir, CHECKPOINT_DIR)
        url = _run_url(folder, CHECKPOINT_NAME.format(step=state.step))
        save_checkpoint(state, url, extra={"metrics": self.rows, "seconds": self.seconds()},
                        storage_options=self.options)
        prune_checkpoints(folder, self.job.keep_checkpoints, storage_options=self.options)
        self.flush()

    def finish(self, state: TrainState, summary: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, WEIGHTS_NAME)
            save_weights(state.f, local, {
                "steps": str(state.step), "stain_norm": str(state.config.stain_norm).lower(),
                "train_mpp": repr(SCALE_MPP[-1]), "trainer": "nucleiscope.jobs.train",
                "g_init": "from scratch (no ImageNet weights)",
            })  # fmt: skip
            with open(local, "rb") as handle:
                write_bytes(self.run_dir, WEIGHTS_NAME, handle.read(), storage_options=self.options)
        write_bytes(self.run_dir, SUMMARY_NAME, json.dumps(summary, indent=2).encode(), storage_options=self.options)
        self.flush()


def _sampler(job: TrainJobConfig, plans: Sequence[SourcePlan], device: torch.device, seed: tuple[int, ...],
             options: Mapping[str, Any]) -> tuple[ScaleTileSampler | TilePool, TileStream | None]:
    if job.sampler == "resident":
        images = []
        for plan in plans:
            reader = open_source(plan.uri, plan.stated_mpp, storage_options=options)
            try:
                images.append(read_whole(reader))
            finally:
                reader.close()
        return ScaleTileSampler(images, [p.mpp for p in plans], job.train, device), None
    pool = TilePool(job.stream.pool_tiles, job.train, device)
    stream = TileStream(plans, job, pool, seed, options)
    stream.fill()
    return pool, stream


def _setup_device(job: TrainJobConfig) -> torch.device:
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
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
    state, rows, seconds = _resume(job, run_dir, device, rank, world, options)
    start_step = state.step
    if world > 1:
        wrap_ddp(state)
    seed_generators(state, rank, start_step)
    sampler, stream = _sampler(job, plans, device, (job.train.seed, rank, start_step), options)
    run = _Run(job, run_dir, options, rows, seconds) if rank == 0 else None
    batch = job.train.batch_size
    last_time, last_step = time.perf_counter(), state.step
    while state.step < job.steps:
        if stream is not None:
            stream.poll()
        metrics = train_step(state, *sampler.sample(batch, state.generator))
        step = state.step
        log_now = step % job.log_every == 0 or step == start_step + 1 or step == job.steps
        if log_now:
            values = _reduced(metrics, world)
            now = time.perf_counter()
            rate = (step - last_step) * batch * world / max(now - last_time, 1e-9)
            last_time, last_step = now, step
            if run is not None:
                tiles = float(stream.pool.tiles_added) if stream is not None else 0.0
                run.rows.append({"step": float(step), "seconds": run.seconds(), "samples_per_s": rate,
                                 **{k: values[k] for k in METRIC_KEYS}, "tiles_streamed": tiles})  # fmt: skip
                _log_row(run.rows[-1], job.steps)
                if now - run.last_flush > METRICS_FLUSH_S:
                    run.flush()
        if (step % job.checkpoint_every == 0 or step == job.steps) and run is not None:
            run.checkpoint(state)
    if run is not None:
        run.finish(state, _summary(job, state, start_step, run, device, world, stream))


def _log_row(row: Mapping[str, float], steps: int) -> None:
    logger.info(
        "step %d/%d loss %.4f (scale %.3f tv %.4f eq %.4f) acc %.2f tau %.3f on %.3f lr %.1e %.0f samples/s",
        int(row["step"]), steps, row["loss_total"], row["loss_scale"], row["loss_tv"], row["loss_equiv"],
        row["scale_acc"], row["tau"], row["frac_on"], row["lr"], row["samples_per_s"],
    )


def _summary(job: TrainJobConfig, state: TrainState, start_step: int, run: _Run, device: torch.device,
             world: int, stream: TileStream | None) -> dict[str, Any]:
    elapsed = time.perf_counter() - run.start
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "steps": state.step, "start_step": start_step, "attempt_seconds": elapsed, "seconds": run.seconds(),
        "samples_per_s": (state.step - start_step) * job.train.batch_size * world / max(elapsed, 1e-9),
        "device": str(device), "device_name": name, "world_size": world, "torch": torch.__version__,
        "sampler": job.sampler, "tiles_streamed": stream.pool.tiles_added if stream is not None else 0,
        "tau_ema": float(state.f.tau_ema), "job": public_job_dict(job),
    }  # fmt: skip


__all__ = ["TileStream", "plan_source_task", "public_job_dict", "train_loop_per_worker", "window_tiles_task"]
