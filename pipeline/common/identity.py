"""What names a slide for good: its canonical URI and a short digest of it.

A slide's id must not depend on input order or on which other files a run names, so it is
a function of its own location only. ``canonical_uri`` is that location without anything
that changes when the same object is named again: a local path made absolute, URL userinfo
dropped, and the query values a presigned or SAS URL re-signs on every request (signature,
credential, date, expiry, token) removed; other query parameters are kept, sorted.
"""

from __future__ import annotations

import hashlib
import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: Query parameters that differ between two signings of the same object (S3 SigV4/SigV2,
#: CloudFront, Azure SAS, GCS signed URLs, plain tokens).
_EPHEMERAL_QUERY = re.compile(
    r"^(x-amz-.*|x-goog-.*|awsaccesskeyid|signature|expires|policy|key-pair-id|sig|se|st|sp|sv|sr|spr|"
    r"skoid|sktid|skt|ske|sks|skv|sdd|token|access_token|password|secret|key)$",
    re.IGNORECASE,
)


def canonical_uri(uri: str) -> str:
    """``uri`` as the same object is always named: absolute local path or a URL without
    credentials and signing query values (``file://`` URLs become paths)."""
    text = str(uri)
    if "://" not in text:
        return os.path.abspath(os.path.expanduser(text))
    parts = urlsplit(text)
    if parts.scheme.lower() in ("file", "local"):
        return os.path.abspath(parts.path)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    query = sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                   if not _EPHEMERAL_QUERY.match(k))  # fmt: skip
    return urlunsplit((parts.scheme.lower(), netloc, parts.path, urlencode(query), ""))


def short_digest(text: str, length: int = 8) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``text``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


__all__ = ["canonical_uri", "short_digest"]
