"""The self-training stage: student network, pseudo-labels, training loop, post-processing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from nucleiscope.pipeline.common.errors import ConfigError, ModelError
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.networks.attention_net import AttentionNet, save_weights
from nucleiscope.pipeline.networks.student_net import StudentNet
from nucleiscope.pipeline.segmentation.instances import disk_footprint
from nucleiscope.pipeline.segmentation.student import (
    StudentPostprocess,
    core_outline_mask,
    load_student,
    probabilities_to_instances,
    save_student,
)
from nucleiscope.pipeline.training.pseudo_labels import (
    IGNORE_LABEL,
    PseudoLabelConfig,
    instance_targets,
    pseudo_instances,
    pseudo_targets,
    target_shares,
)
from nucleiscope.pipeline.training.self_training import (
    PseudoLabelSampler,
    StudentTrainConfig,
    student_loss,
    train_student,
)


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_unet_shapes_receptive_field_and_grid_equivariance() -> None:
    torch.manual_seed(0)
    net = StudentNet().eval()
    assert net.grid_px == 8
    assert net.forward_padded(torch.randn(1, 3, 37, 51)).shape == (1, 3, 37, 51)
    x = torch.randn(1, 3, 256, 256, requires_grad=True)
    net(x)[0, :, 128, 128].sum().backward()
    assert x.grad is not None
    rows, cols = torch.nonzero(x.grad[0].abs().sum(0), as_tuple=True)
    reach = max(128 - int(rows.min()), int(rows.max()) - 128, 128 - int(cols.min()), int(cols.max()) - 128)
    assert 2 * reach + 1 <= net.receptive_field_px()
    with torch.no_grad():
        img = torch.randn(1, 3, 400, 400)
        a = net(img[..., :320, :320])
        b = net(img[..., 8:328, 16:336])  # shifted by multiples of 8: identical beyond the receptive field
        assert torch.allclose(a[..., 120:200, 120:200], b[..., 112:192, 104:184], atol=1e-5)
        c = net(img[..., 4:324, 16:336])  # a shift off the grid changes the output
        assert not torch.allclose(a[..., 120:200, 120:200], c[..., 116:196, 104:184], atol=1e-3)


def test_tile_overlap_keeps_windows_on_the_unet_grid() -> None:
    cfg = ExtractConfig(tile_px=1000)
    tiles = cfg.tiles(context_px=101, grid_px=8)
    assert tiles.overlap_px % 2 == 0 and tiles.stride_px % 8 == 0 and tiles.overlap_px >= 202
    assert ExtractConfig(tile_px=1024).tiles(60).overlap_px == 120  # grid 1: unchanged
    with pytest.raises(ConfigError):
        ExtractConfig(tile_px=1001).tiles(60, grid_px=8)  # odd window, even overlap: no stride fits


def test_postprocess_splits_touching_nuclei_at_the_predicted_boundary() -> None:
    shape = (80, 120)
    left, right = _disc(shape, 40, 42, 16), _disc(shape, 40, 70, 16)
    probs = np.zeros((3, *shape), np.float32)
    probs[0] = 1.0
    nucleus = left | right
    probs[:, nucleus] = np.array([0.0, 0.1, 0.9])[:, None]
    cores = _disc(shape, 40, 42, 11) | _disc(shape, 40, 70, 11)
    probs[:, cores] = np.array([0.0, 0.95, 0.05])[:, None]
    lonely = _disc(shape, 12, 105, 8)  # a blob with no confident interior: one nucleus
    probs[:, lonely] = np.array([0.2, 0.3, 0.5])[:, None]
    labels = probabilities_to_instances(probs, 0.25)
    assert labels.max() == 3, np.unique(labels)
    assert labels[40, 42] != labels[40, 70] and labels[40, 42] > 0 and labels[40, 70] > 0
    assert labels[12, 105] > 0
    # Default "core" outlines: each core grown by the 0.5 µm (2 px) boundary band; the
    # core-less blob is kept whole. "mask" outlines: the whole P(i) + P(b) > 0.5 mask.
    grown = ndi.binary_dilation(cores, structure=disk_footprint(2)) & nucleus
    assert (labels > 0).sum() == pytest.approx(grown.sum() + lonely.sum(), rel=0.02)
    whole = probabilities_to_instances(probs, 0.25, StudentPostprocess(outline="mask"))
    assert whole.max() == 3 and (whole > 0).sum() == pytest.approx(nucleus.sum() + lonely.sum(), rel=0.02)
    tiny = np.zeros((3, *shape), np.float32)
    tiny[0] = 1.0
    tiny[:, _disc(shape, 40, 40, 2)] = np.array([0.0, 1.0, 0.0])[:, None]  # 13 px = 0.8 µm²: too small
    assert probabilities_to_instances(tiny, 0.25).max() == 0
    with pytest.raises(ConfigError):
        StudentPostprocess(fg_threshold=1.5)


def test_weights_round_trip_and_refuse_other_files(tmp_path: Path) -> None:
    net = StudentNet((4, 8)).eval()
    post = StudentPostprocess(seed_threshold=0.6)
    save_student(net, tmp_path / "s.safetensors", mpp=0.5, postprocess=post, metadata={"recipe": "x"})
    back, mpp, post_back, meta = load_student(tmp_path / "s.safetensors")
    assert mpp == 0.5 and post_back == post and meta["recipe"] == "x" and back.widths == (4, 8)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))
    save_weights(AttentionNet(width=4, dilations=(1,)), tmp_path / "f.safetensors")
    with pytest.raises(ModelError, match="no student"):
        load_student(tmp_path / "f.safetensors")
    with pytest.raises(ModelError, match="not found"):
        load_student(tmp_path / "missing.safetensors")


def test_consensus_pseudo_labels() -> None:
    shape = (120, 120)
    attention = np.zeros(shape, np.float32)
    h_mask = np.zeros(shape, bool)
    classical = np.zeros(shape, np.int32)
    confirmed = _disc(shape, 30, 30, 12)
    unconfirmed = _disc(shape, 30, 90, 12)
    teacher_only = _disc(shape, 90, 60, 10)
    for i, region in enumerate((confirmed, unconfirmed), start=1):
        h_mask |= region
        classical[region] = i
    attention[_disc(shape, 30, 30, 8)] = 0.9  # the teacher lights the core of the first one only
    attention[teacher_only] = 0.9
    target = pseudo_targets(attention, h_mask, 0.25, PseudoLabelConfig(recipe="consensus"), classical)
    assert target[30, 30] == 1 and target[30, 18] == 2  # interior, boundary of the confirmed nucleus
    assert target[30, 90] == IGNORE_LABEL  # classical alone: not trusted, not called background
    assert target[90, 60] == 1  # the teacher alone: kept
    assert target[5, 5] == 0 and target[60, 5] == 0
    shares = target_shares(target)
    assert sum(shares.values()) == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        pseudo_targets(attention, h_mask, 0.25, PseudoLabelConfig(recipe="consensus"))
    with pytest.raises(ConfigError):
        PseudoLabelConfig(recipe="magic")


def test_sampler_keeps_image_and_target_aligned() -> None:
    rng = np.random.default_rng(0)
    images, targets = [], []
    for _ in range(3):
        rgb = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
        images.append(rgb)
        targets.append((rgb[..., 0] > 127).astype(np.uint8) + (rgb[..., 1] > 200).astype(np.uint8))
    sampler = PseudoLabelSampler(images, targets, crop_px=32)
    gen = torch.Generator()
    gen.manual_seed(1)
    x, y = sampler.sample(64, gen)
    assert x.shape == (64, 3, 32, 32) and y.shape == (64, 32, 32)
    expected = (x[:, 0] > 127).long() + (x[:, 1] > 200).long()
    assert torch.equal(y, expected)
    with pytest.raises(ConfigError):
        PseudoLabelSampler(images, targets[:2], crop_px=32)


def test_student_learns_a_tiny_problem(torch_one_thread: None) -> None:
    """Dark discs on a pink ground, targets from the drawing: the loss falls and the
    trained student finds the discs."""
    rng = np.random.default_rng(3)
    images, targets = [], []
    for _ in range(4):
        rgb = np.full((96, 96, 3), (230, 170, 200), np.uint8)
        target = np.zeros((96, 96), np.uint8)
        for _ in range(6):
            cy, cx = rng.integers(12, 84, 2)
            disc = _disc((96, 96), cy, cx, 7)
            rgb[disc] = (90, 50, 140)
            target[disc & (target == 0)] = 1
        images.append(np.clip(rgb + rng.normal(0, 4, rgb.shape), 0, 255).astype(np.uint8))
        targets.append(target)
    config = StudentTrainConfig(widths=(8, 16), crop_px=48, batch_size=8, steps=60, lr=3e-3, hed_sigma=0.0)
    losses: list[float] = []
    net = train_student(PseudoLabelSampler(images, targets, 48), config, log=lambda s, v: losses.append(v["total"]),
                        log_every=10)  # fmt: skip
    assert losses[-1] < 0.5 * losses[0]
    from nucleiscope.pipeline.color.normalize import imagenet_normalize

    with torch.no_grad():
        x = imagenet_normalize(torch.from_numpy(images[0]).permute(2, 0, 1)[None])
        fg = net.forward_padded(x).softmax(1)[0, 1:].sum(0).numpy() > 0.5
    assert (fg == (targets[0] > 0)).mean() > 0.95


def test_loss_ignores_unlabelled_pixels() -> None:
    logits = torch.randn(2, 3, 8, 8)
    target = torch.full((2, 8, 8), IGNORE_LABEL, dtype=torch.long)
    losses = student_loss(logits, target, StudentTrainConfig())
    assert torch.isfinite(losses["total"]) and losses["ce"] == 0
    with pytest.raises(ConfigError):
        StudentTrainConfig(crop_px=30)


def test_train_command_runs_the_student_task(tmp_path: Path) -> None:
    """``nucleiscope train`` with task = "student": teacher maps, pseudo-labels, a student, scores."""
    import json

    from skimage.io import imsave

    from nucleiscope.jobs.cli import main
    from nucleiscope.pipeline.segmentation.student import load_student

    rng = np.random.default_rng(0)
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    for k in range(3):
        rgb = np.full((96, 96, 3), (236, 214, 226), np.uint8)  # pink (eosin) background
        truth = np.zeros((96, 96), np.uint16)
        for n, (cy, cx) in enumerate(rng.uniform(16, 80, size=(4, 2)), start=1):
            disc = _disc((96, 96), cy, cx, 6.0) & (truth == 0)
            rgb[disc] = (92, 60, 150)  # haematoxylin purple
            truth[disc] = n
        imsave(tmp_path / f"img{k}.png", rgb, check_contrast=False)
        imsave(labels_dir / f"img{k}.png", truth, check_contrast=False)
    job = tmp_path / "student.toml"
    job.write_text(
        f'task = "student"\noutput = "{tmp_path / "run"}"\nsteps = 3\n'
        f'[[sources]]\npath = "{tmp_path}/img*.png"\nmpp = 0.25\n'
        f'[self_training]\nholdout = 1\nworkers = 1\nlabels = "{labels_dir}"\n'
        '[pseudo_labels]\nrecipe = "consensus"\n'
        "[student]\nwidths = [4, 8]\ncrop_px = 32\nbatch_size = 2\n"
    )
    assert main(["train", "--config", str(job), "--device", "cpu"]) == 0
    run = tmp_path / "run"
    net, mpp, _, meta = load_student(run / "student.safetensors")
    assert net.widths == (4, 8) and mpp == 0.25 and meta["recipe"] == "consensus" and meta["steps"] == "3"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_images"] == ["img0", "img1"] and summary["holdout_images"] == ["img2"]
    assert set(summary["scores"]) == {"teacher", "classical", "student", "student_tta"}
    assert 0.0 <= summary["scores"]["classical"]["holdout"]["aji"] <= 1.0
    assert sorted(p.name for p in (run / "pred").iterdir()) == ["img0.tif", "img1.tif", "img2.tif"]


def test_core_outlines_keep_the_nuclei_and_shrink_only_their_outlines() -> None:
    """A boundary band predicted wider than the pseudo-labels' 0.5 µm: "core" outlines
    follow the cores grown by 0.5 µm; the same nuclei are found as with "mask" outlines."""
    shape = (64, 96)
    probs = np.zeros((3, *shape), np.float32)
    probs[0] = 1.0
    blob = _disc(shape, 32, 30, 14) | _disc(shape, 32, 62, 14)
    probs[:, blob] = np.array([0.1, 0.1, 0.8])[:, None]
    cores = _disc(shape, 32, 30, 8) | _disc(shape, 32, 62, 8)
    probs[:, cores] = np.array([0.0, 0.9, 0.1])[:, None]
    core_labels = probabilities_to_instances(probs, 0.25)
    mask_labels = probabilities_to_instances(probs, 0.25, StudentPostprocess(outline="mask"))
    assert core_labels.max() == mask_labels.max() == 2
    assert np.array_equal(core_labels > 0, ndi.binary_dilation(cores, structure=disk_footprint(2)))  # 0.5 µm = 2 px
    assert set(np.unique(mask_labels[core_labels > 0])) == {1, 2}
    assert np.array_equal(core_labels[core_labels > 0], mask_labels[core_labels > 0])
    mask = _disc(shape, 20, 20, 6) | _disc(shape, 20, 70, 6)
    kept = core_outline_mask(mask, _disc(shape, 20, 20, 2), 1)
    assert kept[20, 70] and kept[20, 20] and not kept[20, 25]  # no core: whole; with a core: cut
    with pytest.raises(ConfigError):
        StudentPostprocess(outline="hull")


def test_pseudo_instances_are_what_the_targets_are_drawn_from() -> None:
    shape = (80, 80)
    h_mask = _disc(shape, 40, 40, 12)
    classical = h_mask.astype(np.int32)
    attention = np.where(_disc(shape, 40, 40, 8), 0.9, 0.0).astype(np.float32)
    for recipe in ("classical", "consensus"):
        config = PseudoLabelConfig(recipe=recipe, ring_um=0.5)
        labels, background = pseudo_instances(attention, h_mask, 0.25, config, classical)
        assert labels.dtype == np.int32 and background.dtype == bool and labels[40, 40] == 1
        expected = instance_targets(labels, background, 0.25, config)
        assert np.array_equal(pseudo_targets(attention, h_mask, 0.25, config, classical), expected)
    no_ring = instance_targets(labels, background, 0.25, PseudoLabelConfig(recipe="consensus"))  # default: no ring
    assert no_ring[40, 53] == 0 and expected[40, 53] == IGNORE_LABEL  # 1 px outside the outline
