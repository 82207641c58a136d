"""``nucleiscope train --config FILE``: every kind of training the project has, from job files.

The job (``pipeline.training.config``) names its task and runner:
- ``task = "attention"``, ``runner = "ray"``: F and G with Ray Train (DDP on CPU or GPU
  workers). Sources are expanded and planned in Ray tasks (every refused source is listed;
  exit 2), and a ``TorchTrainer`` runs ``actors.train.train_loop_per_worker``; Ray Train
  keeps its own run state in ``<output>/ray``.
- ``task = "attention"``, ``runner = "local"``: the same loop in this process, the sources
  resident on the device (the quick path for one GPU), optionally writing F's maps.
- ``task = "student"``: the self-training stage in this process (teacher maps,
  pseudo-labels, student U-Net; ``pipeline.training.student_run``).
An existing run folder must hold the same hyper-parameters; rerunning the same command
after an interruption continues the attention model from the run's latest checkpoint.
Ray is imported only by the Ray runner.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..pipeline.common.devices import enable_fast_math, pick_device
from ..pipeline.common.errors import ConfigError, OutputError
from ..pipeline.common.storage import io_errors, resolve, uri_stem, write_bytes
from ..pipeline.evaluation.split import load_split
from ..pipeline.slides.inputs import expand_inputs, redact, with_s3_retries
from ..pipeline.training.attention_run import (
    CHECKPOINT_DIR,
    MAPS_NAME,
    SUMMARY_NAME,
    WEIGHTS_NAME,
    public_job_dict,
    resident_sampler,
    start_attention,
    train_attention,
)
from ..pipeline.training.config import TrainJobConfig, load_job_config
from ..pipeline.training.loop import list_checkpoints
from ..pipeline.training.scale_tiles import SourcePlan, plan_source
from ..pipeline.training.student_run import STUDENT_NAME, run_student

log = logging.getLogger(__name__)

JOB_NAME = "job.json"
RAY_DIR = "ray"
EXIT_OK, EXIT_FAILED = 0, 1


def _absolute(uri: str) -> str:
    """Local paths made absolute (Ray Train workers run in another working directory)."""
    return uri if "://" in uri else os.path.abspath(uri)


def expand_sources(job: TrainJobConfig, options: Mapping[str, Any]) -> list[tuple[str, float | None]]:
    """(URI, stated µm/px) of every file the job's sources name, in order, without repeats."""
    seen: set[str] = set()
    found: list[tuple[str, float | None]] = []
    for spec in job.sources:
        items = expand_inputs([spec.path], storage_options=options)
        if spec.split is not None:
            part = set(load_split(spec.split).part(spec.part))
            items = [item for item in items if uri_stem(item.uri) in part]
        if not items:
            raise ConfigError(f"source {redact(spec.path)} names no files"
                              + (f" of the {spec.part} part of {spec.split}" if spec.split else ""))  # fmt: skip
        for item in items:
            uri = _absolute(item.uri)
            if uri not in seen:
                seen.add(uri)
                found.append((uri, item.mpp if item.mpp is not None else spec.mpp))
    return found


def plan_sources(items: list[tuple[str, float | None]], job: TrainJobConfig,
                 options: Mapping[str, Any]) -> list[SourcePlan]:
    """Plan every source in Ray tasks; ConfigError listing each refused source and why."""
    import ray

    from ..actors.train import plan_source_task
    from .cluster import task_cause

    refs = [plan_source_task.remote(uri, mpp, job.stream.tissue_mpp, dict(options)) for uri, mpp in items]
    plans: list[SourcePlan] = []
    refused: list[str] = []
    for (uri, _), ref in zip(items, refs):
        try:
            plans.append(ray.get(ref))
        except ray.exceptions.RayTaskError as exc:
            cause = task_cause(exc)
            refused.append(f"{redact(uri)}: {type(cause).__name__}: {cause}")
    if refused:
        raise ConfigError(f"{len(refused)} of {len(items)} training sources refused:\n  " + "\n  ".join(refused))
    return plans


def check_run_folder(job: TrainJobConfig, run_dir: str, options: Mapping[str, Any]) -> int:
    """The step the run resumes from (0: a new run); ConfigError when the folder holds a run
    with other hyper-parameters. Records this job in ``job.json``."""
    fs, root = resolve(run_dir, options)
    path = f"{root}/{JOB_NAME}"
    with io_errors(f"cannot read {redact(run_dir)}/{JOB_NAME}"):
        previous = json.loads(fs.cat_file(path)) if fs.exists(path) else None
    if previous is not None and previous.get("train") != json.loads(json.dumps(job.train.to_dict())):
        old, new = previous.get("train", {}), job.train.to_dict()
        keys = sorted(k for k in set(old) | set(new) if json.dumps(old.get(k)) != json.dumps(new.get(k)))
        raise ConfigError(f"{redact(run_dir)} holds a run with other [train] values ({', '.join(keys)}); "
                          "use a new output folder or the same [train] table")  # fmt: skip
    found = list_checkpoints(f"{run_dir}/{CHECKPOINT_DIR}", storage_options=options)
    write_bytes(run_dir, JOB_NAME, json.dumps(public_job_dict(job), indent=2).encode(), storage_options=options)
    return found[-1][0] if found else 0


def _run_config(job: TrainJobConfig, run_dir: str, options: Mapping[str, Any]) -> Any:
    """Ray Train's RunConfig, its run state under ``<output>/ray`` (through fsspec for remote outputs)."""
    import pyarrow.fs as pafs
    import ray.train

    fs, root = resolve(run_dir, options)
    local = "://" not in run_dir or run_dir.startswith("file://")
    filesystem = None if local else pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    return ray.train.RunConfig(
        name=RAY_DIR, storage_path=root if not local else os.path.abspath(root), storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
    )  # fmt: skip


def _worker_entry(loop_config: dict[str, Any]) -> None:
    """Worker-side entry: logging for the worker process, then the training loop."""
    from ..actors.train import train_loop_per_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)  # fmt: skip
    train_loop_per_worker(loop_config)


def run_train(config_path: str, *, address: str | None = None, num_cpus: int | None = None,
              device: str | None = None) -> int:
    """Run (or continue) the training job of a TOML file; 0 when done, 1 when training failed.

    Raises ConfigError for a bad job, bad sources or a mismatched run folder.
    """
    job = load_job_config(config_path)
    run_dir = _absolute(job.output.rstrip("/"))
    options = with_s3_retries(job.storage_options, [*(s.path for s in job.sources), run_dir])
    job = replace(job, output=run_dir, storage_options=options)
    items = expand_sources(job, options)
    if job.task == "student":
        check_run_folder(job, run_dir, options)
        summary = run_student(job, items, device)
        print(f"student trained for {summary['steps']} steps on {len(summary['train_images'])} sources "
              f"({summary['samples_per_s']:.0f} samples/s on {summary['device_name']}); "
              f"weights in {redact(run_dir)}/{STUDENT_NAME}")  # fmt: skip
        return EXIT_OK
    if job.runner == "local":
        log.info("%d training sources; planning them", len(items))
        plans = [plan_source(uri, mpp, tissue_mpp=job.stream.tissue_mpp, storage_options=options)
                 for uri, mpp in items]  # fmt: skip
        _train_local(job, plans, run_dir, options, device)
        return _report(run_dir, options)
    from .cluster import init_ray

    init_ray(num_cpus, address, log_to_driver=True)
    log.info("%d training sources; planning them", len(items))
    plans = plan_sources(items, job, options)
    return _train_ray(job, plans, run_dir, options)


def _check_and_log(job: TrainJobConfig, run_dir: str, options: Mapping[str, Any]) -> None:
    start = check_run_folder(job, run_dir, options)
    log.info("%s run in %s from step %d to %d", "resuming a" if start else "starting a", redact(run_dir),
             start, job.steps)  # fmt: skip


def _train_local(job: TrainJobConfig, plans: list[SourcePlan], run_dir: str, options: Mapping[str, Any],
                 device: str | None) -> None:
    """The attention model trained in this process, its sources resident on the device."""
    _check_and_log(job, run_dir, options)
    dev = pick_device(device)
    enable_fast_math(dev)
    state, rows, seconds = start_attention(job, run_dir, dev, 0, 1, options)
    sampler = resident_sampler(job, plans, dev, options)
    train_attention(job, sampler, dev, run_dir=run_dir, options=options, state=state, rows=rows,
                    seconds=seconds, trainer="nucleiscope train (local)")  # fmt: skip
    if job.maps:
        _write_maps(plans, run_dir, options, dev)


def _write_maps(plans: list[SourcePlan], run_dir: str, options: Mapping[str, Any], device: Any) -> None:
    """F's test-time-augmented maps of every source (uint8 round(a * 255), keyed by stem)."""
    import io

    import numpy as np

    from ..pipeline.segmentation.attention import AttentionSegmenter
    from ..pipeline.training.scale_tiles import open_source, read_whole

    fs, root = resolve(run_dir, options)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS_NAME)
        with io_errors(f"cannot read {redact(run_dir)}/{WEIGHTS_NAME}"):
            fs.get_file(f"{root}/{WEIGHTS_NAME}", local)
        seg = AttentionSegmenter(local, device=device, tta=True)
        maps = {}
        for plan in plans:
            reader = open_source(plan.uri, plan.stated_mpp, storage_options=options)
            try:
                a = seg.image_map(read_whole(reader), reader.mpp)
            finally:
                reader.close()
            maps[uri_stem(plan.uri)] = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **maps)
    write_bytes(run_dir, MAPS_NAME, buffer.getvalue(), storage_options=options)


def _train_ray(job: TrainJobConfig, plans: list[SourcePlan], run_dir: str, options: Mapping[str, Any]) -> int:
    """Ray Train workers (DDP) run the attention model's loop to ``job.steps``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    _check_and_log(job, run_dir, options)

    resources: dict[str, float] = {"CPU": job.cpus_per_worker, **({"GPU": 1.0} if job.use_gpu else {})}
    scaling = ray.train.ScalingConfig(num_workers=job.workers, use_gpu=job.use_gpu, resources_per_worker=resources)
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"job": job, "plans": plans, "run_dir": run_dir, "storage_options": options},
        scaling_config=scaling,
        run_config=_run_config(job, run_dir, options),
    )  # fmt: skip
    try:
        trainer.fit()
    except (ray.train.TrainingFailedError, ray.exceptions.RayError) as exc:
        log.error("training failed: %s", exc)
        return EXIT_FAILED
    return _report(run_dir, options)


def _report(run_dir: str, options: Mapping[str, Any]) -> int:
    fs, root = resolve(run_dir, options)
    try:
        with io_errors(f"cannot read {redact(run_dir)}/{SUMMARY_NAME}"):
            summary = json.loads(fs.cat_file(f"{root}/{SUMMARY_NAME}"))
    except OutputError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    print(f"trained to step {summary['steps']} (this run started at step {summary['start_step']}; "
          f"{summary['samples_per_s']:.1f} samples/s on {summary['world_size']} x {summary['device']}); "
          f"F weights in {redact(run_dir)}/{WEIGHTS_NAME}")  # fmt: skip
    return EXIT_OK
