"""Raw forward speed of the attention network F (megapixels/s), the ceiling for inference.

    python benchmarks/gpu_forward.py [--device cuda] [--tile-px 1024] [--batch 8]

Times eval-mode F on random input in bf16 (CUDA) or float32 (CPU), channels-last,
median of several timed repeats after warm-up. Prints one line per setting.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nucleiscope.pipeline.common.devices import device_name, enable_fast_math, pick_device
from nucleiscope.pipeline.networks.attention_net import AttentionNet


def time_forward(net: AttentionNet, batch: int, tile_px: int, device: torch.device, repeats: int) -> float:
    """Median megapixels/s of F over ``repeats`` timed forwards."""
    x = torch.randn(batch, 3, tile_px, tile_px, device=device).to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rates = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        for n in range(repeats + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            net(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if n >= 2:
                rates.append(batch * tile_px * tile_px / 1e6 / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--tile-px", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = pick_device(args.device)
    enable_fast_math(device)
    net = AttentionNet().to(device).eval().to(memory_format=torch.channels_last)
    name = device_name(device)
    for tile in args.tile_px:
        for batch in args.batch:
            rate = time_forward(net, batch, tile, device, args.repeats)
            print(f"{name}: F forward batch {batch} x {tile}^2: {rate:.3f} megapixels/s", flush=True)


if __name__ == "__main__":
    main()
