"""docs/recipes.md cannot rot: every code block runs on a small extracted synthetic slide, and what
each computes is checked against slides.parquet or a brute-force answer."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import shapely

from nucleiscope.jobs.cli import main
from tests import synthetic

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
_BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)
_OUT_LINE = re.compile(r'^out = "results"$', re.M)


def blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced python or bash block of the page, in order."""
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(RECIPES.read_text(encoding="utf-8"))]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output folder of one small synthetic slide (classical, in this process)."""
    root = tmp_path_factory.mktemp("recipes")
    truth = synthetic.write_synthetic_slide(root / "tiny.svs", width_px=1600, height_px=1300, mpp=0.25,
                                            min_level_px=256, seed=5)  # fmt: skip
    out = root / "results"
    assert main(["extract", truth.path, "--out", str(out), "--local", "--segmenter", "classical", "--no-progress"]) == 0
    return out


def run_python(code: str, out: Path) -> dict[str, Any]:
    """Run a python block with its ``out = "results"`` line pointing at ``out``; its variables."""
    assert _OUT_LINE.search(code), 'every python recipe starts from out = "results"'
    namespace: dict[str, Any] = {}
    exec(compile(_OUT_LINE.sub(f"out = {str(out)!r}", code), str(RECIPES), "exec"), namespace)
    return namespace


def test_the_page_has_the_recipes() -> None:
    kinds = [kind for kind, _ in blocks()]
    assert kinds == ["python", "python", "python", "bash"]


def test_nuclei_per_mm2_by_slide(results: Path) -> None:
    per_slide = run_python(blocks()[0][1], results)["per_slide"]
    slides = pd.read_parquet(results / "slides.parquet")
    assert per_slide.slide_id.tolist() == slides.slide_id.tolist()
    assert per_slide.nuclei.tolist() == slides.nuclei_count.tolist()
    assert per_slide.nuclei_not_flagged.tolist() == (slides.nuclei_count - slides.artefacts_flagged).tolist()
    np.testing.assert_allclose(per_slide.nuclei_per_mm2, per_slide.nuclei_not_flagged / slides.tissue_area_mm2)


def test_area_quantiles_per_slide(results: Path) -> None:
    areas = run_python(blocks()[1][1], results)["areas"]
    slides = pd.read_parquet(results / "slides.parquet")
    assert areas.slide_id.tolist() == slides.slide_id.tolist()
    np.testing.assert_allclose(areas.area_um2_median, slides.area_um2_median, rtol=1e-6)
    assert (areas.area_um2_p10 < areas.area_um2_median).all() and (areas.area_um2_median < areas.area_um2_p90).all()


def test_spatial_queries(results: Path) -> None:
    found = run_python(blocks()[2][1], results)
    nuclei, mpp, point, region_px = found["nuclei"], found["mpp"], found["point"], found["region_px"]
    near_expected = set(nuclei.nucleus_id[shapely.distance(nuclei.geometry.values, point) <= 100 / mpp])
    inside_expected = set(nuclei.nucleus_id[shapely.within(nuclei.geometry.values, region_px)])
    assert set(found["near"].nucleus_id) == near_expected and len(near_expected) > 10
    assert set(found["inside"].nucleus_id) == inside_expected and len(inside_expected) > 10
    assert region_px.bounds == pytest.approx((50 / mpp, 40 / mpp, 200 / mpp, 150 / mpp))


def test_qupath_recipe(results: Path) -> None:
    import gzip
    import json

    commands = [line for line in blocks()[3][1].splitlines() if line.startswith("nucleiscope ")]
    assert commands
    for line in commands:
        args = [str(results) if a == "results" else a for a in shlex.split(line)[1:]]
        assert main(args) == 0
    slides = pd.read_parquet(results / "slides.parquet")
    for slide_id, count in zip(slides.slide_id, slides.nuclei_count):
        with gzip.open(results / "qupath" / f"{slide_id}.geojson.gz", "rt", encoding="utf-8") as handle:
            assert len(json.load(handle)["features"]) == count
