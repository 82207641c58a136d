"""The student's network pass on the CPU, one tile a pass (the CPU default) against two.

    python benchmarks/bench_student_batch.py [--tiles 8] [--repeats 3]

Prints, for max batch 1 and 2 alternately (twice each, so drift shows), the median seconds of
``predict_batch`` over ``--tiles`` tiles of 512² at 0.25 µm/px with the shipped student, and the
seconds per megapixel of the best round. One tile a pass is what makes in-process and Ray rows
byte-identical on the CPU (tests/test_identity.py); this says what it costs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from nucleiscope.pipeline.segmentation.registry import shipped_weights
from nucleiscope.pipeline.segmentation.student import StudentSegmenter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from medians import median_seconds  # noqa: E402 (this folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    weights = shipped_weights("student")
    if weights is None:
        raise SystemExit("no shipped student weights")
    rng = np.random.default_rng(0)
    tiles = [rng.integers(90, 230, (512, 512, 3)).astype(np.uint8) for _ in range(args.tiles)]
    megapixels = args.tiles * 512 * 512 / 1e6
    rounds: dict[int, list[float]] = {1: [], 2: []}
    for max_batch in (1, 2, 1, 2):
        segmenter = StudentSegmenter(weights, device="cpu", max_batch=max_batch)
        stats = segmenter.fit(tiles[0], 0.25)
        segmenter.predict_batch(tiles[:2], 0.25, stats)  # warm-up
        rounds[max_batch].append(median_seconds(lambda: segmenter.predict_batch(tiles, 0.25, stats), args.repeats))
    for max_batch, seconds in rounds.items():
        print(f"max batch {max_batch}: {', '.join(f'{s:.2f}' for s in seconds)} s per {args.tiles} tiles "
              f"(median of {args.repeats}); {min(seconds) / megapixels:.2f} s/MP")


if __name__ == "__main__":
    main()
