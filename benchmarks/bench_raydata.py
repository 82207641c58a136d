"""The cohort driver (jobs/run_ray.py) against a Ray Data pipeline, on the same synthetic cohort.

    python benchmarks/bench_raydata.py [--edges 2000,2500,3000,4000] [--repeats 3] [--cpus 2] [--tile-px 512]

Both run the classical segmenter on a fresh local Ray (``--cpus``) in a child process,
``--repeats`` times each, alternating:

(a) ``driver``: ``run_cohort_ray`` (bounded in-flight work, one writer actor per slide);
(b) ``raydata``: prepare tasks for every slide, then a Ray Data pipeline over the tiles:
    ``map_batches`` read tasks -> an autoscaling actor pool (``concurrency=(1, cpus)``)
    running the segmenter's ``predict_batch`` -> ``map_batches`` measure tasks, streamed
    to this driver (``iter_batches``), which writes each slide's rows in plan order with
    the same ``SlideSink`` and commits it (a benchmark-only prototype: no resume, no
    failure rows, no retries beyond Ray's own).

Prints, per engine: median wall time and tiles/s of the runs, the driver's peak RSS and
the object store's peak use (sampled every 0.5 s), and whether every slide's nuclei rows
equal those of an in-process run exactly (each nucleus once, same values).

On a 2-core machine (one core shared with another job), 4 slides of 2000-4000 px²:
tile 512 px (59 tiles): driver 23.0 s / 2.6 tiles/s, Ray Data 23.5 s / 2.5 tiles/s;
tile 256 px (219 tiles): driver 16.3 s / 13.4 tiles/s, Ray Data 19.6 s / 11.2 tiles/s.
Driver peak RSS 337-359 MB against 413-414 MB, object store peak 67-76 MiB against
72-92 MiB; both exactly once. The driver stays (it also resumes, records failures,
bounds retries and streams each slide to its own writer).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package (synthetic slides)

from bench_ray import PLASMA  # noqa: E402  (benchmarks/ is not a package)

ENGINES = ("driver", "raydata")
TILES_PER_BATCH = 4
_PREPARED: dict[str, Any] = {}


def synth_cohort(folder: Path, edges: list[int]) -> list[str]:
    from tests.synthetic import write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, edge in enumerate(edges):
        path = folder / f"s{n:02d}.svs"
        write_synthetic_slide(path, width_px=edge, height_px=edge, mpp=0.25, compression="jpeg", seed=n,
                              min_level_px=256)  # fmt: skip
        paths.append(str(path))
    return paths


# --- (b) the Ray Data pipeline ------------------------------------------------------------
def _prepared(refs: list[Any], slide: int) -> Any:
    """The PreparedSlide of cohort slide ``slide``, fetched once per worker process."""
    import ray

    key = refs[slide].hex()
    if key not in _PREPARED:
        _PREPARED[key] = ray.get(refs[slide])
    return _PREPARED[key]


def _groups(batch: dict[str, np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """(slide, row indices) of a batch, by slide."""
    slides = batch["slide"]
    return [(int(s), np.flatnonzero(slides == s)) for s in np.unique(slides)]


def read_udf(batch: dict[str, np.ndarray], refs: list[Any], config: Any) -> dict[str, np.ndarray]:
    from nucleiscope.pipeline.extraction.extract import read_tiles, reopen_slide

    out: dict[str, list[Any]] = {"slide": [], "tile": [], "rgb": []}
    for slide, rows in _groups(batch):
        prepared = _prepared(refs, slide)
        with reopen_slide(prepared, config.storage_options) as handle:
            tiles = read_tiles(handle, prepared, [prepared.plan.tiles[int(t)] for t in batch["tile"][rows]])
        out["slide"] += [slide] * len(rows)
        out["tile"] += list(batch["tile"][rows])
        out["rgb"] += tiles
    return {"slide": np.array(out["slide"]), "tile": np.array(out["tile"]), "rgb": np.stack(out["rgb"])}


class SegmentUDF:
    """The segmentation stage: one segmenter per actor of Ray Data's autoscaling pool."""

    def __init__(self, name: str, model_path: str | None, tta: bool | None, refs: list[Any]) -> None:
        from nucleiscope.pipeline.segmentation.registry import make_segmenter

        self.segmenter, self.refs = make_segmenter(name, model_path, tta=tta), refs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        evidence = np.zeros(batch["rgb"].shape[:3], bool)
        for slide, rows in _groups(batch):
            prepared = _prepared(self.refs, slide)
            found = self.segmenter.predict_batch(list(batch["rgb"][rows]), prepared.seg_mpp, prepared.stats)
            evidence[rows] = np.stack(found)
        return {**batch, "evidence": evidence}


def measure_udf(batch: dict[str, np.ndarray], refs: list[Any], config: Any) -> dict[str, np.ndarray]:
    import pyarrow as pa

    from nucleiscope.actors.segment import cached_segmenter
    from nucleiscope.pipeline.extraction.extract import StageTimer, measure_tile

    segmenter = cached_segmenter(config.segmenter, config.model_path, config.tta, "cpu")  # as the driver's tasks
    blobs = []
    for i in range(len(batch["tile"])):
        prepared = _prepared(refs, int(batch["slide"][i]))
        tile = prepared.plan.tiles[int(batch["tile"][i])]
        table = measure_tile(batch["evidence"][i], batch["rgb"][i], tile, prepared, segmenter, StageTimer())
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        blobs.append(sink.getvalue())
    return {"slide": batch["slide"], "tile": batch["tile"], "table": np.array(blobs, dtype=object)}


def run_raydata(items: list[Any], out: str, config: Any, cpus: int) -> int:
    """The cohort through Ray Data; returns the number of tiles."""
    import pyarrow as pa
    import ray

    from nucleiscope.actors.segment import prepare_task
    from nucleiscope.jobs.run_local import start_run
    from nucleiscope.pipeline.extraction.extract import SlideSink, StageTimer
    from nucleiscope.pipeline.measure.outputs import consolidate
    from nucleiscope.pipeline.segmentation.registry import make_segmenter

    segmenter = make_segmenter(config.segmenter, config.model_path, tta=config.tta)
    identity = start_run(out, config, segmenter, items)
    started = time.perf_counter()
    refs = [prepare_task.remote(i.uri, i.slide_id, i.mpp, config) for i in items]
    prepared = ray.get(refs)
    rows = [{"slide": s, "tile": t} for s, p in enumerate(prepared) for t in range(len(p.plan.tiles))]
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(read_udf, batch_size=TILES_PER_BATCH, fn_kwargs={"refs": refs, "config": config}, num_cpus=1)
    ds = ds.map_batches(SegmentUDF, batch_size=TILES_PER_BATCH, concurrency=(1, cpus), num_cpus=0,
                        fn_constructor_args=(config.segmenter, config.model_path, config.tta, refs))  # fmt: skip
    ds = ds.map_batches(measure_udf, batch_size=TILES_PER_BATCH, fn_kwargs={"refs": refs, "config": config},
                        num_cpus=1)  # fmt: skip
    sinks = [SlideSink(out, p, identity, config.storage_options) for p in prepared]
    waiting: list[dict[int, bytes]] = [{} for _ in prepared]
    written = [0] * len(prepared)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for slide, tile, blob in zip(batch["slide"], batch["tile"], batch["table"]):
            waiting[int(slide)][int(tile)] = blob
            s = int(slide)
            while written[s] in waiting[s]:  # rows in plan order, as the writer actor does
                sinks[s].write(pa.ipc.open_stream(waiting[s].pop(written[s])).read_all())
                written[s] += 1
            if written[s] == len(prepared[s].plan.tiles):
                timer = StageTimer()
                timer.add(prepared[s].seconds)
                sinks[s].commit(timer, time.perf_counter() - started)
    consolidate(out, storage_options=config.storage_options)
    return len(rows)


# --- child: one run of one engine -----------------------------------------------------------
def sample_store(stop: threading.Event, peak: list[float]) -> None:
    import ray
    from ray._private.internal_api import memory_summary

    address = ray.get_runtime_context().gcs_address  # other Rays may run on this machine
    while not stop.wait(0.5):
        try:
            match = PLASMA.search(memory_summary(address=address, stats_only=True))
        except Exception:  # noqa: BLE001 - the cluster is going away
            return
        if match:
            peak[0] = max(peak[0], float(match.group(1)))


def child(engine: str, out: str, cpus: int, tile_px: int, slides: list[str]) -> None:
    import ray

    from nucleiscope.jobs.run_ray import RayOptions, run_cohort_ray
    from nucleiscope.pipeline.extraction.config import ExtractConfig
    from nucleiscope.pipeline.segmentation.registry import make_segmenter
    from nucleiscope.pipeline.slides.inputs import SlideInput

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [SlideInput(p, Path(p).stem, None) for p in slides]
    config = ExtractConfig(tile_px=tile_px)
    stop, peak = threading.Event(), [0.0]
    sampler = threading.Thread(target=sample_store, args=(stop, peak), daemon=True)
    sampler.start()
    start = time.perf_counter()
    if engine == "driver":
        run_cohort_ray(items, out, config, make_segmenter("classical"),
                       options=RayOptions(tiles_per_batch=TILES_PER_BATCH), show_progress=False)  # fmt: skip
        import pandas as pd

        tiles = int(pd.read_parquet(Path(out) / "slides.parquet").tiles.sum())
    else:
        tiles = run_raydata(items, out, config, cpus)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join(5)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"wall_s": wall, "tiles": tiles, "driver_peak_rss_mb": rss,
                                  "store_peak_mib": peak[0]}), flush=True)  # fmt: skip


def run_child(engine: str, out: str, cpus: int, tile_px: int, slides: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", engine, "--out", out, "--cpus", str(cpus), "--tile-px", str(tile_px),
           *slides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][7:])  # type: ignore[no-any-return]


# --- parent ----------------------------------------------------------------------------------
def nuclei_by_slide(out: Path) -> dict[str, Any]:
    import pandas as pd

    frames = {}
    for part in sorted(out.glob("nuclei/slide_id=*/*.parquet")):
        frame = pd.read_parquet(part).sort_values("nucleus_id").reset_index(drop=True)
        frames[part.parent.name.split("=", 1)[1]] = frame.drop(columns=["slide_id"], errors="ignore")
    return frames


def exactly_once(out: Path, reference: dict[str, Any]) -> bool:
    """Whether every slide's nuclei rows equal the in-process reference's (each nucleus once)."""
    found = nuclei_by_slide(out)
    if found.keys() != reference.keys():
        return False
    return all(found[k].equals(reference[k]) for k in reference)


def reference_rows(slides: list[str], folder: Path, tile_px: int) -> dict[str, Any]:
    from nucleiscope.jobs.run_local import run_cohort_local
    from nucleiscope.pipeline.extraction.config import ExtractConfig
    from nucleiscope.pipeline.segmentation.registry import make_segmenter
    from nucleiscope.pipeline.slides.inputs import SlideInput

    run_cohort_local([SlideInput(p, Path(p).stem, None) for p in slides], str(folder), ExtractConfig(tile_px=tile_px),
                     make_segmenter("classical"), show_progress=False)  # fmt: skip
    return nuclei_by_slide(folder)


def report(results: dict[str, list[dict[str, Any]]], once: dict[str, list[bool]], describe: str) -> None:
    print(describe)
    rates = {}
    for engine in ENGINES:
        runs = results[engine]
        wall = statistics.median(r["wall_s"] for r in runs)
        rates[engine] = runs[0]["tiles"] / wall
        print(f"  {engine:8s} median {wall:6.1f} s of {[round(r['wall_s'], 1) for r in runs]} -> "
              f"{rates[engine]:6.1f} tiles/s; driver peak RSS {max(r['driver_peak_rss_mb'] for r in runs):.0f} MB, "
              f"object store peak {max(r['store_peak_mib'] for r in runs):.0f} MiB; "
              f"exactly once: {all(once[engine])}")  # fmt: skip
    best = max(rates, key=lambda e: rates[e] if all(once[e]) else -1.0)
    print(f"  faster with exact rows: {best} ({rates[best] / min(rates.values()):.2f}x the slower)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=ENGINES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--edges", default="2000,2500,3000,4000", help="slide edges in px (one slide each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--tile-px", type=int, default=512)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.out, args.cpus, args.tile_px, args.paths)
        return 0
    edges = [int(e) for e in args.edges.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        slides = synth_cohort(root / "cohort", edges)
        reference = reference_rows(slides, root / "reference", args.tile_px)
        results: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
        once: dict[str, list[bool]] = {e: [] for e in ENGINES}
        for n in range(args.repeats):
            for engine in ENGINES:
                out = root / f"{engine}-{n}"
                results[engine].append(run_child(engine, str(out), args.cpus, args.tile_px, slides))
                once[engine].append(exactly_once(out, reference))
        tiles = results["driver"][0]["tiles"]
        report(results, once, f"cohort: {len(edges)} synthetic slides of {edges} px² at 0.25 µm/px, "
                         f"{tiles} tiles of {args.tile_px} px, classical, {args.cpus} CPUs, {args.repeats} runs each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
