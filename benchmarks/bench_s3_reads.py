"""Remote read settings for slides in S3: requests, bytes and time per access pattern.

    python benchmarks/bench_s3_reads.py [--size-px 40000] [--regions 50] [--real PATH]

Real slides are 0.3-3 GB, far larger than any read cache, while the team's real test
slides are under 4 MB and fit in one cache block, so they cannot tell settings apart.
The benchmark therefore writes a realistic large slide quickly: an Aperio-like
pyramidal BigTIFF (``--size-px`` square, 0.25 µm/px, 512 px JPEG tiles, levels at
downsample 4) whose tiles are pre-encoded 512 px patches of the real
CMU-1-Small-Region.svs from ../shared (of a small synthetic slide when absent), so tile
sizes and the file layout are those of a scanner's file. It is uploaded to a local
moto S3 server and read through ``FlakyS3Proxy`` (no faults) to count requests and
bytes (the proxy answers this object's GET and HEAD from the local copy, as moto
copies the whole object on every ranged GET). For each read setting (s3fs ``default_cache_type`` / ``default_block_size``
storage options, which ``Slide.open`` honours) three patterns are measured:

* open: ``Slide.open`` (TIFF structure, brightfield check) and the 8 µm/px thumbnail;
* scan: the extraction pattern, 1024 px windows at 0.5 µm/px (128 px overlap) in
  raster order over ``--scan-rows`` window rows in the middle of the slide;
* random: ``--regions`` random 512 x 512 level-0 regions (seeded).

Local times are mostly decoding and hide the network; the ``S3 est`` columns add a
model of a remote store to them: ``--latency-ms`` per request plus bytes at ``--mbps``
MB/s. The recommendation minimises the sum of the two estimates.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nucleiscope.pipeline.slides.slide import Slide  # noqa: E402
from nucleiscope.pipeline.tiling.plan import TileConfig, plan_tiles  # noqa: E402
from tests import synthetic  # noqa: E402
from tests.s3util import FlakyS3Proxy, mirror_of, moto_s3, new_bucket, upload  # noqa: E402

KIB, MIB = 1 << 10, 1 << 20
#: name -> extra storage options (s3fs per-filesystem defaults for ``open``).
SETTINGS: dict[str, dict[str, Any]] = {
    "s3fs default (readahead 50 MiB)": {"default_cache_type": "readahead"},
    "readahead 1 MiB": {"default_cache_type": "readahead", "default_block_size": MIB},
    "none": {"default_cache_type": "none"},
    "blockcache 256 KiB": {"default_cache_type": "blockcache", "default_block_size": 256 * KIB},
    "blockcache 1 MiB": {"default_cache_type": "blockcache", "default_block_size": MIB},
    "blockcache 2 MiB": {"default_cache_type": "blockcache", "default_block_size": 2 * MIB},
    "blockcache 4 MiB": {"default_cache_type": "blockcache", "default_block_size": 4 * MIB},
}
#: The extraction's defaults: working µm/px, tissue view, fit patches, QC picture, tile windows.
SEG_MPP, TISSUE_MPP, FIT_PATCHES, FIT_PATCH_PX, QC_MAX_PX = 0.5, 8.0, 16, 384, 2048
TILE_WINDOW_PX, OVERLAP_PX = 1024, 128
TILE_PX, MOSAIC_MPP = 512, 0.25
#: blockcache keeps at most this many blocks (fsspec's default).
BLOCKCACHE_MAXBLOCKS = 32


def source_patches(real: Path, tmp: Path, n: int = 16) -> list[np.ndarray]:
    """``n`` 512 px RGB patches on a grid over the real slide (a synthetic one when absent)."""
    if not real.is_file():
        real = Path(synthetic.write_synthetic_slide(tmp / "source.svs", width_px=2048, height_px=2048,
                                                    compression="jpeg", seed=5).path)
    with Slide.open(str(real)) as slide:
        w, h, side = slide.info.width_px, slide.info.height_px, int(np.sqrt(n))
        xs = np.linspace(0, max(0, w - TILE_PX), side).astype(int)
        ys = np.linspace(0, max(0, h - TILE_PX), side).astype(int)
        return [slide.read_region(int(x), int(y), TILE_PX, TILE_PX, slide.info.mpp) for y in ys for x in xs]


def encoded_tiles(patches: list[np.ndarray], tmp: Path) -> list[bytes]:
    """The patches as tifffile's own JPEG tile segments (so the big file can reuse them verbatim)."""
    path = tmp / "pool.tif"
    tifffile.imwrite(path, np.concatenate(patches, axis=1), tile=(TILE_PX, TILE_PX), compression="jpeg",
                     compressionargs={"level": 80}, photometric="rgb")
    with tifffile.TiffFile(path) as tif, open(path, "rb") as fh:
        page = tif.pages[0]
        segments = []
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            fh.seek(offset)
            segments.append(fh.read(count))
    return segments


def write_mosaic_slide(path: Path, size_px: int, tiles: list[bytes]) -> Path:
    """A pyramidal BigTIFF of ``size_px`` square whose tiles cycle through ``tiles``.

    SVS page order: level 0, a small stripped thumbnail, then levels at downsample 4, 16, ...
    """
    desc = (f"Aperio Image Library v12.0.0\n{size_px}x{size_px} [0,0 {size_px}x{size_px}] "
            f"({TILE_PX}x{TILE_PX}) JPEG Q=80|AppMag = 40|MPP = {MOSAIC_MPP}")

    def cycle(n: int, shift: int) -> Iterator[bytes]:
        for k in range(n):
            yield tiles[(k * 7 + shift) % len(tiles)]

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        side, level = size_px, 0
        while level == 0 or side >= 1024:
            tw.write(cycle(math.ceil(side / TILE_PX) ** 2, level), shape=(side, side, 3), dtype=np.uint8,
                     tile=(TILE_PX, TILE_PX), compression="jpeg", photometric="rgb", metadata=None,
                     description=desc if level == 0 else f"{desc} -> {side}x{side}", subfiletype=0)
            if level == 0:
                thumb = np.full((256, 256, 3), 230, np.uint8)
                tw.write(thumb, photometric="rgb", description=f"{desc} thumbnail 256x256", metadata=None)
            side, level = side // 4, level + 1
    return path


@dataclass
class Cost:
    """Requests, bytes and local seconds of one access pattern."""

    seconds: float
    gets: int
    heads: int
    bytes: int

    def scaled(self, factor: float) -> Cost:
        return Cost(self.seconds * factor, round(self.gets * factor), round(self.heads * factor),
                    round(self.bytes * factor))

    def io_s(self, latency_s: float, bytes_per_s: float) -> float:
        """Modelled time on a remote store: a latency per request plus the transfer."""
        return (self.gets + self.heads) * latency_s + self.bytes / bytes_per_s


def measure(proxy: FlakyS3Proxy, action: Callable[[], Any]) -> Cost:
    proxy.reset_counts()
    start = time.perf_counter()
    action()
    seconds = time.perf_counter() - start
    return Cost(seconds, proxy.requests["GET"], proxy.requests["HEAD"], proxy.body_bytes)


def prepare_reads(slide: Slide) -> None:
    """What ``prepare_slide`` reads: tissue view, FIT_PATCHES patches spread over the slide, QC view."""
    info = slide.info
    slide.thumbnail(TISSUE_MPP)
    span = FIT_PATCH_PX * SEG_MPP / info.mpp
    for k in range(FIT_PATCHES):
        fx, fy = (k % 4 + 0.5) / 4, (k // 4 + 0.5) / 4
        slide.read_region(fx * info.width_px - span / 2, fy * info.height_px - span / 2, FIT_PATCH_PX,
                          FIT_PATCH_PX, SEG_MPP)
    slide.thumbnail(info.mpp * max(1.0, max(info.width_px, info.height_px) / QC_MAX_PX))


def scan_windows(slide: Slide, rows: int) -> tuple[list[tuple[float, float]], float]:
    """Level-0 origins of the extraction windows of ``rows`` window rows in the middle of the
    slide, and the factor from those rows to the whole slide."""
    info = slide.info
    plan = plan_tiles(info.width_px, info.height_px, SEG_MPP / info.mpp, TileConfig(TILE_WINDOW_PX, OVERLAP_PX))
    n_rows = max(t.row for t in plan.tiles) + 1
    first = max(0, n_rows // 2 - rows // 2)
    chosen = [t for t in plan.tiles if first <= t.row < first + rows]
    return [(t.x_px * plan.scale, t.y_px * plan.scale) for t in chosen], n_rows / min(rows, n_rows)


def bench_setting(uri: str, options: dict[str, Any], proxy: FlakyS3Proxy, regions: int,
                  scan_rows: int) -> dict[str, Cost]:
    """Costs of opening + preparing, of the whole-slide scan (extrapolated), of random regions."""
    holder: dict[str, Slide] = {}

    def open_and_prepare() -> None:
        holder["s"] = Slide.open(uri, storage_options=options)
        prepare_reads(holder["s"])

    costs = {"prepare": measure(proxy, open_and_prepare)}
    with holder["s"] as slide:
        info = slide.info
        windows, factor = scan_windows(slide, scan_rows)
        scan = measure(proxy, lambda: [slide.read_region(x, y, TILE_WINDOW_PX, TILE_WINDOW_PX, SEG_MPP)
                                       for x, y in windows])
        costs["scan"] = scan.scaled(factor)
        rng = np.random.default_rng(0)
        xs = rng.integers(0, max(1, info.width_px - 512), regions)
        ys = rng.integers(0, max(1, info.height_px - 512), regions)
        costs["random"] = measure(
            proxy, lambda: [slide.read_region(int(x), int(y), 512, 512, info.mpp) for x, y in zip(xs, ys)])
    return costs


def cache_mib(extra: dict[str, Any]) -> float:
    """Most memory the read cache of one open slide can hold."""
    kind = str(extra.get("default_cache_type", "readahead"))
    block = float(extra.get("default_block_size", 50 * MIB))
    return {"none": 0.0, "blockcache": BLOCKCACHE_MAXBLOCKS * block / MIB}.get(kind, block / MIB)


def report(name: str, results: dict[str, dict[str, Cost]], latency_s: float, bytes_per_s: float) -> str:
    cols = ["setting", "cache MiB", "prepare GET", "prepare MB", "scan GET", "scan MB", "random GET",
            "random MB", "local s", "extract IO s", "random IO s"]
    lines = [f"\n{name}", "| " + " | ".join(cols) + " |", "| --- " * len(cols) + "|"]
    for setting, c in results.items():
        p, s, r = c["prepare"], c["scan"], c["random"]
        cells = [setting, f"{cache_mib(SETTINGS[setting]):.0f}", f"{p.gets + p.heads}", f"{p.bytes / 1e6:.1f}",
                 f"{s.gets}", f"{s.bytes / 1e6:.0f}", f"{r.gets}", f"{r.bytes / 1e6:.0f}",
                 f"{p.seconds + s.seconds + r.seconds:.1f}",
                 f"{p.io_s(latency_s, bytes_per_s) + s.io_s(latency_s, bytes_per_s):.1f}",
                 f"{r.io_s(latency_s, bytes_per_s):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recommend(results: dict[str, dict[str, Cost]], latency_s: float, bytes_per_s: float) -> str:
    """The setting with the least modelled extraction IO; ties (within 5 %) go to less cache memory."""
    extract = {n: c["prepare"].io_s(latency_s, bytes_per_s) + c["scan"].io_s(latency_s, bytes_per_s)
               for n, c in results.items()}
    low = min(extract.values())
    best = min((n for n, v in extract.items() if v <= 1.05 * low), key=lambda n: cache_mib(SETTINGS[n]))
    return f"recommended: {best} (extract IO {extract[best]:.1f} s, random IO " \
           f"{results[best]['random'].io_s(latency_s, bytes_per_s):.1f} s)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size-px", type=int, default=40000)
    parser.add_argument("--regions", type=int, default=50)
    parser.add_argument("--scan-rows", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--mbps", type=float, default=100.0)
    parser.add_argument("--real", default=str(REPO.parent / "shared/data/slides/CMU-1-Small-Region.svs"))
    args = parser.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    latency_s, bytes_per_s = args.latency_ms / 1e3, args.mbps * 1e6
    with tempfile.TemporaryDirectory() as tmp_dir, moto_s3() as endpoint:
        tmp, start = Path(tmp_dir), time.perf_counter()
        tiles = encoded_tiles(source_patches(Path(args.real), tmp), tmp)
        path = write_mosaic_slide(tmp / f"mosaic-{args.size_px}.svs", args.size_px, tiles)
        [uri] = upload(endpoint, [path], f"s3://{new_bucket(endpoint, 'bench')}/slides/")
        print(f"{path.name}: {path.stat().st_size / 1e6:.0f} MB, mean tile {np.mean([len(t) for t in tiles]) / 1e3:.0f} kB, "
              f"prepared in {time.perf_counter() - start:.1f} s")
        mirror = dict([mirror_of(endpoint, uri, path)])  # moto copies the whole object per ranged GET
        with FlakyS3Proxy(endpoint.url, fault_share=0.0, mirror=mirror) as proxy:
            results = {}
            for name, extra in SETTINGS.items():
                # distinct options make distinct cached s3fs instances (none is garbage-collected
                # mid-run, which makes s3fs's session finaliser complain about event loops)
                options = proxy.storage_options(**extra)
                results[name] = bench_setting(uri, options, proxy, args.regions, args.scan_rows)
    print(report(path.name, results, latency_s, bytes_per_s))
    print(f"\nIO s = requests x {args.latency_ms:g} ms + bytes at {args.mbps:g} MB/s (one connection); "
          "extract = prepare + scan; scan counts are extrapolated from the measured window rows "
          "to the whole slide; local s = measured here (mostly JPEG decoding, on shared CPUs).")
    for latency_ms in sorted({5.0, args.latency_ms, 50.0}):
        print(f"at {latency_ms:g} ms per request: {recommend(results, latency_ms / 1e3, bytes_per_s)}")


if __name__ == "__main__":
    main()
