"""Training jobs: TOML configs, DDP train steps, Ray Train runs with checkpoints in (moto) S3
and their resumption, and ``nucleiscope train`` killed with SIGKILL then rerun."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from nucleiscope.jobs.cli import main
from nucleiscope.jobs.train import check_run_folder
from nucleiscope.pipeline.common.errors import ConfigError
from nucleiscope.pipeline.networks.attention_net import load_weights
from nucleiscope.pipeline.training.config import TrainConfig, load_job_config
from nucleiscope.pipeline.training.loop import build_state, read_checkpoint, train_step, wrap_ddp
from tests.synthetic import SyntheticTruth

from .s3util import S3Endpoint

REPO = Path(__file__).resolve().parents[1]
MONUSEG = REPO.parent / "shared" / "data" / "monuseg-train"
TINY_TRAIN = {"batch_size": 6, "crop_px": 32, "pad_min_px": 48, "f_width": 8, "f_dilations": [1, 2],
              "g_width": 8, "g_blocks": [1, 1, 1, 1], "lr": 1e-3}  # fmt: skip


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def write_job(path: Path, top: Mapping[str, Any], sources: list[Mapping[str, Any]],
              tables: Mapping[str, Mapping[str, Any]]) -> Path:
    """A TOML job file (top-level keys, [[sources]], then tables)."""
    lines = [f"{k} = {_value(v)}" for k, v in top.items()]
    for source in sources:
        lines += ["[[sources]]", *(f"{k} = {_value(v)}" for k, v in source.items())]
    for name, table in tables.items():
        lines += [f"[{name}]", *(f"{k} = {_value(v)}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_example_configs_are_valid() -> None:
    ref = load_job_config(REPO / "jobs" / "configs" / "train-monuseg.toml")
    assert ref.train == TrainConfig() and ref.use_gpu and ref.workers == 1 and ref.sampler == "resident"
    assert ref.sources[0].mpp == 0.25 and "monuseg-train/images" in ref.sources[0].path
    tiny = load_job_config(REPO / "jobs" / "configs" / "train-tiny-cpu.toml")
    assert not tiny.use_gpu and tiny.sampler == "stream" and tiny.train.f_width < ref.train.f_width
    assert tiny.train.crop_px < ref.train.crop_px and tiny.train.batch_size < ref.train.batch_size


@pytest.mark.parametrize("change", [
    {"top": {"colour": "red"}}, {"top": {"steps": "10"}}, {"sources": []}, {"train": {"batch_size": 1}},
    {"train": {"bf16": 1}}, {"train": {"g_blocks": 3}}, {"stream": {"window_um": 10.0}},
    {"scaling": {"workers": 0}}, {"top": {"sampler": "magic"}},
])  # fmt: skip
def test_bad_job_files_exit_with_2(tmp_path: Path, change: dict[str, Any]) -> None:
    top = {"output": str(tmp_path / "run"), "steps": 3, **change.get("top", {})}
    sources = change.get("sources", [{"path": str(tmp_path / "*.png"), "mpp": 0.25}])
    tables: dict[str, Mapping[str, Any]] = {k: change[k] for k in ("train", "stream", "scaling") if k in change}
    path = write_job(tmp_path / "job.toml", top, sources, tables)
    with pytest.raises(ConfigError):
        load_job_config(path)
    assert main(["train", "--config", str(path)]) == 2
    assert main(["train", "--config", str(tmp_path / "missing.toml")]) == 2


@pytest.mark.usefixtures("torch_one_thread")
def test_ddp_train_step_matches_the_plain_step() -> None:
    """Through DDP (gloo, one process), F's tau_ema, BN statistics and equivariance target behave
    exactly as without it."""
    import torch.distributed as dist

    cfg = TrainConfig(**{**TINY_TRAIN, "f_dilations": (1, 2), "g_blocks": (1, 1, 1, 1)})
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    try:
        plain, wrapped = build_state(cfg), build_state(cfg)
        wrap_ddp(wrapped)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            x, y = torch.randn(6, 3, 32, 32, generator=gen), torch.arange(6) % 3
            a = train_step(plain, x, y)
            b = train_step(wrapped, x, y)
            assert float(a["loss_equiv"]) == pytest.approx(float(b["loss_equiv"]), rel=1e-5)
    finally:
        dist.destroy_process_group()
    assert float(wrapped.f.tau_ema) == pytest.approx(float(plain.f.tau_ema), rel=1e-6)
    assert int(wrapped.f.tau_count) == 3 and int(wrapped.f.stem[1].num_batches_tracked) == 3
    for (name, p), q in zip(plain.f.named_parameters(), wrapped.f.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def _rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode())))


@pytest.mark.usefixtures("ray_cluster")
def test_cli_train_to_s3_killed_after_a_checkpoint_resumes_from_it(
    tmp_path: Path, synthetic_slide: SyntheticTruth, s3_server: S3Endpoint, s3_bucket: Callable[[], str]
) -> None:
    """`nucleiscope train` (two DDP workers, tiles streamed by Ray tasks, run folder in S3) is
    SIGKILLed once a checkpoint has landed; the same command then continues from the latest
    checkpoint, optimiser and lr schedule included. Both join the test session's Ray."""
    import ray

    bucket = s3_bucket()
    run, options = f"s3://{bucket}/run", s3_server.storage_options
    top = {"output": run, "steps": 80, "checkpoint_every": 5, "log_every": 5, "keep_checkpoints": 2}
    tables = {"storage_options": options, "scaling": {"workers": 2, "cpus_per_worker": 0.75},
              "train": {**TINY_TRAIN, "crop_px": 40, "lr_drop_steps": [70]},
              "stream": {"window_um": 120.0, "tiles_per_scale": 4, "pool_tiles": 8, "tasks_in_flight": 1,
                         "task_cpus": 0.5}}  # fmt: skip
    job = write_job(tmp_path / "job.toml", top, [{"path": synthetic_slide.path}], tables)
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "nucleiscope.jobs.cli", "train", "--config", str(job), "--address", address]
    client = s3_server.client()

    def checkpoints() -> list[int]:
        listing = client.list_objects_v2(Bucket=bucket, Prefix="run/checkpoints/").get("Contents", [])
        return sorted(int(o["Key"].rsplit("-", 1)[1].split(".")[0]) for o in listing)

    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not checkpoints():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()  # SIGKILL: Ray then ends the job's controller, workers and tasks
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stderr is not None:
            proc.stderr.close()
    first = checkpoints()[0]
    assert 5 <= first < 80 and "run/attention_f.safetensors" not in _keys(client, bucket)

    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def get(key: str) -> bytes:
        return bytes(client.get_object(Bucket=bucket, Key=f"run/{key}")["Body"].read())

    summary = json.loads(get("train.json"))
    start = summary["start_step"]  # the latest checkpoint when the rerun began
    assert first <= start < 80 and start % 5 == 0 and (summary["steps"], summary["world_size"]) == (80, 2)
    assert f"this run started at step {start}" in done.stdout
    assert summary["tiles_streamed"] > 0 and checkpoints() == [75, 80]  # keep_checkpoints = 2
    rows = _rows(get("metrics.csv"))
    steps = [int(float(r["step"])) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 80 and start + 1 in steps
    # the lr schedule counts steps across the interruption: it drops after step 70, not 70 after the restart
    assert all(float(r["lr"]) == pytest.approx(1e-3 if int(float(r["step"])) <= 70 else 1e-4) for r in rows)
    state, extra = read_checkpoint(f"{run}/checkpoints/step-00000080.pt", storage_options=options)
    assert state.step == 80 and len(extra["metrics"]) == len(rows)
    assert {int(s["step"]) for s in state.optimizer.state_dict()["state"].values()} == {80}  # Adam went on
    (tmp_path / "f.safetensors").write_bytes(get("attention_f.safetensors"))
    assert float(load_weights(tmp_path / "f.safetensors").tau_ema) == pytest.approx(float(state.f.tau_ema))

    tables["train"] = {**tables["train"], "lr": 5e-4}
    job = write_job(tmp_path / "job.toml", top, [{"path": synthetic_slide.path}], tables)
    with pytest.raises(ConfigError, match="other \\[train\\] values \\(lr\\)"):
        check_run_folder(load_job_config(job), run, options)


def _keys(client: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_every_job_file_loads_and_the_fold_jobs_see_no_validation_image(monkeypatch: pytest.MonkeyPatch) -> None:
    from nucleiscope.jobs.train import expand_sources
    from nucleiscope.pipeline.evaluation.split import load_split

    jobs = {p.stem: load_job_config(p) for p in sorted((REPO / "jobs" / "configs").glob("*.toml"))}
    assert {"train-monuseg", "train-tiny-cpu", "train-attention-local", "train-student", "train-attention-fold",
            "train-student-fold"} <= set(jobs)  # fmt: skip
    assert jobs["train-student"].task == "student" and jobs["train-student"].pseudo_labels.recipe == "consensus"
    assert jobs["train-attention-local"].runner == "local" and jobs["train-monuseg"].runner == "ray"
    split = load_split(REPO / "benchmarks" / "monuseg_split.toml")
    assert len(split.validation) >= 10 and len(set(split.organs[s] for s in split.validation)) >= 5
    for name in ("train-attention-fold", "train-student-fold", "train-student-fold-classical-cpu"):
        assert all(s.split == "benchmarks/monuseg_split.toml" and s.part == "train" for s in jobs[name].sources)
        if MONUSEG.exists():  # the job's relative paths resolve from the repository root
            monkeypatch.chdir(REPO)
            stems = {Path(uri).stem for uri, _ in expand_sources(jobs[name], {})}
            assert stems == set(split.train), name
