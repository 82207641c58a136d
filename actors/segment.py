"""Ray wrappers around the pure core: tasks for IO and CPU work, actors for models.

The segmentation actor loads its model once; tasks carry plain data (prepared
slide, tile lists, arrays). Every stage returns the seconds it spent, so the slide
record has per-stage timings even though stages run in different processes.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from numpy.typing import NDArray

from ..pipeline.extraction.config import ExtractConfig
from ..pipeline.extraction.extract import (
    PreparedSlide,
    SlideFailure,
    SlideSink,
    StageTimer,
    measure_tile,
    prepare_slide,
    read_tiles,
    reopen_slide,
)
from ..pipeline.extraction.identity import RunIdentity
from ..pipeline.segmentation.protocol import Segmenter, SlideStats
from ..pipeline.segmentation.registry import make_segmenter

Timings = dict[str, float]


@functools.lru_cache(maxsize=4)
def cached_segmenter(
    name: str, model_path: str | None, tta: bool | None, device: str | None = None
) -> Segmenter:
    """One segmenter per worker process and configuration (for fit and post-processing)."""
    return make_segmenter(name, model_path, tta=tta, device=device)


def _segmenter(config: ExtractConfig) -> Segmenter:
    return cached_segmenter(config.segmenter, config.model_path, config.tta, "cpu")


@ray.remote(max_retries=3)
def prepare_task(uri: str, slide_id: str, mpp: float | None, config: ExtractConfig) -> PreparedSlide:
    """Open, tissue, fit and plan one slide (raises SlideFailure)."""
    timer = StageTimer()
    try:
        return prepare_slide(uri, slide_id, config, _segmenter(config), mpp_override=mpp, timer=timer)
    except Exception as exc:
        raise SlideFailure(timer.stage, exc) from exc


@ray.remote(max_retries=3)
def read_task(prepared: PreparedSlide, start: int, stop: int, config: ExtractConfig) -> tuple[list[NDArray[np.uint8]], Timings]:
    """Read tiles ``start:stop`` of a slide's plan."""
    begin = time.perf_counter()
    try:
        with reopen_slide(prepared, config.storage_options) as slide:
            tiles = read_tiles(slide, prepared, prepared.plan.tiles[start:stop])
    except Exception as exc:
        raise SlideFailure("read", exc) from exc
    return tiles, {"read": time.perf_counter() - begin}


def _measure_batch(
    prepared: PreparedSlide, start: int, stop: int, config: ExtractConfig,
    rgbs: Sequence[NDArray[np.uint8]], evidence: Sequence[NDArray[Any]], timer: StageTimer,
) -> list[pa.Table]:
    """Post-process and measure tiles ``start:stop`` from their RGB windows and evidence."""
    segmenter = _segmenter(config)
    return [measure_tile(ev, rgb, tile, prepared, segmenter, timer)
            for ev, rgb, tile in zip(evidence, rgbs, prepared.plan.tiles[start:stop])]  # fmt: skip


@ray.remote(max_retries=3)
def measure_task(
    prepared: PreparedSlide, start: int, stop: int, config: ExtractConfig,
    read: tuple[list[NDArray[np.uint8]], Timings], predicted: tuple[list[NDArray[Any]], Timings],
) -> tuple[list[pa.Table], Timings]:
    """Post-process and measure tiles ``start:stop`` (owned nuclei only)."""
    timer = StageTimer()
    timer.add(read[1])
    timer.add(predicted[1])
    try:
        tables = _measure_batch(prepared, start, stop, config, read[0], predicted[0], timer)
    except Exception as exc:
        raise SlideFailure(timer.stage, exc) from exc
    return tables, timer.seconds


@ray.remote(max_retries=0)
def tiles_task(prepared: PreparedSlide, start: int, stop: int, config: ExtractConfig) -> tuple[list[pa.Table], Timings]:
    """Read, segment and measure tiles ``start:stop`` in one task: how a cluster without
    accelerators runs (the segmenter, model included, is loaded once per worker process; no
    tile crosses the object store). Not retried by Ray: the driver counts a batch's deaths."""
    timer = StageTimer()
    segmenter = _segmenter(config)
    try:
        with timer("read"), reopen_slide(prepared, config.storage_options) as slide:
            tiles = read_tiles(slide, prepared, prepared.plan.tiles[start:stop])
        with timer("segment"):
            evidence = segmenter.predict_batch(tiles, prepared.seg_mpp, prepared.stats)
        tables = _measure_batch(prepared, start, stop, config, tiles, evidence, timer)
    except Exception as exc:
        raise SlideFailure(timer.stage, exc) from exc
    return tables, timer.seconds


class SegmentWorker:
    """Holds one segmenter (model loaded once) and runs its per-pixel pass on tiles.

    As the Ray actor ``SegmentActor`` it is restarted when its process dies, and a task
    in flight then fails at once (no Ray-level retry): the driver decides what to retry,
    so that a tile that kills its worker every time ends as its slide's failure.
    """

    def __init__(self, name: str, model_path: str | None, tta: bool | None) -> None:
        self.segmenter = make_segmenter(name, model_path, tta=tta)
        self.served = 0

    def predict(
        self, read: tuple[list[NDArray[np.uint8]], Timings], mpp: float, stats: SlideStats
    ) -> tuple[list[NDArray[Any]], Timings]:
        begin = time.perf_counter()
        evidence = self.segmenter.predict_batch(read[0], mpp, stats)
        self.served += 1
        return evidence, {"segment": time.perf_counter() - begin}

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict[str, Any]:
        """Where this actor runs and what it did: pid, node_id, actor_id, served (batches)."""
        context = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": context.get_node_id(), "actor_id": context.get_actor_id(),
                "served": self.served}


#: Restart and retry policy of segmentation actors (``SegmentPool`` sets it again on every actor).
SEGMENT_ACTOR_OPTIONS: dict[str, Any] = {"max_restarts": -1, "max_task_retries": 0}

SegmentActor: Any = ray.remote(**SEGMENT_ACTOR_OPTIONS)(SegmentWorker)


class _SlideWrite:
    """One slide's rows at its writer: the sink, the stage timer, batches waiting for earlier ones."""

    def __init__(self, out: str, prepared: PreparedSlide, config: ExtractConfig, identity: RunIdentity) -> None:
        self.sink = SlideSink(out, prepared, identity, config.storage_options)
        self.timer = StageTimer()
        self.timer.add(prepared.seconds)
        self.waiting: dict[int, list[pa.Table]] = {}
        self.next_batch = 0


@ray.remote(num_cpus=0, max_restarts=0)
class SlideWriterActor:
    """Writes the slides given to it, each batch by batch in plan order, and commits them.

    A run keeps a few of these for its whole length (``jobs.ray_writers``), so no process is
    started per slide; calls from the driver run in the order it sends them.
    """

    def __init__(self, out: str, config: ExtractConfig, identity: RunIdentity) -> None:
        self.out, self.config, self.identity = out, config, identity
        self.slides: dict[str, _SlideWrite] = {}

    def open(self, prepared: PreparedSlide) -> None:
        """Start a slide (again: an earlier attempt's file is removed first)."""
        self.abort(prepared.slide_id)
        self.slides[prepared.slide_id] = _SlideWrite(self.out, prepared, self.config, self.identity)

    def write(self, slide_id: str, batch: int, measured: tuple[list[pa.Table], Timings]) -> int:
        """Queue batch ``batch``; write every batch now in order. Returns the rows received so far
        (written, or queued behind an earlier batch)."""
        slide = self.slides[slide_id]
        slide.timer.add(measured[1])
        slide.waiting[batch] = measured[0]
        while slide.next_batch in slide.waiting:
            with slide.timer("write"):
                for table in slide.waiting.pop(slide.next_batch):
                    slide.sink.write(table)
            slide.next_batch += 1
        queued = sum(int(t.num_rows) for tables in slide.waiting.values() for t in tables)
        return int(slide.sink.count) + queued

    def commit(self, slide_id: str, wall_seconds: float) -> dict[str, Any]:
        slide = self.slides.pop(slide_id)
        return slide.sink.commit(slide.timer, wall_seconds)

    def abort(self, slide_id: str) -> None:
        """Drop a slide, removing its temporary file (nothing when the slide is not here)."""
        slide = self.slides.pop(slide_id, None)
        if slide is not None:
            slide.sink.abort()

    def held(self) -> list[str]:
        """The slides this writer holds now."""
        return sorted(self.slides)


def batches(n_tiles: int, per_batch: int) -> Sequence[tuple[int, int]]:
    """(start, stop) ranges of a plan's tiles, ``per_batch`` at a time."""
    return [(i, min(i + per_batch, n_tiles)) for i in range(0, n_tiles, per_batch)]
