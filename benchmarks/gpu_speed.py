"""Extraction speed on one GPU machine, in one prepared run that keeps to a deadline.

    python benchmarks/gpu_speed.py --out DIR [--deadline-s 510] [--work /tmp/gpu-speed]
    python benchmarks/gpu_speed.py --out DIR --cpu-smoke      (tiny sizes, on a CPU machine)

Parts, each capped in seconds and cut short by the whole run's deadline; every figure
is written to DIR as soon as it is known (summary.json, summary.txt), so a run stopped
from outside still leaves what it measured:

1. slides: a synthetic 40,000² px slide at 0.25 µm/px (100 mm², tests/synthetic.py, written
   with one rendering thread per core) and a cohort of 6 slides of 5,000² px.
2. extract: ``nucleiscope extract`` on the large slide with the default segmenter (the
   student; the local Ray sees the GPU and gives its segmentation actor one GPU), wall
   time, slides.parquet's stage seconds, and nvidia-smi's utilisation and memory every
   0.5 s for the whole run (gpu_util.csv, gpu_util.png when matplotlib is there).
3. forward: the student's raw forward speed on that GPU (bf16 autocast, as the segmenter
   runs it; batch 4 = the driver's tiles per batch, and 8; 1024² tiles), the segmenter's
   whole ``predict_batch`` (uint8 tiles in, float16 probabilities out), and the actor
   pool's megapixels/s in predict (slides.parquet megapixels / seconds_segment) as a
   fraction of the raw forward speed.
4. scaling: the cohort with ``--num-cpus`` 1, 2, 4, 8, 16, classical and default segmenter,
   wall time (Ray start included) and speed-up over 1 CPU. With a GPU, "1 CPU" for the
   default segmenter is ``--local`` (one process): on a local Ray of 1 CPU the GPU actor
   holds the only CPU slot and the slide tasks never start.

Without CUDA every part is skipped with a message, except under ``--cpu-smoke``: a 3,000²
slide, 2 slides of 1,500², 1 and 2 CPUs, everything on the CPU, to prove the script runs.
Logs of every command are packed into DIR/logs.tgz after each part (DIR gets 6 files).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests package (synthetic slides)
CLI = [sys.executable, "-m", "nucleiscope.jobs.cli"]


@dataclass(frozen=True)
class Plan:
    """Sizes and caps (seconds) of one run."""

    big_px: int = 40_000
    cohort_slides: int = 6
    cohort_px: int = 5_000
    cpus: tuple[int, ...] = (1, 16, 4, 2, 8)  # most informative first; reported in order
    segmenters: tuple[str, ...] = ("classical", "default")
    forward_batches: tuple[int, ...] = (4, 8)
    forward_tile_px: int = 1024
    forward_repeats: int = 10
    caps: dict[str, float] = field(default_factory=lambda: {
        "slides": 90, "extract": 270, "forward": 45, "scaling:classical": 75, "scaling:default": 150})
    run_cap_s: float = 100.0  # one scaling run

    @staticmethod
    def smoke() -> Plan:
        return Plan(big_px=3_000, cohort_slides=2, cohort_px=1_500, cpus=(1, 2), forward_batches=(1,),
                    forward_tile_px=256, forward_repeats=2, run_cap_s=240.0,
                    caps={"slides": 60, "extract": 300, "forward": 60, "scaling:classical": 300,
                          "scaling:default": 400})  # fmt: skip


class Results:
    """Figures by part, rewritten to summary.json / summary.txt on every change."""

    def __init__(self, out: Path, logs: Path) -> None:
        self.out, self.logs = out, logs
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
        self.lines: list[str] = []

    def put(self, part: str, **figures: Any) -> None:
        self.data["parts"].setdefault(part, {}).update(figures)
        self.save()

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)
        self.save()

    def save(self) -> None:
        (self.out / "summary.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        (self.out / "summary.txt").write_text("\n".join(self.lines) + "\n")

    def pack_logs(self) -> None:
        with tarfile.open(self.out / "logs.tgz.part", "w:gz") as tar:
            tar.add(self.logs, arcname="logs")
        os.replace(self.out / "logs.tgz.part", self.out / "logs.tgz")


class GpuSampler:
    """nvidia-smi every 0.5 s into gpu_util.csv (seconds since start, part, %, MiB)."""

    def __init__(self, csv: Path, start: float) -> None:
        self.csv, self.start, self.part = csv, start, "start"
        self.proc: subprocess.Popen[str] | None = None

    def run(self) -> bool:
        if shutil.which("nvidia-smi") is None:
            return False
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "500"]
        self.proc = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        return True

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.csv, "w") as csv:
            csv.write("t_s,part,utilization_pct,memory_mib\n")
            for line in self.proc.stdout:
                fields = [f.strip() for f in line.split(",")]
                if len(fields) == 2:
                    csv.write(f"{time.perf_counter() - self.start:.2f},{self.part},{fields[0]},{fields[1]}\n")
                    csv.flush()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)


def run_logged(cmd: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, float]:
    """(exit code, wall seconds) of ``cmd`` in its own process group, killed (the group) at ``timeout_s``;
    exit code 124 on a timeout. Output goes to ``log``."""
    start = time.perf_counter()
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})}, cwd=REPO)  # fmt: skip
        try:
            code = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = 124
    return code, time.perf_counter() - start


def slides_table(out: Path) -> dict[str, float] | None:
    """Sums over slides.parquet (megapixels, tiles, nuclei, stage seconds), or None."""
    import pandas as pd

    path = out / "slides.parquet"
    if not path.exists():
        return None
    table = pd.read_parquet(path)
    cols = ["megapixels", "tiles", "nuclei_count", *(c for c in table.columns if c.startswith("seconds_"))]
    return {c: float(table[c].sum()) for c in cols} | {"slides": float(len(table))}


class Clock:
    """The run's deadline, and each part's share of what is left of it."""

    def __init__(self, deadline_s: float, reserve_s: float = 8.0) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + deadline_s
        self.reserve_s = reserve_s

    def left(self, cap_s: float) -> float:
        return max(0.0, min(cap_s, self.deadline - time.perf_counter() - self.reserve_s))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def part_slides(plan: Plan, work: Path, res: Results) -> tuple[str, list[str]]:
    """Write the large slide and the cohort (one rendering thread per core)."""
    from tests.synthetic import write_synthetic_slide

    workers = os.cpu_count() or 2
    big = work / f"synthetic-{plan.big_px}.svs"
    start = time.perf_counter()
    truth = write_synthetic_slide(big, width_px=plan.big_px, height_px=plan.big_px, mpp=0.25,
                                  compression="jpeg", seed=1, workers=workers)  # fmt: skip
    seconds = time.perf_counter() - start
    mm2 = (plan.big_px * 0.25e-3) ** 2
    res.put("slides", big_px=plan.big_px, big_mm2=mm2, big_seconds=round(seconds, 1), big_nuclei=truth.n_nuclei,
            big_mb=round(big.stat().st_size / 1e6, 1), workers=workers)  # fmt: skip
    res.say(f"slides: {plan.big_px}² px ({mm2:.3g} mm², {truth.n_nuclei:,} nuclei, "
            f"{big.stat().st_size / 1e6:.0f} MB) written in {seconds:.1f} s with {workers} threads")  # fmt: skip
    cohort, start = [], time.perf_counter()
    for n in range(plan.cohort_slides):
        path = work / "cohort" / f"c{n:02d}.svs"
        path.parent.mkdir(exist_ok=True)
        write_synthetic_slide(path, width_px=plan.cohort_px, height_px=plan.cohort_px, mpp=0.25, compression="jpeg",
                              seed=10 + n, workers=workers, min_level_px=256)  # fmt: skip
        cohort.append(str(path))
    res.put("slides", cohort=f"{plan.cohort_slides} x {plan.cohort_px}²", cohort_seconds=round(time.perf_counter() - start, 1))
    res.say(f"slides: cohort of {plan.cohort_slides} x {plan.cohort_px}² px in {time.perf_counter() - start:.1f} s")
    return str(big), cohort


def part_extract(big: str, work: Path, res: Results, clock: Clock, cap_s: float, sampler: GpuSampler) -> None:
    """``nucleiscope extract`` of the large slide, default segmenter, a local Ray of every core."""
    out = work / "extract-big"
    timeout = clock.left(cap_s)
    sampler.part = "extract"
    code, wall = run_logged([*CLI, "extract", big, "--out", str(out), "--no-progress"], res.logs / "extract.log", timeout)
    sampler.part = "idle"
    sums = slides_table(out)
    device = json.loads((out / "run.json").read_text()).get("device") if (out / "run.json").exists() else None
    for name in ("run.json", "slides.parquet"):
        if (out / name).exists():
            shutil.copy(out / name, res.logs / f"extract-{name}")
    res.put("extract", rc=code, wall_s=round(wall, 1), timeout_s=round(timeout), device=device, slides=sums)
    if sums is None:
        res.say(f"extract: {'timed out' if code == 124 else f'exit {code}'} after {wall:.0f} s, no slides.parquet")
        return
    seg_s = sums["seconds_segment"]
    res.put("extract", actor_mp_s=sums["megapixels"] / seg_s if seg_s else None,
            end_to_end_mp_s=sums["megapixels"] / wall, actor_busy=seg_s / wall)  # fmt: skip
    res.say(f"extract: {sums['megapixels']:.0f} MP of windows, {sums['tiles']:.0f} tiles, {sums['nuclei_count']:,.0f} "
            f"nuclei in {wall:.1f} s wall (exit {code}, device {device}): {sums['megapixels'] / wall:.1f} MP/s end to "
            f"end; actor predict {seg_s:.1f} s = {sums['megapixels'] / max(seg_s, 1e-9):.1f} MP/s, busy "
            f"{100 * seg_s / wall:.0f} % of the wall; stage seconds (summed over workers): "
            + ", ".join(f"{k[8:]} {v:.0f}" for k, v in sums.items() if k.startswith("seconds_")))  # fmt: skip


def part_forward(plan: Plan, res: Results, clock: Clock, cap_s: float, sampler: GpuSampler) -> None:
    """The student's raw forward speed and its predict_batch, in a child process."""
    cmd = [sys.executable, __file__, "--child-forward", json.dumps(asdict(plan))]
    log = res.logs / "forward.log"
    sampler.part = "forward"
    code, wall = run_logged(cmd, log, clock.left(cap_s))
    sampler.part = "idle"
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    if code != 0 or not lines:
        res.put("forward", rc=code, wall_s=round(wall, 1))
        res.say(f"forward: failed (exit {code}), see logs/forward.log")
        return
    figures = json.loads(lines[-1][7:])
    res.put("forward", **figures)
    for key, rate in figures["rates"].items():
        res.say(f"forward ({figures['device']}, {figures['tile_px']}² tiles): {key}: {rate:.3g} MP/s")
    actor = res.data["parts"].get("extract", {}).get("actor_mp_s")
    raw = figures["rates"].get(f"net {figures['dtype']} batch {plan.forward_batches[0]}")
    if actor and raw:
        res.put("forward", actor_fraction_of_raw=actor / raw)
        res.say(f"actor pool in predict: {actor:.1f} MP/s = {100 * actor / raw:.0f} % of the raw forward at batch "
                f"{plan.forward_batches[0]} x {plan.forward_tile_px}² ({raw:.3g} MP/s; aim >= 60 %)")  # fmt: skip


def time_mp_s(fn: Any, megapixels: float, repeats: int, cuda: bool) -> float:
    """Median megapixels/s of ``fn()`` over ``repeats`` timed calls after 3 warm-ups."""
    import torch

    rates = []
    for n in range(repeats + 3):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if n >= 3:
            rates.append(megapixels / (time.perf_counter() - start))
    return statistics.median(rates)


def child_forward(plan: Plan) -> None:
    """Print the student's forward and predict_batch rates as JSON (runs in the child)."""
    import numpy as np
    import torch

    from nucleiscope.pipeline.common.devices import device_name
    from nucleiscope.pipeline.networks.student_net import class_probabilities
    from nucleiscope.pipeline.segmentation.registry import make_segmenter, shipped_weights

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    seg = make_segmenter("student", shipped_weights("student"), device=str(device))
    net, px = seg._net, plan.forward_tile_px  # type: ignore[attr-defined]
    dtype = "bf16" if cuda else "fp32"
    rates: dict[str, float] = {}
    rng = np.random.default_rng(0)
    for batch in plan.forward_batches:
        x = torch.randn(batch, 3, px, px, device=device)
        mp = batch * px * px / 1e6
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            rates[f"net {dtype} batch {batch}"] = time_mp_s(lambda x=x: net.forward_padded(x), mp, plan.forward_repeats, cuda)
        if cuda:
            with torch.inference_mode():
                rates[f"net fp32 batch {batch}"] = time_mp_s(lambda x=x: net.forward_padded(x), mp, plan.forward_repeats, True)
        rates[f"class_probabilities batch {batch}"] = time_mp_s(lambda x=x: class_probabilities(net, x), mp,
                                                               plan.forward_repeats, cuda)  # fmt: skip
        tiles = [rng.integers(0, 255, (px, px, 3), dtype=np.uint8) for _ in range(batch)]
        stats = seg.fit(tiles[0][::8, ::8], seg.mpp)
        rates[f"predict_batch (uint8 in, float16 out) batch {batch}"] = time_mp_s(
            lambda tiles=tiles, stats=stats: seg.predict_batch(tiles, seg.mpp, stats), mp, plan.forward_repeats, cuda)
    print("RESULT " + json.dumps({"device": device_name(device), "dtype": dtype, "tile_px": px, "rates": rates}))


def scaling_run(seg: str, cpus: int, cohort: list[str], work: Path, logs: Path, timeout: float,
                cuda: bool) -> dict[str, Any]:  # fmt: skip
    """One cohort run: ``--num-cpus cpus`` on a fresh local Ray (``--local`` for a GPU segmenter on 1 CPU)."""
    out = work / f"scale-{seg}-{cpus}"
    shutil.rmtree(out, ignore_errors=True)
    local = cuda and seg != "classical" and cpus == 1
    how = ["--local"] if local else ["--num-cpus", str(cpus)]
    cmd = [*CLI, "extract", *cohort, "--out", str(out), "--no-progress", *how,
           *(["--segmenter", seg] if seg != "default" else [])]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1"} if local else None
    code, wall = run_logged(cmd, logs / f"scale-{seg}-{cpus}.log", timeout, env)
    sums = slides_table(out)
    return {"cpus": cpus, "mode": "local" if local else "ray", "rc": code, "wall_s": round(wall, 1),
            "tiles": sums["tiles"] if sums else None, "megapixels": sums["megapixels"] if sums else None}  # fmt: skip


def part_scaling(plan: Plan, cohort: list[str], work: Path, res: Results, clock: Clock, cuda: bool,
                 sampler: GpuSampler) -> None:  # fmt: skip
    """The cohort at each CPU count, per segmenter, within each segmenter's cap."""
    for seg in plan.segmenters:
        ends = time.perf_counter() + clock.left(plan.caps[f"scaling:{seg}"])
        runs: list[dict[str, Any]] = []
        sampler.part = f"scaling-{seg}"
        for cpus in plan.cpus:
            timeout = min(plan.run_cap_s, ends - time.perf_counter())
            if timeout < 10:
                res.say(f"scaling {seg}: {cpus} CPUs skipped, no time left in this part")
                continue
            run = scaling_run(seg, cpus, cohort, work, res.logs, timeout, cuda)
            runs.append(run)
            state = "timed out" if run["rc"] == 124 else f"exit {run['rc']}"
            res.say(f"scaling {seg}: {cpus} CPUs ({run['mode']}): {run['wall_s']:.1f} s ({state}), "
                    f"{run['tiles'] or 0:.0f} tiles")  # fmt: skip
            res.put(f"scaling:{seg}", runs=sorted(runs, key=lambda r: r["cpus"]))
        sampler.part = "idle"
        one = next((r["wall_s"] for r in runs if r["cpus"] == 1 and r["rc"] == 0), None)
        speedup = {r["cpus"]: one / r["wall_s"] for r in runs if one and r["rc"] == 0}
        rows = [f"{r['cpus']:>4d} {r['mode']:>5s} {r['wall_s']:8.1f} "
                + (f"{speedup[r['cpus']]:7.2f}x" if r["cpus"] in speedup else "       -")
                for r in sorted(runs, key=lambda r: r["cpus"])]  # fmt: skip
        res.put(f"scaling:{seg}", speedup_vs_1=speedup)
        res.say(f"scaling {seg} ({len(cohort)} slides), cpus / mode / wall s / speed-up vs 1:\n" + "\n".join(rows))


def plot_util(csv: Path, png: Path) -> str:
    """gpu_util.png from gpu_util.csv: utilisation and memory over time, parts shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pandas as pd
    except ImportError:
        return "no matplotlib: no gpu_util.png"
    if not csv.exists() or csv.stat().st_size < 40:
        return "no GPU samples: no gpu_util.png"
    table = pd.read_csv(csv)
    fig, ax = plt.subplots(figsize=(12, 4), dpi=100)
    ax.plot(table.t_s, table.utilization_pct, lw=0.8, label="utilisation %")
    ax2 = ax.twinx()
    ax2.plot(table.t_s, table.memory_mib / 1024, lw=0.8, color="tab:red", label="memory GiB")
    for part, rows in table.groupby("part", sort=False):
        if part != "idle":
            ax.axvspan(rows.t_s.min(), rows.t_s.max(), alpha=0.08, color="k")
            ax.text(rows.t_s.min(), 102, str(part), fontsize=7)
    ax.set(xlabel="seconds since start", ylabel="GPU utilisation %", ylim=(0, 110))
    ax2.set_ylabel("GPU memory used (GiB)")
    fig.tight_layout()
    fig.savefig(png)
    return f"wrote {png.name}"


def environment(res: Results) -> bool:
    """Record the machine; True when CUDA is usable."""
    import torch

    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else None
    res.put("environment", torch=torch.__version__, cuda=cuda, gpu=gpu, cpus=os.cpu_count(), python=sys.version.split()[0])
    res.say(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {'GPU ' + str(gpu) if cuda else 'no CUDA'}")
    return cuda


def guarded(res: Results, part: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``; an exception is recorded as the part's error (the run goes on)."""
    start = time.perf_counter()
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - one broken part must not cost the others
        res.put(part, error=f"{type(exc).__name__}: {exc}")
        res.say(f"{part}: failed: {type(exc).__name__}: {exc}")
        return None
    finally:
        res.put(part, part_seconds=round(time.perf_counter() - start, 1))
        res.pack_logs()


def run(args: argparse.Namespace) -> int:
    plan = Plan.smoke() if args.cpu_smoke else Plan()
    out, work = Path(args.out), Path(args.work)
    logs = work / "logs"
    for folder in (out, work, logs):
        folder.mkdir(parents=True, exist_ok=True)
    res = Results(out, logs)
    clock = Clock(args.deadline_s or (1500.0 if args.cpu_smoke else 510.0))
    res.put("plan", **asdict(plan), mode="cpu-smoke" if args.cpu_smoke else "gpu", deadline_s=clock.deadline - clock.start)
    cuda = environment(res)
    if not cuda and not args.cpu_smoke:
        for part in ("slides", "extract", "forward", "scaling"):
            res.put(part, skipped="no CUDA")
            res.say(f"{part}: skipped, no CUDA on this machine (--cpu-smoke runs a small version on the CPU)")
        return 0
    sampler = GpuSampler(out / "gpu_util.csv", clock.start)
    res.say("GPU sampling: nvidia-smi every 0.5 s -> gpu_util.csv" if sampler.run() else "GPU sampling: no nvidia-smi")
    try:
        made = guarded(res, "slides", part_slides, plan, work, res)
        if made is None:
            return 1
        big, cohort = made
        guarded(res, "extract", part_extract, big, work, res, clock, plan.caps["extract"], sampler)
        guarded(res, "forward", part_forward, plan, res, clock, plan.caps["forward"], sampler)
        guarded(res, "scaling", part_scaling, plan, cohort, work, res, clock, cuda, sampler)
    finally:
        sampler.stop()
        res.say(plot_util(out / "gpu_util.csv", out / "gpu_util.png"))
        res.put("total", seconds=round(clock.elapsed(), 1))
        res.say(f"total: {clock.elapsed():.0f} s")
        res.pack_logs()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-out"), help="results folder (default: $OUT)")
    parser.add_argument("--work", default="/tmp/gpu-speed", help="slides and extraction outputs (large)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="the whole run's time (default: 510 s, 1500 s with --cpu-smoke)")  # fmt: skip
    parser.add_argument("--cpu-smoke", "--dry-run", action="store_true",
                        help="tiny sizes, everything on the CPU (proves the script runs)")  # fmt: skip
    parser.add_argument("--child-forward", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_forward:
        data = json.loads(args.child_forward)
        child_forward(Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
