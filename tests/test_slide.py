"""Slide opening, validation and exact-geometry region reads."""

from __future__ import annotations

import math
import socket
import tracemalloc
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import tifffile
from numpy.typing import NDArray
from scipy import ndimage as ndi

from nucleiscope.pipeline.common.errors import (
    ConfigError,
    NotBrightfieldError,
    SlideError,
    SlideFormatError,
    SlideNotFoundError,
    SlideSizeError,
    UnknownResolutionError,
)
from nucleiscope.pipeline.slides.brightfield import brightfield_stats, check_brightfield
from nucleiscope.pipeline.slides.slide import Slide, slide_id_from_uri
from tests import synthetic
from tests.synthetic import SyntheticTruth


def _level_pixels(truth: SyntheticTruth, level: int) -> NDArray[np.uint8]:
    """Raw pixels of a level straight from the TIFF (SVS: page 1 is the thumbnail)."""
    return np.asarray(tifffile.imread(truth.path, key=0 if level == 0 else level + 1))


@pytest.fixture(scope="module")
def slide(synthetic_slide: SyntheticTruth) -> Slide:
    with Slide.open(synthetic_slide.path) as opened:
        yield opened


@pytest.fixture(scope="module")
def level0(synthetic_slide: SyntheticTruth) -> NDArray[np.uint8]:
    return _level_pixels(synthetic_slide, 0)


def test_info_matches_the_written_pyramid(slide: Slide, synthetic_slide: SyntheticTruth) -> None:
    info = slide.info
    assert (info.width_px, info.height_px) == (3000, 2500)
    assert info.mpp == pytest.approx(0.25)
    assert info.mpp_source == "metadata"
    assert info.level_dimensions == synthetic_slide.level_dimensions == ((3000, 2500), (750, 625), (188, 157))
    assert info.level_downsamples == (1.0, 4.0, 16.0)
    assert info.vendor == "aperio"
    assert info.objective_power == 40


def test_mpp_override_wins(synthetic_slide: SyntheticTruth) -> None:
    with Slide.open(synthetic_slide.path, mpp_override=0.5) as s:
        assert (s.info.mpp, s.info.mpp_source) == (0.5, "override")
    with pytest.raises(ConfigError):
        Slide.open(synthetic_slide.path, mpp_override=0.0)


def test_read_at_level0_resolution_returns_raw_pixels(slide: Slide, level0: NDArray[np.uint8]) -> None:
    region = slide.read_region(123, 457, 300, 200, 0.25)
    assert region.dtype == np.uint8 and region.shape == (200, 300, 3)
    np.testing.assert_array_equal(region, level0[457:657, 123:423])


def test_read_at_twice_the_pixel_size_is_the_2x2_block_mean(slide: Slide, level0: NDArray[np.uint8]) -> None:
    region = slide.read_region(100, 50, 250, 300, 0.5).astype(np.float64)
    blocks = level0[50:650, 100:600].reshape(300, 2, 250, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(region - blocks).max() <= 0.5 + 1e-6


def test_non_integer_downsampling_is_an_area_average(slide: Slide, level0: NDArray[np.uint8]) -> None:
    # 1.5 level-0 px per output px: the area average equals a 3x3 block mean of the 2x upsampled raster
    region = slide.read_region(200, 300, 160, 120, 0.375).astype(np.float64)
    up = level0[300:480, 200:440].repeat(2, axis=0).repeat(2, axis=1).astype(np.float64)
    expected = up.reshape(120, 3, 160, 3, 3).mean(axis=(1, 3))
    assert np.abs(region - expected).max() <= 0.5 + 1e-4


def test_subpixel_offsets_interpolate_linearly(slide: Slide, level0: NDArray[np.uint8]) -> None:
    raw = level0.astype(np.float64)
    half = slide.read_region(100.5, 200, 300, 100, 0.25).astype(np.float64)
    np.testing.assert_allclose(half, (raw[200:300, 100:400] + raw[200:300, 101:401]) / 2, atol=0.5 + 1e-4)
    quarter = slide.read_region(100, 200.25, 300, 100, 0.25).astype(np.float64)
    expected = 0.75 * raw[200:300, 100:400] + 0.25 * raw[201:301, 100:400]
    np.testing.assert_allclose(quarter, expected, atol=0.5 + 1e-4)


def test_outside_the_slide_is_white(slide: Slide, level0: NDArray[np.uint8]) -> None:
    region = slide.read_region(-40, -30, 100, 100, 0.25)
    assert (region[:30] == 255).all() and (region[:, :40] == 255).all()
    np.testing.assert_array_equal(region[30:, 40:], level0[:70, :60])
    beyond = slide.read_region(5000, 5000, 50, 40, 1.0)
    assert (beyond == 255).all()


def test_one_micron_per_pixel_reads_the_downsample_4_level(slide: Slide, synthetic_slide: SyntheticTruth) -> None:
    assert slide.best_level(1.0) == 1
    assert slide.best_level(0.999) == 0
    assert slide.best_level(4.0) == 2
    region = slide.read_region(400, 800, 200, 150, 1.0)
    np.testing.assert_array_equal(region, _level_pixels(synthetic_slide, 1)[200:350, 100:300])


def test_thumbnail_covers_the_whole_slide(slide: Slide) -> None:
    thumb = slide.thumbnail(8.0)
    assert thumb.shape == (math.ceil(2500 * 0.25 / 8), math.ceil(3000 * 0.25 / 8), 3)
    assert (thumb[0, 0] > 235).all()  # glass in the corner


def _measure(rgb: NDArray[np.uint8]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(area px, centroid (x, y)) of dark nuclei, in the continuous convention (centroid = index mean + 0.5)."""
    labels, n = ndi.label(rgb[..., 0] < 152)
    index = np.arange(1, n + 1)
    area = ndi.sum_labels(np.ones(labels.shape), labels, index)
    cy, cx = np.array(ndi.center_of_mass(np.ones(labels.shape), labels, index)).T + 0.5
    inner = (cx > 15) & (cy > 15) & (cx < rgb.shape[1] - 15) & (cy < rgb.shape[0] - 15)
    return area[inner], np.stack([cx[inner], cy[inner]], axis=1)


@pytest.mark.parametrize(("x_px", "y_px", "mpp"), [(333.3, 211.7, 0.5), (250.0, 250.0, 0.25), (517.25, 300.6, 0.6)])
def test_geometry_is_exact_enough_for_morphometrics(
    slide: Slide, synthetic_slide: SyntheticTruth, x_px: float, y_px: float, mpp: float
) -> None:
    scale = mpp / 0.25
    region = slide.read_region(x_px, y_px, 600, 500, mpp)
    area_px, centre = _measure(region)
    assert len(area_px) > 20
    true_xy = np.stack([(synthetic_slide.cx_px - x_px) / scale, (synthetic_slide.cy_px - y_px) / scale], axis=1)
    match = np.linalg.norm(centre[:, None, :] - true_xy[None, :, :], axis=2).argmin(axis=1)
    error = centre - true_xy[match]  # output pixels
    assert np.abs(error.mean(axis=0)).max() < 0.02  # no systematic shift
    assert np.linalg.norm(error, axis=1).max() < 0.3  # pixelation noise only
    rel = area_px / (synthetic_slide.area_um2()[match] / mpp**2) - 1
    assert abs(rel.mean()) < 0.01 and np.abs(rel).max() < 0.08


def test_upsampling_is_bilinear_at_output_pixel_centres(slide: Slide, level0: NDArray[np.uint8]) -> None:
    region = slide.read_region(100, 200, 120, 80, 0.125).astype(np.float64)
    rows = 200 + (np.arange(80) + 0.5) * 0.5 - 0.5  # level-0 index coordinates of output centres
    cols = 100 + (np.arange(120) + 0.5) * 0.5 - 0.5
    grid = np.meshgrid(rows, cols, indexing="ij")
    for c in range(3):
        expected = ndi.map_coordinates(level0[..., c].astype(np.float64), grid, order=1)
        assert np.abs(region[..., c] - expected).max() <= 0.5 + 1e-4


def test_memory_uri_reads_like_the_local_file(synthetic_slide: SyntheticTruth, slide: Slide) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/nucleiscope-test/slide.svs", Path(synthetic_slide.path).read_bytes())
    try:
        with Slide.open("memory://nucleiscope-test/slide.svs") as remote:
            assert remote.info.level_dimensions == slide.info.level_dimensions
            np.testing.assert_array_equal(remote.read_region(10.5, 20, 64, 48, 0.7), slide.read_region(10.5, 20, 64, 48, 0.7))
        with pytest.raises(SlideNotFoundError, match="memory://nucleiscope-test/other.svs"):
            Slide.open("memory://nucleiscope-test/other.svs")
    finally:
        fs.rm("/nucleiscope-test", recursive=True)


def test_s3_uri_with_storage_options(synthetic_slide: SyntheticTruth, slide: Slide) -> None:
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds)
        client.create_bucket(Bucket="slides")
        client.upload_file(synthetic_slide.path, "slides", "cohort/a.svs")
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        with Slide.open("s3://slides/cohort/a.svs", storage_options=options) as remote:
            assert remote.info.level_dimensions == slide.info.level_dimensions
            np.testing.assert_array_equal(remote.read_region(900, 700, 64, 64, 0.5), slide.read_region(900, 700, 64, 64, 0.5))
        with pytest.raises(SlideNotFoundError, match="s3://slides/cohort/b.svs"):
            Slide.open("s3://slides/cohort/b.svs", storage_options=options)
    finally:
        server.stop()


def test_big_reads_use_bounded_memory(big_single_level_slide: tuple[SyntheticTruth, int]) -> None:
    truth, _ = big_single_level_slide
    level_bytes = truth.width_px * truth.height_px * 3
    with Slide.open(truth.path) as s:
        for mpp in (8.0, 2.7):
            tracemalloc.start()
            try:
                thumb = s.thumbnail(mpp)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert thumb.shape[1] == math.ceil(8000 * 0.25 / mpp)
            assert peak - thumb.nbytes < level_bytes / 4, (mpp, peak)


# --- refusing bad inputs ---------------------------------------------------------------------

BAD = {
    "missing": SlideNotFoundError,
    "random_bytes": SlideFormatError,
    "text": SlideFormatError,
    "png": SlideFormatError,
    "truncated": SlideFormatError,
    "no_resolution": UnknownResolutionError,
    "absurd_size": SlideSizeError,
    "inconsistent_levels": SlideSizeError,
    "fluorescence": NotBrightfieldError,
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_inputs_raise_typed_errors_naming_the_file(bad_inputs: dict[str, Path], kind: str) -> None:
    path = str(bad_inputs[kind])
    with pytest.raises(BAD[kind]) as caught:
        with Slide.open(path) as s:  # a truncated file may only fail when its tiles are read
            s.read_region(0, 0, s.info.width_px, s.info.height_px, s.info.mpp)
    assert isinstance(caught.value, SlideError)
    assert caught.value.uri == path and path in str(caught.value)
    if kind in ("random_bytes", "text", "png", "truncated"):
        assert caught.value.__cause__ is not None


def _write_plain_tiff(path: Path, pixels: NDArray[Any], **kwargs: Any) -> str:
    tifffile.imwrite(path, pixels, tile=(256, 256), description="Aperio Image Library v1\n512x512 |MPP = 0.25",
                     metadata=None, **kwargs)
    return str(path)


def test_rgba_drops_alpha_and_ycbcr_jpeg_reads_as_rgb(tmp_path: Path, level0: NDArray[np.uint8]) -> None:
    rgb = np.ascontiguousarray(level0[:512, :512])
    rgba = np.concatenate([rgb, np.full((512, 512, 1), 255, np.uint8)], axis=2)
    path = _write_plain_tiff(tmp_path / "rgba.svs", rgba, photometric="rgb", extrasamples=["unassalpha"])
    with Slide.open(path) as s:
        np.testing.assert_array_equal(s.read_region(0, 0, 512, 512, 0.25), rgb)
    jpeg = _write_plain_tiff(tmp_path / "ycbcr.svs", rgb, photometric="rgb", compression="jpeg")
    with tifffile.TiffFile(jpeg) as tif:
        assert tif.pages.first.photometric == tifffile.PHOTOMETRIC.YCBCR
    with Slide.open(jpeg) as s:
        assert np.abs(s.read_region(0, 0, 512, 512, 0.25).astype(int) - rgb).mean() < 3


@pytest.mark.parametrize("kind", ["gray", "uint16"])
def test_non_rgb8_pixels_are_not_brightfield(tmp_path: Path, level0: NDArray[np.uint8], kind: str) -> None:
    rgb = np.ascontiguousarray(level0[:512, :512])
    if kind == "gray":
        path = _write_plain_tiff(tmp_path / "gray.svs", rgb[..., 0], photometric="minisblack")
    else:
        path = _write_plain_tiff(tmp_path / "u16.svs", rgb.astype(np.uint16) * 257, photometric="rgb")
    with pytest.raises(NotBrightfieldError, match="not 8-bit RGB"):
        Slide.open(path)


def test_unknown_resolution_message_says_what_to_do(bad_inputs: dict[str, Path]) -> None:
    with pytest.raises(UnknownResolutionError, match="resolution unknown.*--mpp"):
        Slide.open(str(bad_inputs["no_resolution"]))
    with Slide.open(str(bad_inputs["no_resolution"]), mpp_override=0.5) as s:
        assert s.info.mpp_source == "override"


def test_implausible_declared_resolution_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mpp100.svs"
    synthetic.write_synthetic_slide(path, width_px=256, height_px=256, mpp=100.0, spacing_um=2000.0,
                                    nucleus_radii_um=(300.0, 400.0), tile_px=256, max_levels=1)
    with pytest.raises(UnknownResolutionError, match="implausible"):
        Slide.open(str(path))


def test_fluorescence_opens_when_the_check_is_off(bad_inputs: dict[str, Path]) -> None:
    with Slide.open(str(bad_inputs["fluorescence"]), require_brightfield=False) as s:
        assert s.info.width_px == 1024


def test_brightfield_statistics() -> None:
    white = np.full((50, 50, 3), 243, np.uint8)
    assert brightfield_stats(white).is_brightfield
    padded = np.concatenate([np.zeros((200, 50, 3), np.uint8), white], axis=0)
    assert brightfield_stats(padded).is_brightfield  # black padding is ignored
    with pytest.raises(NotBrightfieldError, match="entirely black"):
        check_brightfield("x.tif", np.zeros((10, 10, 3), np.uint8))
    blue = np.zeros((10, 10, 3), np.uint8)
    blue[..., 2] = 200
    with pytest.raises(NotBrightfieldError, match="saturation"):
        check_brightfield("x.tif", blue)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/data/CMU-1.svs", "CMU-1"),
        ("s3://bucket/a/b/OS-1-detail.ome.tif", "OS-1-detail"),
        ("file:///x/My Slide (2).ndpi", "My_Slide_2"),
        ("memory://x/slide.v2.tiff", "slide.v2"),
        ("relative/noext", "noext"),
    ],
)
def test_slide_id_from_uri(uri: str, expected: str) -> None:
    assert slide_id_from_uri(uri) == expected


# --- real slides (../shared) ----------------------------------------------------------------


@pytest.mark.shared
def test_cmu_small_region(slides_dir: Path) -> None:
    with Slide.open(str(slides_dir / "CMU-1-Small-Region.svs")) as s:
        assert s.info.mpp == pytest.approx(0.499)
        assert (s.info.width_px, s.info.height_px) == (2220, 2967)
        region = s.read_region(1000, 1500, 256, 256, 0.5)
        assert region.shape == (256, 256, 3) and region.std() > 10


@pytest.mark.shared
def test_jpeg2000_slide_without_resolution(slides_dir: Path) -> None:
    path = str(slides_dir / "tcga-cr-7395-01a-01-ts1.svs")
    with pytest.raises(UnknownResolutionError, match="tcga-cr-7395"):
        Slide.open(path)
    with Slide.open(path, mpp_override=0.25) as s:
        assert s.info.level_downsamples == (1.0, 2.0)
        assert s.best_level(0.5) == 1
        region = s.read_region(1500, 1500, 256, 256, 0.5)
        assert region.std() > 10 and region.mean() < 230


@pytest.mark.shared
def test_ome_tiff_resolution(slides_dir: Path) -> None:
    with Slide.open(str(slides_dir / "OS-1-detail.ome.tif")) as s:
        assert s.info.mpp == pytest.approx(0.2271, abs=0.001)
        assert s.read_region(100, 100, 300, 300, 0.25).std() > 10


@pytest.mark.shared
def test_tiny_slide_reads_whole(slides_dir: Path) -> None:
    with Slide.open(str(slides_dir / "small_16x16.svs")) as s:
        assert (s.info.width_px, s.info.height_px) == (16, 16)
        whole = s.read_region(0, 0, 16, 16, s.info.mpp)
        assert whole.shape == (16, 16, 3)
        assert s.thumbnail(8.0).shape == (1, 1, 3)


@pytest.mark.shared
def test_fluorescence_ndpi_is_not_brightfield(slides_dir: Path) -> None:
    path = str(slides_dir / "test3-DAPI-2-387.ndpi")
    with pytest.raises(NotBrightfieldError, match="test3-DAPI-2-387"):
        Slide.open(path)


@pytest.mark.shared
def test_monuseg_images_look_brightfield(monuseg_dir: Path) -> None:
    for path in sorted((monuseg_dir / "images").glob("*.tif")):
        check_brightfield(str(path), np.asarray(tifffile.imread(path))[::4, ::4, :3])
