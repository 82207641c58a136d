"""Speed of scoring and of measuring a crowded tile (the timings tests no longer assert).

    python benchmarks/bench_metrics_measure.py [--repeats 5]

Prints the median of ``--repeats`` runs of: ``evaluate_pair`` on 1,024 boxes against a
shifted copy (1000² labels), and ``measure_nuclei`` on a 1024² tile of 1,024 discs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from skimage.draw import disk

from nucleiscope.pipeline.evaluation.metrics import evaluate_pair
from nucleiscope.pipeline.measure.morphometrics import measure_nuclei


def boxes() -> np.ndarray:
    labels = np.zeros((1000, 1000), np.int32)
    for k in range(1024):
        r, c = divmod(k, 32)
        labels[r * 31: r * 31 + 20, c * 31: c * 31 + 25] = 37 * k + 5
    return labels


def discs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.zeros((1024, 1024), np.int32)
    for k in range(1024):
        i, j = divmod(k, 32)
        rr, cc = disk((32 * i + 16 + rng.uniform(-3, 3), 32 * j + 16 + rng.uniform(-3, 3)),
                      rng.uniform(5, 12), shape=labels.shape)
        labels[rr, cc] = k + 1
    return labels, rng.integers(0, 256, labels.shape + (3,), dtype=np.uint8)


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gt = boxes()
    pred = np.roll(gt, 3, axis=1) * 3
    labels, rgb = discs()
    score = median_seconds(lambda: evaluate_pair(gt, pred), args.repeats)
    measure = median_seconds(lambda: measure_nuclei(labels, rgb, mpp=0.25, origin_px=(0, 0), scale=2.0,
                                                    slide_id="s"), args.repeats)  # fmt: skip
    print(f"evaluate_pair, 1,024 nuclei in 1000²: {score * 1000:.0f} ms (median of {args.repeats})")
    print(f"measure_nuclei, 1,024 nuclei in 1024²: {measure * 1000:.0f} ms (median of {args.repeats})")


if __name__ == "__main__":
    main()
