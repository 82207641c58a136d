"""A cohort as a user runs it: ``nucleiscope extract`` in one process vs on Ray, start-up included.

    python benchmarks/bench_cohort.py [--slides 6] [--edge-px 8000] [--repeats 3] [--segmenter classical]

Every run is a fresh ``nucleiscope extract`` process (its own local Ray, a new output
folder), timed wall clock from start to exit:

* ``--local``: everything in one process;
* Ray with ``--num-cpus 2`` (this machine's two cores);
* pinned with ``taskset``: Ray with ``--num-cpus 1`` on core 0, and ``--num-cpus 2`` on
  cores 0-1, so the scaling from one core to two is measured with the cores fixed.

Prints the median of ``--repeats`` runs per mode and the ratios Ray-2-CPU / local and
pinned 2-core / 1-core (ratios of the medians of one invocation).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests package (synthetic slides)

MODES: dict[str, tuple[list[str], list[str]]] = {
    "local": ([], ["--local"]),
    "ray 2 CPUs": ([], ["--num-cpus", "2"]),
    "pinned 1 core, Ray 1 CPU": (["taskset", "-c", "0"], ["--num-cpus", "1"]),
    "pinned 2 cores, Ray 2 CPUs": (["taskset", "-c", "0,1"], ["--num-cpus", "2"]),
}


def run_once(prefix: list[str], args: list[str], slides: list[str], segmenter: str, work: str) -> float:
    out = tempfile.mkdtemp(dir=work)
    cli = shutil.which("nucleiscope") or "nucleiscope"
    cmd = [*prefix, cli, "extract", *slides, "--out", out, "--segmenter", segmenter, "--no-progress", *args]
    env = dict(os.environ, RAY_ADDRESS="")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--edge-px", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--segmenter", default="classical")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    from tests.synthetic import write_synthetic_slide

    with tempfile.TemporaryDirectory() as work:
        slides = []
        for n in range(args.slides):
            path = os.path.join(work, f"s{n}.svs")
            write_synthetic_slide(path, width_px=args.edge_px, height_px=args.edge_px, mpp=0.25,
                                  compression="jpeg", seed=n)  # fmt: skip
            slides.append(path)
        walls: dict[str, list[float]] = {m: [] for m in args.modes}
        for _ in range(args.repeats):  # modes interleaved, so drifting load hits each alike
            for mode in args.modes:
                prefix, extra = MODES[mode]
                if prefix and not shutil.which(prefix[0]):
                    continue
                walls[mode].append(run_once(prefix, extra, slides, args.segmenter, work))
        med = {m: statistics.median(w) for m, w in walls.items() if w}
        print(f"{args.slides} synthetic slides of {args.edge_px}² px at 0.25 µm/px, {args.segmenter}, "
              f"{os.cpu_count()} CPUs; wall s from start to exit, median of {args.repeats}")  # fmt: skip
        for mode, value in med.items():
            print(f"  {mode:28s} {value:7.1f} s   {[round(w, 1) for w in walls[mode]]}")
        if "local" in med and "ray 2 CPUs" in med:
            print(f"  Ray 2 CPUs vs --local: {med['local'] / med['ray 2 CPUs']:.2f}x")
        one, two = "pinned 1 core, Ray 1 CPU", "pinned 2 cores, Ray 2 CPUs"
        if one in med and two in med:
            print(f"  pinned 2 cores vs 1: {med[one] / med[two]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
