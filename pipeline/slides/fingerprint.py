"""A slide file's content fingerprint: what tells a rerun that a file changed or moved.

The fingerprint is the object's size plus its ETag where the store gives one (S3, most
HTTP servers: a content hash for single-part uploads), else its modification time. It is
read from metadata (one HEAD or ``stat``), never from the content, so a cohort of 10,000
slides is fingerprinted in seconds; ``fingerprints`` asks for many at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from ..common.errors import SlideError
from ..common.redact import redact
from ..common.storage import url_to_fs
from .remote import io_error, with_retries

logger = logging.getLogger(__name__)

#: Metadata requests in flight at once when fingerprinting many slides.
FINGERPRINT_THREADS = 32


def fingerprint_of(info: Mapping[str, Any]) -> str:
    """A fingerprint from fsspec ``info`` fields: ``size=N;etag=E`` or ``size=N;mtime=T``."""
    size = info.get("size")
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"size={size};etag={str(etag).strip(chr(34))}"
    for key in ("mtime", "LastModified", "last_modified", "Last-Modified", "created"):
        stamp = info.get(key)
        if stamp is not None:
            value = stamp.timestamp() if isinstance(stamp, datetime) else stamp
            return f"size={size};mtime={value}"
    return f"size={size}"


def slide_fingerprint(uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The fingerprint of the slide at ``uri`` (one metadata request, retried when transient).
    Raises the typed SlideError of the cause (``remote.io_error``), chained."""

    def once() -> str:
        try:
            fs, path = url_to_fs(uri, storage_options)
            return fingerprint_of(fs.info(path))
        except Exception as exc:
            raise io_error(redact(uri), exc, SlideError, "cannot read its size and version") from exc

    return with_retries(once, redact(uri), "fingerprint")


def fingerprints(uris: Sequence[str], storage_options: Mapping[str, Any] | None = None) -> dict[str, str | None]:
    """Fingerprints of many slides, fetched concurrently; None for one that cannot be read
    (the run then treats it as new and its own error reaches the failures table)."""

    def one(uri: str) -> str | None:
        try:
            return slide_fingerprint(uri, storage_options)
        except SlideError as exc:
            logger.debug("no fingerprint for %s: %s", redact(uri), exc.reason)
            return None

    if not uris:
        return {}
    with ThreadPoolExecutor(max_workers=min(FINGERPRINT_THREADS, len(uris))) as pool:
        return dict(zip(uris, pool.map(one, uris)))


__all__ = ["FINGERPRINT_THREADS", "fingerprint_of", "fingerprints", "slide_fingerprint"]
