"""Self-training stage: teacher attention maps -> pseudo-labels -> student U-Net.

    python -m nucleiscope.jobs.self_train --images DIR --mpp 0.25 --teacher F.safetensors \
        --out DIR [--labels DIR] [--holdout N]

Writes ``student.safetensors``, ``metrics.csv`` (loss per log step), ``summary.json``
(config, pseudo-label shares, timings, and with ``--labels`` the AJI/Dice/PQ/F1 of the
teacher, the classical baseline and the student on the training and held-out images)
and ``pred/<stem>.tif`` (student instance labels). Labels are read only to score.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from ..pipeline.attention import AttentionSegmenter, apply_stain_stats, stain_stats
from ..pipeline.classical import ClassicalParams, ClassicalSegmenter
from ..pipeline.instances import split_instances
from ..pipeline.pseudo_labels import RECIPES, PseudoLabelConfig, pseudo_targets, target_shares
from ..pipeline.self_training import PseudoLabelSampler, StudentTrainConfig, student_probabilities, train_student
from ..pipeline.student import StudentPostprocess, probabilities_to_instances, save_student
from .quick_train import list_images, read_rgb, run_script
from .segment_images import write_labels

#: Worker processes must not inherit a CUDA context.
_SPAWN = multiprocessing.get_context("spawn")
_SCORED = ("teacher", "classical", "student", "student_tta")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="self_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="folder of RGB training images")
    p.add_argument("--mpp", type=float, default=0.25, help="µm/px of the images")
    p.add_argument("--teacher", required=True, help="attention F weights (.safetensors)")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", choices=RECIPES, default="attention_h")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seconds", type=float, default=None, help="wall-clock budget of the student's training")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop-px", type=int, default=256)
    p.add_argument("--widths", default="16,32,64,128")
    p.add_argument("--holdout", type=int, default=0, help="keep the last N images (sorted) out of training")
    p.add_argument("--labels", default=None, help="folder of <stem>.png instance labels, to score only")
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=8, help="processes for pseudo-labels and post-processing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-maps", action="store_true", help="also write teacher_maps.npz (uint8 round(a * 255))")
    return p


def _teacher_inputs(paths: Sequence[Path], teacher: str, mpp: float, device: torch.device) -> list[dict[str, Any]]:
    """Per image: raw RGB, stain-normalised RGB and the teacher's TTA attention map."""
    seg = AttentionSegmenter(teacher, device=device, tta=True)
    items = []
    for path in paths:
        rgb = read_rgb(path)
        stats = stain_stats(rgb)
        items.append({
            "stem": path.stem, "rgb": rgb, "norm": apply_stain_stats(rgb, stats),
            "attention": seg.attention_map(rgb, mpp, stats),
        })  # fmt: skip
    return items


def _pseudo(args: tuple[NDArray[np.uint8], NDArray[np.float32], float, PseudoLabelConfig]) -> tuple[Any, ...]:
    rgb, attention, mpp, config = args
    classical = ClassicalSegmenter(ClassicalParams(working_mpp=mpp))
    stats = classical.fit(rgb, mpp)
    h_mask = classical.foreground(rgb, mpp, stats)
    classical_labels = classical.postprocess(h_mask, mpp, stats)
    target = pseudo_targets(attention, h_mask, mpp, config, classical_labels)
    teacher_labels = split_instances(attention > 0.5, mpp)
    return target, classical_labels, teacher_labels


def _instances(args: tuple[NDArray[np.float32], float, StudentPostprocess]) -> NDArray[np.int32]:
    return probabilities_to_instances(*args)


def _score(rows: list[dict[str, Any]], stems: set[str], key: str) -> dict[str, float]:
    chosen = [r[key] for r in rows if r["stem"] in stems]
    if not chosen:
        return {}
    return {m: float(np.mean([c[m] for c in chosen])) for m in chosen[0]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    (out / "pred").mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    paths = list_images(args.images)
    train_paths = paths[: len(paths) - args.holdout] if args.holdout else paths
    t0 = time.perf_counter()
    items = _teacher_inputs(paths, args.teacher, args.mpp, device)
    pl_config = PseudoLabelConfig(recipe=args.recipe)
    with ProcessPoolExecutor(args.workers, mp_context=_SPAWN) as pool:
        results = list(pool.map(_pseudo, [(it["rgb"], it["attention"], args.mpp, pl_config) for it in items]))
    for it, (target, classical, teacher) in zip(items, results):
        it.update(target=target, classical=classical, teacher=teacher)
    prep_s = time.perf_counter() - t0
    if args.save_maps:
        maps = {it["stem"]: np.rint(it["attention"] * 255.0).astype(np.uint8) for it in items}
        np.savez_compressed(out / "teacher_maps.npz", **maps)
    train_stems = {p.stem for p in train_paths}
    train_items = [it for it in items if it["stem"] in train_stems]
    shares = {k: float(np.mean([target_shares(it["target"])[k] for it in train_items]))
              for k in ("background", "interior", "boundary", "ignore")}  # fmt: skip
    print(f"teacher maps + pseudo-labels of {len(items)} images in {prep_s:.1f}s; shares {shares}", flush=True)
    config = StudentTrainConfig(
        widths=tuple(int(w) for w in args.widths.split(",")), crop_px=args.crop_px,
        batch_size=args.batch, steps=args.steps, max_seconds=args.seconds, seed=args.seed,
    )  # fmt: skip
    sampler = PseudoLabelSampler([it["norm"] for it in train_items], [it["target"] for it in train_items],
                                 config.crop_px, device)  # fmt: skip
    log_rows: list[dict[str, float]] = []

    def log(step: int, values: dict[str, float]) -> None:
        log_rows.append({"step": float(step), **values})
        print(f"step {step:5d} {values['seconds']:6.1f}s ce {values['ce']:.4f} dice {values['dice']:.4f}", flush=True)

    t1 = time.perf_counter()
    net = train_student(sampler, config, log=log)
    train_s = time.perf_counter() - t1
    post = StudentPostprocess()
    save_student(net, out / "student.safetensors", mpp=args.mpp, postprocess=post, metadata={
        "recipe": args.recipe, "teacher": Path(args.teacher).name, "steps": str(config.steps),
        "train_images": str(len(train_items)), "trainer": "nucleiscope.jobs.self_train",
    })  # fmt: skip
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(log_rows[0]))
        writer.writeheader()
        writer.writerows(log_rows)
    probs = student_probabilities(net, [it["norm"] for it in items], device)
    with ProcessPoolExecutor(args.workers, mp_context=_SPAWN) as pool:
        labels = list(pool.map(_instances, [(p, args.mpp, post) for p in probs]))
    probs_tta = student_probabilities(net, [it["norm"] for it in items], device, tta=True)
    with ProcessPoolExecutor(args.workers, mp_context=_SPAWN) as pool:
        labels_tta = list(pool.map(_instances, [(p, args.mpp, post) for p in probs_tta]))
    for it, lab, lab_tta in zip(items, labels, labels_tta):
        write_labels(str(out / "pred" / f"{it['stem']}.tif"), lab)
        it["student"], it["student_tta"] = lab, lab_tta
    summary: dict[str, Any] = {
        "recipe": args.recipe, "pseudo_label_shares": shares, "config": config.to_dict(),
        "prep_seconds": prep_s, "train_seconds": train_s,
        "steps": int(log_rows[-1]["step"]),
        "samples_per_s": log_rows[-1]["step"] * config.batch_size / max(train_s, 1e-9),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "train_images": sorted(train_stems), "holdout_images": sorted({p.stem for p in paths} - train_stems),
    }  # fmt: skip
    if args.labels:
        summary["scores"] = _evaluate(items, Path(args.labels), train_stems)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _evaluate(items: list[dict[str, Any]], labels_dir: Path, train_stems: set[str]) -> dict[str, Any]:
    try:
        from ..pipeline.metrics import evaluate_pair, read_label_image
    except ImportError as exc:  # a bare GPU image may lack pandas: score the pred/ folder later
        print(f"not scoring: {exc}", flush=True)
        return {}
    rows = []
    for it in items:
        gt = read_label_image(labels_dir / f"{it['stem']}.png")
        rows.append({"stem": it["stem"], **{k: evaluate_pair(gt, it[k]) for k in _SCORED}})
    held = {it["stem"] for it in items} - train_stems
    scores: dict[str, Any] = {}
    for key in _SCORED:
        scores[key] = {"train": _score(rows, train_stems, key), "holdout": _score(rows, held, key)}
        print(f"{key:10s} train {scores[key]['train']}  holdout {scores[key]['holdout']}", flush=True)
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
