"""Slide IO failures by cause: not found, access refused, storage unavailable (retried), corrupt.

Against moto on 127.0.0.1 (with IAM checks for refused credentials), the fault-injecting
proxy of ``tests/s3util.py`` and a tiny local HTTP server; botocore's own retries are
turned off where a test counts the retries made by ``Slide`` itself.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import pickle
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nucleiscope.pipeline.common.errors import (
    SlideAccessError,
    SlideError,
    SlideFormatError,
    SlideNotFoundError,
    SlideUnavailableError,
)
from nucleiscope.pipeline.slides.remote import RetryPolicy, classify
from nucleiscope.pipeline.slides.slide import Slide
from tests.synthetic import SyntheticTruth

from .s3util import (
    DROP_CONNECTION,
    FlakyS3Proxy,
    S3Endpoint,
    iam_enforced,
    put_bytes,
    refused_credentials,
    storage_options_for,
    upload,
)

#: Only Slide's own retries: botocore makes one attempt; small blocks make many ranged GETs.
ONE_ATTEMPT = {"config_kwargs": {"retries": {"total_max_attempts": 1}},
               "default_cache_type": "blockcache", "default_block_size": 256 << 10}
FAST = RetryPolicy(attempts=6, base_delay_s=0.001, max_delay_s=0.01)
ALWAYS = 0.999999  # the proxy's fault_share must stay below 1
REGION = (100.0, 200.0, 700, 500, 0.5)
RETRY_LOGGER = "nucleiscope.pipeline.slides.remote"


@pytest.fixture
def s3_slide(s3_server: S3Endpoint, s3_bucket: Callable[[], str], synthetic_slide: SyntheticTruth) -> str:
    return upload(s3_server, [synthetic_slide.path], f"s3://{s3_bucket()}/slides/")[0]


@pytest.fixture(scope="module")
def local_region(synthetic_slide: SyntheticTruth) -> np.ndarray:
    with Slide.open(synthetic_slide.path) as slide:
        return slide.read_region(*REGION)


def retries_logged(caplog: pytest.LogCaptureFixture) -> int:
    return sum("failed transiently" in r.getMessage() for r in caplog.records if r.name == RETRY_LOGGER)


# --- not found, refused ----------------------------------------------------------------------


def test_missing_object_or_bucket_is_not_found(s3_server: S3Endpoint, s3_slide: str) -> None:
    bucket = s3_slide.split("/")[2]
    for uri, reason in ((f"s3://{bucket}/slides/nope.svs", "no such file"),
                        ("s3://no-such-bucket-3f9a/slides/a.svs", "no such bucket")):
        with pytest.raises(SlideNotFoundError) as caught:
            Slide.open(uri, storage_options=s3_server.storage_options, retry=FAST)
        assert type(caught.value) is SlideNotFoundError and caught.value.reason == reason
        assert caught.value.uri == uri and isinstance(caught.value.__cause__, FileNotFoundError)


def test_refused_credentials_are_access_errors_and_not_retried(
    s3_server: S3Endpoint, s3_slide: str, flaky_s3: Callable[..., FlakyS3Proxy]
) -> None:
    pytest.importorskip("moto.core.authorization", reason="moto without IAM simulation")
    proxy = flaky_s3(fault_share=0.0)
    cases = refused_credentials(s3_server)
    with iam_enforced():
        for why, options in cases.items():
            proxy.reset_counts()
            via_proxy = {**options, "client_kwargs": {**options["client_kwargs"], "endpoint_url": proxy.url}}
            with pytest.raises(SlideAccessError) as caught:
                Slide.open(s3_slide, storage_options=via_proxy, retry=FAST)
            assert type(caught.value) is SlideAccessError, why
            assert caught.value.reason.startswith("access denied: HTTP 403"), (why, caught.value.reason)
            assert isinstance(caught.value.__cause__, PermissionError), why
            assert sum(proxy.requests.values()) == 1, (why, proxy.requests)  # a 403 is not retried
            assert options["secret"] not in str(caught.value)
    with Slide.open(s3_slide, storage_options=s3_server.storage_options) as slide:  # IAM checks off again
        assert slide.info.width_px == 3000


# --- transient failures ----------------------------------------------------------------------


def test_transient_faults_are_retried_until_reads_succeed(
    s3_slide: str, flaky_s3: Callable[..., FlakyS3Proxy], local_region: np.ndarray,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = flaky_s3(fault_share=0.2, seed=5, fault_statuses=(500,))
    caplog.set_level(logging.INFO, logger=RETRY_LOGGER)
    with Slide.open(s3_slide, storage_options=proxy.storage_options(**ONE_ATTEMPT), retry=FAST) as slide:
        np.testing.assert_array_equal(slide.read_region(*REGION), local_region)
    # botocore made one attempt per request and s3fs does not retry a 500: every fault that
    # was survived was survived by Slide's retries, one logged retry per failed try
    assert proxy.faults > 0 and 1 <= retries_logged(caplog) <= proxy.faults


def test_dropped_connections_are_retried(
    s3_slide: str, flaky_s3: Callable[..., FlakyS3Proxy], local_region: np.ndarray
) -> None:
    proxy = flaky_s3(fault_share=0.2, seed=3, fault_statuses=(DROP_CONNECTION,))
    with Slide.open(s3_slide, storage_options=proxy.storage_options(**ONE_ATTEMPT), retry=FAST) as slide:
        np.testing.assert_array_equal(slide.read_region(*REGION), local_region)
    assert proxy.faults > 0


def test_a_storage_that_keeps_failing_is_unavailable_after_bounded_attempts(
    s3_slide: str, flaky_s3: Callable[..., FlakyS3Proxy], local_region: np.ndarray,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.01)
    proxy = flaky_s3(fault_share=ALWAYS, fault_statuses=(500,))
    options = proxy.storage_options(**ONE_ATTEMPT)
    with pytest.raises(SlideUnavailableError) as caught:
        Slide.open(s3_slide, storage_options=options, retry=policy)
    assert caught.value.reason.startswith("unavailable: HTTP 500") and "after 3 attempts" in caught.value.reason
    assert proxy.requests == Counter({"HEAD": 3})  # each try opens afresh, starting with a HEAD

    proxy.fault_share = 0.0
    caplog.set_level(logging.INFO, logger=RETRY_LOGGER)
    with Slide.open(s3_slide, storage_options=options, retry=policy) as slide:
        proxy.fault_share = ALWAYS
        with pytest.raises(SlideUnavailableError, match="after 3 attempts"):
            slide.read_region(*REGION)
        assert retries_logged(caplog) == 2
        proxy.fault_share = 0.0  # the storage recovers: the same open slide reads again
        np.testing.assert_array_equal(slide.read_region(*REGION), local_region)


def test_dropped_or_refused_connections_end_unavailable(
    s3_slide: str, flaky_s3: Callable[..., FlakyS3Proxy]
) -> None:
    once = RetryPolicy(attempts=1)
    proxy = flaky_s3(fault_share=ALWAYS, fault_statuses=(DROP_CONNECTION,))
    with pytest.raises(SlideUnavailableError, match=r"Connection reset by peer|Server disconnected"):
        Slide.open(s3_slide, storage_options=proxy.storage_options(**ONE_ATTEMPT), retry=once)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(SlideUnavailableError, match=r"EndpointConnectionError.*Connect call failed"):
        Slide.open(s3_slide, storage_options=storage_options_for(closed, **ONE_ATTEMPT), retry=once)


# --- corrupt files ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated", "random_bytes", "text"])
def test_corrupt_objects_are_format_errors_without_retries(
    kind: str, s3_server: S3Endpoint, s3_bucket: Callable[[], str], bad_inputs: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri = put_bytes(s3_server, f"s3://{s3_bucket()}/bad/{kind}.svs", bad_inputs[kind].read_bytes())
    caplog.set_level(logging.INFO, logger=RETRY_LOGGER)
    with pytest.raises(SlideFormatError) as caught:  # a truncated file may only fail when its tiles are read
        with Slide.open(uri, storage_options={**s3_server.storage_options, **ONE_ATTEMPT}, retry=FAST) as slide:
            slide.read_region(0, 0, slide.info.width_px, slide.info.height_px, slide.info.mpp)
    assert type(caught.value) is SlideFormatError and caught.value.__cause__ is not None
    assert retries_logged(caplog) == 0


# --- other filesystems -------------------------------------------------------------------------


@pytest.fixture
def http_statuses() -> Iterator[tuple[str, Counter[str]]]:
    """A local HTTP server answering /<status>/... with that status (no body); (url, requests by path)."""
    seen: Counter[str] = Counter()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass

        def do_GET(self) -> None:
            seen[self.path] += 1
            self.send_response(int(self.path.split("/")[1]))
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "expected", "retried"), [
    (404, SlideNotFoundError, False), (403, SlideAccessError, False), (401, SlideAccessError, False),
    (503, SlideUnavailableError, True), (500, SlideUnavailableError, True),
])
def test_http_answers_by_status(http_statuses: tuple[str, Counter[str]], status: int,
                                expected: type[SlideError], retried: bool) -> None:
    url, seen = http_statuses
    requests = []
    for attempts in (1, 3):
        uri = f"{url}/{status}/slide-{attempts}.svs?X-Amz-Signature=s3cr3t"
        with pytest.raises(expected) as caught:
            Slide.open(uri, retry=RetryPolicy(attempts=attempts, base_delay_s=0.001, max_delay_s=0.01))
        assert type(caught.value) is expected and caught.value.uri == uri
        assert "s3cr3t" not in caught.value.reason
        requests.append(sum(n for path, n in seen.items() if path.startswith(f"/{status}/slide-{attempts}.svs")))
    assert requests[0] >= 1 and requests[1] == requests[0] * (3 if retried else 1), requests


def test_local_missing_and_unreadable_files(tmp_path: Path, synthetic_slide: SyntheticTruth) -> None:
    with pytest.raises(SlideNotFoundError, match="no such file"):
        Slide.open(str(tmp_path / "absent.svs"))
    with pytest.raises(SlideFormatError, match="directory"):
        Slide.open(str(tmp_path))


# --- classification of library exceptions ----------------------------------------------------


def _client_error(status: int, code: str, message: str = "m") -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _s3fs_wrapped(cause: Exception, number: int) -> OSError:
    """What s3fs raises: an OSError with an errno, caused by botocore's ClientError."""
    exc = OSError(number, str(cause))
    exc.__cause__ = cause
    return exc


def _cases() -> list[tuple[str, Callable[[], BaseException], type[SlideError] | None]]:
    import aiohttp
    from botocore import exceptions as bce
    from fsspec.exceptions import FSTimeoutError

    def response_error(status: int) -> BaseException:
        return aiohttp.ClientResponseError(None, (), status=status, message="m")  # type: ignore[arg-type]

    return [
        ("404 NoSuchKey", lambda: _client_error(404, "NoSuchKey"), SlideNotFoundError),
        ("NoSuchBucket", lambda: _client_error(404, "NoSuchBucket"), SlideNotFoundError),
        ("403 AccessDenied", lambda: _client_error(403, "AccessDenied"), SlideAccessError),
        ("403 InvalidAccessKeyId", lambda: _client_error(403, "InvalidAccessKeyId"), SlideAccessError),
        ("400 ExpiredToken", lambda: _client_error(400, "ExpiredToken"), SlideAccessError),
        ("503 SlowDown via s3fs", lambda: _s3fs_wrapped(_client_error(503, "SlowDown"), errno.EBUSY),
         SlideUnavailableError),
        ("500 InternalError via s3fs", lambda: _s3fs_wrapped(_client_error(500, "InternalError"), 121),
         SlideUnavailableError),
        ("400 RequestTimeout", lambda: _client_error(400, "RequestTimeout"), SlideUnavailableError),
        ("429", lambda: _client_error(429, "TooManyRequests"), SlideUnavailableError),
        ("416 InvalidRange", lambda: _client_error(416, "InvalidRange"), None),
        ("NoCredentialsError", bce.NoCredentialsError, SlideAccessError),
        ("EndpointConnectionError", lambda: bce.EndpointConnectionError(endpoint_url="http://h"),
         SlideUnavailableError),
        ("ConnectionClosedError", lambda: bce.ConnectionClosedError(endpoint_url="http://h"),
         SlideUnavailableError),
        ("ReadTimeoutError", lambda: bce.ReadTimeoutError(endpoint_url="http://h"), SlideUnavailableError),
        ("ConnectTimeoutError", lambda: bce.ConnectTimeoutError(endpoint_url="http://h"), SlideUnavailableError),
        ("botocore SSLError", lambda: bce.SSLError(endpoint_url="http://h", error="bad cert"), None),
        ("aiohttp 403", lambda: response_error(403), SlideAccessError),
        ("aiohttp 502", lambda: response_error(502), SlideUnavailableError),
        ("aiohttp 404", lambda: response_error(404), SlideNotFoundError),
        ("ServerDisconnectedError", aiohttp.ServerDisconnectedError, SlideUnavailableError),
        ("ClientPayloadError", lambda: aiohttp.ClientPayloadError("cut"), SlideUnavailableError),
        ("asyncio timeout", asyncio.TimeoutError, SlideUnavailableError),
        ("FSTimeoutError", FSTimeoutError, SlideUnavailableError),
        ("ConnectionResetError", lambda: ConnectionResetError(errno.ECONNRESET, "reset"), SlideUnavailableError),
        ("PermissionError", lambda: PermissionError("Forbidden"), SlideAccessError),
        ("FileNotFoundError", lambda: FileNotFoundError("k"), SlideNotFoundError),
        ("ValueError (a decoder)", lambda: ValueError("bad JPEG"), None),
        ("OSError EIO alone", lambda: OSError(errno.EIO, "io"), None),
    ]


@pytest.mark.parametrize(("name", "make", "expected"), _cases(), ids=[c[0] for c in _cases()])
def test_library_exceptions_are_classified(name: str, make: Callable[[], BaseException],
                                           expected: type[SlideError] | None) -> None:
    kind, detail = classify(make())
    assert kind is expected, name
    assert bool(detail) == (expected is not None)


def test_a_decoder_error_raised_while_handling_a_network_error_is_transient() -> None:
    try:
        try:
            raise _s3fs_wrapped(_client_error(503, "SlowDown", "reduce your request rate"), errno.EBUSY)
        except OSError:
            raise ValueError("tile decode failed") from None
    except ValueError as exc:
        assert classify(exc) == (None, "")  # ``from None``: the network error is not the cause
    try:
        try:
            raise _s3fs_wrapped(_client_error(503, "SlowDown", "reduce your request rate"), errno.EBUSY)
        except OSError:
            raise ValueError("tile decode failed")  # noqa: B904 - the implicit context is the point
    except ValueError as exc:
        assert classify(exc) == (SlideUnavailableError, "HTTP 503 SlowDown: reduce your request rate")


# --- pickling (Ray moves errors between processes) ---------------------------------------------


@pytest.mark.parametrize("kind", [SlideNotFoundError, SlideAccessError, SlideUnavailableError, SlideFormatError])
def test_errors_survive_pickling(kind: type[SlideError]) -> None:
    error = kind("s3://b/k.svs", "a readable reason")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is kind and (back.uri, back.reason, str(back)) == (error.uri, error.reason, str(error))
    assert isinstance(back, SlideError)


def test_a_raised_storage_error_survives_pickling(s3_server: S3Endpoint, s3_bucket: Callable[[], str]) -> None:
    uri = f"s3://{s3_bucket()}/none.svs"
    with pytest.raises(SlideNotFoundError) as caught:
        Slide.open(uri, storage_options=s3_server.storage_options)
    import ray.cloudpickle

    for dumps, loads in ((pickle.dumps, pickle.loads), (ray.cloudpickle.dumps, ray.cloudpickle.loads)):
        back = loads(dumps(caught.value))
        assert type(back) is SlideNotFoundError and (back.uri, back.reason) == (uri, "no such file")
