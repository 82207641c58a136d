"""A two-node Ray cluster on this machine runs ``nucleiscope extract`` submitted through the Jobs API.

The head and a second node are separate ``ray start`` processes (own ports, own temp dir,
token authentication with a token of their own), independent of the session's in-process
Ray. The cohort lives in moto S3 and is reached only through ``--storage-options`` in the
command (the nodes' environment has no AWS settings), so the options must travel with
the work to the second node. Checks: the job succeeds, its tables equal an in-process
run, its tasks ran on both nodes, and resubmitting it skips every slide.

Nodes are started with ``--node-ip-address 127.0.0.1``; Ray itself replaces a loopback
address by the machine's own for multi-node clusters, so the nodes reach each other
there, while the dashboard (Jobs and State API) listens on 127.0.0.1 and S3 (moto)
stays on 127.0.0.1. Teardown kills each node's process group, then any process that
still names this test's temp dir; it never uses ``ray stop`` (which would end every
Ray on the machine).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from nucleiscope.jobs.run_local import run_cohort_local
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.segmentation.registry import make_segmenter
from nucleiscope.pipeline.slides.inputs import SlideInput
from tests.synthetic import SyntheticTruth, write_synthetic_slide

from .s3util import S3Endpoint, upload

pytestmark = pytest.mark.cluster

TILE_PX = 256
START_TIMEOUT_S = 90.0
JOB_TIMEOUT_S = 240.0
NODE_CPUS = 1  # one CPU per node: two concurrent tasks cannot both fit on the head
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TwoNodeCluster:
    """The running cluster: the Jobs/State API URL on 127.0.0.1, its token, node ids (head first)."""

    dashboard_url: str
    token: str
    head_node_id: str
    worker_node_id: str
    temp_root: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}

    def list_state(self, resource: str, filters: list[tuple[str, str, str]] | None = None) -> list[Any]:
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(self.dashboard_url, headers=self.headers)
        wanted: list[tuple[str, str, str | bool | int | float]] = list(filters or ())
        options = ListApiOptions(filters=wanted, detail=True, limit=10_000, timeout=20)
        return list(client.list(StateResource(resource), options=options, raise_on_missing_output=False))

    def logs(self) -> str:
        """The tail of both ``ray start`` outputs (for failure messages)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted(self.temp_root.glob("*.log")))  # fmt: skip


def node_env(token: str) -> dict[str, str]:
    """This environment less any Ray or AWS settings, plus token authentication with ``token``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    return env


def node_args(temp_dir: Path, num_cpus: int = NODE_CPUS) -> list[str]:
    """Options every node gets: small resources and a free port for each of its services."""
    ports = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")  # fmt: skip
    args = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--object-store-memory", str(100 << 20), "--temp-dir", str(temp_dir),
            "--disable-usage-stats", "--block"]  # fmt: skip
    for flag in ports:
        args += [flag, str(free_port())]
    return args


def ray_executable() -> str:
    """The ``ray`` script of this interpreter's environment (``venv/bin/python -m pytest`` works
    without an activated venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


def start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``ray start ... --block`` in a process group of its own (so teardown reaches every child)."""
    with log.open("wb") as out:
        return subprocess.Popen([ray_executable(), "start", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def stop_node(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the node's process group, SIGKILL what is left after 3 s."""
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGKILL:
            break


def kill_strays(temp_root: Path) -> list[int]:
    """SIGKILL processes whose command line names ``temp_root`` (unique to this test) and that
    left the nodes' process groups; their pids."""
    killed = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            named = str(temp_root).encode() in cmdline.read_bytes()
            pid = int(cmdline.parent.name)
            if named and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        except (OSError, ValueError):  # gone meanwhile
            continue
    return killed


def wait_for(what: str, poll: Callable[[], Any], timeout_s: float, diagnose: Callable[[], str]) -> Any:
    """Call ``poll`` until it returns something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = poll()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - services still starting
            last = exc
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last!r})\n{diagnose()}")


def alive_nodes(cluster: TwoNodeCluster, count: int) -> list[Any] | None:
    """The cluster's alive nodes once there are ``count`` of them, else None."""
    nodes = [n for n in cluster.list_state("nodes") if n.state == "ALIVE"]
    return nodes if len(nodes) == count else None


@pytest.fixture(scope="module")
def no_ray_address() -> Iterator[None]:
    """Ray's job and state clients prefer $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS to the address
    they are given: keep them unset here so that nothing reaches another cluster."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
        patch.delenv("RAY_ADDRESS", raising=False)
        yield


@pytest.fixture(scope="module")
def two_nodes(no_ray_address: None) -> Iterator[TwoNodeCluster]:
    """A head (GCS, dashboard on 127.0.0.1) and a second node, each with one CPU, torn down afterwards."""
    temp_root = Path(tempfile.mkdtemp(prefix="nsray-", dir="/tmp"))  # short: Ray's socket paths have a limit
    token = secrets.token_hex(32)
    env = node_env(token)
    gcs_port, dash_port = free_port(), free_port()
    url = f"http://127.0.0.1:{dash_port}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(start_node(["--head", "--port", str(gcs_port), "--include-dashboard", "true",
                                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
                                 "--ray-client-server-port", str(free_port()),
                                 *node_args(temp_root / "head")], temp_root / "head.log", env))  # fmt: skip
        probe = TwoNodeCluster(url, token, "", "", temp_root)
        head = wait_for("the head node", lambda: alive_nodes(probe, 1), START_TIMEOUT_S, probe.logs)[0]
        procs.append(start_node(["--address", f"{head.node_ip}:{gcs_port}", *node_args(temp_root / "worker")],
                                temp_root / "worker.log", env))  # fmt: skip
        nodes = wait_for("the second node", lambda: alive_nodes(probe, 2), START_TIMEOUT_S, probe.logs)
        worker = next(n for n in nodes if n.node_id != head.node_id)
        yield TwoNodeCluster(url, token, head.node_id, worker.node_id, temp_root)
    finally:
        tear_down(procs, temp_root)


def tear_down(procs: list[subprocess.Popen[bytes]], temp_root: Path) -> None:
    """Stop a test cluster's nodes (last started first) and remove everything it left."""
    for proc in reversed(procs):
        stop_node(proc)
    kill_strays(temp_root)
    shutil.rmtree(temp_root, ignore_errors=True)


@pytest.fixture(scope="module")
def cohort_slides(tmp_path_factory: pytest.TempPathFactory) -> list[SyntheticTruth]:
    root = tmp_path_factory.mktemp("cluster-cohort")
    return [write_synthetic_slide(root / f"slide-{i}.svs", width_px=2048, height_px=1792, mpp=0.25,
                                  min_level_px=256, seed=40 + i) for i in range(3)]  # fmt: skip


def submit_and_wait(cluster: TwoNodeCluster, entrypoint: str) -> tuple[str, str, str]:
    """Submit ``entrypoint``; (final status, Ray job id, logs) once it has ended."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.headers)
    submission_id = client.submit_job(entrypoint=entrypoint)

    def ended() -> str | None:
        status = str(client.get_job_status(submission_id).value)
        return status if status in TERMINAL else None

    status = wait_for(f"job {submission_id}", ended, JOB_TIMEOUT_S,
                      lambda: client.get_job_logs(submission_id) + cluster.logs())  # fmt: skip
    info = client.get_job_info(submission_id)
    return status, str(info.job_id), client.get_job_logs(submission_id)


def read_s3_parquet(endpoint: S3Endpoint, bucket: str, key: str) -> pd.DataFrame:
    body = endpoint.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return pd.read_parquet(io.BytesIO(body))


def read_s3_nuclei(endpoint: S3Endpoint, bucket: str, prefix: str) -> pd.DataFrame:
    listing = endpoint.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/nuclei/")["Contents"]
    frames = []
    for key in sorted(o["Key"] for o in listing if o["Key"].endswith(".parquet") and "/_tmp/" not in o["Key"]):
        frame = read_s3_parquet(endpoint, bucket, key)
        frame["slide_id"] = key.split("slide_id=")[1].split("/")[0].rsplit("-", 1)[0]  # the stem: ids differ by URI
        frames.append(frame)
    return pd.concat(frames).sort_values(["slide_id", "nucleus_id"]).reset_index(drop=True)


def local_reference(slides: list[SyntheticTruth], out: Path) -> pd.DataFrame:
    """The same cohort extracted in this process, without Ray."""
    items = [SlideInput(s.path, Path(s.path).stem, None) for s in slides]
    run_cohort_local(items, str(out), ExtractConfig(tile_px=TILE_PX), make_segmenter("classical"), show_progress=False)
    table = pd.read_parquet(out / "nuclei")
    table["slide_id"] = table["slide_id"].astype(str)
    return table.sort_values(["slide_id", "nucleus_id"]).reset_index(drop=True)


def task_nodes(cluster: TwoNodeCluster, job_id: str) -> dict[str, set[str]]:
    """Nodes on which the job's finished plain tasks ran, by task name.

    A task counts only where its own record and the record of the worker process
    that ran it name the same node."""
    worker_node = {w.worker_id: w.node_id for w in cluster.list_state("workers")}
    by_name: dict[str, set[str]] = {}
    for task in cluster.list_state("tasks", [("job_id", "=", job_id)]):
        if task.type == "NORMAL_TASK" and task.state == "FINISHED" and task.node_id:
            if worker_node.get(task.worker_id) == task.node_id:
                by_name.setdefault(task.name, set()).add(task.node_id)
    return by_name


def nodes_used(cluster: TwoNodeCluster, job_id: str) -> dict[str, set[str]] | None:
    """``task_nodes`` once its tasks cover both nodes, else None."""
    found = task_nodes(cluster, job_id)
    covered = set().union(*found.values()) if found else set()
    return found if covered == {cluster.head_node_id, cluster.worker_node_id} else None


def test_extract_job_on_two_nodes(
    two_nodes: TwoNodeCluster, s3_server: S3Endpoint, s3_bucket: Callable[[], str],
    cohort_slides: list[SyntheticTruth], tmp_path: Path,
) -> None:
    bucket = s3_bucket()
    upload(s3_server, [s.path for s in cohort_slides], f"s3://{bucket}/cohort/")
    options = shlex.quote(json.dumps(s3_server.storage_options))
    # this interpreter's nucleiscope (the checkout under test), not whichever `nucleiscope` is on PATH
    entrypoint = (f"{shlex.quote(sys.executable)} -m nucleiscope.jobs.cli extract s3://{bucket}/cohort/ --out s3://{bucket}/results --tile-px {TILE_PX} "
                  f"--segmenter classical --no-progress --storage-options {options}")  # fmt: skip
    status, job_id, logs = submit_and_wait(two_nodes, entrypoint)
    assert status == "SUCCEEDED", logs
    assert "3 slides done, 0 failed, 0 already done" in logs

    slides = read_s3_parquet(s3_server, bucket, "results/slides.parquet")
    stems = [s.rsplit("-", 1)[0] for s in slides.slide_id]
    assert sorted(stems) == ["slide-0", "slide-1", "slide-2"]
    assert read_s3_parquet(s3_server, bucket, "results/failures.parquet").empty
    nuclei = read_s3_nuclei(s3_server, bucket, "results")
    assert nuclei.groupby("slide_id").size().to_dict() == dict(zip(stems, slides.nuclei_count))
    pd.testing.assert_frame_equal(nuclei, local_reference(cohort_slides, tmp_path / "local"))
    truth = sum(s.n_nuclei for s in cohort_slides)
    assert abs(len(nuclei) - truth) <= 0.03 * truth

    ran_on = wait_for("tasks recorded on both nodes", lambda: nodes_used(two_nodes, job_id), 30.0,
                      lambda: f"nodes by task: {task_nodes(two_nodes, job_id)}")  # fmt: skip
    assert {"prepare_task", "tiles_task"} <= set(ran_on), ran_on  # CPU nodes: a batch in one task

    status, _, logs = submit_and_wait(two_nodes, entrypoint)  # resubmitting resumes: nothing left to do
    assert status == "SUCCEEDED", logs
    assert "0 slides done, 0 failed, 3 already done" in logs
