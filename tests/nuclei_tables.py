"""Nucleus tables of any size written directly with pyarrow (the real file schema, no slide):
for exports, their tests and their benchmark.

Nucleus ``k`` is a regular ``vertices``-gon of circumradius ``radius_px`` (counter-clockwise,
closed) centred on a grid cell; its measurement columns hold simple functions of ``k``, a
few of them NaN or infinite on purpose (``BAD_EVERY``), and every ``ARTEFACT_EVERY``-th nucleus
is flagged.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nucleiscope.pipeline.measure.outputs import nuclei_file_schema
from nucleiscope.pipeline.measure.records import write_slide_record

#: Every BAD_EVERY-th nucleus has a NaN perimeter and an infinite eccentricity.
BAD_EVERY = 7
#: Every ARTEFACT_EVERY-th nucleus has artefact "pigment", every (ARTEFACT_EVERY + 1)-th "detached".
ARTEFACT_EVERY = 5
CELL_PX = 40.0


def polygon_area(vertices: int, radius_px: float) -> float:
    """Area of the regular polygon every nucleus is."""
    return 0.5 * vertices * radius_px**2 * math.sin(2 * math.pi / vertices)


def _batch(start: int, stop: int, columns_per_row: int, vertices: int, radius_px: float,
           lymphocyte: bool, schema: pa.Schema) -> pa.RecordBatch:  # fmt: skip
    k = np.arange(start, stop, dtype=np.int64)
    cx = (k % columns_per_row) * CELL_PX + CELL_PX / 2
    cy = (k // columns_per_row) * CELL_PX + CELL_PX / 2
    angles = np.linspace(0.0, 2 * np.pi, vertices, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1) * radius_px
    ring = np.concatenate([ring, ring[:1]])  # closed
    header = struct.pack("<BIII", 1, 3, 1, len(ring))
    geometry = [header + (ring + (x, y)).astype("<f8").tobytes() for x, y in zip(cx.tolist(), cy.tolist())]
    values: dict[str, Any] = {f.name: (k % 97).astype(np.float64) + 0.25 for f in schema if f.type == pa.float64()}
    values.update(nucleus_id=k, centroid_x_px=cx, centroid_y_px=cy, centroid_x_um=cx * 0.25,
                  centroid_y_um=cy * 0.25, area_um2=np.full(len(k), polygon_area(vertices, radius_px) * 0.0625))  # fmt: skip
    bad = k % BAD_EVERY == 3
    values["perimeter_um"] = np.where(bad, np.nan, values["perimeter_um"])
    values["eccentricity"] = np.where(bad, np.inf, (k % 10) / 10.0)
    artefact = np.where(k % ARTEFACT_EVERY == 1, "pigment", np.where(k % (ARTEFACT_EVERY + 1) == 2, "detached", None))
    values["artefact"] = artefact
    values["geometry"] = geometry
    # The flag column of the file schema: a pattern of true, false and null, or all null (not judged).
    values["lymphocyte_like"] = (np.where(k % 3 == 0, True, np.where(k % 3 == 1, False, None)) if lymphocyte
                                 else [None] * len(k))  # fmt: skip
    arrays = [pa.array(values[f.name], type=f.type) for f in schema if f.name in values]
    names = [f.name for f in schema if f.name in values]
    return pa.RecordBatch.from_arrays(arrays, names=names)


def write_nuclei_file(path: str | Path, n_rows: int, *, slide_id: str = "s-0", vertices: int = 24,
                      radius_px: float = 12.0, lymphocyte: bool = False, row_group_rows: int = 65536) -> Path:
    """A nucleus file of ``n_rows`` nuclei, written a row group at a time (bounded memory)."""
    schema = nuclei_file_schema(slide_id, {"mpp": 0.25})
    columns_per_row = max(1, int(math.sqrt(n_rows)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, n_rows, row_group_rows):
            stop = min(n_rows, start + row_group_rows)
            batch = _batch(start, stop, columns_per_row, vertices, radius_px, lymphocyte, schema)
            writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=schema), row_group_size=row_group_rows)
    return path


def write_fake_output(out: str | Path, rows: dict[str, int], **kwargs: Any) -> Path:
    """An output folder as a run leaves it, for the given slides and nucleus counts: one nucleus
    file per slide, its record naming it, and a stray file beside it that no record names."""
    out = Path(out)
    for slide_id, n_rows in rows.items():
        name = f"part-{slide_id}.parquet"
        write_nuclei_file(out / "nuclei" / f"slide_id={slide_id}" / name, n_rows, slide_id=slide_id, **kwargs)
        write_nuclei_file(out / "nuclei" / f"slide_id={slide_id}" / "part-stray.parquet", 3, slide_id=slide_id)
        write_slide_record(str(out), {"slide_id": slide_id, "nuclei_file": name, "nuclei_count": n_rows})
    return out
