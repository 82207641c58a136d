"""Cohort inputs: command-line items to a list of slides, and credential redaction.

``expand_inputs`` accepts local paths, local globs, ``file://`` URLs, any fsspec
URL (``s3://bucket/key.svs``, ``s3://bucket/prefix/``, ``s3://bucket/*.svs``,
``memory://...``) and manifests (``.csv`` / ``.parquet``, local or remote) with a
``slide_uri`` column and optional ``slide_id`` and ``mpp`` columns. Directories and
prefixes are listed recursively and keep single-file slide formats only; globs and
explicit items are kept as given (a file that is not a slide fails later, with its
own error row). Only directories, globs and manifests cause any IO here.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from ..common.errors import ConfigError
from ..common.identity import canonical_uri, short_digest
from ..common.redact import redact, redacted_options
from ..common.storage import url_to_fs
from .slide import slide_id_from_uri

logger = logging.getLogger(__name__)

#: Single-file whole-slide formats that tiffslide reads.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff")
MANIFEST_SUFFIXES = (".csv", ".parquet")
#: Attempts per S3 request (first try included) that ``with_s3_retries`` asks botocore for.
S3_RETRY_ATTEMPTS = 10
_SLIDE_ID = re.compile(r"^[A-Za-z0-9._-]+$")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class SlideInput:
    """One slide of a cohort: where it is, its output id, and an optional µm/px override."""

    uri: str
    slide_id: str
    mpp: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri.strip():
            raise ConfigError(f"slide uri must be a non-empty string, got {self.uri!r}")
        if not _SLIDE_ID.match(self.slide_id) or self.slide_id in (".", ".."):
            raise ConfigError(f"slide_id must match [A-Za-z0-9._-]+, got {self.slide_id!r} (for {redact(self.uri)})")
        if self.mpp is not None and not (isinstance(self.mpp, int | float) and math.isfinite(self.mpp)
                                         and self.mpp > 0):
            raise ConfigError(f"mpp must be a positive number, got {self.mpp!r} (for {redact(self.uri)})")


@dataclass(frozen=True)
class _Entry:
    """A slide found before ids are assigned: explicit id and mpp come from a manifest."""

    uri: str
    slide_id: str | None = None
    mpp: float | None = None


def expand_inputs(items: Sequence[str], *, storage_options: Mapping[str, Any] | None = None) -> list[SlideInput]:
    """Every slide named by ``items``, in order (listings and globs sorted), URIs de-duplicated.

    Slide ids are a manifest's ``slide_id`` or ``stable_slide_id(uri)`` (file stem plus a
    digest of the canonical URI): the same file always gets the same id.
    Raises ConfigError (cause chained) for unreadable or invalid manifests, unlistable
    locations and duplicated explicit ids; an empty directory, prefix or glob only logs
    a warning.
    """
    if isinstance(items, str):
        raise ConfigError("inputs must be a sequence of paths or URLs, not a single string")
    options = dict(storage_options or {})
    entries: list[_Entry] = []
    for item in items:
        entries.extend(_expand_item(os.fspath(item), options))
    return _assign_ids(_unique_uris(entries))


def _expand_item(item: str, options: dict[str, Any]) -> list[_Entry]:
    if not item.strip():
        raise ConfigError("an input is an empty string")
    if _suffix(item) in MANIFEST_SUFFIXES:
        return _read_manifest(item, storage_options=options)
    if "://" not in item:
        return [_Entry(p) for p in _expand_local(item)]
    fs, path = _filesystem(item, options)
    if _GLOB_CHARS.search(path):
        fs.invalidate_cache()  # glob walks cached listings; a long-lived driver must list afresh
        found = _listing(item, lambda: [p for p, d in fs.glob(path, detail=True).items() if d.get("type") != "directory"])
        if not found:
            logger.warning("no object matches %s", redact(item))
        return [_Entry(fs.unstrip_protocol(p)) for p in sorted(found)]
    if item.endswith("/") or (_suffix(item) not in SLIDE_SUFFIXES and _listing(item, lambda: fs.isdir(path))):
        return [_Entry(fs.unstrip_protocol(p)) for p in _list_slides(fs, path, item)]
    return [_Entry(item)]


def _expand_local(item: str) -> list[str]:
    """A local path, directory (recursive) or glob (``**`` allowed) to paths."""
    if _GLOB_CHARS.search(item):
        matches = sorted(p for p in glob.glob(item, recursive=True) if not os.path.isdir(p))
        if not matches:
            logger.warning("no file matches %s", item)
        return matches
    if os.path.isdir(item):
        found: list[str] = []
        for root, dirs, files in os.walk(item):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found.extend(os.path.join(root, f) for f in files if _is_slide_name(f))
        if not found:
            logger.warning("no slide (%s) under %s", ", ".join(SLIDE_SUFFIXES), item)
        return sorted(found)
    return [item]


def _list_slides(fs: Any, path: str, item: str) -> list[str]:
    """Slide-like files under a remote directory or prefix, recursively, sorted (``find`` always lists afresh)."""
    root = path.rstrip("/")
    found = sorted(p for p in _listing(item, lambda: fs.find(root)) if _is_slide_name(posixpath.basename(p)))
    if not found:
        logger.warning("no slide (%s) under %s", ", ".join(SLIDE_SUFFIXES), redact(item))
    return found


def _listing(item: str, action: Any) -> Any:
    try:
        return action()
    except Exception as exc:
        raise ConfigError(f"cannot list {redact(item)}: {type(exc).__name__}: {redact(str(exc))}") from exc


def _read_manifest(uri: str, *, storage_options: Mapping[str, Any] | None = None) -> list[_Entry]:
    """Rows of a ``.csv`` or ``.parquet`` manifest; relative ``slide_uri`` values are
    resolved against the manifest's own directory."""
    table = _read_table(uri, dict(storage_options or {}))
    if "slide_uri" not in table.column_names:
        raise ConfigError(f"manifest {redact(uri)} has no 'slide_uri' column (columns: {table.column_names})")
    try:
        uris = [None if v is None else str(v).strip() for v in table.column("slide_uri").to_pylist()]
        ids = _optional_column(table, "slide_id", pa.string())
        mpps = _optional_column(table, "mpp", pa.float64())
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise ConfigError(f"manifest {redact(uri)}: bad column values: {exc}") from exc
    entries = []
    for row, (slide_uri, slide_id, mpp) in enumerate(zip(uris, ids, mpps), start=1):
        if not slide_uri:
            raise ConfigError(f"manifest {redact(uri)}, row {row}: empty slide_uri")
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise ConfigError(f"manifest {redact(uri)}, row {row}: mpp must be positive, got {mpp}")
        slide_id = slide_id.strip() if slide_id and slide_id.strip() else None
        if slide_id is not None and (not _SLIDE_ID.match(slide_id) or slide_id in (".", "..")):
            raise ConfigError(f"manifest {redact(uri)}, row {row}: slide_id must match [A-Za-z0-9._-]+, got {slide_id!r}")
        entries.append(_Entry(_resolve(slide_uri, uri), slide_id, mpp))
    _check_unique_ids(entries, f"manifest {redact(uri)}")
    return entries


def _read_table(uri: str, options: dict[str, Any]) -> pa.Table:
    try:
        fs, path = _filesystem(uri, options) if "://" in uri else (fsspec.filesystem("file"), uri)
        with fs.open(path, "rb") as fh:
            if _suffix(uri) == ".parquet":
                return pq.read_table(fh)
            types = {"slide_uri": pa.string(), "slide_id": pa.string()}
            return pa_csv.read_csv(fh, convert_options=pa_csv.ConvertOptions(column_types=types))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot read manifest {redact(uri)}: {type(exc).__name__}: {redact(str(exc))}") from exc


def _optional_column(table: pa.Table, name: str, type_: pa.DataType) -> list[Any]:
    if name not in table.column_names:
        return [None] * table.num_rows
    return table.column(name).cast(type_).to_pylist()  # type: ignore[no-any-return]


def _resolve(slide_uri: str, manifest: str) -> str:
    """``slide_uri`` as written when absolute or a URL, else relative to the manifest's directory."""
    if "://" in slide_uri or os.path.isabs(slide_uri):
        return slide_uri
    if "://" in manifest:
        return posixpath.join(manifest.rsplit("/", 1)[0], slide_uri)
    return os.path.join(os.path.dirname(manifest), slide_uri)


def _check_unique_ids(entries: Sequence[_Entry], where: str) -> None:
    seen: dict[str, str] = {}
    for entry in entries:
        if entry.slide_id is None:
            continue
        if entry.slide_id in seen and seen[entry.slide_id] != entry.uri:
            raise ConfigError(f"{where}: slide_id {entry.slide_id!r} is given to both "
                              f"{redact(seen[entry.slide_id])} and {redact(entry.uri)}")
        seen[entry.slide_id] = entry.uri


def _unique_uris(entries: Sequence[_Entry]) -> list[_Entry]:
    """First entry of each slide (compared by canonical URI: absolute paths, no signatures)."""
    kept: dict[str, _Entry] = {}
    for entry in entries:
        key = canonical_uri(entry.uri)
        if key in kept:
            logger.debug("dropping repeated input %s", redact(entry.uri))
            continue
        kept[key] = entry
    return list(kept.values())


def stable_slide_id(uri: str) -> str:
    """The id of a slide named by nothing but ``uri``: its sanitised file stem and 8 hex digits
    of its canonical URI (``common.identity``), so that no other input and no input order can
    change it, and two files with one stem never share it."""
    return f"{slide_id_from_uri(uri)}-{short_digest(canonical_uri(uri))}"


def _assign_ids(entries: Sequence[_Entry]) -> list[SlideInput]:
    _check_unique_ids(entries, "inputs")
    result = [SlideInput(e.uri, e.slide_id or stable_slide_id(e.uri), e.mpp) for e in entries]
    seen: dict[str, str] = {}
    for item in result:  # a manifest's explicit id may equal another slide's derived one
        if item.slide_id in seen:
            raise ConfigError(f"inputs: slide_id {item.slide_id!r} is given to both "
                              f"{redact(seen[item.slide_id])} and {redact(item.uri)}")
        seen[item.slide_id] = item.uri
    return result


def _filesystem(uri: str, options: dict[str, Any]) -> tuple[Any, str]:
    """fsspec filesystem and path of a URL; storage options go to remote filesystems only."""
    try:
        return url_to_fs(uri, options)
    except Exception as exc:
        raise ConfigError(f"cannot open {redact(uri)}: {type(exc).__name__}: {redact(str(exc))}") from exc


def _suffix(uri: str) -> str:
    name = uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return os.path.splitext(name)[1].lower()


def _is_slide_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in SLIDE_SUFFIXES


def with_s3_retries(storage_options: Mapping[str, Any] | None, uris: Sequence[str], *,
                    environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``storage_options`` plus botocore's standard retry mode with ``S3_RETRY_ATTEMPTS`` attempts
    when any of ``uris`` is on S3, unless the options (``config_kwargs.retries``) or the
    environment (``AWS_RETRY_MODE``, ``AWS_MAX_ATTEMPTS``) already choose retries.

    botocore, not s3fs, retries 500 InternalError and 503 SlowDown replies (s3fs retries
    only replies that name SlowDown in their body); its default, legacy mode with 5
    attempts, can give up in a burst of throttling.
    """
    options = dict(storage_options or {})
    env = os.environ if environ is None else environ
    on_s3 = any(str(u).lower().startswith(("s3://", "s3a://")) for u in uris)
    config = dict(options.get("config_kwargs") or {})
    if not on_s3 or "retries" in config or "AWS_RETRY_MODE" in env or "AWS_MAX_ATTEMPTS" in env:
        return options
    # total_max_attempts, not max_attempts: botocore rewrites the latter in place
    config["retries"] = {"mode": "standard", "total_max_attempts": S3_RETRY_ATTEMPTS}
    options["config_kwargs"] = config
    return options


__all__ = ["MANIFEST_SUFFIXES", "S3_RETRY_ATTEMPTS", "SLIDE_SUFFIXES", "SlideInput", "expand_inputs", "stable_slide_id",
           "redact", "redacted_options", "with_s3_retries"]
