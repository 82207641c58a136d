"""Torch devices: which one to use, fast-math settings, its name, and batched forwards.

Generic helpers every network stage shares (segmenters, training); nothing here knows
about a particular network.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from numpy.typing import NDArray

from .errors import ModelError

ArrayT = TypeVar("ArrayT", bound=np.generic)


def pick_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def enable_fast_math(device: torch.device) -> None:
    """On CUDA: cuDNN autotuning and TF32 matmuls/convolutions (no effect on the CPU)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def device_name(device: torch.device) -> str:
    """The GPU's name, or the processor's (``"cpu"`` when the platform does not say)."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return platform.processor() or "cpu"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise ModelError(f"cannot read weights file {os.fspath(path)}: {exc}") from exc
    return digest.hexdigest()


def batched_by_shape(
    images: Sequence[NDArray[np.uint8]],
    max_batch: int,
    device: torch.device,
    run: Callable[[torch.Tensor], NDArray[ArrayT]],
) -> list[NDArray[ArrayT]]:
    """``run`` on stacks of at most ``max_batch`` same-shape (H, W, 3) images (uint8 on
    ``device``); its per-image outputs come back in the input order."""
    out: list[NDArray[ArrayT] | None] = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), max_batch):
            chunk = indices[start : start + max_batch]
            results = run(torch.from_numpy(np.stack([images[i] for i in chunk])).to(device))
            for i, result in zip(chunk, results):
                out[i] = np.ascontiguousarray(result)
    return [r for r in out if r is not None]

