"""Tile plans at the segmenter's working resolution, and the ownership rule.

The working grid covers the slide at ``seg_mpp``: working pixel (i, j) spans level-0
``[j*s, (j+1)*s) x [i*s, (i+1)*s)`` with ``s = seg_mpp / mpp``. Cores of side
``stride_px`` tile that grid from (0, 0); a tile's window is its core grown by
``margin_px`` on every side (white beyond the slide border), so every window has the
same size and every core the same context. Cores partition the slide: a nucleus
belongs to the one tile whose core holds its centroid, and no merge pass is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..common.errors import ConfigError


@dataclass(frozen=True)
class TileConfig:
    """Tiling at the segmenter's working resolution.

    ``tile_px`` is the edge of the window read for one tile; ``overlap_px`` the width
    of the band neighbouring windows share. Each window owns its *core*: the window
    shrunk by ``overlap_px // 2`` on each side (to the slide border at the edges).
    Cores partition the slide, so a nucleus is reported by exactly one tile: the
    one whose core holds its centroid.
    """

    tile_px: int = 1024
    overlap_px: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.tile_px, int) or self.tile_px < 64:
            raise ConfigError(f"tile_px must be an integer >= 64, got {self.tile_px!r}")
        if not isinstance(self.overlap_px, int) or self.overlap_px < 0 or self.overlap_px % 2:
            raise ConfigError(f"overlap_px must be an even integer >= 0, got {self.overlap_px!r}")
        if self.tile_px - self.overlap_px < 32:
            raise ConfigError(
                f"tile_px ({self.tile_px}) must exceed overlap_px ({self.overlap_px}) by at least 32"
            )

    @property
    def stride_px(self) -> int:
        return self.tile_px - self.overlap_px

    @property
    def margin_px(self) -> int:
        return self.overlap_px // 2


@dataclass(frozen=True)
class Tile:
    """One tile of a plan, in working-grid pixels."""

    index: int
    row: int
    col: int
    #: Window origin (top-left), may be negative at the slide border.
    x_px: int
    y_px: int
    size_px: int
    #: Core rectangle [x0, x1) x [y0, y1), clipped to the working grid.
    core_x0: int
    core_y0: int
    core_x1: int
    core_y1: int

    def owns(self, cx_px: NDArray[np.float64], cy_px: NDArray[np.float64]) -> NDArray[np.bool_]:
        """Which centroids (continuous working-grid coordinates) fall in this tile's core."""
        return (
            (cx_px >= self.core_x0)
            & (cx_px < self.core_x1)
            & (cy_px >= self.core_y0)
            & (cy_px < self.core_y1)
        )


@dataclass(frozen=True)
class TilePlan:
    """All tiles of a slide that touch tissue, in raster order."""

    grid_width_px: int
    grid_height_px: int
    scale: float
    tiles: tuple[Tile, ...]
    total_tiles: int
    tile_px: int
    overlap_px: int

    @property
    def coverage(self) -> float:
        """Share of the grid's tiles kept (tiles on tissue / all tiles)."""
        return len(self.tiles) / self.total_tiles if self.total_tiles else 0.0


def working_grid(width_px: int, height_px: int, scale: float) -> tuple[int, int]:
    """Size of the working grid for a level-0 size and scale = seg_mpp / mpp."""
    return max(1, math.ceil(width_px / scale - 1e-9)), max(1, math.ceil(height_px / scale - 1e-9))


def plan_tiles(
    width_px: int,
    height_px: int,
    scale: float,
    tiles: TileConfig,
    tissue: NDArray[np.bool_] | None = None,
    tissue_scale: float | None = None,
) -> TilePlan:
    """Plan the tiles of a level-0 ``width_px x height_px`` slide at ``scale``.

    ``tissue`` is a mask of the whole slide whose pixel k spans level-0
    ``[k * tissue_scale, (k + 1) * tissue_scale)`` (default: the mask's width spans the
    slide's); tiles whose core holds no tissue pixel are dropped. ``None`` keeps all.
    """
    grid_w, grid_h = working_grid(width_px, height_px, scale)
    stride, margin = tiles.stride_px, tiles.margin_px
    n_cols, n_rows = math.ceil(grid_w / stride), math.ceil(grid_h / stride)
    mask_scale = 1.0
    if tissue is not None:
        mask_scale = tissue_scale if tissue_scale is not None else width_px / tissue.shape[1]
    kept: list[Tile] = []
    for row in range(n_rows):
        for col in range(n_cols):
            x0, y0 = col * stride, row * stride
            x1, y1 = min(x0 + stride, grid_w), min(y0 + stride, grid_h)
            if tissue is not None and not _has_tissue(tissue, (x0, y0, x1, y1), scale / mask_scale):
                continue
            kept.append(
                Tile(len(kept), row, col, x0 - margin, y0 - margin, tiles.tile_px, x0, y0, x1, y1)
            )
    return TilePlan(grid_w, grid_h, scale, tuple(kept), n_rows * n_cols, tiles.tile_px, tiles.overlap_px)


def _has_tissue(tissue: NDArray[np.bool_], core: tuple[int, int, int, int], factor: float) -> bool:
    """Whether the mask has tissue under a core rectangle; ``factor`` = mask px per grid px."""
    x0, y0, x1, y1 = core
    mx0, my0 = int(math.floor(x0 * factor)), int(math.floor(y0 * factor))
    mx1, my1 = max(mx0 + 1, math.ceil(x1 * factor)), max(my0 + 1, math.ceil(y1 * factor))
    return bool(tissue[my0:my1, mx0:mx1].any())


def label_centroids(labels: NDArray[np.integer]) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """Label values present and their centroids (x, y) in continuous pixel coordinates."""
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    values = flat[where]
    counts = np.bincount(values)
    present = np.flatnonzero(counts)
    if present.size == 0:
        empty = np.zeros(0)
        return present.astype(np.int64), empty, empty
    rows, cols = np.divmod(where, labels.shape[1])
    sum_y = np.bincount(values, weights=rows, minlength=counts.size)
    sum_x = np.bincount(values, weights=cols, minlength=counts.size)
    n = counts[present].astype(np.float64)
    return present.astype(np.int64), sum_x[present] / n + 0.5, sum_y[present] / n + 0.5


def keep_owned(labels: NDArray[np.integer], tile: Tile) -> NDArray[np.int32]:
    """Labels of a tile window with every nucleus not owned by the tile set to 0."""
    values, cx, cy = label_centroids(labels)
    owned = values[tile.owns(cx + tile.x_px, cy + tile.y_px)]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.int32)
    lut[owned] = owned.astype(np.int32)
    return np.asarray(lut[labels], dtype=np.int32)
