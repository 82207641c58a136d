"""The self-training stage as one run: teacher maps -> pseudo-labels -> student U-Net.

``run_student`` reads the job's sources whole (plain images with a stated µm/px, or small
slides), maps them with the teacher F at its working µm/px, builds the pseudo-labels of the
job's recipe, trains the student (``self_training.train_student``) and writes, in the run
folder: ``student.safetensors``, ``metrics.csv`` (loss per log step), ``summary.json``
(config, pseudo-label shares, timings, and with ``[self_training] labels`` the AJI/Dice/PQ/F1
of the teacher, the classical baseline and the student on the training and held-out
sources) and ``pred/<stem>.tif`` (student instance labels). Labels are read only to score.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from ..common.devices import device_name, enable_fast_math, pick_device
from ..common.errors import ConfigError
from ..common.images import label_tiff_bytes
from ..common.storage import uri_stem, write_bytes
from ..networks.attention_net import read_metadata
from ..segmentation.attention import AttentionSegmenter, apply_stain_stats, stain_stats
from ..segmentation.classical import ClassicalParams, ClassicalSegmenter
from ..segmentation.instances import split_instances
from ..segmentation.registry import shipped_weights
from ..segmentation.student import StudentPostprocess, probabilities_to_instances, save_student
from .config import TrainJobConfig
from .pseudo_labels import PseudoLabelConfig, pseudo_targets, target_shares
from .scale_tiles import open_source, read_whole
from .self_training import PseudoLabelSampler, student_probabilities, train_student

logger = logging.getLogger(__name__)

STUDENT_NAME = "student.safetensors"
#: Worker processes must not inherit a CUDA context.
_SPAWN = multiprocessing.get_context("spawn")
_SCORED = ("teacher", "classical", "student", "student_tta")
_SHARES = ("background", "interior", "boundary", "ignore")


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


def read_sources(uris: Sequence[tuple[str, float | None]], options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per source: stem, level-0 RGB and µm/px (slides too small to stream are read whole)."""
    items = []
    for uri, mpp in uris:
        reader = open_source(uri, mpp, storage_options=options)
        try:
            items.append({"stem": uri_stem(uri), "rgb": read_whole(reader), "mpp": reader.mpp})
        finally:
            reader.close()
    return items


def teacher_path(job: TrainJobConfig) -> str | None:
    """The teacher F's weights: ``[self_training] teacher``, else the shipped F; None for the
    "classical" recipe, which needs no teacher."""
    if job.pseudo_labels.recipe == "classical":
        return None
    teacher = job.self_training.teacher or shipped_weights("attention")
    if teacher is None:
        raise ConfigError("[self_training] teacher is not set and no attention weights are shipped")
    return teacher


def _teacher_and_targets(items: list[dict[str, Any]], job: TrainJobConfig, device: torch.device) -> None:
    """Add each source's stain-normalised RGB, teacher map, pseudo-label target and baselines."""
    teacher = teacher_path(job)
    seg = AttentionSegmenter(teacher, device=device, tta=True) if teacher is not None else None
    for it in items:
        it["norm"] = apply_stain_stats(it["rgb"], stain_stats(it["rgb"]))
        shape = it["rgb"].shape[:2]
        it["attention"] = seg.image_map(it["rgb"], it["mpp"]) if seg is not None else np.zeros(shape, np.float32)
    config = job.pseudo_labels
    with ProcessPoolExecutor(job.self_training.workers, mp_context=_SPAWN) as pool:
        results = list(pool.map(_pseudo, [(it["rgb"], it["attention"], it["mpp"], config) for it in items]))
    for it, (target, classical, teacher_labels) in zip(items, results):
        it.update(target=target, classical=classical, teacher=teacher_labels)


def _student_labels(net: Any, items: list[dict[str, Any]], device: torch.device, workers: int,
                    post: StudentPostprocess, tta: bool) -> list[NDArray[np.int32]]:
    probs = student_probabilities(net, [it["norm"] for it in items], device, tta=tta)
    with ProcessPoolExecutor(workers, mp_context=_SPAWN) as pool:
        return list(pool.map(_instances, [(p, it["mpp"], post) for p, it in zip(probs, items)]))


def run_student(job: TrainJobConfig, sources: Sequence[tuple[str, float | None]],
                device: str | torch.device | None = None) -> dict[str, Any]:
    """Run the self-training stage of ``job`` on ``sources`` ((URI, stated µm/px), in order)."""
    dev = pick_device(device)
    enable_fast_math(dev)
    options, st = job.storage_options, job.self_training
    t0 = time.perf_counter()
    items = read_sources(sources, options)
    if st.holdout >= len(items):
        raise ConfigError(f"holdout ({st.holdout}) must leave at least one of the {len(items)} sources to train on")
    train_items = items[: len(items) - st.holdout]
    _teacher_and_targets(items, job, dev)
    prep_s = time.perf_counter() - t0
    shares = {k: float(np.mean([target_shares(it["target"])[k] for it in train_items])) for k in _SHARES}
    logger.info("teacher maps + pseudo-labels of %d sources in %.1fs; shares %s", len(items), prep_s, shares)
    sampler = PseudoLabelSampler([it["norm"] for it in train_items], [it["target"] for it in train_items],
                                 job.student.crop_px, dev)  # fmt: skip
    log_rows: list[dict[str, float]] = []

    def log(step: int, values: dict[str, float]) -> None:
        log_rows.append({"step": float(step), **values})
        logger.info("step %5d %6.1fs ce %.4f dice %.4f", step, values["seconds"], values["ce"], values["dice"])

    t1 = time.perf_counter()
    net = train_student(sampler, job.student, log=log)
    train_s = time.perf_counter() - t1
    post = StudentPostprocess()
    mpp = float(train_items[0]["mpp"])
    _write_student(job, net, post, mpp, len(train_items), log_rows)
    labels = _student_labels(net, items, dev, st.workers, post, tta=False)
    labels_tta = _student_labels(net, items, dev, st.workers, post, tta=True)
    for it, lab, lab_tta in zip(items, labels, labels_tta):
        write_bytes(job.output, f"pred/{it['stem']}.tif", label_tiff_bytes(lab), storage_options=options)
        it["student"], it["student_tta"] = lab, lab_tta
    train_stems = [it["stem"] for it in train_items]
    summary: dict[str, Any] = {
        "recipe": job.pseudo_labels.recipe, "teacher": _name(teacher_path(job)), "pseudo_label_shares": shares,
        "config": job.student.to_dict(), "prep_seconds": prep_s, "train_seconds": train_s,
        "steps": int(log_rows[-1]["step"]),
        "samples_per_s": log_rows[-1]["step"] * job.student.batch_size / max(train_s, 1e-9),
        "device": str(dev), "device_name": device_name(dev),
        "train_images": sorted(train_stems), "holdout_images": sorted({it["stem"] for it in items} - set(train_stems)),
    }  # fmt: skip
    if st.labels:
        summary["scores"] = _evaluate(items, Path(st.labels), set(train_stems))
    write_bytes(job.output, "summary.json", json.dumps(summary, indent=2).encode(), storage_options=options)
    return summary


def _write_student(job: TrainJobConfig, net: Any, post: StudentPostprocess, mpp: float, n_train: int,
                   log_rows: list[dict[str, float]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, STUDENT_NAME)
        teacher = teacher_path(job)
        teacher_steps = read_metadata(teacher).get("steps", "?") if teacher is not None else "-"
        save_student(net, local, mpp=mpp, postprocess=post, metadata={
            "recipe": job.pseudo_labels.recipe, "teacher": _name(teacher), "teacher_steps": teacher_steps,
            "steps": str(int(log_rows[-1]["step"])), "train_images": str(n_train), "trainer": "nucleiscope train",
        })  # fmt: skip
        with open(local, "rb") as handle:
            write_bytes(job.output, STUDENT_NAME, handle.read(), storage_options=job.storage_options)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(log_rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(log_rows)
    write_bytes(job.output, "metrics.csv", text.getvalue().encode(), storage_options=job.storage_options)


def _name(path: str | None) -> str:
    return Path(path).name if path is not None else "none (classical recipe)"


def _score(rows: list[dict[str, Any]], stems: set[str], key: str) -> dict[str, float]:
    chosen = [r[key] for r in rows if r["stem"] in stems]
    if not chosen:
        return {}
    return {m: float(np.mean([c[m] for c in chosen])) for m in chosen[0]}


def _evaluate(items: list[dict[str, Any]], labels_dir: Path, train_stems: set[str]) -> dict[str, Any]:
    from ..evaluation.metrics import evaluate_pair, read_label_image

    rows = []
    for it in items:
        gt = read_label_image(labels_dir / f"{it['stem']}.png")
        rows.append({"stem": it["stem"], **{k: evaluate_pair(gt, it[k]) for k in _SCORED}})
    held = {it["stem"] for it in items} - train_stems
    scores: dict[str, Any] = {}
    for key in _SCORED:
        scores[key] = {"train": _score(rows, train_stems, key), "holdout": _score(rows, held, key)}
        logger.info("%-11s train %s  holdout %s", key, scores[key]["train"], scores[key]["holdout"])
    return scores
