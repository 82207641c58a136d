"""``nucleiscope export qupath``: QuPath's GeoJSON rules on every feature, a geometry round trip,
slide selection and its errors, atomic files, and memory that does not grow with the nuclei."""

from __future__ import annotations

import gzip
import json
import logging
import math
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely

from nucleiscope.jobs.cli import main
from nucleiscope.pipeline.export.geojson import ARTEFACTS, LYMPHOCYTE_LIKE, MEASUREMENTS, NUCLEUS, NUCLEUS_NAMESPACE
from tests import synthetic
from tests.nuclei_tables import ARTEFACT_EVERY, BAD_EVERY, polygon_area, write_fake_output

REPO = Path(__file__).resolve().parents[1]
MEASUREMENT_NAMES = {label for _, label in MEASUREMENTS}


def _refuse_constant(name: str) -> float:
    raise AssertionError(f"non-standard JSON constant {name} (QuPath 0.4 cannot read it)")


def read_features(path: Path) -> list[dict[str, Any]]:
    """The features of an exported file, parsed as strict JSON (NaN/Infinity refused)."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        collection = json.load(handle, parse_constant=_refuse_constant)
    assert collection["type"] == "FeatureCollection" and set(collection) == {"type", "features"}
    return list(collection["features"])


def check_qupath_rules(feature: dict[str, Any], slide_id: str) -> None:
    """What QuPath's GeoJSON reader needs of a detection, and the id we promise."""
    assert feature["type"] == "Feature"
    props = feature["properties"]
    assert props["objectType"] == "detection"
    cls = props["classification"]
    assert set(cls) == {"name", "color"} and isinstance(cls["name"], str) and cls["name"]
    assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
    measurements = props["measurements"]
    assert isinstance(measurements, dict) and set(measurements) <= MEASUREMENT_NAMES
    for value in measurements.values():
        assert isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    nucleus_id = measurements["Nucleus ID"]
    assert str(uuid.UUID(feature["id"])) == feature["id"]
    assert feature["id"] == str(uuid.uuid5(NUCLEUS_NAMESPACE, f"{slide_id}/{nucleus_id}"))
    geometry = feature["geometry"]
    assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1  # exterior ring only
    ring = geometry["coordinates"][0]
    assert len(ring) >= 4 and ring[0] == ring[-1]
    assert all(len(p) == 2 and all(isinstance(v, int | float) for v in p) for p in ring)


def test_every_feature_follows_qupaths_rules(tmp_path: Path) -> None:
    out = write_fake_output(tmp_path / "out", {"a-1": 900, "b-2": 250}, lymphocyte=True)
    assert main(["export", "qupath", str(out)]) == 0
    files = sorted(p.name for p in (out / "qupath").iterdir())
    assert files == ["a-1.geojson.gz", "b-2.geojson.gz"]  # and no temporary file left
    for slide_id, n_rows in (("a-1", 900), ("b-2", 250)):
        features = read_features(out / "qupath" / f"{slide_id}.geojson.gz")
        ids = [f["properties"]["measurements"]["Nucleus ID"] for f in features]
        assert ids == list(range(n_rows))  # exactly the recorded file, not the stray one beside it
        for feature in features:
            check_qupath_rules(feature, slide_id)
        for k, feature in zip(ids, features):
            props = feature["properties"]
            bad = k % BAD_EVERY == 3
            assert ("Nucleus: Perimeter µm" in props["measurements"]) is not bad  # NaN left out
            assert ("Nucleus: Eccentricity" in props["measurements"]) is not bad  # inf left out
            if k % ARTEFACT_EVERY == 1:
                expected = ARTEFACTS["pigment"]
            elif k % (ARTEFACT_EVERY + 1) == 2:
                expected = ARTEFACTS["detached"]
            elif k % 3 == 0:
                expected = LYMPHOCYTE_LIKE
            else:  # lymphocyte_like false or null
                expected = NUCLEUS
            assert props["classification"] == {"name": expected.name, "color": list(expected.color)}
    first = (out / "qupath" / "a-1.geojson.gz").read_bytes()
    assert main(["export", "qupath", str(out), "--slides", "a-1"]) == 0
    assert (out / "qupath" / "a-1.geojson.gz").read_bytes() == first  # re-exports are byte-identical


def test_without_a_lymphocyte_column_nuclei_are_nucleus_or_artefact(tmp_path: Path) -> None:
    out = write_fake_output(tmp_path / "out", {"c": 60})
    assert main(["export", "qupath", str(out), "--to", str(tmp_path / "qp")]) == 0
    names = {f["properties"]["classification"]["name"] for f in read_features(tmp_path / "qp" / "c.geojson.gz")}
    assert names == {NUCLEUS.name, ARTEFACTS["pigment"].name, ARTEFACTS["detached"].name}


def test_geometry_round_trip_and_offset(tmp_path: Path) -> None:
    """Areas and centroids through geopandas equal the table's polygons; --offset-px shifts exactly."""
    import geopandas

    out = write_fake_output(tmp_path / "out", {"r": 400}, vertices=17, radius_px=9.5)
    assert main(["export", "qupath", str(out)]) == 0
    assert main(["export", "qupath", str(out), "--to", str(tmp_path / "shifted"), "--offset-px", "100", "-2.5"]) == 0
    table = pq.read_table(out / "nuclei" / "slide_id=r" / "part-r.parquet").to_pandas()
    polygons = shapely.from_wkb(table.geometry.to_numpy())
    for folder, (dx, dy) in ((out / "qupath", (0.0, 0.0)), (tmp_path / "shifted", (100.0, -2.5))):
        frame = geopandas.GeoDataFrame.from_features(read_features(folder / "r.geojson.gz"))
        assert len(frame) == len(table)
        np.testing.assert_allclose(frame.geometry.area, shapely.area(polygons), rtol=1e-12)
        np.testing.assert_allclose(frame.geometry.area, polygon_area(17, 9.5), rtol=1e-12)
        centroids = shapely.centroid(polygons)
        np.testing.assert_allclose(frame.geometry.centroid.x, shapely.get_x(centroids) - dx, rtol=0, atol=1e-9)
        np.testing.assert_allclose(frame.geometry.centroid.y, shapely.get_y(centroids) - dy, rtol=0, atol=1e-9)


def test_slide_selection_and_its_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = write_fake_output(tmp_path / "out", {"a": 10, "b": 20, "c": 30})
    assert main(["export", "qupath", str(out), "--slides", "c", "a"]) == 0
    assert sorted(p.name for p in (out / "qupath").iterdir()) == ["a.geojson.gz", "c.geojson.gz"]
    with caplog.at_level(logging.ERROR):
        assert main(["export", "qupath", str(out), "--slides", "a", "nope-123"]) == 2
    assert "nope-123" in caplog.text
    assert main(["export", "qupath", str(tmp_path / "empty")]) == 2  # no finished slides there
    (out / "nuclei" / "slide_id=b" / "part-b.parquet").unlink()  # its record names a file that is gone
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["export", "qupath", str(out), "--to", str(tmp_path / "qp")]) == 1
    assert "part-b.parquet" in caplog.text
    assert sorted(p.name for p in (tmp_path / "qp").iterdir()) == ["a.geojson.gz", "c.geojson.gz"]


def test_a_killed_export_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nucleiscope.pipeline.export import geojson

    out = write_fake_output(tmp_path / "out", {"k": 50})
    assert main(["export", "qupath", str(out)]) == 0
    before = (out / "qupath" / "k.geojson.gz").read_bytes()
    (out / "qupath" / ".k.geojson.gz.deadbeef.tmp").write_bytes(b"left by a killed export")

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(geojson, "features", fail)
    with pytest.raises(KeyboardInterrupt):
        main(["export", "qupath", str(out)])
    assert [p.name for p in (out / "qupath").iterdir()] == ["k.geojson.gz"]  # old file kept, temporaries gone
    assert (out / "qupath" / "k.geojson.gz").read_bytes() == before


_MEMORY_CHILD = """
import resource, sys
from nucleiscope.pipeline.export.qupath import QupathExportConfig, export_qupath
outcome = export_qupath(sys.argv[1], config=QupathExportConfig(batch_rows=1024))
assert not outcome.failed and outcome.done[0].features == int(sys.argv[2]), outcome
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def test_peak_memory_does_not_grow_with_rows(tmp_path: Path) -> None:
    """Ten times the nuclei cost the same peak RSS: memory is bounded by one row group and one
    batch (small here, 2,048 and 1,024 rows, so that the allocator's pools fill within the small file)."""
    peaks = {}
    for n_rows in (20_000, 200_000):
        out = write_fake_output(tmp_path / f"out-{n_rows}", {"m": n_rows}, row_group_rows=2048)
        done = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(out), str(n_rows)], capture_output=True,
                              text=True, timeout=300, check=False, cwd=REPO)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[n_rows] = float(done.stdout.split()[-1])
    assert peaks[200_000] < peaks[20_000] * 1.1 + 10, peaks


def test_a_real_extraction_exports_every_nucleus(tmp_path: Path) -> None:
    """extract --local (classical) on a small synthetic slide, then export: one valid feature
    per row, areas of the outlines as in the table."""
    import geopandas

    truth = synthetic.write_synthetic_slide(tmp_path / "tiny.svs", width_px=1400, height_px=1100, mpp=0.25,
                                            min_level_px=256, seed=11)  # fmt: skip
    out = tmp_path / "out"
    assert main(["extract", truth.path, "--out", str(out), "--local", "--segmenter", "classical", "--no-progress"]) == 0
    assert main(["export", "qupath", str(out)]) == 0
    slides = pd.read_parquet(out / "slides.parquet")
    slide_id = str(slides.slide_id.item())
    features = read_features(out / "qupath" / f"{slide_id}.geojson.gz")
    assert len(features) == int(slides.nuclei_count.item()) > 20
    for feature in features:
        check_qupath_rules(feature, slide_id)
    table = pd.read_parquet(out / "nuclei" / f"slide_id={slide_id}" / str(slides.nuclei_file.item()))
    frame = geopandas.GeoDataFrame.from_features(features)
    np.testing.assert_allclose(frame.geometry.area, shapely.area(shapely.from_wkb(table.geometry)), rtol=1e-12)
    areas_um2 = [f["properties"]["measurements"]["Nucleus: Area µm^2"] for f in features]
    np.testing.assert_array_equal(areas_um2, table.area_um2)  # shortest round-trip text: exact


@pytest.mark.shared
def test_export_of_the_demo_slide(slides_dir: Path, tmp_path: Path) -> None:
    """CMU-1-Small-Region (20x SVS) extracted with the classical segmenter, exported, every feature valid."""
    slide = slides_dir / "CMU-1-Small-Region.svs"
    if not slide.exists():
        pytest.skip(f"{slide} not present")
    out = tmp_path / "out"
    assert main(["extract", str(slide), "--out", str(out), "--local", "--segmenter", "classical", "--no-progress"]) == 0
    assert main(["export", "qupath", str(out)]) == 0
    slides = pd.read_parquet(out / "slides.parquet")
    slide_id = str(slides.slide_id.item())
    features = read_features(out / "qupath" / f"{slide_id}.geojson.gz")
    assert len(features) == int(slides.nuclei_count.item()) > 1000
    width, height = int(slides.width_px.item()), int(slides.height_px.item())
    for feature in features:
        check_qupath_rules(feature, slide_id)
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        assert (ring >= 0).all() and (ring[:, 0] <= width).all() and (ring[:, 1] <= height).all()
