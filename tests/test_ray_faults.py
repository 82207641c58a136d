"""Bounded failure on Ray: a tile that kills its segmentation worker every time ends as its
slide's failures row after a bounded number of tries while the other slides are done, and
``--gpus`` on a cluster without GPUs stops with a clear message instead of waiting forever."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from nucleiscope.actors.segment import SegmentWorker
from nucleiscope.jobs.cli import EXIT_USAGE, main
from nucleiscope.jobs.run_local import run_cohort_local
from nucleiscope.jobs.run_ray import RayCohort, RayOptions, run_cohort_ray
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.segmentation.registry import make_segmenter
from nucleiscope.pipeline.slides.inputs import SlideInput
from tests.synthetic import SyntheticTruth, write_synthetic_slide

CONFIG = ExtractConfig(tile_px=512)
#: Segmentation actors on CPUs too (as on GPU clusters): the path whose workers these tests kill.
OPTIONS = RayOptions(tiles_per_batch=2, max_slides=2, max_batches=4, fuse_cpu=False)
#: Fraction of a tile's pixels darker than haematoxylin-free tissue above which the poison
#: segmenter kills its process: ~10 % on the usual synthetic slides, ~35 % on the poison one.
POISON_DARK_FRACTION = 0.22

pytestmark = pytest.mark.usefixtures("ray_cluster")


def poison_actor_class() -> Any:
    """A segmentation actor that kills its own process on crowded tiles (a poison input).

    Defined in a function so that Ray ships the class by value to its workers."""
    import ray

    class PoisonWorker(SegmentWorker):
        def predict(self, read: Any, mpp: float, stats: Any) -> Any:
            if any(float(np.mean(tile[..., 0] < 150)) > POISON_DARK_FRACTION for tile in read[0]):
                os._exit(3)  # dies like a segfault or the OOM killer: no exception, no cleanup
            return super().predict(read, mpp, stats)

    return ray.remote(PoisonWorker)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory, synthetic_slide: SyntheticTruth) -> list[SlideInput]:
    root = tmp_path_factory.mktemp("faults")
    poison = write_synthetic_slide(root / "poison.svs", width_px=1536, height_px=1280, mpp=0.25, min_level_px=256,
                                   nucleus_radii_um=(5.0, 6.0), ellipse_ratio=(1.0, 1.0), spacing_um=16.0, seed=5)  # fmt: skip
    last = write_synthetic_slide(root / "last.svs", width_px=1536, height_px=1280, mpp=0.25, min_level_px=256,
                                 seed=6)  # fmt: skip
    return [SlideInput(synthetic_slide.path, "first", None), SlideInput(poison.path, "poison", None),
            SlideInput(last.path, "last", None)]  # fmt: skip


def read_nuclei(out: Path) -> pd.DataFrame:
    table = pd.read_parquet(out / "nuclei")
    table["slide_id"] = table["slide_id"].astype(str)
    return table.sort_values(["slide_id", "nucleus_id"]).reset_index(drop=True)


@pytest.mark.timeout(300)
def test_a_poison_tile_fails_its_slide_after_bounded_tries(
    slides: list[SlideInput], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = [slides[0], slides[2]]
    run_cohort_local(good, str(tmp_path / "local"), CONFIG, make_segmenter("classical"), show_progress=False)
    monkeypatch.setattr("nucleiscope.jobs.ray_pool.SegmentActor", poison_actor_class())
    retries: list[str] = []

    def count(cohort: RayCohort, event: str, slide_id: str) -> None:
        if event == "retry":
            retries.append(slide_id)

    result = run_cohort_ray(slides, str(tmp_path / "ray"), CONFIG, make_segmenter("classical"), options=OPTIONS,
                            show_progress=False, on_event=count)  # fmt: skip
    assert (result.done, result.failed) == (2, 1)
    failures = pd.read_parquet(tmp_path / "ray" / "failures.parquet").set_index("slide_id")
    assert list(failures.index) == ["poison"]
    assert failures.loc["poison", "error_type"] == "WorkerLostError"
    assert failures.loc["poison", "stage"] == "segment"
    assert failures.loc["poison", "message"].startswith("segmentation worker died 3 times on tiles ")
    assert retries.count("poison") >= 2  # it was sent again (alone) before it was given up
    assert sorted(pd.read_parquet(tmp_path / "ray" / "slides.parquet").slide_id) == ["first", "last"]
    pd.testing.assert_frame_equal(read_nuclei(tmp_path / "ray"), read_nuclei(tmp_path / "local"))


@pytest.mark.timeout(120)
def test_gpus_on_a_cluster_without_gpus_stop_after_the_wait(
    slides: list[SlideInput], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        code = main(["extract", slides[2].uri, "--out", str(out), "--segmenter", "classical", "--tile-px", "512",
                     "--gpus", "1", "--gpu-wait-s", "2", "--no-progress"])  # fmt: skip
    assert code == EXIT_USAGE
    assert "no segmentation actor could run for 2 s" in caplog.text
    assert "'GPU': 1.0" in caplog.text and "drop --gpus" in caplog.text
    # nothing was committed or recorded as failed: the slide is still pending for a rerun
    assert not (out / "slides.parquet").exists() or pd.read_parquet(out / "slides.parquet").empty
    assert not (out / "failures.parquet").exists() or pd.read_parquet(out / "failures.parquet").empty


def broken_actor_class() -> Any:
    """A segmentation actor whose constructor raises (say, no CUDA on its node)."""
    import ray

    class BrokenWorker(SegmentWorker):
        def __init__(self, *args: Any) -> None:
            raise RuntimeError("CUDA driver not found on this node")

    return ray.remote(BrokenWorker)


@pytest.mark.timeout(120)
def test_actors_that_cannot_start_stop_the_run_at_once(
    slides: list[SlideInput], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nucleiscope.pipeline.common.errors import NucleiscopeError

    monkeypatch.setattr("nucleiscope.jobs.ray_pool.SegmentActor", broken_actor_class())
    with pytest.raises(NucleiscopeError, match="(?s)no segmentation actor could start: .*CUDA driver not found"):
        # the wait for actors that cannot be placed is far longer than the test's timeout
        run_cohort_ray(slides[2:], str(tmp_path), CONFIG, make_segmenter("classical"), show_progress=False,
                       options=RayOptions(actor_wait_s=3600, fuse_cpu=False))  # fmt: skip
