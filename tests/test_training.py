"""Training core: config, scale sampler, losses, steps, checkpoints, the local attention runner."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from nucleiscope.jobs.cli import main
from nucleiscope.pipeline.color.normalize import IMAGENET_MEAN, IMAGENET_STD, hed_jitter
from nucleiscope.pipeline.common.errors import ConfigError, ModelError
from nucleiscope.pipeline.networks.attention_net import TRANSFORMS, dihedral, load_weights, read_metadata
from nucleiscope.pipeline.training.loop import (
    ScaleTileSampler,
    TrainConfig,
    build_state,
    equivariance_target,
    load_checkpoint,
    metrics_to_floats,
    save_checkpoint,
    scale_equivariance_loss,
    train_step,
    tv_loss,
)

TINY = dict(batch_size=6, crop_px=32, pad_min_px=0, f_width=8, f_dilations=(1, 2, 3, 5), g_width=8,
            g_blocks=(1, 1, 1, 1), stain_norm=False)  # fmt: skip


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def disc_image(seed: int, size: int = 256, mpp: float = 0.25, radius_um: float = 3.0) -> NDArray[np.uint8]:
    """Dark purple discs of a fixed physical radius on a pink background, with noise."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (235, 170, 205)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(40):
        cy, cx = rng.uniform(0, size, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (radius_um / mpp) ** 2] = (95, 60, 150)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x * std + mean) * 255.0).round()


@pytest.mark.parametrize(
    "bad",
    [dict(batch_size=1), dict(sparsity=0.0), dict(sparsity=1.5), dict(lr=-1.0), dict(betas=(0.9, 1.0)),
     dict(lr_drop_steps=(10, 5)), dict(max_white_frac=1.5), dict(crop_px=4), dict(hed_sigma=-0.1),
     dict(weight_tv=float("nan")), dict(f_dilations=())],
)  # fmt: skip
def test_config_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_sampler_scales_from_one_filter_and_padding() -> None:
    cfg = TrainConfig(**{**TINY, "pad_min_px": 64})
    rgb = np.random.default_rng(0).integers(0, 256, (200, 240, 3), dtype=np.uint8)
    sampler = ScaleTileSampler([rgb], 0.25, cfg)
    # label-major views: 10x (1.0 µm/px) 50x60 padded to 64, 20x 100x120, 40x untouched
    assert sampler.sizes.tolist() == [[64, 64], [100, 120], [200, 240]]
    assert torch.equal(sampler.pack[2, :200, :240], torch.from_numpy(rgb))
    with pytest.raises(ConfigError):
        ScaleTileSampler([rgb], 0.5, cfg)  # no 40x can be derived from a 20x source
    with pytest.raises(ConfigError):
        ScaleTileSampler([rgb[..., 0]], 0.25, cfg)


def test_sampler_batches_are_balanced_crops_of_the_source() -> None:
    cfg = TrainConfig(**{**TINY, "crop_px": 12, "hed_sigma": 0.0})
    rgb = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    sampler = ScaleTileSampler([rgb], 0.25, cfg)
    gen = torch.Generator().manual_seed(0)
    x, labels = sampler.sample(9, gen)
    assert x.shape == (9, 3, 12, 12) and x.dtype == torch.float32
    assert torch.bincount(labels, minlength=3).tolist() == [3, 3, 3]
    src = torch.from_numpy(rgb).permute(2, 0, 1).float()
    tiles = _unnormalize(x)
    eight = [*TRANSFORMS, "anti"]  # the sampler draws from the full dihedral group
    for tile in tiles[labels == 2]:
        found = False
        for oy in range(29):
            for ox in range(29):
                crop = src[:, oy : oy + 12, ox : ox + 12]
                for name in eight:
                    cand = dihedral(dihedral(crop, "transpose"), "rot180") if name == "anti" else dihedral(crop, name)
                    found = found or torch.equal(cand, tile)
        assert found


def test_white_tiles_are_rejected() -> None:
    rgb = np.full((128, 128, 3), 250, np.uint8)
    rgb[:, :32] = (120, 60, 140)  # a quarter tissue: ~10 % of random 40x crops pass
    base = {**TINY, "crop_px": 24}
    strict = ScaleTileSampler([rgb], 0.25, TrainConfig(**{**base, "max_white_frac": 0.1, "white_candidates": 32}))
    loose = ScaleTileSampler([rgb], 0.25, TrainConfig(**base))
    shares = []
    for sampler in (strict, loose):
        x, labels = sampler.sample(60, torch.Generator().manual_seed(0), augment=False)
        white = (_unnormalize(x).amin(dim=1) > 220).float().mean(dim=(1, 2))
        shares.append(float((white[labels == 2] <= 0.1).float().mean()))
    assert shares[0] >= 0.8 and shares[1] < 0.5, shares


def test_hed_jitter_keeps_white_and_changes_stain() -> None:
    x = torch.full((4, 3, 8, 8), 255.0)
    x[:, :, :4] = torch.tensor([120.0, 60.0, 140.0]).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(0)
    y = hed_jitter(x, 0.03, gen)
    assert torch.allclose(y[:, :, 4:], x[:, :, 4:], atol=1e-3)  # zero optical density stays white
    diff = (y[:, :, :4] - x[:, :, :4]).abs()
    assert 0.1 < float(diff.mean()) < 15.0
    assert torch.equal(hed_jitter(x, 0.0), x)


def test_tv_loss_value() -> None:
    a = torch.zeros(1, 1, 4, 4)
    a[..., :, 2:] = 1.0  # one vertical edge: 4 of 12 horizontal differences are 1
    assert float(tv_loss(a)) == pytest.approx(4 / 12)


def test_equivariance_target_keeps_bn_running_stats() -> None:
    state = build_state(TrainConfig(**TINY))
    x = torch.randn(6, 3, 32, 32)
    state.f(x)  # set tau_ema
    before = {k: v.clone() for k, v in state.f.state_dict().items()}
    target = equivariance_target(state.f, x * 3 + 1, "rot90")
    assert target.shape == (6, 1, 32, 32) and not target.requires_grad
    for key, value in state.f.state_dict().items():
        assert torch.equal(value, before[key]), key
    # a full step updates the running stats exactly once
    sampler = ScaleTileSampler([disc_image(0)], 0.25, state.config)
    count = int(state.f.stem[1].num_batches_tracked)
    train_step(state, *sampler.sample(6, state.generator))
    assert int(state.f.stem[1].num_batches_tracked) == count + 1


def test_scale_equivariance_without_40x_or_20x_is_finite() -> None:
    cfg = TrainConfig(**{**TINY, "weight_scale_equiv": 1.0})
    state = build_state(cfg)
    x = torch.randn(6, 3, 32, 32)
    state.f(x)
    a = state.f(x).a.detach()
    assert float(scale_equivariance_loss(state.f, x, a, torch.zeros(6, dtype=torch.long))) == 0.0
    only20 = scale_equivariance_loss(state.f, x, a, torch.ones(6, dtype=torch.long))
    assert math.isfinite(float(only20)) and float(only20) > 0
    metrics = metrics_to_floats(train_step(state, x, torch.zeros(6, dtype=torch.long)))
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["loss_scale_equiv"] == 0.0


def test_tiny_training_run_reduces_the_loss() -> None:
    cfg = TrainConfig(**{**TINY, "crop_px": 48, "lr": 1e-3, "seed": 3})
    sampler = ScaleTileSampler([disc_image(3), disc_image(103)], 0.25, cfg)
    state = build_state(cfg)
    history = [metrics_to_floats(train_step(state, *sampler.sample(6, state.generator))) for _ in range(40)]
    assert set(history[0]) == {"loss_scale", "loss_tv", "loss_equiv", "loss_scale_equiv", "loss_total",
                               "scale_acc", "tau", "tau_ema", "frac_on", "lr"}  # fmt: skip
    first = np.mean([h["loss_total"] for h in history[:8]])
    last = np.mean([h["loss_total"] for h in history[-8:]])
    assert last < first - 0.1, (first, last)
    assert all(abs(h["frac_on"] - 0.07) < 0.03 for h in history)
    assert state.step == 40


def test_lr_drops_at_configured_steps() -> None:
    cfg = TrainConfig(**{**TINY, "lr_drop_steps": (2,)})
    state = build_state(cfg)
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % 3
    lrs = [metrics_to_floats(train_step(state, x, y))["lr"] for _ in range(3)]
    assert lrs == pytest.approx([2e-4, 2e-4, 2e-5])


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    state = build_state(TrainConfig(**TINY))
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % 3
    train_step(state, x, y)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(state, path)
    resumed = load_checkpoint(path)
    assert resumed.step == 1 and resumed.config == state.config
    for key, value in state.f.state_dict().items():
        assert torch.equal(resumed.f.state_dict()[key], value), key
    assert len(resumed.optimizer.state) == len(state.optimizer.state)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError):
        load_checkpoint(garbage)
    with pytest.raises(ModelError):
        load_checkpoint(tmp_path / "missing.pt")


def _local_job(tmp_path: Path, sources: list[tuple[Path, float]], **top: object) -> Path:
    """A TOML job for the attention model's local runner (tiny networks, 3 steps)."""
    lines = ['task = "attention"', 'runner = "local"', f'output = "{tmp_path / "out"}"', "steps = 3",
             "log_every = 1", 'sampler = "resident"', *(f"{k} = {json.dumps(v)}" for k, v in top.items())]
    for path, mpp in sources:
        lines += ["[[sources]]", f'path = "{path}"', f"mpp = {mpp}"]
    lines += ["[train]", "batch_size = 6", "crop_px = 32", "pad_min_px = 48", "f_width = 4", "g_width = 4",
              "g_blocks = [1, 1, 1, 1]"]  # fmt: skip
    job = tmp_path / "job.toml"
    job.write_text("\n".join(lines) + "\n")
    return job


def test_local_attention_training_end_to_end(tmp_path: Path) -> None:
    """``nucleiscope train`` with runner = "local": the quick path, in this process."""
    from skimage.io import imsave

    images = tmp_path / "images"
    images.mkdir()
    imsave(images / "a.png", disc_image(5, size=72), check_contrast=False)
    imsave(images / "b.tif", disc_image(6, size=64), check_contrast=False)
    out = tmp_path / "out"
    job = _local_job(tmp_path, [(images / "a.png", 0.2), (images / "b.tif", 0.2)], maps=True)
    assert main(["train", "--config", str(job), "--device", "cpu"]) == 0
    meta = read_metadata(out / "attention_f.safetensors")
    assert meta["steps"] == "3" and meta["stain_norm"] == "true" and float(meta["sparsity"]) == 0.07
    assert float(meta["tau_ema"]) == pytest.approx(float(load_weights(out / "attention_f.safetensors").tau_ema))
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["step"]) for r in rows] == [1.0, 2.0, 3.0]
    summary = json.loads((out / "train.json").read_text())
    assert summary["steps"] == 3 and summary["device"] == "cpu" and summary["samples_per_s"] > 0
    maps = np.load(out / "maps.npz")
    assert sorted(maps.files) == ["a", "b"]
    assert maps["a"].shape == (72, 72) and maps["b"].shape == (64, 64) and maps["a"].dtype == np.uint8


def test_local_attention_training_reports_missing_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    job = _local_job(tmp_path, [(tmp_path / "empty" / "*.png", 0.25)])
    assert main(["train", "--config", str(job), "--device", "cpu"]) == 2


def test_local_attention_training_needs_no_ray(tmp_path: Path) -> None:
    """The local runner runs where Ray (and s3fs, OpenSlide) cannot even be imported."""
    import subprocess
    import sys

    from skimage.io import imsave

    imsave(tmp_path / "a.png", disc_image(5, size=72), check_contrast=False)
    job = _local_job(tmp_path, [(tmp_path / "a.png", 0.25)])
    code = (
        "import sys\n"
        "for m in ('ray', 's3fs', 'openslide'):\n"
        "    sys.modules[m] = None\n"
        "from nucleiscope.jobs.cli import main\n"
        "sys.exit(main(['train', '--config', sys.argv[1], '--device', 'cpu']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "attention_f.safetensors").exists()
