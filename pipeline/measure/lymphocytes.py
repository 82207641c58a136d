"""A lymphocyte-like flag: a documented morphology rule on a nucleus's own columns, not a classifier.

A nucleus is ``lymphocyte_like`` when it is small, round, dark and evenly stained, and not
flagged as an artefact (``LymphocyteRule`` holds the thresholds and where each comes from).
"Dark" is relative: a nucleus's mean haematoxylin OD divided by the slide's *haematoxylin
reference*, Otsu's threshold of the haematoxylin OD of the tissue pixels of the fixed patches every
segmenter is fitted on (``hematoxylin_reference``): where the slide's nuclear stain begins. OD is
proportional to the amount of dye, so a slide stained uniformly stronger or weaker scales both
and the ratio stays (on 27 MoNuSeg images from as many sites the median annotated nucleus's
haematoxylin OD varies with a CV of 0.46 between images, its ratio to the reference with 0.14).
The reference is
known before the first tile is read, so every row is flagged when it is written, the same
whatever the tiling. The rule cannot tell small lymphocytes from other small, round, dark
nuclei (plasma cells seen end-on, apoptotic bodies, some tumour nuclei cut at their tip).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray
from skimage.filters import threshold_otsu

from ..color.stain import hematoxylin_from_od, rgb_to_od
from ..common.errors import ConfigError
from ..common.validate import finite_number

#: Name of the flag column of the nuclei table.
COLUMN = "lymphocyte_like"
#: A pixel is tissue (not glass) when its largest channel OD reaches this (as ``artefacts``).
TISSUE_OD = 0.06
#: Fewer tissue pixels than this (at the working resolution) give no reference.
MIN_REFERENCE_PX = 2000


@dataclass(frozen=True)
class LymphocyteRule:
    """Thresholds of the lymphocyte-like rule (areas in µm², OD ratios unitless)."""

    #: Area: an equivalent diameter of 3.5-7.5 µm. Small lymphocyte nuclei are 5-8 µm across; a
    #: section also shows smaller profiles of the same sphere (caps). Annotated MoNuSeg nuclei
    #: that are round and at least 1.65x their slide's reference: median 19.9 µm² (5.0 µm), 10th-90th
    #: percentile 10.7-34.3 µm² (3.7-6.6 µm); round ones below 1.44x it: median 35.4 µm².
    min_area_um2: float = 9.5
    max_area_um2: float = 44.0
    #: Round: 4π·area/perimeter² (a notched or lobed outline is lower), the moment ellipse's
    #: eccentricity (0.75: axes at most 1.5 : 1) and outline area / convex hull area.
    min_circularity: float = 0.8
    max_eccentricity: float = 0.75
    min_solidity: float = 0.9
    #: Dark: mean haematoxylin OD at least this multiple of the slide's reference: 15 % darker
    #: than the typical annotated MoNuSeg nucleus, which sits at 1.44x it (image medians).
    min_darkness: float = 1.65
    #: Evenly stained: haematoxylin OD std / mean at most this; the 95th percentile of the small,
    #: round, dark annotated nuclei, so only the most uneven objects (a nucleus with part of a
    #: neighbour, a fold) are refused.
    max_od_cv: float = 0.45

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not finite_number(value) or value < 0:
                raise ConfigError(f"LymphocyteRule.{f.name} must be a finite number >= 0, got {value!r}")
        if self.min_area_um2 >= self.max_area_um2:
            raise ConfigError(f"LymphocyteRule: min_area_um2 {self.min_area_um2} must be below max_area_um2 "
                              f"{self.max_area_um2}")
        for name in ("min_circularity", "max_eccentricity", "min_solidity"):
            if getattr(self, name) > 1:
                raise ConfigError(f"LymphocyteRule.{name} must be within [0, 1], got {getattr(self, name)}")


def hematoxylin_reference(rgb: NDArray[np.uint8]) -> float | None:
    """The haematoxylin reference of a view: Otsu's threshold of the haematoxylin OD of its tissue
    pixels; None with under ``MIN_REFERENCE_PX`` tissue pixels or a single value."""
    rgb = np.ascontiguousarray(rgb[..., :3])
    od = rgb_to_od(rgb)
    tissue = od.max(axis=-1) >= TISSUE_OD
    if int(tissue.sum()) < MIN_REFERENCE_PX:
        return None
    values = hematoxylin_from_od(od)[tissue].astype(np.float64)
    if float(values.max()) <= float(values.min()):
        return None
    reference = float(threshold_otsu(values))  # type: ignore[no-untyped-call]
    return reference if reference > 0 else None


def lymphocyte_like(table: pa.Table, reference: float | None, rule: LymphocyteRule) -> pa.BooleanArray:
    """The flag of every row of a nuclei table; null for every row when ``reference`` is None."""
    n = table.num_rows
    if reference is None or not reference > 0:
        return pa.nulls(n, pa.bool_())
    col = {name: np.asarray(table.column(name).to_numpy(zero_copy_only=False), np.float64) for name in (
        "area_um2", "circularity", "eccentricity", "solidity", "hematoxylin_od_mean", "hematoxylin_od_std")}
    h = col["hematoxylin_od_mean"]
    with np.errstate(divide="ignore", invalid="ignore"):
        cv = np.where(h > 0, col["hematoxylin_od_std"] / h, np.inf)
    flag = (
        (col["area_um2"] >= rule.min_area_um2) & (col["area_um2"] <= rule.max_area_um2)
        & (col["circularity"] >= rule.min_circularity) & (col["eccentricity"] <= rule.max_eccentricity)
        & (col["solidity"] >= rule.min_solidity)
        & (h >= rule.min_darkness * reference) & (cv <= rule.max_od_cv)
    )
    if "artefact" in table.column_names:
        flag &= np.asarray(pc.is_null(table.column("artefact")).to_numpy(zero_copy_only=False), bool)
    return pa.array(flag, pa.bool_())


def with_flag(table: pa.Table, reference: float | None, rule: LymphocyteRule) -> pa.Table:
    """``table`` with its ``lymphocyte_like`` column set by the rule."""
    values = lymphocyte_like(table, reference, rule)
    index = table.schema.get_field_index(COLUMN)
    if index < 0:
        raise ValueError(f"nuclei table lacks the {COLUMN!r} column")
    return table.set_column(index, table.schema.field(index), values)


DEFAULT_RULE = LymphocyteRule()

__all__ = ["COLUMN", "DEFAULT_RULE", "LymphocyteRule", "hematoxylin_reference", "lymphocyte_like", "with_flag"]
