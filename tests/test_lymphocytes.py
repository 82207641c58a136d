"""The lymphocyte-like flag: drawn nuclei of known size, shape and stain are flagged exactly as the
rule says; the haematoxylin reference follows the stain's strength; extraction writes the flag and
the per-slide density."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.typing import NDArray

from nucleiscope.pipeline.color.stain import STAIN_OD_VECTORS
from nucleiscope.pipeline.common.errors import ConfigError
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.extraction.extract import extract_slide
from nucleiscope.pipeline.extraction.identity import run_identity
from nucleiscope.pipeline.measure.lymphocytes import (
    DEFAULT_RULE,
    LymphocyteRule,
    hematoxylin_reference,
    lymphocyte_like,
    with_flag,
)
from nucleiscope.pipeline.measure.morphometrics import measure_nuclei
from nucleiscope.pipeline.measure.records import consolidate
from nucleiscope.pipeline.segmentation.registry import make_segmenter
from tests.synthetic import write_synthetic_slide

UM_PER_PX = 0.25
BACKGROUND = (0.05, 0.3)  # haematoxylin, eosin OD of the stroma


def colour(h: float, e: float, strength: float = 1.0) -> NDArray[np.uint8]:
    """RGB of a pixel holding ``h`` and ``e`` OD of the Ruifrok-Johnston stains (times ``strength``)."""
    od = strength * (h * STAIN_OD_VECTORS[0] + e * STAIN_OD_VECTORS[1])
    return np.asarray(np.clip(np.rint(256.0 * 10.0 ** (-od) - 1.0), 0, 255), np.uint8)


def disc(shape: tuple[int, int], cy: float, cx: float, a_um: float, b_um: float | None = None) -> NDArray[np.bool_]:
    yy, xx = np.mgrid[: shape[0], : shape[1]] + 0.5
    a, b = a_um / UM_PER_PX, (b_um or a_um) / UM_PER_PX
    return np.asarray(((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0)


#: label -> (what it is, expected flag). Every object but one fails exactly one criterion.
OBJECTS = {
    1: ("small dark round: a lymphocyte", True),
    2: ("too small (6.2 µm²)", False),
    3: ("too large (63.6 µm²)", False),
    4: ("elongated (axes 2:1)", False),
    5: ("pale", False),
    6: ("uneven: half very dark, half pale", False),
    7: ("notched (solidity < 0.9)", False),
    8: ("flagged as an artefact", False),
}


def scene(strength: float = 1.0) -> tuple[NDArray[np.int32], NDArray[np.uint8]]:
    """Eight objects on stroma, 0.25 µm/px; ``strength`` scales every OD (a stronger stain)."""
    shape = (240, 320)
    labels = np.zeros(shape, np.int32)
    rgb = np.empty((*shape, 3), np.uint8)
    rgb[:] = colour(*BACKGROUND, strength)
    dark, pale = colour(0.8, 0.1, strength), colour(0.35, 0.1, strength)
    masks = {
        1: disc(shape, 40, 40, 2.5), 2: disc(shape, 40, 120, 1.4), 3: disc(shape, 50, 220, 4.5),
        4: disc(shape, 130, 40, 3.2, 1.6), 5: disc(shape, 130, 120, 2.5), 6: disc(shape, 130, 200, 2.5),
        7: disc(shape, 200, 40, 3.0), 8: disc(shape, 200, 120, 2.5),
    }
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    masks[7] &= ~((np.abs(yy + 0.5 - 200) < 3) & (xx + 0.5 > 40))  # a slot from the centre to the edge
    for label, mask in masks.items():
        labels[mask] = label
        rgb[mask] = pale if label == 5 else dark
    rgb[masks[6] & (xx % 2 == 0)] = colour(1.2, 0.1, strength)
    rgb[masks[6] & (xx % 2 == 1)] = colour(0.3, 0.1, strength)
    return labels, rgb


def measured(strength: float = 1.0) -> tuple[object, float]:
    labels, rgb = scene(strength)
    table = measure_nuclei(labels, rgb, mpp=UM_PER_PX, origin_px=(0.0, 0.0), scale=1.0, slide_id="s",
                           flags={8: "eosinophilic"})  # fmt: skip
    reference = hematoxylin_reference(rgb)
    assert reference is not None
    return table, reference


def test_drawn_nuclei_are_flagged_exactly_as_the_rule_says() -> None:
    table, _ = measured()
    reference = 0.4  # dark objects: 0.8 / 0.4 = 2.0 >= 1.65; pale: 0.35 / 0.4 = 0.875
    flags = lymphocyte_like(table, reference, DEFAULT_RULE).to_pylist()
    got = dict(zip(table.column("nucleus_id").to_pylist(), flags))
    assert got == {label: want for label, (_, want) in OBJECTS.items()}, {OBJECTS[k][0]: v for k, v in got.items()}
    rows = table.to_pandas().set_index("nucleus_id")
    # each refused object fails the criterion it was drawn for, and the lymphocyte passes them all
    assert 9.5 <= rows.area_um2[1] <= 44 and rows.circularity[1] > 0.9 and rows.eccentricity[1] < 0.3
    assert rows.area_um2[2] < 9.5 and rows.area_um2[3] > 44 and rows.eccentricity[4] > 0.75
    assert rows.hematoxylin_od_mean[5] / reference < 1.65 <= rows.hematoxylin_od_mean[6] / reference
    assert rows.hematoxylin_od_std[6] / rows.hematoxylin_od_mean[6] > 0.45 > \
        rows.hematoxylin_od_std[1] / rows.hematoxylin_od_mean[1]
    assert rows.solidity[7] < 0.9 and 9.5 <= rows.area_um2[7] <= 44
    np.testing.assert_allclose(rows.hematoxylin_od_mean[1], 0.8, atol=0.01)
    # darkness is the ratio to the reference: the lymphocyte stops being dark just past 1.65
    h = rows.hematoxylin_od_mean[1]
    assert lymphocyte_like(table, h / 1.65 * 0.999, DEFAULT_RULE).to_pylist()[0] is True
    assert lymphocyte_like(table, h / 1.65 * 1.001, DEFAULT_RULE).to_pylist()[0] is False
    loose = LymphocyteRule(min_area_um2=5.0, max_area_um2=70.0)
    assert lymphocyte_like(table, reference, loose).to_pylist()[:3] == [True, True, True]


def test_a_stronger_stain_moves_the_reference_not_the_flags() -> None:
    weak, ref_weak = measured(1.0)
    strong, ref_strong = measured(1.6)
    assert ref_strong / ref_weak == pytest.approx(1.6, rel=0.03)
    rule = replace(DEFAULT_RULE, min_darkness=1.2)
    flags = lymphocyte_like(weak, ref_weak, rule).to_pylist()
    assert flags == lymphocyte_like(strong, ref_strong, rule).to_pylist()
    assert flags[0] is True and flags[4] is False  # the dark disc is, the pale one is not
    # an absolute threshold fixed on the weak stain would call the strong stain's pale disc dark
    absolute = strong.column("hematoxylin_od_mean").to_numpy()[4]
    assert absolute >= rule.min_darkness * ref_weak


def test_the_reference_ignores_glass_and_needs_tissue() -> None:
    _, rgb = scene()
    with_glass = np.full((480, 320, 3), 255, np.uint8)
    with_glass[:240] = rgb
    assert hematoxylin_reference(with_glass) == hematoxylin_reference(rgb)
    assert hematoxylin_reference(np.full((200, 200, 3), 255, np.uint8)) is None
    assert hematoxylin_reference(rgb[:40, :40]) is None  # 1600 tissue pixels: too few
    table, _ = measured()
    assert lymphocyte_like(table, None, DEFAULT_RULE).null_count == table.num_rows
    assert with_flag(table, 0.4, DEFAULT_RULE).column("lymphocyte_like").to_pylist()[0] is True


@pytest.mark.parametrize("kwargs", [
    {"min_area_um2": 50.0}, {"max_area_um2": -1.0}, {"min_circularity": 1.5}, {"max_od_cv": float("nan")},
    {"min_darkness": True},
])  # fmt: skip
def test_bad_thresholds_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        LymphocyteRule(**kwargs)
    with pytest.raises(ConfigError):
        ExtractConfig(lymphocytes={"min_area_um2": 1.0})  # type: ignore[arg-type]


def test_the_rule_is_part_of_the_run_identity() -> None:
    classical = make_segmenter("classical")
    default = run_identity(ExtractConfig(), classical)
    assert run_identity(ExtractConfig(lymphocytes=LymphocyteRule()), classical) == default
    assert run_identity(ExtractConfig(lymphocytes=LymphocyteRule(min_darkness=1.5)), classical) != default
    assert run_identity(ExtractConfig(lymphocytes=None), classical) != default


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Small round nuclei (equivalent radius 2.2-2.8 µm: 15-25 µm²) and large ones (4.5-5 µm: 64-79 µm²)."""
    root = tmp_path_factory.mktemp("lymph")
    common = {"width_px": 900, "height_px": 800, "mpp": UM_PER_PX, "tile_px": 256, "min_level_px": 256,
              "ellipse_ratio": (1.0, 1.15)}  # fmt: skip
    small = write_synthetic_slide(root / "small.svs", nucleus_radii_um=(2.2, 2.8), spacing_um=14.0, seed=1, **common)
    large = write_synthetic_slide(root / "large.svs", nucleus_radii_um=(4.5, 5.0), spacing_um=20.0, seed=2, **common)
    return {"small": small.path, "large": large.path}


def extract(slides: dict[str, str], out: Path, config: ExtractConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    for slide_id, path in slides.items():
        extract_slide(path, str(out), config, make_segmenter("classical"), slide_id=slide_id)
    consolidate(str(out))
    return pd.read_parquet(out / "nuclei"), pd.read_parquet(out / "slides.parquet").set_index("slide_id")


def test_extraction_flags_small_round_dark_nuclei_and_counts_them(two_slides: dict[str, str], tmp_path: Path) -> None:
    nuclei, slides = extract(two_slides, tmp_path, ExtractConfig(tile_px=256, seg_mpp=0.25))
    nuclei["slide_id"] = nuclei["slide_id"].astype(str)
    assert nuclei["lymphocyte_like"].notna().all()
    by_slide = nuclei.groupby("slide_id")["lymphocyte_like"]
    # every drawn nucleus of the small slide is small, round and as dark as the slide's nuclei get
    assert by_slide.mean()["small"] == 1.0 and by_slide.sum()["large"] == 0
    for slide_id, rows in nuclei.groupby("slide_id"):
        row = slides.loc[slide_id]
        assert row.hematoxylin_reference_od > 0
        assert row.lymphocyte_like_count == rows["lymphocyte_like"].sum()
        assert row.lymphocyte_like_per_mm2 == pytest.approx(row.lymphocyte_like_count / row.tissue_area_mm2)
        darkness = rows["hematoxylin_od_mean"] / row.hematoxylin_reference_od
        assert darkness.min() > DEFAULT_RULE.min_darkness
    assert slides.loc["small", "lymphocyte_like_count"] > 100


def test_extraction_without_the_rule_leaves_the_column_null(two_slides: dict[str, str], tmp_path: Path) -> None:
    nuclei, slides = extract({"small": two_slides["small"]}, tmp_path,
                             ExtractConfig(tile_px=256, seg_mpp=0.25, lymphocytes=None))  # fmt: skip
    assert len(nuclei) > 100 and nuclei["lymphocyte_like"].isna().all()
    assert pd.isna(slides.loc["small", "lymphocyte_like_count"])
    assert pd.isna(slides.loc["small", "hematoxylin_reference_od"])
