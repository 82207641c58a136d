"""Segmented objects that are not nuclei: ink, pigment, eosinophilic debris, flakes, dark masses.

Every decision is made on an object's mean optical density (OD) vector in RGB,
described by two angles relative to the Ruifrok–Johnston haematoxylin (H) and eosin
(E) vectors of ``stain.STAIN_OD_VECTORS``, so that it does not depend on how dark the
object is:

* ``hue_deg``: direction within the H–E plane, 0° on the H vector, growing towards
  E, which lies at 39.4°. Any H+E mixture lies in [0°, 39.4°]; a negative hue means
  more red absorption than haematoxylin itself: green, teal, cyan dyes (ink).
* ``elevation_deg``: angle out of the H–E plane, positive towards more blue absorption
  (brown DAB-like pigments, melanin, haemosiderin), negative towards more red.
* ``neutral_deg``: angle to the grey axis (1, 1, 1); 0° for black ink or carbon.

Decisions (thresholds in ``ArtefactRules``, with their reasons):

* dropped, ``ink``: mean hue below -8°; or at least 20 % of the object's pixels with a
  hue below -20° (ink specks over tissue); or grey (< 5° from the grey axis) and dark
  (mean OD >= 0.6 per channel). No H+E mixture has these colours; marking inks do.
* flagged, ``pigment``: elevation above 25°: browner than any haematoxylin (DAB 37°,
  melanin ~33°). Kept because pigmented cells (melanoma, melanophages) have nuclei.
* flagged, ``eosinophilic``: hue above 30° (over ~75 % of the in-plane OD is eosin):
  keratin, red cells, eosinophilic debris, or a pale nucleus in eosinophilic cytoplasm.
* flagged, ``detached``: over 30 % of the background in a ``ring_um`` wide ring around the
  object is clear glass (largest channel OD < ``glass_od``): a flake or fragment lying free of
  the tissue, e.g. keratin in a lumen, or a floating cell.
* flagged, ``low_contrast``: the object's mean haematoxylin OD is below 1.1x that of
  the background in the same ring: a piece of a uniformly dark mass (compact keratin,
  dense collagen, a fold) rather than a nucleus standing out from its surroundings.

When several rules match, ink wins, then pigment, eosinophilic, detached, low_contrast.

Objects paler than ``min_od`` (OD vector length) are not judged by colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from ..color.stain import STAIN_OD_VECTORS, hematoxylin_from_od, rgb_to_od
from ..segmentation.instances import dilate_disk, disk_footprint
from .morphometrics import _dense_labels

#: Values of the ``artefact`` column of flagged (kept) objects; dropped objects are ``ink``.
FLAGS: tuple[str, ...] = ("pigment", "eosinophilic", "detached", "low_contrast")
DROPPED: tuple[str, ...] = ("ink",)


def _stain_frame() -> NDArray[np.float64]:
    """Orthonormal rows: H, the in-plane direction towards E, the H–E plane normal."""
    h, e = STAIN_OD_VECTORS[0], STAIN_OD_VECTORS[1]
    towards_e = e - (e @ h) * h
    towards_e /= np.linalg.norm(towards_e)
    normal = np.cross(h, e)
    normal /= np.linalg.norm(normal)
    return np.stack([h, towards_e, normal])


_FRAME = _stain_frame()
_GREY = np.full(3, 1.0 / math.sqrt(3.0))
#: Hue of the eosin vector (degrees), 39.4 for the Ruifrok–Johnston vectors.
EOSIN_HUE_DEG = float(np.degrees(np.arctan2(STAIN_OD_VECTORS[1] @ _FRAME[1], STAIN_OD_VECTORS[1] @ _FRAME[0])))


@dataclass(frozen=True)
class ArtefactRules:
    """Thresholds of the artefact decisions (angles in degrees, OD in log10 units, µm)."""

    #: Red-excess ink: haematoxylin hue varies by a few degrees between labs (0.1th
    #: percentile of 12k MoNuSeg nuclei from 30 sites: -0.5°); -8° leaves a margin.
    ink_hue_deg: float = -8.0
    #: Speckled ink: share of an object's pixels (those of OD length >= ``min_od``) with a
    #: hue below ``ink_pixel_hue_deg``; at most 1.5 % in any of those MoNuSeg nuclei.
    ink_pixel_hue_deg: float = -20.0
    ink_pixel_fraction: float = 0.2
    #: Black ink / carbon: within this angle of grey ...
    black_neutral_deg: float = 5.0
    #: ... and at least this mean OD per channel (transmits < 25 % in R, G and B).
    black_min_od: float = 0.6
    #: Brown pigment: DAB lies 37° out of the H–E plane, melanin ~33°, nuclei < 23°.
    pigment_elevation_deg: float = 25.0
    #: Eosinophilic: hue above this (pure eosin is 39.4°).
    eosin_hue_deg: float = 30.0
    #: Objects whose mean OD vector is shorter than this are too pale to judge by colour.
    min_od: float = 0.15
    #: Clear glass: largest channel OD below this (tissue.py clamps its threshold to >= 0.06).
    glass_od: float = 0.06
    #: Width of the ring around an object examined for glass, and the glass share that flags
    #: it (exceeded by 0.9 % of MoNuSeg nuclei, by 37 % of objects on CMU-1's keratin).
    ring_um: float = 1.5
    detached_fraction: float = 0.3
    #: Low contrast: mean haematoxylin OD below this multiple of the ring's background.
    #: A nucleus is a distinct dark body (see the module text); pieces of a uniformly
    #: dark mass (compact keratin, dense collagen, folds, cytoplasm) are not.
    min_contrast: float = 1.1


DEFAULT_RULES = ArtefactRules()


@dataclass(frozen=True)
class ArtefactCalls:
    """Per-object decisions, aligned with ``ids`` (label values, sorted)."""

    ids: NDArray[np.int64]
    #: "" for a clean object, else one of ``DROPPED`` or ``FLAGS``.
    reason: NDArray[np.str_]
    hue_deg: NDArray[np.float64]
    elevation_deg: NDArray[np.float64]
    neutral_deg: NDArray[np.float64]
    ink_pixel_fraction: NDArray[np.float64]
    glass_fraction: NDArray[np.float64]
    #: Mean haematoxylin OD of the object / that of its ring (NaN without a ring).
    contrast: NDArray[np.float64]

    @property
    def dropped(self) -> NDArray[np.bool_]:
        return np.isin(self.reason, DROPPED)

    def flags(self) -> dict[int, str]:
        """Label value -> flag of every kept, flagged object."""
        keep = (self.reason != "") & ~self.dropped
        return {int(i): str(r) for i, r in zip(self.ids[keep], self.reason[keep])}

    def counts(self) -> dict[str, int]:
        """Number of objects per reason (only reasons that occur)."""
        values, counts = np.unique(self.reason[self.reason != ""], return_counts=True)
        return {str(v): int(c) for v, c in zip(values, counts)}

    def dropped_counts(self) -> dict[str, int]:
        """Number of dropped objects per reason."""
        return {k: v for k, v in self.counts().items() if k in DROPPED}

    def select(self, ids: NDArray[np.integer]) -> ArtefactCalls:
        """The calls of the objects whose label value is in ``ids``."""
        keep = np.isin(self.ids, ids)
        return ArtefactCalls(*(getattr(self, f.name)[keep] for f in fields(self)))


def stain_angles(od: NDArray[np.floating]) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Hue, elevation and angle to grey (degrees) of OD vectors (..., 3)."""
    v = np.asarray(od, np.float64)
    length = np.maximum(np.linalg.norm(v, axis=-1), 1e-12)
    coords = v @ _FRAME.T
    hue = np.degrees(np.arctan2(coords[..., 1], coords[..., 0]))
    elevation = np.degrees(np.arcsin(np.clip(coords[..., 2] / length, -1.0, 1.0)))
    neutral = np.degrees(np.arccos(np.clip(v @ _GREY / length, -1.0, 1.0)))
    return hue, elevation, neutral


def _hue_deg(od: NDArray[np.floating]) -> NDArray[np.float64]:
    """The hue of ``stain_angles`` alone (the per-pixel test needs nothing else)."""
    coords = np.asarray(od, np.float64) @ _FRAME.T
    return np.degrees(np.arctan2(coords[..., 1], coords[..., 0]))


def _colour_stats(dense: NDArray[np.int32], od: NDArray[np.float32], n: int, rules: ArtefactRules,
                  ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Mean OD vector (N, 3) of dense labels 1..N and each one's share of ink-hued pixels."""
    inside = dense > 0
    flat = dense[inside]
    count = np.maximum(np.bincount(flat, minlength=n + 1)[1:], 1).astype(np.float64)
    values = od[inside]
    mean = np.stack([np.bincount(flat, weights=values[:, c], minlength=n + 1)[1:] for c in range(3)], 1)
    judged = np.linalg.norm(values, axis=1) >= rules.min_od
    inky = judged & (_hue_deg(values) < rules.ink_pixel_hue_deg)
    share = np.bincount(flat, weights=inky, minlength=n + 1)[1:] / np.maximum(
        np.bincount(flat, weights=judged, minlength=n + 1)[1:], 1.0)
    return mean / count[:, None], share


def _surround(dense: NDArray[np.int32], value: NDArray[np.float32], glass: NDArray[np.bool_], n: int,
              ring_px: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Mean of ``od`` (one value per pixel) and glass share of the pixels within ``ring_px`` around each object.

    The ring holds the background pixels (label 0) within ``ring_px`` of the object, so
    touching neighbours do not count; an object without such pixels gets NaN and 0.
    """
    ring_od, ring_glass = np.full(n, np.nan), np.zeros(n)
    if ring_px < 1:
        return ring_od, ring_glass
    disk = disk_footprint(ring_px)
    for k, box in enumerate(ndi.find_objects(dense, max_label=n)):
        if box is None:
            continue
        rows = slice(max(box[0].start - ring_px, 0), box[0].stop + ring_px)
        cols = slice(max(box[1].start - ring_px, 0), box[1].stop + ring_px)
        crop = dense[rows, cols]
        ring = dilate_disk(crop == k + 1, disk) & (crop == 0)
        if ring.any():
            ring_od[k] = float(value[rows, cols][ring].mean())
            ring_glass[k] = float(glass[rows, cols][ring].mean())
    return ring_od, ring_glass


def _reasons(mean: NDArray[np.float64], inky: NDArray[np.float64], contrast: NDArray[np.float64],
             glass: NDArray[np.float64], rules: ArtefactRules) -> NDArray[np.str_]:
    """The decision per object; a later rule overrides an earlier one (ink wins)."""
    hue, elevation, neutral = stain_angles(mean)
    length = np.linalg.norm(mean, axis=1)
    judged = length >= rules.min_od
    black = (neutral < rules.black_neutral_deg) & (mean.min(axis=1) >= rules.black_min_od)
    reason = np.full(mean.shape[0], "", dtype="<U12")
    with np.errstate(invalid="ignore"):
        reason[judged & (contrast < rules.min_contrast)] = "low_contrast"
    reason[glass > rules.detached_fraction] = "detached"
    reason[judged & (hue > rules.eosin_hue_deg)] = "eosinophilic"
    reason[judged & (elevation > rules.pigment_elevation_deg)] = "pigment"
    reason[judged & ((hue < rules.ink_hue_deg) | black)] = "ink"
    reason[inky >= rules.ink_pixel_fraction] = "ink"
    return reason


def classify_objects(labels: NDArray[np.integer], rgb: NDArray[np.uint8], um_per_px: float,
                     rules: ArtefactRules = DEFAULT_RULES) -> ArtefactCalls:
    """Decide for every labelled object (label > 0) of a tile whether it is an artefact.

    ``um_per_px`` is the size of one pixel of ``labels`` and ``rgb`` (same shape).
    """
    if labels.ndim != 2 or rgb.shape[:2] != labels.shape:
        raise ValueError(f"labels {labels.shape} and rgb {rgb.shape} do not match")
    if not um_per_px > 0:
        raise ValueError(f"um_per_px must be positive, got {um_per_px}")
    ids, dense = _dense_labels(np.asarray(labels).astype(np.int64, copy=False))
    if ids.size == 0:
        empty = np.zeros(0, np.float64)
        return ArtefactCalls(ids, np.zeros(0, "<U12"), *([empty] * 6))
    od = rgb_to_od(np.ascontiguousarray(rgb[..., :3]))
    mean, inky = _colour_stats(dense, od, ids.size, rules)
    haem = hematoxylin_from_od(od)
    brightest = np.maximum(np.maximum(od[..., 0], od[..., 1]), od[..., 2])  # od.max(-1), faster
    ring_h, glass = _surround(dense, haem, brightest < rules.glass_od, ids.size,
                              round(rules.ring_um / um_per_px))
    inside = dense > 0
    flat = dense[inside]
    own_h = np.bincount(flat, weights=haem[inside], minlength=ids.size + 1)[1:].astype(np.float64)
    own_h /= np.maximum(np.bincount(flat, minlength=ids.size + 1)[1:], 1)
    contrast = own_h / np.maximum(ring_h, 1e-6)
    reason = _reasons(mean, inky, contrast, glass, rules)
    hue, elevation, neutral = stain_angles(mean)
    return ArtefactCalls(ids, reason, hue, elevation, neutral, inky, glass, contrast)


def remove_dropped(labels: NDArray[np.integer], calls: ArtefactCalls) -> NDArray[np.int32]:
    """``labels`` with every dropped object set to background."""
    out = np.asarray(labels, np.int32).copy()
    gone = calls.ids[calls.dropped]
    if gone.size:
        out[np.isin(out, gone)] = 0
    return out
