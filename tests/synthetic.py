"""Synthetic H&E-like whole-slide images with nuclei of known geometry.

``write_synthetic_slide`` streams a pyramidal, tiled, Aperio-SVS-like TIFF to disk
tile by tile (bounded memory, any size): pink eosin tissue inside a rectangle, white
glass outside, and dark purple elliptical nuclei on a jittered grid that never touch.
Every pyramid level is rendered directly at its own resolution with antialiased
edges (pixel coverage), so all levels agree. ``SyntheticTruth`` holds the exact
geometry for checking segmentation and morphometrics.

The ``write_*`` helpers below it make deliberately bad inputs for tests.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tifffile
from numpy.typing import NDArray

from nucleiscope.pipeline.common.errors import ConfigError

COMPRESSIONS = ("zlib", "zstd", "jpeg", "none")

_WHITE = np.array([244.0, 244.0, 246.0], np.float32)
_EOSIN = np.array([232.0, 160.0, 200.0], np.float32)
_HEMATOXYLIN = np.array([72.0, 50.0, 138.0], np.float32)
#: Per-channel amplitude of the smooth texture (darker where positive).
_TEXTURE_RGB = np.array([-10.0, -16.0, -12.0], np.float32)
#: Minimum distance between a nucleus and the edge of its grid cell (µm).
_CELL_GAP_UM = 1.5
#: Quantisation steps of nucleus coverage and texture in the colour look-up table.
_LUT_N, _LUT_T = 256, 64

_T = TypeVar("_T")


@dataclass(frozen=True)
class SyntheticTruth:
    """Exact geometry of a synthetic slide, in level-0 continuous pixel coordinates.

    Nucleus ``k`` is the ellipse centred at (``cx_px[k]``, ``cy_px[k]``) with
    semi-axes ``a_um[k]`` >= ``b_um[k]``; ``angle_rad[k]`` is the direction of
    the major axis from +x towards +y (image rows point down).
    ``tissue_rect_px`` = (x0, y0, x1, y1), half-open.
    """

    path: str
    width_px: int
    height_px: int
    mpp: float
    tile_px: int
    level_downsamples: tuple[int, ...]
    level_dimensions: tuple[tuple[int, int], ...]
    tissue_rect_px: tuple[int, int, int, int]
    cx_px: NDArray[np.float64]
    cy_px: NDArray[np.float64]
    a_um: NDArray[np.float64]
    b_um: NDArray[np.float64]
    angle_rad: NDArray[np.float64]

    @property
    def n_nuclei(self) -> int:
        return int(self.cx_px.size)

    def area_um2(self) -> NDArray[np.float64]:
        """Analytic ellipse areas, πab."""
        return np.pi * self.a_um * self.b_um

    def perimeter_um(self) -> NDArray[np.float64]:
        """Ellipse perimeters by Ramanujan's second approximation."""
        a, b = self.a_um, self.b_um
        h = ((a - b) / (a + b)) ** 2
        return np.asarray(np.pi * (a + b) * (1 + 3 * h / (10 + np.sqrt(4 - 3 * h))), dtype=np.float64)

    def eccentricity(self) -> NDArray[np.float64]:
        return np.sqrt(1.0 - (self.b_um / self.a_um) ** 2)

    def tissue_area_mm2(self) -> float:
        x0, y0, x1, y1 = self.tissue_rect_px
        return (x1 - x0) * (y1 - y0) * self.mpp**2 / 1e6


@dataclass(frozen=True)
class _Nuclei:
    """Nuclei on a grid of cells (rows, cols), in level-0 pixels."""

    origin_px: tuple[float, float]
    cell_px: float
    cx: NDArray[np.float64]
    cy: NDArray[np.float64]
    a: NDArray[np.float64]
    b: NDArray[np.float64]
    cos: NDArray[np.float64]
    sin: NDArray[np.float64]


@dataclass(frozen=True)
class _Scene:
    mpp: float
    width_px: int
    height_px: int
    tissue: tuple[int, int, int, int]
    nuclei: _Nuclei
    phases: NDArray[np.float64]
    lut: NDArray[np.uint8]
    hematoxylin: NDArray[np.float32]


def _colour_lut(hematoxylin: NDArray[np.float32] = _HEMATOXYLIN) -> NDArray[np.uint8]:
    """RGB of full tissue for quantised (nucleus coverage, texture): (_LUT_N * _LUT_T, 3)."""
    n = np.linspace(0.0, 1.0, _LUT_N, dtype=np.float32)[:, None, None]
    t = np.linspace(-1.0, 1.0, _LUT_T, dtype=np.float32)[None, :, None]
    eosin = _EOSIN + t * _TEXTURE_RGB
    dark = hematoxylin + t * np.float32(0.6) * _TEXTURE_RGB
    rgb = eosin + n * (dark - eosin)
    return np.asarray(np.rint(rgb), dtype=np.uint8).reshape(_LUT_N * _LUT_T, 3)


def _make_nuclei(
    tissue: tuple[int, int, int, int],
    mpp: float,
    radii_um: tuple[float, float],
    ratio: tuple[float, float],
    spacing_um: float,
    rng: np.random.Generator,
) -> _Nuclei:
    x0, y0, x1, y1 = tissue
    cell = spacing_um / mpp
    cols, rows = int((x1 - x0) // cell), int((y1 - y0) // cell)
    r = rng.uniform(radii_um[0], radii_um[1], (rows, cols))
    q = rng.uniform(ratio[0], ratio[1], (rows, cols))
    a_um, b_um = r * np.sqrt(q), r / np.sqrt(q)
    jitter_um = max(0.0, spacing_um / 2 - radii_um[1] * math.sqrt(ratio[1]) - _CELL_GAP_UM)
    jx = rng.uniform(-jitter_um, jitter_um, (rows, cols)) / mpp
    jy = rng.uniform(-jitter_um, jitter_um, (rows, cols)) / mpp
    angle = rng.uniform(0.0, np.pi, (rows, cols))
    cx = x0 + (np.arange(cols)[None, :] + 0.5) * cell + jx
    cy = y0 + (np.arange(rows)[:, None] + 0.5) * cell + jy
    return _Nuclei(
        origin_px=(float(x0), float(y0)),
        cell_px=cell,
        cx=cx,
        cy=cy,
        a=a_um / mpp,
        b=b_um / mpp,
        cos=np.cos(angle),
        sin=np.sin(angle),
    )


def _texture(xs_um: NDArray[np.floating[Any]], ys_um: NDArray[np.floating[Any]],
             phases: NDArray[np.float64]) -> NDArray[np.float32]:
    """Smooth deterministic texture in [-1, 1] at the given µm positions (outer grid)."""
    out = np.zeros((ys_um.size, xs_um.size), np.float32)
    for k, wavelength in enumerate((90.0, 37.0, 11.0)):
        w = 2 * np.pi / wavelength
        sx = np.sin(w * xs_um + phases[2 * k]).astype(np.float32)
        cy = (np.cos(w * 0.8 * ys_um + phases[2 * k + 1]) * (0.5 / (k + 1))).astype(np.float32)
        out += cy[:, None] * sx[None, :]
    return out


def _box_coverage(centres: NDArray[np.floating[Any]], d: float, lo: int, hi: int) -> NDArray[np.float32]:
    """Fraction of each pixel [c - d/2, c + d/2) inside [lo, hi)."""
    cover = np.minimum(centres + d / 2, hi) - np.maximum(centres - d / 2, lo)
    return np.asarray(np.clip(cover / d, 0.0, 1.0), dtype=np.float32)


def _nuclei_coverage(nuc: _Nuclei, d: float, lx: int, ly: int, th: int, tw: int) -> NDArray[np.float32]:
    """Antialiased coverage (th, tw) of the nuclei on a tile of a level with downsample d."""
    ox, oy = nuc.origin_px
    rows, cols = nuc.cx.shape
    c0 = max(0, int((lx * d - ox) // nuc.cell_px))
    c1 = min(cols, int(((lx + tw) * d - ox) // nuc.cell_px) + 1)
    r0 = max(0, int((ly * d - oy) // nuc.cell_px))
    r1 = min(rows, int(((ly + th) * d - oy) // nuc.cell_px) + 1)
    if c0 >= c1 or r0 >= r1:
        return np.zeros((th, tw), np.float32)
    sel = (slice(r0, r1), slice(c0, c1))
    f32 = np.float32
    cx = (nuc.cx[sel].ravel() / d - lx).astype(f32)
    cy = (nuc.cy[sel].ravel() / d - ly).astype(f32)
    a, b = (nuc.a[sel].ravel() / d).astype(f32), (nuc.b[sel].ravel() / d).astype(f32)
    cos, sin = nuc.cos[sel].ravel().astype(f32), nuc.sin[sel].ravel().astype(f32)
    span = int(math.ceil(2 * float(a.max()) + 3))
    steps = np.arange(span, dtype=np.int32)
    jj = np.floor(cx - a - 1).astype(np.int32)[:, None] + steps  # (n, span)
    ii = np.floor(cy - a - 1).astype(np.int32)[:, None] + steps
    du = (jj.astype(f32) + f32(0.5) - cx[:, None])[:, None, :]
    dv = (ii.astype(f32) + f32(0.5) - cy[:, None])[:, :, None]
    inv_a, inv_b = (1 / a)[:, None, None], (1 / b)[:, None, None]
    p = (du * cos[:, None, None] + dv * sin[:, None, None]) * inv_a  # u / a
    q = (dv * cos[:, None, None] - du * sin[:, None, None]) * inv_b  # v / b
    r = np.sqrt(p * p + q * q)
    p *= inv_a
    q *= inv_b
    # signed distance to the ellipse ~ F / |grad F| with F = r - 1, in level pixels
    grad = np.sqrt(np.maximum(p * p + q * q, f32(1e-12)))
    val = np.clip(f32(0.5) - (r - 1) * r / grad, 0, 1)
    inside = (ii[:, :, None] >= 0) & (ii[:, :, None] < th) & (jj[:, None, :] >= 0) & (jj[:, None, :] < tw)
    keep = inside & (val > 0)
    index = (ii[:, :, None] * tw + jj[:, None, :])[keep]
    # nuclei are disjoint, so coverages add up (a coarse pixel may hold parts of two)
    cover = np.bincount(index, weights=val[keep], minlength=th * tw).astype(np.float32)
    return np.minimum(cover, 1.0, out=cover).reshape(th, tw)


def _render(scene: _Scene, d: float, lx: int, ly: int, th: int, tw: int) -> NDArray[np.uint8]:
    """RGB (th, tw) of the level with downsample d, tile top-left at level px (lx, ly)."""
    xs = (lx + np.arange(tw) + 0.5) * d
    ys = (ly + np.arange(th) + 0.5) * d
    x0, y0, x1, y1 = scene.tissue
    cov_y, cov_x = _box_coverage(ys, d, y0, y1), _box_coverage(xs, d, x0, x1)
    out = np.empty((th, tw, 3), np.uint8)
    if not (cov_y.any() and cov_x.any()):
        out[:] = np.rint(_WHITE).astype(np.uint8)
        return out
    full = bool(cov_y.min() == 1.0 and cov_x.min() == 1.0)
    tissue = None if full else np.outer(cov_y, cov_x)
    tex = _texture(xs * scene.mpp, ys * scene.mpp, scene.phases)
    nuc = _nuclei_coverage(scene.nuclei, d, lx, ly, th, tw)
    if full:  # fast path: look colours up from (nucleus coverage, texture), quantised
        index = (nuc * np.float32(_LUT_N - 1) + np.float32(0.5)).astype(np.uint16)
        index *= _LUT_T
        index += (tex * np.float32((_LUT_T - 1) / 2) + np.float32(_LUT_T / 2)).astype(np.uint16)
        return scene.lut.take(index, axis=0)
    has_nuclei = bool(nuc.any())
    # Per channel on 2-D planes: colours are convex mixtures, so no clipping is needed.
    for c in range(3):
        plane = tex * _TEXTURE_RGB[c]
        plane += _EOSIN[c] - _WHITE[c]
        if tissue is not None:
            plane *= tissue
        plane += _WHITE[c]
        if has_nuclei:
            dark = tex * (np.float32(0.6) * _TEXTURE_RGB[c])
            dark += scene.hematoxylin[c]
            dark -= plane
            dark *= nuc
            plane += dark
        plane += np.float32(0.5)
        out[..., c] = plane
    return out


def _prefetch(fn: Callable[..., _T], args: Iterator[tuple[Any, ...]], pool: ThreadPoolExecutor, depth: int) -> Iterator[_T]:
    """Yield fn(*a) for each a in order, computing at most ``depth`` ahead."""
    queue: deque[Future[_T]] = deque()
    for a in args:
        queue.append(pool.submit(fn, *a))
        if len(queue) >= depth:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def _level_sizes(width: int, height: int, factor: int, min_level_px: int, max_levels: int | None) -> list[tuple[int, int, int]]:
    levels = [(1, width, height)]
    while max(levels[-1][1:]) > min_level_px and (max_levels is None or len(levels) < max_levels):
        d = levels[-1][0] * factor
        levels.append((d, math.ceil(width / d), math.ceil(height / d)))
    return levels


def _validate(width_px: int, height_px: int, mpp: float, tile_px: int, radii: tuple[float, float],
              ratio: tuple[float, float], spacing_um: float, compression: str) -> None:
    if width_px < 1 or height_px < 1:
        raise ConfigError(f"slide size must be positive, got {width_px}x{height_px}")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ConfigError(f"mpp must be positive, got {mpp}")
    if tile_px < 16 or tile_px % 16:
        raise ConfigError(f"tile_px must be a multiple of 16, got {tile_px}")
    if not (0 < radii[0] <= radii[1]) or not (1.0 <= ratio[0] <= ratio[1]):
        raise ConfigError(f"need 0 < radii and 1 <= ellipse ratios, got {radii}, {ratio}")
    if spacing_um / 2 - radii[1] * math.sqrt(ratio[1]) < _CELL_GAP_UM:
        raise ConfigError(f"spacing_um={spacing_um} lets nuclei of radius up to {radii[1]} µm touch")
    if compression not in COMPRESSIONS:
        raise ConfigError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")


def _aperio_description(width: int, height: int, tile_px: int, mpp: float | None, extra: str = "") -> str:
    text = f"Aperio Image Library v12.0.0 (nucleiscope synthetic)\n{width}x{height} ({tile_px}x{tile_px}) {extra}"
    if mpp is not None:
        text += f"|AppMag = {round(10.0 / mpp)}|MPP = {mpp:.6f}"
    return text


def write_synthetic_slide(
    path: str | Path,
    *,
    width_px: int,
    height_px: int,
    mpp: float = 0.25,
    tile_px: int = 512,
    nucleus_radii_um: tuple[float, float] = (3.0, 4.0),
    ellipse_ratio: tuple[float, float] = (1.0, 1.8),
    spacing_um: float = 20.0,
    tissue_margin_px: int | None = None,
    seed: int = 0,
    compression: str = "zlib",
    level_factor: int = 4,
    min_level_px: int = 1024,
    max_levels: int | None = None,
    write_mpp: bool = True,
    workers: int = 2,
    nucleus_rgb: tuple[float, float, float] | None = None,
) -> SyntheticTruth:
    """Write a pyramidal tiled SVS-like TIFF and return its exact nuclei.

    Nucleus equivalent radii are uniform in ``nucleus_radii_um``, axis ratios a/b
    uniform in ``ellipse_ratio`` (area = π r²), one per ``spacing_um`` grid cell of
    the tissue rectangle (inset by ``tissue_margin_px``, default 10 % of the
    shorter side). Levels have downsamples 1, f, f², ... while the last level is
    larger than ``min_level_px``. ``write_mpp=False`` leaves out all resolution
    metadata. ``compression`` "jpeg" is lossy; the others are exact. ``nucleus_rgb`` replaces the
    nuclei's colour (default a haematoxylin purple), e.g. for a slide stained paler than the rest.
    """
    _validate(width_px, height_px, mpp, tile_px, nucleus_radii_um, ellipse_ratio, spacing_um, compression)
    margin = int(0.1 * min(width_px, height_px)) if tissue_margin_px is None else tissue_margin_px
    tissue = (margin, margin, max(margin, width_px - margin), max(margin, height_px - margin))
    rng = np.random.default_rng(seed)
    nuclei = _make_nuclei(tissue, mpp, nucleus_radii_um, ellipse_ratio, spacing_um, rng)
    dark = _HEMATOXYLIN if nucleus_rgb is None else np.asarray(nucleus_rgb, np.float32)
    scene = _Scene(mpp, width_px, height_px, tissue, nuclei, rng.uniform(0, 2 * np.pi, 6), _colour_lut(dark), dark)
    levels = _level_sizes(width_px, height_px, level_factor, min_level_px, max_levels)
    _write_pyramid(path, scene, levels, tile_px, compression, write_mpp, max(1, workers))
    return SyntheticTruth(
        path=str(path),
        width_px=width_px,
        height_px=height_px,
        mpp=mpp,
        tile_px=tile_px,
        level_downsamples=tuple(d for d, _, _ in levels),
        level_dimensions=tuple((lw, lh) for _, lw, lh in levels),
        tissue_rect_px=tissue,
        cx_px=nuclei.cx.ravel().copy(),
        cy_px=nuclei.cy.ravel().copy(),
        a_um=(nuclei.a * mpp).ravel(),
        b_um=(nuclei.b * mpp).ravel(),
        angle_rad=np.arctan2(nuclei.sin, nuclei.cos).ravel(),
    )


def _write_pyramid(path: str | Path, scene: _Scene, levels: list[tuple[int, int, int]], tile_px: int,
                   compression: str, write_mpp: bool, workers: int) -> None:
    """SVS page order: level 0, thumbnail, levels 1...; tiles rendered ahead in threads."""
    codec: dict[str, Any] = {"compression": None if compression == "none" else compression}
    if compression in ("jpeg", "zlib"):
        codec["compressionargs"] = {"level": 90 if compression == "jpeg" else 4}
    mpp = scene.mpp if write_mpp else None
    with tifffile.TiffWriter(path, bigtiff=True) as tw, ThreadPoolExecutor(workers) as pool:
        for index, (d, lw, lh) in enumerate(levels):
            coords = ((scene, float(d), tx, ty, tile_px, tile_px)
                      for ty in range(0, lh, tile_px) for tx in range(0, lw, tile_px))
            desc = _aperio_description(scene.width_px, scene.height_px, tile_px, mpp)
            extra: dict[str, Any] = {}
            if index:
                desc = f"{desc} -> {lw}x{lh} (downsample {d})"
            elif mpp is not None:
                extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
            tw.write(_prefetch(_render, coords, pool, depth=2 * workers), shape=(lh, lw, 3), dtype=np.uint8,
                     tile=(tile_px, tile_px), photometric="rgb", description=desc, metadata=None, subfiletype=0,
                     maxworkers=workers, buffersize=16 * workers * tile_px * tile_px * 3, **codec, **extra)
            if index == 0 and len(levels) > 1:
                _write_thumbnail(tw, scene, desc)


def _write_thumbnail(tw: tifffile.TiffWriter, scene: _Scene, desc: str) -> None:
    """The SVS thumbnail page (second page, stripped), at most 768 px a side."""
    d = max(1.0, max(scene.width_px, scene.height_px) / 768)
    w, h = max(1, int(scene.width_px / d)), max(1, int(scene.height_px / d))
    thumb = _render(scene, d, 0, 0, h, w)
    tw.write(thumb, photometric="rgb", description=f"{desc} thumbnail {w}x{h}", metadata=None,
             compression="zlib", subfiletype=0)


# --- bad inputs for tests -----------------------------------------------------------


def write_random_bytes(path: str | Path, n_bytes: int, *, seed: int = 0) -> Path:
    """A file of random bytes (not any image format)."""
    out = Path(path)
    out.write_bytes(np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes())
    return out


def write_truncated_copy(src: str | Path, dst: str | Path, fraction: float) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes to ``dst``."""
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction must be in (0, 1), got {fraction}")
    data = Path(src).read_bytes()
    out = Path(dst)
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


def write_tiff_without_resolution(path: str | Path, *, width_px: int = 1024, height_px: int = 768) -> Path:
    """An H&E-like tiled TIFF with no µm/px anywhere (no MPP, no resolution tags)."""
    write_synthetic_slide(path, width_px=width_px, height_px=height_px, tile_px=256,
                          max_levels=1, write_mpp=False, workers=1)
    return Path(path)


def write_absurd_size_tiff(path: str | Path, *, side_px: int = 10_000_000) -> Path:
    """A small tiled TIFF whose ImageWidth/ImageLength tags are patched to ``side_px``."""
    write_synthetic_slide(path, width_px=256, height_px=256, tile_px=256, max_levels=1, workers=1)
    with tifffile.TiffFile(path, mode="r+") as tif:
        tags = tif.pages.first.tags
        for name in ("ImageWidth", "ImageLength"):
            tags[name].overwrite(side_px, dtype=4)  # LONG
    return Path(path)


def write_fluorescence_like_slide(path: str | Path, *, width_px: int = 1024, height_px: int = 1024,
                                  mpp: float = 0.25, seed: int = 0) -> Path:
    """A 3-channel slide, mostly black with bright blue/green blobs (like a DAPI/FITC scan)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(6, 2, (height_px, width_px, 3)).astype(np.float32)
    colour = np.array([20.0, 120.0, 230.0], np.float32)
    for _ in range(max(1, width_px * height_px // 4000)):
        cx, cy, r = rng.uniform(0, width_px), rng.uniform(0, height_px), rng.uniform(8, 16)
        x0, x1 = max(0, int(cx - 3 * r)), min(width_px, int(cx + 3 * r) + 1)
        y0, y1 = max(0, int(cy - 3 * r)), min(height_px, int(cy + 3 * r) + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        blob = np.exp(-((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) / (2 * r * r))
        img[y0:y1, x0:x1] += blob[..., None] * colour
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    desc = _aperio_description(width_px, height_px, 256, mpp)
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="zlib",
                     description=desc, metadata=None)
    return Path(path)


def write_inconsistent_levels_tiff(path: str | Path) -> Path:
    """An SVS-like file whose second level (1000x100) is no uniform reduction of level 0 (1024x1024)."""
    desc = _aperio_description(1024, 1024, 256, 0.25)
    pink = np.broadcast_to(np.rint(_EOSIN).astype(np.uint8), (1024, 1024, 3))
    with tifffile.TiffWriter(path) as tw:
        tw.write(pink, tile=(256, 256), photometric="rgb", description=desc, metadata=None)
        tw.write(pink[:64, :64], photometric="rgb", description=desc, metadata=None)
        tw.write(pink[:100, :1000], tile=(256, 256), photometric="rgb", description=desc, metadata=None)
    return Path(path)


def crowded_boxes() -> NDArray[np.int32]:
    """1000² labels: 1,024 boxes of 20 x 25 px on a 31 px grid, with sparse ids (37 k + 5)."""
    labels = np.zeros((1000, 1000), np.int32)
    for k in range(1024):
        r, c = divmod(k, 32)
        labels[r * 31: r * 31 + 20, c * 31: c * 31 + 25] = 37 * k + 5
    return labels


def crowded_discs(seed: int = 0) -> tuple[NDArray[np.int32], NDArray[np.uint8]]:
    """A 1024² tile of 1,024 discs (radius 5-12 px, jittered on a 32 px grid) and random RGB."""
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    labels = np.zeros((1024, 1024), np.int32)
    for k in range(1024):
        i, j = divmod(k, 32)
        rr, cc = disk((32 * i + 16 + rng.uniform(-3, 3), 32 * j + 16 + rng.uniform(-3, 3)),
                      rng.uniform(5, 12), shape=labels.shape)
        labels[rr, cc] = k + 1
    return labels, rng.integers(0, 256, labels.shape + (3,), dtype=np.uint8)
