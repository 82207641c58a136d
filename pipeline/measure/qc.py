"""QC picture of a slide: its thumbnail with every nucleus outline drawn on it."""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray
from PIL import Image

from ..common.storage import check_slide_id, write_bytes

#: Outline colour (RGB): green contrasts with both H&E stains.
QC_COLOUR: tuple[int, int, int] = (0, 255, 0)
#: Outlines whose thumbnail extent is below this many pixels become a one-pixel dot.
MIN_OUTLINE_PX = 2.0


def wkb_exterior(data: bytes) -> NDArray[np.float64]:
    """Exterior ring (N, 2) x, y of a WKB Polygon (either byte order)."""
    if len(data) < 13:
        raise ValueError("WKB too short for a polygon")
    order = "<" if data[0] == 1 else ">"
    geom_type, rings = struct.unpack_from(f"{order}II", data, 1)
    if geom_type != 3:
        raise ValueError(f"expected a WKB Polygon (type 3), got type {geom_type}")
    if rings == 0:
        return np.zeros((0, 2), np.float64)
    (count,) = struct.unpack_from(f"{order}I", data, 9)
    coords = np.frombuffer(data, dtype=f"{order}f8", count=2 * count, offset=13)
    return coords.reshape(count, 2).astype(np.float64)


class QcCanvas:
    """Draws nuclei outlines onto a copy of a slide thumbnail.

    ``level0_size`` is the slide's (width_px, height_px) at level 0; the thumbnail
    (H, W, 3) uint8 covers the whole slide, so level-0 x maps to x * W / width_px.
    """

    def __init__(self, thumbnail: NDArray[np.uint8], level0_size: tuple[int, int]) -> None:
        if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or thumbnail.dtype != np.uint8:
            raise ValueError(f"thumbnail must be (H, W, 3) uint8, got {thumbnail.shape} {thumbnail.dtype}")
        width, height = level0_size
        if width <= 0 or height <= 0:
            raise ValueError(f"level0_size must be positive, got {level0_size}")
        self.image = thumbnail.copy()
        self._sx = thumbnail.shape[1] / float(width)
        self._sy = thumbnail.shape[0] / float(height)
        self.nuclei_drawn = 0

    def add(self, table: pa.Table) -> None:
        """Draw the nuclei of a table with ``geometry``, centroid and bbox columns."""
        if table.num_rows == 0:
            return
        col = {name: table.column(name).to_numpy() for name in (
            "centroid_x_px", "centroid_y_px", "bbox_x_min_px", "bbox_y_min_px",
            "bbox_x_max_px", "bbox_y_max_px")}
        extent = np.maximum((col["bbox_x_max_px"] - col["bbox_x_min_px"]) * self._sx,
                            (col["bbox_y_max_px"] - col["bbox_y_min_px"]) * self._sy)
        small = extent < MIN_OUTLINE_PX
        self._plot(col["centroid_x_px"][small] * self._sx, col["centroid_y_px"][small] * self._sy)
        geometry = table.column("geometry")
        rings = [wkb_exterior(geometry[int(k)].as_py()) for k in np.flatnonzero(~small)]
        if rings:
            self._draw_rings(rings)
        self.nuclei_drawn += table.num_rows

    def _draw_rings(self, rings: list[NDArray[np.float64]]) -> None:
        """Rasterise all ring segments at once, sampling each at <= 0.5 px steps."""
        starts = np.concatenate([r[:-1] for r in rings]) * (self._sx, self._sy)
        ends = np.concatenate([r[1:] for r in rings]) * (self._sx, self._sy)
        length = np.abs(ends - starts).max(axis=1)
        samples = np.ceil(2.0 * length).astype(np.int64) + 1
        seg = np.repeat(np.arange(samples.size), samples)
        first = np.cumsum(samples) - samples
        t = (np.arange(seg.size) - first[seg]) / np.maximum(samples[seg] - 1, 1)
        points = starts[seg] + (ends[seg] - starts[seg]) * t[:, None]
        self._plot(points[:, 0], points[:, 1])

    def _plot(self, x: NDArray[np.float64], y: NDArray[np.float64]) -> None:
        h, w = self.image.shape[:2]
        cols = np.floor(x).astype(np.int64)
        rows = np.floor(y).astype(np.int64)
        keep = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        self.image[rows[keep], cols[keep]] = QC_COLOUR

    def png_bytes(self) -> bytes:
        """The picture as PNG."""
        buffer = io.BytesIO()
        Image.fromarray(self.image).save(buffer, format="PNG")
        return buffer.getvalue()

    def save(self, out: str, slide_id: str, *, storage_options: Mapping[str, Any] | None = None) -> str:
        """Write ``out/qc/<slide_id>.png``; returns its path."""
        check_slide_id(slide_id)
        return write_bytes(out, f"qc/{slide_id}.png", self.png_bytes(), storage_options=storage_options)

