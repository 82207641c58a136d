"""The self-training stage: a small U-Net student learns nuclei from the attention model.

The student predicts three classes per pixel (background, nucleus interior, nucleus
boundary) from the teacher's confident pseudo-labels (pipeline/pseudo_labels.py).
Interior blobs seed a watershed of the nucleus mask, so touching nuclei split along
the predicted boundaries rather than along distance-transform ridges.

The U-Net pools three times, so its output is shift-equivariant only for shifts that
are multiples of ``grid_px`` (8): tile windows of a slide must start on that grid,
which ``ExtractConfig.tiles`` ensures through the segmenter's ``grid_px``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
from numpy.typing import NDArray
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from scipy import ndimage as ndi
from torch import nn

from .errors import ConfigError, ModelError
from .instances import (
    component_peaks,
    component_watershed,
    fill_small_holes,
    filter_by_area,
    remove_small_components,
)

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
ARCH = "student_unet"
_EIGHT = np.ones((3, 3), dtype=bool)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class StudentNet(nn.Module):
    """U-Net: (B, 3, H, W) ImageNet-normalised RGB -> (B, 3, H, W) class logits.

    H and W must be multiples of ``grid_px``; ``forward_padded`` pads any size.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        if len(widths) < 2 or any(int(w) < 1 for w in widths):
            raise ConfigError(f"widths must be >= 2 positive integers, got {widths!r}")
        self.widths = tuple(int(w) for w in widths)
        self.grid_px = 2 ** (len(self.widths) - 1)
        self.down = nn.ModuleList()
        cin = 3
        for w in self.widths:
            self.down.append(_double_conv(cin, w))
            cin = w
        self.up = nn.ModuleList(
            _double_conv(self.widths[i + 1] + self.widths[i], self.widths[i]) for i in range(len(self.widths) - 1)
        )
        self.head = nn.Conv2d(self.widths[0], 3, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nnf.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = nnf.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = self.up[i](torch.cat([x, skips[i]], dim=1))
        out: torch.Tensor = self.head(x)
        return out

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of any H, W: reflect-pads bottom/right to the grid, then crops back."""
        h, w = x.shape[-2:]
        g = self.grid_px
        ph, pw = (-h) % g, (-w) % g
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = nnf.pad(x, (0, pw, 0, ph), mode=mode)
        return self.forward(x)[..., :h, :w]

    def receptive_field_px(self) -> int:
        """An upper bound of the receptive field (pixels) of one output pixel."""
        levels = len(self.widths)
        enc = sum(5 << i for i in range(levels - 1)) + (4 << (levels - 1))
        dec = sum(6 << i for i in range(levels - 1))
        return 1 + enc + dec


@torch.inference_mode()
def class_probabilities(net: StudentNet, x: torch.Tensor, *, tta: bool = False) -> torch.Tensor:
    """(B, 3, H, W) float32 class probabilities of an ImageNet-normalised batch (bf16 on
    CUDA); with ``tta``, the mean over the eight dihedral transforms, each mapped back."""
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        if not tta:
            return net.forward_padded(x).float().softmax(dim=1)
        total = torch.zeros((x.shape[0], 3, *x.shape[-2:]), device=x.device)
        for k in range(4):
            for flip in (False, True):
                t = torch.rot90(x, k, dims=(-2, -1))
                p = net.forward_padded(t.flip(-1) if flip else t).float().softmax(dim=1)
                total += torch.rot90(p.flip(-1) if flip else p, -k, dims=(-2, -1))
        return total / 8.0


@dataclass(frozen=True)
class StudentPostprocess:
    """How class probabilities become instances (physical sizes in µm, µm²).

    Defaults were chosen on the MoNuSeg training labels (seed footprint 1.75 -> 3 µm and
    seed threshold 0.5 vs 0.7 moved mean AJI by about 0.01); nothing else used labels.
    """

    #: A pixel is nucleus when P(interior) + P(boundary) exceeds this.
    fg_threshold: float = 0.5
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
    finally the area filter. Labels follow the raster order of their first pixel.
    """
    p = params if params is not None else StudentPostprocess()
    if probs.ndim != 3 or probs.shape[0] != 3:
        raise ValueError(f"expected (3, H, W) probabilities, got shape {probs.shape}")
    px2 = mpp * mpp
    interior = np.asarray(probs[INTERIOR], dtype=np.float32)
    mask = (probs[INTERIOR] + probs[BOUNDARY]) > p.fg_threshold
    mask = fill_small_holes(mask, p.max_hole_um2 / px2)
    mask = remove_small_components(mask, max(1.0, p.min_area_um2 / px2 / 2))
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    core = (interior > p.seed_threshold) & mask
    depth = ndi.distance_transform_edt(core)
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
