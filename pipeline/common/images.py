"""Plain image files (TIFF, PNG, JPEG, WebP) read whole: the one reader of the package.

Local paths and fsspec URLs alike. TIFFs are decoded with tifffile, everything else with
Pillow. Errors are typed: ``SlideNotFoundError`` for a missing file, ``SlideFormatError``
for one that is not a readable image, of the wrong kind, or too large to read whole.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
from numpy.typing import NDArray

from .errors import SlideFormatError, SlideNotFoundError


def _is_tiff(name: str) -> bool:
    return name.lower().endswith((".tif", ".tiff"))


def read_image_array(
    uri: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None, max_px: int | None = None
) -> NDArray[Any]:
    """The pixels of an image file as stored (H, W) or (H, W, C); refused over ``max_px`` pixels."""
    import tifffile
    from PIL import Image, UnidentifiedImageError

    name = os.fspath(uri)
    try:
        with fsspec.open(name, "rb", **dict(storage_options or {})) as handle:
            if _is_tiff(name):
                with tifffile.TiffFile(handle) as tif:
                    shape = tif.series[0].shape
                    _check_size(name, int(shape[1]) if len(shape) > 1 else 1, int(shape[0]), max_px)
                    return np.asarray(tif.asarray())
            with Image.open(handle) as image:
                _check_size(name, image.width, image.height, max_px)
                if image.mode not in ("L", "RGB", "RGBA", "I;16", "I"):
                    return np.asarray(image.convert("RGB"))  # palette, CMYK, LA...: decoded to RGB
                return np.asarray(image)
    except FileNotFoundError as exc:
        raise SlideNotFoundError(name, "no such file") from exc
    except (OSError, UnidentifiedImageError, ValueError, tifffile.TiffFileError) as exc:
        raise SlideFormatError(name, f"not a readable image ({type(exc).__name__}: {exc})") from exc


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

