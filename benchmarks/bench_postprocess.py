"""Post-processing and measurement speed per core, this tree against a baseline revision.

    python benchmarks/bench_postprocess.py [--baseline REV] [--sizes 10000] [--real PATH] [--repeats 5] [--profile]

The stages of ``measure_tile`` after the network (post-processing: watershed split and
area filter; measurement: artefact calls, per-nucleus features, outlines, WKB) are timed
on the tiles of bench_extract's slides (CMU-1 and synthetic 0.25 µm/px slides), classical
segmenter. Each revision runs in child processes pinned to one core (``taskset -c 0``
where available), which read and segment every tile once, untimed, then run the two
stages; baseline and this tree take turns ``--repeats`` times (so a drift of the machine's
speed hits both alike) and the median CPU megapixels/s of working pixels (overlap
included) of each is reported. The baseline is checked out with ``git worktree`` into a temporary
folder. Printed: both revisions' figures, the speed-up (ratio of the two medians), and
how the outputs compare column by column (identical, or the largest difference).
``--profile`` adds the profiler's top entries of this tree's stages.
"""

from __future__ import annotations

import argparse
import json
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
BASELINE = "96d8518"  # main before the post-processing work


def child(slide: str, table_out: str, repeats: int, profile: bool) -> None:
    """Time the post-processing and measurement of every tile of ``slide`` (runs in the child)."""
    import cProfile
    import pstats

    import pyarrow as pa
    import pyarrow.parquet as pq

    import nucleiscope.pipeline as pkg
    from nucleiscope.pipeline.extraction.config import ExtractConfig
    from nucleiscope.pipeline.extraction.extract import (
        StageTimer,
        measure_tile,
        prepare_slide,
        read_tiles,
        reopen_slide,
    )
    from nucleiscope.pipeline.segmentation.registry import make_segmenter

    segmenter = make_segmenter("classical")
    prepared = prepare_slide(slide, "bench", ExtractConfig(segmenter="classical", tile_px=1024), segmenter)
    with reopen_slide(prepared, None) as opened:
        tiles = []
        for tile in prepared.plan.tiles:
            rgb = read_tiles(opened, prepared, [tile])[0]
            tiles.append((rgb, segmenter.predict(rgb, prepared.seg_mpp, prepared.stats), tile))

    def run() -> tuple[list[pa.Table], StageTimer]:
        timer = StageTimer()
        return [measure_tile(ev, rgb, t, prepared, segmenter, timer) for rgb, ev, t in tiles], timer

    cpu, stages = [], []
    for _ in range(repeats):
        start = time.process_time()
        tables, timer = run()
        cpu.append(time.process_time() - start)
        stages.append(timer.seconds)
    pq.write_table(pa.concat_tables([t.replace_schema_metadata(None) for t in tables]), table_out)
    result = {"package": os.path.dirname(pkg.__file__), "megapixels": sum(r.shape[0] * r.shape[1] for r, _, _ in tiles) / 1e6,
              "cpu_s": statistics.median(cpu), "postprocess_s": statistics.median(s["postprocess"] for s in stages),
              "measure_s": statistics.median(s["measure"] for s in stages), "nuclei": sum(t.num_rows for t in tables)}  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)
    if profile:
        prof = cProfile.Profile()
        prof.runcall(run)
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(15)


def checkout(rev: str, into: str) -> str:
    """An import root whose ``nucleiscope`` package is revision ``rev`` of this repository."""
    tree = os.path.join(into, "tree")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", tree, rev], check=True)
    root = os.path.join(into, "root", "nucleiscope")
    os.makedirs(root)
    for name in ("pipeline", "actors", "jobs"):
        os.symlink(os.path.join(tree, name), os.path.join(root, name))
    return os.path.dirname(root)


def run_child(slide: str, import_root: str | None, out: str, repeats: int, profile: bool) -> dict[str, float]:
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if import_root:
        env["PYTHONPATH"] = import_root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [*pin, sys.executable, __file__, "--child", slide, "--out", out, "--repeats", str(repeats)]
    proc = subprocess.run(cmd + (["--profile"] if profile else []), capture_output=True, text=True, env=env, check=False)
    lines = proc.stdout.splitlines()
    results = [ln for ln in lines if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"child failed on {slide}: {proc.stderr[-3000:]}")
    if profile:
        print("\n".join(ln for ln in lines if not ln.startswith("RESULT ")))
    return json.loads(results[-1][7:])  # type: ignore[no-any-return]


def interleaved(slide: str, root: str, work: str, repeats: int, profile: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Baseline and this tree, one child each in turn ``repeats`` times (a machine whose speed
    drifts then slows both alike); the medians of each one's figures."""
    runs: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
    for n in range(repeats):
        runs["base"].append(run_child(slide, root, os.path.join(work, "base.parquet"), 1, False))
        runs["new"].append(run_child(slide, None, os.path.join(work, "new.parquet"), 1, profile and n == 0))

    def median(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: statistics.median(r[k] for r in rows) if isinstance(rows[0][k], (int, float)) else rows[0][k]
                for k in rows[0]}  # fmt: skip

    return median(runs["base"]), median(runs["new"])


def compare(base: str, new: str) -> str:
    """How two measured tables differ: 'identical', or per column the largest difference."""
    import numpy as np
    import pyarrow.parquet as pq

    a, b = pq.read_table(base), pq.read_table(new)
    if a.num_rows != b.num_rows:
        return f"row counts differ: {a.num_rows} vs {b.num_rows}"
    notes = []
    for name in a.column_names:
        if a[name].equals(b[name]):
            continue
        if a[name].type in ("double", "float"):
            x, y = a[name].to_numpy(), b[name].to_numpy()
            notes.append(f"{name}: {int((x != y).sum())} rows differ, largest |difference| {np.abs(x - y).max():.2g}")
        else:
            notes.append(f"{name}: {sum(u != v for u, v in zip(a[name].to_pylist(), b[name].to_pylist()))} rows differ")
    return "identical" if not notes else "; ".join(notes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", default=BASELINE, help=f"revision to compare with (default {BASELINE})")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000], help="synthetic slide edges (px)")
    parser.add_argument("--real", default=None, help="a real slide (default: CMU-1 from ../shared or the demo cache)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print this tree's profile (top entries)")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out, args.repeats, args.profile)
        return 0
    from tests.synthetic import write_synthetic_slide

    real = args.real or next((str(p) for p in (REPO.parent / "shared/data/slides/CMU-1-Small-Region.svs",
                                               Path.home() / ".cache/nucleiscope/CMU-1-Small-Region.svs") if p.exists()), None)  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        slides = [real] if real else []
        for size in args.sizes:
            path = os.path.join(work, f"synthetic-{size}.svs")
            write_synthetic_slide(path, width_px=size, height_px=size, mpp=0.25, compression="jpeg", seed=1)
            slides.append(path)
        root = checkout(args.baseline, work)
        try:
            print(f"classical, tile 1024 px, one core; CPU megapixels/s of post-processing + measurement, "
                  f"median of {args.repeats}; baseline {args.baseline}")  # fmt: skip
            for slide in slides:
                base, new = interleaved(slide, root, work, args.repeats, args.profile)
                print(f"{Path(slide).name}: {new['megapixels']:.1f} MP, {new['nuclei']} nuclei; "
                      f"baseline {base['megapixels'] / base['cpu_s']:.2f} MP/s "
                      f"(postprocess {base['megapixels'] / base['postprocess_s']:.1f}, measure "
                      f"{base['megapixels'] / base['measure_s']:.1f}), this tree {new['megapixels'] / new['cpu_s']:.2f} "
                      f"MP/s (postprocess {new['megapixels'] / new['postprocess_s']:.1f}, measure "
                      f"{new['megapixels'] / new['measure_s']:.1f}); speed-up {base['cpu_s'] / new['cpu_s']:.2f}x")
                print(f"  outputs: {compare(os.path.join(work, 'base.parquet'), os.path.join(work, 'new.parquet'))}")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", os.path.join(work, "tree")],
                           check=False)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
