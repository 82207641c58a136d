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


def make_segmenter(
    name: str, model_path: str | None = None, *, tta: bool | None = None, device: str | None = None
) -> Segmenter:
    """Build a segmenter by name; heavy dependencies (torch) load only when needed."""
    if name == "classical":
        from .classical import ClassicalSegmenter

        return ClassicalSegmenter()
    if name == "attention":
        model_path = model_path or shipped_weights("attention")
        if not model_path:
            from .errors import ConfigError

            raise ConfigError("the attention segmenter needs model weights (--model PATH)")
        from .attention import AttentionSegmenter

        return AttentionSegmenter(model_path, device=device, tta=True if tta is None else tta)
    if name == "student":
        from .student_segmenter import StudentSegmenter

        path = model_path or shipped_weights("student")
        if path is None:
            from .errors import ConfigError

            raise ConfigError("the student segmenter needs weights (--model PATH); none are shipped")
        return StudentSegmenter(path, device=device, tta=bool(tta))
    from .errors import ConfigError

    raise ConfigError(f"unknown segmenter {name!r}; choose classical, attention or student")


#: Weights files shipped in pipeline/weights/, by segmenter name.
SHIPPED_WEIGHTS = {"attention": "attention_f.safetensors", "student": "student.safetensors"}


def shipped_weights(name: str) -> str | None:
    """Path of the weights shipped for segmenter ``name``, or None."""
    from pathlib import Path

    if name not in SHIPPED_WEIGHTS:
        return None
    path = Path(__file__).with_name("weights") / SHIPPED_WEIGHTS[name]
    return str(path) if path.exists() else None


def default_segmenter() -> tuple[str, str | None]:
    """The segmenter used when none is named: the shipped self-trained student (it beats
    the classical baseline on MoNuSeg), else the classical baseline."""
    path = shipped_weights("student")
    return ("student", path) if path is not None else ("classical", None)


def segmenter_for_weights(path: str) -> str:
    """"student" or "attention", from the architecture recorded in a weights file."""
    from .model import read_metadata

    return "student" if read_metadata(path).get("arch") == "student_unet" else "attention"
