"""Speed and peak memory of ``export qupath`` on a synthetic slide of 1,000,000 nuclei.

    python benchmarks/bench_export.py [--rows 1000000] [--repeats 3]

The nucleus file (the real schema, 65,536-row groups as the extractor writes them; every
nucleus a 24-gon whose coordinates need 15-17 digits, so the text is at its longest) is written
once; each export runs in a fresh child process, so its peak RSS is its own. Prints the median
of the runs: features/s, seconds, peak RSS, and the file's size.

Measured 2026-12-02 on this 2-core machine, shared (load average about 5 from other people's
tests during the runs; 1,000,000 nuclei, median of 3):

    features/s 24,398 (41.0 s wall, 17.2 s CPU of the child incl. imports), peak RSS 324 MB,
    193.5 MB gzipped (193 bytes/feature); runs: 73.1 s / 324 MB, 41.0 s / 324 MB, 33.5 s / 324 MB

that is about 58,000 features per CPU second; 200,000 nuclei on a quieter machine ran at
54,000 features/s wall. Peak RSS is set by one 65,536-row group (324 MB here; 250 MB with
16,384-row groups) and does not grow with the number of nuclei.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests package (synthetic nucleus tables)


def child(out: str) -> None:
    """Export every slide of ``out`` and print seconds, features and peak RSS as JSON."""
    from nucleiscope.pipeline.export.qupath import export_qupath

    start = time.perf_counter()
    outcome = export_qupath(out)
    seconds = time.perf_counter() - start
    done = outcome.done[0]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("RESULT " + json.dumps({
        "seconds": seconds, "features": done.features, "bytes": Path(done.path).stat().st_size,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))  # fmt: skip


def run_child(out: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--child", out], capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"export failed: {proc.stderr[-2000:]}")
    return json.loads(lines[-1][7:])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    from tests.nuclei_tables import write_fake_output

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = write_fake_output(Path(tmp) / "out", {"bench": args.rows})
        print(f"wrote {args.rows:,} nuclei in {time.perf_counter() - start:.1f} s")
        runs = [run_child(str(out)) for _ in range(args.repeats)]
    seconds = statistics.median(r["seconds"] for r in runs)
    peak = statistics.median(r["peak_rss_mb"] for r in runs)
    cpu = statistics.median(r["cpu_seconds"] for r in runs)
    size = runs[0]["bytes"]
    each = ", ".join(f"{r['seconds']:.1f} s / {r['peak_rss_mb']:.0f} MB" for r in runs)
    print(f"features/s {args.rows / seconds:,.0f} ({seconds:.1f} s wall, {cpu:.1f} s CPU of the child incl. "
          f"imports), peak RSS {peak:.0f} MB, "
          f"{size / 1e6:.1f} MB gzipped ({size / args.rows:.0f} bytes/feature); "
          f"runs: {each}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
