"""Train the attention network F on a folder of H&E images within a time budget.

    python -m nucleiscope.jobs.quick_train --images DIR --mpp 0.25 --out DIR --seconds 300

Writes ``attention_f.safetensors`` (F with tau_ema), ``metrics.csv`` (one row per log
step), ``train.json`` (config, steps, timings, device) and ``maps.npz`` (TTA attention
maps of the evaluation images, uint8 round(a * 255) keyed by file stem).
Needs only torch, numpy, scipy, scikit-image, tifffile, safetensors and Pillow.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from numpy.typing import NDArray

from ..pipeline.attention import WORKING_MPP, AttentionSegmenter
from ..pipeline.errors import ConfigError, NucleiscopeError
from ..pipeline.model import save_weights
from ..pipeline.training import (
    ScaleTileSampler,
    TrainConfig,
    TrainState,
    build_state,
    metrics_to_floats,
    save_checkpoint,
    train_step,
)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".webp", ".jpg", ".jpeg")
WEIGHTS_NAME = "attention_f.safetensors"
_LOG_KEYS = ("loss_total", "loss_scale", "loss_tv", "loss_equiv", "loss_scale_equiv",
             "scale_acc", "tau", "tau_ema", "frac_on", "lr")  # fmt: skip


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quick_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="folder of RGB training images (tif/png/webp/jpg)")
    p.add_argument("--mpp", type=float, default=0.25, help="µm/px of the images (<= 0.2625)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seconds", type=float, default=300.0, help="wall-clock budget of the training loop")
    p.add_argument("--max-steps", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.07)
    p.add_argument("--stain-norm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--lr-drop-steps", type=_int_list, default=(30_000, 60_000), help="e.g. 6000,9000")
    p.add_argument("--scale-equiv", type=float, default=0.0, help="weight of the scale-equivariance loss")
    p.add_argument("--max-white-frac", type=float, default=None, help="reject tiles whiter than this (WSI tiles)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", default=None, help="folder of images to map (default: --images)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--init-f", default=None, help="start F from these weights (safetensors), G from scratch")
    p.add_argument("--checkpoint", action="store_true", help="also write checkpoint.pt (F, G, optimiser)")
    p.add_argument("--crop-px", type=int, default=160, help=argparse.SUPPRESS)
    p.add_argument("--f-width", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--g-width", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--g-blocks", type=_int_list, default=(3, 4, 6, 3), help=argparse.SUPPRESS)
    return p


def read_rgb(path: Path) -> NDArray[np.uint8]:
    """An image file as (H, W, 3) uint8 RGB."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            img = np.asarray(tifffile.imread(path))
        else:
            from skimage import io

            img = np.asarray(io.imread(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
        raise ConfigError(f"cannot read image {path}: {exc}") from exc
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
        raise ConfigError(f"{path}: expected 8-bit RGB(A), got {img.dtype} {img.shape}")
    return np.ascontiguousarray(img[..., :3])


def list_images(folder: str) -> list[Path]:
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(state: TrainState, sampler: ScaleTileSampler, args: argparse.Namespace, out: Path) -> tuple[int, float]:
    """The training loop; returns (steps, seconds). Syncs with the device only at log steps."""
    batch = state.config.batch_size
    rows: list[dict[str, float]] = []
    start = last_time = time.perf_counter()
    last_step = 0
    while state.step < args.max_steps and time.perf_counter() - start < args.seconds:
        x, y = sampler.sample(batch, state.generator)
        metrics = train_step(state, x, y)
        done = state.step >= args.max_steps or time.perf_counter() - start >= args.seconds
        if state.step % args.log_every == 0 or state.step == 1 or done:
            values = metrics_to_floats(metrics)
            _sync(state.device)
            now = time.perf_counter()
            rate = (state.step - last_step) * batch / max(now - last_time, 1e-9)
            last_time, last_step = now, state.step
            row = {"step": float(state.step), "seconds": now - start, "samples_per_s": rate}
            row.update({k: values[k] for k in _LOG_KEYS})
            rows.append(row)
            print(
                f"step {state.step:6d} {now - start:7.1f}s loss {values['loss_total']:.4f} "
                f"(scale {values['loss_scale']:.3f} tv {values['loss_tv']:.4f} eq {values['loss_equiv']:.4f} "
                f"seq {values['loss_scale_equiv']:.4f}) acc {values['scale_acc']:.2f} tau {values['tau']:.3f} "
                f"ema {values['tau_ema']:.3f} on {values['frac_on']:.3f} lr {values['lr']:.1e} {rate:.0f} samples/s",
                flush=True,
            )
    _sync(state.device)
    seconds = time.perf_counter() - start
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "seconds", "samples_per_s", *_LOG_KEYS])
        writer.writeheader()
        writer.writerows(rows)
    return state.step, seconds


def attention_maps(
    weights: Path, paths: Sequence[Path], mpp: float, device: torch.device
) -> dict[str, NDArray[np.uint8]]:
    """TTA attention maps (uint8, round(a * 255)) of each image, computed at 0.25 µm/px."""
    seg = AttentionSegmenter(weights, device=device, tta=True)
    maps: dict[str, NDArray[np.uint8]] = {}
    for path in paths:
        rgb = read_rgb(path)
        work = rgb
        if abs(mpp / WORKING_MPP - 1.0) > 0.05:
            size = (round(rgb.shape[0] * mpp / WORKING_MPP), round(rgb.shape[1] * mpp / WORKING_MPP))
            work = _resize(rgb.astype(np.float32), size).clip(0, 255).round().astype(np.uint8)
        a = seg.attention_map(work, WORKING_MPP, seg.fit(work, WORKING_MPP))
        if a.shape != rgb.shape[:2]:
            a = _resize(a[..., None], (rgb.shape[0], rgb.shape[1]))[..., 0]
        maps[path.stem] = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
        print(f"map {path.stem}: share a > 0.5 = {(maps[path.stem] > 127).mean():.3f}", flush=True)
    return maps


def _resize(img: NDArray[np.float32], size: tuple[int, int]) -> NDArray[np.float32]:
    """(H, W, C) float32 resampled to ``size`` with the training filter (antialiased bilinear)."""
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    y = nnf.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(y[0].permute(1, 2, 0).numpy())


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = TrainConfig(
        batch_size=args.batch, crop_px=args.crop_px, sparsity=args.sparsity, stain_norm=args.stain_norm,
        lr_drop_steps=tuple(args.lr_drop_steps), weight_scale_equiv=args.scale_equiv,
        max_white_frac=args.max_white_frac, f_width=args.f_width, g_width=args.g_width,
        g_blocks=tuple(args.g_blocks), seed=args.seed,
    )  # fmt: skip
    paths = list_images(args.images)
    t0 = time.perf_counter()
    sampler = ScaleTileSampler([read_rgb(p) for p in paths], args.mpp, config, device)
    state = build_state(config, device)
    if args.init_f:
        from ..pipeline.model import load_weights

        state.f.load_state_dict(load_weights(args.init_f).state_dict())
    prep_s = time.perf_counter() - t0
    print(f"{len(paths)} images on {device} prepared in {prep_s:.1f}s", flush=True)
    steps, seconds = train(state, sampler, args, out)
    weights = out / WEIGHTS_NAME
    save_weights(state.f, weights, {
        "tau_ema": repr(float(state.f.tau_ema)), "sparsity": repr(config.sparsity), "steps": str(steps),
        "stain_norm": str(config.stain_norm).lower(), "train_mpp": repr(args.mpp),
        "trainer": "nucleiscope.jobs.quick_train", "g_init": "from scratch (no ImageNet weights)",
    })  # fmt: skip
    if args.checkpoint:
        save_checkpoint(state, out / "checkpoint.pt")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    summary: dict[str, object] = {
        "config": config.to_dict(), "steps": steps, "train_seconds": seconds, "prep_seconds": prep_s,
        "samples_per_s": steps * config.batch_size / max(seconds, 1e-9), "device": str(device),
        "device_name": device_name, "torch": torch.__version__, "images": [p.name for p in paths],
        "mpp": args.mpp, "tau_ema": float(state.f.tau_ema),
    }  # fmt: skip
    t1 = time.perf_counter()
    eval_paths = list_images(args.eval_images or args.images)
    maps = attention_maps(weights, eval_paths, args.mpp, device)
    np.savez_compressed(out / "maps.npz", **maps)  # type: ignore[arg-type]
    summary["eval_seconds"] = time.perf_counter() - t1
    (out / "train.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_script(
    parser: argparse.ArgumentParser,
    runner: Callable[[argparse.Namespace], dict[str, Any]],
    argv: Sequence[str] | None,
) -> int:
    """Parse, run, print the summary (config left out); 2 on a configuration error."""
    args = parser.parse_args(argv)
    try:
        summary = runner(args)
    except NucleiscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
