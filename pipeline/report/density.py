"""Streamed per-slide pictures' data: nucleus density on a grid of square cells and histograms.

``SlideStreams.add`` takes one batch of a slide's nucleus rows (a few columns); memory is the grid
and the fixed histogram bins, whatever the slide's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

#: Edge of a density cell in µm.
CELL_UM = 50.0
#: Edge cells with less of their area inside the slide get no density.
MIN_COVERAGE = 0.25
#: Histogram bins of the columns the report plots (fixed, so slides and the cohort add up).
HISTOGRAM_BINS: dict[str, NDArray[np.float64]] = {
    "area_um2": np.linspace(0.0, 150.0, 61),
    "circularity": np.linspace(0.0, 1.0, 41),
    "eccentricity": np.linspace(0.0, 1.0, 41),
}
#: Columns a report reads from a nucleus file.
COLUMNS: tuple[str, ...] = ("centroid_x_um", "centroid_y_um", "lymphocyte_like", *HISTOGRAM_BINS)


def _grid_shape(width_um: float, height_um: float, cell_um: float) -> tuple[int, int]:
    return max(1, math.ceil(height_um / cell_um)), max(1, math.ceil(width_um / cell_um))


@dataclass
class SlideStreams:
    """Counts per ``cell_um`` cell (all nuclei and lymphocyte-like ones) and histogram counts."""

    width_um: float
    height_um: float
    cell_um: float = CELL_UM
    nuclei: NDArray[np.int64] = field(init=False)
    lymphocytes: NDArray[np.int64] = field(init=False)
    histograms: dict[str, NDArray[np.int64]] = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        if not (self.width_um > 0 and self.height_um > 0 and self.cell_um > 0):
            raise ValueError(f"slide size and cell must be positive, got {self.width_um} x {self.height_um}, "
                             f"{self.cell_um}")
        shape = _grid_shape(self.width_um, self.height_um, self.cell_um)
        self.nuclei = np.zeros(shape, np.int64)
        self.lymphocytes = np.zeros(shape, np.int64)
        self.histograms = {k: np.zeros(b.size - 1, np.int64) for k, b in HISTOGRAM_BINS.items()}

    def add(self, batch: pa.Table | pa.RecordBatch) -> None:
        """Add rows with (at least) the ``COLUMNS`` that the batch has; centroids are required."""
        if batch.num_rows == 0:
            return
        x = np.asarray(batch.column("centroid_x_um").to_numpy(zero_copy_only=False), np.float64)
        y = np.asarray(batch.column("centroid_y_um").to_numpy(zero_copy_only=False), np.float64)
        rows, cols = self.nuclei.shape
        r = np.clip(np.floor(y / self.cell_um).astype(np.int64), 0, rows - 1)
        c = np.clip(np.floor(x / self.cell_um).astype(np.int64), 0, cols - 1)
        np.add.at(self.nuclei, (r, c), 1)
        names = batch.schema.names
        if "lymphocyte_like" in names:
            flag = np.asarray(batch.column("lymphocyte_like").fill_null(False).to_numpy(zero_copy_only=False), bool)
            np.add.at(self.lymphocytes, (r[flag], c[flag]), 1)
        for name, bins in HISTOGRAM_BINS.items():
            if name in names:
                values = np.asarray(batch.column(name).to_numpy(zero_copy_only=False), np.float64)
                self.histograms[name] += np.histogram(np.clip(values, bins[0], bins[-1]), bins)[0]
        self.count += batch.num_rows

    def per_mm2(self, which: str = "nuclei") -> NDArray[np.float64]:
        """Count per mm² of each cell's area within the slide; NaN for edge cells under
        ``MIN_COVERAGE`` inside it (a sliver's density would rest on a few µm²)."""
        counts = self.nuclei if which == "nuclei" else self.lymphocytes
        rows, cols = counts.shape
        inside_y = np.clip(self.height_um - np.arange(rows) * self.cell_um, 0.0, self.cell_um)
        inside_x = np.clip(self.width_um - np.arange(cols) * self.cell_um, 0.0, self.cell_um)
        area_um2 = np.outer(inside_y, inside_x)
        with np.errstate(divide="ignore", invalid="ignore"):
            density = counts / (area_um2 / 1e6)
        return np.where(area_um2 >= MIN_COVERAGE * self.cell_um**2, density, np.nan)


__all__ = ["CELL_UM", "COLUMNS", "HISTOGRAM_BINS", "SlideStreams"]
