"""Morphometrics against shapes of known geometry."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import shapely
from skimage.draw import disk, ellipse

from nucleiscope.pipeline.color.stain import rgb_to_hed_od
from nucleiscope.pipeline.measure.morphometrics import NUCLEI_SCHEMA, measure_nuclei
from tests.synthetic import crowded_discs

MPP = 0.25
SCALE = 2.0
ORIGIN = (1000.25, 500.5)
UM = MPP * SCALE  # µm per working pixel

# (semi-axis along rows, semi-axis along columns, skimage rotation in degrees).
SHAPES = [
    (12, 12, 0), (20, 20, 0), (40, 40, 0),
    (15, 30, 0), (12, 24, 30), (20, 40, -55), (14, 20, 75), (36, 18, 10), (13, 22, 150),
]


def ramanujan_perimeter(a: float, b: float) -> float:
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def expected_orientation(a_rows: float, b_cols: float, rotation_deg: float) -> float:
    """skimage rotates counter-clockwise on screen; the long axis starts on rows (90°) or columns (0°)."""
    angle = rotation_deg + (90.0 if a_rows > b_cols else 0.0)
    return (angle + 90.0) % 180.0 - 90.0


def draw_shapes(centres: list[tuple[float, float]]) -> np.ndarray:
    labels = np.zeros((100 * len(SHAPES), 100), np.int32)
    for k, ((a, b, rot), (cy, cx)) in enumerate(zip(SHAPES, centres)):
        rr, cc = ellipse(100 * k + cy, cx, a, b, rotation=math.radians(rot), shape=labels.shape)
        labels[rr, cc] = k + 1
    return labels


def measure(labels: np.ndarray, rgb: np.ndarray | None = None) -> list[dict[str, Any]]:
    if rgb is None:
        rgb = np.full(labels.shape + (3,), 200, np.uint8)
    table = measure_nuclei(labels, rgb, mpp=MPP, origin_px=ORIGIN, scale=SCALE, slide_id="s1")
    assert table.schema.equals(NUCLEI_SCHEMA)
    rows: list[dict[str, Any]] = table.to_pylist()
    return rows


def rel(value: float, reference: float) -> float:
    return abs(value - reference) / reference


def test_analytic_ellipses_symmetric_centres() -> None:
    # Centres on pixel corners (x.5): the digital shapes are point-symmetric about them.
    centres = [(49.5, 49.5)] * len(SHAPES)
    rows = measure(draw_shapes(centres))
    assert [r["nucleus_id"] for r in rows] == list(range(1, len(SHAPES) + 1))
    for k, ((a, b, rot), row) in enumerate(zip(SHAPES, rows)):
        cy, cx = 100 * k + 49.5, 49.5
        assert abs(row["centroid_x_px"] - (ORIGIN[0] + (cx + 0.5) * SCALE)) < 0.01
        assert abs(row["centroid_y_px"] - (ORIGIN[1] + (cy + 0.5) * SCALE)) < 0.01
        assert row["centroid_x_um"] == pytest.approx(row["centroid_x_px"] * MPP)
        assert row["centroid_y_um"] == pytest.approx(row["centroid_y_px"] * MPP)
        area = math.pi * a * b * UM**2
        perimeter = ramanujan_perimeter(a, b) * UM
        assert rel(row["area_um2"], area) < 0.03
        assert rel(row["perimeter_um"], perimeter) < 0.03
        assert rel(row["equivalent_diameter_um"], 2 * math.sqrt(a * b) * UM) < 0.03
        assert rel(row["major_axis_um"], 2 * max(a, b) * UM) < 0.03
        assert rel(row["minor_axis_um"], 2 * min(a, b) * UM) < 0.03
        assert rel(row["circularity"], 4 * math.pi * area / perimeter**2) < 0.03
        assert 0.95 < row["solidity"] <= 1.0
        if a == b:
            assert row["eccentricity"] < 0.05
        else:
            assert rel(row["eccentricity"], math.sqrt(1 - (min(a, b) / max(a, b)) ** 2)) < 0.03
            delta = (row["orientation_deg"] - expected_orientation(a, b, rot) + 90) % 180 - 90
            assert abs(delta) < 3.0
            assert -90 < row["orientation_deg"] <= 90
        polygon = shapely.from_wkb(row["geometry"])
        assert polygon.geom_type == "Polygon" and polygon.is_valid and polygon.exterior.is_ccw
        assert rel(polygon.area * MPP**2, area) < 0.03
        assert polygon.centroid.distance(shapely.Point(row["centroid_x_px"], row["centroid_y_px"])) < 0.05


def test_analytic_ellipses_random_centres() -> None:
    rng = np.random.default_rng(7)
    centres = [(float(c[0]), float(c[1])) for c in 49 + rng.random((len(SHAPES), 2))]
    rows = measure(draw_shapes(centres))
    for k, ((a, b, _), row, (cy, cx)) in enumerate(zip(SHAPES, rows, centres)):
        # Digitising at an arbitrary sub-pixel position moves the centroid slightly.
        assert abs(row["centroid_x_px"] - (ORIGIN[0] + (cx + 0.5) * SCALE)) < 0.15 * SCALE
        assert abs(row["centroid_y_px"] - (ORIGIN[1] + (100 * k + cy + 0.5) * SCALE)) < 0.15 * SCALE
        area = math.pi * a * b * UM**2
        perimeter = ramanujan_perimeter(a, b) * UM
        assert rel(row["area_um2"], area) < 0.03
        assert rel(row["perimeter_um"], perimeter) < 0.03
        assert rel(row["circularity"], 4 * math.pi * area / perimeter**2) < 0.03


def test_orientation_convention_on_screen() -> None:
    labels = np.zeros((40, 40), np.int32)
    for t in range(-10, 11):
        labels[20 - t, 20 + t] = 1  # rises to the right on screen
    for t in range(-10, 11):
        labels[5 + t // 4, 20 + t] = 2  # nearly horizontal, falling slightly to the right
    rows = measure(labels)
    assert rows[0]["orientation_deg"] == pytest.approx(45.0, abs=0.5)
    assert -20 < rows[1]["orientation_deg"] < -5
    assert rows[0]["eccentricity"] > 0.95


def test_rectangle_bbox_outline_and_touching_objects() -> None:
    labels = np.zeros((30, 40), np.int32)
    labels[5:15, 3:11] = 4  # rows 5..14, cols 3..10
    labels[5:15, 11:20] = 9  # touches label 4 along a shared edge
    rows = {r["nucleus_id"]: r for r in measure(labels)}
    r4 = rows[4]
    assert (r4["bbox_x_min_px"], r4["bbox_x_max_px"]) == (ORIGIN[0] + 3 * SCALE, ORIGIN[0] + 11 * SCALE)
    assert (r4["bbox_y_min_px"], r4["bbox_y_max_px"]) == (ORIGIN[1] + 5 * SCALE, ORIGIN[1] + 15 * SCALE)
    assert r4["area_um2"] == pytest.approx(80 * UM**2)
    a, b = shapely.from_wkb(r4["geometry"]), shapely.from_wkb(rows[9]["geometry"])
    # Corners are cut by 1/8 px² each; collinear vertices are dropped (octagon).
    assert a.area == pytest.approx((80 - 0.5) * SCALE**2)
    assert len(a.exterior.coords) == 9
    assert a.intersection(b).area == pytest.approx(0.0, abs=1e-9)
    assert a.touches(b) or a.distance(b) < 1e-9
    assert r4["solidity"] == pytest.approx(1.0)


def test_outline_outer_ring_of_largest_part() -> None:
    labels = np.zeros((80, 80), np.int32)
    rr, cc = disk((40, 40), 20)
    labels[rr, cc] = 3
    rr, cc = disk((40, 40), 8)
    labels[rr, cc] = 0  # a hole
    labels[2:4, 2:4] = 3  # a detached fragment
    (row,) = measure(labels)
    polygon = shapely.from_wkb(row["geometry"])
    assert polygon.is_valid and len(polygon.interiors) == 0
    assert rel(polygon.area / SCALE**2, math.pi * 20**2) < 0.03
    assert row["solidity"] > 0.95


def test_stain_columns_on_uniform_colours() -> None:
    labels = np.zeros((60, 60), np.int32)
    rgb = np.full((60, 60, 3), 255, np.uint8)
    colours = {1: (70, 50, 150), 2: (230, 120, 180)}  # haematoxylin-like, eosin-like
    for label, (sl, colour) in zip(colours, [(np.s_[5:25, 5:25], colours[1]), (np.s_[30:55, 30:55], colours[2])]):
        labels[sl] = label
        rgb[sl] = colour
    rows = measure(labels, rgb)
    for row, label in zip(rows, colours):
        expected = rgb_to_hed_od(np.array([[colours[label]]], np.uint8))[0, 0]
        assert row["hematoxylin_od_mean"] == pytest.approx(float(expected[0]), rel=1e-5)
        assert row["eosin_od_mean"] == pytest.approx(float(expected[1]), rel=1e-5)
        assert row["hematoxylin_od_std"] < 1e-6 and row["eosin_od_std"] < 1e-6
    assert rows[0]["hematoxylin_od_mean"] > rows[1]["hematoxylin_od_mean"]
    assert rows[1]["eosin_od_mean"] > rows[0]["eosin_od_mean"]


def test_empty_and_sparse_labels() -> None:
    empty = measure_nuclei(np.zeros((16, 16), np.int32), np.zeros((16, 16, 3), np.uint8),
                           mpp=0.5, origin_px=(0, 0), scale=1.0, slide_id="s")
    assert empty.num_rows == 0 and empty.schema.equals(NUCLEI_SCHEMA)
    labels = np.zeros((20, 20), np.int64)
    labels[2:5, 2:5] = 7
    labels[10:14, 10:14] = 2_000_000_000
    labels[16, 16] = 11  # a single pixel
    table = measure_nuclei(labels, np.zeros((20, 20, 3), np.uint8), mpp=0.5, origin_px=(0, 0),
                           scale=1.0, slide_id="s")
    assert table.column("nucleus_id").to_pylist() == [7, 11, 2_000_000_000]
    assert table.column("area_um2").to_pylist() == pytest.approx([9 * 0.25, 0.25, 16 * 0.25])
    assert all(shapely.from_wkb(g).is_valid for g in table.column("geometry").to_pylist())
    assert all(0.0 <= c <= 1.0 for c in table.column("circularity").to_pylist())


def test_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        measure_nuclei(np.zeros((8, 8), np.int32), np.zeros((8, 9, 3), np.uint8),
                       mpp=0.5, origin_px=(0, 0), scale=1.0, slide_id="s")
    with pytest.raises(ValueError):
        measure_nuclei(np.zeros((8, 8), np.int32), np.zeros((8, 8, 3), np.uint8),
                       mpp=0.0, origin_px=(0, 0), scale=1.0, slide_id="s")


def test_thousand_nuclei_tile() -> None:
    labels, rgb = crowded_discs()
    table = measure_nuclei(labels, rgb, mpp=0.25, origin_px=(0, 0), scale=2.0, slide_id="s")
    assert table.num_rows == 1024  # (its speed: benchmarks/bench_metrics_measure.py)
    assert isinstance(table, pa.Table)
