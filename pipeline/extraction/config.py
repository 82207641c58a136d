"""Frozen, validated configuration objects, passed down explicitly.

Nothing here is module-level mutable state: a driver builds one ``ExtractConfig``
and ships it to every worker, so what a Ray worker sees is what the user asked for.
Units live in the names (``tile_px``, ``mpp``, ``max_nucleus_um``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..common.errors import ConfigError
from ..measure.lymphocytes import DEFAULT_RULE, LymphocyteRule
from ..tiling.plan import TileConfig

SEGMENTERS = ("classical", "attention", "student")


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides the nuclei a slide yields (hashed into the run id)."""

    segmenter: str = "classical"
    model_path: str | None = None
    tile_px: int = 1024
    #: None: twice the segmenter's context (receptive field / 2 + largest nucleus / 2).
    overlap_px: int | None = None
    #: µm/px of level 0 for every slide, overriding metadata (None: read from metadata).
    mpp_override: float | None = None
    #: µm/px the segmenter works at (None: the segmenter's own default).
    seg_mpp: float | None = None
    #: µm/px of the view the tissue mask is computed on.
    tissue_mpp: float = 8.0
    #: Largest QC thumbnail edge in pixels.
    qc_max_px: int = 2048
    #: Dihedral test-time augmentation (None: the segmenter's default, on for attention,
    #: off for the student, whose 8 passes cost 8x for about +0.004 AJI).
    tta: bool | None = None
    #: Drop objects that are not nuclei (ink) and flag suspect ones (``artefacts`` module,
    #: the ``artefact`` column); False keeps every object and leaves the column null.
    artefacts: bool = True
    #: Thresholds of the ``lymphocyte_like`` column (``measure.lymphocytes``); None leaves it null.
    lymphocytes: LymphocyteRule | None = DEFAULT_RULE
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.segmenter not in SEGMENTERS:
            raise ConfigError(f"segmenter must be one of {SEGMENTERS}, got {self.segmenter!r}")
        if self.segmenter != "classical" and not self.model_path:
            raise ConfigError(f"the {self.segmenter} segmenter needs model weights (--model PATH)")
        if not isinstance(self.tile_px, int) or self.tile_px < 64:
            raise ConfigError(f"tile_px must be an integer >= 64, got {self.tile_px!r}")
        if self.overlap_px is not None:
            TileConfig(self.tile_px, self.overlap_px)
        for name in ("mpp_override", "seg_mpp"):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value)
        _positive("tissue_mpp", self.tissue_mpp)
        if self.lymphocytes is not None and not isinstance(self.lymphocytes, LymphocyteRule):
            raise ConfigError(f"lymphocytes must be a LymphocyteRule or None, got {self.lymphocytes!r}")
        if not isinstance(self.qc_max_px, int) or self.qc_max_px < 64:
            raise ConfigError(f"qc_max_px must be an integer >= 64, got {self.qc_max_px!r}")

    def tiles(self, context_px: int, grid_px: int = 1) -> TileConfig:
        """The tile geometry, filling in the default overlap from a segmenter's context.

        ``grid_px``: a network that pools (a U-Net) gives the same output for the same
        pixels only when windows are shifted by multiples of it, so the overlap grows
        until the stride between windows is a multiple of ``grid_px``.
        """
        overlap = self.overlap_px if self.overlap_px is not None else 2 * context_px
        overlap += overlap % 2
        for _ in range(grid_px):
            if (self.tile_px - overlap) % grid_px == 0:
                return TileConfig(self.tile_px, overlap)
            overlap += 2
        raise ConfigError(f"tile_px {self.tile_px} cannot give a stride that is a multiple of {grid_px} px")

    def public_dict(self) -> dict[str, Any]:
        """The config as plain data for run.json, without storage options (credentials)."""
        data = asdict(self)
        data.pop("storage_options", None)
        return data
