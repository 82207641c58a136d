"""What a slide file says about itself: properties, pixel layout, level geometry, µm/px.

Each reader refuses what it cannot trust with a typed ``SlideError`` naming the file
(storage failures met while reading lazily loaded structures keep their own type).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from tiffslide import TiffSlide

from ..common.errors import (
    NotBrightfieldError,
    SlideError,
    SlideFormatError,
    SlideSizeError,
    UnknownResolutionError,
)
from .remote import io_error

#: Plausible level-0 pixel sizes (µm/px); anything else in metadata is refused.
MPP_RANGE = (0.05, 50.0)
#: Largest plausible slide side in pixels.
MAX_SIDE_PX = 500_000


def properties(uri: str, ts: TiffSlide) -> dict[str, Any]:
    try:
        if len(ts.ts_tifffile.pages) == 0:
            raise SlideFormatError(uri, "contains no readable image (empty or truncated file)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            props = dict(ts.properties)
            _ = ts.level_dimensions
    except (MemoryError, SlideError):
        raise
    except Exception as exc:
        raise io_error(uri, exc, SlideFormatError, "unreadable slide structure") from exc
    return props

def check_pixels(uri: str, ts: TiffSlide, props: Mapping[str, Any]) -> None:
    """RGB(A) uint8 pixels, or NotBrightfieldError."""
    axes = str(props.get("tiffslide.series-axes"))
    try:
        series = ts.ts_tifffile.series[int(props.get("tiffslide.series-index") or 0)]
        dtype, shape = np.dtype(series.dtype), tuple(series.levels[0].shape)
    except Exception as exc:
        raise io_error(uri, exc, SlideFormatError, "unreadable image series") from exc
    samples = {"YXS": shape[-1], "CYX": shape[0], "YX": 1}.get(axes)
    if samples is None:
        raise SlideFormatError(uri, f"unsupported image layout {axes!r} {shape}")
    if samples not in (3, 4) or dtype != np.uint8:
        raise NotBrightfieldError(uri, f"pixels are {samples}-channel {dtype}, not 8-bit RGB brightfield")

def level_scales(uri: str, ts: TiffSlide) -> tuple[tuple[float, float], ...]:
    """Per level (x, y) level-0 px per level px; integer when the level is an integer reduction."""
    dims = [(int(w), int(h)) for w, h in ts.level_dimensions]
    w0, h0 = dims[0]
    if not (0 < w0 <= MAX_SIDE_PX and 0 < h0 <= MAX_SIDE_PX):
        raise SlideSizeError(uri, f"declared size {w0}x{h0} px is outside 1..{MAX_SIDE_PX} px a side")
    scales: list[tuple[float, float]] = []
    for level, (w, h) in enumerate(dims):
        if not (0 < w <= w0 and 0 < h <= h0):
            raise SlideSizeError(uri, f"level {level} size {w}x{h} px does not fit level 0 ({w0}x{h0})")
        sx, sy = level_scale(w0, h0, w, h)
        # a uniform reduction: either axis' size follows from the other axis' scale, up to rounding
        if abs(w0 / sy - w) > 1.5 and abs(h0 / sx - h) > 1.5:
            raise SlideSizeError(uri, f"level {level} ({w}x{h}) is not a uniform reduction of {w0}x{h0}")
        if scales and (sx + sy) <= sum(scales[-1]):
            raise SlideSizeError(uri, f"level {level} is not coarser than level {level - 1}")
        scales.append((sx, sy))
    return tuple(scales)

def level_scale(w0: int, h0: int, w: int, h: int) -> tuple[float, float]:
    """(k, k) when the level is level 0 reduced by an integer k (sizes floored or ceiled), else the ratios."""
    k = round((w0 + h0) / (w + h))
    if k >= 1 and w in (w0 // k, -(-w0 // k)) and h in (h0 // k, -(-h0 // k)):
        return float(k), float(k)
    return w0 / w, h0 / h

def resolution(uri: str, props: Mapping[str, Any], override: float | None) -> tuple[float, str]:
    if override is not None:
        return float(override), "override"
    mx, my = float_or_none(props.get("tiffslide.mpp-x")), float_or_none(props.get("tiffslide.mpp-y"))
    values = [v for v in (mx, my) if v is not None]
    if not values:
        raise UnknownResolutionError(uri, "resolution unknown: the file declares no µm/px; pass --mpp")
    mpp = sum(values) / len(values)
    if not all(MPP_RANGE[0] <= v <= MPP_RANGE[1] for v in values):
        raise UnknownResolutionError(
            uri, f"resolution unknown: declared {values} µm/px is implausible "
                 f"(outside {MPP_RANGE[0]}-{MPP_RANGE[1]}); pass --mpp")
    if max(values) > 1.02 * min(values):
        raise SlideFormatError(uri, f"non-square pixels ({mx} x {my} µm) are not supported")
    return mpp, "metadata"

def int_or_zero(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0

def float_or_none(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None
