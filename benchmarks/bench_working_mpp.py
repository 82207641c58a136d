"""Can a segmenter run coarser than it was trained at? Quality on emulated 20x scans.

    python benchmarks/bench_working_mpp.py [--segmenter student] [--split FILE]

On a 20x slide (0.5 µm/px) a model trained at 0.25 µm/px is either run on the slide
upsampled twofold (four times the pixels: what extraction does by default) or run at the
slide's own 0.5 µm/px. The validation images of the quality benchmark (40x MoNuSeg,
0.25 µm/px, labels only to score) are downsampled twofold (anti-aliased) to emulate 20x
scans; both ways are scored against the full-resolution labels (predictions upsampled
nearest-neighbour), beside the 40x reference. Prints per-image and mean AJI, PQ, matched
area ratio and count ratio, and the seconds per image of each way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from skimage.transform import resize

from nucleiscope.jobs.segment_images import segment_image
from nucleiscope.pipeline.common.images import read_rgb
from nucleiscope.pipeline.evaluation.metrics import quality_pair, read_label_image
from nucleiscope.pipeline.evaluation.split import load_split
from nucleiscope.pipeline.segmentation.registry import make_segmenter, shipped_weights

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "monuseg-train"
SHOWN = ("aji", "pq", "area_ratio", "count_ratio")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segmenter", default="student")
    parser.add_argument("--split", default=str(REPO / "benchmarks" / "monuseg_split.toml"))
    args = parser.parse_args()
    segmenter = make_segmenter(args.segmenter, shipped_weights(args.segmenter))
    ways = ("40x reference", "20x upsampled to model", "20x at 0.5 um/px")
    scores: dict[str, list[dict[str, float]]] = {w: [] for w in ways}
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    for stem in load_split(args.split).validation:
        rgb = read_rgb(DATA / "images" / f"{stem}.tif")
        truth = read_label_image(DATA / "labels" / f"{stem}.png")
        half = (rgb.shape[0] // 2, rgb.shape[1] // 2)
        rgb20 = (resize(rgb, half, order=1, anti_aliasing=True, preserve_range=True) + 0.5).astype(np.uint8)
        runs = {
            ways[0]: lambda: segment_image(rgb, 0.25, segmenter),
            ways[1]: lambda: segment_image(rgb20, 0.5, segmenter),
            ways[2]: lambda: segmenter.segment(rgb20, 0.5, segmenter.fit(rgb20, 0.5)),
        }
        for way, run in runs.items():
            start = time.perf_counter()
            labels = run()
            seconds[way].append(time.perf_counter() - start)
            if labels.shape != truth.shape:
                labels = resize(labels, truth.shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
            scores[way].append(quality_pair(truth, labels))
        print(f"{stem:26s} " + "  ".join(f"{w[:7]} AJI {scores[w][-1]['aji']:.3f}" for w in ways), flush=True)
    print(f"{args.segmenter}, {len(scores[ways[0]])} validation images; mean " + ", ".join(SHOWN) + ", s/image:")
    for way in ways:
        means = "  ".join(f"{k} {statistics.fmean(s[k] for s in scores[way]):.3f}" for k in SHOWN)
        print(f"  {way:24s} {means}  {statistics.median(seconds[way]):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
