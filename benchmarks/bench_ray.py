"""Cohort throughput on Ray with 1 and 2 local CPUs, and memory over a long cohort.

    python benchmarks/bench_ray.py [--slides 6] [--edge-px 4000] [--cohort 50] [--repeats 3]

1) The same cohort of synthetic slides runs with 1 and with 2 CPUs, each in a fresh
   process with its own local Ray (median wall time of ``--repeats`` runs); prints
   slides/s, tiles/s and the 2-vs-1 ratio.
2) A cohort of ``--cohort`` small slides runs once on 2 CPUs while the driver's RSS
   and the object store's usage are sampled after every slide: prints the first,
   median and last samples, which stay flat when in-flight work is bounded.
3) With ``--gpu-model WEIGHTS`` on a machine with CUDA: the cohort runs with the
   attention segmenter (one actor per GPU) while nvidia-smi samples GPU utilisation;
   prints the actors' megapixels/s beside F's raw forward speed on that GPU
   (benchmarks/gpu_forward.py's measurement) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package (synthetic slides)

PLASMA = re.compile(r"Plasma memory usage (\d+) MiB")


def synth_cohort(folder: Path, count: int, edge_px: int) -> list[str]:
    from tests.synthetic import write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        path = folder / f"s{n:03d}.svs"
        write_synthetic_slide(str(path), width_px=edge_px, height_px=edge_px, mpp=0.25, compression="jpeg",
                              seed=n, min_level_px=256)  # fmt: skip
        paths.append(str(path))
    return paths


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def gpu_utilisation(stop: list[bool], samples: list[float]) -> None:
    """Sample nvidia-smi's GPU utilisation (%) every 0.5 s until ``stop[0]``."""
    query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
    while not stop[0]:
        out = subprocess.run(query, capture_output=True, text=True, check=False).stdout.split()
        if out:
            samples.append(float(out[0]))
        time.sleep(0.5)


def gpu_report(slides: list[str], model: str) -> None:
    """Attention cohort on the GPU(s): actor megapixels/s against F's raw forward speed."""
    import threading

    import pandas as pd
    import ray
    import torch

    from nucleiscope.jobs.run_ray import RayOptions, run_cohort_ray
    from nucleiscope.pipeline.extraction.config import ExtractConfig
    from nucleiscope.pipeline.networks.attention_net import AttentionNet
    from nucleiscope.pipeline.segmentation.registry import make_segmenter
    from nucleiscope.pipeline.slides.inputs import SlideInput

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_forward import time_forward

    device = torch.device("cuda")
    raw = time_forward(AttentionNet().to(device).eval().to(memory_format=torch.channels_last), 8, 1024, device, 5)
    ray.init(include_dashboard=False, log_to_driver=False)
    config = ExtractConfig(segmenter="attention", model_path=model, tta=False)
    stop, util = [False], []
    sampler = threading.Thread(target=gpu_utilisation, args=(stop, util), daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_cohort_ray([SlideInput(p, Path(p).stem, None) for p in slides], out, config,
                       make_segmenter("attention", model, tta=False, device="cpu"),
                       options=RayOptions(tiles_per_batch=8, max_batches=12), show_progress=False)  # fmt: skip
        wall = time.perf_counter() - start
        table = pd.read_parquet(Path(out) / "slides.parquet")
    stop[0] = True
    gpus = int(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]
    actor_mp_s = table.megapixels.sum() / table.seconds_segment.sum() * gpus
    print(f"{torch.cuda.get_device_name(device)} x{gpus}: F raw forward {raw:.1f} MP/s (bf16, 8 x 1024²)")
    print(f"  actor pool: {table.tiles.sum() / wall:.1f} tiles/s, {actor_mp_s:.1f} MP/s in predict "
          f"({100 * actor_mp_s / (raw * gpus):.0f} % of raw), wall {wall:.1f} s")  # fmt: skip
    if util:
        print(f"  GPU utilisation: median {statistics.median(util):.0f} %, mean {statistics.fmean(util):.0f} %")


def child(slides: list[str], cpus: int, sample: bool) -> None:
    """Run the cohort on a fresh local Ray and print timings (and memory samples) as JSON."""
    import ray
    from ray._private.internal_api import memory_summary

    from nucleiscope.jobs.run_ray import RayCohort, RayOptions, run_cohort_ray
    from nucleiscope.pipeline.extraction.config import ExtractConfig
    from nucleiscope.pipeline.segmentation.registry import make_segmenter
    from nucleiscope.pipeline.slides.inputs import SlideInput

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    samples: list[tuple[float, float]] = []

    def on_event(cohort: RayCohort, event: str, slide_id: str) -> None:
        if sample and event in ("done", "failed"):
            match = PLASMA.search(memory_summary(stats_only=True))
            samples.append((rss_mb(), float(match.group(1)) if match else float("nan")))

    items = [SlideInput(p, Path(p).stem, None) for p in slides]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = run_cohort_ray(items, out, ExtractConfig(tile_px=1024), make_segmenter("classical"),
                                options=RayOptions(), show_progress=False, on_event=on_event)  # fmt: skip
        wall = time.perf_counter() - start
        import pandas as pd

        tiles = int(pd.read_parquet(Path(out) / "slides.parquet").tiles.sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"wall_s": wall, "done": result.done, "tiles": tiles, "samples": samples,
                                  "driver_peak_rss_mb": peak}))  # fmt: skip


def run_child(slides: list[str], cpus: int, sample: bool = False) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", str(cpus), *(["--sample"] if sample else []), *slides]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(lines[-1][7:])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sample", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--edge-px", type=int, default=4000)
    parser.add_argument("--cohort", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-model", default=None, help="attention weights: also measure the GPU actor pool")
    args = parser.parse_args()
    if args.child is not None:
        child(args.paths, args.child, args.sample)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        slides = synth_cohort(Path(tmp) / "a", args.slides, args.edge_px)
        walls: dict[int, list[float]] = {1: [], 2: []}
        tiles = 0
        for _ in range(args.repeats):
            for cpus in (1, 2):
                res = run_child(slides, cpus)
                walls[cpus].append(float(res["wall_s"]))  # type: ignore[arg-type]
                tiles = int(res["tiles"])  # type: ignore[call-overload]
        med = {c: statistics.median(w) for c, w in walls.items()}
        print(f"cohort: {args.slides} synthetic slides of {args.edge_px}² px at 0.25 µm/px, {tiles} tiles, classical")
        for cpus in (1, 2):
            print(f"  {cpus} CPU: median {med[cpus]:.1f} s of {walls[cpus]} -> {args.slides / med[cpus]:.2f} slides/s, "
                  f"{tiles / med[cpus]:.1f} tiles/s")  # fmt: skip
        print(f"  speed-up 2 CPUs vs 1: {med[1] / med[2]:.2f}x")
        if args.cohort:
            small = synth_cohort(Path(tmp) / "b", args.cohort, 1500)
            res = run_child(small, 2, sample=True)
            samples = res["samples"]
            rss = [s[0] for s in samples]  # type: ignore[index, union-attr]
            store = [s[1] for s in samples]  # type: ignore[index, union-attr]
            print(f"memory over a {args.cohort}-slide cohort (2 CPUs), after slide 1 / median / last:")
            print(f"  driver RSS MB: {rss[0]:.0f} / {statistics.median(rss):.0f} / {rss[-1]:.0f}"
                  f" (peak {res['driver_peak_rss_mb']:.0f})")  # fmt: skip
            print(f"  object store MiB: {store[0]:.0f} / {statistics.median(store):.0f} / {store[-1]:.0f}")
        if args.gpu_model:
            gpu_report(slides, args.gpu_model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
