"""Per-stage throughput and peak memory of ``extract`` on a real and on large synthetic slides.

    python benchmarks/bench_extract.py [--sizes 10000 40000] [--real PATH] [--segmenter classical]

Each slide runs in a fresh child process, so its peak RSS is its own. Prints, per
slide: working megapixels, megapixels/s for read, segment (network or threshold),
post-process (instances), measure, nuclei/s, and the child's peak RSS. Peak memory
must not grow with slide size: the last line prints the ratio of peak RSS between
the largest and the smallest synthetic slide.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests package (synthetic slides)


def child(slide: str, out: str, segmenter: str, tile_px: int) -> None:
    """Extract one slide and print its record and peak RSS as JSON (runs in the child)."""
    from nucleiscope.pipeline.extraction.config import ExtractConfig
    from nucleiscope.pipeline.extraction.extract import extract_slide
    from nucleiscope.pipeline.segmentation.registry import make_segmenter

    config = ExtractConfig(segmenter=segmenter, tile_px=tile_px)
    record = extract_slide(slide, out, config, make_segmenter(segmenter))
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(record, default=str))


def run_child(slide: str, segmenter: str, tile_px: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--child", slide, "--out", out, "--segmenter", segmenter,
               "--tile-px", str(tile_px)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed on {slide}: {proc.stderr[-2000:]}")
    return json.loads(lines[-1][7:])  # type: ignore[no-any-return]


def report(name: str, rec: dict[str, float]) -> str:
    work_mp = rec["megapixels"]  # tile windows pushed through the stages, overlap included

    def rate(stage: str) -> str:
        seconds = rec.get(f"seconds_{stage}", 0.0)
        return f"{work_mp / seconds:8.2f}" if seconds else "     n/a"

    nuclei_s = rec["nuclei_count"] / rec["seconds_total"]
    return (f"{name:28s} {work_mp:9.1f} {rate('read')} {rate('segment')} {rate('postprocess')} "
            f"{rate('measure')} {nuclei_s:9.0f} {rec['nuclei_count']:9d} {rec['seconds_total']:8.1f} "
            f"{rec['peak_rss_mb']:8.0f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000], help="synthetic slide edges (px)")
    parser.add_argument("--real", default=None, help="a real slide (default: CMU-1 from ../shared or the demo cache)")
    parser.add_argument("--segmenter", default="classical")
    parser.add_argument("--tile-px", type=int, default=1024)
    parser.add_argument("--workdir", default=None, help="where synthetic slides are written (default: a temp dir)")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out, args.segmenter, args.tile_px)
        return 0
    from tests.synthetic import write_synthetic_slide

    real = args.real or next(
        (str(p) for p in (REPO.parent / "shared/data/slides/CMU-1-Small-Region.svs",
                          Path.home() / ".cache/nucleiscope/CMU-1-Small-Region.svs") if p.exists()), None)  # fmt: skip
    header = (f"{'slide':28s} {'work MP':>9s} {'read':>8s} {'segment':>8s} {'postproc':>8s} {'measure':>8s} "
              f"{'nuclei/s':>9s} {'nuclei':>9s} {'seconds':>8s} {'RSS MB':>8s}")  # fmt: skip
    print(f"segmenter {args.segmenter}, tile {args.tile_px} px; throughput in working megapixels/s")
    print(header)
    if real:
        print(report(Path(real).name, run_child(real, args.segmenter, args.tile_px)), flush=True)
    peaks = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for size in args.sizes:
            path = os.path.join(work, f"synthetic-{size}.svs")
            start = time.perf_counter()
            write_synthetic_slide(path, width_px=size, height_px=size, mpp=0.25, compression="jpeg", seed=1)
            written = time.perf_counter() - start
            rec = run_child(path, args.segmenter, args.tile_px)
            peaks.append(rec["peak_rss_mb"])
            print(report(f"synthetic {size}x{size} ({written:.0f}s)", rec), flush=True)
            os.remove(path)
    if len(peaks) > 1:
        print(f"peak RSS, largest / smallest synthetic slide: {peaks[-1] / peaks[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
