"""Objects that are not nuclei: synthetic stains of known colour, MoNuSeg nuclei, a slide end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage.draw import disk

from nucleiscope.pipeline.color.stain import STAIN_OD_VECTORS
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.extraction.extract import extract_slide
from nucleiscope.pipeline.measure.artefacts import (
    DEFAULT_RULES,
    EOSIN_HUE_DEG,
    classify_objects,
    remove_dropped,
    stain_angles,
)
from nucleiscope.pipeline.measure.morphometrics import measure_nuclei
from nucleiscope.pipeline.measure.outputs import consolidate
from nucleiscope.pipeline.segmentation.registry import make_segmenter

H, E, DAB = STAIN_OD_VECTORS
UM_PER_PX = 0.5


def rgb_of_od(od: np.ndarray) -> np.ndarray:
    """uint8 RGB whose optical density -log10((I + 1) / 256) is ``od``."""
    return np.clip(np.round(256.0 * 10.0 ** (-np.asarray(od, float)) - 1.0), 0, 255).astype(np.uint8)


#: Disc colours: a nucleus (haematoxylin with a little eosin), teal and black marking ink,
#: eosin-pink debris, brown (DAB-like) pigment.
COLOURS = {
    "nucleus": rgb_of_od(0.8 * H + 0.1 * E),
    "teal_ink": np.array([40, 150, 150], np.uint8),
    "black_ink": np.array([35, 35, 35], np.uint8),
    "eosin": rgb_of_od(0.05 * H + 0.7 * E),
    "brown": rgb_of_od(0.7 * DAB),
}
EXPECTED = {"nucleus": "", "teal_ink": "ink", "black_ink": "ink", "eosin": "eosinophilic", "brown": "pigment"}


def tile_with_discs(background_od: np.ndarray, radius: int = 10) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One disc per colour on a uniform background; label k + 1 is disc k of ``COLOURS``."""
    names = list(COLOURS)
    labels = np.zeros((60, 60 * len(names)), np.int32)
    rgb = np.empty(labels.shape + (3,), np.uint8)
    rgb[:] = rgb_of_od(background_od)
    for k, name in enumerate(names):
        rr, cc = disk((30, 60 * k + 30), radius, shape=labels.shape)
        labels[rr, cc] = k + 1
        rgb[rr, cc] = COLOURS[name]
    return labels, rgb, names


def test_stain_angles_of_the_reference_vectors() -> None:
    hue, elevation, neutral = stain_angles(np.stack([H, E, DAB, np.ones(3)]))
    assert hue[0] == pytest.approx(0.0, abs=1e-9) and elevation[0] == pytest.approx(0.0, abs=1e-9)
    assert hue[1] == pytest.approx(EOSIN_HUE_DEG) and EOSIN_HUE_DEG == pytest.approx(39.4, abs=0.1)
    assert elevation[1] == pytest.approx(0.0, abs=1e-9)
    assert elevation[2] > DEFAULT_RULES.pigment_elevation_deg + 5  # DAB: ~37°
    assert neutral[3] == pytest.approx(0.0, abs=1e-6)
    # Every H+E mixture lies in the plane between 0° and the eosin hue.
    mix = np.stack([a * H + (1 - a) * E for a in np.linspace(0.05, 0.95, 10)])
    hue, elevation, _ = stain_angles(mix)
    assert np.all((hue > 0) & (hue < EOSIN_HUE_DEG)) and np.allclose(elevation, 0.0, atol=1e-9)


def test_discs_on_stroma_decided_by_colour() -> None:
    labels, rgb, names = tile_with_discs(0.15 * E)  # pale eosinophilic stroma, not glass
    calls = classify_objects(labels, rgb, UM_PER_PX)
    assert calls.ids.tolist() == list(range(1, len(names) + 1))
    assert dict(zip(names, calls.reason.tolist())) == EXPECTED
    assert calls.dropped_counts() == {"ink": 2}
    kept = remove_dropped(labels, calls)
    assert sorted(np.unique(kept).tolist()) == [0, 1, 4, 5]  # nucleus, eosin, brown
    table = measure_nuclei(kept, rgb, mpp=UM_PER_PX, origin_px=(0, 0), scale=1.0, slide_id="s",
                           flags=calls.flags())
    assert table.column("nucleus_id").to_pylist() == [1, 4, 5]
    assert table.column("artefact").to_pylist() == [None, "eosinophilic", "pigment"]


def test_nucleus_on_glass_is_detached_and_in_a_dark_mass_low_contrast() -> None:
    labels, rgb, names = tile_with_discs(np.zeros(3))  # white glass around every disc
    calls = dict(zip(names, classify_objects(labels, rgb, UM_PER_PX).reason.tolist()))
    assert calls["nucleus"] == "detached"
    assert calls["teal_ink"] == "ink"  # ink is dropped wherever it lies
    labels, rgb, names = tile_with_discs(0.75 * H + 0.1 * E)  # as dark as the nucleus itself
    calls = dict(zip(names, classify_objects(labels, rgb, UM_PER_PX).reason.tolist()))
    assert calls["nucleus"] == "low_contrast"


def test_speckled_ink_over_a_nucleus() -> None:
    rng = np.random.default_rng(3)
    labels, rgb, _ = tile_with_discs(0.15 * E)
    inside = np.argwhere(labels == 1)
    for share, expected in ((0.05, ""), (0.28, "ink")):
        speckled = rgb.copy()
        picks = inside[rng.random(len(inside)) < share]
        speckled[picks[:, 0], picks[:, 1]] = COLOURS["teal_ink"]
        calls = classify_objects(labels, speckled, UM_PER_PX)
        assert calls.reason[0] == expected, (share, calls.ink_pixel_fraction[0], calls.hue_deg[0])
        # The mean colour stays within the haematoxylin range: the share of ink pixels decides.
        assert calls.hue_deg[0] > DEFAULT_RULES.ink_hue_deg


def test_labels_without_objects_and_bad_inputs() -> None:
    calls = classify_objects(np.zeros((8, 8), np.int32), np.zeros((8, 8, 3), np.uint8), 0.5)
    assert calls.ids.size == 0 and calls.counts() == {}
    with pytest.raises(ValueError):
        classify_objects(np.zeros((8, 8), np.int32), np.zeros((8, 9, 3), np.uint8), 0.5)
    with pytest.raises(ValueError):
        classify_objects(np.zeros((8, 8), np.int32), np.zeros((8, 8, 3), np.uint8), 0.0)


@pytest.mark.shared
def test_monuseg_nuclei_are_not_dropped(monuseg_dir: Path) -> None:
    """Annotated nuclei of 30 sites: at most 0.1 % may be dropped (3 of 16,959 are: in
    anthracotic pigment of one lung image), and at most 3 % flagged."""
    from PIL import Image

    total, dropped, flagged = 0, 0, 0
    for image in sorted((monuseg_dir / "images").glob("*.tif")):
        rgb = tifffile.imread(image)[..., :3]
        labels = np.asarray(Image.open(monuseg_dir / "labels" / f"{image.stem}.png")).astype(np.int32)
        calls = classify_objects(labels, rgb, 0.25)
        total += calls.ids.size
        dropped += int(calls.dropped.sum())
        flagged += len(calls.flags())
    assert total > 10_000
    assert dropped <= 0.001 * total
    assert flagged <= 0.03 * total


def write_ink_slide(path: Path, mpp: float = 0.5) -> tuple[int, int]:
    """A one-level tiled TIFF: pale stroma with haematoxylin nuclei and teal ink blots."""
    rgb = np.empty((1024, 1024, 3), np.uint8)
    rgb[:] = rgb_of_od(0.2 * E + 0.03 * H)
    rgb[:, :64] = rgb[:64] = 255  # a glass border
    n_nuclei = n_ink = 0
    for row in range(8):
        for col in range(8):
            ink = (row + col) % 3 == 0
            rr, cc = disk((160 + 110 * row, 160 + 110 * col), 8, shape=rgb.shape[:2])
            rgb[rr, cc] = COLOURS["teal_ink"] if ink else COLOURS["nucleus"]
            n_ink, n_nuclei = n_ink + ink, n_nuclei + (not ink)
    rgb = rgb[:1024, :1024]
    description = f"Aperio Image Library v12.0.0\n1024x1024 (256x256) |AppMag = 20|MPP = {mpp:.6f}"
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", description=description)
    return n_nuclei, n_ink


@pytest.mark.parametrize("artefacts", [True, False])
def test_extract_drops_ink_and_counts_it(tmp_path: Path, artefacts: bool) -> None:
    n_nuclei, n_ink = write_ink_slide(tmp_path / "ink.svs")
    cfg = ExtractConfig(segmenter="classical", artefacts=artefacts)
    record = extract_slide(str(tmp_path / "ink.svs"), str(tmp_path / "out"), cfg, make_segmenter("classical"))
    consolidate(str(tmp_path / "out"))
    nuclei = pd.read_parquet(tmp_path / "out" / "nuclei")
    slides = pd.read_parquet(tmp_path / "out" / "slides.parquet")
    if artefacts:
        assert (record["nuclei_count"], record["artefacts_dropped"]) == (n_nuclei, n_ink)
    else:
        assert (record["nuclei_count"], record["artefacts_dropped"]) == (n_nuclei + n_ink, 0)
    assert len(nuclei) == record["nuclei_count"]
    assert slides["artefacts_dropped"].tolist() == [record["artefacts_dropped"]]
    assert record["artefacts_flagged"] == int(nuclei["artefact"].notna().sum()) == 0
