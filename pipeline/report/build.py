"""``build_report``: an output's report folder (``index.html``, its PNGs, ``cohort.csv``).

Slides are read one at a time, and of each nucleus file only the columns the pictures need, in
batches, so memory does not grow with the cohort or the slides. The report goes to a local folder;
the output may be any fsspec URL. ``cohort.parquet`` is written into the output again (from its
slides.parquet, as at the end of a run) and copied into the report folder.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from numpy.typing import NDArray

from ..common.errors import OutputError
from ..common.redact import redact
from .data import OutputReader
from .density import HISTOGRAM_BINS, SlideStreams
from .html import SlideSection, render_page
from .plots import cohort_bars_png, density_png, histograms_png

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportResult:
    """Where the report is and what it holds."""

    index: Path
    slides: int
    failures: int
    nuclei: int


def _write(folder: Path, name: str, data: bytes | str) -> str:
    path = folder / name
    try:
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_bytes(data)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc
    return name


def _slide_streams(reader: OutputReader, row: Mapping[str, Any]) -> SlideStreams | None:
    width, height, mpp = row.get("width_px"), row.get("height_px"), row.get("mpp")
    if not (width and height and mpp and math.isfinite(float(mpp))) or not row.get("nuclei_file"):
        return None
    streams = SlideStreams(float(width) * float(mpp), float(height) * float(mpp))
    for batch in reader.nuclei_batches(str(row["slide_id"]), str(row["nuclei_file"])):
        streams.add(batch)
    return streams


def build_report(out: str, to: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> ReportResult:
    """Write the report of output ``out`` into the local folder ``to``; returns where it is."""
    reader = OutputReader(out, storage_options)
    tables = reader.tables()  # first: a folder that is no output gets no report folder
    folder = Path(to)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the report folder {folder}: {exc}") from exc
    reader.write_cohort(tables.cohort)
    buffer = io.BytesIO()
    pq.write_table(tables.cohort, buffer, compression="zstd")
    _write(folder, "cohort.parquet", buffer.getvalue())
    csv = io.BytesIO()
    pacsv.write_csv(tables.cohort, csv)
    _write(folder, "cohort.csv", csv.getvalue())

    cohort_rows = {str(r["slide_id"]): r for r in tables.cohort.to_pylist()}
    pooled = {name: np.zeros(bins.size - 1, np.int64) for name, bins in HISTOGRAM_BINS.items()}
    per_slide: list[tuple[str, dict[str, NDArray[np.int64]]]] = []
    sections, nuclei = [], 0
    for row in tables.slides.to_pylist():
        slide_id = str(row["slide_id"])
        qc = reader.qc_png(slide_id)
        streams = _slide_streams(reader, row)
        density = hist = None
        if streams is not None:
            nuclei += streams.count
            for name in pooled:
                pooled[name] += streams.histograms[name]
            per_slide.append((slide_id, streams.histograms))
            density = _write(folder, f"density-{slide_id}.png", density_png(streams, slide_id))
            hist = _write(folder, f"histograms-{slide_id}.png",
                          histograms_png(streams.histograms, [], f"{slide_id}: {streams.count:,} nuclei"))  # fmt: skip
        qc_name = _write(folder, f"qc-{slide_id}.png", qc) if qc is not None else None
        sections.append(SlideSection(slide_id, cohort_rows.get(slide_id, {}), qc_name, density, hist))
        logger.info("report: slide %s drawn", slide_id)

    cohort_pngs = []
    if tables.cohort.num_rows:
        ids = tables.cohort.column("slide_id").to_pylist()
        cohort_pngs.append(_write(folder, "cohort-density.png", cohort_bars_png(
            ids, tables.cohort.column("nuclei_per_mm2").to_pylist(),
            tables.cohort.column("lymphocyte_like_per_mm2").to_pylist())))
        cohort_pngs.append(_write(folder, "cohort-histograms.png", histograms_png(
            pooled, per_slide, f"all {tables.cohort.num_rows} slides: {nuclei:,} nuclei")))
    page = render_page(out=redact(out), run=tables.run, cohort=tables.cohort, failures=tables.failures,
                       sections=sections, cohort_pngs=cohort_pngs)  # fmt: skip
    index = folder / _write(folder, "index.html", page)
    return ReportResult(index, tables.cohort.num_rows, tables.failures.num_rows, nuclei)


__all__ = ["ReportResult", "build_report"]
