"""Training core of the method (method.md, "Losses" and "Training"): pure torch, no Ray.

The batch samplers live in ``samplers.py`` and are re-exported here. ``train_step`` runs F and G once (through
DDP wrappers after ``wrap_ddp``) and applies the scale, smoothness and equivariance
losses. Metrics come back as 0-d device tensors so that a driver syncs only when it
logs. Checkpoints go to any fsspec URL and appear atomically.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn

from ..common.errors import ModelError
from ..common.storage import is_local, url_to_fs
from ..networks.attention_net import (
    TRANSFORMS,
    AttentionNet,
    ScaleClassifier,
    dihedral,
    dihedral_inverse,
    frozen_bn_stats,
    to_device,
)
from .config import SCALE_MPP, TrainConfig
from .samplers import ScaleTileSampler, TilePool, resample_tensor, scaled_size

logger = logging.getLogger(__name__)

_EQUIV_TRANSFORMS = TRANSFORMS[1:]
__all__ = [
    "CHECKPOINT_NAME", "SCALE_MPP", "ScaleTileSampler", "TilePool", "TrainConfig", "TrainState", "build_state",
    "equivariance_target", "list_checkpoints", "load_checkpoint", "metrics_to_floats", "prune_checkpoints",
    "read_checkpoint", "resample_tensor", "save_checkpoint", "scaled_size", "scale_equivariance_loss",
    "seed_generators", "train_step", "tv_loss", "wrap_ddp",
]  # fmt: skip



def _filesystem(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str, bool]:
    """(fsspec filesystem, path, is local) of ``url``."""
    fs, path = url_to_fs(url, storage_options)
    return fs, path, is_local(fs)


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
    #: Modules that run the training forward pass: DDP wrappers of ``f`` and ``g`` after
    #: ``wrap_ddp`` (None: ``f`` and ``g`` themselves). Targets and metrics use ``f``.
    f_train: nn.Module | None = None
    g_train: nn.Module | None = None


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


def seed_generators(state: TrainState, *parts: int) -> None:
    """Reseed the batch and host generators from ``config.seed`` and ``parts`` (e.g. rank and step),
    so that workers draw different batches and a resumed run draws fresh ones."""
    seq = np.random.SeedSequence([state.config.seed, *[int(p) for p in parts]])
    a, b = (int(v) for v in seq.generate_state(2, np.uint64) % (2**62))
    state.generator.manual_seed(a)
    state.host_generator.manual_seed(b)


def wrap_ddp(state: TrainState) -> None:
    """Wrap F and G in DistributedDataParallel (the process group must be initialised).

    Buffers (BN running statistics, F's ``tau_ema``) are broadcast from rank 0 at every
    forward pass, so all ranks threshold with rank 0's ``tau_ema``; each rank's batch
    tau and BN batch statistics are its own (as with BN without synchronisation).
    """
    from torch.nn.parallel import DistributedDataParallel

    ids = [state.device.index or 0] if state.device.type == "cuda" else None
    state.f_train = DistributedDataParallel(state.f, device_ids=ids)
    state.g_train = DistributedDataParallel(state.g, device_ids=ids)


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
    f_fwd = state.f_train if state.f_train is not None else f
    g_fwd = state.g_train if state.g_train is not None else g
    with torch.autocast(device_type=state.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        out = f_fwd(x)
        logits = g_fwd(x * out.a)
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


#: File name of the checkpoint after ``step`` steps in a run's ``checkpoints/`` folder.
CHECKPOINT_NAME = "step-{step:08d}.pt"
_CHECKPOINT_RE = re.compile(r"^step-(\d{8,})\.pt$")


def save_checkpoint(
    state: TrainState, path: str | os.PathLike[str], *, extra: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Everything needed to resume: nets, optimiser, schedule, step, config, and ``extra``
    (JSON-able data, e.g. the metrics rows so far). ``path`` is a local path or fsspec URL;
    the file appears whole or not at all (local: temporary file then rename; object
    stores: one upload, committed when it completes)."""
    payload = {
        "f": state.f.state_dict(),
        "g": state.g.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "step": state.step,
        "config": json.dumps(state.config.to_dict()),
        "extra": json.dumps(dict(extra or {})),
    }
    name = os.fspath(path)
    try:
        fs, target, local = _filesystem(name, storage_options)
        if local:
            parent = os.path.dirname(target) or "."
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
            try:
                torch.save(payload, tmp)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            with fs.open(target, "wb") as handle:
                torch.save(payload, handle)
    except Exception as exc:  # noqa: BLE001 - any storage failure means no checkpoint
        raise ModelError(f"cannot write checkpoint {name}: {type(exc).__name__}: {exc}") from exc


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> TrainState:
    """Resume a run saved by ``save_checkpoint`` (loaded with ``weights_only=True``)."""
    return read_checkpoint(path, device)[0]


def read_checkpoint(
    path: str | os.PathLike[str], device: torch.device | str = "cpu", *,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """The run state and the ``extra`` data of a checkpoint (local path or fsspec URL)."""
    name = os.fspath(path)
    try:
        fs, target, local = _filesystem(name, storage_options)
        source: Any = target if local else io.BytesIO(fs.cat_file(target))
        payload = torch.load(source, map_location=torch.device(device), weights_only=True)
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
        extra = json.loads(payload.get("extra", "{}"))
    except FileNotFoundError as exc:
        raise ModelError(f"checkpoint not found: {name}") from exc
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise ModelError(f"malformed checkpoint {name}: {exc}") from exc
    return state, extra


def list_checkpoints(folder: str, *, storage_options: Mapping[str, Any] | None = None) -> list[tuple[int, str]]:
    """(step, URL) of the checkpoints in ``folder`` (``CHECKPOINT_NAME`` files), by step; [] if none."""
    try:
        fs, root, _ = _filesystem(folder, storage_options)
        root = root.rstrip("/")
        fs.invalidate_cache(root)
        names = [str(p).rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] if fs.exists(root) else []
    except Exception as exc:  # noqa: BLE001 - an unlistable run folder cannot be resumed
        raise ModelError(f"cannot list checkpoints in {folder}: {type(exc).__name__}: {exc}") from exc
    found = sorted((int(m.group(1)), n) for n in names if (m := _CHECKPOINT_RE.match(n)))
    base = folder.rstrip("/")
    return [(step, f"{base}/{n}") for step, n in found]


def prune_checkpoints(folder: str, keep: int, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Delete all but the ``keep`` latest checkpoints of ``folder``; returns the deleted URLs."""
    old = [url for _, url in list_checkpoints(folder, storage_options=storage_options)[:-keep]]
    for url in old:
        try:
            fs, target, _ = _filesystem(url, storage_options)
            fs.rm(target)
        except FileNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - a checkpoint left behind costs space only
            logger.warning("could not delete old checkpoint %s: %s", url, exc)
    return old
