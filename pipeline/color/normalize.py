"""Colour normalisation of H&E images: Reinhard in CIELAB, ImageNet scaling, HED jitter.

Reinhard normalisation (method.md, "Data and scale labels"): scale the image so
that a white level (its 90th percentile of all channel values) maps to 255, convert
to CIELAB (sRGB, D65), and map each channel's mean and standard deviation over
tissue pixels onto those of a fixed H&E target. For slide-consistent results the
statistics (and the white level) are computed once from a slide's low-resolution
view and passed to every tile.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from numpy.typing import NDArray

from .stain import STAIN_OD_VECTORS

#: Target LAB mean and std over tissue pixels: the per-channel medians of
#: ``reinhard_stats`` over the 30 MoNuSeg 2018 training images (H&E, 40x).
TARGET_LAB_MEAN: tuple[float, float, float] = (61.58, 32.93, -14.51)
TARGET_LAB_STD: tuple[float, float, float] = (16.91, 7.12, 7.46)
#: Percentile of all channel values that is mapped to 255 before the LAB transform.
WHITE_PERCENTILE = 90.0
#: Pixels with L* at or above this (after white-level scaling) are background, not tissue.
TISSUE_MAX_L = 90.0

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# sRGB (D65) to CIE XYZ, and the D65 reference white.
_RGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=np.float32,
)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ.astype(np.float64)).astype(np.float32)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
_EPS_LAB = 0.008856
_MIN_STD = 1e-3

ReinhardStats = tuple[NDArray[np.float64], NDArray[np.float64]]


def _check_rgb(rgb: NDArray[np.uint8]) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")


def white_level(rgb: NDArray[np.uint8]) -> float:
    """The intensity mapped to 255 before normalisation (90th percentile of all values)."""
    _check_rgb(rgb)
    return float(max(np.percentile(rgb, WHITE_PERCENTILE), 1.0))


def rgb_to_lab(rgb: NDArray[np.floating]) -> NDArray[np.float32]:
    """CIELAB (D65) of sRGB values in [0, 255] (any float or int array ending in 3)."""
    c = np.asarray(rgb, dtype=np.float32) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _RGB_TO_XYZ.T / _WHITE_D65
    f = np.where(xyz > _EPS_LAB, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab.astype(np.float32, copy=False)


def lab_to_rgb(lab: NDArray[np.floating]) -> NDArray[np.uint8]:
    """sRGB uint8 of CIELAB (D65) values, out-of-gamut colours clipped."""
    lab = np.asarray(lab, dtype=np.float32)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    cube = f**3
    xyz = np.where(cube > _EPS_LAB, cube, (f - 16.0 / 116.0) / 7.787) * _WHITE_D65
    lin = np.clip(xyz @ _XYZ_TO_RGB.T, 0.0, 1.0)
    c = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1.0 / 2.4) - 0.055)
    return np.asarray(np.clip(np.rint(c * 255.0), 0, 255), dtype=np.uint8)


def _scaled_lab(rgb: NDArray[np.uint8], white: float) -> NDArray[np.float32]:
    scaled = np.minimum(rgb.astype(np.float32) * np.float32(255.0 / white), 255.0)
    return rgb_to_lab(scaled)


def _lab_stats(lab: NDArray[np.float32]) -> ReinhardStats:
    flat = lab.reshape(-1, 3)
    tissue = flat[flat[:, 0] < TISSUE_MAX_L]
    if tissue.shape[0] < max(64, flat.shape[0] // 100):
        tissue = flat
    mean = tissue.mean(axis=0, dtype=np.float64)
    std = np.maximum(tissue.std(axis=0, dtype=np.float64), _MIN_STD)
    return mean, std


def reinhard_stats(rgb: NDArray[np.uint8], white: float | None = None) -> ReinhardStats:
    """LAB mean and std (each shape (3,)) over the tissue pixels of the white-scaled image.

    ``white`` is the white level to scale by (default: ``white_level(rgb)``).
    Pixels with L* >= 90 count as background; if fewer than 1 % are tissue, all are used.
    """
    _check_rgb(rgb)
    return _lab_stats(_scaled_lab(rgb, white_level(rgb) if white is None else white))


def reinhard_normalize(
    rgb: NDArray[np.uint8], stats: ReinhardStats | None = None, *, white: float | None = None
) -> NDArray[np.uint8]:
    """Reinhard-normalised copy of ``rgb`` mapped onto the H&E target.

    ``stats`` and ``white`` default to those of ``rgb`` itself; pass the slide-level
    values (from the slide's low-resolution view) so that every tile is mapped alike.
    """
    _check_rgb(rgb)
    white = white_level(rgb) if white is None else float(white)
    lab = _scaled_lab(rgb, white)
    mean, std = _lab_stats(lab) if stats is None else stats
    gain = (np.asarray(TARGET_LAB_STD) / np.asarray(std, dtype=np.float64)).astype(np.float32)
    offset = (np.asarray(TARGET_LAB_MEAN) - np.asarray(mean, dtype=np.float64) * gain).astype(np.float32)
    return lab_to_rgb(lab * gain + offset)


def to_normalized_tensor(rgb: NDArray[np.uint8]) -> torch.Tensor:
    """(1, 3, H, W) float32 ImageNet-normalised tensor of an (H, W, 3) uint8 image."""
    _check_rgb(rgb)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)
    return imagenet_normalize(x)


@functools.lru_cache(maxsize=8)
def _device_constants(device: torch.device) -> dict[str, torch.Tensor]:
    """Constant tensors on ``device``, made once (a host-to-device copy would sync each step)."""
    vectors = torch.tensor(STAIN_OD_VECTORS, dtype=torch.float32)
    return {
        "mean": torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1).to(device),
        "std": torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1).to(device),
        "vectors": vectors.to(device),
        "inverse": torch.linalg.inv(vectors.double()).float().to(device),
    }


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of (B, 3, H, W) RGB values in [0, 255]."""
    c = _device_constants(x.device)
    return (x.float() / 255.0 - c["mean"]) / c["std"]


def hed_jitter(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multiply each tile's H, E and residual stain amounts by factors ~ N(1, sigma).

    ``x``: (B, 3, H, W) RGB in [0, 255] (any float dtype, any device); returns float32
    in [0, 255]. Works in optical density -log10((I + 1) / 256) with the Ruifrok–Johnston
    stain vectors; as the jitter is linear in OD, it is one 3x3 matrix per tile.
    """
    if sigma <= 0:
        return x.float()
    c = _device_constants(x.device)
    factors = 1.0 + sigma * torch.randn(x.shape[0], 3, device=x.device, generator=generator)
    # od_rgb (row vector) = amounts @ vectors, amounts = od_rgb @ inv(vectors).
    mix = c["inverse"] @ (factors.unsqueeze(-1) * c["vectors"])  # (B, 3, 3)
    od = -torch.log10((x.float() + 1.0) / 256.0)
    od = torch.einsum("bchw,bcd->bdhw", od, mix)
    return (256.0 * torch.pow(10.0, -od) - 1.0).clamp_(0.0, 255.0)
