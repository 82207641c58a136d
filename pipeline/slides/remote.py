"""Storage errors of slide IO, told apart by what a caller would do about them, and retries.

``io_error`` turns whatever fsspec, s3fs, botocore or aiohttp raised into one of
``SlideNotFoundError`` (nothing at that address), ``SlideAccessError`` (401/403, missing or
bad credentials), ``SlideUnavailableError`` (dropped or refused connections, timeouts,
HTTP 5xx, throttling) or, for errors that are not about storage, the caller's fallback
(``SlideFormatError`` while decoding). It looks along the exception's chain, because s3fs
wraps botocore's ``ClientError`` in a plain ``OSError`` and botocore wraps aiohttp's.
``with_retries`` repeats a step that failed with ``SlideUnavailableError`` a bounded number
of times with jittered exponential backoff (on top of botocore's and s3fs's own retries,
which a storage option may have turned off).

Observed with s3fs 2026.9 / botocore 1.43 / aiohttp 3.14 against moto and a fault proxy:
missing key -> ``FileNotFoundError``; missing bucket -> ``FileNotFoundError`` from
``NoSuchBucket``; unknown key id, wrong secret, no permission -> ``PermissionError`` from
``ClientError`` 403 (HEAD: code "403"; GET/List: ``InvalidAccessKeyId``,
``SignatureDoesNotMatch``, ``AccessDenied``); 500 -> ``OSError(EREMOTEIO)`` from
``ClientError`` ``InternalError``/"500"; 503 -> ``OSError(EBUSY)`` from ``ClientError``
``SlowDown``/"503"; dropped connection -> ``ConnectionClosedError`` from aiohttp
``ServerDisconnectedError``; refused connection -> ``EndpointConnectionError`` from aiohttp
``ClientConnectorError``. fsspec's HTTP filesystem: 404 -> ``FileNotFoundError``, others
-> aiohttp ``ClientResponseError`` (status), reset -> aiohttp ``ClientOSError``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

from ..common.errors import (
    ConfigError,
    SlideAccessError,
    SlideError,
    SlideNotFoundError,
    SlideUnavailableError,
)
from ..common.redact import redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: S3 error codes, whatever their HTTP status, by the type they mean.
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchVersion", "404"})
_ACCESS_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "RequestTimeTooSkewed", "InvalidSecurity",
    "UnauthorizedAccess", "401", "403",
})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "503", "500",
    "502", "504",
})
_KINDS = {SlideNotFoundError: "not found", SlideAccessError: "access denied", SlideUnavailableError: "unavailable"}


@dataclass(frozen=True)
class RetryPolicy:
    """How often a step that failed transiently is tried in all, and the backoff between tries:
    ``base_delay_s * 2**k`` (k = 0, 1, ...) capped at ``max_delay_s``, times a random 0.5-1."""

    attempts: int = 3
    base_delay_s: float = 0.25
    max_delay_s: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if not (0 <= self.base_delay_s <= self.max_delay_s):
            raise ConfigError(f"need 0 <= base_delay_s <= max_delay_s, got {self.base_delay_s}, {self.max_delay_s}")

    def delay_s(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        return min(self.max_delay_s, self.base_delay_s * 2.0**retry) * random.uniform(0.5, 1.0)


#: Slide opens and tile reads: 3 tries, 0.375-0.75 s of waiting in all. Each request inside a try
#: has had botocore's and s3fs's own retries already (by default 5 attempts, and 5 more for
#: SlowDown), so a store that stays down costs a slide tens of seconds, not hours.
DEFAULT_RETRY = RetryPolicy()


def with_retries(step: Callable[[], T], uri: str, what: str, policy: RetryPolicy = DEFAULT_RETRY) -> T:
    """``step()``, tried again while it raises ``SlideUnavailableError``, at most
    ``policy.attempts`` times in all; the last error's reason says how many tries were made."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return step()
        except SlideUnavailableError as exc:
            if attempt == policy.attempts:
                if policy.attempts > 1:
                    raise SlideUnavailableError(uri, f"{exc.reason} (after {attempt} attempts)") from exc
                raise
            wait = policy.delay_s(attempt - 1)
            logger.info("%s of %s failed transiently (attempt %d of %d), retrying in %.2f s: %s",
                        what, redact(uri), attempt, policy.attempts, wait, exc.reason)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def io_error(uri: str, exc: BaseException, fallback: type[SlideError], reason: str) -> SlideError:
    """The typed error for ``exc`` (raise it ``from exc``): storage errors by their kind,
    anything else as ``fallback`` with ``reason`` (to which the cause is appended)."""
    kind, detail = classify(exc)
    if kind is None:
        return fallback(uri, redact(f"{reason} ({_describe(exc)})"))
    return kind(uri, redact(f"{_KINDS[kind]}: {detail}"))


def classify(exc: BaseException) -> tuple[type[SlideError] | None, str]:
    """(kind, description) of the storage failure along ``exc``'s chain; (None, "") when
    none of it is a storage error.

    The evidence ranks: an HTTP answer (status, S3 code) anywhere in the chain, then a
    transport failure (connection, timeout), then the Python type of a wrapper
    (``FileNotFoundError``, ``PermissionError``): fsspec's HTTP filesystem raises
    ``FileNotFoundError`` for any failure of ``info``, 403, 503 and resets included.
    """
    links = list(_chain(exc))
    answered = [(link, _kind_of_answer(link)) for link in links if _http_status_and_code(link) != (None, "")]
    if answered:
        link, kind = answered[0]
        return (kind, _http_answer(link)) if kind is not None else (None, "")
    for link in links:
        kind = _kind_of_transport(link)
        if kind is not None:
            root = links[-1]  # botocore's wrapper names the endpoint, the root says what broke
            return kind, _describe(link) + (f" ({_describe(root)})" if root is not link else "")
    for link in links:
        kind = _kind_of_type(link)
        if kind is not None:
            return kind, _describe(link)
    return None, ""


def not_found_reason(exc: BaseException) -> str:
    """"no such bucket" when the storage said so, else "no such file"."""
    codes = {_http_status_and_code(link)[1] for link in _chain(exc)}
    return "no such bucket" if "NoSuchBucket" in codes else "no such file"


def _http_answer(exc: BaseException) -> str:
    """"HTTP 403 AccessDenied: message" for an HTTP error answer, else ""."""
    status, code = _http_status_and_code(exc)
    if status is None and not code:
        return ""
    response = getattr(exc, "response", None)
    message = response["Error"].get("Message") if isinstance(response, dict) else getattr(exc, "message", "")
    words = [f"HTTP {status}" if status else "", code if code and code != str(status) else ""]
    head = " ".join(w for w in words if w) or "HTTP error"
    return f"{head}: {message}" if message else head


def _kind_of_answer(exc: BaseException) -> type[SlideError] | None:
    status, code = _http_status_and_code(exc)
    if code in _NOT_FOUND_CODES or status == 404:
        return SlideNotFoundError
    if code in _ACCESS_CODES or status in (401, 403):
        return SlideAccessError
    if code in _TRANSIENT_CODES or status == 429 or (status is not None and status >= 500):
        return SlideUnavailableError
    return None  # another HTTP answer (400 InvalidRange...): not a storage failure


def _kind_of_transport(exc: BaseException) -> type[SlideError] | None:
    if isinstance(exc, _types().not_transient):
        return None  # a TLS failure: retrying cannot help
    if isinstance(exc, ConnectionError | TimeoutError | asyncio.TimeoutError) or isinstance(exc, _types().transient):
        return SlideUnavailableError
    return None


def _kind_of_type(exc: BaseException) -> type[SlideError] | None:
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return SlideNotFoundError
    if isinstance(exc, PermissionError) or isinstance(exc, _types().access):
        return SlideAccessError
    return None


def _http_status_and_code(exc: BaseException) -> tuple[int | None, str]:
    """HTTP status and S3 error code of botocore's ``ClientError`` or aiohttp's ``ClientResponseError``."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and isinstance(response.get("Error"), dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return (int(status) if status else None), str(response["Error"].get("Code") or "")
    status = getattr(exc, "status", None)
    if isinstance(exc, _types().response) and isinstance(status, int):
        return status, ""
    return None, ""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ if link.__cause__ is not None or link.__suppress_context__ else link.__context__


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class _Types:
    access: tuple[type[BaseException], ...]
    transient: tuple[type[BaseException], ...]
    response: tuple[type[BaseException], ...]
    not_transient: tuple[type[BaseException], ...]


@cache
def _types() -> _Types:
    """Third-party exception classes, imported on first use (s3fs brings botocore and aiohttp)."""
    access: list[Any] = []
    transient: list[Any] = []
    response: list[Any] = []
    not_transient: list[Any] = [ssl.SSLError]
    try:
        from botocore import exceptions as bce

        access += [bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError,
                   bce.UnauthorizedSSOTokenError]
        # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError...
        transient += [bce.ConnectionError, bce.HTTPClientError, bce.ResponseStreamingError,
                      bce.IncompleteReadError]
        not_transient.append(bce.SSLError)  # a botocore ConnectionError, but retrying cannot help
    except ImportError:  # pragma: no cover - s3fs requires botocore
        pass
    try:
        import aiohttp

        transient += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
        response += [aiohttp.ClientResponseError]
        not_transient.append(aiohttp.ClientSSLError)
    except ImportError:  # pragma: no cover - s3fs requires aiohttp
        pass
    from http.client import IncompleteRead

    transient.append(IncompleteRead)
    return _Types(tuple(access), tuple(transient), tuple(response), tuple(not_transient))


__all__ = ["DEFAULT_RETRY", "RetryPolicy", "classify", "io_error", "not_found_reason", "with_retries"]
