"""Training throughput: samples/s of ``train_step`` for the reference and the reduced config.

    python benchmarks/bench_train.py [--device cpu|cuda] [--seconds 20] [--windows 3]

For each config and sampler, times ``train_step`` on batches drawn by

* ``resident``: ``ScaleTileSampler`` over the 30 MoNuSeg images (``../shared``; synthetic
  disc images when absent), all three scales on the device;
* ``stream``: ``TilePool`` (tiles cut by ``scale_tiles.window_tiles`` from a synthetic
  whole-slide image, as the Ray window tasks do), refreshed with one window every
  ``--refresh-steps`` steps in this process (the CPU cost a GPU node spreads over tasks).

Prints the median samples/s over ``--windows`` timed windows of at least ``--seconds``
(and one step) each, after ``--warmup`` steps; and, for the stream, the tiles/s one CPU
core cuts. The reduced config is ``jobs/configs/train-tiny-cpu.toml``'s ``[train]``.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from nucleiscope.pipeline.common.devices import device_name, enable_fast_math, pick_device
from nucleiscope.pipeline.training.config import StreamConfig, TrainConfig, load_job_config
from nucleiscope.pipeline.training.loop import ScaleTileSampler, TilePool, build_state, train_step
from nucleiscope.pipeline.training.scale_tiles import (
    SourceReader,
    open_source,
    plan_source,
    seed_sequence,
    window_tiles,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests package (synthetic slides)
from tests import synthetic  # noqa: E402

MONUSEG = REPO.parent / "shared" / "data" / "monuseg-train" / "images"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images() -> list[np.ndarray]:
    import tifffile

    paths = sorted(glob.glob(str(MONUSEG / "*.tif")))
    if paths:
        return [np.ascontiguousarray(tifffile.imread(p)[..., :3]) for p in paths]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(4):
        img = np.full((512, 512, 3), (235, 170, 205), np.float32)
        yy, xx = np.mgrid[:512, :512]
        for cy, cx in rng.uniform(0, 512, (120, 2)):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 14**2] = (95, 60, 150)
        out.append(np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8))
    return out


class _Stream:
    """A TilePool fed in this process from a synthetic slide."""

    def __init__(self, config: TrainConfig, stream: StreamConfig, device: torch.device, slide: str) -> None:
        self.plan = plan_source(slide)
        self.reader: SourceReader = open_source(slide)
        self.config, self.stream = config, stream
        self.pool = TilePool(stream.pool_tiles, config, device)
        self.rng = seed_sequence(0)
        self.cut_seconds = 0.0
        self.cut_tiles = 0
        while min(self.pool.filled) < self.pool.capacity:
            self.refresh()

    def refresh(self) -> None:
        start = time.perf_counter()
        out = window_tiles(self.reader, self.plan, tile_px=self.config.tile_px, per_scale=self.stream.tiles_per_scale,
                           window_um=self.stream.window_um, min_tissue_frac=self.stream.min_tissue_frac, rng=self.rng)
        self.cut_seconds += time.perf_counter() - start
        self.cut_tiles += len(out.labels)
        self.pool.add(out.tiles, out.labels)


def measure(config: TrainConfig, sampler: ScaleTileSampler | TilePool, device: torch.device, args: argparse.Namespace,
            stream: _Stream | None = None) -> float:
    """Median samples/s over the timed windows."""
    state = build_state(config, device)
    step = 0

    def one() -> None:
        nonlocal step
        if stream is not None and step % args.refresh_steps == 0:
            stream.refresh()
        train_step(state, *sampler.sample(config.batch_size, state.generator))
        step += 1

    for _ in range(args.warmup):
        one()
    rates = []
    for _ in range(args.windows):
        _sync(device)
        start, n = time.perf_counter(), 0
        while n == 0 or time.perf_counter() - start < args.seconds:
            one()
            n += 1
            if device.type == "cuda" and n % 10 == 0:
                _sync(device)
        _sync(device)
        rates.append(n * config.batch_size / (time.perf_counter() - start))
    return float(statistics.median(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--seconds", type=float, default=20.0, help="least length of a timed window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--refresh-steps", type=int, default=1, help="stream: one window cut per this many steps")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    parser.add_argument("--configs", nargs="+", default=["reduced", "reference"], choices=["reduced", "reference"])
    parser.add_argument("--samplers", nargs="+", default=["resident", "stream"], choices=["resident", "stream"])
    args = parser.parse_args()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    enable_fast_math(device)
    tiny = load_job_config(REPO / "jobs" / "configs" / "train-tiny-cpu.toml")
    configs = {"reduced": (tiny.train, tiny.stream), "reference": (TrainConfig(), StreamConfig())}
    name = device_name(device) + ("" if device.type == "cuda" else f" ({torch.get_num_threads()} threads)")
    images = _images() if "resident" in args.samplers else []
    with tempfile.TemporaryDirectory() as tmp:
        slide = synthetic.write_synthetic_slide(Path(tmp) / "bench.svs", width_px=6000, height_px=6000, seed=1).path
        for key in args.configs:
            config, stream_cfg = configs[key]
            for kind in args.samplers:
                stream = _Stream(config, replace(stream_cfg, pool_tiles=min(stream_cfg.pool_tiles, 64)),
                                 device, slide) if kind == "stream" else None
                sampler = stream.pool if stream is not None else ScaleTileSampler(images, 0.25, config, device)
                rate = measure(config, sampler, device, args, stream)
                extra = ""
                if stream is not None:
                    extra = f"; cutting tiles: {stream.cut_tiles / max(stream.cut_seconds, 1e-9):.0f} tiles/s per core"
                print(f"{name}: {key} config (batch {config.batch_size}, crop {config.crop_px}, F width "
                      f"{config.f_width}), {kind} sampler: {rate:.1f} samples/s{extra}", flush=True)


if __name__ == "__main__":
    main()
