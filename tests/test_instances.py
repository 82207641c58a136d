"""Mask post-processing into instances."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk as draw_disk

from nucleiscope.pipeline.segmentation.instances import (
    distance_watershed,
    fill_small_holes,
    filter_by_area,
    remove_small_components,
    scaled_radius_px,
    split_instances,
)


def _discs(shape: tuple[int, int], centres: list[tuple[int, int]], radius: float) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for c in centres:
        mask[draw_disk(c, radius, shape=shape)] = True  # type: ignore[no-untyped-call]
    return mask


def test_scaled_radius() -> None:
    assert scaled_radius_px(7, 0.25) == 7
    assert scaled_radius_px(7, 0.5) == 4
    assert scaled_radius_px(1, 0.5) == 1  # never below one pixel
    assert scaled_radius_px(2, 0.125) == 4
    with pytest.raises(ValueError):
        scaled_radius_px(2, 0.0)


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_two_touching_discs_split_single_disc_kept(mpp: float) -> None:
    r = 12 * 0.25 / mpp  # 3 µm radius
    s = 0.25 / mpp
    shape = (int(100 * s), int(120 * s))
    two = _discs(shape, [(int(50 * s), int(40 * s)), (int(50 * s), int(40 * s + 1.8 * r))], r)
    labels = split_instances(two, mpp)
    assert labels.dtype == np.int32
    assert labels.max() == 2
    areas = np.bincount(labels.ravel())[1:]
    assert abs(areas[0] - areas[1]) / areas.max() < 0.1
    one = _discs(shape, [(int(50 * s), int(60 * s))], r)
    labels = split_instances(one, mpp)
    assert labels.max() == 1
    assert abs(int((labels == 1).sum()) - int(one.sum())) / one.sum() < 0.05


def test_labels_follow_raster_order_of_seeds() -> None:
    mask = _discs((80, 80), [(60, 20), (15, 60), (40, 40)], 8)
    labels = split_instances(mask, 0.25)
    assert labels[15, 60] == 1 and labels[40, 40] == 2 and labels[60, 20] == 3


def test_empty_and_invalid_masks() -> None:
    assert not split_instances(np.zeros((30, 30), bool), 0.25).any()
    with pytest.raises(ValueError):
        split_instances(np.zeros((3, 3, 3), bool), 0.25)


def test_small_specks_removed_by_opening() -> None:
    mask = _discs((60, 60), [(30, 30)], 10)
    mask[5, 5] = mask[50, 8] = True
    labels = split_instances(mask, 0.25)
    assert labels.max() == 1 and labels[5, 5] == 0


def test_fill_small_holes_only_fills_small_ones() -> None:
    mask = np.ones((40, 80), bool)
    mask[10:13, 10:13] = False  # 9 px hole
    mask[10:30, 40:70] = False  # 600 px hole
    out = fill_small_holes(mask, 50)
    assert out[11, 11] and not out[20, 50]


def test_remove_small_components_and_filter_by_area() -> None:
    mask = np.zeros((20, 20), bool)
    mask[1:3, 1:3] = True  # 4 px
    mask[10:15, 10:15] = True  # 25 px
    kept = remove_small_components(mask, 5)
    assert not kept[1, 1] and kept[12, 12]
    labels = np.zeros((20, 20), np.int32)
    labels[1:3, 1:3] = 7
    labels[10:15, 10:15] = 3
    labels[16:20, 0:10] = 5  # 40 px
    out = filter_by_area(labels, 5, 30)
    assert out.dtype == np.int32
    assert out[12, 12] == 1 and out.max() == 1 and out[1, 1] == 0 and out[17, 3] == 0


def test_distance_watershed_cap_keeps_split() -> None:
    mask = _discs((60, 100), [(30, 30), (30, 62)], 17)
    labels = distance_watershed(mask, sigma_px=1.0, footprint_px=7, max_distance_px=8)
    assert labels.max() == 2
    assert set(np.unique(labels[mask])) == {1, 2}
