"""Score the classical segmenter on the MoNuSeg training images.

Usage: python benchmarks/monuseg_eval.py [DATA_DIR] [--seg-mpp 0.25] [--limit N] [--csv OUT]

DATA_DIR (default: ../shared/data/monuseg-train beside the repository) holds
images/<id>.tif and labels/<id>.png. Each image is taken at its nominal 0.25 µm/px:
fit + segment per image; with --seg-mpp 0.5 the image is block-averaged 2x first and
the labels are scaled back up (nearest) before scoring against the native labels.
Prints per-image AJI, Dice, PQ, F1, seconds and megapixels/s, then the means.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from nucleiscope.pipeline.evaluation.metrics import evaluate_pair, read_label_image
from nucleiscope.pipeline.segmentation.classical import ClassicalSegmenter, block_mean

NATIVE_MPP = 0.25
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "monuseg-train"


def run(data_dir: Path, seg_mpp: float, limit: int | None) -> pd.DataFrame:
    seg = ClassicalSegmenter()
    factor = int(round(seg_mpp / NATIVE_MPP))
    if factor < 1 or abs(factor * NATIVE_MPP - seg_mpp) > 1e-9:
        raise SystemExit(f"--seg-mpp must be a multiple of {NATIVE_MPP}, got {seg_mpp}")
    images = sorted((data_dir / "images").glob("*.tif"))[:limit]
    rows = []
    for path in images:
        rgb = tifffile.imread(path)
        gt = read_label_image(data_dir / "labels" / f"{path.stem}.png")
        start = time.perf_counter()
        work = block_mean(rgb, factor)
        stats = seg.fit(work, seg_mpp)
        labels = seg.segment(work, seg_mpp, stats)
        seconds = time.perf_counter() - start
        if factor > 1:
            labels = np.repeat(np.repeat(labels, factor, axis=0), factor, axis=1)
            pad = ((0, gt.shape[0] - labels.shape[0]), (0, gt.shape[1] - labels.shape[1]))
            labels = np.pad(labels, pad)
        row = {"image": path.stem, **evaluate_pair(gt, labels), "seconds": seconds,
               "mpix_per_s": rgb.shape[0] * rgb.shape[1] / 1e6 / seconds}
        rows.append(row)
        print(f"{path.stem:28s} aji={row['aji']:.3f} dice={row['dice']:.3f} pq={row['pq']:.3f} "
              f"f1={row['f1']:.3f} n_gt={int(row['n_gt'])} n_pred={int(row['n_pred'])} "
              f"{seconds:.2f}s", flush=True)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seg-mpp", type=float, default=NATIVE_MPP, help="working µm/px (0.25 or 0.5)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--csv", type=Path, default=None, help="write the per-image table here")
    args = parser.parse_args(argv)
    if not (args.data_dir / "images").is_dir() or not (args.data_dir / "labels").is_dir():
        print(f"MoNuSeg data not found at {args.data_dir} (need images/ and labels/); "
              "pass its path as the first argument", file=sys.stderr)
        return 2
    table = run(args.data_dir, args.seg_mpp, args.limit)
    if table.empty:
        print(f"no images in {args.data_dir / 'images'}", file=sys.stderr)
        return 2
    mean = table.drop(columns="image").mean()
    print(f"\nmean over {len(table)} images at {args.seg_mpp} µm/px: AJI {mean['aji']:.4f}  "
          f"Dice {mean['dice']:.4f}  PQ {mean['pq']:.4f} (DQ {mean['dq']:.4f}, SQ {mean['sq']:.4f})  "
          f"F1 {mean['f1']:.4f}  {mean['seconds']:.2f} s/image  "
          f"{table['mpix_per_s'].median():.2f} Mpx/s (median)")
    if args.csv is not None:
        table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
