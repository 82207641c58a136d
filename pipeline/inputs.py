"""Cohort inputs: paths, globs, object-store prefixes and manifests -> slides to process.

A manifest is a CSV or Parquet file with a ``slide_uri`` column and optional
``slide_id`` and ``mpp`` columns. Slide ids default to the file stem and are made
unique deterministically. Credentials never leave this module in logs: ``redact``
and ``redacted_options`` strip them from URLs and storage options.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from .errors import ConfigError
from .slide import slide_id_from_uri

log = logging.getLogger(__name__)

#: Single-file slide formats tiffslide reads.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff")
MANIFEST_SUFFIXES = (".csv", ".parquet")
_SECRET_KEYS = re.compile(r"(key|secret|token|password|credential)", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


@dataclass(frozen=True)
class SlideInput:
    """One slide of a cohort: where it is, its id, and an optional µm/px override."""

    uri: str
    slide_id: str
    mpp: float | None = None


def redact(text: str) -> str:
    """``text`` with any ``user:password@`` part of URLs removed."""
    return _URL_CREDENTIALS.sub("", text)


def redacted_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Storage options fit for logs and run.json: secret-like values become ``***``."""
    clean: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if isinstance(value, Mapping):
            clean[key] = redacted_options(value)
        elif _SECRET_KEYS.search(str(key)) and str(key) not in ("key_prefix",):
            clean[key] = "***"
        else:
            clean[key] = value
    return clean


def _is_remote(item: str) -> bool:
    return "://" in item and not item.startswith("file://")


def _expand_one(item: str, options: Mapping[str, Any]) -> list[tuple[str, str | None, float | None]]:
    """(uri, slide_id, mpp) triples for one command-line item."""
    if item.lower().endswith(MANIFEST_SUFFIXES):
        return _read_manifest(item, options)
    protocol = item.split("://", 1)[0] if "://" in item else "file"
    try:
        fs, path = fsspec.core.url_to_fs(item, **(options if _is_remote(item) else {}))
        if any(ch in path for ch in "*?["):
            found = sorted(fs.glob(path))
        elif item.endswith("/") or fs.isdir(path):
            fs.invalidate_cache(path)
            found = sorted(p for p in fs.find(path) if p.lower().endswith(SLIDE_SUFFIXES))
        else:
            return [(item, None, None)]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot list {redact(item)}: {exc}") from exc
    if not found:
        log.warning("no slides found in %s", redact(item))
    if protocol == "file":
        return [(p, None, None) for p in found]
    return [(f"{protocol}://{p}", None, None) for p in found]


def _read_manifest(uri: str, options: Mapping[str, Any]) -> list[tuple[str, str | None, float | None]]:
    import pandas as pd

    try:
        opts = dict(options) if _is_remote(uri) else None
        table = pd.read_parquet(uri, storage_options=opts) if uri.lower().endswith(".parquet") else pd.read_csv(
            uri, storage_options=opts)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the manifest {redact(uri)}: {exc}") from exc
    if "slide_uri" not in table.columns:
        raise ConfigError(f"the manifest {redact(uri)} has no slide_uri column (columns: {list(table.columns)})")
    rows = []
    for row in table.to_dict("records"):
        slide_id = row.get("slide_id")
        mpp = row.get("mpp")
        slide_id = None if slide_id is None or (isinstance(slide_id, float) and math.isnan(slide_id)) else str(slide_id)
        mpp = None if mpp is None or (isinstance(mpp, float) and math.isnan(mpp)) else float(mpp)
        if mpp is not None and not mpp > 0:
            raise ConfigError(f"the manifest {redact(uri)} gives a non-positive mpp for {row['slide_uri']}")
        rows.append((str(row["slide_uri"]), slide_id, mpp))
    ids = [r[1] for r in rows if r[1] is not None]
    if len(ids) != len(set(ids)):
        raise ConfigError(f"the manifest {redact(uri)} repeats a slide_id")
    return rows


def expand_inputs(items: Sequence[str], *, storage_options: Mapping[str, Any] | None = None) -> list[SlideInput]:
    """Slides named by paths, globs, URLs, prefixes and manifests, de-duplicated, ids unique."""
    options = dict(storage_options or {})
    triples: list[tuple[str, str | None, float | None]] = []
    for item in items:
        triples.extend(_expand_one(item, options))
    seen_uris: set[str] = set()
    used: set[str] = {t[1] for t in triples if t[1] is not None}
    slides = []
    for uri, slide_id, mpp in triples:
        if uri in seen_uris:
            continue
        seen_uris.add(uri)
        if slide_id is None:
            base = slide_id_from_uri(uri)
            slide_id, n = base, 1
            while slide_id in used:
                n += 1
                slide_id = f"{base}-{n}"
            used.add(slide_id)
        slides.append(SlideInput(uri, slide_id, mpp))
    return slides
