"""AttentionSegmenter and Reinhard normalisation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from nucleiscope.pipeline.color.normalize import (
    TARGET_LAB_MEAN,
    TARGET_LAB_STD,
    lab_to_rgb,
    reinhard_normalize,
    reinhard_stats,
    rgb_to_lab,
    to_normalized_tensor,
    white_level,
)
from nucleiscope.pipeline.common.errors import ModelError
from nucleiscope.pipeline.networks.attention_net import AttentionNet, save_weights
from nucleiscope.pipeline.segmentation.attention import AttentionSegmenter
from nucleiscope.pipeline.segmentation.protocol import Segmenter, SlideStats

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _he_image(seed: int, shape: tuple[int, int] = (48, 64)) -> NDArray[np.uint8]:
    rng = np.random.default_rng(seed)
    img = np.empty((*shape, 3), np.float32)
    img[:] = (230, 160, 200)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(6):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 30] = (90, 50, 140)
    img += rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _weights(tmp_path: Path, *, symmetric: bool = False, **meta: str) -> Path:
    torch.manual_seed(0)
    net = AttentionNet(width=8, dilations=(1, 2, 3), sparsity=0.2).train()
    if symmetric:
        _make_d4_symmetric(net)
    for _ in range(3):
        net(torch.randn(2, 3, 32, 32))
    path = tmp_path / "f.safetensors"
    save_weights(net.eval(), path, dict(meta))
    return path


def _make_d4_symmetric(net: AttentionNet) -> None:
    """Average each 3x3 kernel over the 8 symmetries of the square: F becomes D4-equivariant."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                w = m.weight
                group = [torch.rot90(v, k, dims=(-2, -1)) for v in (w, w.transpose(-1, -2)) for k in range(4)]
                m.weight.copy_(torch.stack(group).mean(dim=0))


def test_segmenter_protocol_and_identity(tmp_path: Path) -> None:
    path = _weights(tmp_path)
    seg = AttentionSegmenter(path, device="cpu")
    assert isinstance(seg, Segmenter)
    assert seg.name == "attention" and seg.mpp == 0.25
    assert seg.model_id == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    rf = 1 + 2 + 4 * (1 + 2 + 3)
    assert seg.receptive_field_px == rf
    assert seg.context_um == pytest.approx(rf / 2 * 0.25 + 12.0)
    with pytest.raises(ModelError):
        AttentionSegmenter(tmp_path / "missing.safetensors", device="cpu")


def test_segment_returns_int32_labels(tmp_path: Path) -> None:
    seg = AttentionSegmenter(_weights(tmp_path), device="cpu", tta=False)
    rgb = _he_image(0)
    stats = seg.fit(rgb, 0.25)
    assert set(stats.values) >= {"lab_mean_l", "lab_std_b", "white"}
    a = seg.attention_map(rgb, 0.25, stats)
    assert a.shape == (48, 64) and a.dtype == np.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    labels = seg.segment(rgb, 0.25, stats)
    assert labels.shape == (48, 64) and labels.dtype == np.int32
    assert labels.min() >= 0
    np.testing.assert_array_equal(labels > 0, labels.astype(bool))


def test_segment_batch_matches_single_tiles(tmp_path: Path) -> None:
    seg = AttentionSegmenter(_weights(tmp_path), device="cpu", max_batch=4)
    tiles = [_he_image(1), _he_image(2, (40, 40)), _he_image(3)]
    stats = seg.fit(tiles[0], 0.25)
    batch = seg.segment_batch(tiles, 0.25, stats)
    assert [b.shape for b in batch] == [(48, 64), (40, 40), (48, 64)]
    maps = seg.attention_maps(tiles, 0.25, stats)
    predicted = seg.predict_batch(tiles, 0.25, stats)
    for tile, labels, amap, evidence in zip(tiles, batch, maps, predicted):
        np.testing.assert_array_equal(labels, seg.segment(tile, 0.25, stats))
        np.testing.assert_allclose(amap, seg.attention_map(tile, 0.25, stats), atol=1e-5)
        np.testing.assert_allclose(evidence, seg.predict(tile, 0.25, stats), atol=1e-5)


def test_tta_of_an_equivariant_network_equals_the_plain_map(tmp_path: Path) -> None:
    path = _weights(tmp_path, symmetric=True)
    rgb = _he_image(4, (40, 52))  # not square and not symmetric
    plain = AttentionSegmenter(path, device="cpu", tta=False)
    tta = AttentionSegmenter(path, device="cpu", tta=True)
    stats = plain.fit(rgb, 0.25)
    a_plain = plain.attention_map(rgb, 0.25, stats)
    a_tta = tta.attention_map(rgb, 0.25, stats)
    assert float(np.abs(a_plain - 0.5).max()) > 0.1  # the map is not trivially constant
    np.testing.assert_allclose(a_tta, a_plain, atol=1e-4)
    # and it commutes with the image's own symmetries
    flipped = tta.attention_map(np.ascontiguousarray(rgb[:, ::-1]), 0.25, stats)
    np.testing.assert_allclose(flipped[:, ::-1], a_tta, atol=1e-4)


def test_slide_stats_make_tiles_consistent(tmp_path: Path) -> None:
    seg = AttentionSegmenter(_weights(tmp_path), device="cpu", tta=False)
    rgb = _he_image(5, (64, 64))
    stats = seg.fit(rgb, 0.25)
    whole = seg.attention_map(rgb, 0.25, stats)
    # a pixel far from the tile edge sees the same normalised context in both
    part = seg.attention_map(np.ascontiguousarray(rgb[:, :48]), 0.25, stats)
    np.testing.assert_allclose(part[20:44, 20:28], whole[20:44, 20:28], atol=1e-4)


def test_unnormalised_model_skips_reinhard(tmp_path: Path) -> None:
    seg = AttentionSegmenter(_weights(tmp_path, stain_norm="false"), device="cpu", tta=False)
    assert not seg.stain_norm
    rgb = _he_image(6)
    x = to_normalized_tensor(rgb)
    with torch.no_grad():
        expected = seg._net(x).a[0, 0].numpy()
    np.testing.assert_allclose(seg.attention_map(rgb, 0.25, SlideStats()), expected, atol=1e-5)


def test_lab_round_trip_and_reinhard_hits_target() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert int(np.abs(lab_to_rgb(rgb_to_lab(rgb)).astype(int) - rgb).max()) <= 1
    white = rgb_to_lab(np.array([[255.0, 255.0, 255.0]]))[0]
    np.testing.assert_allclose(white, [100.0, 0.0, 0.0], atol=0.05)
    tissue = _he_image(7, (96, 96))
    mean, std = reinhard_stats(tissue)
    assert mean.shape == std.shape == (3,)
    out = reinhard_normalize(tissue)
    assert out.dtype == np.uint8 and out.shape == tissue.shape
    lab = rgb_to_lab(out.astype(np.float32)).reshape(-1, 3)
    np.testing.assert_allclose(lab.mean(axis=0), TARGET_LAB_MEAN, atol=6.0)
    assert float(lab[:, 0].std()) == pytest.approx(TARGET_LAB_STD[0], rel=0.3)


def test_reinhard_with_slide_stats_is_pointwise() -> None:
    img = _he_image(8, (64, 64))
    stats, white = reinhard_stats(img), white_level(img)
    whole = reinhard_normalize(img, stats, white=white)
    part = reinhard_normalize(np.ascontiguousarray(img[10:30, 5:50]), stats, white=white)
    np.testing.assert_array_equal(part, whole[10:30, 5:50])
    assert not np.array_equal(reinhard_normalize(img[10:30, 5:50]), part)  # own stats differ


@pytest.mark.parametrize("tau_ema", [1e3, -1e3])
def test_slide_calibration_survives_a_drifted_threshold(tmp_path: Path, tau_ema: float) -> None:
    """A tau_ema far from the logits (a drifted training run) gives a dark or saturated map;
    the per-slide quantile calibration lights about ``sparsity`` of the tissue whatever it is,
    and Otsu's (the default) lights part of it."""
    from nucleiscope.pipeline.networks.attention_net import load_weights

    net = load_weights(_weights(tmp_path))
    net.tau_ema.fill_(tau_ema)
    drifted = tmp_path / "drifted.safetensors"
    save_weights(net.eval(), drifted, {})
    rgb = _he_image(3, (96, 96))
    ema = AttentionSegmenter(drifted, device="cpu", tta=False, calibration="ema")
    slide = AttentionSegmenter(drifted, device="cpu", tta=False, calibration="quantile")
    otsu = AttentionSegmenter(drifted, device="cpu", tta=False)
    on_ema = float((ema.attention_map(rgb, 0.25, ema.fit(rgb, 0.25)) > 0.5).mean())
    stats = slide.fit(rgb, 0.25)
    on_slide = float((slide.attention_map(rgb, 0.25, stats) > 0.5).mean())
    on_otsu = float((otsu.attention_map(rgb, 0.25, otsu.fit(rgb, 0.25)) > 0.5).mean())
    assert on_ema in (0.0, 1.0) and 0.02 < on_otsu < 0.98, (on_ema, on_otsu)
    assert "tau" in stats.values and abs(on_slide - net.sparsity) < 0.03, on_slide
    with pytest.raises(ValueError):
        AttentionSegmenter(drifted, calibration="median")
