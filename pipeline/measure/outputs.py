"""Everything a run writes under ``out`` (a local path or any fsspec URL).

Layout::

    out/nuclei/slide_id=<id>/part-0.parquet   GeoParquet 1.1, one file per slide
    out/nuclei/_tmp/...                       in-progress files (ignored by readers)
    out/_records/slides/<id>.json             one record per finished slide (resume)
    out/_records/failures/<id>.json           one record per failed slide
    out/slides.parquet, out/failures.parquet  consolidated from the records
    out/run.json                              resolved config, model hash, versions
    out/qc/<id>.png                           QC thumbnails (``QcCanvas``, from ``qc``)

The nucleus files do not hold a ``slide_id`` column: it comes from the hive
directory name (an in-file copy makes pandas, geopandas and pyarrow's hive
discovery disagree on its type and fail). Each file names its slide in the
``nucleiscope`` key of its metadata. Every IO error surfaces as ``OutputError``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import uuid
from collections.abc import Mapping
from datetime import date, datetime, timezone
from importlib import metadata
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..common.errors import OutputError
from ..common.storage import check_slide_id, ensure_dir, io_errors, put_atomic, resolve, write_bytes
from .morphometrics import NUCLEI_SCHEMA
from .qc import QcCanvas
from .summary import SLIDES_SCHEMA

logger = logging.getLogger(__name__)

__all__ = [
    "FAILURES_SCHEMA", "GEO_METADATA", "NucleiWriter", "QcCanvas", "clear_failure_record",
    "consolidate", "nuclei_file_schema", "package_versions", "read_slide_records",
    "write_bytes", "write_failure_record", "write_run_json", "write_slide_record",
]

FILE_FORMAT_VERSION = "1"
#: Names and types a written table must have (nullability may differ, e.g. after set_column).
_NUCLEI_COLUMNS = [(f.name, f.type) for f in NUCLEI_SCHEMA]
_TIMESTAMP = pa.timestamp("us", tz="UTC")

#: Columns of ``failures.parquet``, one row per slide that failed and is not done.
FAILURES_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
        pa.field("failed_at", _TIMESTAMP),
    ]
)

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


def nuclei_file_schema(slide_id: str) -> pa.Schema:
    """Schema of one slide's nucleus file: ``NUCLEI_SCHEMA`` less slide_id, with GeoParquet metadata."""
    fields = [f for f in NUCLEI_SCHEMA if f.name != "slide_id"]
    own = {"slide_id": slide_id, "format_version": FILE_FORMAT_VERSION}
    return pa.schema(fields).with_metadata(
        {"geo": json.dumps(GEO_METADATA), "nucleiscope": json.dumps(own)}
    )


class NucleiWriter:
    """Streams one slide's nuclei tables into a GeoParquet file, committed atomically.

    Rows are buffered up to ``row_group_rows`` and written as row groups into
    ``out/nuclei/_tmp/<id>-<token>/``. ``commit`` moves the file to
    ``out/nuclei/slide_id=<id>/part-0.parquet`` (replacing an earlier one and
    removing anything else in that partition); ``abort`` deletes it. Used as a
    context manager, leaving the block without ``commit`` aborts.
    """

    def __init__(
        self,
        out: str,
        slide_id: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        row_group_rows: int = 65536,
    ) -> None:
        check_slide_id(slide_id)
        if row_group_rows < 1:
            raise ValueError(f"row_group_rows must be >= 1, got {row_group_rows}")
        self.slide_id = slide_id
        self._fs, root = resolve(out, storage_options)
        self._tmp_dir = f"{root}/nuclei/_tmp/{slide_id}-{uuid.uuid4().hex}"
        self._tmp_path = f"{self._tmp_dir}/part-0.parquet.inprogress"
        self._final_dir = f"{root}/nuclei/slide_id={slide_id}"
        self.path = f"{self._final_dir}/part-0.parquet"
        self._schema = nuclei_file_schema(slide_id)
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
        """Finish the file and move it into place; returns its path."""
        if self._done:
            raise ValueError("writer already committed or aborted")
        self._flush()
        self._close()
        fs = self._fs
        with io_errors(f"cannot commit {self.path}"):
            ensure_dir(fs, self._final_dir)
            fs.mv(self._tmp_path, self.path)
            for stale in fs.ls(self._final_dir, detail=False):
                if str(stale).rstrip("/") != self.path:
                    fs.rm(stale, recursive=True)
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


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value)


def _clean(value: Any) -> Any:
    """Non-finite floats become None (JSON has no NaN); containers recursively."""
    if isinstance(value, float | np.floating) and not math.isfinite(float(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _dumps(payload: Mapping[str, Any], indent: int | None = None) -> bytes:
    text = json.dumps(_clean(dict(payload)), indent=indent, default=_json_default, allow_nan=False)
    return text.encode("utf-8")


def write_slide_record(
    out: str, record: Mapping[str, Any], *, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Store a finished slide's record (``SlideSummary.finish``) at ``_records/slides/<id>.json``."""
    slide_id = str(record["slide_id"])
    check_slide_id(slide_id)
    fs, root = resolve(out, storage_options)
    put_atomic(fs, f"{root}/_records/slides/{slide_id}.json", _dumps(record))


def write_failure_record(
    out: str,
    slide_id: str,
    uri: str,
    stage: str,
    error_type: str,
    message: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Store why a slide failed at ``_records/failures/<id>.json`` (failed_at = now, UTC)."""
    check_slide_id(slide_id)
    fs, root = resolve(out, storage_options)
    record = {
        "slide_id": slide_id, "uri": uri, "stage": stage, "error_type": error_type,
        "message": message, "failed_at": datetime.now(timezone.utc).isoformat(),
    }
    put_atomic(fs, f"{root}/_records/failures/{slide_id}.json", _dumps(record))


def clear_failure_record(
    out: str, slide_id: str, *, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Remove a slide's failure record, if any."""
    check_slide_id(slide_id)
    fs, root = resolve(out, storage_options)
    path = f"{root}/_records/failures/{slide_id}.json"
    with io_errors(f"cannot remove {path}"):
        if fs.exists(path):
            fs.rm(path)


def _read_records(fs: Any, directory: str) -> list[dict[str, Any]]:
    with io_errors(f"cannot list {directory}"):
        fs.invalidate_cache(directory)  # other processes (writer actors) add records
        paths = sorted(p for p in fs.glob(f"{directory}/*.json") if not p.rsplit("/", 1)[1].startswith("."))
        blobs = [fs.cat_file(p) for p in paths]
    records = []
    for path, blob in zip(paths, blobs):
        try:
            records.append(json.loads(blob))
        except ValueError as exc:
            raise OutputError(f"corrupt record {path}: {exc}") from exc
    return records


def read_slide_records(
    out: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Records of all finished slides, by slide_id (what a resumed run may skip)."""
    fs, root = resolve(out, storage_options)
    return {str(r["slide_id"]): r for r in _read_records(fs, f"{root}/_records/slides")}


def _coerce(value: Any, type_: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_timestamp(type_):
        stamp = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)
    if pa.types.is_integer(type_):
        return int(value)
    if pa.types.is_floating(type_):
        return float(value)
    return str(value)


def _records_table(records: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    columns = {
        f.name: pa.array([_coerce(r.get(f.name), f.type) for r in records], type=f.type)
        for f in schema
    }
    return pa.Table.from_pydict(columns, schema=schema)


def _put_parquet(fs: Any, path: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    put_atomic(fs, path, buffer.getvalue())


def consolidate(out: str, *, storage_options: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """Rewrite ``slides.parquet`` and ``failures.parquet`` from the records.

    A slide with a record of success is not listed as failed. Returns
    (slides done, slides failed). Both files are written even when empty.
    """
    fs, root = resolve(out, storage_options)
    done = sorted(_read_records(fs, f"{root}/_records/slides"), key=lambda r: str(r["slide_id"]))
    done_ids = {str(r["slide_id"]) for r in done}
    failed = [
        r for r in _read_records(fs, f"{root}/_records/failures") if str(r["slide_id"]) not in done_ids
    ]
    failed.sort(key=lambda r: str(r["slide_id"]))
    try:
        slides = _records_table(done, SLIDES_SCHEMA)
        failures = _records_table(failed, FAILURES_SCHEMA)
    except (ValueError, TypeError, pa.ArrowException) as exc:
        raise OutputError(f"records under {root}/_records do not fit the table schema: {exc}") from exc
    _put_parquet(fs, f"{root}/slides.parquet", slides)
    _put_parquet(fs, f"{root}/failures.parquet", failures)
    return slides.num_rows, failures.num_rows


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
    put_atomic(fs, f"{root}/run.json", _dumps(payload, indent=2) + b"\n")


def read_run_json(out: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """``out/run.json`` of an earlier run, or None when there is none."""
    fs, root = resolve(out, storage_options)
    path = f"{root}/run.json"
    with io_errors(f"read {path}"):
        if not fs.exists(path):
            return None
        data: dict[str, Any] = json.loads(fs.cat_file(path))
    return data
