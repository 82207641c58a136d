"""Training loop of the student (pure torch): pseudo-labelled images resident on the device.

Crops are drawn at random positions with one of the eight dihedral transforms (the same
for image and target) and HED colour jitter; the loss is cross-entropy over the pixels
that have a pseudo-label (255 = ignored) plus a soft Dice term on the nucleus class.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from numpy.typing import NDArray

from ..color.normalize import hed_jitter, imagenet_normalize
from ..common.errors import ConfigError
from ..networks.student_net import StudentNet, class_probabilities
from .pseudo_labels import IGNORE_LABEL


@dataclass(frozen=True)
class StudentTrainConfig:
    """Hyper-parameters of the student's training."""

    widths: tuple[int, ...] = (16, 32, 64, 128)
    crop_px: int = 256
    batch_size: int = 16
    steps: int = 3000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    boundary_weight: float = 2.0
    dice_weight: float = 1.0
    hed_sigma: float = 0.05
    #: Wall-clock budget of the loop (None: none); the lr schedule follows whichever of
    #: steps and time runs out first.
    max_seconds: float | None = None
    seed: int = 0
    bf16: bool = True

    def __post_init__(self) -> None:
        if self.crop_px % 8 or self.crop_px < 16:
            raise ConfigError(f"crop_px must be a multiple of 8 and >= 16, got {self.crop_px!r}")
        for name in ("batch_size", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"max_seconds must be > 0 or None, got {self.max_seconds!r}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.boundary_weight > 0 and self.dice_weight >= 0):
            raise ConfigError("lr and boundary_weight must be > 0; weight_decay, dice_weight >= 0")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


class PseudoLabelSampler:
    """Augmented crops of (normalised RGB, target) pairs kept on ``device``.

    Every image and target is packed into one (N, H, W, 4) uint8 tensor (channel 3 =
    target; padding is "ignore"), so a batch is one gather with no host round trip.
    """

    def __init__(
        self,
        images: Sequence[NDArray[np.uint8]],
        targets: Sequence[NDArray[np.uint8]],
        crop_px: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if not images or len(images) != len(targets):
            raise ConfigError("need as many targets as images, at least one")
        self.device = torch.device(device)
        self.crop_px = crop_px
        for rgb, tgt in zip(images, targets):
            if rgb.shape[:2] != tgt.shape or min(tgt.shape) < crop_px:
                raise ConfigError(f"image {rgb.shape} / target {tgt.shape} mismatch or smaller than the crop")
        h_max = max(t.shape[0] for t in targets)
        w_max = max(t.shape[1] for t in targets)
        pack = np.zeros((len(images), h_max, w_max, 4), dtype=np.uint8)
        pack[..., 3] = IGNORE_LABEL
        for i, (rgb, tgt) in enumerate(zip(images, targets)):
            pack[i, : tgt.shape[0], : tgt.shape[1], :3] = rgb
            pack[i, : tgt.shape[0], : tgt.shape[1], 3] = tgt
        self.pack = torch.from_numpy(pack).to(self.device)
        self.sizes = torch.tensor([t.shape for t in targets], dtype=torch.int64, device=self.device)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, c, c) float RGB in [0, 255] and (B, c, c) int64 targets, each crop under
        one of the eight dihedral transforms. ``generator`` lives on the sampler's device."""
        c, n, dev = self.crop_px, batch_size, self.device
        image = torch.randint(0, self.pack.shape[0], (n,), device=dev, generator=generator)
        u = torch.rand((n, 2), device=dev, generator=generator)
        offset = (u * (self.sizes[image] - c + 1).float()).long()
        flips = torch.randint(0, 2, (n, 3, 1, 1), device=dev, generator=generator).bool()
        ii = torch.arange(c, device=dev).view(1, c, 1).expand(n, c, c)
        jj = torch.arange(c, device=dev).view(1, 1, c).expand(n, c, c)
        ii, jj = torch.where(flips[:, 0], jj, ii), torch.where(flips[:, 0], ii, jj)
        ii = torch.where(flips[:, 1], c - 1 - ii, ii)
        jj = torch.where(flips[:, 2], c - 1 - jj, jj)
        crops = self.pack[image.view(n, 1, 1), offset[:, 0].view(n, 1, 1) + ii, offset[:, 1].view(n, 1, 1) + jj]
        return crops[..., :3].permute(0, 3, 1, 2).float(), crops[..., 3].long()


def student_loss(logits: torch.Tensor, target: torch.Tensor, config: StudentTrainConfig) -> dict[str, torch.Tensor]:
    """Weighted cross-entropy over labelled pixels + soft Dice of the nucleus class."""
    weight = torch.tensor([1.0, 1.0, config.boundary_weight], device=logits.device)
    ce = nnf.cross_entropy(logits.float(), target, weight=weight, ignore_index=IGNORE_LABEL)
    ce = torch.nan_to_num(ce)  # a batch with no labelled pixel
    probs = logits.float().softmax(dim=1)
    known = (target != IGNORE_LABEL).float()
    fg_pred = (probs[:, 1] + probs[:, 2]) * known
    fg_true = ((target == 1) | (target == 2)).float() * known
    inter = (fg_pred * fg_true).sum()
    dice = 1.0 - (2.0 * inter + 1.0) / (fg_pred.sum() + fg_true.sum() + 1.0)
    return {"ce": ce, "dice": dice, "total": ce + config.dice_weight * dice}


def train_student(
    sampler: PseudoLabelSampler,
    config: StudentTrainConfig,
    *,
    net: StudentNet | None = None,
    log: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 100,
) -> StudentNet:
    """Train a student on the sampler's pseudo-labels; returns it in eval mode."""
    dev = sampler.device
    torch.manual_seed(config.seed)
    net = net if net is not None else StudentNet(config.widths)
    cl = dev.type == "cuda"
    net = net.to(dev).train()
    if cl:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warm = 0.05
    gen = torch.Generator(device=dev)
    gen.manual_seed(config.seed)
    bf16 = config.bf16 and dev.type == "cuda"
    start = time.perf_counter()
    for step in range(config.steps):
        elapsed = time.perf_counter() - start
        progress = step / config.steps
        if config.max_seconds is not None:
            if elapsed >= config.max_seconds:
                break
            progress = max(progress, elapsed / config.max_seconds)
        for group in opt.param_groups:
            group["lr"] = config.lr * _lr_factor(progress, warm)
        x, y = sampler.sample(config.batch_size, gen)
        x = imagenet_normalize(hed_jitter(x, config.hed_sigma, gen))
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
            losses = student_loss(net(x), y, config)
        total: torch.Tensor = losses["total"]
        opt.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[no-untyped-call]
        opt.step()
        out_of_time = config.max_seconds is not None and time.perf_counter() - start >= config.max_seconds
        if log is not None and (step % log_every == 0 or step == config.steps - 1 or out_of_time):
            values = {k: float(v.detach()) for k, v in losses.items()}
            values["seconds"] = time.perf_counter() - start
            values["lr"] = float(opt.param_groups[0]["lr"])
            log(step + 1, values)
    return net.eval()


def _lr_factor(progress: float, warm: float) -> float:
    """Linear warm-up over the first ``warm`` of the run, then cosine decay to 0."""
    if progress < warm:
        return max(progress / warm, 0.01)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warm) / (1.0 - warm))))


def student_probabilities(
    net: StudentNet, images: Sequence[NDArray[np.uint8]], device: torch.device | str = "cpu", *, tta: bool = False
) -> list[NDArray[np.float32]]:
    """(3, H, W) class probabilities of each (already stain-normalised) RGB image."""
    dev = torch.device(device)
    net = net.to(dev).eval()
    out: list[NDArray[np.float32]] = []
    for rgb in images:
        x = imagenet_normalize(torch.from_numpy(np.ascontiguousarray(rgb)).to(dev).permute(2, 0, 1)[None])
        out.append(class_probabilities(net, x, tta=tta)[0].cpu().numpy())
    return out
