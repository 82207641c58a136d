"""The default segmenter: the attention model's self-trained student (a small U-Net).

Per slide, ``fit`` computes Reinhard statistics from the low-resolution view (as the
attention segmenter does); every tile is normalised with them, the U-Net gives class
probabilities (the GPU part), and ``probabilities_to_instances`` splits them (CPU).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from .attention import (
    MAX_NUCLEUS_RADIUS_UM,
    apply_stain_stats,
    batched_by_shape,
    file_sha256,
    pick_device,
    stain_stats,
)
from .normalize import imagenet_normalize
from .segmenters import SlideStats
from .student import class_probabilities, load_student, probabilities_to_instances

logger = logging.getLogger(__name__)


class StudentSegmenter:
    """Segmenter protocol implementation around student weights (safetensors)."""

    name = "student"

    def __init__(
        self,
        weights_path: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        tta: bool = False,
        max_batch: int | None = None,
    ) -> None:
        net, mpp, post, meta = load_student(weights_path)
        self.model_id = file_sha256(weights_path)[:16]
        self.metadata = meta
        self.device = pick_device(device)
        self._net = net.to(self.device).eval()
        self._max_batch = max_batch if max_batch is not None else (8 if self.device.type == "cuda" else 2)
        self.tta = bool(tta)
        self.postprocess_params = post
        self.mpp = mpp
        #: Tile windows must start on this grid of working pixels (the U-Net pools 3 times).
        self.grid_px = net.grid_px
        self.receptive_field_px = net.receptive_field_px()
        self.context_um = self.receptive_field_px / 2 * mpp + MAX_NUCLEUS_RADIUS_UM
        self._warned_mpp = False

    def fit(self, rgb: NDArray[np.uint8], mpp: float) -> SlideStats:
        """Reinhard statistics of a low-resolution view of the slide."""
        return stain_stats(rgb)

    def _check_mpp(self, mpp: float) -> None:
        if not self._warned_mpp and abs(mpp / self.mpp - 1.0) > 0.1:
            logger.warning("student model trained at %.3f µm/px is run at %.3f µm/px", self.mpp, mpp)
            self._warned_mpp = True

    def predict_batch(
        self, tiles: Sequence[NDArray[np.uint8]], mpp: float, stats: SlideStats
    ) -> list[NDArray[np.float16]]:
        """(3, H, W) float16 class probabilities of several tiles, batched by shape."""
        self._check_mpp(mpp)
        prepared = [apply_stain_stats(t, stats) for t in tiles]

        def run(batch: torch.Tensor) -> NDArray[np.float16]:
            x = imagenet_normalize(batch.permute(0, 3, 1, 2))
            return np.asarray(class_probabilities(self._net, x, tta=self.tta).half().cpu().numpy())

        return batched_by_shape(prepared, self._max_batch, self.device, run)

    def predict(self, rgb: NDArray[np.uint8], mpp: float, stats: SlideStats) -> NDArray[np.float16]:
        """Class probabilities (3, H, W) of one tile (the network part)."""
        return self.predict_batch([rgb], mpp, stats)[0]

    def postprocess(self, evidence: NDArray[np.float16], mpp: float, stats: SlideStats) -> NDArray[np.int32]:
        """Instances from class probabilities (seeded watershed, area filter)."""
        return probabilities_to_instances(evidence.astype(np.float32), mpp, self.postprocess_params)

    def segment(self, rgb: NDArray[np.uint8], mpp: float, stats: SlideStats) -> NDArray[np.int32]:
        """Instance labels (H, W) int32 of one RGB tile at ``mpp`` µm/px."""
        return self.postprocess(self.predict(rgb, mpp, stats), mpp, stats)
