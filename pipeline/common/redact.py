"""Credentials kept out of every output: URLs and storage options made fit for logs and tables.

``redact`` masks URL userinfo (``user:pass@``) and signing or token query values
(presigned S3 and Azure SAS URLs); ``redacted_options`` masks secret-like storage options.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: Keys of storage options (at any depth) whose values are secrets.
_SECRET_KEY = re.compile(r"key|secret|token|passw|credential|signature|auth|sas", re.IGNORECASE)
#: ``user@`` or ``user:password@`` after a URL scheme; raw (unencoded) secrets often hold "/".
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?:[^/@\s]+|[^/@\s:]*:[^@\s]*)@")
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|awsaccesskeyid|"
    r"sig|token|access_token|password|secret|key|sv|se)=)[^&#\s]+",
    re.IGNORECASE,
)


def redact(uri_or_text: str) -> str:
    """``uri_or_text`` with URL credentials (``user:pass@``) and signing query values replaced by ``***``."""
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}***@", str(uri_or_text))
    return _QUERY_SECRET.sub(lambda m: f"{m['name']}***", text)


def redacted_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``storage_options`` fit for logs and run.json: secret-like values are
    ``"***"`` (at any depth), URLs lose their credentials."""
    return {str(k): _redact_value(str(k), v) for k, v in dict(storage_options or {}).items()}


def _redact_value(name: str, value: Any) -> Any:
    if value is not None and _SECRET_KEY.search(name) and not isinstance(value, Mapping | bool):
        return "***"
    if isinstance(value, Mapping):
        return {str(k): _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(name, v) for v in value]
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(repr(value))
