"""Tissue detection on low-resolution views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from nucleiscope.pipeline.slides.slide import Slide
from nucleiscope.pipeline.tiling.tissue import tissue_area_mm2, tissue_mask
from tests.synthetic import SyntheticTruth

GLASS = (243, 243, 245)
PINK = (230, 160, 200)


def test_synthetic_tissue_rectangle_is_recovered(synthetic_slide: SyntheticTruth) -> None:
    mpp = 8.0
    with Slide.open(synthetic_slide.path) as s:
        mask = tissue_mask(s.thumbnail(mpp), mpp)
    x0, y0, x1, y1 = (round(v * 0.25 / mpp) for v in synthetic_slide.tissue_rect_px)
    truth = np.zeros_like(mask)
    truth[y0:y1, x0:x1] = True
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9
    assert tissue_area_mm2(mask, mpp) == pytest.approx(synthetic_slide.tissue_area_mm2(), rel=0.1)


def test_glass_is_not_tissue_and_full_tissue_is_all_tissue() -> None:
    assert not tissue_mask(np.full((60, 80, 3), GLASS, np.uint8), 8.0).any()
    assert not tissue_mask(np.full((60, 80, 3), 255, np.uint8), 8.0).any()
    rng = np.random.default_rng(0)
    tissue = np.clip(np.array(PINK) + rng.normal(0, 8, (60, 80, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask(tissue, 8.0).all()


def test_specks_are_removed_and_small_holes_filled() -> None:
    mpp = 8.0
    img = np.full((100, 100, 3), GLASS, np.uint8)
    img[10:13, 10:13] = PINK  # 9 px = 576 µm², a speck
    img[40:90, 30:90] = PINK  # 0.19 mm² of tissue...
    img[60:64, 50:54] = GLASS  # ...with a 16 px = 0.001 mm² hole
    mask = tissue_mask(img, mpp)
    assert not mask[:20, :20].any()
    assert mask[60:64, 50:54].all()
    assert tissue_area_mm2(mask, mpp) == pytest.approx(50 * 60 * 64e-6, rel=0.05)


def test_sizes_scale_with_mpp() -> None:
    # the same scene at 2 µm/px: specks and holes are defined in µm, not pixels
    img = np.full((400, 400, 3), GLASS, np.uint8)
    img[40:52, 40:52] = PINK  # 144 px * 4 µm² = 576 µm²: a speck
    img[160:360, 120:360] = PINK
    mask = tissue_mask(img, 2.0)
    assert not mask[:100, :100].any()
    assert tissue_area_mm2(mask, 2.0) == pytest.approx(200 * 240 * 4e-6, rel=0.05)


def test_bad_mpp_is_refused() -> None:
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((4, 4, 3), np.uint8), 0.0)


@pytest.mark.shared
def test_monuseg_crops_are_all_tissue(monuseg_dir: Path) -> None:
    for path in sorted((monuseg_dir / "images").glob("*.tif")):
        rgb = np.asarray(tifffile.imread(path))[..., :3]
        view = rgb[:1000, :1000].reshape(125, 8, 125, 8, 3).mean(axis=(1, 3)).astype(np.uint8)  # ~2 µm/px
        assert tissue_mask(view, 2.0).mean() > 0.95, path.name


@pytest.mark.shared
def test_cmu_small_region_tissue(slides_dir: Path) -> None:
    with Slide.open(str(slides_dir / "CMU-1-Small-Region.svs")) as s:
        thumb = s.thumbnail(8.0)
    mask = tissue_mask(thumb, 8.0)
    assert 0.25 < mask.mean() < 0.5  # a strip of skin on glass
    glass = thumb.min(axis=2) > 225
    assert (mask & glass).sum() < 0.1 * mask.sum()
    assert 0.4 < tissue_area_mm2(mask, 8.0) < 0.9
