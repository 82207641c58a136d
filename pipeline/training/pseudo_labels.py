"""Pseudo-labels for the student from the attention teacher (no manual labels anywhere).

Targets are uint8 maps: 0 background, 1 nucleus interior, 2 nucleus boundary, 255
ignore. Only confident pixels get a class:

- ``attention``: nuclei are the paper's instances of the teacher map (a > 0.5);
  background where a < ``bg_max``; the rest is ignored.
- ``attention_h`` (default): the teacher's nuclei are grown into the haematoxylin
  foreground (classical mask) by at most ``grow_um``, which refines the ragged
  outlines; haematoxylin blobs the teacher left dark are ignored, not called
  background, so the student may find the pale and large nuclei the sparse map misses.
- ``consensus``: classical instances that the teacher confirms (some a > 0.5 inside)
  keep their classical outline; unconfirmed ones are ignored; teacher nuclei that no
  classical instance touches are added (grown as in ``attention_h``).
- ``classical``: the classical instances (an ablation: no attention at all).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from ..common.errors import ConfigError
from ..segmentation.instances import component_watershed, disk_footprint, split_instances

IGNORE_LABEL = 255
RECIPES = ("attention", "attention_h", "consensus", "classical")
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class PseudoLabelConfig:
    """How pseudo-labels are drawn from the teacher (sizes in µm)."""

    #: The recipe of the shipped student (pipeline/networks/weights/MODEL_CARD.md).
    recipe: str = "consensus"
    #: Teacher threshold for nuclei (the paper's 0.5).
    fg_min: float = 0.5
    #: Teacher values below this (outside the haematoxylin mask) are confident background.
    bg_max: float = 0.2
    #: How far a teacher nucleus may grow into the haematoxylin mask.
    grow_um: float = 1.5
    #: Width of the boundary class inside each nucleus.
    boundary_um: float = 0.5
    #: Ring around each nucleus that is ignored (its outline is uncertain). 0 since 2026-12:
    #: with 0.5 µm the student grew ~10-16 % beyond its own targets into the unpenalised
    #: ring (benchmarks/bench_quality.py, matched-area ratio); the shipped student used 0.5.
    ring_um: float = 0.0

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if not 0.0 < self.bg_max <= self.fg_min < 1.0:
            raise ConfigError("need 0 < bg_max <= fg_min < 1")
        if min(self.grow_um, self.boundary_um, self.ring_um) < 0:
            raise ConfigError("grow_um, boundary_um and ring_um must be >= 0")


def grow_into(
    seeds: NDArray[np.int32], allowed: NDArray[np.bool_], radius_px: int, landscape: NDArray[np.floating]
) -> NDArray[np.int32]:
    """Grow labelled seeds into ``allowed`` pixels within ``radius_px`` of them (watershed
    on ``landscape``); pixels reachable from several seeds go to the lower-landscape flood."""
    if radius_px < 1 or not seeds.any():
        return seeds
    reach = ndi.binary_dilation(seeds > 0, structure=disk_footprint(radius_px)) & allowed
    region = reach | (seeds > 0)
    components, _ = ndi.label(region, structure=_EIGHT)
    return component_watershed(landscape, seeds.astype(np.int32), components)


def instance_targets(
    labels: NDArray[np.integer], background: NDArray[np.bool_], mpp: float, config: PseudoLabelConfig
) -> NDArray[np.uint8]:
    """Class targets from pseudo-instances and a confident-background mask (nuclei and the
    ignored ring around them take precedence over ``background``)."""
    labels = np.asarray(labels)
    target = np.full(labels.shape, IGNORE_LABEL, dtype=np.uint8)
    target[background] = 0
    nucleus = labels > 0
    ring = max(0, int(round(config.ring_um / mpp)))
    if ring:
        near = ndi.binary_dilation(nucleus, structure=disk_footprint(ring)) & ~nucleus
        target[near] = IGNORE_LABEL
    width = max(1, int(round(config.boundary_um / mpp)))
    # Boundary: pixels whose neighbourhood holds another label (background or nucleus).
    hi = ndi.maximum_filter(labels, size=2 * width + 1, mode="nearest")
    lo = ndi.minimum_filter(labels, size=2 * width + 1, mode="nearest")
    edge = nucleus & ((hi != labels) | (lo != labels))
    target[nucleus] = 1
    target[edge] = 2
    return target


def pseudo_targets(
    attention: NDArray[np.floating],
    h_mask: NDArray[np.bool_],
    mpp: float,
    config: PseudoLabelConfig,
    classical_labels: NDArray[np.integer] | None = None,
) -> NDArray[np.uint8]:
    """Targets for one image from the teacher map ``attention`` (H, W) in [0, 1] and the
    haematoxylin foreground ``h_mask`` (the classical segmenter's mask), at ``mpp``."""
    labels, background = pseudo_instances(attention, h_mask, mpp, config, classical_labels)
    return instance_targets(labels, background, mpp, config)


def pseudo_instances(
    attention: NDArray[np.floating],
    h_mask: NDArray[np.bool_],
    mpp: float,
    config: PseudoLabelConfig,
    classical_labels: NDArray[np.integer] | None = None,
) -> tuple[NDArray[np.int32], NDArray[np.bool_]]:
    """(pseudo-instance labels, confident-background mask) of one image: what
    ``pseudo_targets`` turns into classes (see the recipes in the module docstring)."""
    if attention.shape != h_mask.shape:
        raise ValueError(f"attention {attention.shape} and mask {h_mask.shape} differ")
    if config.recipe in ("classical", "consensus") and classical_labels is None:
        raise ConfigError(f"the {config.recipe} recipe needs the classical instance labels")
    if config.recipe == "classical":
        labels, background = np.asarray(classical_labels, dtype=np.int32), ~h_mask
    else:
        teacher = split_instances(attention > config.fg_min, mpp)
        grow_px = int(round(config.grow_um / mpp))
        if config.recipe == "attention":
            labels, background = teacher, attention < config.bg_max
        elif config.recipe == "consensus":
            classical = np.asarray(classical_labels, dtype=np.int32)
            merged = consensus_instances(teacher, classical, attention, config)
            labels = grow_into(merged, h_mask & (classical == 0), grow_px, -attention)
            background = (attention < config.bg_max) & ~h_mask
        else:
            labels = grow_into(teacher, h_mask, grow_px, -attention)
            background = (attention < config.bg_max) & ~h_mask
    return np.asarray(labels, dtype=np.int32), np.asarray(background, dtype=bool)


def consensus_instances(
    teacher: NDArray[np.int32], classical: NDArray[np.int32], attention: NDArray[np.floating], config: PseudoLabelConfig
) -> NDArray[np.int32]:
    """Classical instances with a teacher pixel above ``fg_min``, plus the teacher's
    instances that touch no classical instance (numbered after them)."""
    n_c = int(classical.max(initial=0))
    out = np.zeros(classical.shape, dtype=np.int32)
    if n_c:
        peak = np.asarray(ndi.maximum(attention, classical, index=np.arange(1, n_c + 1)), dtype=np.float64)
        keep = np.concatenate([[False], peak > config.fg_min])
        out = np.where(keep[classical], classical, 0).astype(np.int32)
    n_t = int(teacher.max(initial=0))
    if n_t:
        touched = np.zeros(n_t + 1, dtype=bool)
        touched[np.unique(teacher[classical > 0])] = True
        alone = (teacher > 0) & ~touched[teacher]
        out[alone] = teacher[alone] + n_c
    return out


def target_shares(target: NDArray[np.uint8]) -> dict[str, float]:
    """Share of pixels per class (for logs and the model card)."""
    n = max(1, target.size)
    return {
        "background": float((target == 0).sum() / n),
        "interior": float((target == 1).sum() / n),
        "boundary": float((target == 2).sum() / n),
        "ignore": float((target == 255).sum() / n),
    }
