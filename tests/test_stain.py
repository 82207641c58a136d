"""Optical density and colour deconvolution on pure colours."""

from __future__ import annotations

import numpy as np
import pytest

from nucleiscope.pipeline.color.stain import STAIN_OD_VECTORS, hematoxylin_od, rgb_to_hed_od, rgb_to_od


def _pixel(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.array([[rgb]], dtype=np.uint8)


def _stain_colour(stain: int, amount: float) -> np.ndarray:
    """The uint8 RGB of ``amount`` OD of one stain, by inverting I = 256 * 10^-od - 1."""
    od = amount * STAIN_OD_VECTORS[stain]
    rgb = np.rint(256.0 * 10.0 ** (-od) - 1.0)
    return np.asarray(rgb, dtype=np.uint8).reshape(1, 1, 3)


def test_od_of_white_and_black() -> None:
    od = rgb_to_od(np.array([[[255, 255, 255], [0, 0, 0]]], dtype=np.uint8))
    assert od.dtype == np.float32 and od.shape == (1, 2, 3)
    assert np.all(od[0, 0] == 0.0)
    np.testing.assert_allclose(od[0, 1], np.log10(256.0), rtol=1e-6)


def test_white_has_no_stain() -> None:
    hed = rgb_to_hed_od(_pixel((255, 255, 255)))
    assert hed.dtype == np.float32
    assert np.all(hed == 0.0)
    assert hematoxylin_od(_pixel((255, 255, 255)))[0, 0] == 0.0


@pytest.mark.parametrize("stain", [0, 1, 2])
def test_pure_stain_is_recovered(stain: int) -> None:
    amount = 0.6
    hed = rgb_to_hed_od(_stain_colour(stain, amount))[0, 0]
    expected = np.zeros(3)
    expected[stain] = amount
    np.testing.assert_allclose(hed, expected, atol=0.02)


def test_hematoxylin_od_matches_first_channel_and_is_non_negative() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    hed = rgb_to_hed_od(rgb)
    h = hematoxylin_od(rgb)
    assert h.shape == (40, 30) and h.dtype == np.float32
    np.testing.assert_allclose(h, hed[..., 0], atol=1e-6)
    assert hed.min() >= 0.0


def test_purple_nucleus_has_more_hematoxylin_than_pink_stroma() -> None:
    purple = rgb_to_hed_od(_pixel((90, 50, 140)))[0, 0]
    pink = rgb_to_hed_od(_pixel((235, 160, 200)))[0, 0]
    assert purple[0] > 0.4 > pink[0]
    assert pink[1] > pink[0]


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)]
)
def test_rejects_non_rgb(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        rgb_to_hed_od(bad)
    with pytest.raises(ValueError):
        hematoxylin_od(bad)
