"""From a binary nucleus mask to instance labels (method.md, "Inference and post-processing").

Radii are defined at the reference 0.25 µm/px and scaled by 0.25 / mpp (at least
1 px), so the same physical structure sizes are used at any working resolution.
Labels are numbered in raster order of their watershed markers, so the output is
deterministic and depends only on the image content.
"""

from __future__ import annotations

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
        out = _dilate(_erode(out, fp), fp)
        out = _erode(_dilate(out, fp), fp)
    return out


def _erode(mask: NDArray[np.bool_], fp: NDArray[np.bool_]) -> NDArray[np.bool_]:
    # Outside the image counts as foreground, so objects cut by the border are not eroded.
    return np.asarray(ndi.binary_erosion(mask, structure=fp, border_value=1), dtype=bool)


def _dilate(mask: NDArray[np.bool_], fp: NDArray[np.bool_]) -> NDArray[np.bool_]:
    return np.asarray(ndi.binary_dilation(mask, structure=fp, border_value=0), dtype=bool)


def fill_small_holes(mask: NDArray[np.bool_], max_hole_px: float) -> NDArray[np.bool_]:
    """Fill enclosed background regions of at most ``max_hole_px`` pixels (8-connected objects)."""
    mask = np.asarray(mask, dtype=bool)
    holes = ndi.binary_fill_holes(mask) & ~mask
    hole_labels, count = ndi.label(holes)
    if count == 0:
        return mask
    small = np.bincount(hole_labels.ravel()) <= max_hole_px
    small[0] = False
    return np.asarray(mask | small[hole_labels], dtype=bool)


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
    height: NDArray[np.floating], components: NDArray[np.integer], footprint_px: int
) -> NDArray[np.bool_]:
    """Local maxima of ``height`` within each connected component (max filter on a disk).

    Pixels of other components never suppress a peak: the filter sees only the
    component itself, everything else counting as -inf.
    """
    fp = disk_footprint(footprint_px)
    peaks = np.zeros(components.shape, dtype=bool)
    for index, sl in enumerate(ndi.find_objects(components), start=1):
        if sl is None:
            continue
        inside = components[sl] == index
        sub = np.where(inside, height[sl], -np.inf)
        local_max = ndi.maximum_filter(sub, footprint=fp, mode="constant", cval=-np.inf)
        peaks[sl] |= inside & (sub >= local_max)
    return peaks


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
    distance = ndi.distance_transform_edt(mask)
    if max_distance_px is not None:
        np.minimum(distance, max_distance_px, out=distance)
    smooth = ndi.gaussian_filter(distance, sigma=sigma_px) if sigma_px > 0 else distance
    components, _ = ndi.label(mask, structure=_EIGHT)
    peaks = component_peaks(smooth, components, footprint_px)
    markers, _ = ndi.label(peaks, structure=_EIGHT)
    return component_watershed(-smooth, markers.astype(np.int32), components)


def component_watershed(
    landscape: NDArray[np.floating], markers: NDArray[np.int32], components: NDArray[np.integer]
) -> NDArray[np.int32]:
    """Marker watershed run separately inside each connected component.

    One global run would break ties between equal heights by heap order, which
    depends on the whole image; per component, the result depends only on the
    component itself, so a tile and the full image agree.
    """
    labels = np.zeros(components.shape, dtype=np.int32)
    for index, sl in enumerate(ndi.find_objects(components), start=1):
        if sl is None:
            continue
        inside = components[sl] == index
        seeds = np.where(inside, markers[sl], 0)
        if int(seeds.max()) == int(seeds[seeds > 0].min(initial=seeds.max())):
            labels[sl][inside] = seeds.max()  # one seed (or none): the component is one nucleus
            continue
        flooded = watershed(landscape[sl], seeds, mask=inside)  # type: ignore[no-untyped-call]
        labels[sl][inside] = flooded[inside]
    return labels


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
