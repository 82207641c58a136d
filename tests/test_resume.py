"""Reruns of one output: slides known by content, one commit point per slide.

Ids come from the path alone, records carry the file's fingerprint and µm/px override, and
every kill point of the commit sequence leaves an output that the next run completes to
exactly the tables of an undisturbed run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fsspec.implementations.local import LocalFileSystem

from nucleiscope.jobs.run_local import CohortResult, run_cohort_local
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.segmentation.registry import make_segmenter
from nucleiscope.pipeline.slides.inputs import expand_inputs, stable_slide_id
from tests.synthetic import write_synthetic_slide
from tests.tables import nuclei_frame, slides_frame

CONFIG = ExtractConfig(segmenter="classical", tile_px=512)


def small_slide(path: Path, seed: int, width_px: int = 900) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_synthetic_slide(str(path), width_px=width_px, height_px=700, mpp=0.25, tile_px=256, seed=seed,
                          min_level_px=256)  # fmt: skip
    return path


def run(inputs: list[str], out: Path) -> CohortResult:
    items = expand_inputs(inputs)
    return run_cohort_local(items, str(out), CONFIG, make_segmenter("classical"), show_progress=False)


def check_consistent(out: Path) -> None:
    """Every partition holds exactly the one file its slides.parquet row names; no temp file;
    no slide both done and failed."""
    slides = pd.read_parquet(out / "slides.parquet")
    failures = pd.read_parquet(out / "failures.parquet")
    partitions = {p.name.removeprefix("slide_id="): sorted(f.name for f in p.iterdir())
                  for p in (out / "nuclei").glob("slide_id=*")}  # fmt: skip
    assert partitions == {row.slide_id: [row.nuclei_file] for row in slides.itertuples()}
    assert not set(slides.slide_id) & set(failures.slide_id)
    assert not (out / "nuclei" / "_tmp").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".inprogress"]


def test_adding_a_file_with_a_taken_stem_skips_nothing_and_redoes_nothing(tmp_path: Path) -> None:
    b = small_slide(tmp_path / "b" / "x.svs", seed=1)
    out = tmp_path / "out"
    assert run([str(tmp_path / "b" / "*")], out).done == 1
    first = slides_frame(out)
    a = small_slide(tmp_path / "a" / "x.tif", seed=2)
    result = run([str(tmp_path / "a" / "*"), str(tmp_path / "b" / "*")], out)
    assert (result.done, result.skipped, result.failed) == (1, 1, 0)
    slides = slides_frame(out)
    assert sorted(slides.uri) == sorted([str(a), str(b)])
    assert sorted(slides.slide_id) == sorted([stable_slide_id(str(a)), stable_slide_id(str(b))])
    pd.testing.assert_frame_equal(slides[slides.uri == str(b)].reset_index(drop=True), first)
    check_consistent(out)
    assert run([str(tmp_path / "b" / "*"), str(tmp_path / "a" / "*")], out).skipped == 2


def test_a_changed_file_or_override_is_redone_and_its_rows_replaced(tmp_path: Path) -> None:
    slide = small_slide(tmp_path / "in" / "s.svs", seed=3)
    out = tmp_path / "out"
    run([str(slide)], out)
    before = slides_frame(out)
    small_slide(slide, seed=4, width_px=1200)  # new content at the same path
    result = run([str(slide)], out)
    assert (result.done, result.skipped) == (1, 0)
    after = slides_frame(out)
    assert len(after) == 1 and after.slide_id[0] == before.slide_id[0]
    assert after.width_px[0] == 1200 and after.fingerprint[0] != before.fingerprint[0]
    assert len(nuclei_frame(out)) == after.nuclei_count[0]
    check_consistent(out)
    manifest = tmp_path / "in" / "m.csv"
    manifest.write_text(f"slide_uri,mpp\n{slide},0.26\n")
    assert run([str(manifest)], out).done == 1  # the override changed
    assert slides_frame(out).mpp_override.tolist() == [0.26]
    assert run([str(manifest)], out).skipped == 1
    check_consistent(out)


def test_a_moved_file_is_not_redone(tmp_path: Path) -> None:
    slide = small_slide(tmp_path / "in" / "s.svs", seed=5)
    out = tmp_path / "out"
    run([str(slide)], out)
    before = slides_frame(out)
    moved = tmp_path / "elsewhere" / "renamed.svs"
    moved.parent.mkdir()
    os.rename(slide, moved)  # keeps size and mtime: the same content
    result = run([str(moved)], out)
    assert (result.done, result.skipped) == (0, 1)
    after = slides_frame(out)
    assert after.uri.tolist() == [str(moved)] and after.slide_id.tolist() == before.slide_id.tolist()
    assert run([str(moved)], out).skipped == 1
    check_consistent(out)


class Killed(BaseException):
    """The process died here: nothing after this point runs (no cleanup either)."""


_MUTATING = ("_open", "pipe_file", "mv", "rm", "rm_file", "makedirs", "mkdir", "touch", "cp_file")


@pytest.fixture()
def kill_switch(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Counts mutating local-filesystem calls; from call ``at`` on, every one raises Killed."""
    state: dict[str, Any] = {"calls": 0, "at": None}
    for name in _MUTATING:
        original = getattr(LocalFileSystem, name)

        def wrapped(self: Any, *args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            writing = _name != "_open" or any(c in str(args[1] if len(args) > 1 else kwargs.get("mode", "rb"))
                                               for c in "wax+")  # fmt: skip
            if writing:
                state["calls"] += 1
                if state["at"] is not None and state["calls"] >= state["at"]:
                    raise Killed(f"killed at mutating call {state['calls']} ({_name})")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(LocalFileSystem, name, wrapped)
    yield state


def test_every_kill_point_of_a_rerun_leaves_an_output_the_next_run_completes(
    tmp_path: Path, kill_switch: dict[str, Any],
) -> None:
    """A cohort where one slide is new and one changed since the last run: the run is killed
    at each of its filesystem writes in turn, then run again; the tables always end equal to
    an undisturbed run's and consistent."""
    slides = [small_slide(tmp_path / "in" / f"s{k}.svs", seed=10 + k) for k in range(2)]
    base = tmp_path / "base"
    run([str(slides[0])], base)  # the earlier run: s0 done
    small_slide(slides[0], seed=20)  # then s0 changes, and s1 is added
    reference = tmp_path / "reference"
    shutil.copytree(base, reference)
    kill_switch["calls"] = 0
    run([str(s) for s in slides], reference)
    writes = kill_switch["calls"]
    assert writes > 10
    expected_slides, expected_nuclei = slides_frame(reference), nuclei_frame(reference)
    for at in range(1, writes + 1):
        out = tmp_path / f"killed-{at}"
        shutil.copytree(base, out)
        kill_switch.update(calls=0, at=at)
        with pytest.raises(Killed):
            run([str(s) for s in slides], out)
        kill_switch["at"] = None
        run([str(s) for s in slides], out)
        check_consistent(out)
        pd.testing.assert_frame_equal(slides_frame(out), expected_slides, obj=f"slides after a kill at write {at}")
        pd.testing.assert_frame_equal(nuclei_frame(out), expected_nuclei, obj=f"nuclei after a kill at write {at}")
        run_json = json.loads((out / "run.json").read_text())
        assert run_json["config_hash"] == expected_slides.config_hash[0]
        shutil.rmtree(out)
