"""Killed workers cost retries, not slides: Ray worker processes (writers, the segmentation
actor, task workers) are SIGKILLed again and again during a cohort, and the tables come out
equal to an undisturbed run with no failures."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest

from nucleiscope.jobs.run_local import run_cohort_local
from nucleiscope.jobs.run_ray import RayCohort, RayOptions, run_cohort_ray
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.segmentation.registry import make_segmenter
from nucleiscope.pipeline.slides.inputs import SlideInput
from tests.raykill import kill, session_workers
from tests.synthetic import write_synthetic_slide
from tests.tables import tables

CONFIG = ExtractConfig(tile_px=256)
#: Kinds of worker killed in turn, by process title.
KINDS = {"writer": ("ray::SlideWriterActor",), "segment": ("ray::SegmentWorker",),
         "task": ("ray::read_task", "ray::measure_task", "ray::prepare_task", "ray::IDLE")}  # fmt: skip
KILLS = 9
#: More tries than kills: no batch or slide can run out of tries, so any failure is a bug. Segmentation
#: actors on CPUs too (``fuse_cpu=False``): the path with every kind of worker (as on GPU clusters).
OPTIONS = RayOptions(tiles_per_batch=2, max_slides=2, max_batches=4, max_tries=KILLS + 1, fuse_cpu=False)

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> list[SlideInput]:
    root = tmp_path_factory.mktemp("chaos")
    return [SlideInput(write_synthetic_slide(root / f"s{i}.svs", width_px=1792, height_px=1536, mpp=0.25,
                                             min_level_px=256, seed=60 + i).path, f"s{i}", None)
            for i in range(3)]  # fmt: skip


@pytest.mark.timeout(400)
def test_killed_workers_cost_retries_not_slides(cohort: list[SlideInput], tmp_path: Path) -> None:
    run_cohort_local(cohort, str(tmp_path / "calm"), CONFIG, make_segmenter("classical"), show_progress=False)
    rng = random.Random(0)
    killed: list[tuple[str, str]] = []
    events = [0]

    def chaos(ray_cohort: RayCohort, event: str, slide_id: str) -> None:
        events[0] += 1
        if event not in ("batch", "retry") or len(killed) >= KILLS or events[0] % 2:
            return
        kind = list(KINDS)[len(killed) % len(KINDS)]
        workers = session_workers()
        victims = sorted(pid for pid, title in workers.items() if title.startswith(KINDS[kind]))
        if victims:  # none of that kind right now: try again at the next event
            pid = rng.choice(victims)
            if kill(pid):
                killed.append((kind, workers[pid]))

    result = run_cohort_ray(cohort, str(tmp_path / "chaos"), CONFIG, make_segmenter("classical"), options=OPTIONS,
                            show_progress=False, on_event=chaos)  # fmt: skip
    assert {kind for kind, _ in killed} == set(KINDS), killed
    assert (result.done, result.failed) == (3, 0), killed
    failures = tmp_path / "chaos" / "failures.parquet"
    assert not failures.exists() or pd.read_parquet(failures).empty
    calm_nuclei, calm_slides = tables(tmp_path / "calm")
    nuclei, slides = tables(tmp_path / "chaos")
    pd.testing.assert_frame_equal(nuclei, calm_nuclei)
    pd.testing.assert_frame_equal(slides, calm_slides)
