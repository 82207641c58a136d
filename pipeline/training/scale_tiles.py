"""Scale-labelled tissue tiles from whole-slide images and plain images (method.md, "Data and scale labels").

A source is planned once (``plan_source``): its level-0 µm/px (metadata or stated; refused
when unknown or coarser than ``MAX_SOURCE_MPP``), a tissue mask of a low-resolution view,
and the Reinhard statistics the attention segmenter fits at inference. ``window_tiles``
then reads ONE window of level-0 pixels, derives the 1.0, 0.5 and 0.25 µm/px views from
it with one antialiased filter (``resample_rgb``; pyramid levels are never used for
tiles), cuts the same number of tissue tiles at each scale and Reinhard-normalises them
with the source's statistics (after resampling, as inference does). Dihedral transforms,
the random crop, HED jitter and ImageNet normalisation happen on the device
(``samplers.TilePool``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from ..color.normalize import ReinhardStats, reinhard_normalize, reinhard_stats, white_level
from ..common.errors import ConfigError, UnknownResolutionError
from ..common.images import read_rgb
from ..slides.slide import Slide
from ..tiling.tissue import tissue_mask
from .config import MAX_SOURCE_MPP, SCALE_MPP
from .samplers import resample_tensor

logger = logging.getLogger(__name__)

#: Plain image formats (read whole, µm/px must be stated); anything else opens as a slide.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Largest source read whole (plain images, and every source of the resident sampler).
MAX_WHOLE_PX = 200_000_000
#: Single-level slides up to this many pixels are read whole once and kept in memory.
MAX_SMALL_PX = 64_000_000
#: Random candidate positions tried per tile before the best ones are taken.
_CANDIDATES_PER_TILE = 6


def resample_rgb(rgb: NDArray[np.uint8], mpp: float, target_mpp: float) -> NDArray[np.uint8]:
    """(H, W, 3) uint8 at ``mpp`` resampled to ``target_mpp`` with ``resample_tensor`` (on the CPU)."""
    writable = rgb.flags.writeable and rgb.flags.c_contiguous
    x = torch.from_numpy(rgb if writable else np.array(rgb, copy=True)).permute(2, 0, 1)[None].float()
    y = resample_tensor(x, mpp, target_mpp)
    out = y.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0).contiguous()
    return np.asarray(out.numpy())


def source_kind(uri: str) -> str:
    """"image" for plain image formats (``IMAGE_SUFFIXES``), else "slide"."""
    return "image" if os.path.splitext(uri.split("?")[0])[1].lower() in IMAGE_SUFFIXES else "slide"


class SourceReader(Protocol):
    """Level-0 pixels of an open source."""

    mpp: float
    width_px: int
    height_px: int

    def read(self, x_px: int, y_px: int, width: int, height: int) -> NDArray[np.uint8]:
        """RGB (height, width, 3) at level 0, white outside the source."""
        ...

    def close(self) -> None: ...


class ImageReader:
    """A plain image held in memory."""

    def __init__(self, rgb: NDArray[np.uint8], mpp: float) -> None:
        self.rgb = rgb
        self.mpp = mpp
        self.height_px, self.width_px = rgb.shape[:2]

    def read(self, x_px: int, y_px: int, width: int, height: int) -> NDArray[np.uint8]:
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0 = max(0, x_px), max(0, y_px)
        x1, y1 = min(self.width_px, x_px + width), min(self.height_px, y_px + height)
        if x0 < x1 and y0 < y1:
            out[y0 - y_px : y1 - y_px, x0 - x_px : x1 - x_px] = self.rgb[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        """Nothing to release."""


class SlideReader:
    """A slide read at level 0 only (``read_region`` at the level-0 µm/px picks level 0)."""

    def __init__(self, slide: Slide) -> None:
        self.slide = slide
        self.mpp = slide.info.mpp
        self.width_px, self.height_px = slide.info.width_px, slide.info.height_px

    def read(self, x_px: int, y_px: int, width: int, height: int) -> NDArray[np.uint8]:
        return self.slide.read_region(x_px, y_px, width, height, self.mpp)

    def close(self) -> None:
        self.slide.close()


def open_source(uri: str, mpp: float | None = None, *,
                storage_options: Mapping[str, Any] | None = None) -> SourceReader:
    """Open a training source at level 0; ``mpp`` overrides metadata (plain images need it)."""
    options = dict(storage_options or {})
    if source_kind(uri) == "image":
        if mpp is None:
            raise UnknownResolutionError(uri, "a plain image declares no µm/px; state mpp for this source")
        return ImageReader(read_rgb(uri, storage_options=options, max_px=MAX_WHOLE_PX), float(mpp))
    slide = Slide.open(uri, storage_options=options, mpp_override=mpp)
    info = slide.info
    if len(info.level_dimensions) > 1 or info.width_px * info.height_px > MAX_SMALL_PX:
        return SlideReader(slide)
    try:  # a small single-level file (often one compressed strip): decode it once
        return ImageReader(slide.read_region(0, 0, info.width_px, info.height_px, info.mpp), info.mpp)
    finally:
        slide.close()


@dataclass(frozen=True)
class SourcePlan:
    """What tiles of one source need, computed once (picklable, small)."""

    uri: str
    #: µm/px stated in the config (None: the slide's metadata).
    stated_mpp: float | None
    mpp: float
    width_px: int
    height_px: int
    white: float
    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]
    tissue_mpp: float
    tissue_shape: tuple[int, int]
    tissue_bits: bytes

    @functools.cached_property
    def tissue(self) -> NDArray[np.bool_]:
        """The tissue mask at ``tissue_mpp`` µm/px."""
        h, w = self.tissue_shape
        return np.unpackbits(np.frombuffer(self.tissue_bits, np.uint8), count=h * w).reshape(h, w).astype(bool)

    @functools.cached_property
    def tissue_cells(self) -> NDArray[np.int64]:
        """Flat indices of the tissue cells of the mask."""
        return np.flatnonzero(self.tissue)

    @functools.cached_property
    def tissue_table(self) -> NDArray[np.int64]:
        """Summed-area table of the mask, (H + 1, W + 1)."""
        mask = self.tissue
        table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
        table[1:, 1:] = mask.cumsum(0, dtype=np.int64).cumsum(1)
        return table

    def __getstate__(self) -> dict[str, Any]:
        """Fields only (the cached mask views are rebuilt where they are needed)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def tissue_frac(self) -> float:
        """Share of the source that is tissue."""
        return float(self.tissue_cells.size / max(1, self.tissue.size))

    def stats(self) -> ReinhardStats:
        return np.asarray(self.lab_mean, np.float64), np.asarray(self.lab_std, np.float64)


def plan_source(uri: str, mpp: float | None = None, *, tissue_mpp: float = 8.0,
                storage_options: Mapping[str, Any] | None = None) -> SourcePlan:
    """Open, check and plan one source. Raises UnknownResolutionError (no µm/px) or
    ConfigError (coarser than ``MAX_SOURCE_MPP``), or the slide's own SlideError."""
    reader = open_source(uri, mpp, storage_options=storage_options)
    try:
        if reader.mpp > MAX_SOURCE_MPP:
            raise ConfigError(
                f"{uri}: {reader.mpp:.4g} µm/px is coarser than {MAX_SOURCE_MPP:.4g} µm/px, so 40x "
                f"({SCALE_MPP[-1]} µm/px) tiles cannot be derived from it; train on 40x sources"
            )
        if isinstance(reader, SlideReader):
            from ..extraction.extract import fit_view  # the statistics inference fits (imported late: it is heavy)

            mask = tissue_mask(reader.slide.thumbnail(tissue_mpp), tissue_mpp)
            fit = fit_view(reader.slide, mask, tissue_mpp, SCALE_MPP[-1])
        else:  # a plain image: fitted whole, as ``nucleiscope segment`` does
            fit = read_whole(reader)
            mask = tissue_mask(resample_rgb(fit, reader.mpp, tissue_mpp), tissue_mpp)
        white = white_level(fit)
        mean, std = reinhard_stats(fit, white)
    finally:
        reader.close()
    if not mask.any():
        logger.warning("%s: no tissue found; tiles will be its least empty parts", uri)
    return SourcePlan(
        uri=uri, stated_mpp=mpp, mpp=reader.mpp, width_px=reader.width_px, height_px=reader.height_px,
        white=white, lab_mean=_triple(mean), lab_std=_triple(std), tissue_mpp=tissue_mpp,
        tissue_shape=(int(mask.shape[0]), int(mask.shape[1])), tissue_bits=np.packbits(mask).tobytes(),
    )  # fmt: skip


def _triple(values: NDArray[np.float64]) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])


@dataclass(frozen=True)
class ScaleTiles:
    """Tiles of one window: ``tiles`` (n, T, T, 3) uint8, ``labels`` (n,) int64 scale classes."""

    tiles: NDArray[np.uint8]
    labels: NDArray[np.int64]
    uri: str
    #: Share of the tiles that met the tissue threshold.
    tissue_ok_frac: float


@dataclass(frozen=True)
class _Window:
    x_px: int
    y_px: int
    side_px: tuple[int, int]  # (height, width)


def _pick_window(plan: SourcePlan, window_um: float, rng: np.random.Generator) -> _Window:
    """A window of ``window_um`` centred on a random tissue pixel, inside the source where possible."""
    side = max(1, round(window_um / plan.mpp))
    cells = plan.tissue_cells
    if cells.size:
        row, col = divmod(int(cells[rng.integers(cells.size)]), plan.tissue_shape[1])
        cy_um, cx_um = (row + rng.random()) * plan.tissue_mpp, (col + rng.random()) * plan.tissue_mpp
    else:
        cy_um, cx_um = rng.random() * plan.height_px * plan.mpp, rng.random() * plan.width_px * plan.mpp
    h, w = min(side, plan.height_px), min(side, plan.width_px)
    y = int(np.clip(round(cy_um / plan.mpp - h / 2), 0, plan.height_px - h))
    x = int(np.clip(round(cx_um / plan.mpp - w / 2), 0, plan.width_px - w))
    return _Window(x, y, (h, w))


def _pad_reflect(rgb: NDArray[np.uint8], side: int) -> tuple[NDArray[np.uint8], tuple[int, int]]:
    """Reflect-pad to at least ``side`` per axis (repeatedly for tiny views); returns (view, (top, left))."""
    top = left = 0
    while rgb.shape[0] < side or rgb.shape[1] < side:
        ph = max(0, min(side - rgb.shape[0], rgb.shape[0] - 1))
        pw = max(0, min(side - rgb.shape[1], rgb.shape[1] - 1))
        mode = "reflect" if (ph or pw) else "edge"
        if not (ph or pw):
            ph, pw = max(0, side - rgb.shape[0]), max(0, side - rgb.shape[1])
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
        rgb = np.pad(rgb, pads, mode=mode)  # type: ignore[call-overload]
        top, left = top + ph // 2, left + pw // 2
    return rgb, (top, left)


def _tissue_fractions(plan: SourcePlan, boxes_um: NDArray[np.float64]) -> NDArray[np.float64]:
    """Share of tissue-mask cells inside each box (y0, x0, y1, x1) in µm; cells outside count as glass."""
    mask, table = plan.tissue, plan.tissue_table
    cells = np.floor(boxes_um / plan.tissue_mpp).astype(np.int64)
    cells[:, 2:] = np.ceil(boxes_um[:, 2:] / plan.tissue_mpp - 1e-9).astype(np.int64)
    area = np.maximum(1, (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1]))
    r0, r1 = np.clip(cells[:, 0], 0, mask.shape[0]), np.clip(cells[:, 2], 0, mask.shape[0])
    c0, c1 = np.clip(cells[:, 1], 0, mask.shape[1]), np.clip(cells[:, 3], 0, mask.shape[1])
    inside = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    return np.asarray(inside / area, dtype=np.float64)


def _cut_scale(view: NDArray[np.uint8], step_um: tuple[float, float], origin_um: tuple[float, float], plan: SourcePlan,
               n: int, tile_px: int, min_tissue: float,
               rng: np.random.Generator) -> tuple[NDArray[np.uint8], int]:
    """``n`` tiles of one scale's view: random positions, those with enough tissue first."""
    padded, (top, left) = _pad_reflect(view, tile_px)
    k = max(n, _CANDIDATES_PER_TILE * n)
    rows = rng.integers(0, padded.shape[0] - tile_px + 1, k)
    cols = rng.integers(0, padded.shape[1] - tile_px + 1, k)
    y0 = origin_um[0] + (rows - top) * step_um[0]
    x0 = origin_um[1] + (cols - left) * step_um[1]
    boxes = np.stack([y0, x0, y0 + tile_px * step_um[0], x0 + tile_px * step_um[1]], axis=1)
    frac = _tissue_fractions(plan, boxes)
    ok = frac >= min_tissue
    # candidates are in random order: passing ones first, then the most tissue
    order = np.lexsort((-frac, ~ok))[:n]
    tiles = np.stack([padded[r : r + tile_px, c : c + tile_px] for r, c in zip(rows[order], cols[order])])
    return tiles, int(ok[order].sum())


def window_tiles(reader: SourceReader, plan: SourcePlan, *, tile_px: int, per_scale: int, window_um: float,
                 min_tissue_frac: float, rng: np.random.Generator, stain_norm: bool = True) -> ScaleTiles:
    """``per_scale`` tiles of ``tile_px`` at each of ``SCALE_MPP`` from one level-0 window (label-major)."""
    win = _pick_window(plan, window_um, rng)
    h, w = win.side_px
    level0 = reader.read(win.x_px, win.y_px, w, h)
    origin_um = (win.y_px * plan.mpp, win.x_px * plan.mpp)
    x = torch.from_numpy(level0).permute(2, 0, 1)[None].float()
    parts: list[NDArray[np.uint8]] = []
    passed = 0
    for target in SCALE_MPP:
        y = resample_tensor(x, plan.mpp, target).round_().clamp_(0, 255).to(torch.uint8)
        view = np.asarray(y[0].permute(1, 2, 0).contiguous().numpy())
        step_um = (h * plan.mpp / view.shape[0], w * plan.mpp / view.shape[1])
        tiles, ok = _cut_scale(view, step_um, origin_um, plan, per_scale, tile_px, min_tissue_frac, rng)
        parts.append(tiles)
        passed += ok
    tiles = np.concatenate(parts)
    if stain_norm:
        flat = tiles.reshape(-1, tile_px, 3)
        tiles = reinhard_normalize(flat, plan.stats(), white=plan.white).reshape(tiles.shape)
    labels = np.repeat(np.arange(len(SCALE_MPP), dtype=np.int64), per_scale)
    return ScaleTiles(tiles=tiles, labels=labels, uri=plan.uri, tissue_ok_frac=passed / max(1, len(labels)))


def read_whole(reader: SourceReader) -> NDArray[np.uint8]:
    """All level-0 pixels of a source (refused beyond ``MAX_WHOLE_PX``: use the streamed sampler)."""
    if isinstance(reader, ImageReader):
        return reader.rgb
    if reader.width_px * reader.height_px > MAX_WHOLE_PX:
        raise ConfigError(
            f"source of {reader.width_px}x{reader.height_px} px is too large for the resident sampler "
            f"(at most {MAX_WHOLE_PX:,} px); use sampler = \"stream\""
        )
    return reader.read(0, 0, reader.width_px, reader.height_px)


def seed_sequence(*parts: int) -> np.random.Generator:
    """A numpy generator seeded from integers (e.g. run seed, worker rank, task number)."""
    return np.random.default_rng(np.random.SeedSequence([int(p) % (2**63) for p in parts]))


__all__ = [
    "IMAGE_SUFFIXES", "ImageReader", "ScaleTiles", "SlideReader", "SourcePlan", "SourceReader", "open_source",
    "plan_source", "read_whole", "resample_rgb", "seed_sequence",
    "source_kind", "window_tiles",
]  # fmt: skip
