"""The report's figures, drawn with matplotlib (Agg, no display) and returned as PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import NDArray

from .density import HISTOGRAM_BINS, SlideStreams

#: Colours of the plots (the browser test looks for them in a screenshot of the report).
COHORT_COLOUR = "#1f77b4"
SLIDE_COLOURS = ("#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")
DENSITY_CMAP = "viridis"
LABELS = {"area_um2": "nucleus area (µm²; the last bin holds all above)",
          "circularity": "circularity (4π·area/perimeter²)", "eccentricity": "eccentricity (0 = disc)"}
#: At most this many slides get their own line in the cohort histograms.
MAX_SLIDE_LINES = len(SLIDE_COLOURS)
DPI = 100


def _figure(width_in: float, height_in: float, panels: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure not attached to pyplot (no display, no global state)."""
    figure = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    return figure, list(axes)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def density_png(streams: SlideStreams, title: str) -> bytes:
    """Two maps side by side: nuclei and lymphocyte-like nuclei per mm² on the grid, axes in mm."""
    rows, cols = streams.nuclei.shape
    aspect = rows / max(cols, 1)
    figure, axes = _figure(9.0, max(2.8, min(8.0, 3.3 * aspect + 1.1)), panels=2)
    extent = (0.0, cols * streams.cell_um / 1000, rows * streams.cell_um / 1000, 0.0)
    for ax, which, name in zip(axes, ("nuclei", "lymphocytes"), ("nuclei", "lymphocyte-like nuclei")):
        cmap = matplotlib.colormaps[DENSITY_CMAP].with_extremes(bad="white")
        image = ax.imshow(streams.per_mm2(which), cmap=cmap, extent=extent, interpolation="nearest", vmin=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x (mm)")
        ax.set_ylabel("y (mm)")
        figure.colorbar(image, ax=ax, label="per mm²", shrink=0.85)
    figure.suptitle(f"{title}: density on {streams.cell_um:g} µm cells", fontsize=11)
    return _png(figure)


def _fractions(counts: NDArray[np.int64]) -> NDArray[np.float64]:
    total = counts.sum()
    return counts / total if total > 0 else counts.astype(np.float64)


def histograms_png(cohort: Mapping[str, NDArray[np.int64]],
                   slides: Sequence[tuple[str, Mapping[str, NDArray[np.int64]]]], title: str) -> bytes:
    """One panel per histogram column: the pooled nuclei as bars, each named slide as a line
    (share of its nuclei per bin, so slides of any size compare); the last area bin holds all above."""
    figure, axes = _figure(11.0, 3.3, panels=len(HISTOGRAM_BINS))
    for ax, (name, bins) in zip(axes, HISTOGRAM_BINS.items()):
        centres, width = 0.5 * (bins[1:] + bins[:-1]), float(bins[1] - bins[0])
        ax.bar(centres, 100 * _fractions(cohort[name]), width=width, color=COHORT_COLOUR,
               alpha=0.55, label="all nuclei" if slides else "nuclei")
        for (slide_id, counts), colour in zip(slides[:MAX_SLIDE_LINES], SLIDE_COLOURS):
            ax.step(centres, 100 * _fractions(counts[name]), where="mid", color=colour,
                    linewidth=1.4, label=slide_id)
        ax.set_xlabel(LABELS[name])
        ax.set_ylabel("% of nuclei per bin")
        ax.set_xlim(bins[0], bins[-1])
    if slides:
        axes[-1].legend(fontsize=8, loc="upper left")
    figure.suptitle(title, fontsize=11)
    return _png(figure)


def cohort_bars_png(slide_ids: Sequence[str], nuclei_per_mm2: Sequence[float | None],
                    lymphocytes_per_mm2: Sequence[float | None]) -> bytes:
    """Nuclei and lymphocyte-like nuclei per mm² of tissue per slide, each on its own axis."""
    n = len(slide_ids)
    figure, axes = _figure(min(12.0, 5.0 + 1.2 * n), 3.4, panels=2)
    x = np.arange(n)
    turn = n > 3 or max((len(s) for s in slide_ids), default=0) > 16
    for ax, seq, colour, name in zip(axes, (nuclei_per_mm2, lymphocytes_per_mm2), (COHORT_COLOUR, SLIDE_COLOURS[0]),
                                     ("nuclei", "lymphocyte-like nuclei")):
        ax.bar(x, np.array([np.nan if v is None else v for v in seq], np.float64), width=0.6, color=colour)
        ax.set_xticks(x, list(slide_ids), rotation=25 if turn else 0, ha="right" if turn else "center", fontsize=8)
        ax.set_ylabel("per mm² of tissue")
        ax.set_title(name, fontsize=10)
    return _png(figure)


__all__ = ["COHORT_COLOUR", "DENSITY_CMAP", "SLIDE_COLOURS", "cohort_bars_png", "density_png", "histograms_png"]
