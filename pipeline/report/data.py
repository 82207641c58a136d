"""Reading an output (a local path or any fsspec URL) for the report, through the storage helpers.

Nothing here writes to the output but ``write_cohort``; every IO error becomes ``OutputError``.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..common.errors import OutputError
from ..common.storage import io_errors, put_atomic, resolve
from ..measure.cohort import cohort_table
from ..measure.records import FAILURES_SCHEMA
from .density import COLUMNS

logger = logging.getLogger(__name__)

#: Rows read from a nucleus file at a time.
BATCH_ROWS = 65536


@dataclass(frozen=True)
class OutputTables:
    """What a report shows of an output: its tables and run.json (None when absent)."""

    slides: pa.Table
    failures: pa.Table
    cohort: pa.Table
    run: dict[str, Any] | None


class OutputReader:
    """Reads the tables, QC pictures and nucleus columns of one output."""

    def __init__(self, out: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.out = out
        self._fs, self._root = resolve(out, storage_options)

    def _exists(self, rel: str) -> bool:
        with io_errors(f"cannot read {self._root}/{rel}"):
            return bool(self._fs.exists(f"{self._root}/{rel}"))

    def _parquet(self, rel: str) -> pa.Table:
        path = f"{self._root}/{rel}"
        with io_errors(f"cannot read {path}"):
            with self._fs.open(path, "rb") as handle:
                return pq.read_table(handle)

    def tables(self) -> OutputTables:
        """slides.parquet (required), failures.parquet, run.json, and the cohort table of the slides."""
        if not self._exists("slides.parquet"):
            raise OutputError(f"{self.out} holds no slides.parquet: not the output of a finished run")
        slides = self._parquet("slides.parquet")
        failures = (self._parquet("failures.parquet") if self._exists("failures.parquet")
                    else FAILURES_SCHEMA.empty_table())
        run = None
        if self._exists("run.json"):
            with io_errors(f"cannot read {self._root}/run.json"):
                run = json.loads(self._fs.cat_file(f"{self._root}/run.json"))
        return OutputTables(slides, failures, cohort_table(slides), run)

    def qc_png(self, slide_id: str) -> bytes | None:
        """The slide's QC picture, or None when there is none."""
        rel = f"qc/{slide_id}.png"
        if not self._exists(rel):
            return None
        with io_errors(f"cannot read {self._root}/{rel}"):
            data: bytes = self._fs.cat_file(f"{self._root}/{rel}")
        return data

    def nuclei_batches(self, slide_id: str, nuclei_file: str) -> Iterator[pa.RecordBatch]:
        """The report's columns of a slide's nucleus file, in batches (those of ``COLUMNS`` it has)."""
        path = f"{self._root}/nuclei/slide_id={slide_id}/{nuclei_file}"
        with io_errors(f"cannot read {path}"):
            handle = self._fs.open(path, "rb")
            parquet = pq.ParquetFile(handle)
        try:
            columns = [c for c in COLUMNS if c in parquet.schema_arrow.names]
            yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
        finally:
            handle.close()

    def write_cohort(self, cohort: pa.Table) -> None:
        """(Re)write ``cohort.parquet`` in the output; a read-only output gets a warning, not an error."""
        buffer = io.BytesIO()
        pq.write_table(cohort, buffer, compression="zstd")
        try:
            put_atomic(self._fs, f"{self._root}/cohort.parquet", buffer.getvalue())
        except OutputError as exc:
            logger.warning("cohort.parquet not written into the output (%s); the report folder has a copy", exc)


__all__ = ["BATCH_ROWS", "OutputReader", "OutputTables"]
