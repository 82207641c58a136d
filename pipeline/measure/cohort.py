"""``cohort.parquet``: one row per finished slide for a study to join on ``slide_id``.

Computed from the slides table alone (``consolidate`` writes it beside ``slides.parquet`` at the
end of every run, ``nucleiscope report`` again), so the two always agree. It holds each slide's
densities, the quartiles of size, shape and stain, and quality flags, some of which compare a
slide with the rest of the cohort (``CohortQc`` holds the thresholds and their reasons):

* ``qc_low_tissue``: under ``min_tissue_mm2`` of tissue (a fragment or a crop: slide-level
  statistics rest on few nuclei).
* ``qc_stain_outlier``: the slide's median nuclear haematoxylin or eosin OD has a robust z-score
  beyond ``max_stain_z`` against the cohort: z = (x - median) / (1.4826 · MAD), the MAD-based
  "modified z-score" with Iglewicz and Hoaglin's cut-off of 3.5; the spread is floored at
  ``min_stain_spread`` of the median so that a cohort of near-identical slides does not call small
  differences outliers; needs ``min_slides`` slides with a value, else z is null.
* ``qc_artefacts``: over ``max_flagged_fraction`` of the nuclei carry an ``artefact`` flag, or
  over ``max_dropped_fraction`` of the objects found were dropped as ink.

Slides that failed are not in it; they are in ``failures.parquet``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from ..common.errors import ConfigError
from ..common.validate import finite_number

#: Robust z-score of a normal sample: MAD x 1.4826 estimates the standard deviation.
MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class CohortQc:
    """Thresholds of the cohort table's quality flags."""

    #: A biopsy core holds ~10 mm² of tissue, a resection slide 50-200 mm²; below 1 mm² it is a
    #: fragment or a crop.
    min_tissue_mm2: float = 1.0
    #: Modified z-score cut-off (Iglewicz and Hoaglin 1993).
    max_stain_z: float = 3.5
    #: Floor of the robust spread, as a share of the cohort median.
    min_stain_spread: float = 0.05
    #: Fewest slides with a stain value for z-scores to be computed.
    min_slides: int = 3
    #: Share of nuclei flagged as possible artefacts (annotated MoNuSeg nuclei: about 2 %).
    max_flagged_fraction: float = 0.25
    #: Share of objects dropped as ink.
    max_dropped_fraction: float = 0.05

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not finite_number(value) or value < 0:
                raise ConfigError(f"CohortQc.{f.name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.min_slides, int) or self.min_slides < 2:
            raise ConfigError(f"CohortQc.min_slides must be an integer >= 2, got {self.min_slides!r}")


DEFAULT_QC = CohortQc()

#: Columns copied from slides.parquet, under the same names.
_COPIED: tuple[tuple[str, pa.DataType], ...] = (
    ("slide_id", pa.string()), ("uri", pa.string()), ("segmenter", pa.string()), ("mpp", pa.float64()),
    ("tissue_area_mm2", pa.float64()), ("nuclei_count", pa.int64()), ("nuclei_per_mm2", pa.float64()),
    ("lymphocyte_like_count", pa.int64()), ("lymphocyte_like_per_mm2", pa.float64()),
    *((f"{name}_{stat}", pa.float64()) for name in ("area_um2", "circularity", "eccentricity")
      for stat in ("q1", "median", "q3")),
    ("solidity_median", pa.float64()), ("hematoxylin_od_mean_median", pa.float64()),
    ("eosin_od_mean_median", pa.float64()), ("artefacts_flagged", pa.int64()), ("artefacts_dropped", pa.int64()),
)
_COMPUTED: tuple[tuple[str, pa.DataType], ...] = (
    ("lymphocyte_like_fraction", pa.float64()), ("hematoxylin_od_z", pa.float64()), ("eosin_od_z", pa.float64()),
    ("artefacts_flagged_fraction", pa.float64()), ("artefacts_dropped_fraction", pa.float64()),
    ("qc_low_tissue", pa.bool_()), ("qc_stain_outlier", pa.bool_()), ("qc_artefacts", pa.bool_()),
    ("qc_ok", pa.bool_()), ("qc_flags", pa.string()),
)
#: Columns of ``cohort.parquet``.
COHORT_SCHEMA: pa.Schema = pa.schema([pa.field(n, t, nullable=n != "slide_id") for n, t in _COPIED + _COMPUTED])


def _floats(table: pa.Table, name: str) -> NDArray[np.float64]:
    column = table.column(name) if name in table.column_names else pa.nulls(table.num_rows, pa.float64())
    return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), np.float64)


def _ratio(num: NDArray[np.float64], den: NDArray[np.float64]) -> NDArray[np.float64]:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def robust_z(values: NDArray[np.float64], qc: CohortQc = DEFAULT_QC) -> NDArray[np.float64]:
    """Modified z-scores of ``values`` against their own median and MAD (NaN stays NaN; all NaN
    when fewer than ``qc.min_slides`` values are finite or the spread is 0)."""
    finite = values[np.isfinite(values)]
    if finite.size < qc.min_slides:
        return np.full(values.shape, np.nan)
    median = float(np.median(finite))
    spread = max(MAD_TO_SD * float(np.median(np.abs(finite - median))), qc.min_stain_spread * abs(median))
    if spread <= 0:
        return np.full(values.shape, np.nan)
    return (values - median) / spread


def _nullable(values: NDArray[np.float64]) -> pa.Array:
    return pa.array(values, pa.float64(), mask=~np.isfinite(values))


def cohort_table(slides: pa.Table, qc: CohortQc = DEFAULT_QC) -> pa.Table:
    """The cohort table of a slides table (``slides.parquet``), rows in its order."""
    n = slides.num_rows
    columns: dict[str, Any] = {}
    for name, type_ in _COPIED:
        columns[name] = slides.column(name).cast(type_) if name in slides.column_names else pa.nulls(n, type_)
    nuclei, flagged, dropped = (_floats(slides, k) for k in ("nuclei_count", "artefacts_flagged", "artefacts_dropped"))
    h_z = robust_z(_floats(slides, "hematoxylin_od_mean_median"), qc)
    e_z = robust_z(_floats(slides, "eosin_od_mean_median"), qc)
    flagged_share, dropped_share = _ratio(flagged, nuclei), _ratio(dropped, nuclei + dropped)
    tissue = _floats(slides, "tissue_area_mm2")
    low_tissue = ~(tissue >= qc.min_tissue_mm2)  # a missing area counts as too little
    with np.errstate(invalid="ignore"):
        h_out, e_out = np.abs(h_z) > qc.max_stain_z, np.abs(e_z) > qc.max_stain_z
        artefacts = (flagged_share > qc.max_flagged_fraction) | (dropped_share > qc.max_dropped_fraction)
    names = [_flag_names(*row) for row in zip(low_tissue, h_out, e_out, artefacts)]
    columns.update(
        lymphocyte_like_fraction=_nullable(_ratio(_floats(slides, "lymphocyte_like_count"), nuclei)),
        hematoxylin_od_z=_nullable(h_z), eosin_od_z=_nullable(e_z),
        artefacts_flagged_fraction=_nullable(flagged_share), artefacts_dropped_fraction=_nullable(dropped_share),
        qc_low_tissue=pa.array(low_tissue, pa.bool_()), qc_stain_outlier=pa.array(h_out | e_out, pa.bool_()),
        qc_artefacts=pa.array(artefacts, pa.bool_()), qc_ok=pa.array([not f for f in names], pa.bool_()),
        qc_flags=pa.array([",".join(f) or None for f in names], pa.string()),
    )
    return pa.Table.from_pydict(columns, schema=COHORT_SCHEMA)


def _flag_names(low_tissue: bool, h_out: bool, e_out: bool, artefacts: bool) -> list[str]:
    named = (("low_tissue", low_tissue), ("stain_outlier_hematoxylin", h_out), ("stain_outlier_eosin", e_out),
             ("artefacts", artefacts))
    return [name for name, on in named if on]


__all__ = ["COHORT_SCHEMA", "DEFAULT_QC", "CohortQc", "cohort_table", "robust_z"]
