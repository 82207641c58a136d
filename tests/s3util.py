"""Local S3 for tests and benchmarks: a moto server, uploads, and a fault-injecting proxy.

Everything listens on 127.0.0.1 only. Setup (buckets, uploads) goes through a plain
boto3 client, never through s3fs, so no s3fs instance or listing cache is involved in
preparing test data; code under test that lists through s3fs after an upload must see
fresh listings on its own.
"""

from __future__ import annotations

import email.utils
import http.client
import os
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

REGION = "us-east-1"
CREDENTIALS = {"key": "testing", "secret": "testing"}
#: Headers that belong to one connection, not to the message (RFC 9110 section 7.6.1).
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-connection",
})
#: S3 error replies the proxy injects, by HTTP status.
FAULTS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
}
_CHUNK_BYTES = 64 << 10
#: Pseudo-status for ``fault_statuses``: reset the connection (TCP RST) without any answer.
DROP_CONNECTION = 0


@dataclass(frozen=True)
class S3Endpoint:
    """An S3-compatible endpoint and the settings that reach it."""

    url: str
    storage_options: dict[str, Any]
    #: The same settings as AWS environment variables (standard credential chain).
    env: dict[str, str] = field(default_factory=dict)

    def client(self, **config: Any) -> Any:
        """A plain boto3 client (no s3fs caches) for setting up test data; ``config``: botocore
        ``Config`` fields (``signature_version="s3v4"`` for SigV4 presigned URLs)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.url, region_name=REGION, config=Config(**config) if config else None,
            aws_access_key_id=CREDENTIALS["key"], aws_secret_access_key=CREDENTIALS["secret"],
        )


def storage_options_for(url: str, **extra: Any) -> dict[str, Any]:
    """fsspec/s3fs options with the dummy credentials and ``url`` as the endpoint."""
    return {**CREDENTIALS, "client_kwargs": {"endpoint_url": url, "region_name": REGION}, **extra}


def aws_env(url: str) -> dict[str, str]:
    """Environment variables that point botocore's standard chain at ``url`` and nothing else."""
    return {
        "AWS_ACCESS_KEY_ID": CREDENTIALS["key"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret"],
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": url,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


#: Variables removed from the environment while the test endpoint's are set.
AWS_VARS_TO_CLEAR = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3")


@contextmanager
def moto_s3() -> Iterator[S3Endpoint]:
    """A moto S3 server on 127.0.0.1 (a free port) for the duration of the block."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        yield S3Endpoint(url, storage_options_for(url), aws_env(url))
    finally:
        server.stop()


@contextmanager
def patched_environ(values: Mapping[str, str], clear: Iterable[str] = ()) -> Iterator[None]:
    """Set (and remove) environment variables, restoring the previous values afterwards."""
    saved = {name: os.environ.get(name) for name in [*values, *clear]}
    try:
        for name in clear:
            os.environ.pop(name, None)
        os.environ.update(values)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def new_bucket(endpoint: S3Endpoint, prefix: str = "nucleiscope") -> str:
    """Create a bucket with a unique name; returns the name."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    endpoint.client().create_bucket(Bucket=name)
    return name


def upload(endpoint: S3Endpoint, files: Iterable[str | Path], dest: str) -> list[str]:
    """Upload local files to ``s3://bucket/prefix/`` (keeping their names); returns their URIs."""
    parts = urlsplit(dest)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"destination must be s3://bucket/prefix/, got {dest!r}")
    prefix = parts.path.strip("/")
    client = endpoint.client()
    uris = []
    for path in files:
        key = "/".join(p for p in (prefix, Path(path).name) if p)
        client.upload_file(str(path), parts.netloc, key)
        uris.append(f"s3://{parts.netloc}/{key}")
    return uris


def put_bytes(endpoint: S3Endpoint, uri: str, data: bytes) -> str:
    """Store ``data`` at ``uri`` (s3://bucket/key); returns ``uri``."""
    parts = urlsplit(uri)
    endpoint.client().put_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"), Body=data)
    return uri


@dataclass(frozen=True)
class MirroredObject:
    """A local, byte-identical copy of an object, with the upstream's ETag and Last-Modified."""

    path: Path
    etag: str
    last_modified: str


def mirror_of(endpoint: S3Endpoint, uri: str, local_path: str | Path) -> tuple[str, MirroredObject]:
    """(proxy path, mirror) for serving ``uri``'s reads from ``local_path``; see ``FlakyS3Proxy``."""
    parts = urlsplit(uri)
    head = endpoint.client().head_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))
    modified = email.utils.format_datetime(head["LastModified"].astimezone(timezone.utc), usegmt=True)
    return f"/{parts.netloc}{parts.path}", MirroredObject(Path(local_path), head["ETag"], modified)


class FlakyS3Proxy:
    """HTTP proxy on 127.0.0.1 in front of an S3 endpoint that fails some requests on purpose.

    Request number n (counting from 0, over all connections) is answered with an S3
    error instead of being forwarded when the n-th draw of ``random.Random(seed)`` is
    below ``fault_share``; faults cycle through ``fault_statuses`` (default 503 SlowDown,
    500 InternalError; see ``FAULTS``; ``DROP_CONNECTION`` resets the connection instead).
    Other requests are forwarded verbatim (method, path, query, all end-to-end headers
    including Host, Range and the signature; bodies streamed both ways), so signed
    requests stay valid. Counters: ``requests`` (by method), ``faults``, ``ranged_gets``,
    ``body_bytes`` (response body bytes sent for GET). Use as a context manager;
    ``close`` stops the server and its threads.

    ``mirror`` maps request paths (``/bucket/key``) to local copies whose GET and HEAD
    the proxy answers itself (Range included), for benchmarks on large objects: moto
    copies a whole object on every ranged GET (``FakeKey.value``), which costs tenths
    of a second per request for a few hundred MB. Tests do not use it. ``latency_s`` delays
    every answer (requests overlap: one thread per connection), as a remote store's round
    trip does; moto on 127.0.0.1 answers in about a millisecond.
    """

    def __init__(self, upstream_url: str, *, fault_share: float = 0.2, seed: int = 0,
                 fault_statuses: Sequence[int] = (503, 500),
                 mirror: Mapping[str, MirroredObject] | None = None, latency_s: float = 0.0) -> None:
        if not 0.0 <= fault_share < 1.0:
            raise ValueError(f"fault_share must be in [0, 1), got {fault_share}")
        if not fault_statuses or any(status not in FAULTS and status != DROP_CONNECTION
                                     for status in fault_statuses):
            raise ValueError(f"fault_statuses must be some of {sorted(FAULTS)} or DROP_CONNECTION, "
                             f"got {fault_statuses}")
        self.fault_statuses = tuple(fault_statuses)
        target = urlsplit(upstream_url)
        if target.scheme != "http" or target.hostname is None or target.port is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream_url!r}")
        self.upstream = (target.hostname, target.port)
        self.fault_share = fault_share
        #: Seconds each request waits before it is answered (an object store's round trip).
        self.latency_s = float(latency_s)
        self.mirror = dict(mirror or {})
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.faults = 0
        self.faults_by_status: Counter[int] = Counter()
        self.requests: Counter[str] = Counter()
        self.ranged_gets = 0
        self.body_bytes = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="flaky-s3-proxy", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """s3fs options that reach the upstream through this proxy."""
        return storage_options_for(self.url, **extra)

    def reset_counts(self) -> None:
        with self._lock:
            self.faults = self.ranged_gets = self.body_bytes = 0
            self.faults_by_status.clear()
            self.requests.clear()

    def _admit(self, method: str, ranged: bool) -> tuple[int, str, str] | None:
        """Count a request; the fault to answer with, or None to forward it."""
        with self._lock:
            self.requests[method] += 1
            self.ranged_gets += int(method == "GET" and ranged)
            fail = self._rng.random() < self.fault_share
            if not fail:
                return None
            status = self.fault_statuses[self.faults % len(self.fault_statuses)]
            self.faults += 1
            self.faults_by_status[status] += 1
            return (status, *FAULTS.get(status, ("", "")))

    def _add_bytes(self, n: int) -> None:
        with self._lock:
            self.body_bytes += n

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FlakyS3Proxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _make_handler(proxy: FlakyS3Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        owner = proxy

    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    """One client connection; keeps one upstream connection for its requests."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    owner: FlakyS3Proxy
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silent: the counters say what happened."""

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._read_body()
        fault = self.owner._admit(self.command, "Range" in self.headers)
        if self.owner.latency_s > 0:
            time.sleep(self.owner.latency_s)
        if fault is not None and fault[0] == DROP_CONNECTION:
            self._drop_connection()
            return
        if fault is not None:
            self._send_fault(*fault)
            return
        mirrored = self.owner.mirror.get(urlsplit(self.path).path)
        if mirrored is not None and self.command in ("GET", "HEAD"):
            self._serve_mirror(mirrored)
            return
        try:
            response = self._forward(body)
        except (OSError, http.client.HTTPException):
            self._close_upstream()
            response = self._forward(body)  # a stale keep-alive connection: one fresh try
        self._relay(response)

    def _forward(self, body: bytes) -> http.client.HTTPResponse:
        if self._upstream is None:
            self._upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
            self._upstream.connect()
            self._upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = self._upstream
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                conn.putheader(name, value)
        if body or self.command in ("PUT", "POST"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        return conn.getresponse()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        self.send_response_only(response.status, response.reason)
        length = response.getheader("Content-Length")
        chunked = length is None and self.command != "HEAD" and response.status not in (204, 304)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command == "HEAD":
            response.read()
            return
        while chunk := response.read(_CHUNK_BYTES):
            if self.command == "GET":  # counted before the client can see the bytes
                self.owner._add_bytes(len(chunk))
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _serve_mirror(self, obj: MirroredObject) -> None:
        size = obj.path.stat().st_size
        start, end = 0, size - 1
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if match:
            start, end = int(match[1]), min(size - 1, int(match[2] or size - 1))
        self.send_response_only(206 if match else 200)
        for name, value in (("ETag", obj.etag), ("Last-Modified", obj.last_modified),
                            ("Accept-Ranges", "bytes"), ("Content-Type", "binary/octet-stream"),
                            ("Content-Length", str(end - start + 1))):
            self.send_header(name, value)
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        self.owner._add_bytes(end - start + 1)  # counted before the client can see the bytes
        with open(obj.path, "rb") as fh:
            fh.seek(start)
            remaining = end - start + 1
            while remaining > 0 and (chunk := fh.read(min(_CHUNK_BYTES * 16, remaining))):
                self.wfile.write(chunk)
                remaining -= len(chunk)

    def _send_fault(self, status: int, code: str, message: str) -> None:
        payload = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _drop_connection(self) -> None:
        """Reset the client's connection (SO_LINGER 0: RST, not FIN), as a failing load balancer does."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _close_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._close_upstream()


# --- refused credentials (moto's IAM checks) -------------------------------------------------


@contextmanager
def iam_enforced() -> Iterator[None]:
    """While the block runs, every moto server of this process checks signatures and IAM
    permissions (so ``CREDENTIALS``, which belong to no IAM user, are refused with 403
    InvalidAccessKeyId). Set up test data before entering."""
    from moto.core.authorization import enable_iam_authentication

    with enable_iam_authentication():
        yield


def refused_credentials(endpoint: S3Endpoint) -> dict[str, dict[str, Any]]:
    """s3fs storage options that moto refuses under ``iam_enforced``, by why: an access key id
    that does not exist, a real key id with the wrong secret, and a real user with no policy.
    Creates an IAM user (call before entering ``iam_enforced``)."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint.url, region_name=REGION,
                       aws_access_key_id=CREDENTIALS["key"], aws_secret_access_key=CREDENTIALS["secret"])
    user = f"nobody-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    real_id, real_secret = key["AccessKeyId"], key["SecretAccessKey"]
    return {
        "unknown key id": {**endpoint.storage_options, "key": "AKIANOSUCHKEY0000000", "secret": "x" * 40},
        "wrong secret": {**endpoint.storage_options, "key": real_id, "secret": "y" * 40},
        "no permission": {**endpoint.storage_options, "key": real_id, "secret": real_secret},
    }
