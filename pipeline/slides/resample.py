"""Exact-geometry resampling of RGB rasters onto a regular output grid.

One axis at a time, a source raster (pixel k covers [k, k+1)) is mapped onto
output pixels of size ``step`` source pixels whose first edge is at ``start``:
output pixel j covers [start + j*step, start + (j+1)*step).

* ``step`` >= 1 (downsampling): area average, each source pixel weighted by its
  overlap with the output pixel (antialiased; an aligned integer step is a block mean);
* ``step`` < 1 (upsampling): bilinear interpolation at output pixel centres.

Both are linear, separable and applied as sparse matrices in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

#: Tolerance for treating a step or an offset as an integer.
_EPS = 1e-9
#: Source elements (rows x width x channels) resampled per strip.
_STRIP_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class AxisMap:
    """Source pixels [src_lo, src_hi) an axis of ``n`` output pixels needs, and how.

    ``kind`` is "copy" (step 1, integer start), "block" (integer step and start),
    or "sparse" (``weights`` is an (n, src_hi - src_lo) CSR matrix).
    """

    src_lo: int
    src_hi: int
    n: int
    step: float
    kind: str
    weights: sp.csr_matrix | None = None

    def part(self, r0: int, r1: int) -> tuple[int, int, AxisMap]:
        """Output pixels [r0, r1) as a map of their own, with its source rows [lo, hi) relative to src_lo."""
        n = r1 - r0
        if self.kind != "sparse":
            k = int(self.step)
            return r0 * k, r1 * k, AxisMap(self.src_lo + r0 * k, self.src_lo + r1 * k, n, self.step, self.kind)
        assert self.weights is not None
        rows = self.weights[r0:r1]
        lo, hi = int(rows.indices.min()), int(rows.indices.max()) + 1
        sub = sp.csr_matrix(rows[:, lo:hi])
        return lo, hi, AxisMap(self.src_lo + lo, self.src_lo + hi, n, self.step, "sparse", sub)


def _is_int(value: float) -> bool:
    return abs(value - round(value)) < _EPS * max(1.0, abs(value))


def axis_map(start: float, step: float, n: int) -> AxisMap:
    """The resampling of one axis: ``n`` output pixels of ``step`` source px from ``start``."""
    if n < 1 or not step > 0:
        raise ValueError(f"need n >= 1 and step > 0, got n={n}, step={step}")
    if _is_int(step) and _is_int(start):
        k, lo = int(round(step)), int(round(start))
        return AxisMap(lo, lo + n * k, n, float(k), "copy" if k == 1 else "block")
    if step >= 1.0:
        return _area_map(start, step, n)
    return _bilinear_map(start, step, n)


def _area_map(start: float, step: float, n: int) -> AxisMap:
    j = np.arange(n, dtype=np.float64)
    a, b = start + j * step, start + (j + 1) * step
    lo, hi = math.floor(a[0]), math.ceil(b[-1] - _EPS)
    taps = math.ceil(step) + 1
    k = np.floor(a).astype(np.int64)[:, None] + np.arange(taps)
    w = np.minimum(b[:, None], k + 1) - np.maximum(a[:, None], k)
    keep = (w > _EPS) & (k < hi)
    rows = np.broadcast_to(np.arange(n)[:, None], k.shape)[keep]
    weights = sp.csr_matrix(((w[keep] / step).astype(np.float32), (rows, k[keep] - lo)), shape=(n, hi - lo))
    return AxisMap(lo, hi, n, step, "sparse", weights)


def _bilinear_map(start: float, step: float, n: int) -> AxisMap:
    centre = start + (np.arange(n, dtype=np.float64) + 0.5) * step - 0.5
    k0 = np.floor(centre).astype(np.int64)
    t = centre - k0
    lo, hi = int(k0[0]), int(k0[-1]) + 2
    rows = np.repeat(np.arange(n), 2)
    cols = np.stack([k0, k0 + 1], axis=1).ravel() - lo
    vals = np.stack([1.0 - t, t], axis=1).ravel().astype(np.float32)
    weights = sp.csr_matrix((vals, (rows, cols)), shape=(n, hi - lo))
    return AxisMap(lo, hi, n, step, "sparse", weights)


def apply(src: NDArray[np.uint8], ymap: AxisMap, xmap: AxisMap) -> NDArray[np.uint8]:
    """Resample ``src`` (ymap.src_hi - ymap.src_lo, xmap.src_hi - xmap.src_lo, C) to (ny, nx, C).

    Works in strips of output rows so that float intermediates stay small.
    """
    if src.shape[:2] != (ymap.src_hi - ymap.src_lo, xmap.src_hi - xmap.src_lo):
        raise ValueError(f"source shape {src.shape[:2]} does not match the axis maps")
    if ymap.kind in ("copy", "block") and xmap.kind in ("copy", "block"):
        return block_mean(src, int(ymap.step), int(xmap.step))
    out = np.empty((ymap.n, xmap.n, src.shape[2]), np.uint8)
    rows = max(1, int(_STRIP_ELEMENTS / (src.shape[1] * src.shape[2] * max(ymap.step, 1.0))))
    for r0 in range(0, ymap.n, rows):
        r1 = min(ymap.n, r0 + rows)
        lo, hi, part = ymap.part(r0, r1)
        acc = _apply_rows(src[lo:hi], part)  # (r1 - r0, W, C): input rows (copy) or float32
        acc = np.ascontiguousarray(acc.transpose(1, 0, 2))  # (W, rows, C)
        acc = _apply_rows(acc, xmap)  # (nx, rows, C)
        if acc.dtype != np.uint8:
            # weights are convex, so values stay within [0, 255]; + 0.5 then truncation rounds
            acc += np.float32(0.5)
        out[r0:r1] = acc.transpose(1, 0, 2)
    return out


def _apply_rows(arr: NDArray[Any], amap: AxisMap) -> NDArray[Any]:
    """Resample the first axis of a (N, M, C) array (uint8 stays uint8 only for "copy")."""
    n_src, m, c = arr.shape
    if amap.kind == "copy":
        return arr
    if amap.kind == "block":
        summed = _strided_sum(arr, int(amap.step), 0, np.float32)
        summed *= np.float32(1.0 / amap.step)
        return summed
    assert amap.weights is not None
    flat = arr.reshape(n_src, m * c)
    if flat.dtype != np.float32:
        flat = flat.astype(np.float32)
    res = amap.weights @ flat
    return np.asarray(res, dtype=np.float32).reshape(amap.n, m, c)


def _strided_sum(arr: NDArray[Any], k: int, axis: int, dtype: type[np.generic]) -> NDArray[Any]:
    """Sums of consecutive groups of ``k`` along ``axis`` (0 or 1), accumulated in ``dtype``."""
    total = (arr[0::k] if axis == 0 else arr[:, 0::k]).astype(dtype)
    for i in range(1, k):
        total += arr[i::k] if axis == 0 else arr[:, i::k]
    return total


def block_mean(src: NDArray[np.uint8], ky: int, kx: int) -> NDArray[np.uint8]:
    """Mean of ky x kx blocks, rounded half up (identity when ky = kx = 1)."""
    if ky == 1 and kx == 1:
        return src
    if src.shape[0] % ky or src.shape[1] % kx:
        raise ValueError(f"shape {src.shape[:2]} is not a multiple of the blocks ({ky}, {kx})")
    area = ky * kx
    wide = np.uint16 if area * 255 + area // 2 <= np.iinfo(np.uint16).max else np.uint32
    rows: NDArray[Any] = src.astype(wide) if ky == 1 else _strided_sum(src, ky, 0, wide)
    total: NDArray[Any] = rows if kx == 1 else _strided_sum(rows, kx, 1, wide)
    return np.asarray((total + area // 2) // area, dtype=np.uint8)
