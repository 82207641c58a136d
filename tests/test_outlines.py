"""The fast post-processing and outline paths equal their reference implementations, bit for bit.

References: ``skimage.measure.find_contours`` on each object's padded crop (the outline the
nuclei table documents), ``scipy.ndimage.distance_transform_edt``, a per-component
``maximum_filter`` and a per-component ``skimage`` watershed.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull
from skimage.measure import find_contours
from skimage.segmentation import watershed

from nucleiscope.pipeline.measure.morphometrics import _dense_labels, _solidity
from nucleiscope.pipeline.measure.outlines import trace_rings
from nucleiscope.pipeline.segmentation.instances import (
    _EIGHT,
    component_peaks,
    component_watershed,
    disk_footprint,
    euclidean_distance,
)


def reference_ring(dense: NDArray[np.int32], k: int) -> NDArray[np.float64]:
    """Object k's outline as find_contours gives it on the object's padded crop, in tile units."""
    rows, cols = ndi.find_objects((dense == k).astype(np.int32))[0]
    crop = np.zeros((rows.stop - rows.start + 2, cols.stop - cols.start + 2), np.float32)
    crop[1:-1, 1:-1] = dense[rows, cols] == k
    best, best_area = None, 0.0
    for contour in find_contours(crop, 0.5, fully_connected="high"):
        xy = np.ascontiguousarray(contour[:, ::-1], dtype=np.float64)
        area = 0.5 * float(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))
        if abs(area) > abs(best_area):
            best, best_area = xy, area
    assert best is not None
    if best_area < 0:
        best = best[::-1]
    pts = best[:-1]
    step = np.diff(best, axis=0)
    prev = np.concatenate([step[-1:], step[:-1]])
    keep = pts[np.abs(prev[:, 0] * step[:, 1] - prev[:, 1] * step[:, 0]) > 1e-9]
    keep = pts if keep.shape[0] < 3 else keep
    return np.vstack([keep, keep[:1]]) + [cols.start - 1, rows.start - 1]


def random_labels(seed: int, shape: tuple[int, int] = (96, 128)) -> NDArray[np.int32]:
    """Touching, holed, multi-part and border-cut objects of random shape."""
    rng = np.random.default_rng(seed)
    blobs = ndi.gaussian_filter(rng.random(shape), 2.0) > 0.5
    labels, _ = ndi.label(blobs)
    noise = rng.random(shape)
    labels[(noise < 0.04) & (labels > 0)] = 0  # holes and pieces
    labels[noise > 0.985] = rng.integers(1, max(int(labels.max()), 1) + 1, int((noise > 0.985).sum()))
    return _dense_labels(labels.astype(np.int64))[1]


@pytest.mark.parametrize("seed", range(6))
def test_rings_equal_find_contours_vertex_for_vertex(seed: int) -> None:
    dense = random_labels(seed)
    n = int(dense.max())
    rings = trace_rings(dense, n)
    for k in range(1, n + 1):
        np.testing.assert_array_equal(rings.ring(k), reference_ring(dense, k), err_msg=f"object {k}")


def test_rings_of_diagonal_pixels_and_single_pixels() -> None:
    dense = np.zeros((6, 7), np.int32)
    dense[1, 1] = dense[2, 2] = 1  # one object joined across a diagonal
    dense[1, 2] = dense[2, 1] = 2  # another crossing it
    dense[4, 5] = 3
    dense[0:6, 6] = 4  # along the border
    for k in range(1, 5):
        np.testing.assert_array_equal(trace_rings(dense, 4).ring(k), reference_ring(dense, k))
    np.testing.assert_array_equal(trace_rings(dense, 4).ring(3)[0], [5.0, 4.5])  # starts where find_contours does


def test_solidity_is_exact_polygon_over_hull_area() -> None:
    dense = random_labels(11)
    rings = trace_rings(dense, int(dense.max()))
    solidity = _solidity(rings)
    for k in range(1, int(dense.max()) + 1):
        ring = rings.ring(k)
        area = 0.5 * float(np.dot(ring[:-1, 0], ring[1:, 1]) - np.dot(ring[1:, 0], ring[:-1, 1]))
        hull = ConvexHull(ring[:-1]).volume if len(np.unique(ring, axis=0)) > 2 else 0.0
        expected = min(area / hull, 1.0) if hull > 0 else 1.0
        assert solidity[k - 1] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_euclidean_distance_equals_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = ndi.gaussian_filter(rng.random((200, 150)), 4.0) > 0.45
    np.testing.assert_array_equal(euclidean_distance(mask), ndi.distance_transform_edt(mask))
    full = np.ones((20, 30), bool)
    np.testing.assert_array_equal(euclidean_distance(full), ndi.distance_transform_edt(full))


def reference_peaks(height: NDArray[np.float64], components: NDArray[np.int32], radius: int) -> NDArray[np.bool_]:
    fp = disk_footprint(radius)
    peaks = np.zeros(components.shape, bool)
    for index, sl in enumerate(ndi.find_objects(components), start=1):
        inside = components[sl] == index
        sub = np.where(inside, height[sl], -np.inf)
        peaks[sl] |= inside & (sub >= ndi.maximum_filter(sub, footprint=fp, mode="constant", cval=-np.inf))
    return peaks


def reference_watershed(landscape: NDArray[np.float64], markers: NDArray[np.int32],
                        components: NDArray[np.int32]) -> NDArray[np.int32]:
    labels = np.zeros(components.shape, np.int32)
    for index, sl in enumerate(ndi.find_objects(components), start=1):
        inside = components[sl] == index
        seeds = np.where(inside, markers[sl], 0)
        labels[sl][inside] = watershed(landscape[sl], seeds, mask=inside)[inside]
    return labels


@pytest.mark.parametrize("seed", range(4))
def test_peaks_and_watershed_equal_per_component_references(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = ndi.gaussian_filter(rng.random((160, 200)), 3.0) > 0.48
    components, _ = ndi.label(mask, structure=_EIGHT)
    smooth = ndi.gaussian_filter(np.minimum(ndi.distance_transform_edt(mask), 6.0), 0.7)
    smooth = np.round(smooth, 1)  # plateaus and exact ties between markers, the hard cases
    peaks = component_peaks(smooth, components, 3)
    np.testing.assert_array_equal(peaks, reference_peaks(smooth, components, 3))
    markers, _ = ndi.label(peaks, structure=_EIGHT)
    got = component_watershed(-smooth, markers.astype(np.int32), components)
    np.testing.assert_array_equal(got, reference_watershed(-smooth, markers.astype(np.int32), components))


@pytest.mark.parametrize("seed", range(3))
def test_morphology_equals_scipy(seed: int) -> None:
    from nucleiscope.pipeline.segmentation.instances import dilate_disk, erode_disk, fill_small_holes

    rng = np.random.default_rng(seed)
    mask = ndi.gaussian_filter(rng.random((120, 90)), 1.5) > 0.5
    mask[0, :] = mask[:, -1] = True  # objects cut by the border
    for radius in (1, 2, 4):
        fp = disk_footprint(radius)
        np.testing.assert_array_equal(erode_disk(mask, fp), ndi.binary_erosion(mask, structure=fp, border_value=1))
        np.testing.assert_array_equal(dilate_disk(mask, fp), ndi.binary_dilation(mask, structure=fp, border_value=0))
    for max_hole_px in (0, 3, 20, 1e9):
        holes = ndi.binary_fill_holes(mask) & ~mask
        labels, _ = ndi.label(holes)
        small = np.bincount(labels.ravel()) <= max_hole_px
        small[0] = False
        np.testing.assert_array_equal(fill_small_holes(mask, max_hole_px), mask | small[labels])
