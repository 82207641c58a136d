"""``nucleiscope report``: the density grid and histograms on known centroids, the page (escaped,
complete) on a real local run and on an output in an fsspec store, and a headless Chromium that
loads it and shows the plots."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from nucleiscope.jobs.cli import main
from nucleiscope.jobs.run_local import run_cohort_local
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.report.build import build_report
from nucleiscope.pipeline.report.density import SlideStreams
from nucleiscope.pipeline.report.plots import COHORT_COLOUR, SLIDE_COLOURS
from nucleiscope.pipeline.segmentation.registry import make_segmenter
from nucleiscope.pipeline.slides.inputs import SlideInput
from tests.synthetic import write_synthetic_slide


def test_density_grid_counts_centroids_per_mm2() -> None:
    streams = SlideStreams(width_um=120.0, height_um=100.0)  # 3 x 2 cells of 50 µm; the last column 20 µm wide
    x = np.array([10.0, 20.0, 60.0, 110.0, 119.0, 10.0])
    y = np.array([10.0, 40.0, 10.0, 60.0, 99.0, 70.0])
    table = pa.table({"centroid_x_um": x, "centroid_y_um": y, "lymphocyte_like": [True, False, None, True, True, False],
                      "area_um2": [10.0, 20.0, 30.0, 500.0, 40.0, 40.0]})  # fmt: skip
    streams.add(table.slice(0, 3))
    streams.add(table.slice(3))
    assert streams.nuclei.tolist() == [[2, 1, 0], [1, 0, 2]] and streams.count == 6
    assert streams.lymphocytes.tolist() == [[1, 0, 0], [0, 0, 2]]
    full, edge = 2 / 0.0025, 2 / (50e-3 * 20e-3)  # two nuclei in a full cell, two in a 50 x 20 µm one
    assert streams.per_mm2()[0, 0] == pytest.approx(full) and streams.per_mm2()[1, 2] == pytest.approx(edge)
    assert streams.histograms["area_um2"].sum() == 6 and streams.histograms["area_um2"][-1] == 1  # 500 -> last bin
    assert streams.histograms["circularity"].sum() == 0  # a column the batches do not have
    sliver = SlideStreams(width_um=101.0, height_um=50.0)
    assert np.isnan(sliver.per_mm2()[0, 2]) and sliver.per_mm2()[0, 1] == 0.0


@pytest.fixture(scope="module")
def run_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic slides and a file that is not a slide (its name needs escaping), run locally."""
    root = tmp_path_factory.mktemp("report")
    items = []
    for k, radii in enumerate([(2.2, 2.8), (3.0, 4.0)]):
        path = root / f"slide{k}.svs"
        write_synthetic_slide(path, width_px=800, height_px=700, mpp=0.25, tile_px=256, min_level_px=256, seed=k,
                              nucleus_radii_um=radii)  # fmt: skip
        items.append(SlideInput(str(path), f"s{k}", None))
    bad = root / "a<b>&c.svs"
    bad.write_text("not a slide\n" * 20)
    items.append(SlideInput(str(bad), "bad", None))
    out = root / "out"
    run_cohort_local(items, str(out), ExtractConfig(tile_px=256), make_segmenter("classical"), show_progress=False)
    return out


def test_the_report_shows_every_slide_and_failure_escaped(run_out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(run_out)]) == 0
    folder = run_out / "report"
    assert f"{folder / 'index.html'}" in capsys.readouterr().out
    page = (folder / "index.html").read_text()
    names = {p.name for p in folder.iterdir()}
    for slide_id in ("s0", "s1"):
        assert {f"qc-{slide_id}.png", f"density-{slide_id}.png", f"histograms-{slide_id}.png"} <= names
        assert f'src="density-{slide_id}.png"' in page and f'src="qc-{slide_id}.png"' in page
    assert {"cohort-density.png", "cohort-histograms.png", "cohort.csv", "cohort.parquet"} <= names
    assert "a&lt;b&gt;&amp;c.svs" in page and "a<b>" not in page  # the failure, escaped
    assert "SlideFormatError" in page
    assert (run_out / "qc" / "s0.png").read_bytes() == (folder / "qc-s0.png").read_bytes()
    assert (folder / "cohort.csv").read_text().splitlines()[0].startswith('"slide_id","uri"')
    with Image.open(folder / "density-s0.png") as image:
        assert 600 <= image.width <= 1200  # readable, not a poster


def test_a_report_of_an_output_in_an_fsspec_store(run_out: Path, tmp_path: Path) -> None:
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.put(str(run_out), "/report-test/out", recursive=True)
    try:
        result = build_report("memory://report-test/out", tmp_path / "rep")
        assert result.slides == 2 and result.failures == 1 and result.nuclei > 100
        assert (tmp_path / "rep" / "density-s1.png").stat().st_size > 1000
        assert memory.exists("/report-test/out/cohort.parquet")
        assert main(["report", "memory://report-test/out"]) == 2  # a URL needs --to
        assert main(["report", str(tmp_path / "nothing")]) == 1  # not an output: no report folder made
        assert not (tmp_path / "nothing").exists()
    finally:
        memory.rm("/report-test", recursive=True)


def _colour_pixels(rgb: np.ndarray, hex_colour: str, tol: int = 12) -> int:
    target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb.astype(int) - target).max(axis=2) <= tol).sum())


def test_chromium_renders_the_report_with_its_plots(run_out: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    folder = tmp_path / "rep"
    build_report(str(run_out), folder)
    shot = tmp_path / "shot.png"
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1280,2200", (folder / "index.html").as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    with Image.open(shot) as image:
        rgb = np.asarray(image.convert("RGB"))
    assert rgb.shape[:2] == (2200, 1280)
    # not blank: the cohort bars and histogram (blue), the slide lines (red), and the page's text
    assert _colour_pixels(rgb, COHORT_COLOUR) > 2000
    assert _colour_pixels(rgb, SLIDE_COLOURS[0]) > 200
    assert (rgb.max(axis=2) < 60).sum() > 2000  # dark text
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 500
