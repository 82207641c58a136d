"""Training core of the method (method.md, "Losses" and "Training"): pure torch.

``ScaleTileSampler`` keeps every source image at the three scales on the device and
draws class-balanced, augmented batches with no host round trip. ``train_step`` runs
F and G once and applies the scale, smoothness and equivariance losses. Metrics come
back as 0-d device tensors so that a driver syncs only when it logs.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from numpy.typing import NDArray

from .errors import ConfigError, ModelError
from .model import (
    TRANSFORMS,
    AttentionNet,
    ScaleClassifier,
    dihedral,
    dihedral_inverse,
    frozen_bn_stats,
    to_device,
)
from .normalize import hed_jitter, imagenet_normalize, reinhard_normalize

#: µm/px of the scale classes, indexed by label (0 = 10x, 1 = 20x, 2 = 40x).
SCALE_MPP: tuple[float, float, float] = (1.0, 0.5, 0.25)
_EQUIV_TRANSFORMS = TRANSFORMS[1:]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (reference values by default)."""

    batch_size: int = 32
    crop_px: int = 160
    pad_min_px: int = 224
    sparsity: float = 0.07
    sharpness: float = 20.0
    tau_momentum: float = 0.9
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    lr_drop_steps: tuple[int, ...] = (30_000, 60_000)
    lr_gamma: float = 0.1
    weight_scale: float = 1.0
    weight_tv: float = 1.0
    weight_equiv: float = 1.0
    #: Weight of the optional scale-equivariance loss (0: off, as the authors advise).
    weight_scale_equiv: float = 0.0
    hed_sigma: float = 0.03
    stain_norm: bool = True
    #: Reject tiles with more than this share of white pixels (None: keep all; for WSI sources).
    max_white_frac: float | None = None
    white_level: int = 220
    white_candidates: int = 4
    f_width: int = 64
    f_dilations: tuple[int, ...] = (1, 2, 3, 5, 10, 20)
    g_width: int = 64
    g_blocks: tuple[int, ...] = (3, 4, 6, 3)
    #: bf16 autocast and channels-last layout, on CUDA only.
    bf16: bool = True
    channels_last: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int(self, "batch_size", 2)
        _check_int(self, "crop_px", 8)
        _check_int(self, "pad_min_px", 0)
        _check_int(self, "white_candidates", 1)
        _check_int(self, "f_width", 1)
        _check_int(self, "g_width", 1)
        if not 0.0 < self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in (0, 1), got {self.sparsity!r}")
        if not 0.0 <= self.tau_momentum < 1.0:
            raise ConfigError(f"tau_momentum must be in [0, 1), got {self.tau_momentum!r}")
        for name in ("sharpness", "lr", "lr_gamma"):
            if not _finite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("weight_decay", "weight_scale", "weight_tv", "weight_equiv", "weight_scale_equiv", "hed_sigma"):
            if not _finite(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if any(not isinstance(s, int) or s <= 0 for s in self.lr_drop_steps) or list(self.lr_drop_steps) != sorted(
            self.lr_drop_steps
        ):
            raise ConfigError(f"lr_drop_steps must be increasing positive integers, got {self.lr_drop_steps!r}")
        if self.max_white_frac is not None and not 0.0 <= self.max_white_frac <= 1.0:
            raise ConfigError(f"max_white_frac must be in [0, 1] or None, got {self.max_white_frac!r}")
        if not 0 <= self.white_level <= 255:
            raise ConfigError(f"white_level must be in [0, 255], got {self.white_level!r}")
        if not self.f_dilations or any(d < 1 for d in self.f_dilations) or not self.g_blocks:
            raise ConfigError("f_dilations and g_blocks must be non-empty positive integers")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check_int(cfg: TrainConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


class ScaleTileSampler:
    """Scale-labelled tiles from source RGB images, resident on ``device``.

    Each source (H, W, 3) uint8 image at ``mpp`` µm/px is optionally Reinhard-normalised,
    then resampled ONCE to each of ``SCALE_MPP`` with one antialiased bilinear filter,
    and padded (reflect) to at least ``max(pad_min_px, crop_px)`` per side.
    """

    def __init__(
        self,
        images: Sequence[NDArray[np.uint8]],
        mpp: float | Sequence[float],
        config: TrainConfig,
        device: torch.device | str = "cpu",
    ) -> None:
        if not images:
            raise ConfigError("the sampler needs at least one source image")
        mpps = [float(mpp)] * len(images) if isinstance(mpp, (int, float)) else [float(m) for m in mpp]
        if len(mpps) != len(images):
            raise ConfigError(f"{len(images)} images but {len(mpps)} mpp values")
        for m in mpps:
            if not (_finite(m) and 0 < m <= SCALE_MPP[-1] * 1.05):
                raise ConfigError(f"source mpp must be in (0, {SCALE_MPP[-1] * 1.05:.4f}] (40x or finer), got {m!r}")
        self.config = config
        self.device = torch.device(device)
        self.num_images = len(images)
        for rgb in images:
            if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                raise ConfigError(f"source images must be (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
        if config.stain_norm:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                images = list(pool.map(reinhard_normalize, images))
        views: list[torch.Tensor] = []  # label-major: index = label * N + image
        for target in SCALE_MPP:
            for rgb, m in zip(images, mpps):
                views.append(self._resample(rgb, m, target))
        h_max = max(v.shape[0] for v in views)
        w_max = max(v.shape[1] for v in views)
        self.pack = torch.zeros((len(views), h_max, w_max, 3), dtype=torch.uint8, device=self.device)
        for i, v in enumerate(views):
            self.pack[i, : v.shape[0], : v.shape[1]] = v
        self.sizes = torch.tensor([[v.shape[0], v.shape[1]] for v in views], dtype=torch.int64, device=self.device)

    def _resample(self, rgb: NDArray[np.uint8], mpp: float, target_mpp: float) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1)[None].float()
        h, w = x.shape[-2:]
        size = (max(1, round(h * mpp / target_mpp)), max(1, round(w * mpp / target_mpp)))
        if size != (h, w):
            x = nnf.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        side = max(self.config.pad_min_px, self.config.crop_px)
        x = _pad_to(x, side)
        return x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).contiguous()

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, *, augment: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch (B, 3, c, c) ImageNet-normalised float32 and labels (B,) int64.

        Labels are balanced (``arange(B) % 3``); source image, crop, and one of the eight
        dihedral transforms are drawn per tile; HED jitter applies when ``augment``.
        """
        cfg = self.config
        labels = torch.arange(batch_size, device=self.device) % len(SCALE_MPP)
        k = cfg.white_candidates if cfg.max_white_frac is not None else 1
        tiles = self._gather(labels.repeat_interleave(k), generator)  # (B*k, c, c, 3)
        if k > 1:
            white = (tiles.amin(dim=-1) > cfg.white_level).float().mean(dim=(1, 2)).view(batch_size, k)
            rank = torch.arange(k, device=self.device, dtype=torch.float32).expand(batch_size, k)
            score = torch.where(white <= float(cfg.max_white_frac or 0.0), rank, k + white)
            pick = torch.arange(batch_size, device=self.device) * k + score.argmin(dim=1)
            tiles = tiles[pick]
        x = tiles.permute(0, 3, 1, 2).float()
        if augment and cfg.hed_sigma > 0:
            x = hed_jitter(x, cfg.hed_sigma, generator)
        x = imagenet_normalize(x)
        if cfg.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels

    def _gather(self, labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        c = self.config.crop_px
        n = labels.shape[0]
        dev = self.device
        image = torch.randint(0, self.num_images, (n,), device=dev, generator=generator)
        index = labels * self.num_images + image
        size = self.sizes[index]
        u = torch.rand((n, 2), device=dev, generator=generator)
        offset = (u * (size - c + 1).float()).long()
        flips = torch.randint(0, 2, (n, 3, 1, 1), device=dev, generator=generator).bool()
        ii = torch.arange(c, device=dev).view(1, c, 1).expand(n, c, c)
        jj = torch.arange(c, device=dev).view(1, 1, c).expand(n, c, c)
        ii, jj = torch.where(flips[:, 0], jj, ii), torch.where(flips[:, 0], ii, jj)  # transpose
        ii = torch.where(flips[:, 1], c - 1 - ii, ii)  # vertical flip
        jj = torch.where(flips[:, 2], c - 1 - jj, jj)  # horizontal flip
        rows = offset[:, 0].view(n, 1, 1) + ii
        cols = offset[:, 1].view(n, 1, 1) + jj
        return self.pack[index.view(n, 1, 1), rows, cols]


def _pad_to(x: torch.Tensor, side: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    while h < side or w < side:
        ph, pw = max(0, min(side - h, h - 1)), max(0, min(side - w, w - 1))
        if ph == 0 and pw == 0:  # a 1-pixel axis cannot be reflected
            return nnf.pad(x, (0, max(0, side - w), 0, max(0, side - h)), mode="replicate")
        x = nnf.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect")
        h, w = x.shape[-2:]
    return x


@dataclass
class TrainState:
    """Networks, optimiser and counters of a run (mutable: it is the run)."""

    f: AttentionNet
    g: ScaleClassifier
    optimizer: torch.optim.Adam
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    config: TrainConfig
    device: torch.device
    generator: torch.Generator = field(default_factory=torch.Generator)
    #: CPU generator for host-side draws (the equivariance transform of a batch).
    host_generator: torch.Generator = field(default_factory=torch.Generator)
    step: int = 0


def build_state(config: TrainConfig, device: torch.device | str = "cpu") -> TrainState:
    """Fresh F, G (seeded by ``config.seed``), Adam and the step-wise lr schedule."""
    dev = torch.device(device)
    torch.manual_seed(config.seed)
    f = AttentionNet(
        sparsity=config.sparsity,
        sharpness=config.sharpness,
        width=config.f_width,
        dilations=config.f_dilations,
        momentum=config.tau_momentum,
    )
    g = ScaleClassifier(len(SCALE_MPP), width=config.g_width, blocks=config.g_blocks)
    cl = config.channels_last and dev.type == "cuda"
    f = to_device(f, dev, channels_last=cl).train()
    g = to_device(g, dev, channels_last=cl).train()
    params = list(f.parameters()) + list(g.parameters())
    opt = torch.optim.Adam(
        params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, fused=dev.type == "cuda"
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(config.lr_drop_steps), gamma=config.lr_gamma)
    gen = torch.Generator(device=dev)
    gen.manual_seed(config.seed)
    host = torch.Generator()
    host.manual_seed(config.seed + 1)
    return TrainState(
        f=f, g=g, optimizer=opt, scheduler=sched, config=config, device=dev, generator=gen, host_generator=host
    )


def tv_loss(a: torch.Tensor) -> torch.Tensor:
    """L1 total variation: mean |vertical difference| + mean |horizontal difference|."""
    return (a[..., 1:, :] - a[..., :-1, :]).abs().mean() + (a[..., :, 1:] - a[..., :, :-1]).abs().mean()


def equivariance_target(f: AttentionNet, x: torch.Tensor, transform: str) -> torch.Tensor:
    """t^-1(F(t(x))) with tau_ema, no gradient, BN running statistics untouched."""
    with torch.no_grad(), frozen_bn_stats(f):
        return dihedral_inverse(f(dihedral(x, transform), tau=f.tau_ema).a, transform)


def scale_equivariance_loss(f: AttentionNet, x: torch.Tensor, a: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MSE between 2x-downsampled a and F(2x-downsampled x) for 40x and 20x tiles.

    Mean over the scales present in the batch of each scale's mean MSE; 0 when neither
    is present (never NaN, no host sync).
    """
    with torch.no_grad(), frozen_bn_stats(f):
        target = f(nnf.avg_pool2d(x, 2), tau=f.tau_ema).a
    per_tile = ((nnf.avg_pool2d(a, 2) - target) ** 2).flatten(1).mean(dim=1)
    total = per_tile.new_zeros(())
    present = per_tile.new_zeros(())
    for label in (1, 2):
        mask = (labels == label).float()
        count = mask.sum()
        total = total + (per_tile * mask).sum() / count.clamp(min=1.0)
        present = present + (count > 0).float()
    result: torch.Tensor = total / present.clamp(min=1.0)
    return result


def train_step(state: TrainState, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch; returns detached 0-d metric tensors.

    Keys: loss_scale, loss_tv, loss_equiv, loss_scale_equiv, loss_total, scale_acc,
    tau, tau_ema, frac_on (share of a > 0.5), lr (the lr this step used).
    """
    cfg, f, g = state.config, state.f, state.g
    f.train()
    g.train()
    use_bf16 = cfg.bf16 and state.device.type == "cuda"
    pick = int(torch.randint(0, len(_EQUIV_TRANSFORMS), (1,), generator=state.host_generator).item())
    lr = state.optimizer.param_groups[0]["lr"]
    with torch.autocast(device_type=state.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        out = f(x)
        logits = g(x * out.a)
        loss_scale = nnf.cross_entropy(logits.float(), labels)
        loss_tv = tv_loss(out.a)
        zero = out.a.new_zeros(())
        loss_equiv = zero
        if cfg.weight_equiv > 0:
            target = equivariance_target(f, x, _EQUIV_TRANSFORMS[pick])
            loss_equiv = nnf.mse_loss(out.a, target.float())
        loss_scale_equiv = zero
        if cfg.weight_scale_equiv > 0:
            loss_scale_equiv = scale_equivariance_loss(f, x, out.a, labels)
        total = (
            cfg.weight_scale * loss_scale
            + cfg.weight_tv * loss_tv
            + cfg.weight_equiv * loss_equiv
            + cfg.weight_scale_equiv * loss_scale_equiv
        )
    state.optimizer.zero_grad(set_to_none=True)
    total.backward()
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    with torch.no_grad():
        return {
            "loss_scale": loss_scale.detach(),
            "loss_tv": loss_tv.detach(),
            "loss_equiv": loss_equiv.detach(),
            "loss_scale_equiv": loss_scale_equiv.detach(),
            "loss_total": total.detach(),
            "scale_acc": (logits.argmax(dim=1) == labels).float().mean(),
            "tau": out.tau.float(),
            "tau_ema": f.tau_ema.detach().clone(),
            "frac_on": (out.a > 0.5).float().mean(),
            "lr": torch.tensor(float(lr)),
        }


def metrics_to_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Host floats of ``train_step`` metrics (one sync)."""
    keys = list(metrics)
    values = torch.stack([metrics[k].detach().float().cpu() for k in keys]).tolist()
    return dict(zip(keys, values))


def save_checkpoint(state: TrainState, path: str | os.PathLike[str]) -> None:
    """Everything needed to resume: nets, optimiser, schedule, step, config (torch.save of tensors/plain data)."""
    payload = {
        "f": state.f.state_dict(),
        "g": state.g.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "step": state.step,
        "config": json.dumps(state.config.to_dict()),
    }
    try:
        torch.save(payload, os.fspath(path))
    except OSError as exc:
        raise ModelError(f"cannot write checkpoint {os.fspath(path)}: {exc}") from exc


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> TrainState:
    """Resume a run saved by ``save_checkpoint`` (loaded with ``weights_only=True``)."""
    try:
        payload = torch.load(os.fspath(path), map_location=torch.device(device), weights_only=True)
        raw = json.loads(payload["config"])
        raw["betas"] = tuple(raw["betas"])
        for key in ("lr_drop_steps", "f_dilations", "g_blocks"):
            raw[key] = tuple(raw[key])
        state = build_state(TrainConfig(**raw), device)
        state.f.load_state_dict(payload["f"])
        state.g.load_state_dict(payload["g"])
        state.optimizer.load_state_dict(payload["optimizer"])
        state.scheduler.load_state_dict(payload["scheduler"])
        state.step = int(payload["step"])
    except FileNotFoundError as exc:
        raise ModelError(f"checkpoint not found: {os.fspath(path)}") from exc
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise ModelError(f"malformed checkpoint {os.fspath(path)}: {exc}") from exc
    return state
