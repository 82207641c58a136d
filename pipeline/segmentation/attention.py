"""The attention segmenter: network F, thresholded and split into nuclei.

Per slide, ``fit`` computes the Reinhard statistics (LAB mean/std of tissue and the
white level) from the slide's low-resolution view; every tile is normalised with
those, so tiles of one slide are treated identically. F runs in eval mode with its
saved tau_ema; with test-time augmentation the map is the mean over the identity and
six dihedral transforms, each mapped back (method.md, "Inference and post-processing").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from skimage.filters import threshold_otsu

from ..color.normalize import imagenet_normalize, reinhard_normalize, reinhard_stats, white_level
from ..color.stain import rgb_to_od
from ..common.devices import batched_by_shape, file_sha256, pick_device
from ..networks.attention_net import (
    TRANSFORMS,
    dihedral,
    dihedral_inverse,
    load_weights,
    read_metadata,
    receptive_field_px,
    to_device,
)
from .instances import split_instances
from .protocol import SlideStats

logger = logging.getLogger(__name__)

#: µm/px F was trained at (the 40x scale class).
WORKING_MPP = 0.25
#: Radius of the largest nucleus considered, in µm (context beyond the receptive field).
MAX_NUCLEUS_RADIUS_UM = 12.0
#: How F's threshold on its logits is set (see ``AttentionSegmenter.fit``).
CALIBRATIONS = ("otsu", "quantile", "ema")
#: A pixel of the fit view is tissue when its largest channel optical density exceeds this.
TISSUE_OD = 0.06
_STAT_KEYS = ("lab_mean_l", "lab_mean_a", "lab_mean_b", "lab_std_l", "lab_std_a", "lab_std_b")


def _checked(rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB tile, got {rgb.dtype} {rgb.shape}")
    return rgb


def stain_stats(rgb: NDArray[np.uint8]) -> SlideStats:
    """Reinhard statistics (LAB mean/std of tissue, white level) of a slide's low-res view."""
    white = white_level(rgb)
    mean, std = reinhard_stats(rgb, white)
    values = dict(zip(_STAT_KEYS, [float(v) for v in (*mean, *std)]))
    values["white"] = white
    return SlideStats(values=values)


def apply_stain_stats(rgb: NDArray[np.uint8], stats: SlideStats) -> NDArray[np.uint8]:
    """``rgb`` Reinhard-normalised with a slide's statistics (the tile's own if absent)."""
    _checked(rgb)
    if not all(k in stats.values for k in (*_STAT_KEYS, "white")):
        return reinhard_normalize(rgb)  # no slide statistics: the tile's own
    v = [stats.values[k] for k in _STAT_KEYS]
    pair = (np.asarray(v[:3], dtype=np.float64), np.asarray(v[3:], dtype=np.float64))
    return reinhard_normalize(rgb, pair, white=stats.values["white"])


class AttentionSegmenter:
    """Segmenter protocol implementation around a trained network F (safetensors weights)."""

    name = "attention"
    grid_px = 1

    def __init__(
        self,
        weights_path: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        tta: bool = True,
        threshold: float = 0.5,
        max_batch: int | None = None,
        calibration: str = "otsu",
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
        self.calibration = calibration
        meta = read_metadata(weights_path)
        self._net = load_weights(weights_path)
        self.model_id = file_sha256(weights_path)[:16]
        self.device = pick_device(device)
        self.tta = bool(tta)
        self.threshold = float(threshold)
        self.stain_norm = meta.get("stain_norm", "true").lower() != "false"
        self.sparsity = float(self._net.sparsity)
        self.mpp = WORKING_MPP
        self.receptive_field_px = receptive_field_px(self._net)
        self.context_um = self.receptive_field_px / 2 * WORKING_MPP + MAX_NUCLEUS_RADIUS_UM
        cuda = self.device.type == "cuda"
        self._bf16 = cuda
        # One tile a pass on the CPU: CPU kernels are chosen by batch size, so batching would make
        # the rows depend on how tiles were grouped (in-process vs Ray). CUDA batches for speed.
        self._max_batch = max_batch if max_batch is not None else (8 if cuda else 1)
        self._net = to_device(self._net, self.device, channels_last=cuda).eval()
        self._warned_mpp = False
        #: The network runs in torch's threads: extraction measures the last tile meanwhile.
        self.predict_uses_threads = True

    @property
    def tau_ema(self) -> float:
        """The calibrated threshold on z the network uses."""
        return float(self._net.tau_ema)

    def precision(self, device: str) -> str:
        """bf16 autocast on CUDA, float32 elsewhere."""
        return "bf16" if device == "cuda" else "fp32"

    def fit(self, rgb: NDArray[np.uint8], mpp: float) -> SlideStats:
        """Reinhard statistics (LAB mean/std of tissue, white level) of the fit view and, unless
        ``calibration`` is "ema", F's threshold on its logits z for this slide (``tau``).

        The threshold comes from the map itself, so a network whose logits drifted during
        training (tau_ema lagging behind them, the map going dark) is still calibrated:
        "otsu" (default): Otsu's threshold of z over the view's tissue pixels, no share
        assumed; "quantile": the (1 - sparsity) quantile of z over those pixels, the
        training-time definition of "on" (method.md) made per slide; "ema": the stored
        tau_ema of training (the reference method). On the 19 training-part images, shipped
        F without TTA: AJI 0.347 (otsu), 0.312 (ema), 0.210 (quantile).
        """
        stats = stain_stats(rgb)
        if self.calibration == "ema":
            return stats
        z = self._logits(self._prepare(rgb, stats))
        tissue = rgb_to_od(rgb).max(axis=2) > TISSUE_OD
        values = z[tissue] if tissue.sum() >= 64 else z.ravel()
        if self.calibration == "quantile":
            tau = float(np.quantile(values, 1.0 - self.sparsity))
        else:
            tau = float(threshold_otsu(values)) if np.ptp(values) > 0 else float(values[0])  # type: ignore[no-untyped-call]
        return SlideStats(values={**stats.values, "tau": tau})

    @torch.inference_mode()
    def _logits(self, rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
        """F's logit map z (H, W) of one prepared (stain-normalised) image, no augmentation."""
        x = imagenet_normalize(torch.from_numpy(rgb[None]).to(self.device).permute(0, 3, 1, 2))
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self._bf16):
            z = self._net(x).z.float()
        return np.asarray(z[0, 0].cpu().numpy(), dtype=np.float32)

    def _prepare(self, rgb: NDArray[np.uint8], stats: SlideStats) -> NDArray[np.uint8]:
        return apply_stain_stats(rgb, stats) if self.stain_norm else _checked(rgb)

    def _check_mpp(self, mpp: float) -> None:
        if not self._warned_mpp and abs(mpp / self.mpp - 1.0) > 0.1:
            logger.warning("attention model trained at %.3f µm/px is run at %.3f µm/px", self.mpp, mpp)
            self._warned_mpp = True

    @torch.inference_mode()
    def _forward_tta(self, x: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        names = TRANSFORMS if self.tta else TRANSFORMS[:1]
        total = torch.zeros((x.shape[0], 1, *x.shape[-2:]), dtype=torch.float32, device=x.device)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self._bf16):
            for name in names:
                total += dihedral_inverse(self._net(dihedral(x, name), tau=tau).a.float(), name)
        return total / len(names)

    def attention_maps(
        self, tiles: Sequence[NDArray[np.uint8]], mpp: float, stats: SlideStats
    ) -> list[NDArray[np.float32]]:
        """Attention maps (H, W) float32 in [0, 1] of several tiles, batched by shape."""
        self._check_mpp(mpp)
        prepared = [self._prepare(t, stats) for t in tiles]
        fmt = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format

        tau = stats.values.get("tau") if self.calibration != "ema" else None

        def run(batch: torch.Tensor) -> NDArray[np.float32]:
            x = imagenet_normalize(batch.permute(0, 3, 1, 2)).contiguous(memory_format=fmt)
            return np.asarray(self._forward_tta(x, tau)[:, 0].clamp(0.0, 1.0).cpu().numpy(), dtype=np.float32)

        return batched_by_shape(prepared, self._max_batch, self.device, run)

    def attention_map(self, rgb: NDArray[np.uint8], mpp: float, stats: SlideStats) -> NDArray[np.float32]:
        """Attention map (H, W) float32 in [0, 1] of one tile at ``mpp`` µm/px."""
        return self.attention_maps([rgb], mpp, stats)[0]

    def image_map(self, rgb: NDArray[np.uint8], mpp: float) -> NDArray[np.float32]:
        """Attention map of a whole image at its own size and ``mpp`` µm/px, with the image's own
        stain statistics; F runs at its working µm/px (antialiased bilinear both ways)."""
        work = rgb
        if abs(mpp / WORKING_MPP - 1.0) > 0.05:
            size = (round(rgb.shape[0] * mpp / WORKING_MPP), round(rgb.shape[1] * mpp / WORKING_MPP))
            work = _resize(rgb.astype(np.float32), size).clip(0, 255).round().astype(np.uint8)
        a = self.attention_map(work, WORKING_MPP, self.fit(work, WORKING_MPP))
        if a.shape != rgb.shape[:2]:
            a = _resize(a[..., None], (rgb.shape[0], rgb.shape[1]))[..., 0]
        return np.asarray(a, dtype=np.float32)

    def segment_batch(
        self, tiles: Sequence[NDArray[np.uint8]], mpp: float, stats: SlideStats
    ) -> list[NDArray[np.int32]]:
        """Instance labels of several tiles (one batched network pass per shape group)."""
        maps = self.attention_maps(tiles, mpp, stats)
        return [self.postprocess(m, mpp, stats) for m in maps]

    def predict(self, rgb: NDArray[np.uint8], mpp: float, stats: SlideStats) -> NDArray[np.float32]:
        """The attention map of one tile (the network part)."""
        return self.attention_map(rgb, mpp, stats)

    def predict_batch(
        self, tiles: Sequence[NDArray[np.uint8]], mpp: float, stats: SlideStats
    ) -> list[NDArray[np.float32]]:
        """Attention maps of several tiles, batched through the network."""
        return self.attention_maps(tiles, mpp, stats)

    def postprocess(self, evidence: NDArray[np.float32], mpp: float, stats: SlideStats) -> NDArray[np.int32]:
        """Attention > threshold, then ``split_instances`` (the paper's post-processing)."""
        return split_instances(evidence > self.threshold, mpp)

    def segment(self, rgb: NDArray[np.uint8], mpp: float, stats: SlideStats) -> NDArray[np.int32]:
        """Instance labels (H, W) int32: attention > threshold, then ``split_instances``."""
        return self.segment_batch([rgb], mpp, stats)[0]


def _resize(img: NDArray[np.float32], size: tuple[int, int]) -> NDArray[np.float32]:
    """(H, W, C) float32 resampled to ``size`` with the training filter (antialiased bilinear)."""
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    y = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(y[0].permute(1, 2, 0).numpy())
