"""The student network of the self-training stage: a small U-Net, three classes per pixel.

The student predicts background, nucleus interior and nucleus boundary
(``segmentation.student`` turns that into instances; ``training.self_training``
trains it). The U-Net pools three times, so its output is shift-equivariant only for
shifts that are multiples of ``grid_px`` (8): tile windows of a slide must start on that
grid, which ``ExtractConfig.tiles`` ensures through the segmenter's ``grid_px``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from torch import nn

from ..common.errors import ConfigError

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
ARCH = "student_unet"


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


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX: oneDNN's fast path)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())  # type: ignore[no-untyped-call]


@torch.inference_mode()
def class_probabilities(net: StudentNet, x: torch.Tensor, *, tta: bool = False, bf16: bool | None = None) -> torch.Tensor:
    """(B, 3, H, W) float32 class probabilities of an ImageNet-normalised batch, the network in
    bfloat16 when ``bf16`` (default: on CUDA only); with ``tta``, the mean over the eight
    dihedral transforms, each mapped back."""
    enabled = x.device.type == "cuda" if bf16 is None else bf16
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=enabled):
        if not tta:
            return net.forward_padded(x).float().softmax(dim=1)
        total = torch.zeros((x.shape[0], 3, *x.shape[-2:]), device=x.device)
        for k in range(4):
            for flip in (False, True):
                t = torch.rot90(x, k, dims=(-2, -1))
                p = net.forward_padded(t.flip(-1) if flip else t).float().softmax(dim=1)
                total += torch.rot90(p.flip(-1) if flip else p, -k, dims=(-2, -1))
        return total / 8.0


