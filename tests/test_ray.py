"""The cohort on Ray (2 local CPUs, one cluster per session): same rows as in process,
failure isolation, resume without duplicates, a killed worker, an interrupted driver."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pandas as pd
import pytest

from nucleiscope.jobs.run_local import run_cohort_local
from nucleiscope.jobs.run_ray import RayCohort, RayOptions, run_cohort_ray
from nucleiscope.pipeline.common.errors import ConfigError
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.segmentation.registry import make_segmenter
from nucleiscope.pipeline.slides.inputs import SlideInput
from tests.raykill import kill, session_workers
from tests.synthetic import SyntheticTruth, write_synthetic_slide

CONFIG = ExtractConfig(tile_px=512)
OPTIONS = RayOptions(tiles_per_batch=2, max_slides=2, max_batches=4)


pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, synthetic_slide: SyntheticTruth) -> list[SlideInput]:
    root = tmp_path_factory.mktemp("cohort")
    second = write_synthetic_slide(str(root / "second.svs"), width_px=2600, height_px=2200, mpp=0.25,
                                   min_level_px=256, seed=11)  # fmt: skip
    return [SlideInput(synthetic_slide.path, "first", None), SlideInput(second.path, "second", None)]


@pytest.fixture(scope="module")
def reference(cohort: list[SlideInput], tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The nuclei of the cohort extracted in this process, without Ray."""
    out = tmp_path_factory.mktemp("reference")
    run_cohort_local(cohort, str(out), CONFIG, make_segmenter("classical"), show_progress=False)
    return read_nuclei(out)


def read_nuclei(out: Path) -> pd.DataFrame:
    table = pd.read_parquet(out / "nuclei")
    table["slide_id"] = table["slide_id"].astype(str)
    return table.sort_values(["slide_id", "nucleus_id"]).reset_index(drop=True)


def run(cohort: list[SlideInput], out: Path, options: RayOptions = OPTIONS, **kwargs: object) -> tuple[int, int, int]:
    result = run_cohort_ray(cohort, str(out), CONFIG, make_segmenter("classical"), options=options,
                            show_progress=False, **kwargs)  # type: ignore[arg-type]
    return result.done, result.failed, result.skipped


def test_ray_rows_equal_in_process_rows(cohort: list[SlideInput], reference: pd.DataFrame, tmp_path: Path) -> None:
    assert run(cohort, tmp_path) == (2, 0, 0)
    pd.testing.assert_frame_equal(read_nuclei(tmp_path), reference)
    slides = pd.read_parquet(tmp_path / "slides.parquet")
    assert sorted(slides.slide_id) == ["first", "second"]
    assert (slides.seconds_read > 0).all() and (slides.seconds_segment > 0).all() and (slides.tiles_per_s > 0).all()


def test_rerun_adds_nothing_and_other_config_refused(
    cohort: list[SlideInput], reference: pd.DataFrame, tmp_path: Path
) -> None:
    assert run(cohort, tmp_path) == (2, 0, 0)
    assert run(cohort, tmp_path) == (0, 0, 2)
    pd.testing.assert_frame_equal(read_nuclei(tmp_path), reference)
    with pytest.raises(ConfigError, match="another configuration"):
        run_cohort_ray(cohort, str(tmp_path), ExtractConfig(tile_px=768), make_segmenter("classical"),
                       options=OPTIONS, show_progress=False)  # fmt: skip


def test_bad_slides_become_failure_rows(
    cohort: list[SlideInput], bad_inputs: dict[str, Path], tmp_path: Path
) -> None:
    bad = [SlideInput(str(bad_inputs[k]), k, None) for k in ("random_bytes", "truncated", "text", "fluorescence")]
    assert run([cohort[0], *bad], tmp_path) == (1, 4, 0)
    failures = pd.read_parquet(tmp_path / "failures.parquet").set_index("slide_id")
    assert failures.loc["truncated", "error_type"] == "SlideFormatError"
    assert failures.loc["fluorescence", "error_type"] == "NotBrightfieldError"
    assert failures.loc["random_bytes", "stage"] == "open"
    assert pd.read_parquet(tmp_path / "slides.parquet").slide_id.tolist() == ["first"]
    assert set(read_nuclei(tmp_path).slide_id) == {"first"}


def test_killed_segmentation_worker_changes_nothing(
    cohort: list[SlideInput], reference: pd.DataFrame, tmp_path: Path
) -> None:
    import ray

    killed: list[int] = []

    def kill_actor_once(ray_cohort: RayCohort, event: str, slide_id: str) -> None:
        if event == "batch" and not killed:
            pid = ray.get(ray_cohort.actors[0].pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    actors = RayOptions(tiles_per_batch=2, max_slides=2, max_batches=4, fuse_cpu=False)
    assert run(cohort, tmp_path, actors, on_event=kill_actor_once) == (2, 0, 0)
    assert killed
    pd.testing.assert_frame_equal(read_nuclei(tmp_path), reference)


def test_killed_tile_task_worker_costs_a_retry_not_a_slide(
    cohort: list[SlideInput], reference: pd.DataFrame, tmp_path: Path
) -> None:
    """Without accelerators a batch is read, segmented and measured in one task; killing its
    worker makes the driver send the batch again, with identical rows."""
    killed: list[int] = []
    events: list[str] = []

    def kill_task_once(ray_cohort: RayCohort, event: str, slide_id: str) -> None:
        events.append(event)
        if event == "batch" and not killed:
            for pid, title in session_workers().items():
                if title == "ray::tiles_task" and kill(pid):
                    killed.append(pid)
                    break

    assert run(cohort, tmp_path, on_event=kill_task_once) == (2, 0, 0)
    assert killed and "retry" in events, (killed, events)
    pd.testing.assert_frame_equal(read_nuclei(tmp_path), reference)


def test_interrupted_driver_then_rerun(cohort: list[SlideInput], reference: pd.DataFrame, tmp_path: Path) -> None:
    def interrupt(ray_cohort: RayCohort, event: str, slide_id: str) -> None:
        if event == "done":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cohort, tmp_path, on_event=interrupt)
    done, failed, skipped = run(cohort, tmp_path)
    # the first slide was committed before the interrupt; the second may have been too
    assert done + skipped == 2 and failed == 0 and skipped >= 1
    pd.testing.assert_frame_equal(read_nuclei(tmp_path), reference)


def test_a_rerun_with_nothing_left_starts_no_actor(
    cohort: list[SlideInput], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(cohort, tmp_path) == (2, 0, 0)

    def no_cohort(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cohort (and its actors) was started with nothing pending")

    monkeypatch.setattr("nucleiscope.jobs.run_ray.RayCohort", no_cohort)
    assert run(cohort, tmp_path) == (0, 0, 2)
    assert sorted(pd.read_parquet(tmp_path / "slides.parquet").slide_id) == ["first", "second"]


def test_progress_counts_rows_before_slides_commit(cohort: list[SlideInput], tmp_path: Path) -> None:
    """The bar's nuclei count grows as batches are written, not only when a slide commits."""
    seen: list[tuple[int, int]] = []

    def watch(ray_cohort: RayCohort, event: str, slide_id: str) -> None:
        if event == "batch":
            seen.append((ray_cohort.done, ray_cohort.active[slide_id].rows))

    assert run(cohort, tmp_path, on_event=watch) == (2, 0, 0)
    assert any(done == 0 and rows > 0 for done, rows in seen), seen
