"""The default segmenter: the attention model's self-trained student (a small U-Net).

Per slide, ``fit`` computes Reinhard statistics from the low-resolution view (as the
attention segmenter does); every tile is normalised with them, the U-Net gives class
probabilities (the GPU part), and ``probabilities_to_instances`` splits them (CPU):
nucleus cores seed a watershed of the nucleus mask, so touching nuclei split along the
predicted boundaries. The student's weights file carries its working µm/px and its
post-processing parameters (``save_student``/``load_student``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from scipy import ndimage as ndi

from ..color.normalize import imagenet_normalize
from ..common.devices import batched_by_shape, file_sha256, pick_device
from ..common.errors import ConfigError, ModelError
from ..networks.student_net import ARCH, BOUNDARY, INTERIOR, StudentNet, class_probabilities, cpu_has_bf16
from .attention import MAX_NUCLEUS_RADIUS_UM, apply_stain_stats, stain_stats
from .instances import (
    component_peaks,
    component_watershed,
    dilate_disk,
    disk_footprint,
    euclidean_distance,
    fill_small_holes,
    filter_by_area,
    remove_small_components,
)
from .protocol import SlideStats

logger = logging.getLogger(__name__)
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class StudentPostprocess:
    """How class probabilities become instances (physical sizes in µm, µm²).

    Defaults were chosen on the MoNuSeg training labels (seed footprint 1.75 -> 3 µm and
    seed threshold 0.5 vs 0.7 moved mean AJI by about 0.01); nothing else used labels.
    """

    #: A pixel is nucleus when P(interior) + P(boundary) exceeds this.
    fg_threshold: float = 0.5
    #: How outlines are drawn. "core": a nucleus is its interior core (P(interior) >
    #: seed_threshold) grown by ``boundary_um``, as the pseudo-labels define the boundary
    #: class (a band of that width inside each nucleus), within the mask above; mask
    #: components with no core are kept whole. "mask": the whole mask above (before
    #: 2026-12; outlines ~25 % too large, see benchmarks/bench_quality.py).
    outline: str = "core"
    #: Width of the boundary band added around the cores ("core" outlines).
    boundary_um: float = 0.5
    #: Pixels with P(interior) above this form the nucleus cores that seeds come from.
    seed_threshold: float = 0.5
    #: A seed is a core pixel whose smoothed distance to the core's edge is maximal
    #: within this radius (one seed per roundish core; two for a waisted pair).
    seed_footprint_um: float = 3.0
    seed_sigma_um: float = 0.25
    max_hole_um2: float = 20.0
    min_area_um2: float = 8.0
    max_area_um2: float = 250.0

    def __post_init__(self) -> None:
        for name in ("fg_threshold", "seed_threshold"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if self.outline not in ("core", "mask") or not self.boundary_um >= 0:
            raise ConfigError(f"outline must be 'core' or 'mask' and boundary_um >= 0, got {self.outline!r}")
        sizes = (self.seed_footprint_um, self.seed_sigma_um, self.max_hole_um2, self.min_area_um2)
        if min(sizes) < 0 or self.seed_footprint_um <= 0 or not self.min_area_um2 < self.max_area_um2:
            raise ConfigError("sizes must be >= 0, seed_footprint_um > 0 and min_area_um2 < max_area_um2")

    def to_json(self) -> str:
        """Compact JSON of the parameters (stored in the weights' metadata)."""
        return json.dumps(self.__dict__, sort_keys=True)


def probabilities_to_instances(
    probs: NDArray[np.floating], mpp: float, params: StudentPostprocess | None = None
) -> NDArray[np.int32]:
    """Instance labels from (3, H, W) class probabilities at ``mpp`` µm/px.

    Nucleus mask = P(interior) + P(boundary) > fg_threshold (small holes filled, specks
    dropped); cores = P(interior) > seed_threshold inside it; seeds = per-core maxima of
    the smoothed core distance transform; marker watershed on -P(interior), per
    connected component of the mask; a component without a seed is one nucleus;
    then the area filter. With "core" outlines, each nucleus is finally cut to its core
    grown by ``boundary_um`` (``core_outline_mask``; pieces under half the minimum area
    dropped). Labels follow the raster order of their first pixel.
    """
    p = params if params is not None else StudentPostprocess()
    if probs.ndim != 3 or probs.shape[0] != 3:
        raise ValueError(f"expected (3, H, W) probabilities, got shape {probs.shape}")
    interior = np.asarray(probs[INTERIOR], dtype=np.float32)
    mask = (probs[INTERIOR] + probs[BOUNDARY]) > p.fg_threshold
    labels = mask_to_instances(mask, interior, mpp, p)
    if p.outline == "mask" or not labels.any():
        return labels
    # Which nuclei exist is decided on the whole mask (above); only their outlines shrink.
    cut = core_outline_mask(labels > 0, interior > p.seed_threshold, round(p.boundary_um / mpp))
    labels = np.where(cut, labels, 0).astype(np.int32)
    return _renumber_raster(filter_by_area(labels, p.min_area_um2 / (mpp * mpp) / 2, np.inf))


def core_outline_mask(mask: NDArray[np.bool_], core: NDArray[np.bool_], band_px: int) -> NDArray[np.bool_]:
    """``core`` grown by ``band_px`` (a disk) inside ``mask``; components of ``mask`` that
    hold no core pixel are kept whole (a small nucleus the network saw only as boundary)."""
    core = core & mask
    grown = dilate_disk(core, disk_footprint(band_px)) if band_px > 0 else core
    components, count = ndi.label(mask, structure=_EIGHT)
    has_core = np.zeros(count + 1, dtype=bool)
    has_core[np.unique(components[core])] = True
    has_core[0] = False
    return np.asarray((grown & mask) | (mask & ~has_core[components]), dtype=bool)


def mask_to_instances(
    mask: NDArray[np.bool_], interior: NDArray[np.float32], mpp: float, p: StudentPostprocess
) -> NDArray[np.int32]:
    """Split a nucleus mask into instances seeded by the cores of ``interior`` (P(interior))."""
    px2 = mpp * mpp
    mask = fill_small_holes(mask, p.max_hole_um2 / px2)
    mask = remove_small_components(mask, max(1.0, p.min_area_um2 / px2 / 2))
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    core = (interior > p.seed_threshold) & mask
    depth = euclidean_distance(core)
    if p.seed_sigma_um > 0:
        depth = ndi.gaussian_filter(depth, p.seed_sigma_um / mpp)
    cores, _ = ndi.label(core, structure=_EIGHT)
    peaks = component_peaks(depth, cores, max(1, int(round(p.seed_footprint_um / mpp))))
    components, count = ndi.label(mask, structure=_EIGHT)
    markers, n_seeds = ndi.label(peaks, structure=_EIGHT)
    # Components without a seed become nuclei of their own, numbered after the seeds.
    seeded = np.zeros(count + 1, dtype=bool)
    seeded[np.unique(components[peaks])] = True
    orphan = ~seeded[components] & mask
    markers = markers.astype(np.int32)
    if orphan.any():
        orphan_labels, _ = ndi.label(orphan, structure=_EIGHT)
        markers[orphan] = orphan_labels[orphan] + n_seeds
    labels = component_watershed(-interior, markers, components)
    return filter_by_area(_renumber_raster(labels), p.min_area_um2 / px2, p.max_area_um2 / px2)


def _renumber_raster(labels: NDArray[np.int32]) -> NDArray[np.int32]:
    """Renumber labels 1..N in raster order of their first pixel."""
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids > 0
    ids, first = ids[keep], first[keep]
    order = ids[np.argsort(first, kind="stable")]
    lut = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.int32)
    lut[order] = np.arange(1, order.size + 1, dtype=np.int32)
    return np.asarray(lut[labels], dtype=np.int32)


def save_student(
    net: StudentNet,
    path: str | os.PathLike[str],
    *,
    mpp: float,
    postprocess: StudentPostprocess,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the student's weights with its architecture, working µm/px and post-processing."""
    meta = {
        **{k: str(v) for k, v in (metadata or {}).items()},
        "arch": ARCH,
        "widths": json.dumps(list(net.widths)),
        "mpp": repr(float(mpp)),
        "postprocess": postprocess.to_json(),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    try:
        save_file(tensors, os.fspath(path), metadata=meta)
    except OSError as exc:
        raise ModelError(f"cannot write weights to {os.fspath(path)}: {exc}") from exc


def load_student(path: str | os.PathLike[str]) -> tuple[StudentNet, float, StudentPostprocess, dict[str, str]]:
    """(network in eval mode on the CPU, working µm/px, post-processing, metadata) of a file."""
    name = os.fspath(path)
    try:
        with safe_open(name, framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            if meta.get("arch") != ARCH:
                raise ModelError(f"{name} holds no student network (arch={meta.get('arch')!r})")
            net = StudentNet(json.loads(meta["widths"]))
            net.load_state_dict({k: handle.get_tensor(k) for k in handle.keys()}, strict=True)  # noqa: SIM118
            post = StudentPostprocess(**json.loads(meta["postprocess"]))
            mpp = float(meta["mpp"])
    except FileNotFoundError as exc:
        raise ModelError(f"weights file not found: {name}") from exc
    except (KeyError, ValueError, TypeError, RuntimeError, SafetensorError, OSError, ConfigError) as exc:
        raise ModelError(f"weights in {name} do not match the student network: {exc}") from exc
    return net.eval(), mpp, post, meta


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
        # Channels-last and, where the CPU computes it natively, bfloat16: about 3.5x faster on
        # a CPU than contiguous float32 (quality on the validation images: MODEL_CARD.md).
        on_cpu = self.device.type == "cpu"
        self._bf16 = self.precision(self.device.type) == "bf16"
        self._layout = torch.channels_last if on_cpu else torch.contiguous_format
        self._net = net.to(self.device).to(memory_format=self._layout).eval()  # type: ignore[call-overload]
        # One tile a pass on the CPU: CPU kernels are chosen by batch size, so batching would make
        # the rows depend on how tiles were grouped (in-process vs Ray). CUDA batches for speed.
        self._max_batch = max_batch if max_batch is not None else (8 if self.device.type == "cuda" else 1)
        self.tta = bool(tta)
        self.postprocess_params = post
        self.mpp = mpp
        #: Tile windows must start on this grid of working pixels (the U-Net pools 3 times).
        self.grid_px = net.grid_px
        self.receptive_field_px = net.receptive_field_px()
        self.context_um = self.receptive_field_px / 2 * mpp + MAX_NUCLEUS_RADIUS_UM
        self._warned_mpp = False
        #: The network runs in torch's threads: extraction measures the last tile meanwhile.
        self.predict_uses_threads = True

    def precision(self, device: str) -> str:
        """The network's arithmetic: bfloat16 on CUDA and on CPUs that compute it natively, else
        float32 (probabilities are stored as float16 either way)."""
        if device.startswith("cuda") or (device == "cpu" and cpu_has_bf16()):
            return "bf16"
        return "fp32"

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
            x = imagenet_normalize(batch.permute(0, 3, 1, 2)).contiguous(memory_format=self._layout)
            probs = class_probabilities(self._net, x, tta=self.tta, bf16=self._bf16)
            return np.asarray(probs.half().cpu().numpy())

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
