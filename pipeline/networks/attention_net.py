"""Networks of the method (method.md, "Networks"): attention F and scale classifier G.

F is fully convolutional at full resolution; its logit map z becomes the attention
a = sigmoid(r (z - tau)) with tau calibrated so that a share p of pixels is "on".
G is a ResNet-34 trunk written here in plain torch, trained from scratch.
Weights of F are stored as safetensors (never pickle) with p, r and tau_ema.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as nnf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..common.errors import ModelError

DEFAULT_DILATIONS: tuple[int, ...] = (1, 2, 3, 5, 10, 20)
#: Names of the dihedral transforms used for equivariance and test-time augmentation.
TRANSFORMS: tuple[str, ...] = ("identity", "hflip", "vflip", "transpose", "rot90", "rot180", "rot270")
_INVERSE = {"identity": "identity", "hflip": "hflip", "vflip": "vflip", "transpose": "transpose",
            "rot90": "rot270", "rot180": "rot180", "rot270": "rot90"}  # fmt: skip


@dataclass(frozen=True)
class AttentionOutput:
    """F's output: attention ``a`` in (0, 1) and logit ``z`` (both (B, 1, H, W)), and tau used."""

    a: torch.Tensor
    z: torch.Tensor
    tau: torch.Tensor


class _DilatedBlock(nn.Module):
    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nnf.relu(self.bn1(self.conv1(x)))
        return nnf.relu(x + self.bn2(self.conv2(y)))


class AttentionNet(nn.Module):
    """Network F: (B, 3, H, W) ImageNet-normalised RGB -> attention (B, 1, H, W).

    In training mode tau is the batch mean of each image's (1 - sparsity) quantile of
    z (no gradient) and updates the buffer ``tau_ema`` (first value, then
    ``momentum * tau_ema + (1 - momentum) * tau``); in eval mode ``tau_ema`` is used.
    """

    tau_ema: torch.Tensor
    tau_count: torch.Tensor

    def __init__(
        self,
        *,
        sparsity: float = 0.07,
        sharpness: float = 20.0,
        width: int = 64,
        dilations: Sequence[int] = DEFAULT_DILATIONS,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity!r}")
        if not sharpness > 0 or width < 1 or not dilations or not 0.0 <= momentum < 1.0:
            raise ValueError("sharpness > 0, width >= 1, dilations non-empty, 0 <= momentum < 1")
        self.sparsity = float(sparsity)
        self.sharpness = float(sharpness)
        self.width = int(width)
        self.dilations = tuple(int(d) for d in dilations)
        self.momentum = float(momentum)
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.blocks = nn.Sequential(*[_DilatedBlock(width, d) for d in self.dilations])
        self.head = nn.Conv2d(width, 1, 1, bias=True)
        self.register_buffer("tau_ema", torch.zeros(()))
        self.register_buffer("tau_count", torch.zeros((), dtype=torch.int64))
        _init_convs(self)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logit map z (B, 1, H, W), float32 (the 1x1 head runs outside autocast)."""
        h = self.blocks(self.stem(x))
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.head(h.float())  # type: ignore[no-any-return]

    def batch_tau(self, z: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of each image's (1 - sparsity) quantile of z (no gradient)."""
        with torch.no_grad():
            flat = z.detach().flatten(1).float().sort(dim=1).values
            pos = (1.0 - self.sparsity) * (flat.shape[1] - 1)  # linear interpolation, as torch.quantile
            lo = int(math.floor(pos))
            hi = min(lo + 1, flat.shape[1] - 1)
            q = flat[:, lo] + (pos - lo) * (flat[:, hi] - flat[:, lo])
            return q.mean()

    def forward(self, x: torch.Tensor, tau: torch.Tensor | float | None = None) -> AttentionOutput:
        """Attention of ``x``; ``tau`` overrides the calibrated threshold (and skips the EMA)."""
        z = self.logits(x)
        if tau is None:
            if self.training:
                tau_t = self.batch_tau(z)
                self._update_ema(tau_t)
            else:
                tau_t = self.tau_ema
        else:
            tau_t = torch.as_tensor(tau, dtype=torch.float32, device=z.device)
        a = torch.sigmoid(self.sharpness * (z - tau_t))
        return AttentionOutput(a=a, z=z, tau=tau_t.detach())

    @torch.no_grad()
    def _update_ema(self, tau: torch.Tensor) -> None:
        blended = self.momentum * self.tau_ema + (1.0 - self.momentum) * tau
        self.tau_ema.copy_(torch.where(self.tau_count == 0, tau, blended))
        self.tau_count.add_(1)

    def arch_metadata(self) -> dict[str, str]:
        """Hyper-parameters that rebuild this network (stored with the weights)."""
        return {
            "arch": "attention_f",
            "sparsity": repr(self.sparsity),
            "sharpness": repr(self.sharpness),
            "width": str(self.width),
            "dilations": json.dumps(list(self.dilations)),
            "momentum": repr(self.momentum),
        }


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nnf.relu(self.bn1(self.conv1(x)))
        return nnf.relu(self.shortcut(x) + self.bn2(self.conv2(y)))


class ScaleClassifier(nn.Module):
    """Network G: ResNet-34 trunk (conv1 7x7/2, max-pool, layers [3, 4, 6, 3]), GAP, Linear -> classes.

    ``width`` and ``blocks`` allow narrow variants for tests; the defaults are ResNet-34.
    """

    def __init__(self, num_classes: int = 3, *, width: int = 64, blocks: Sequence[int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers: list[nn.Module] = []
        cin = width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(_BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        return self.fc(torch.flatten(nnf.adaptive_avg_pool2d(h, 1), 1))  # type: ignore[no-any-return]


def _init_convs(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def to_device(module: ModuleT, device: torch.device, *, channels_last: bool = False) -> ModuleT:
    """``module`` moved to ``device`` (in place), with channels-last weights if asked."""
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return module


def receptive_field_px(net: AttentionNet) -> int:
    """Receptive field of F in pixels: 1 + 2 (stem 3x3) + 4 d per dilated block."""
    return 1 + 2 + sum(4 * d for d in net.dilations)


def dihedral(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply a named transform of ``TRANSFORMS`` to the last two axes of ``x``."""
    if name == "identity":
        return x
    if name == "hflip":
        return x.flip(-1)
    if name == "vflip":
        return x.flip(-2)
    if name == "transpose":
        return x.transpose(-1, -2)
    if name in ("rot90", "rot180", "rot270"):
        return torch.rot90(x, {"rot90": 1, "rot180": 2, "rot270": 3}[name], dims=(-2, -1))
    raise ValueError(f"unknown transform {name!r}; expected one of {TRANSFORMS}")


def dihedral_inverse(x: torch.Tensor, name: str) -> torch.Tensor:
    """Undo ``dihedral(., name)``."""
    if name not in _INVERSE:
        raise ValueError(f"unknown transform {name!r}; expected one of {TRANSFORMS}")
    return dihedral(x, _INVERSE[name])


@contextlib.contextmanager
def frozen_bn_stats(net: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers in training mode use batch statistics
    without updating running statistics (nor ``num_batches_tracked``)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in bns]
    try:
        for m in bns:
            m.track_running_stats = False
        yield
    finally:
        for m, flag in zip(bns, saved):
            m.track_running_stats = flag


def save_weights(net: AttentionNet, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> None:
    """Write F's weights and buffers (incl. ``tau_ema``) to a safetensors file.

    ``metadata`` (string keys and values) is stored beside the architecture keys and
    ``tau_ema``; it cannot override them.
    """
    extra = dict(metadata or {})
    bad = [k for k, v in extra.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ModelError(f"metadata must map str to str; bad keys: {bad}")
    meta = {**extra, **net.arch_metadata(), "tau_ema": repr(float(net.tau_ema))}
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    try:
        save_file(tensors, os.fspath(path), metadata=meta)
    except OSError as exc:
        raise ModelError(f"cannot write weights to {os.fspath(path)}: {exc}") from exc


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a safetensors weights file."""
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except FileNotFoundError as exc:
        raise ModelError(f"weights file not found: {os.fspath(path)}") from exc
    except (OSError, SafetensorError, ValueError) as exc:
        raise ModelError(f"not a readable safetensors file: {os.fspath(path)}: {exc}") from exc


def load_weights(path: str | os.PathLike[str]) -> AttentionNet:
    """Rebuild F from a file written by ``save_weights`` (in eval mode, on the CPU)."""
    meta = read_metadata(path)
    if meta.get("arch") != "attention_f":
        raise ModelError(f"{os.fspath(path)} holds no attention network (arch={meta.get('arch')!r})")
    try:
        net = AttentionNet(
            sparsity=float(meta["sparsity"]),
            sharpness=float(meta["sharpness"]),
            width=int(meta["width"]),
            dilations=[int(d) for d in json.loads(meta["dilations"])],
            momentum=float(meta.get("momentum", "0.9")),
        )
        with safe_open(os.fspath(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        net.load_state_dict(tensors, strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError, SafetensorError, OSError) as exc:
        raise ModelError(f"weights in {os.fspath(path)} do not match the attention network: {exc}") from exc
    return net.eval()
