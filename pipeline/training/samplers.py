"""Scale-labelled batch samplers of the training (pure torch, no Ray).

``ScaleTileSampler`` keeps every source image at the three scales on the device and
``TilePool`` keeps a refreshed pool of streamed tiles there; both draw class-balanced,
augmented batches with no host round trip. ``resample_tensor`` is the one antialiased
filter every scale is derived with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as nnf
from numpy.typing import NDArray

from ..color.normalize import hed_jitter, imagenet_normalize, reinhard_normalize
from ..common.errors import ConfigError
from ..common.validate import finite_number
from .config import MAX_SOURCE_MPP, SCALE_MPP, TrainConfig


def scaled_size(height: int, width: int, mpp: float, target_mpp: float) -> tuple[int, int]:
    """Size in pixels of a (height, width) raster at ``mpp`` once resampled to ``target_mpp``."""
    return max(1, round(height * mpp / target_mpp)), max(1, round(width * mpp / target_mpp))


def resample_tensor(x: torch.Tensor, mpp: float, target_mpp: float) -> torch.Tensor:
    """The one resampling filter of training: (N, C, H, W) float, antialiased bilinear, to ``target_mpp``."""
    size = scaled_size(x.shape[-2], x.shape[-1], mpp, target_mpp)
    if size == tuple(x.shape[-2:]):
        return x
    return nnf.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


class _PackSampler:
    """Class-balanced, augmented batches from a label-major pack of uint8 tiles on the device.

    ``pack[label * capacity + i]`` holds tile ``i`` of scale ``label`` (top-left aligned,
    ``sizes`` gives its extent); ``counts[label]`` tiles of each label are filled.
    """

    config: TrainConfig
    device: torch.device
    pack: torch.Tensor
    sizes: torch.Tensor
    counts: torch.Tensor
    capacity: int
    _full: bool

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, *, augment: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch (B, 3, c, c) ImageNet-normalised float32 and labels (B,) int64.

        Labels are balanced (``arange(B) % 3``); tile, crop, and one of the eight
        dihedral transforms are drawn per tile; HED jitter applies when ``augment``.
        """
        cfg = self.config
        labels = torch.arange(batch_size, device=self.device) % len(SCALE_MPP)
        k = cfg.white_candidates if cfg.max_white_frac is not None else 1
        tiles = self._gather(labels.repeat_interleave(k), generator)  # (B*k, c, c, 3)
        if k > 1:
            white = (tiles.amin(dim=-1) > cfg.white_level).float().mean(dim=(1, 2)).view(batch_size, k)
            rank = torch.arange(k, device=self.device, dtype=torch.float32).expand(batch_size, k)
            score = torch.where(white <= float(cfg.max_white_frac or 0.0), rank, k + white)
            pick = torch.arange(batch_size, device=self.device) * k + score.argmin(dim=1)
            tiles = tiles[pick]
        x = tiles.permute(0, 3, 1, 2).float()
        if augment and cfg.hed_sigma > 0:
            x = hed_jitter(x, cfg.hed_sigma, generator)
        x = imagenet_normalize(x)
        if cfg.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels

    def _gather(self, labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        c = self.config.crop_px
        n = labels.shape[0]
        dev = self.device
        if self._full:
            image = torch.randint(0, self.capacity, (n,), device=dev, generator=generator)
        else:
            draw = torch.rand((n,), device=dev, generator=generator)
            image = (draw * self.counts[labels].float()).long().clamp_(max=self.capacity - 1)
        index = labels * self.capacity + image
        size = self.sizes[index]
        u = torch.rand((n, 2), device=dev, generator=generator)
        offset = (u * (size - c + 1).float()).long()
        flips = torch.randint(0, 2, (n, 3, 1, 1), device=dev, generator=generator).bool()
        ii = torch.arange(c, device=dev).view(1, c, 1).expand(n, c, c)
        jj = torch.arange(c, device=dev).view(1, 1, c).expand(n, c, c)
        ii, jj = torch.where(flips[:, 0], jj, ii), torch.where(flips[:, 0], ii, jj)  # transpose
        ii = torch.where(flips[:, 1], c - 1 - ii, ii)  # vertical flip
        jj = torch.where(flips[:, 2], c - 1 - jj, jj)  # horizontal flip
        rows = offset[:, 0].view(n, 1, 1) + ii
        cols = offset[:, 1].view(n, 1, 1) + jj
        return self.pack[index.view(n, 1, 1), rows, cols]


class ScaleTileSampler(_PackSampler):
    """Scale-labelled tiles from source RGB images, resident on ``device``.

    Each source (H, W, 3) uint8 image at ``mpp`` µm/px is optionally Reinhard-normalised
    (its own statistics), then resampled ONCE to each of ``SCALE_MPP`` with the one
    antialiased filter (``scale_tiles.resample_tensor``), and padded (reflect) to at
    least ``config.tile_px`` per side. Crops are drawn from whole views.
    """

    def __init__(
        self,
        images: Sequence[NDArray[np.uint8]],
        mpp: float | Sequence[float],
        config: TrainConfig,
        device: torch.device | str = "cpu",
    ) -> None:
        if not images:
            raise ConfigError("the sampler needs at least one source image")
        mpps = [float(mpp)] * len(images) if isinstance(mpp, (int, float)) else [float(m) for m in mpp]
        if len(mpps) != len(images):
            raise ConfigError(f"{len(images)} images but {len(mpps)} mpp values")
        for m in mpps:
            if not (finite_number(m) and 0 < m <= MAX_SOURCE_MPP):
                raise ConfigError(f"source mpp must be in (0, {MAX_SOURCE_MPP:.4f}] (40x or finer), got {m!r}")
        self.config = config
        self.device = torch.device(device)
        self.num_images = self.capacity = len(images)
        self._full = True
        for rgb in images:
            if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                raise ConfigError(f"source images must be (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
        if config.stain_norm:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                images = list(pool.map(reinhard_normalize, images))
        views: list[torch.Tensor] = []  # label-major: index = label * N + image
        for target in SCALE_MPP:
            for rgb, m in zip(images, mpps):
                views.append(self._resample(rgb, m, target))
        h_max = max(v.shape[0] for v in views)
        w_max = max(v.shape[1] for v in views)
        self.pack = torch.zeros((len(views), h_max, w_max, 3), dtype=torch.uint8, device=self.device)
        for i, v in enumerate(views):
            self.pack[i, : v.shape[0], : v.shape[1]] = v
        self.sizes = torch.tensor([[v.shape[0], v.shape[1]] for v in views], dtype=torch.int64, device=self.device)
        self.counts = torch.full((len(SCALE_MPP),), self.capacity, dtype=torch.int64, device=self.device)

    def _resample(self, rgb: NDArray[np.uint8], mpp: float, target_mpp: float) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1)[None].float()
        x = _pad_to(resample_tensor(x, mpp, target_mpp), self.config.tile_px)
        return x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).contiguous()


class TilePool(_PackSampler):
    """A fixed-size pool of streamed tiles on ``device``, ``capacity`` per scale.

    ``add`` writes new tiles over the oldest of their scale (a ring per scale); batches
    are drawn from the tiles present (``ready`` once every scale has one). Tiles arrive
    stain-normalised (``scale_tiles.window_tiles``); the sampler crops, transforms,
    jitters and ImageNet-normalises them like ``ScaleTileSampler``.
    """

    def __init__(self, capacity: int, config: TrainConfig, device: torch.device | str = "cpu") -> None:
        if capacity < 1:
            raise ConfigError(f"pool capacity must be >= 1, got {capacity!r}")
        self.config = config
        self.device = torch.device(device)
        self.capacity = capacity
        side = config.tile_px
        n = len(SCALE_MPP) * capacity
        self.pack = torch.zeros((n, side, side, 3), dtype=torch.uint8, device=self.device)
        self.sizes = torch.full((n, 2), side, dtype=torch.int64, device=self.device)
        self.counts = torch.zeros((len(SCALE_MPP),), dtype=torch.int64, device=self.device)
        self._filled = [0] * len(SCALE_MPP)
        self._next = [0] * len(SCALE_MPP)
        self._full = False
        self.tiles_added = 0

    @property
    def ready(self) -> bool:
        """Every scale has at least one tile."""
        return min(self._filled) > 0

    @property
    def filled(self) -> tuple[int, ...]:
        """Tiles present per scale."""
        return tuple(self._filled)

    def add(self, tiles: NDArray[np.uint8], labels: NDArray[np.int64]) -> None:
        """Store (n, T, T, 3) uint8 tiles of scale ``labels`` (T = ``config.tile_px``)."""
        side = self.config.tile_px
        if tiles.ndim != 4 or tiles.shape[1:] != (side, side, 3) or tiles.dtype != np.uint8:
            raise ConfigError(f"pool tiles must be (n, {side}, {side}, 3) uint8, got {tiles.dtype} {tiles.shape}")
        slots = np.empty(len(labels), np.int64)
        for i, label in enumerate(labels.tolist()):
            slots[i] = label * self.capacity + self._next[label]
            self._next[label] = (self._next[label] + 1) % self.capacity
            self._filled[label] = min(self.capacity, self._filled[label] + 1)
        keep = np.unique(slots, return_index=True)[1]  # more tiles than slots: the first of each slot
        index = torch.from_numpy(slots[keep]).to(self.device)
        self.pack[index] = torch.from_numpy(np.ascontiguousarray(tiles[keep])).to(self.device)
        self.counts = torch.tensor(self._filled, dtype=torch.int64, device=self.device)
        self._full = min(self._filled) == self.capacity
        self.tiles_added += len(labels)


def _pad_to(x: torch.Tensor, side: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    while h < side or w < side:
        ph, pw = max(0, min(side - h, h - 1)), max(0, min(side - w, w - 1))
        if ph == 0 and pw == 0:  # a 1-pixel axis cannot be reflected
            return nnf.pad(x, (0, max(0, side - w), 0, max(0, side - h)), mode="replicate")
        x = nnf.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect")
        h, w = x.shape[-2:]
    return x
