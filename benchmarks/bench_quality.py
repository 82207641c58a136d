"""Segmentation quality on a fixed train/validation split of the MoNuSeg training images.

Usage: python benchmarks/bench_quality.py [--split FILE] [--segmenter NAME ...] [--model PATH]
           [--images DIR] [--labels DIR] [--mpp 0.25] [--validation-only NAME ...]
           [--no-attention-tta] [--outline stored|core|mask] [--json OUT]

For every segmenter (default: classical, attention, student; built by ``make_segmenter`` and
run at its own working resolution exactly as ``nucleiscope segment`` does) prints a per-image
table on the validation part and the means on the validation and training parts: AJI, Dice,
PQ, object F1, matched-area ratio (median over matched true nuclei of predicted / true area;
a true nucleus is matched to the prediction of highest IoU, IoU >= 0.5) and count ratio
(predicted / true nuclei). Labels are read only to score. ``--model`` scores other weights
for the student (or attention) segmenter. Segmenters named by ``--validation-only`` are run on
the validation part only (F costs ~30 s per megapixel and pass on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nucleiscope.jobs.segment_images import segment_image
from nucleiscope.pipeline.common.images import read_rgb
from nucleiscope.pipeline.evaluation.metrics import quality_pair, read_label_image
from nucleiscope.pipeline.evaluation.split import load_split
from nucleiscope.pipeline.segmentation.registry import make_segmenter, segmenter_for_weights

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPLIT = REPO / "benchmarks" / "monuseg_split.toml"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "monuseg-train"
SEGMENTERS = ("classical", "attention", "student")
SHOWN = ("aji", "dice", "pq", "f1", "area_ratio", "count_ratio")
HEADER = f"{'image':26s}" + "".join(f"{c:>12s}" for c in ("AJI", "Dice", "PQ", "F1", "area_ratio", "count_ratio"))


def score_images(
    name: str, stems: Sequence[str], args: argparse.Namespace, segmenter: Any
) -> list[dict[str, Any]]:
    """One row of quality metrics per image (plus seconds)."""
    rows = []
    for stem in stems:
        rgb = read_rgb(Path(args.images) / f"{stem}.tif")
        gt = read_label_image(Path(args.labels) / f"{stem}.png")
        start = time.perf_counter()
        labels = segment_image(rgb, args.mpp, segmenter)
        rows.append({"image": stem, **quality_pair(gt, labels), "seconds": time.perf_counter() - start})
        print(f"  {name:10s} {stem} {rows[-1]['seconds']:.1f}s", file=sys.stderr, flush=True)
    return rows


def means(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean of every metric over images (NaN ratios, from images with no match, skipped)."""
    if not rows:
        return {}
    keys = [k for k in rows[0] if k != "image"]
    return {k: float(np.nanmean([r[k] for r in rows])) if any(not math.isnan(r[k]) for r in rows) else math.nan
            for k in keys}  # fmt: skip


def _line(label: str, values: dict[str, float]) -> str:
    return f"{label:26s}" + "".join(f"{values.get(k, math.nan):12.3f}" for k in SHOWN)


def report(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Per-image validation tables, then the summary of means per part."""
    out: list[str] = []
    for name, parts in results.items():
        out += [f"\n== {name}: validation part, per image", HEADER]
        out += [_line(r["image"][:26], r) for r in parts.get("validation", [])]
        out.append(_line("mean (validation)", means(parts.get("validation", []))))
    out += ["\n== means", f"{'segmenter / part':26s}" + HEADER[26:]]
    for name, parts in results.items():
        for part in ("validation", "train"):
            rows = parts.get(part, [])
            label = f"{name} / {part} ({len(rows)})"
            out.append(_line(label, means(rows)) if rows else f"{label:26s}  not run")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default=str(DEFAULT_SPLIT), help="TOML with train and validation stem lists")
    p.add_argument("--segmenter", action="append", choices=SEGMENTERS, help="repeatable; default: all three")
    p.add_argument("--model", default=None, help="weights for the student or attention segmenter (by its arch)")
    p.add_argument("--images", default=str(DEFAULT_DATA / "images"))
    p.add_argument("--labels", default=str(DEFAULT_DATA / "labels"))
    p.add_argument("--mpp", type=float, default=0.25, help="µm/px of the images")
    p.add_argument("--validation-only", action="append", default=[], choices=SEGMENTERS,
                   help="score this segmenter on the validation part only (repeatable)")
    p.add_argument("--attention-tta", action=argparse.BooleanOptionalAction, default=True,
                   help="7-fold TTA for the attention segmenter (its default; 7x the time)")
    p.add_argument("--outline", choices=("stored", "core", "mask"), default="stored",
                   help="student outlines: as stored in the weights (default), or override")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="write per-image rows and means here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.images).is_dir() or not Path(args.labels).is_dir():
        print(f"images or labels not found ({args.images}, {args.labels})", file=sys.stderr)
        return 2
    split = load_split(args.split)
    parts_of = {"train": split.train, "validation": split.validation}
    model_for = segmenter_for_weights(args.model) if args.model else None
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in args.segmenter or SEGMENTERS:
        tta = args.attention_tta if name == "attention" else None
        segmenter = make_segmenter(name, args.model if name == model_for else None, tta=tta)
        if name == "student" and args.outline != "stored":
            segmenter.postprocess_params = replace(segmenter.postprocess_params, outline=args.outline)  # type: ignore[attr-defined]
        parts = ("validation",) if name in args.validation_only else ("validation", "train")
        results[name] = {part: score_images(name, parts_of[part], args, segmenter) for part in parts}
    print(f"split {args.split}: {len(split.validation)} validation, {len(split.train)} training images"
          f"; model {args.model or 'shipped'}")
    print(report(results))
    if args.json:
        summary = {n: {part: {"images": rows, "mean": means(rows)} for part, rows in parts.items()}
                   for n, parts in results.items()}  # fmt: skip
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
