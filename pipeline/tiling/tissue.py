"""Tissue detection on a low-resolution RGB view (a few µm/px).

A pixel's tissue signal is its largest per-channel optical density (glass is
~0.02, pale eosin ~0.1, H&E tissue 0.2-1). The threshold is Otsu's on the lightly
smoothed signal, clamped to [0.06, 0.15] so that an all-glass view gives no tissue
and an all-tissue view gives all tissue. The mask is then closed, specks below
``min_object_um2`` are removed and holes below ``max_hole_um2`` are filled; all
sizes are in µm, converted with ``mpp``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

#: Bounds of the optical-density threshold between glass and tissue.
OD_THRESHOLD_RANGE = (0.06, 0.15)


def tissue_signal(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Max over channels of the optical density -log10((I + 1) / 256)."""
    darkest = np.asarray(rgb)[..., :3].min(axis=-1).astype(np.float32)
    return np.asarray(-np.log10((darkest + np.float32(1.0)) / np.float32(256.0)), dtype=np.float32)


def _disk(radius: int) -> NDArray[np.bool_]:
    r = np.arange(-radius, radius + 1)
    return np.asarray((r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius + radius)


def _remove_small(mask: NDArray[np.bool_], max_px: float, keep_border: bool) -> NDArray[np.bool_]:
    """Drop components of ``mask`` with at most ``max_px`` pixels (optionally never those touching the border)."""
    labels, n = ndi.label(mask)
    if n == 0 or max_px < 1:
        return mask
    sizes = np.bincount(labels.ravel())
    small = sizes <= max_px
    small[0] = False
    if keep_border:
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        small[edge] = False
    return np.asarray(mask & ~small[labels])


def tissue_mask(rgb: NDArray[np.uint8], mpp: float, *, min_object_um2: float = 10_000.0,
                max_hole_um2: float = 5_000.0, smooth_um: float = 4.0) -> NDArray[np.bool_]:
    """Boolean tissue mask (H, W) of an RGB view at ``mpp`` µm/px."""
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be positive, got {mpp}")
    signal = tissue_signal(rgb)
    if signal.size == 0:
        return np.zeros(signal.shape, bool)
    sigma_px = smooth_um / mpp
    if sigma_px >= 0.3:
        signal = ndi.gaussian_filter(signal, sigma_px, mode="nearest")
    lo, hi = OD_THRESHOLD_RANGE
    threshold = hi if float(np.ptp(signal)) < 1e-6 else float(np.clip(threshold_otsu(signal), lo, hi))  # type: ignore[no-untyped-call]
    mask = signal > threshold
    radius = int(round(8.0 / mpp))
    if radius >= 1 and mask.any():
        padded = np.pad(mask, radius, mode="edge")
        mask = ndi.binary_closing(padded, structure=_disk(radius))[radius:-radius, radius:-radius]
    px_area = mpp * mpp
    mask = _remove_small(mask, min_object_um2 / px_area, keep_border=False)
    holes = _remove_small(~mask, max_hole_um2 / px_area, keep_border=True)
    return np.asarray(~holes)


def tissue_area_mm2(mask: NDArray[np.bool_], mpp: float) -> float:
    """Area of the mask in mm² (``mpp`` µm/px)."""
    return float(np.count_nonzero(mask)) * mpp * mpp / 1e6
