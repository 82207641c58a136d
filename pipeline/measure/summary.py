"""Streaming per-slide summary of the nuclei table (one row of ``slides.parquet``).

``SlideSummary.add`` keeps only counts and six float32 columns, so a slide with
millions of nuclei costs a few tens of MB; ``finish`` computes quartiles and
merges the caller's run fields (identity, resolution, timings) into one record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

#: Nucleus columns summarised by median, first/third quartile and IQR.
SUMMARY_STATS: tuple[str, ...] = (
    "area_um2", "eccentricity", "solidity", "circularity", "hematoxylin_od_mean", "eosin_od_mean",
)

_TIMESTAMP = pa.timestamp("us", tz="UTC")

_HEAD_FIELDS = [
    pa.field("slide_id", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("width_px", pa.int64()),
    pa.field("height_px", pa.int64()),
    pa.field("mpp", pa.float64()),
    pa.field("mpp_source", pa.string()),
    #: The µm/px override the slide ran with (manifest or run), null when none.
    pa.field("mpp_override", pa.float64()),
    pa.field("seg_mpp", pa.float64()),
    pa.field("segmenter", pa.string()),
    pa.field("model_id", pa.string()),
    pa.field("config_hash", pa.string()),
    #: Size and ETag (or mtime) of the file when it was read: a changed file is redone.
    pa.field("fingerprint", pa.string()),
    #: The slide's one file under nuclei/slide_id=<id>/.
    pa.field("nuclei_file", pa.string()),
    pa.field("tissue_area_mm2", pa.float64()),
    #: The slide's nuclear haematoxylin reference the lymphocyte-like rule compares against.
    pa.field("hematoxylin_reference_od", pa.float64()),
    pa.field("nuclei_count", pa.int64()),
    pa.field("nuclei_per_mm2", pa.float64()),
    pa.field("artefacts_dropped", pa.int64()),
    pa.field("artefacts_flagged", pa.int64()),
    #: Nuclei with lymphocyte_like true, and per mm² of tissue; null when no nucleus was judged.
    pa.field("lymphocyte_like_count", pa.int64()),
    pa.field("lymphocyte_like_per_mm2", pa.float64()),
]
_STAT_FIELDS = [
    pa.field(f"{name}_{stat}", pa.float64())
    for name in SUMMARY_STATS
    for stat in ("median", "q1", "q3", "iqr")
]
_TAIL_FIELDS = [
    pa.field("tiles", pa.int64()),
    pa.field("tile_px", pa.int64()),
    pa.field("overlap_px", pa.int64()),
    pa.field("megapixels", pa.float64()),
    *(
        pa.field(f"seconds_{stage}", pa.float64())
        for stage in ("open", "tissue", "read", "segment", "postprocess", "measure", "write", "total")
    ),
    pa.field("tiles_per_s", pa.float64()),
    pa.field("finished_at", _TIMESTAMP),
]

#: Columns of ``slides.parquet``, one row per finished slide.
SLIDES_SCHEMA: pa.Schema = pa.schema(_HEAD_FIELDS + _STAT_FIELDS + _TAIL_FIELDS)

#: Fields ``SlideSummary.finish`` computes itself; the caller passes the others.
COMPUTED_FIELDS: frozenset[str] = frozenset(
    ["nuclei_count", "nuclei_per_mm2", "artefacts_dropped", "artefacts_flagged", "lymphocyte_like_count",
     "lymphocyte_like_per_mm2",
     *(f.name for f in _STAT_FIELDS)]
)


class SlideSummary:
    """Accumulates one slide's nuclei tables; ``finish`` yields its slides.parquet record."""

    def __init__(self) -> None:
        self._chunks: dict[str, list[NDArray[np.float32]]] = {name: [] for name in SUMMARY_STATS}
        self._count = 0
        self._dropped = 0
        self._flagged = 0
        self._lymphocytes = 0
        self._judged = 0

    @property
    def count(self) -> int:
        """Nuclei added so far."""
        return self._count

    def add(self, table: pa.Table) -> None:
        """Add a nuclei table (needs the ``SUMMARY_STATS`` columns)."""
        missing = [name for name in SUMMARY_STATS if name not in table.column_names]
        if missing:
            raise ValueError(f"nuclei table lacks columns {missing}")
        if table.num_rows == 0:
            return
        for name in SUMMARY_STATS:
            column = table.column(name).to_numpy(zero_copy_only=False)
            self._chunks[name].append(np.asarray(column, dtype=np.float32))
        self._count += table.num_rows
        if "artefact" in table.column_names:
            self._flagged += table.num_rows - table.column("artefact").null_count
        if "lymphocyte_like" in table.column_names:
            flag = table.column("lymphocyte_like")
            self._judged += table.num_rows - flag.null_count
            self._lymphocytes += int(pc.sum(flag).as_py() or 0)

    def add_dropped(self, counts: Mapping[str, int]) -> None:
        """Count objects that were dropped as artefacts (``extract.dropped_counts``)."""
        self._dropped += sum(int(v) for v in counts.values())

    def values(self, name: str) -> NDArray[np.float32]:
        """All values of one summarised column added so far."""
        chunks = self._chunks[name]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    def finish(self, **fields: Any) -> dict[str, Any]:
        """The slide's record: every ``SLIDES_SCHEMA`` column plus any extra caller field.

        ``tissue_area_mm2`` (caller) gives ``nuclei_per_mm2``; quartiles are numpy's
        linear interpolation, None when the slide has no nucleus. ``finished_at``
        defaults to now (UTC, ISO 8601). Missing caller fields are None.
        """
        clash = COMPUTED_FIELDS.intersection(fields)
        if clash:
            raise ValueError(f"fields computed by the summary cannot be passed: {sorted(clash)}")
        record: dict[str, Any] = {name: None for name in SLIDES_SCHEMA.names}
        record.update(fields)
        if record["finished_at"] is None:
            record["finished_at"] = datetime.now(timezone.utc).isoformat()
        elif isinstance(record["finished_at"], datetime):
            record["finished_at"] = record["finished_at"].isoformat()
        record["nuclei_count"] = self._count
        record["artefacts_dropped"] = self._dropped
        record["artefacts_flagged"] = self._flagged
        tissue = record.get("tissue_area_mm2")
        record["nuclei_per_mm2"] = _per_mm2(self._count, tissue)
        lymphocytes = self._lymphocytes if self._judged or not self._count else None
        record["lymphocyte_like_count"] = lymphocytes
        record["lymphocyte_like_per_mm2"] = None if lymphocytes is None else _per_mm2(lymphocytes, tissue)
        for name in SUMMARY_STATS:
            record.update(_quartiles(name, self.values(name)))
        return record


def _per_mm2(count: int, tissue_mm2: Any) -> float | None:
    if tissue_mm2 is None or not math.isfinite(float(tissue_mm2)) or float(tissue_mm2) <= 0:
        return None
    return count / float(tissue_mm2)


def _quartiles(name: str, values: NDArray[np.float32]) -> dict[str, float | None]:
    finite = values[np.isfinite(values)].astype(np.float64)
    if finite.size == 0:
        return {f"{name}_{s}": None for s in ("median", "q1", "q3", "iqr")}
    q1, median, q3 = np.quantile(finite, [0.25, 0.5, 0.75])
    return {
        f"{name}_median": float(median),
        f"{name}_q1": float(q1),
        f"{name}_q3": float(q3),
        f"{name}_iqr": float(q3 - q1),
    }
