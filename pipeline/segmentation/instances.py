"""From a binary nucleus mask to instance labels (method.md, "Inference and post-processing").

Radii are defined at the reference 0.25 µm/px and scaled by 0.25 / mpp (at least
1 px), so the same physical structure sizes are used at any working resolution.
Labels are numbered in raster order of their watershed markers, so the output is
deterministic and depends only on the image content.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from skimage.segmentation import watershed

#: Pixel size at which the reference radii are defined.
REFERENCE_MPP = 0.25
_EIGHT = np.ones((3, 3), dtype=bool)


def scaled_radius_px(radius_ref_px: float, mpp: float) -> int:
    """A radius given in pixels at 0.25 µm/px, in pixels at ``mpp`` (>= 1)."""
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp!r}")
    return max(1, int(round(radius_ref_px * REFERENCE_MPP / mpp)))


def disk_footprint(radius_px: int) -> NDArray[np.bool_]:
    """Boolean disk of pixels within ``radius_px`` of the centre, (2r+1, 2r+1)."""
    r = int(radius_px)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return np.asarray(x * x + y * y <= r * r, dtype=bool)


def clean_mask(mask: NDArray[np.bool_], radii_px: tuple[int, ...]) -> NDArray[np.bool_]:
    """Alternate binary opening and closing with disks of the given radii (opening first)."""
    out = np.asarray(mask, dtype=bool)
    for r in radii_px:
        fp = disk_footprint(r)
        out = dilate_disk(erode_disk(out, fp), fp)
        out = erode_disk(dilate_disk(out, fp), fp)
    return out


def erode_disk(mask: NDArray[np.bool_], fp: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Binary erosion by the footprint ``fp`` (odd, centred), outside the image counting as
    foreground so objects cut by the border are not eroded (``scipy.ndimage.binary_erosion``
    with ``border_value=1``, pixel for pixel; OpenCV's default border for erosion)."""
    out = cv2.erode(np.ascontiguousarray(mask, dtype=bool).view(np.uint8), fp.astype(np.uint8))
    return np.asarray(out.view(bool), dtype=bool)


def dilate_disk(mask: NDArray[np.bool_], fp: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Binary dilation by the footprint ``fp`` (odd, centred), nothing beyond the image
    (``scipy.ndimage.binary_dilation`` with ``border_value=0``, pixel for pixel; OpenCV)."""
    out = cv2.dilate(np.ascontiguousarray(mask, dtype=bool).view(np.uint8), fp.astype(np.uint8),
                     borderType=cv2.BORDER_CONSTANT, borderValue=0)  # fmt: skip
    return np.asarray(out.view(bool), dtype=bool)


def fill_small_holes(mask: NDArray[np.bool_], max_hole_px: float) -> NDArray[np.bool_]:
    """Fill enclosed background regions of at most ``max_hole_px`` pixels (8-connected objects).

    The holes are the 4-connected background regions that do not reach the image border (what
    ``scipy.ndimage.binary_fill_holes`` fills), found with one labelling of the background.
    """
    mask = np.asarray(mask, dtype=bool)
    background, count = ndi.label(~mask)
    if count == 0:
        return mask
    size = np.bincount(background.ravel(), minlength=count + 1).astype(np.float64)
    edge = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    size[edge] = np.inf  # reaches the border: not a hole
    small = size <= max_hole_px
    small[0] = False
    return np.asarray(mask | small[background], dtype=bool)


def remove_small_components(mask: NDArray[np.bool_], min_px: float) -> NDArray[np.bool_]:
    """Drop 8-connected components of fewer than ``min_px`` pixels."""
    mask = np.asarray(mask, dtype=bool)
    components, count = ndi.label(mask, structure=_EIGHT)
    if count == 0:
        return mask
    keep = np.bincount(components.ravel()) >= min_px
    keep[0] = False
    return np.asarray(keep[components], dtype=bool)


def filter_by_area(labels: NDArray[np.integer], min_px: float, max_px: float) -> NDArray[np.int32]:
    """Remove labels outside [min_px, max_px] pixels and renumber 1..N keeping their order."""
    labels = np.asarray(labels)
    area = np.bincount(labels.ravel())
    keep = (area >= min_px) & (area <= max_px)
    keep[0] = False
    new_ids = np.zeros(area.size, dtype=np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return np.asarray(new_ids[labels], dtype=np.int32)


def component_peaks(
    height: NDArray[np.floating], components: NDArray[np.integer], footprint_px: int,
    boxes: list[tuple[slice, slice] | None] | None = None,
) -> NDArray[np.bool_]:
    """Local maxima of ``height`` within each connected component (max filter on a disk).

    Pixels of other components never suppress a peak: the filter sees only the
    component itself, everything else counting as -inf. ``boxes``: the components'
    ``find_objects``, when known.
    """
    fp = disk_footprint(footprint_px).astype(np.uint8)
    peaks = np.zeros(components.shape, dtype=bool)
    height = np.asarray(height, dtype=np.float64)
    for index, sl in enumerate(ndi.find_objects(components) if boxes is None else boxes, start=1):
        if sl is None:
            continue
        inside = components[sl] == index
        sub = np.where(inside, height[sl], -np.inf)
        # A max filter with -inf beyond the crop (OpenCV: exact, and a fraction of the cost).
        local_max = cv2.dilate(sub, fp, borderType=cv2.BORDER_CONSTANT, borderValue=-np.inf)
        peaks[sl] |= inside & (sub >= local_max)
    return peaks


def euclidean_distance(mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Distance of every mask pixel to the nearest background pixel of the image (0 outside the mask).

    The exact Euclidean distance transform (as ``scipy.ndimage.distance_transform_edt``,
    bit for bit): OpenCV's exact transform in float32, whose squared distances are
    integers, restored exactly and square-rooted in float64.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    if mask.all() or not mask.any():
        return np.asarray(ndi.distance_transform_edt(mask), dtype=np.float64)
    approx = cv2.distanceTransform(mask.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    if float(approx.max()) >= 1000.0:  # beyond where float32 restores squared distances exactly
        return np.asarray(ndi.distance_transform_edt(mask), dtype=np.float64)
    return np.sqrt(np.rint(np.square(approx, dtype=np.float64)))


def distance_watershed(
    mask: NDArray[np.bool_],
    *,
    sigma_px: float,
    footprint_px: int,
    max_distance_px: float | None = None,
) -> NDArray[np.int32]:
    """Split a binary mask by marker watershed on its smoothed distance transform.

    Markers are the connected plateaus of per-component local maxima (disk of radius
    ``footprint_px``) of the Gaussian-smoothed (``sigma_px``) Euclidean distance.
    ``max_distance_px`` caps the distance transform, so the seeds depend only on
    the mask within that distance (plus the smoothing and footprint radii), not on
    how far a large blob extends. Labels follow the raster order of the markers.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    distance = euclidean_distance(mask)
    if max_distance_px is not None:
        np.minimum(distance, max_distance_px, out=distance)
    smooth = ndi.gaussian_filter(distance, sigma=sigma_px) if sigma_px > 0 else distance
    components, _ = ndi.label(mask, structure=_EIGHT)
    boxes = ndi.find_objects(components)
    peaks = component_peaks(smooth, components, footprint_px, boxes)
    markers, _ = ndi.label(peaks, structure=_EIGHT)
    return component_watershed(-smooth, markers.astype(np.int32), components, boxes)


def component_watershed(
    landscape: NDArray[np.floating], markers: NDArray[np.int32], components: NDArray[np.integer],
    boxes: list[tuple[slice, slice] | None] | None = None,
) -> NDArray[np.int32]:
    """Marker watershed of each connected component on its own.

    A component's result must depend only on the component, so that a tile and the
    full image agree. The flood (skimage) orders pixels by (height, push order); the
    only ties it breaks by heap layout, which depends on everything in the run, are
    between markers' own pixels (all pushed first, at age 0) of equal height. So the
    components whose markers all differ in height are flooded in one run, and each
    component with two markers of exactly equal height in a run of its own. A
    component with one marker (or none) is that marker (or background) whole.
    """
    count = int(components.max()) if components.size else 0
    seeded = np.flatnonzero(markers.ravel())
    ids, first = np.unique(markers.ravel()[seeded], return_index=True)
    marker_comp = np.zeros(int(ids.max()) + 1 if ids.size else 1, np.int64)
    marker_comp[ids] = components.ravel()[seeded[first]]
    comp_of = marker_comp[1:]
    seeds_per_comp = np.bincount(comp_of, minlength=count + 1)
    whole = np.zeros(count + 1, np.int32)
    single = seeds_per_comp[comp_of] == 1
    whole[comp_of[single]] = np.flatnonzero(single).astype(np.int32) + 1
    labels: NDArray[np.int32] = np.asarray(whole[components], dtype=np.int32)
    several = seeds_per_comp > 1
    several[0] = False
    if not several.any():
        return labels
    tied = _tied_components(landscape.ravel()[seeded[first]], marker_comp[ids], several)
    together = several & ~tied
    if together.any():
        inside = together[components]
        flooded = watershed(landscape, np.where(inside, markers, 0), mask=inside)  # type: ignore[no-untyped-call]
        labels[inside] = flooded[inside]
    boxes = ndi.find_objects(components) if boxes is None else boxes
    for index in np.flatnonzero(tied).tolist():
        sl = boxes[index - 1]
        inside = components[sl] == index
        seeds = np.where(inside, markers[sl], 0)
        flooded = watershed(landscape[sl], seeds, mask=inside)  # type: ignore[no-untyped-call]
        labels[sl][inside] = flooded[inside]
    return labels


def _tied_components(
    height: NDArray[np.floating], comp: NDArray[np.int64], several: NDArray[np.bool_]
) -> NDArray[np.bool_]:
    """Components (of those in ``several``) with two markers of exactly equal height."""
    pick = several[comp]
    h, c = height[pick], comp[pick]
    order = np.lexsort((h, c))
    h, c = h[order], c[order]
    same = (c[1:] == c[:-1]) & (h[1:] == h[:-1])
    tied = np.zeros(several.size, bool)
    tied[c[1:][same]] = True
    return tied


def split_instances(mask: NDArray[np.bool_], mpp: float) -> NDArray[np.int32]:
    """The reference post-processing: clean the mask, then split it by distance watershed.

    Opening disk(2), closing disk(2), opening disk(1), closing disk(1); EDT; Gaussian
    sigma 1; per-component local maxima on a disk(7); marker watershed on the negated
    smoothed distance within the cleaned mask. Radii at 0.25 µm/px, scaled to ``mpp``.
    """
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    radii = (scaled_radius_px(2, mpp), scaled_radius_px(1, mpp))
    cleaned = clean_mask(mask, radii)
    return distance_watershed(
        cleaned,
        sigma_px=1.0 * REFERENCE_MPP / mpp,
        footprint_px=scaled_radius_px(7, mpp),
    )
