"""fsspec access to the output location, with errors translated to ``OutputError``.

``out`` is a local path or any fsspec URL (file://, memory://, s3:// with
``storage_options``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import NucleiscopeError, OutputError

_SLIDE_ID = re.compile(r"^[A-Za-z0-9._-]+$")
#: Protocols of the local filesystem: storage options (S3 endpoints, keys) never go to them.
LOCAL_PROTOCOLS = ("file", "local")


def url_to_fs(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path) of a local path or URL: the package's one fsspec resolution.

    Storage options go to remote filesystems only. Raises what fsspec raises: callers
    translate errors at their boundary (output, slide, input, checkpoint).
    """
    protocol = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    options = {} if protocol in LOCAL_PROTOCOLS else dict(storage_options or {})
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, str(path)


def uri_stem(uri: str) -> str:
    """The file stem of a path or URL, its query (a presigned URL's signature) ignored."""
    return PurePosixPath(uri.split("?", 1)[0]).stem


def is_local(fs: Any) -> bool:
    """Whether an fsspec filesystem is this machine's own."""
    return isinstance(fs, LocalFileSystem)


@contextmanager
def io_errors(action: str) -> Iterator[None]:
    """Translate any non-nucleiscope exception raised inside into ``OutputError``."""
    try:
        yield
    except NucleiscopeError:
        raise
    except Exception as exc:
        raise OutputError(f"{action}: {type(exc).__name__}: {exc}") from exc


def resolve(out: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """(filesystem, root path without protocol or trailing slash) of an output location."""
    with io_errors(f"cannot open output location {out!r}"):
        fs, root = url_to_fs(str(out), storage_options)
    return fs, root.rstrip("/")


def check_slide_id(slide_id: str) -> None:
    """Refuse slide ids that are not safe as a file or directory name."""
    if not _SLIDE_ID.match(slide_id) or slide_id in (".", ".."):
        raise ValueError(f"slide_id must match [A-Za-z0-9._-]+, got {slide_id!r}")


def ensure_dir(fs: Any, path: str) -> None:
    """Create a directory on a local filesystem; object stores need none (and creating
    one there could create a bucket)."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(path, exist_ok=True)


def put_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write bytes so that readers see the old content or the new, never a part.

    Local: write a dot-file beside the target, then rename over it. Object stores
    (and the memory filesystem): a single put is already all-or-nothing.
    """
    parent, name = path.rsplit("/", 1)
    with io_errors(f"cannot write {path}"):
        ensure_dir(fs, parent)
        if not isinstance(fs, LocalFileSystem):
            fs.pipe_file(path, data)
            return
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)


def write_bytes(
    out: str, relative_path: str, data: bytes, *, storage_options: Mapping[str, Any] | None = None
) -> str:
    """Atomically write ``data`` at ``out/<relative_path>``; returns the full path."""
    fs, root = resolve(out, storage_options)
    path = f"{root}/{relative_path.lstrip('/')}"
    put_atomic(fs, path, data)
    return path
