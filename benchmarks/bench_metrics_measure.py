"""Speed of scoring and of measuring a crowded tile (the timings tests no longer assert).

    python benchmarks/bench_metrics_measure.py [--repeats 5]

Prints the median of ``--repeats`` runs of: ``evaluate_pair`` on 1,024 boxes against a
shifted copy (1000² labels), and ``measure_nuclei`` on a 1024² tile of 1,024 discs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from nucleiscope.pipeline.evaluation.metrics import evaluate_pair
from nucleiscope.pipeline.measure.morphometrics import measure_nuclei

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package
from medians import median_seconds  # noqa: E402 (this folder)

from tests.synthetic import crowded_boxes, crowded_discs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gt = crowded_boxes()
    pred = np.roll(gt, 3, axis=1) * 3
    labels, rgb = crowded_discs()
    score = median_seconds(lambda: evaluate_pair(gt, pred), args.repeats)
    measure = median_seconds(lambda: measure_nuclei(labels, rgb, mpp=0.25, origin_px=(0, 0), scale=2.0,
                                                    slide_id="s"), args.repeats)  # fmt: skip
    print(f"evaluate_pair, 1,024 nuclei in 1000²: {score * 1000:.0f} ms (median of {args.repeats})")
    print(f"measure_nuclei, 1,024 nuclei in 1024²: {measure * 1000:.0f} ms (median of {args.repeats})")


if __name__ == "__main__":
    main()
