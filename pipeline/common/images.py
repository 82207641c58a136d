"""Plain image files (TIFF, PNG, JPEG, WebP) read whole: the one reader of the package.

Local paths and fsspec URLs alike. TIFFs are decoded with tifffile, everything else with
Pillow. Errors are typed and worded here, never the decoders' own: ``SlideNotFoundError`` for a
missing file, ``SlideAccessError`` for one we may not read, ``SlideFormatError`` for one that is
not an image, damaged, of the wrong kind, or too large to read whole.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
from numpy.typing import NDArray

from .errors import NucleiscopeError, SlideAccessError, SlideError, SlideFormatError, SlideNotFoundError

#: The first bytes of a TIFF or BigTIFF file, either byte order.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: Image formats named in the message for a file that is none of them.
_FORMATS = "TIFF, PNG, JPEG, WebP or another format Pillow reads"


def read_image_array(
    uri: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None, max_px: int | None = None
) -> NDArray[Any]:
    """The pixels of an image file as stored (H, W) or (H, W, C); refused over ``max_px`` pixels.

    TIFFs (known by their first bytes, whatever the name) are decoded by tifffile, other files
    by Pillow. Every failure is a ``SlideError`` in plain words, its cause chained: no such file,
    no permission, a directory, an empty file, not an image, or image data that is damaged.
    """
    import tifffile
    from PIL import Image

    name = os.fspath(uri)
    try:
        with fsspec.open(name, "rb", **dict(storage_options or {})) as handle:
            magic = handle.read(4)
            handle.seek(0)
            if not magic:
                raise SlideFormatError(name, "empty file, not an image")
            if magic in _TIFF_MAGIC:
                with tifffile.TiffFile(handle) as tif:
                    shape = tif.series[0].shape
                    _check_size(name, int(shape[1]) if len(shape) > 1 else 1, int(shape[0]), max_px)
                    return np.asarray(tif.asarray())
            with Image.open(handle) as image:
                _check_size(name, image.width, image.height, max_px)
                if image.mode not in ("L", "RGB", "RGBA", "I;16", "I"):
                    return np.asarray(image.convert("RGB"))  # palette, CMYK, LA...: decoded to RGB
                return np.asarray(image)
    except (NucleiscopeError, MemoryError):
        raise
    except Exception as exc:
        raise _unreadable(name, exc) from exc


def _unreadable(name: str, exc: Exception) -> SlideError:
    """Our error for a file the decoders refused (``exc``, chained by the caller)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, FileNotFoundError):
        return SlideNotFoundError(name, "no such file")
    if isinstance(exc, IsADirectoryError):
        return SlideFormatError(name, "a directory, not an image file")
    if isinstance(exc, PermissionError):
        return SlideAccessError(name, "no permission to read the file")
    if isinstance(exc, UnidentifiedImageError):
        return SlideFormatError(name, f"not an image file (its content is not {_FORMATS})")
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return SlideFormatError(name, f"damaged or incomplete image data ({detail})")


def _check_size(name: str, width: int, height: int, max_px: int | None) -> None:
    if max_px is not None and width * height > max_px:
        raise SlideFormatError(name, f"image of {width}x{height} px is too large to read whole")


def label_tiff_bytes(labels: NDArray[np.integer]) -> bytes:
    """Instance labels as a zlib-compressed TIFF: uint16 when they fit, else uint32."""
    import io

    import tifffile

    buffer = io.BytesIO()
    dtype = np.uint16 if labels.max(initial=0) < 65536 else np.uint32
    tifffile.imwrite(buffer, labels.astype(dtype), compression="zlib")
    return buffer.getvalue()


def read_rgb(
    uri: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None, max_px: int | None = None
) -> NDArray[np.uint8]:
    """An image file as (H, W, 3) uint8 RGB: alpha dropped, grey expanded."""
    image = read_image_array(uri, storage_options=storage_options, max_px=max_px)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    name = os.fspath(uri)
    if image.ndim != 3 or image.shape[2] < 3:
        raise SlideFormatError(name, f"expected an RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise SlideFormatError(name, f"expected 8-bit RGB, got {image.dtype}")
    return np.ascontiguousarray(image[..., :3])

