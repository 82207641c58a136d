"""cohort.parquet: hand-computed values on a small cohort, written at the end of every run from the
same records as slides.parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from nucleiscope.jobs.run_local import run_cohort_local
from nucleiscope.pipeline.common.errors import ConfigError
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.measure.cohort import COHORT_SCHEMA, CohortQc, cohort_table, robust_z
from nucleiscope.pipeline.measure.summary import SLIDES_SCHEMA
from nucleiscope.pipeline.segmentation.registry import make_segmenter
from nucleiscope.pipeline.slides.inputs import SlideInput
from tests.synthetic import write_synthetic_slide


def slides_table(rows: list[dict[str, object]]) -> pa.Table:
    full = [{name: row.get(name) for name in SLIDES_SCHEMA.names} for row in rows]
    return pa.Table.from_pylist(full, schema=SLIDES_SCHEMA)


BASE = {"tissue_area_mm2": 20.0, "nuclei_count": 100, "artefacts_flagged": 2, "artefacts_dropped": 0,
        "lymphocyte_like_count": 10, "eosin_od_mean_median": 0.30}  # fmt: skip


def test_values_and_flags_match_a_hand_computation() -> None:
    rows = [
        {**BASE, "slide_id": "a", "hematoxylin_od_mean_median": 0.50, "nuclei_per_mm2": 5.0},
        {**BASE, "slide_id": "b", "hematoxylin_od_mean_median": 0.52, "tissue_area_mm2": 0.5},
        {**BASE, "slide_id": "c", "hematoxylin_od_mean_median": 0.48, "artefacts_flagged": 30},
        {**BASE, "slide_id": "d", "hematoxylin_od_mean_median": 0.90, "artefacts_dropped": 6},
    ]
    cohort = cohort_table(slides_table(rows)).to_pandas().set_index("slide_id")
    assert cohort.columns.tolist() == COHORT_SCHEMA.names[1:]
    # median 0.51; absolute deviations 0.01, 0.01, 0.03, 0.39: MAD 0.02; spread 1.4826 * 0.02
    spread = 1.4826 * 0.02
    np.testing.assert_allclose(cohort.hematoxylin_od_z, [-0.01 / spread, 0.01 / spread, -0.03 / spread,
                                                         0.39 / spread], rtol=1e-9)  # fmt: skip
    assert cohort.eosin_od_z.tolist() == [0.0] * 4  # MAD 0: the floor (5 % of 0.30) holds the spread
    assert cohort.qc_stain_outlier.tolist() == [False, False, False, True]
    assert cohort.qc_low_tissue.tolist() == [False, True, False, False]
    np.testing.assert_allclose(cohort.artefacts_flagged_fraction, [0.02, 0.02, 0.30, 0.02])
    np.testing.assert_allclose(cohort.artefacts_dropped_fraction, [0, 0, 0, 6 / 106])
    assert cohort.qc_artefacts.tolist() == [False, False, True, True]  # 30 % > 25 %; 5.7 % > 5 %
    assert cohort.qc_flags.fillna("").tolist() == ["", "low_tissue", "artefacts", "stain_outlier_hematoxylin,artefacts"]
    assert cohort.qc_ok.tolist() == [True, False, False, False]
    np.testing.assert_allclose(cohort.lymphocyte_like_fraction, 0.1)
    assert cohort.nuclei_per_mm2["a"] == 5.0 and np.isnan(cohort.nuclei_per_mm2["b"])  # copied as they are


def test_z_scores_need_enough_slides_and_a_spread() -> None:
    assert np.isnan(robust_z(np.array([0.5, 0.9]))).all()
    assert np.isnan(robust_z(np.array([0.0, 0.0, 0.0]))).all()
    z = robust_z(np.array([0.5, np.nan, 0.5, 0.6]))
    assert np.isnan(z[1]) and z[3] == pytest.approx(0.1 / (0.05 * 0.5))
    empty = cohort_table(slides_table([]))
    assert empty.num_rows == 0 and empty.schema.equals(COHORT_SCHEMA)
    with pytest.raises(ConfigError):
        CohortQc(min_slides=1)
    with pytest.raises(ConfigError):
        CohortQc(max_stain_z=-1.0)


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny slides through the local driver; the third's nuclei are stained a paler blue."""
    root = tmp_path_factory.mktemp("cohort")
    items = []
    for k, rgb in enumerate([None, None, (150.0, 130.0, 200.0)]):
        path = root / f"slide{k}.svs"
        write_synthetic_slide(path, width_px=640, height_px=560, mpp=0.25, tile_px=256, min_level_px=256,
                              seed=k, nucleus_rgb=rgb)  # fmt: skip
        items.append(SlideInput(str(path), f"s{k}", None))
    out = root / "out"
    config = ExtractConfig(tile_px=256)
    run_cohort_local(items, str(out), config, make_segmenter("classical"), show_progress=False)
    return out


def test_a_run_writes_the_cohort_from_its_slides_table(cohort_run: Path) -> None:
    slides = pd.read_parquet(cohort_run / "slides.parquet").set_index("slide_id")
    cohort = pd.read_parquet(cohort_run / "cohort.parquet").set_index("slide_id")
    assert cohort.index.tolist() == slides.index.tolist() == ["s0", "s1", "s2"]
    for name in ("nuclei_count", "nuclei_per_mm2", "lymphocyte_like_per_mm2", "area_um2_median",
                 "hematoxylin_od_mean_median", "eosin_od_mean_median", "tissue_area_mm2"):
        pd.testing.assert_series_equal(cohort[name], slides[name], check_names=False)
    np.testing.assert_allclose(cohort.nuclei_per_mm2, slides.nuclei_count / slides.tissue_area_mm2)
    z = {}
    for stain in ("hematoxylin", "eosin"):
        x = slides[f"{stain}_od_mean_median"].to_numpy()
        median = np.median(x)
        z[stain] = (x - median) / max(1.4826 * np.median(np.abs(x - median)), 0.05 * median)
        np.testing.assert_allclose(cohort[f"{stain}_od_z"], z[stain])
    h = slides.hematoxylin_od_mean_median.to_numpy()
    assert h[2] < 0.8 * min(h[:2]) and abs(z["hematoxylin"][2]) > 3.5  # the pale slide measures paler ...
    assert cohort.qc_stain_outlier.tolist() == [False, False, True]  # ... and only it is an outlier
    assert cohort.qc_low_tissue.all()  # 0.02 mm² of tissue each
    eosin = ",stain_outlier_eosin" if abs(z["eosin"][2]) > 3.5 else ""
    assert cohort.qc_flags["s2"] == "low_tissue,stain_outlier_hematoxylin" + eosin
    assert cohort.qc_flags["s0"] == "low_tissue" and not cohort.qc_ok.any()
