"""The segmenter interface shared by the classical baseline and the attention model.

A segmenter turns an RGB tile at its working resolution into an instance label
image (0 = background, 1..N nuclei). Whatever must be identical for every tile of
one slide (stain statistics, a global threshold) is computed once per slide by
``fit`` from a low-resolution view and passed back into ``segment``: tiles never
compute their own thresholds, so seams cannot change the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class SlideStats:
    """Per-slide statistics a segmenter needs, computed once by ``Segmenter.fit``.

    ``values`` holds named floats (e.g. Reinhard LAB means/stds, an OD threshold).
    """

    values: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Segmenter(Protocol):
    """What every segmenter provides."""

    #: Short name recorded in outputs ("classical", "attention").
    name: str
    #: Identifier of the model (weights hash) or of the parameter set.
    model_id: str
    #: µm/px the segmenter works at by default.
    mpp: float
    #: µm of context a tile needs on each side of its core for the core's nuclei to be
    #: exact: half the receptive field plus the radius of the largest nucleus.
    context_um: float
    #: Tile windows must start on multiples of this many working pixels for the output to
    #: depend only on the pixels (1 for most; 8 for a U-Net that pools three times).
    grid_px: int

    def precision(self, device: str) -> str:
        """The arithmetic of the per-pixel pass on a device kind (``cpu``, ``cuda``): part of
        a run's identity, since it decides the bytes of the rows."""
        ...

    def fit(self, rgb: NDArray[np.uint8], mpp: float) -> SlideStats:
        """Compute per-slide statistics from a (low-resolution) RGB view of the tissue."""
        ...

    def predict(self, rgb: NDArray[np.uint8], mpp: float, stats: SlideStats) -> NDArray[Any]:
        """Per-pixel nucleus evidence of a tile (a mask or a map): the part a GPU would run."""
        ...

    def predict_batch(
        self, tiles: Sequence[NDArray[np.uint8]], mpp: float, stats: SlideStats
    ) -> list[NDArray[Any]]:
        """``predict`` of several tiles at once (a GPU model batches them)."""
        ...

    def postprocess(self, evidence: NDArray[Any], mpp: float, stats: SlideStats) -> NDArray[np.int32]:
        """Instance labels (H, W) int32 from ``predict``'s evidence (CPU work)."""
        ...

    def segment(self, rgb: NDArray[np.uint8], mpp: float, stats: SlideStats) -> NDArray[np.int32]:
        """Instance labels (H, W) int32 for an RGB uint8 (H, W, 3) tile at ``mpp`` µm/px:
        ``postprocess(predict(rgb))``."""
        ...
