"""Network F and G, dihedral helpers, BN freezing and the safetensors format."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nucleiscope.pipeline.common.errors import ModelError
from nucleiscope.pipeline.networks.attention_net import (
    TRANSFORMS,
    AttentionNet,
    ScaleClassifier,
    dihedral,
    dihedral_inverse,
    frozen_bn_stats,
    load_weights,
    read_metadata,
    receptive_field_px,
    save_weights,
)


def test_attention_net_shape_parameters_and_receptive_field() -> None:
    net = AttentionNet()
    n_params = sum(p.numel() for p in net.parameters())
    assert 440_000 < n_params < 455_000  # method.md: about 0.45 M
    assert receptive_field_px(net) == 167
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 3, 24, 36))
    assert out.a.shape == out.z.shape == (2, 1, 24, 36)
    assert float(out.a.min()) >= 0.0 and float(out.a.max()) <= 1.0


def test_receptive_field_matches_gradient_support() -> None:
    torch.manual_seed(0)
    net = AttentionNet(width=8).eval()
    rf = receptive_field_px(net)
    x = torch.randn(1, 3, rf + 40, rf + 40, requires_grad=True)
    c = (rf + 40) // 2
    net.logits(x)[0, 0, c, c].backward()
    assert x.grad is not None
    rows = torch.nonzero(x.grad.abs().sum(dim=(0, 1)).sum(dim=1) > 0)
    assert int(rows.max() - rows.min()) + 1 == rf


def test_calibrated_sigmoid_turns_on_about_p_of_pixels() -> None:
    torch.manual_seed(0)
    net = AttentionNet(width=8, sparsity=0.07).train()
    out = net(torch.randn(4, 3, 48, 48))
    share = float((out.z > out.tau).float().mean())
    assert abs(share - 0.07) < 0.01
    # a is 0.5 exactly at z == tau and the sharpness is r = 20
    assert torch.allclose(out.a, torch.sigmoid(20.0 * (out.z - out.tau)))


def test_tau_ema_rule_and_eval_threshold() -> None:
    torch.manual_seed(1)
    net = AttentionNet(width=8).train()
    t1 = net(torch.randn(2, 3, 32, 32)).tau
    assert float(net.tau_ema) == pytest.approx(float(t1))
    t2 = net(torch.randn(2, 3, 32, 32) * 2.0).tau
    assert float(net.tau_ema) == pytest.approx(0.9 * float(t1) + 0.1 * float(t2), rel=1e-6)
    before = float(net.tau_ema)
    net(torch.randn(2, 3, 32, 32), tau=0.0)  # explicit tau: no EMA update
    assert float(net.tau_ema) == before
    net.eval()
    x = torch.randn(1, 3, 32, 32)
    out = net(x)
    assert float(out.tau) == pytest.approx(before)
    assert torch.allclose(out.a, torch.sigmoid(20.0 * (out.z - before)))


def test_scale_classifier_resnet34_and_narrow() -> None:
    g = ScaleClassifier()
    n_params = sum(p.numel() for p in g.parameters())
    assert 21_250_000 < n_params < 21_320_000  # ResNet-34 trunk + Linear(512, 3)
    narrow = ScaleClassifier(width=8, blocks=(1, 1, 1, 1)).eval()
    assert narrow(torch.randn(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_dihedral_inverse_round_trip(name: str) -> None:
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).view(2, 1, 5, 7)
    y = dihedral(x, name)
    assert torch.equal(dihedral_inverse(y, name), x)
    if name != "identity":
        assert not torch.equal(y, x) or y.shape != x.shape


def test_dihedral_rejects_unknown() -> None:
    with pytest.raises(ValueError):
        dihedral(torch.zeros(1, 1, 2, 2), "rot45")


def test_frozen_bn_stats_leaves_running_statistics() -> None:
    net = AttentionNet(width=8).train()
    net(torch.randn(2, 3, 16, 16))
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    with torch.no_grad(), frozen_bn_stats(net):
        net(torch.randn(2, 3, 16, 16) * 5 + 3, tau=net.tau_ema)
    after = net.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    net(torch.randn(2, 3, 16, 16) * 5 + 3)
    assert not torch.equal(net.state_dict()["stem.1.running_mean"], before["stem.1.running_mean"])


def _trained_tiny(seed: int = 0) -> AttentionNet:
    torch.manual_seed(seed)
    net = AttentionNet(width=8, sparsity=0.1, dilations=(1, 2, 4)).train()
    for _ in range(3):
        net(torch.randn(2, 3, 24, 24))
    return net.eval()


def test_safetensors_round_trip(tmp_path: Path) -> None:
    net = _trained_tiny()
    path = tmp_path / "f.safetensors"
    save_weights(net, path, {"steps": "3", "note": "test"})
    meta = read_metadata(path)
    assert meta["steps"] == "3" and meta["arch"] == "attention_f"
    assert float(meta["tau_ema"]) == pytest.approx(float(net.tau_ema))
    assert float(meta["sparsity"]) == 0.1 and float(meta["sharpness"]) == 20.0
    loaded = load_weights(path)
    assert not loaded.training
    assert loaded.dilations == (1, 2, 4) and loaded.sparsity == 0.1
    assert float(loaded.tau_ema) == float(net.tau_ema)
    x = torch.randn(1, 3, 20, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x).a, net(x).a)
    assert path.read_bytes()[:8] != b"\x80\x04\x95"[:8]  # not a pickle


def test_metadata_cannot_override_architecture(tmp_path: Path) -> None:
    net = _trained_tiny()
    path = tmp_path / "f.safetensors"
    save_weights(net, path, {"width": "999"})
    assert load_weights(path).width == 8
    with pytest.raises(ModelError):
        save_weights(net, tmp_path / "g.safetensors", {"steps": 3})  # type: ignore[dict-item,unused-ignore]


def test_load_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_weights(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(ModelError) as info:
        load_weights(garbage)
    assert info.value.__cause__ is not None
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ModelError, match="no attention network"):
        load_weights(other)
    net = _trained_tiny()
    broken = tmp_path / "broken.safetensors"
    tensors = {k: v for k, v in net.state_dict().items() if k != "head.bias"}
    save_file(tensors, str(broken), metadata=net.arch_metadata())
    with pytest.raises(ModelError, match="do not match"):
        load_weights(broken)


def test_head_runs_in_float32_under_autocast() -> None:
    net = _trained_tiny()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = net(torch.randn(1, 3, 16, 16))
    assert out.z.dtype == torch.float32 and out.a.dtype == torch.float32
    assert math.isfinite(float(out.a.detach().sum()))
