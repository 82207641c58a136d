"""Export finished slides of a run as gzipped GeoJSON that QuPath imports as detections.

``export_qupath(out)`` writes ``<to>/<slide_id>.geojson.gz`` (default ``to``: ``out/qupath``) for
every slide whose record says it is done, from exactly the nucleus file that record names.
Each file is one FeatureCollection (``geojson`` says what a feature holds), streamed: the
nucleus file is read in record batches, every batch becomes features column-wise, and its
text goes straight into a gzip stream, so memory does not grow with the nuclei of a slide.
The stream is written under a temporary dot-name beside the target and renamed into place
when complete (on object stores a multipart upload that never completes leaves nothing), so a
killed export never leaves a partial ``.geojson.gz``; leftovers of killed exports to the same
folder are removed by the next one. The gzip header carries no time or name, so exporting
the same nucleus file twice gives the same bytes.
"""

from __future__ import annotations

import gzip
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..common.errors import ConfigError, NucleiscopeError
from ..common.storage import check_slide_id, ensure_dir, io_errors, is_local, resolve
from ..common.validate import finite_number
from ..measure.records import LEGACY_NUCLEI_FILE, read_slide_records
from . import geojson

logger = logging.getLogger(__name__)

SUFFIX = ".geojson.gz"
_HEAD = b'{"type":"FeatureCollection","features":[\n'
_TAIL = b"\n]}\n"


@dataclass(frozen=True)
class QupathExportConfig:
    """How the files are written. ``offset_px`` is subtracted from every coordinate (for a
    viewer whose origin is not the slide's level-0 top-left corner, see docs/qupath.md)."""

    batch_rows: int = 4096
    compresslevel: int = 1
    offset_px: tuple[float, float] = (0.0, 0.0)
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.batch_rows, int) or self.batch_rows < 1:
            raise ConfigError(f"batch_rows must be an integer >= 1, got {self.batch_rows!r}")
        if not isinstance(self.compresslevel, int) or not 0 <= self.compresslevel <= 9:
            raise ConfigError(f"compresslevel must be an integer 0-9, got {self.compresslevel!r}")
        if len(self.offset_px) != 2 or not all(finite_number(v) for v in self.offset_px):
            raise ConfigError(f"offset_px must be two finite numbers (x, y), got {self.offset_px!r}")


@dataclass(frozen=True)
class SlideExport:
    """One written file: its slide, path, number of features and the seconds it took."""

    slide_id: str
    path: str
    features: int
    seconds: float


def nuclei_files(out: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Slide id -> path of the one nucleus file its record names, for every finished slide
    (records are the commit points; ``slides.parquet`` only when an output has no records)."""
    fs, root = resolve(out, storage_options)
    records = read_slide_records(out, storage_options=storage_options)
    names = {sid: str(r.get("nuclei_file") or LEGACY_NUCLEI_FILE) for sid, r in records.items()}
    if not names:
        table_path = f"{root}/slides.parquet"
        with io_errors(f"cannot read {table_path}"):
            if fs.exists(table_path):
                with fs.open(table_path, "rb") as handle:
                    table = pq.read_table(handle, columns=["slide_id", "nuclei_file"]).to_pylist()
                names = {str(r["slide_id"]): str(r["nuclei_file"] or LEGACY_NUCLEI_FILE) for r in table}
    return {sid: f"{root}/nuclei/slide_id={sid}/{name}" for sid, name in sorted(names.items())}


def select_slides(available: Mapping[str, str], slide_ids: Sequence[str] | None, out: str) -> dict[str, str]:
    """The slides asked for (all when ``slide_ids`` is None); an id that is not done is a ConfigError."""
    if not available:
        raise ConfigError(f"no finished slides in {out} (no slide records, no slides.parquet)")
    if slide_ids is None:
        return dict(available)
    unknown = [s for s in slide_ids if s not in available]
    if unknown:
        raise ConfigError(f"not finished slides of {out}: {', '.join(unknown)} "
                          f"(finished: {', '.join(sorted(available)) or 'none'})")  # fmt: skip
    return {s: available[s] for s in dict.fromkeys(slide_ids)}


def _columns(schema: pa.Schema) -> list[str]:
    names = schema.names
    missing = [c for c in geojson.REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"not a nucleus table: no column {missing[0]!r}")
    return [*geojson.REQUIRED_COLUMNS, *(c for c in geojson.OPTIONAL_COLUMNS if c in names)]


def _write_features(fs: Any, source: str, target: Any, slide_id: str, config: QupathExportConfig) -> int:
    """Stream the features of ``source`` into the open binary ``target``; returns their number."""
    count = 0
    with gzip.GzipFile(filename="", mode="wb", fileobj=target, compresslevel=config.compresslevel, mtime=0) as gz:
        gz.write(_HEAD)
        with io_errors(f"cannot read nucleus file {source}"), fs.open(source, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            columns = _columns(parquet.schema_arrow)
            for batch in parquet.iter_batches(batch_size=config.batch_rows, columns=columns):
                if batch.num_rows == 0:
                    continue
                if count:
                    gz.write(b",\n")
                gz.write(memoryview(geojson.joined(geojson.features(batch, slide_id, config.offset_px))))
                count += batch.num_rows
        gz.write(_TAIL)
    return count


def _drop_leftovers(fs: Any, directory: str, name: str) -> None:
    """Remove temporary files of killed exports of ``name`` (local folders only)."""
    if not is_local(fs):
        return
    with io_errors(f"cannot list {directory}"):
        for path in fs.glob(f"{directory}/.{name}.*.tmp"):
            fs.rm(path)


def export_slide(src_fs: Any, source: str, slide_id: str, fs: Any, directory: str,
                 config: QupathExportConfig) -> SlideExport:  # fmt: skip
    """Write ``<directory>/<slide_id>.geojson.gz`` on ``fs`` from the nucleus file ``source`` on
    ``src_fs`` (temporary name, then renamed: see the module text)."""
    check_slide_id(slide_id)
    start = time.perf_counter()
    name = f"{slide_id}{SUFFIX}"
    path = f"{directory}/{name}"
    tmp = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
    _drop_leftovers(fs, directory, name)
    try:
        with io_errors(f"cannot write {tmp}"):
            ensure_dir(fs, directory)
            with fs.open(tmp, "wb") as target:
                count = _write_features(src_fs, source, target, slide_id, config)
            fs.mv(tmp, path)
    except BaseException:
        _remove_quietly(fs, tmp)
        raise
    seconds = time.perf_counter() - start
    logger.debug("exported %d nuclei of %s to %s in %.1f s", count, slide_id, path, seconds)
    return SlideExport(slide_id, path, count, seconds)


@dataclass(frozen=True)
class ExportOutcome:
    """What ``export_qupath`` did: the files written and, by slide, why others were not."""

    done: list[SlideExport]
    failed: dict[str, str]


def export_qupath(out: str, *, to: str | None = None, slide_ids: Sequence[str] | None = None,
                  config: QupathExportConfig | None = None) -> ExportOutcome:  # fmt: skip
    """Export the finished slides of the output ``out`` (all, or ``slide_ids``) into ``to``
    (default ``out/qupath``). A slide whose file cannot be read or written is reported in
    ``failed`` and the others go on; an unknown slide id raises ConfigError before any write."""
    config = config or QupathExportConfig()
    src_fs, _ = resolve(out, config.storage_options)
    chosen = select_slides(nuclei_files(out, storage_options=config.storage_options), slide_ids, out)
    fs, directory = resolve(to or default_target(out), config.storage_options)
    done: list[SlideExport] = []
    failed: dict[str, str] = {}
    for slide_id, source in chosen.items():
        try:
            done.append(export_slide(src_fs, source, slide_id, fs, directory, config))
        except NucleiscopeError as exc:
            logger.error("%s: %s", slide_id, exc)
            failed[slide_id] = str(exc)
    return ExportOutcome(done, failed)


def _remove_quietly(fs: Any, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path)
    except Exception as exc:  # cleanup must not hide the caller's own error
        logger.warning("cannot remove %s: %s", path, exc)


def default_target(out: str) -> str:
    """Where ``export qupath`` writes unless told: ``<out>/qupath``."""
    return f"{out.rstrip('/')}/qupath"
