"""One training run of the attention model F (with its scale classifier G), on any runner.

``train_attention`` is the loop every runner shares: a Ray Train worker (``actors.train``,
one per rank, DDP) and the local quick path (``jobs.train``, this process, images resident
on the device) call it with a sampler, and optionally a tile feed to poll. The run folder
(``run_dir``, any fsspec URL) holds ``checkpoints/step-*.pt`` (written by rank 0,
atomically), ``metrics.csv`` (one row per ``log_every`` steps, rewritten at every checkpoint,
at the end and at most every ``METRICS_FLUSH_S`` seconds), ``train.json`` and the final
``attention_f.safetensors``. A run starts from the latest checkpoint there, so a rerun of
the same job (or Ray Train restarting a failed worker group) continues.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from ..common.devices import device_name
from ..common.errors import ConfigError
from ..common.storage import write_bytes
from ..networks.attention_net import save_weights
from ..slides.inputs import redact
from .config import SCALE_MPP, TrainJobConfig
from .loop import (
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
from .scale_tiles import SourcePlan, open_source, read_whole

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "attention_f.safetensors"
METRICS_NAME = "metrics.csv"
SUMMARY_NAME = "train.json"
MAPS_NAME = "maps.npz"
CHECKPOINT_DIR = "checkpoints"
METRICS_FLUSH_S = 60.0
METRIC_KEYS = ("loss_total", "loss_scale", "loss_tv", "loss_equiv", "loss_scale_equiv",
               "scale_acc", "tau", "tau_ema", "frac_on", "lr")  # fmt: skip
COLUMNS = ("step", "seconds", "samples_per_s", *METRIC_KEYS, "tiles_streamed")


class TileFeed(Protocol):
    """Streamed tiles (``actors.train.TileStream``): polled between steps, filling ``pool``."""

    pool: TilePool

    def poll(self, timeout_s: float = 0.0) -> int: ...


def public_job_dict(job: TrainJobConfig) -> dict[str, Any]:
    """``job.to_dict()`` with credentials in URLs masked (for job.json and train.json)."""
    data = job.to_dict()
    data["output"] = redact(data["output"])
    for source in data["sources"]:
        source["path"] = redact(source["path"])
    return data


def run_url(run_dir: str, name: str) -> str:
    """``name`` inside the run folder."""
    return f"{run_dir.rstrip('/')}/{name}"


def weights_metadata(state: TrainState, trainer: str) -> dict[str, str]:
    """What F's weights file records of its training."""
    return {
        "tau_ema": repr(float(state.f.tau_ema)), "sparsity": repr(state.config.sparsity),
        "steps": str(state.step), "stain_norm": str(state.config.stain_norm).lower(),
        "train_mpp": repr(SCALE_MPP[-1]), "trainer": trainer, "g_init": "from scratch (no ImageNet weights)",
    }  # fmt: skip


def resident_sampler(job: TrainJobConfig, plans: Sequence[SourcePlan], device: torch.device,
                     options: Mapping[str, Any]) -> ScaleTileSampler:
    """Every source read whole and kept on ``device`` at the three scales."""
    images = []
    for plan in plans:
        reader = open_source(plan.uri, plan.stated_mpp, storage_options=options)
        try:
            images.append(read_whole(reader))
        finally:
            reader.close()
    return ScaleTileSampler(images, [p.mpp for p in plans], job.train, device)


def _metrics_csv(rows: Sequence[Mapping[str, float]]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def resume_state(job: TrainJobConfig, run_dir: str, device: torch.device, rank: int, world: int,
                 options: Mapping[str, Any]) -> tuple[TrainState, list[dict[str, float]], float]:
    """The state to start from (latest checkpoint of the run, or fresh), its metrics rows and seconds."""
    latest: list[str | None] = [None]
    if rank == 0:
        found = list_checkpoints(run_url(run_dir, CHECKPOINT_DIR), storage_options=options)
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


class RunRecord:
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
        folder = run_url(self.run_dir, CHECKPOINT_DIR)
        url = run_url(folder, CHECKPOINT_NAME.format(step=state.step))
        save_checkpoint(state, url, extra={"metrics": self.rows, "seconds": self.seconds()},
                        storage_options=self.options)
        prune_checkpoints(folder, self.job.keep_checkpoints, storage_options=self.options)
        self.flush()

    def finish(self, state: TrainState, summary: dict[str, Any], trainer: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, WEIGHTS_NAME)
            save_weights(state.f, local, weights_metadata(state, trainer))
            with open(local, "rb") as handle:
                write_bytes(self.run_dir, WEIGHTS_NAME, handle.read(), storage_options=self.options)
        write_bytes(self.run_dir, SUMMARY_NAME, json.dumps(summary, indent=2).encode(), storage_options=self.options)
        self.flush()


def train_attention(job: TrainJobConfig, sampler: ScaleTileSampler | TilePool, device: torch.device, *,
                    run_dir: str, options: Mapping[str, Any], state: TrainState, rows: list[dict[str, float]],
                    seconds: float, rank: int = 0, world: int = 1, feed: TileFeed | None = None,
                    trainer: str = "nucleiscope train") -> TrainState:
    """Train from ``state`` to ``job.steps`` (or until ``job.max_seconds``), logging, checkpointing
    and, on rank 0, writing the run's files. Returns the final state."""
    start_step = state.step
    if world > 1:
        wrap_ddp(state)
    run = RunRecord(job, run_dir, options, rows, seconds) if rank == 0 else None
    batch = job.train.batch_size
    began = last_time = time.perf_counter()
    last_step = state.step
    while state.step < job.steps:
        if feed is not None:
            feed.poll()
        metrics = train_step(state, *sampler.sample(batch, state.generator))
        step = state.step
        out_of_time = job.max_seconds is not None and time.perf_counter() - began >= job.max_seconds
        last = step == job.steps or out_of_time
        if step % job.log_every == 0 or step == start_step + 1 or last:
            values = _reduced(metrics, world)
            now = time.perf_counter()
            rate = (step - last_step) * batch * world / max(now - last_time, 1e-9)
            last_time, last_step = now, step
            if run is not None:
                tiles = float(feed.pool.tiles_added) if feed is not None else 0.0
                run.rows.append({"step": float(step), "seconds": run.seconds(), "samples_per_s": rate,
                                 **{k: values[k] for k in METRIC_KEYS}, "tiles_streamed": tiles})  # fmt: skip
                _log_row(run.rows[-1], job.steps)
                if now - run.last_flush > METRICS_FLUSH_S:
                    run.flush()
        if (step % job.checkpoint_every == 0 or last) and run is not None:
            run.checkpoint(state)
        if out_of_time:
            logger.info("max_seconds (%g s) reached at step %d of %d; rerun to continue",
                        job.max_seconds, step, job.steps)  # fmt: skip
            break
    if run is not None:
        run.finish(state, _summary(job, state, start_step, run, device, world, feed), trainer)
    return state


def start_attention(job: TrainJobConfig, run_dir: str, device: torch.device, rank: int, world: int,
                    options: Mapping[str, Any]) -> tuple[TrainState, list[dict[str, float]], float]:
    """Resume (or start) a run and seed its generators for this rank."""
    state, rows, seconds = resume_state(job, run_dir, device, rank, world, options)
    seed_generators(state, rank, state.step)
    return state, rows, seconds


def _log_row(row: Mapping[str, float], steps: int) -> None:
    logger.info(
        "step %d/%d loss %.4f (scale %.3f tv %.4f eq %.4f) acc %.2f tau %.3f on %.3f lr %.1e %.0f samples/s",
        int(row["step"]), steps, row["loss_total"], row["loss_scale"], row["loss_tv"], row["loss_equiv"],
        row["scale_acc"], row["tau"], row["frac_on"], row["lr"], row["samples_per_s"],
    )


def _summary(job: TrainJobConfig, state: TrainState, start_step: int, run: RunRecord, device: torch.device,
             world: int, feed: TileFeed | None) -> dict[str, Any]:
    elapsed = time.perf_counter() - run.start
    return {
        "steps": state.step, "start_step": start_step, "attempt_seconds": elapsed, "seconds": run.seconds(),
        "samples_per_s": (state.step - start_step) * job.train.batch_size * world / max(elapsed, 1e-9),
        "device": str(device), "device_name": device_name(device), "world_size": world, "torch": torch.__version__,
        "sampler": job.sampler, "tiles_streamed": feed.pool.tiles_added if feed is not None else 0,
        "tau_ema": float(state.f.tau_ema), "job": public_job_dict(job),
    }  # fmt: skip
