"""Is a slide a brightfield (transmitted light, e.g. H&E) RGB image?

Brightfield images are light: white glass, and stained tissue that absorbs only part
of the light, so every stain keeps some light in all channels. Fluorescence scans
are dark with saturated, pure-hue signal. On a low-resolution view, ignoring
pure-black padding (max channel <= 3, which some formats use for unscanned areas):

* value V = max(R, G, B): median V < 60 -> dark field;
* saturation S = (max - min) / max: median S > 0.9 -> pure emission colours.

Measured medians (V, S): 30 MoNuSeg H&E crops V 111-241, S 0.16-0.68; CMU-1-Small-
Region 243, 0.01; OS-1-detail 180, 0.32; tcga-cr-7395 221, 0.37; small_16x16 248, 0.04;
test3-DAPI-2-387 (fluorescence) 15, 1.00.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..common.errors import NotBrightfieldError

#: Median max-channel value below which a view is dark field.
MIN_MEDIAN_VALUE = 60.0
#: Median saturation above which a view is pure emission colours.
MAX_MEDIAN_SATURATION = 0.9
#: Pixels whose max channel is at most this are padding, not image.
PADDING_MAX = 3


@dataclass(frozen=True)
class BrightfieldStats:
    """Medians over the non-padding pixels, and the padding fraction."""

    median_value: float
    median_saturation: float
    padding_fraction: float

    @property
    def is_brightfield(self) -> bool:
        return (
            self.padding_fraction < 0.99
            and self.median_value >= MIN_MEDIAN_VALUE
            and self.median_saturation <= MAX_MEDIAN_SATURATION
        )


def brightfield_stats(rgb: NDArray[np.uint8]) -> BrightfieldStats:
    """Statistics of an (H, W, 3) or (N, 3) uint8 view."""
    pixels = np.asarray(rgb)[..., :3].reshape(-1, 3)
    high = pixels.max(axis=1)
    low = pixels.min(axis=1)
    keep = high > PADDING_MAX
    padding = 1.0 - float(keep.mean()) if keep.size else 1.0
    if not keep.any():
        return BrightfieldStats(0.0, 0.0, padding)
    high_k = high[keep].astype(np.float32)
    sat = (high_k - low[keep]) / high_k
    return BrightfieldStats(float(np.median(high_k)), float(np.median(sat)), padding)


def check_brightfield(uri: str, rgb: NDArray[np.uint8]) -> BrightfieldStats:
    """Raise NotBrightfieldError (naming ``uri``) unless the view looks brightfield."""
    stats = brightfield_stats(rgb)
    if stats.is_brightfield:
        return stats
    if stats.padding_fraction >= 0.99:
        why = "the low-resolution view is entirely black"
    elif stats.median_value < MIN_MEDIAN_VALUE:
        why = (f"the low-resolution view is mostly dark (median brightness {stats.median_value:.0f}/255; "
               f"brightfield needs >= {MIN_MEDIAN_VALUE:.0f})")
    else:
        why = (f"the low-resolution view has pure emission colours (median saturation "
               f"{stats.median_saturation:.2f} > {MAX_MEDIAN_SATURATION})")
    raise NotBrightfieldError(uri, f"not a brightfield RGB slide: {why}; looks like a fluorescence scan")
