"""The synthetic slide writer: truth matches pixels, levels agree, writing streams, bad inputs are bad."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from nucleiscope.pipeline.common.errors import ConfigError
from tests import synthetic
from tests.synthetic import SyntheticTruth


@pytest.fixture(scope="module")
def level0(synthetic_slide: SyntheticTruth) -> np.ndarray:
    return np.asarray(tifffile.imread(synthetic_slide.path, key=0))


def test_every_nucleus_is_drawn_where_the_truth_says(synthetic_slide: SyntheticTruth, level0: np.ndarray) -> None:
    truth = synthetic_slide
    labels, n = ndi.label(level0[..., 0] < 152)  # half coverage between eosin and hematoxylin red
    assert n == truth.n_nuclei > 500
    index = np.arange(1, n + 1)
    area_px = ndi.sum_labels(np.ones(labels.shape), labels, index)
    cy, cx = np.array(ndi.center_of_mass(np.ones(labels.shape), labels, index)).T + 0.5
    # each label holds exactly one true centre
    owner = labels[truth.cy_px.astype(int), truth.cx_px.astype(int)]
    assert sorted(owner) == list(index)
    order = owner - 1
    error = np.stack([cx[order] - truth.cx_px, cy[order] - truth.cy_px], axis=1)
    assert np.abs(error.mean(axis=0)).max() < 0.01  # no bias
    assert np.abs(error).max() < 0.2  # pixelation of the thresholded mask
    rel = area_px[order] / (truth.area_um2() / truth.mpp**2) - 1
    assert abs(rel.mean()) < 0.005 and np.abs(rel).max() < 0.03


def test_nuclei_are_separated_and_inside_the_tissue(synthetic_slide: SyntheticTruth) -> None:
    t = synthetic_slide
    xy = np.stack([t.cx_px, t.cy_px], axis=1) * t.mpp
    gap = np.linalg.norm(xy[:, None] - xy[None], axis=2) - (t.a_um[:, None] + t.a_um[None, :])
    np.fill_diagonal(gap, np.inf)
    assert gap.min() > 2.0  # µm between bounding circles
    x0, y0, x1, y1 = t.tissue_rect_px
    reach = t.a_um / t.mpp
    assert ((t.cx_px - reach > x0) & (t.cx_px + reach < x1) & (t.cy_px - reach > y0) & (t.cy_px + reach < y1)).all()
    assert (t.a_um >= t.b_um).all()
    np.testing.assert_allclose(np.sqrt(t.a_um * t.b_um).clip(3.0, 4.0), np.sqrt(t.a_um * t.b_um))


def test_analytic_shape_descriptors() -> None:
    truth = SyntheticTruth(path="", width_px=1, height_px=1, mpp=0.25, tile_px=16, level_downsamples=(1,),
                           level_dimensions=((1, 1),), tissue_rect_px=(0, 0, 4000, 2000),
                           cx_px=np.zeros(2), cy_px=np.zeros(2), a_um=np.array([2.0, 5.0]),
                           b_um=np.array([2.0, 3.0]), angle_rad=np.zeros(2))
    np.testing.assert_allclose(truth.area_um2(), [4 * np.pi, 15 * np.pi])
    np.testing.assert_allclose(truth.perimeter_um(), [4 * np.pi, 25.527], rtol=1e-4)
    np.testing.assert_allclose(truth.eccentricity(), [0.0, 0.8])
    assert truth.tissue_area_mm2() == pytest.approx(0.5)


def test_levels_are_rendered_consistently(synthetic_slide: SyntheticTruth, level0: np.ndarray) -> None:
    level1 = np.asarray(tifffile.imread(synthetic_slide.path, key=2))
    assert level1.shape == (625, 750, 3)
    pooled = level0.reshape(625, 4, 750, 4, 3).mean(axis=(1, 3))
    diff = np.abs(level1 - pooled)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) < 12
    thumb = np.asarray(tifffile.imread(synthetic_slide.path, key=1))
    assert max(thumb.shape[:2]) <= 768


def test_writing_is_deterministic(tmp_path: Path) -> None:
    a = synthetic.write_synthetic_slide(tmp_path / "a.svs", width_px=700, height_px=600, tile_px=256, seed=5)
    b = synthetic.write_synthetic_slide(tmp_path / "b.svs", width_px=700, height_px=600, tile_px=256, seed=5)
    c = synthetic.write_synthetic_slide(tmp_path / "c.svs", width_px=700, height_px=600, tile_px=256, seed=6)
    np.testing.assert_array_equal(tifffile.imread(a.path), tifffile.imread(b.path))
    np.testing.assert_array_equal(a.cx_px, b.cx_px)
    assert not np.array_equal(a.cx_px, c.cx_px)


def test_writing_streams_tiles_with_bounded_memory(big_single_level_slide: tuple[SyntheticTruth, int]) -> None:
    truth, peak = big_single_level_slide
    assert truth.level_dimensions == ((8000, 8000),)
    assert peak < 8000 * 8000 * 3 / 4  # never the whole level


def test_jpeg_slides_are_close_to_lossless(tmp_path: Path) -> None:
    kwargs = dict(width_px=600, height_px=500, tile_px=256, seed=2)
    lossless = synthetic.write_synthetic_slide(tmp_path / "z.svs", **kwargs)
    lossy = synthetic.write_synthetic_slide(tmp_path / "j.svs", compression="jpeg", **kwargs)
    diff = np.abs(tifffile.imread(lossless.path).astype(int) - tifffile.imread(lossy.path))
    assert diff.mean() < 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spacing_um": 8.0},  # nuclei of radius up to 4 µm could touch
        {"compression": "webp"},
        {"tile_px": 100},
        {"ellipse_ratio": (0.5, 1.0)},
        {"width_px": 0},
    ],
)
def test_invalid_parameters_are_refused(tmp_path: Path, kwargs: dict[str, object]) -> None:
    params: dict[str, object] = {"width_px": 512, "height_px": 512} | kwargs
    with pytest.raises(ConfigError):
        synthetic.write_synthetic_slide(tmp_path / "x.svs", **params)


def test_bad_input_helpers_make_what_they_claim(bad_inputs: dict[str, Path], synthetic_slide: SyntheticTruth) -> None:
    assert bad_inputs["random_bytes"].stat().st_size == 50_000
    assert bad_inputs["truncated"].stat().st_size == Path(synthetic_slide.path).stat().st_size // 2
    with tifffile.TiffFile(bad_inputs["absurd_size"]) as tif:
        assert tif.pages.first.shape[:2] == (10_000_000, 10_000_000)
    with tifffile.TiffFile(bad_inputs["no_resolution"]) as tif:
        page = tif.pages.first
        assert "MPP" not in page.description and page.tags.valueof("ResolutionUnit") in (None, 1)
    fluo = tifffile.imread(bad_inputs["fluorescence"])
    assert fluo.shape[2] == 3 and np.median(fluo.max(axis=2)) < 40 and fluo.max() > 200
