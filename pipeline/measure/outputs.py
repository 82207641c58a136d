"""Everything a run writes under ``out`` (a local path or any fsspec URL).

Layout::

    out/nuclei/slide_id=<id>/part-<token>.parquet   GeoParquet 1.1, one file per slide
    out/nuclei/_tmp/...                       in-progress files (ignored by readers)
    out/_records/slides/<id>.json             one record per finished slide: its commit point
                                              (names its nucleus file; see ``records``)
    out/_records/failures/<id>.json           one record per failed slide
    out/slides.parquet, out/failures.parquet  consolidated from the records
    out/cohort.parquet                        from slides.parquet (``cohort``)
    out/run.json                              resolved config, model hash, versions
    out/qc/<id>.png                           QC thumbnails (``QcCanvas``, from ``qc``)

The nucleus files do not hold a ``slide_id`` column: it comes from the hive
directory name (an in-file copy makes pandas, geopandas and pyarrow's hive
discovery disagree on its type and fail). Each file names its slide in the
``nucleiscope`` key of its metadata, with what made it (config hash, model id, version,
device, precision, µm/px). Every IO error surfaces as ``OutputError``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from importlib import metadata
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..common.errors import OutputError
from ..common.storage import check_slide_id, ensure_dir, io_errors, put_atomic, resolve, write_bytes
from .morphometrics import NUCLEI_SCHEMA
from .qc import QcCanvas
from .records import (
    FAILURES_SCHEMA,
    clear_failure_record,
    consolidate,
    drop_other_files,
    dumps,
    read_slide_records,
    reconcile,
    write_failure_record,
    write_slide_record,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FAILURES_SCHEMA", "GEO_METADATA", "NucleiWriter", "QcCanvas", "clear_failure_record",
    "consolidate", "drop_other_files", "nuclei_file_schema", "package_versions", "read_slide_records",
    "reconcile", "write_bytes", "write_failure_record", "write_run_json", "write_slide_record",
]

FILE_FORMAT_VERSION = "1"
#: Names and types a written table must have (nullability may differ, e.g. after set_column).
_NUCLEI_COLUMNS = [(f.name, f.type) for f in NUCLEI_SCHEMA]

#: GeoParquet 1.1 metadata of the nucleus files: slide pixel coordinates, no CRS.
GEO_METADATA: dict[str, Any] = {
    "version": "1.1.0",
    "primary_column": "geometry",
    "columns": {
        "geometry": {
            "encoding": "WKB",
            "geometry_types": ["Polygon"],
            "crs": None,
            "orientation": "counterclockwise",
        }
    },
}

_PACKAGES = (
    "numpy", "torch", "ray", "tiffslide", "tifffile", "pyarrow", "pandas",
    "scikit-image", "fsspec", "s3fs", "safetensors", "nucleiscope",
)


def nuclei_file_schema(slide_id: str, provenance: Mapping[str, Any] | None = None) -> pa.Schema:
    """Schema of one slide's nucleus file: ``NUCLEI_SCHEMA`` less slide_id, with GeoParquet
    metadata and, under ``nucleiscope``, the slide id and ``provenance`` (what made the rows)."""
    fields = [f for f in NUCLEI_SCHEMA if f.name != "slide_id"]
    own = {**dict(provenance or {}), "slide_id": slide_id, "format_version": FILE_FORMAT_VERSION}
    return pa.schema(fields).with_metadata(
        {"geo": json.dumps(GEO_METADATA), "nucleiscope": json.dumps(own, sort_keys=True)}
    )


class NucleiWriter:
    """Streams one slide's nuclei tables into a GeoParquet file, committed atomically.

    Rows are buffered up to ``row_group_rows`` and written as row groups into
    ``out/nuclei/_tmp/<id>-<token>/``. ``commit`` moves the file to
    ``out/nuclei/slide_id=<id>/part-<token>.parquet`` (``file_name``) beside any earlier
    file of the slide: the slide's record, written next, makes it the slide's file
    (``records``); ``abort`` deletes it. Used as a context manager, leaving the block
    without ``commit`` aborts.
    """

    def __init__(
        self,
        out: str,
        slide_id: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        row_group_rows: int = 65536,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        check_slide_id(slide_id)
        if row_group_rows < 1:
            raise ValueError(f"row_group_rows must be >= 1, got {row_group_rows}")
        self.slide_id = slide_id
        self._fs, root = resolve(out, storage_options)
        token = uuid.uuid4().hex
        self._tmp_dir = f"{root}/nuclei/_tmp/{slide_id}-{token}"
        self._tmp_path = f"{self._tmp_dir}/part.parquet.inprogress"
        self._final_dir = f"{root}/nuclei/slide_id={slide_id}"
        self.file_name = f"part-{token}.parquet"
        self.path = f"{self._final_dir}/{self.file_name}"
        self._schema = nuclei_file_schema(slide_id, provenance)
        self._row_group_rows = row_group_rows
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._file: Any = None
        self._writer: pq.ParquetWriter | None = None
        self._done = False
        self.rows_written = 0

    def __enter__(self) -> NucleiWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            self.abort()

    def write(self, table: pa.Table) -> None:
        """Append a ``NUCLEI_SCHEMA`` table of this slide."""
        if self._done:
            raise ValueError("writer already committed or aborted")
        if [(f.name, f.type) for f in table.schema] != _NUCLEI_COLUMNS:
            raise ValueError(f"table columns differ from NUCLEI_SCHEMA:\n{table.schema}")
        if table.num_rows == 0:
            return
        if not pc.all(pc.equal(table.column("slide_id"), self.slide_id)).as_py():
            raise ValueError(f"table holds rows of a slide other than {self.slide_id!r}")
        self._buffer.append(table.drop_columns(["slide_id"]).cast(self._schema))
        self._buffered += table.num_rows
        if self._buffered >= self._row_group_rows:
            self._flush()

    def _open(self) -> pq.ParquetWriter:
        if self._writer is None:
            with io_errors(f"cannot create {self._tmp_path}"):
                ensure_dir(self._fs, self._tmp_dir)
                self._file = self._fs.open(self._tmp_path, "wb")
                self._writer = pq.ParquetWriter(self._file, self._schema, compression="zstd")
        return self._writer

    def _flush(self) -> None:
        writer = self._open()
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        self._buffer, self._buffered = [], 0
        with io_errors(f"cannot write {self._tmp_path}"):
            writer.write_table(table, row_group_size=self._row_group_rows)
        self.rows_written += table.num_rows

    def commit(self) -> str:
        """Finish the file and move it into its partition (beside any older file of the slide,
        which the slide's next record retires); returns its path."""
        if self._done:
            raise ValueError("writer already committed or aborted")
        self._flush()
        self._close()
        with io_errors(f"cannot commit {self.path}"):
            ensure_dir(self._fs, self._final_dir)
            self._fs.mv(self._tmp_path, self.path)
        self._done = True
        self._remove_tmp()
        logger.debug("committed %d nuclei to %s", self.rows_written, self.path)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far (best effort: failures are logged, not raised)."""
        self._done = True
        self._buffer = []
        try:
            self._close()
        except OutputError as exc:
            logger.warning("closing aborted nuclei file failed: %s", exc)
        self._remove_tmp()

    def _close(self) -> None:
        with io_errors(f"cannot finish {self._tmp_path}"):
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._file is not None:
                self._file.close()
                self._file = None

    def _remove_tmp(self) -> None:
        try:
            if self._fs.exists(self._tmp_dir):
                self._fs.rm(self._tmp_dir, recursive=True)
        except Exception as exc:  # cleanup must not hide the caller's own error
            logger.warning("cannot remove %s: %s", self._tmp_dir, exc)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide a run's results."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_run_json(
    out: str, payload: Mapping[str, Any], *, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Write ``out/run.json`` (indented JSON; non-finite floats become null)."""
    fs, root = resolve(out, storage_options)
    put_atomic(fs, f"{root}/run.json", dumps(payload, indent=2) + b"\n")


def read_run_json(out: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """``out/run.json`` of an earlier run, or None when there is none."""
    fs, root = resolve(out, storage_options)
    path = f"{root}/run.json"
    with io_errors(f"read {path}"):
        if not fs.exists(path):
            return None
        data: dict[str, Any] = json.loads(fs.cat_file(path))
    return data
