"""Unsupervised classical nucleus segmenter: haematoxylin threshold + distance watershed.

``fit`` computes one haematoxylin optical-density threshold per slide: Otsu's
threshold of the haematoxylin OD of tissue pixels in a view at ``fit_mpp`` µm/px
(finer inputs are block-averaged down to it). ``segment`` applies that threshold
to a tile and never looks at tile-level statistics: smoothing, hole filling,
opening, a distance-transform watershed split and area filters are all local
operations with sizes in µm, so a nucleus whose centroid lies in a tile's core is
segmented the same whatever lies more than ``context_um`` beyond it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from ..color.stain import hematoxylin_od, rgb_to_od
from ..common.errors import ConfigError
from .instances import (
    dilate_disk,
    disk_footprint,
    distance_watershed,
    erode_disk,
    fill_small_holes,
    filter_by_area,
    remove_small_components,
)
from .protocol import SlideStats

log = logging.getLogger(__name__)

THRESHOLD_KEY = "h_threshold_od"
#: Parameters for which 0 means "skip this step".
_MAY_BE_ZERO = frozenset(
    {"tissue_od", "smooth_sigma_um", "max_hole_um2", "open_radius_um", "min_component_um2",
     "split_sigma_um", "min_area_um2"}
)


@dataclass(frozen=True)
class ClassicalParams:
    """Parameters of the classical segmenter; every size is physical (µm, µm²)."""

    #: Default working resolution (µm/px) of ``segment``.
    working_mpp: float = 0.5
    #: Resolution (µm/px) at which ``fit`` computes the Otsu threshold.
    fit_mpp: float = 2.0
    #: A pixel is tissue for ``fit`` if its summed RGB optical density exceeds this.
    tissue_od: float = 0.2
    #: Multiplier applied to the Otsu threshold.
    threshold_scale: float = 1.0
    #: Threshold used when the fit view holds too little tissue.
    fallback_threshold_od: float = 0.35
    #: Gaussian sigma applied to haematoxylin OD before thresholding.
    smooth_sigma_um: float = 0.25
    #: Enclosed holes up to this area are filled (vesicular nuclei).
    max_hole_um2: float = 50.0
    #: Radius of the binary opening that removes thin strands.
    open_radius_um: float = 0.5
    #: Connected components smaller than this are dropped before splitting.
    min_component_um2: float = 5.0
    #: Gaussian sigma applied to the distance transform before peak finding.
    split_sigma_um: float = 0.25
    #: Radius of the disk on which a distance peak must be maximal to seed a nucleus.
    split_footprint_um: float = 1.75
    #: Nuclei outside [min_area_um2, max_area_um2] are discarded.
    min_area_um2: float = 8.0
    max_area_um2: float = 150.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            if value < 0 or (value == 0 and name not in _MAY_BE_ZERO):
                raise ConfigError(f"{name} must be {'>= 0' if name in _MAY_BE_ZERO else '> 0'}, got {value!r}")
        if self.min_area_um2 >= self.max_area_um2:
            raise ConfigError("min_area_um2 must be smaller than max_area_um2")

    @property
    def max_radius_um(self) -> float:
        """Radius of a disc of the largest accepted nucleus area."""
        return math.sqrt(self.max_area_um2 / math.pi)

    def digest(self) -> str:
        """First 12 hex digits of the SHA-256 of the parameters as sorted JSON."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _check_mpp(mpp: float) -> None:
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive finite number, got {mpp!r}")


def block_mean(rgb: NDArray[np.uint8], factor: int) -> NDArray[np.uint8]:
    """Average ``factor`` x ``factor`` blocks (edge remainder dropped), rounded to uint8."""
    if factor <= 1:
        return rgb
    h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
    if h == 0 or w == 0:
        return rgb
    blocks = rgb[:h, :w].reshape(h // factor, factor, w // factor, factor, 3)
    return np.asarray(np.rint(blocks.mean(axis=(1, 3))), dtype=np.uint8)


class ClassicalSegmenter:
    """Haematoxylin colour deconvolution, one global Otsu threshold, distance watershed."""

    name = "classical"
    grid_px = 1

    def __init__(self, params: ClassicalParams | None = None) -> None:
        self.params = params if params is not None else ClassicalParams()
        self.model_id = self.params.digest()
        self.mpp = self.params.working_mpp
        p = self.params
        # A nucleus spans at most one max-size diameter; the filters reach a little further.
        sigma_um = max(p.smooth_sigma_um, p.split_sigma_um)
        margin_um = 4.0 * sigma_um + p.split_footprint_um + 2.0 * p.open_radius_um
        self.context_um: float = 2.0 * p.max_radius_um + margin_um

    def __repr__(self) -> str:
        return f"ClassicalSegmenter({self.params!r})"

    def precision(self, device: str) -> str:
        """float64 NumPy/SciPy on the CPU, whatever device the run names."""
        return "fp64"

    def fit(self, rgb: NDArray[np.uint8], mpp: float) -> SlideStats:
        """Otsu threshold of haematoxylin OD over tissue pixels of a ~``fit_mpp`` view."""
        _check_mpp(mpp)
        p = self.params
        factor = int(round(p.fit_mpp / mpp))
        view = block_mean(rgb, factor) if factor >= 2 else rgb
        view_mpp = mpp * factor if factor >= 2 else mpp
        if view_mpp > 1.5 * p.fit_mpp:
            log.warning(
                "fit view at %.3g µm/px is coarser than fit_mpp %.3g; threshold may be biased",
                view_mpp,
                p.fit_mpp,
            )
        h = hematoxylin_od(view)
        tissue = rgb_to_od(view).sum(axis=2) > p.tissue_od
        n_tissue = int(tissue.sum())
        values = h[tissue]
        if n_tissue < 64 or float(values.max()) - float(values.min()) < 1e-6:
            log.warning("fit view has %d tissue pixels; using the fallback threshold", n_tissue)
            threshold, fallback = p.fallback_threshold_od, 1.0
        else:
            otsu = float(threshold_otsu(values))  # type: ignore[no-untyped-call]
            threshold, fallback = otsu * p.threshold_scale, 0.0
        return SlideStats(
            values={
                THRESHOLD_KEY: threshold,
                "tissue_fraction": n_tissue / max(tissue.size, 1),
                "fit_view_mpp": float(view_mpp),
                "threshold_fallback": fallback,
            }
        )

    def foreground(self, rgb: NDArray[np.uint8], mpp: float, stats: SlideStats) -> NDArray[np.bool_]:
        """The cleaned binary nucleus mask (before splitting)."""
        _check_mpp(mpp)
        if THRESHOLD_KEY not in stats.values:
            raise ValueError(f"stats lack {THRESHOLD_KEY!r}; compute them with ClassicalSegmenter.fit")
        p = self.params
        px2 = mpp * mpp
        h = hematoxylin_od(rgb)
        if p.smooth_sigma_um > 0:
            h = ndi.gaussian_filter(h, sigma=p.smooth_sigma_um / mpp)
        mask = h > stats.values[THRESHOLD_KEY]
        if p.max_hole_um2 > 0:
            mask = fill_small_holes(mask, p.max_hole_um2 / px2)
        radius = int(round(p.open_radius_um / mpp))
        if radius >= 1:
            fp = disk_footprint(radius)
            mask = dilate_disk(erode_disk(mask, fp), fp)  # opening; outside counts as foreground
        return remove_small_components(mask, p.min_component_um2 / px2)

    def predict(self, rgb: NDArray[np.uint8], mpp: float, stats: SlideStats) -> NDArray[np.bool_]:
        """The cleaned nucleus mask (``foreground``)."""
        return self.foreground(rgb, mpp, stats)

    def predict_batch(
        self, tiles: Sequence[NDArray[np.uint8]], mpp: float, stats: SlideStats
    ) -> list[NDArray[np.bool_]]:
        """``predict`` of each tile (thresholding gains nothing from batching)."""
        return [self.foreground(t, mpp, stats) for t in tiles]

    def segment(self, rgb: NDArray[np.uint8], mpp: float, stats: SlideStats) -> NDArray[np.int32]:
        """Instance labels (H, W) int32, numbered in raster order of their seeds."""
        return self.postprocess(self.foreground(rgb, mpp, stats), mpp, stats)

    def postprocess(self, evidence: NDArray[np.bool_], mpp: float, stats: SlideStats) -> NDArray[np.int32]:
        """Distance-watershed split of the mask, then the nucleus area filter."""
        _check_mpp(mpp)
        p = self.params
        mask = np.asarray(evidence, dtype=bool)
        labels = distance_watershed(
            mask,
            sigma_px=p.split_sigma_um / mpp,
            footprint_px=max(1, int(round(p.split_footprint_um / mpp))),
            max_distance_px=p.max_radius_um / mpp,
        )
        px2 = mpp * mpp
        return filter_by_area(labels, p.min_area_um2 / px2, p.max_area_um2 / px2)
