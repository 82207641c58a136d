"""Metrics on hand-built label images with hand-computed values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from nucleiscope.pipeline.common.errors import NucleiscopeError
from nucleiscope.pipeline.evaluation.metrics import (
    aji,
    count_ratio,
    dice,
    evaluate_dirs,
    evaluate_pair,
    matched_area_ratio,
    object_f1,
    panoptic_quality,
    quality_pair,
    rasterize_monuseg_xml,
    read_label_image,
)
from tests.synthetic import crowded_boxes

SHARED = Path(__file__).resolve().parents[2] / "shared"
MONUSEG = SHARED / "data" / "monuseg-train"


def _box(labels: np.ndarray, value: int, rows: slice, cols: slice) -> np.ndarray:
    labels[rows, cols] = value
    return labels


def _empty() -> np.ndarray:
    return np.zeros((30, 30), np.int32)


def test_identical_with_other_ids_scores_one() -> None:
    gt = _box(_box(_empty(), 1, slice(0, 10), slice(0, 10)), 2, slice(15, 25), slice(5, 20))
    pred = np.where(gt == 1, 9, np.where(gt == 2, 4, 0))
    assert aji(gt, pred) == 1.0
    assert dice(gt, pred) == 1.0
    assert panoptic_quality(gt, pred) == (1.0, 1.0, 1.0)
    assert object_f1(gt, pred) == 1.0


def test_partial_overlap_below_half() -> None:
    gt = _box(_empty(), 1, slice(0, 10), slice(0, 10))  # 100 px
    pred = _box(_empty(), 1, slice(0, 10), slice(5, 15))  # overlap 50, union 150
    assert aji(gt, pred) == pytest.approx(50 / 150)
    assert dice(gt, pred) == pytest.approx(0.5)
    assert panoptic_quality(gt, pred) == (0.0, 0.0, 0.0)
    assert object_f1(gt, pred) == 0.0
    assert object_f1(gt, pred, iou=0.3) == 1.0


def test_partial_overlap_above_half() -> None:
    gt = _box(_empty(), 1, slice(0, 10), slice(0, 10))
    pred = _box(_empty(), 5, slice(0, 10), slice(0, 8))  # IoU 0.8
    pq, dq, sq = panoptic_quality(gt, pred)
    assert (dq, sq, pq) == pytest.approx((1.0, 0.8, 0.8))
    assert aji(gt, pred) == pytest.approx(0.8)


def test_unmatched_prediction_adds_its_area() -> None:
    gt = _box(_empty(), 1, slice(0, 10), slice(0, 10))
    pred = _box(gt.copy(), 2, slice(20, 24), slice(20, 25))  # extra 20 px object
    assert aji(gt, pred) == pytest.approx(100 / 120)
    assert dice(gt, pred) == pytest.approx(200 / 220)
    pq, dq, sq = panoptic_quality(gt, pred)
    assert (pq, dq, sq) == pytest.approx((2 / 3, 2 / 3, 1.0))
    assert object_f1(gt, pred) == pytest.approx(2 / 3)


def test_unmatched_ground_truth_and_merge() -> None:
    gt = _box(_box(_empty(), 1, slice(0, 10), slice(0, 10)), 2, slice(0, 10), slice(10, 20))
    only_first = _box(_empty(), 1, slice(0, 10), slice(0, 10))
    assert aji(gt, only_first) == pytest.approx(100 / 200)
    merged = _box(_empty(), 1, slice(0, 10), slice(0, 20))
    # Both objects pick the merged prediction (IoU 0.5 each): C = 200, U = 200 + 200.
    assert aji(gt, merged) == pytest.approx(0.5)
    assert panoptic_quality(gt, merged) == (0.0, 0.0, 0.0)  # IoU 0.5 is not > 0.5


def test_each_object_takes_the_prediction_of_highest_iou() -> None:
    gt = _box(_empty(), 1, slice(0, 10), slice(0, 10))
    pred = _box(_box(_empty(), 1, slice(0, 10), slice(0, 3)), 2, slice(0, 10), slice(3, 10))
    # IoU with 2 is 0.7 (chosen, C=70, U=100); prediction 1 (30 px) stays unused.
    assert aji(gt, pred) == pytest.approx(70 / 130)


def test_empty_cases() -> None:
    obj = _box(_empty(), 3, slice(2, 6), slice(2, 6))
    assert evaluate_pair(_empty(), _empty()) == {
        "aji": 1.0, "dice": 1.0, "pq": 1.0, "dq": 1.0, "sq": 1.0, "f1": 1.0, "n_gt": 0.0, "n_pred": 0.0
    }
    for gt, pred in ((_empty(), obj), (obj, _empty())):
        assert aji(gt, pred) == 0.0
        assert dice(gt, pred) == 0.0
        assert panoptic_quality(gt, pred) == (0.0, 0.0, 0.0)
        assert object_f1(gt, pred) == 0.0


def test_input_validation() -> None:
    with pytest.raises(ValueError):
        aji(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError):
        aji(np.zeros((3, 3), float), np.zeros((3, 3), int))
    with pytest.raises(ValueError):
        object_f1(_empty(), _empty(), iou=1.0)




def test_a_thousand_nuclei() -> None:
    """(Its speed is measured by benchmarks/bench_metrics_measure.py, not asserted here.)"""
    gt = crowded_boxes()
    pred = np.roll(gt, 3, axis=1) * 3
    result = evaluate_pair(gt, pred)
    # Each box loses 3 of 25 columns to the shift: IoU = 22 / 28 for every object.
    assert result["n_gt"] == result["n_pred"] == 1024
    assert result["aji"] == pytest.approx(22 / 28)
    assert result["sq"] == pytest.approx(22 / 28)


def _write_xml(path: Path, polygons: list[list[tuple[float, float]]]) -> None:
    regions = "".join(
        "<Region><Vertices>" + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in poly) + "</Vertices></Region>"
        for poly in polygons
    )
    path.write_text(f'<Annotations><Annotation><Regions>{regions}</Regions></Annotation></Annotations>')


def test_xml_rasterisation_order_and_convention(tmp_path: Path) -> None:
    xml = tmp_path / "a.xml"
    _write_xml(xml, [[(2, 3), (6, 3), (6, 8), (2, 8)], [(5, 3), (9, 3), (9, 5), (5, 5)], [(1, 1), (2, 1)]])
    labels = rasterize_monuseg_xml(xml, (12, 12))
    expected = np.zeros((12, 12), np.int32)
    expected[3:9, 2:7] = 1  # x = columns 2..6, y = rows 3..8, vertices included
    expected[3:6, 5:10] = 2  # the later region overwrites
    np.testing.assert_array_equal(labels, expected)
    (tmp_path / "bad.xml").write_text("<Annotations><Regions>")
    with pytest.raises(NucleiscopeError):
        rasterize_monuseg_xml(tmp_path / "bad.xml", (4, 4))


def test_evaluate_dirs_png_tif_and_xml(tmp_path: Path) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt = _box(_empty(), 1, slice(0, 10), slice(0, 10))
    Image.fromarray(gt.astype(np.uint16)).save(gt_dir / "img1.png")
    tifffile.imwrite(pred_dir / "img1.tif", _box(gt.copy(), 2, slice(20, 24), slice(20, 25)))
    _write_xml(gt_dir / "img2.xml", [[(0, 0), (9, 0), (9, 9), (0, 9)]])
    Image.fromarray(gt.astype(np.uint16)).save(pred_dir / "img2.png")
    table = evaluate_dirs(pred_dir, gt_dir)
    assert list(table["image"]) == ["img1", "img2", "mean"]
    assert list(table.columns) == ["image", "aji", "dice", "pq", "dq", "sq", "f1", "n_gt", "n_pred"]
    assert table["aji"].tolist() == pytest.approx([100 / 120, 1.0, (100 / 120 + 1.0) / 2])
    assert table.loc[0, "n_pred"] == 2
    np.testing.assert_array_equal(read_label_image(gt_dir / "img1.png"), gt)
    (pred_dir / "img1.tif").unlink()
    with pytest.raises(NucleiscopeError, match="no prediction"):
        evaluate_dirs(pred_dir, gt_dir)


@pytest.mark.shared
@pytest.mark.skipif(not (MONUSEG / "annotations").is_dir(), reason=f"MoNuSeg data absent at {MONUSEG}")
def test_xml_rasteriser_reproduces_monuseg_labels() -> None:
    xmls = sorted((MONUSEG / "annotations").glob("*.xml"))[:3]
    assert xmls
    for xml in xmls:
        labels = read_label_image(MONUSEG / "labels" / f"{xml.stem}.png")
        raster = rasterize_monuseg_xml(xml, (labels.shape[0], labels.shape[1]))
        assert aji(labels, raster) > 0.999, xml.stem


def test_matched_area_ratio_and_count_ratio() -> None:
    gt = _box(_box(_empty(), 1, slice(0, 10), slice(0, 10)), 2, slice(15, 25), slice(15, 25))  # 100 px each
    gt = _box(gt, 3, slice(0, 4), slice(20, 30))  # 40 px, missed below
    pred = _box(_empty(), 7, slice(0, 10), slice(0, 12))  # 120 px on gt 1: IoU 100/120
    pred = _box(pred, 2, slice(15, 25), slice(15, 23))  # 80 px inside gt 2: IoU 0.8
    pred = _box(pred, 5, slice(26, 30), slice(0, 5))  # a false positive
    assert matched_area_ratio(gt, pred) == pytest.approx(np.median([1.2, 0.8]))
    assert count_ratio(gt, pred) == pytest.approx(3 / 3)
    bloated = _box(_empty(), 1, slice(0, 10), slice(0, 22))  # 220 px on gt 1: IoU 100/220 < 0.5
    assert np.isnan(matched_area_ratio(gt, bloated))
    assert matched_area_ratio(gt, bloated, min_iou=0.4) == pytest.approx(2.2)
    assert count_ratio(gt, bloated) == pytest.approx(1 / 3)
    assert np.isnan(count_ratio(_empty(), pred)) and np.isnan(matched_area_ratio(_empty(), _empty()))


def test_matched_area_ratio_takes_the_best_iou_prediction() -> None:
    gt = _box(_empty(), 1, slice(0, 10), slice(0, 10))
    pred = _box(_box(_empty(), 1, slice(0, 10), slice(0, 3)), 2, slice(0, 10), slice(3, 12))  # IoU 0.3 / 90/120
    assert matched_area_ratio(gt, pred) == pytest.approx(0.9)
    scores = quality_pair(gt, pred)
    assert scores["area_ratio"] == pytest.approx(0.9) and scores["count_ratio"] == pytest.approx(2.0)
    assert {k: v for k, v in scores.items() if k in evaluate_pair(gt, pred)} == evaluate_pair(gt, pred)
