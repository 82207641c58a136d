"""The ledger of a run's output: one record per slide, and the rule that keeps files honest.

A slide is done exactly when ``_records/slides/<id>.json`` exists: that single atomic put is
its commit point. The record names the one nucleus file of the slide
(``nuclei/slide_id=<id>/part-<token>.parquet``); the commit sequence is

    1. the nucleus file is finished under ``nuclei/_tmp/`` and moved into its partition
       under a new name (an older file of the slide stays, still named by the old record),
    2. the QC picture is written,
    3. the record is written (the commit point),
    4. other files of the partition and the slide's failure record are removed.

``reconcile`` (run at the start and the end of every run, when no writer is active) makes
any state a kill can leave consistent: files no record names, ``_tmp/`` and interrupted atomic
writes go, a slide with a record of success and one of failure keeps the newer, QC pictures of
slides not done go.
Then every partition under ``nuclei/`` belongs to exactly one row of slides.parquet, and no
slide is both done and failed. Records are read concurrently (one batched ``cat``).
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..common.errors import OutputError
from ..common.storage import check_slide_id, io_errors, is_local, put_atomic, resolve
from .cohort import cohort_table
from .summary import SLIDES_SCHEMA

logger = logging.getLogger(__name__)

_TIMESTAMP = pa.timestamp("us", tz="UTC")
#: Name of the nucleus file of records written before files were named by their commit.
LEGACY_NUCLEI_FILE = "part-0.parquet"

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


def dumps(payload: Mapping[str, Any], indent: int | None = None) -> bytes:
    """JSON bytes of a record or run.json (non-finite floats become null)."""
    text = json.dumps(_clean(dict(payload)), indent=indent, default=_json_default, allow_nan=False)
    return text.encode("utf-8")


def write_slide_record(out: str, record: Mapping[str, Any], *, storage_options: Mapping[str, Any] | None = None) -> None:
    """Commit a finished slide: store its record (``SlideSummary.finish``) at ``_records/slides/<id>.json``."""
    slide_id = str(record["slide_id"])
    check_slide_id(slide_id)
    fs, root = resolve(out, storage_options)
    put_atomic(fs, f"{root}/_records/slides/{slide_id}.json", dumps(record))


def write_failure_record(
    out: str, slide_id: str, uri: str, stage: str, error_type: str, message: str, *,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Store why a slide failed at ``_records/failures/<id>.json`` (failed_at = now, UTC)."""
    check_slide_id(slide_id)
    fs, root = resolve(out, storage_options)
    record = {
        "slide_id": slide_id, "uri": uri, "stage": stage, "error_type": error_type,
        "message": message, "failed_at": datetime.now(timezone.utc).isoformat(),
    }
    put_atomic(fs, f"{root}/_records/failures/{slide_id}.json", dumps(record))


def clear_failure_record(out: str, slide_id: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove a slide's failure record, if any."""
    check_slide_id(slide_id)
    fs, root = resolve(out, storage_options)
    _remove(fs, f"{root}/_records/failures/{slide_id}.json")


def drop_other_files(out: str, slide_id: str, keep: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove every file of the slide's partition but ``keep`` (step 4 of the commit)."""
    check_slide_id(slide_id)
    fs, root = resolve(out, storage_options)
    directory = f"{root}/nuclei/slide_id={slide_id}"
    with io_errors(f"cannot list {directory}"):
        names = [p for p in fs.find(directory) if p.rsplit("/", 1)[1] != keep] if fs.exists(directory) else []
    for path in names:
        _remove(fs, path)


def _remove(fs: Any, path: str) -> None:
    with io_errors(f"cannot remove {path}"):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _read_records(fs: Any, directory: str) -> list[dict[str, Any]]:
    with io_errors(f"cannot list {directory}"):
        fs.invalidate_cache(directory)  # other processes (writer actors) add records
        paths = sorted(p for p in fs.glob(f"{directory}/*.json") if not p.rsplit("/", 1)[1].startswith("."))
        blobs = fs.cat(paths, on_error="raise") if paths else {}
    records = []
    for path in paths:
        blob = blobs.get(path)  # cat keys its answer by the paths glob gave
        try:
            if blob is None:
                raise ValueError("not returned by the batched read")
            records.append(json.loads(blob))
        except ValueError as exc:
            raise OutputError(f"corrupt record {path}: {exc}") from exc
    return records


def read_slide_records(out: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Records of all finished slides, by slide_id (what a resumed run may skip)."""
    fs, root = resolve(out, storage_options)
    return {str(r["slide_id"]): r for r in _read_records(fs, f"{root}/_records/slides")}


@dataclass(frozen=True)
class Ledger:
    """The records of an output after ``reconcile``: done and failed slides, disjoint."""

    done: dict[str, dict[str, Any]]
    failed: dict[str, dict[str, Any]]


def _stamp(value: Any) -> datetime:
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def reconcile(out: str, *, storage_options: Mapping[str, Any] | None = None) -> Ledger:
    """Bring ``out`` to its one consistent state (see the module text); call it only while
    no writer of this output is running. Returns the records."""
    fs, root = resolve(out, storage_options)
    done = {str(r["slide_id"]): r for r in _read_records(fs, f"{root}/_records/slides")}
    failed = {str(r["slide_id"]): r for r in _read_records(fs, f"{root}/_records/failures")}
    for slide_id in sorted(done.keys() & failed.keys()):
        if _stamp(failed[slide_id].get("failed_at")) > _stamp(done[slide_id].get("finished_at")):
            logger.info("slide %s failed after it was done: its old rows are removed", slide_id)
            _remove(fs, f"{root}/_records/slides/{slide_id}.json")
            del done[slide_id]
        else:
            _remove(fs, f"{root}/_records/failures/{slide_id}.json")
            del failed[slide_id]
    _drop_unnamed_files(fs, root, done)
    _drop_stale_qc(fs, root, done)
    _drop_put_leftovers(fs, root)
    return Ledger(done, failed)


def _drop_put_leftovers(fs: Any, root: str) -> None:
    """Remove the dot-files of ``put_atomic`` writes that a kill interrupted (local only)."""
    for directory in (root, f"{root}/_records/slides", f"{root}/_records/failures", f"{root}/qc"):
        with io_errors(f"cannot list {directory}"):
            names = fs.glob(f"{directory}/.*.tmp") if is_local(fs) and fs.isdir(directory) else []
        for path in names:
            _remove(fs, path)


def _drop_unnamed_files(fs: Any, root: str, done: Mapping[str, Mapping[str, Any]]) -> None:
    """Remove ``nuclei/_tmp`` and every partition file that no record of success names."""
    directory = f"{root}/nuclei"
    with io_errors(f"cannot list {directory}"):
        fs.invalidate_cache(directory)
        files = fs.find(directory) if fs.exists(directory) else []
    stale_dirs = set()
    for path in files:
        rel = path[len(directory) + 1:]
        partition, _, name = rel.partition("/")
        slide_id = partition.removeprefix("slide_id=")
        record = done.get(slide_id) if partition.startswith("slide_id=") else None
        if record is not None and name == str(record.get("nuclei_file") or LEGACY_NUCLEI_FILE):
            continue
        logger.info("removing %s: no record of success names it", path)
        _remove(fs, path)
        stale_dirs.add(f"{directory}/{partition}")
    for path in sorted(stale_dirs):
        with io_errors(f"cannot remove {path}"):
            if fs.isdir(path) and not fs.ls(path, detail=False):
                fs.rm(path, recursive=True)
    _remove(fs, f"{directory}/_tmp")


def _drop_stale_qc(fs: Any, root: str, done: Mapping[str, Any]) -> None:
    directory = f"{root}/qc"
    with io_errors(f"cannot list {directory}"):
        names = fs.find(directory) if fs.exists(directory) else []
    for path in names:
        stem = path.rsplit("/", 1)[1].removesuffix(".png")
        if stem not in done:
            _remove(fs, path)


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
    columns = {f.name: pa.array([_coerce(r.get(f.name), f.type) for r in records], type=f.type) for f in schema}
    return pa.Table.from_pydict(columns, schema=schema)


def _put_parquet(fs: Any, path: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    put_atomic(fs, path, buffer.getvalue())


def consolidate(out: str, *, storage_options: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """``reconcile``, then rewrite ``slides.parquet`` and ``failures.parquet`` from the records,
    and ``cohort.parquet`` from that slides table (all written even when empty). Returns
    (slides done, slides failed)."""
    fs, root = resolve(out, storage_options)
    ledger = reconcile(out, storage_options=storage_options)
    done = [ledger.done[k] for k in sorted(ledger.done)]
    failed = [ledger.failed[k] for k in sorted(ledger.failed)]
    try:
        slides = _records_table(done, SLIDES_SCHEMA)
        failures = _records_table(failed, FAILURES_SCHEMA)
    except (ValueError, TypeError, pa.ArrowException) as exc:
        raise OutputError(f"records under {root}/_records do not fit the table schema: {exc}") from exc
    _put_parquet(fs, f"{root}/slides.parquet", slides)
    _put_parquet(fs, f"{root}/failures.parquet", failures)
    _put_parquet(fs, f"{root}/cohort.parquet", cohort_table(slides))
    return slides.num_rows, failures.num_rows


__all__ = [
    "FAILURES_SCHEMA", "LEGACY_NUCLEI_FILE", "Ledger", "clear_failure_record", "consolidate", "drop_other_files",
    "dumps", "read_slide_records", "reconcile", "write_failure_record", "write_slide_record",
]
