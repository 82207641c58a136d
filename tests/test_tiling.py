"""Tile plans partition the slide; ownership assigns each centroid to exactly one tile."""

from __future__ import annotations

import numpy as np
import pytest

from nucleiscope.pipeline.common.errors import ConfigError
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.tiling.plan import TileConfig, keep_owned, label_centroids, plan_tiles, working_grid


def test_cores_partition_the_grid() -> None:
    plan = plan_tiles(5000, 3001, 2.0, TileConfig(256, 64))
    assert (plan.grid_width_px, plan.grid_height_px) == (2500, 1501)
    cover = np.zeros((plan.grid_height_px, plan.grid_width_px), dtype=np.int32)
    for tile in plan.tiles:
        assert tile.size_px == 256
        assert tile.core_x0 - tile.x_px == 32 and tile.core_y0 - tile.y_px == 32
        cover[tile.core_y0 : tile.core_y1, tile.core_x0 : tile.core_x1] += 1
    assert cover.min() == 1 and cover.max() == 1
    assert len(plan.tiles) == plan.total_tiles == 14 * 8


def test_every_point_owned_once() -> None:
    plan = plan_tiles(1000, 700, 1.0, TileConfig(200, 40))
    rng = np.random.default_rng(0)
    xs, ys = rng.uniform(0, 1000, 5000), rng.uniform(0, 700, 5000)
    owners = np.zeros(5000, dtype=int)
    for tile in plan.tiles:
        owners += tile.owns(xs, ys)
    assert np.all(owners == 1)


def test_tissue_mask_drops_empty_tiles() -> None:
    tissue = np.zeros((10, 10), dtype=bool)
    tissue[:5, :5] = True  # top-left quarter of the slide only
    plan = plan_tiles(4000, 4000, 1.0, TileConfig(1064, 64), tissue)
    assert plan.total_tiles == 16
    assert {(t.row, t.col) for t in plan.tiles} == {(r, c) for r in range(2) for c in range(2)}
    assert plan.coverage == pytest.approx(0.25)


def test_working_grid_rounds_up() -> None:
    assert working_grid(2220, 2967, 0.5 / 0.499) == (2216, 2962)
    assert working_grid(16, 16, 8.0) == (2, 2)


def test_centroids_and_ownership() -> None:
    labels = np.zeros((20, 20), dtype=np.int32)
    labels[2:4, 2:6] = 3  # centroid (4.0, 3.0)
    labels[15:19, 15:17] = 7  # centroid (16.0, 17.0)
    values, cx, cy = label_centroids(labels)
    assert values.tolist() == [3, 7]
    assert cx.tolist() == [4.0, 16.0] and cy.tolist() == [3.0, 17.0]
    plan = plan_tiles(40, 40, 1.0, TileConfig(64, 0))
    owned = keep_owned(labels, plan.tiles[0])
    assert set(np.unique(owned)) == {0, 3, 7}
    small = plan_tiles(40, 40, 1.0, TileConfig(96, 64))  # stride 32: core [0, 32)
    first = small.tiles[0]
    assert first.x_px == -32
    shifted = np.zeros((96, 96), dtype=np.int32)
    shifted[20:40, 20:40] = labels  # grid x = window x - 32: centroids at -8 (out) and 4 (in)
    assert set(np.unique(keep_owned(shifted, first))) == {0, 7}


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        TileConfig(256, 240)
    with pytest.raises(ConfigError):
        TileConfig(256, 33)
    with pytest.raises(ConfigError):
        ExtractConfig(segmenter="attention")
    with pytest.raises(ConfigError):
        ExtractConfig(mpp_override=-1.0)
    assert ExtractConfig().tiles(41).overlap_px == 82
    assert ExtractConfig(overlap_px=100).tiles(41).overlap_px == 100
