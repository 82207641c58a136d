"""Per-stage throughput and peak memory of ``extract`` on a real and on large synthetic slides.

    python benchmarks/bench_extract.py [--sizes 10000 40000] [--real PATH]
        [--segmenter classical student attention default ...] [--model WEIGHTS] [--tta|--no-tta]

Each slide runs in a fresh child process, so its peak RSS is its own. Prints, per
segmenter (several may be named; ``default`` is the one ``extract`` uses when none is
named) a table with, per slide: working megapixels, megapixels/s for read, segment
(network or threshold), post-process (instances), measure, nuclei/s, and the child's
peak RSS. Neural segmenters load the shipped weights unless ``--model`` is given (it
applies to the segmenter its file holds). Peak memory must not grow with slide size:
after each table a line prints the ratio of peak RSS between the largest and the
smallest synthetic slide. The synthetic slides are written once and shared by all tables.
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

#: What ``--segmenter`` accepts: a registry name, or "default" (what ``extract`` picks unasked).
CHOICES = ("classical", "student", "attention", "default")


def resolve_segmenters(names: list[str], model: str | None) -> list[tuple[str, str, str | None]]:
    """(label, registry name, weights) per requested segmenter, in order, without repeats.

    ``default`` is ``registry.default_segmenter()``; neural segmenters get the shipped
    weights, or ``model`` for the segmenter whose architecture that file holds.
    """
    from nucleiscope.pipeline.common.errors import ConfigError
    from nucleiscope.pipeline.segmentation.registry import default_segmenter, segmenter_for_weights, shipped_weights

    model_for = segmenter_for_weights(model) if model else None
    chosen: list[tuple[str, str, str | None]] = []
    for label in dict.fromkeys(names):
        name = default_segmenter()[0] if label == "default" else label
        weights = None if name == "classical" else model if name == model_for else shipped_weights(name)
        if name != "classical" and weights is None:
            raise ConfigError(f"the {name} segmenter has no shipped weights here: pass --model PATH")
        chosen.append((f"{name} (default)" if label == "default" else name, name, weights))
    if model and model_for not in {name for _, name, _ in chosen}:
        raise ConfigError(f"--model holds {model_for} weights, but no {model_for} segmenter is benchmarked")
    return chosen


def child(slide: str, out: str, segmenter: str, model: str | None, tta: bool | None, tile_px: int) -> None:
    """Extract one slide and print its record and peak RSS as JSON (runs in the child)."""
    from nucleiscope.pipeline.extraction.config import ExtractConfig
    from nucleiscope.pipeline.extraction.extract import extract_slide
    from nucleiscope.pipeline.segmentation.registry import make_segmenter

    config = ExtractConfig(segmenter=segmenter, model_path=model, tta=tta, tile_px=tile_px)
    record = extract_slide(slide, out, config, make_segmenter(segmenter, model, tta=tta))
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(record, default=str))


def run_child(slide: str, segmenter: str, model: str | None, tta: bool | None, tile_px: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--child", slide, "--out", out, "--segmenter", segmenter,
               "--tile-px", str(tile_px), *(["--model", model] if model else []),
               *([] if tta is None else ["--tta" if tta else "--no-tta"])]  # fmt: skip
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 40_000],
                        help="synthetic slide edges (px); none: the real slide only")  # fmt: skip
    parser.add_argument("--real", default=None, help="a real slide (default: CMU-1 from ../shared or the demo cache)")
    parser.add_argument("--segmenter", "--segmenters", nargs="+", default=["classical"], metavar="NAME",
                        help=f"one table per segmenter, of {', '.join(CHOICES)} (default: classical)")  # fmt: skip
    parser.add_argument("--model", default=None, help="weights (.safetensors) instead of the shipped ones")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="test-time augmentation (default: the segmenter's, on for attention, off for student)")
    parser.add_argument("--tile-px", type=int, default=1024)
    parser.add_argument("--workdir", default=None, help="where synthetic slides are written (default: a temp dir)")
    args = parser.parse_args()
    if args.child:
        return args
    bad = [name for name in args.segmenter if name not in CHOICES]
    if bad:
        parser.error(f"unknown segmenter {', '.join(bad)}; choose from {', '.join(CHOICES)}")
    return args


def table(label: str, name: str, weights: str | None, args: argparse.Namespace, real: str | None,
          slides: list[tuple[int, str, float]]) -> None:  # fmt: skip
    """Print one segmenter's table: the real slide, then each synthetic slide."""
    header = (f"{'slide':28s} {'work MP':>9s} {'read':>8s} {'segment':>8s} {'postproc':>8s} {'measure':>8s} "
              f"{'nuclei/s':>9s} {'nuclei':>9s} {'seconds':>8s} {'RSS MB':>8s}")  # fmt: skip
    source = f", weights {Path(weights).name}" if weights else ""
    tta = "" if args.tta is None else f", tta {'on' if args.tta else 'off'}"
    print(f"segmenter {label}{source}{tta}, tile {args.tile_px} px; throughput in working megapixels/s")
    print(header)
    if real:
        print(report(Path(real).name, run_child(real, name, weights, args.tta, args.tile_px)), flush=True)
    peaks = []
    for size, path, written in slides:
        rec = run_child(path, name, weights, args.tta, args.tile_px)
        peaks.append(rec["peak_rss_mb"])
        print(report(f"synthetic {size}x{size} ({written:.0f}s)", rec), flush=True)
    if len(peaks) > 1:
        print(f"peak RSS, largest / smallest synthetic slide: {peaks[-1] / peaks[0]:.2f}")


def main() -> int:
    args = parse_args()
    if args.child:
        child(args.child, args.out, args.segmenter[0], args.model, args.tta, args.tile_px)
        return 0
    from nucleiscope.pipeline.common.errors import ConfigError
    from tests.synthetic import write_synthetic_slide

    try:
        chosen = resolve_segmenters(args.segmenter, args.model)
    except ConfigError as exc:
        print(f"bench_extract.py: error: {exc}", file=sys.stderr)
        return 2
    real = args.real or next(
        (str(p) for p in (REPO.parent / "shared/data/slides/CMU-1-Small-Region.svs",
                          Path.home() / ".cache/nucleiscope/CMU-1-Small-Region.svs") if p.exists()), None)  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        slides = []
        for size in args.sizes:
            path = os.path.join(work, f"synthetic-{size}.svs")
            start = time.perf_counter()
            write_synthetic_slide(path, width_px=size, height_px=size, mpp=0.25, compression="jpeg", seed=1)
            slides.append((size, path, time.perf_counter() - start))
        for n, (label, name, weights) in enumerate(chosen):
            if n:
                print()
            table(label, name, weights, args, real, slides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
