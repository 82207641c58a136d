"""A cohort driver process for tests/test_ray_scaling.py: joins a cluster, runs the classical
cohort with segmentation actors that each hold one ``seg`` resource (a stand-in for a GPU),
and pauses at its first batch until the test has added a node, so that the rest of the run
happens on the grown cluster. Prints ``RESULT <json>``: outcome and the actors at the end.

    python -m tests.elastic_driver ADDRESS OUT MARKER_DIR TILE_PX SLIDE...
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import ray

from nucleiscope.jobs.run_ray import RayCohort, RayOptions, run_cohort_ray
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.segmentation.registry import make_segmenter
from nucleiscope.pipeline.slides.inputs import expand_inputs

REFRESH_S = 0.5
WAIT_S = 120.0


def main(address: str, out: str, markers: Path, tile_px: int, slides: list[str]) -> None:
    ray.init(address=address, log_to_driver=False)
    events: list[str] = []
    sizes: list[int] = []
    final: list[dict[str, object]] = []

    def on_event(cohort: RayCohort, event: str, slide_id: str) -> None:
        sizes.append(cohort.pool.size)
        if event == "done" and cohort.done + cohort.failed == len(slides):  # the last slide: who did what
            final.extend(cohort.pool.survey())
        if event != "batch":
            return
        events.append(slide_id)
        if len(events) == 1:  # the run has started on one node: let the test add another
            (markers / "started").touch()
            deadline = time.monotonic() + WAIT_S
            while not (markers / "joined").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2 * REFRESH_S)  # the driver's own refresh is due when this returns
        elif len(events) == 2 and cohort.pool.pings:  # the driver has re-read the cluster: its new actors start
            ray.wait(list(cohort.pool.pings), num_returns=len(cohort.pool.pings), timeout=WAIT_S)

    options = RayOptions(tiles_per_batch=2, max_batches=4, accelerator="seg", refresh_s=REFRESH_S)
    items = expand_inputs(slides)  # the slide ids the CLI gives them
    result = run_cohort_ray(items, out, ExtractConfig(tile_px=tile_px), make_segmenter("classical"),
                            options=options, show_progress=False, on_event=on_event)  # fmt: skip
    print("RESULT " + json.dumps({"done": result.done, "failed": result.failed, "pool_sizes": sorted(set(sizes)),
                                  "actors": final}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
