"""Optical density and Ruifrok–Johnston colour deconvolution of H&E images.

Stain vectors (optical density per unit stain in R, G, B) are those published by
Ruifrok and Johnston, "Quantification of histochemical staining by color
deconvolution", Anal. Quant. Cytol. Histol. 23(4):291-299, 2001, for haematoxylin,
eosin and DAB: H = (0.65, 0.70, 0.29), E = (0.07, 0.99, 0.11),
DAB = (0.27, 0.57, 0.78), each normalised to unit length. On an H&E slide the
third channel holds what neither stain explains (a residual).
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

#: Rows: unit stain OD vectors (haematoxylin, eosin, DAB) in RGB order.
STAIN_OD_VECTORS: NDArray[np.float64] = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
STAIN_OD_VECTORS = STAIN_OD_VECTORS / np.linalg.norm(STAIN_OD_VECTORS, axis=1, keepdims=True)
STAIN_OD_VECTORS.setflags(write=False)

#: od_rgb @ _DECONVOLUTION = stain amounts (H, E, DAB), since od_rgb = amounts @ vectors.
_DECONVOLUTION: NDArray[np.float32] = np.linalg.inv(STAIN_OD_VECTORS).astype(np.float32)
_DECONVOLUTION.setflags(write=False)

#: -log10((I + 1) / 256) for every uint8 intensity I.
_OD_TABLE: NDArray[np.float32] = (-np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(
    np.float32
)
_OD_TABLE.setflags(write=False)


def _check_rgb(rgb: NDArray[np.uint8]) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB, got {rgb.dtype}")


def rgb_to_od(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Optical density -log10((I + 1) / 256) per channel, (H, W, 3) float32 in [0, 2.41]."""
    _check_rgb(rgb)
    return _lookup(rgb)


def _lookup(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    """``_OD_TABLE[rgb]`` (OpenCV's table lookup: the same values, several times faster)."""
    return np.asarray(cv2.LUT(np.ascontiguousarray(rgb), _OD_TABLE), dtype=np.float32)


def rgb_to_hed_od(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Haematoxylin, eosin and residual (DAB) optical densities, (H, W, 3) float32, >= 0."""
    od = rgb_to_od(rgb)
    hed = od.reshape(-1, 3) @ _DECONVOLUTION
    np.maximum(hed, 0.0, out=hed)
    return hed.reshape(od.shape)


def hematoxylin_od(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Haematoxylin optical density (H, W) float32, >= 0."""
    _check_rgb(rgb)
    return hematoxylin_from_od(_lookup(rgb))


def hematoxylin_from_od(od: NDArray[np.float32]) -> NDArray[np.float32]:
    """Haematoxylin optical density (H, W) float32, >= 0, of an ``rgb_to_od`` image."""
    col = _DECONVOLUTION[:, 0]
    h = od[..., 0] * col[0] + od[..., 1] * col[1] + od[..., 2] * col[2]
    np.maximum(h, 0.0, out=h)
    return np.asarray(h, dtype=np.float32)
