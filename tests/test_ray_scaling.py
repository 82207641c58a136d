"""The driver follows its cluster (a head and nodes that come and go, as ``ray start``
processes on this machine, set up like tests/test_cluster.py):

* a node that joins after the run started gets a segmentation actor (each holds one
  ``seg`` resource, a stand-in for a GPU) and that actor gets work;
* a node killed mid-run (SIGKILL of its whole process group) costs retries, and the
  ``nucleiscope extract`` run still ends with every slide done and the same tables;
* the driver asks an autoscaler for the resources of its pending work, and withdraws
  the request when it ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from nucleiscope.jobs.run_local import run_cohort_local
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.segmentation.registry import make_segmenter
from nucleiscope.pipeline.slides.inputs import expand_inputs
from tests.synthetic import write_synthetic_slide
from tests.tables import tables
from tests.test_cluster import (
    START_TIMEOUT_S,
    TwoNodeCluster,
    alive_nodes,
    free_port,
    no_ray_address,
    node_args,
    node_env,
    start_node,
    tear_down,
    wait_for,
)

TILE_PX = 256
RUN_TIMEOUT_S = 300.0
REPO = Path(__file__).resolve().parents[1]

__all__ = ["no_ray_address"]  # a fixture this module uses


@dataclass
class Elastic:
    """A one-node cluster (head with 1 CPU and one ``seg``) to which tests add nodes."""

    api: TwoNodeCluster  # state API access (worker_node_id unused)
    address: str
    env: dict[str, str]
    temp_root: Path
    nodes: list[subprocess.Popen[bytes]]

    def add_node(self, name: str) -> tuple[subprocess.Popen[bytes], str]:
        """Start a node like the head (1 CPU, one ``seg``); (its process, its node id) once alive."""
        before = {n.node_id for n in alive_nodes(self.api, len(self.nodes)) or []}
        args = ["--address", self.address, *node_args(self.temp_root / name), "--resources", '{"seg": 1}']
        proc = start_node(args, self.temp_root / f"{name}.log", self.env)
        self.nodes.append(proc)
        nodes = wait_for(f"node {name}", lambda: alive_nodes(self.api, len(self.nodes)), START_TIMEOUT_S,
                         self.api.logs)  # fmt: skip
        return proc, next(n.node_id for n in nodes if n.node_id not in before)

    def kill_node(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the node's whole process group (raylet, its workers, its object store)."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        self.nodes.remove(proc)
        wait_for("the node to be seen dead", lambda: alive_nodes(self.api, len(self.nodes)), 120.0, self.api.logs)

    def driver(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env={**self.env, "RAY_ADDRESS": self.address},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


@pytest.fixture(scope="module")
def elastic(no_ray_address: None) -> Iterator[Elastic]:
    import secrets
    import tempfile

    temp_root = Path(tempfile.mkdtemp(prefix="nsel-", dir="/tmp"))
    token = secrets.token_hex(32)
    env = node_env(token)
    gcs_port, dash_port = free_port(), free_port()
    api = TwoNodeCluster(f"http://127.0.0.1:{dash_port}", token, "", "", temp_root)
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        nodes.append(start_node(["--head", "--port", str(gcs_port), "--include-dashboard", "true",
                                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
                                 "--ray-client-server-port", str(free_port()), *node_args(temp_root / "head"),
                                 "--resources", '{"seg": 1}'], temp_root / "head.log", env))  # fmt: skip
        head = wait_for("the head node", lambda: alive_nodes(api, 1), START_TIMEOUT_S, api.logs)[0]
        yield Elastic(api, f"{head.node_ip}:{gcs_port}", env, temp_root, nodes)
    finally:
        tear_down(nodes, temp_root)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("elastic-cohort")
    return [write_synthetic_slide(root / f"e{i}.svs", width_px=2048, height_px=1792, mpp=0.25, min_level_px=256,
                                  seed=80 + i).path for i in range(4)]  # fmt: skip


@pytest.fixture(scope="module")
def calm(slides: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cohort's tables from an undisturbed run in this process."""
    out = tmp_path_factory.mktemp("elastic-calm")
    items = expand_inputs(slides)  # the slide ids the CLI (and tests/elastic_driver.py) give them
    run_cohort_local(items, str(out), ExtractConfig(tile_px=TILE_PX), make_segmenter("classical"), show_progress=False)
    return tables(out)


def finish(proc: subprocess.Popen[str], cluster: Elastic) -> str:
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"the driver did not end in {RUN_TIMEOUT_S:.0f} s:\n{output[-4000:]}\n{cluster.api.logs()}")
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_a_node_that_joins_mid_run_gets_an_actor_and_work(
    elastic: Elastic, slides: list[str], calm: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    driver = elastic.driver("-m", "tests.elastic_driver", elastic.address, str(tmp_path / "out"), str(markers),
                            str(TILE_PX), *slides)  # fmt: skip
    wait_for("the run to start", lambda: (markers / "started").exists() or driver.poll() is not None,
             RUN_TIMEOUT_S, elastic.api.logs)  # fmt: skip
    assert driver.poll() is None, driver.communicate()[0][-4000:]
    proc, joined = elastic.add_node("joined")
    (markers / "joined").touch()
    try:
        output = finish(driver, elastic)
    finally:
        elastic.kill_node(proc)
    result: dict[str, Any] = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    assert (result["done"], result["failed"]) == (4, 0), output[-4000:]
    assert result["pool_sizes"] == [1, 2], result
    on_joined = [a for a in result["actors"] if a["node_id"] == joined]
    assert on_joined and on_joined[0]["served"] >= 1, result
    nuclei, records = tables(tmp_path / "out")
    pd.testing.assert_frame_equal(nuclei, calm[0])
    pd.testing.assert_frame_equal(records, calm[1])


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_a_node_killed_mid_run_costs_retries_not_slides(
    elastic: Elastic, slides: list[str], calm: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    proc, _ = elastic.add_node("doomed")
    out = tmp_path / "out"
    # One batch in flight: the cohort takes long enough after its first commit for the kill to
    # land mid-run (with fused CPU tasks these small slides are otherwise done within a second).
    driver = elastic.driver("-m", "nucleiscope.jobs.cli", "extract", *slides, "--out", str(out), "--tile-px",
                            str(TILE_PX), "--segmenter", "classical", "--no-progress", "--max-batches", "1")  # fmt: skip
    committed = lambda: list(out.glob("nuclei/slide_id=*/*.parquet"))  # noqa: E731
    wait_for("a first slide committed", lambda: committed() or driver.poll() is not None, RUN_TIMEOUT_S,
             elastic.api.logs)  # fmt: skip
    elastic.kill_node(proc)
    assert driver.poll() is None and len(committed()) < len(slides), "the run ended before the node was killed"
    output = finish(driver, elastic)
    print(output[-6000:])  # what the driver did about it (pytest -s)
    assert f"{len(slides)} slides done, 0 failed, 0 already done" in output, output[-4000:]
    assert not (out / "failures.parquet").exists() or pd.read_parquet(out / "failures.parquet").empty
    nuclei, records = tables(out)
    pd.testing.assert_frame_equal(nuclei, calm[0])
    pd.testing.assert_frame_equal(records, calm[1])


@pytest.mark.usefixtures("ray_cluster")
def test_the_pending_work_is_asked_of_the_autoscaler(
    slides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nucleiscope.jobs.run_ray import RayCohort, RayOptions, run_cohort_ray

    requests: list[dict[str, Any]] = []
    monkeypatch.setattr("ray.autoscaler.sdk.request_resources", lambda **kw: requests.append(kw))
    options = RayOptions(tiles_per_batch=2, max_batches=4, refresh_s=0.2)
    first: list[int] = []

    def pause_once(cohort: RayCohort, event: str, slide_id: str) -> None:
        if event == "batch" and not first:  # the driver's refresh is due when this returns
            first.append(len(requests))
            import time

            time.sleep(0.5)

    result = run_cohort_ray(expand_inputs(slides[:1]), str(tmp_path), ExtractConfig(tile_px=TILE_PX),
                            make_segmenter("classical"), options=options, show_progress=False,
                            on_event=pause_once)  # fmt: skip
    assert result.done == 1
    tiles = int(pd.read_parquet(tmp_path / "slides.parquet").tiles.iloc[0])
    batches = -(-tiles // 2)
    asked = [r["num_cpus"] for r in requests]
    assert asked[0] == 1  # before anything is known: the slide's prepare task
    # after the first batch is written, one CPU per batch still to be written (CPU actors need no bundle)
    assert batches - 1 in asked[first[0]:] and max(asked) <= batches, (asked, batches)
    assert all(r["bundles"] == [] for r in requests[:-1])
    assert requests[-1] == {"num_cpus": 0, "bundles": []}  # withdrawn at the end


@pytest.mark.usefixtures("ray_cluster")
def test_the_pool_grows_retires_idle_actors_and_skips_dead_ones() -> None:
    import ray

    from nucleiscope.actors.resources import WorkerResources
    from nucleiscope.jobs.ray_pool import SegmentPool

    pool = SegmentPool(ExtractConfig(), WorkerResources(1, 0.0, 0.0, 1.0), start_timeout_s=60)
    try:
        pool.resize(3)
        assert pool.size == 3 and pool.pick() is None  # none runs yet: none takes work
        for ref, key in pool.pings.items():
            ray.wait([ref], timeout=60)
            pool.pinged(ref, key)
        busy = pool.pick()
        assert busy is not None
        pool.take(busy)
        pool.resize(1)  # the cluster shrank: the two idle actors go, the busy one stays
        assert pool.size == 1 and list(pool.members) == [busy]
        ray.kill(pool.members[busy].handle, no_restart=False)  # its process dies; Ray restarts it
        assert pool.lost(ray.exceptions.ActorDiedError()) is False  # an error naming no actor of the pool
        error = ray.exceptions.RayActorError(actor_id=pool.members[busy].actor_id)
        assert pool.lost(error) and pool.pick() is None  # not used until it runs again
        pool.release(busy)
        for _ in range(100):  # asked again while it restarts, until it answers
            if not pool.pings:
                break
            ref, key = next(iter(pool.pings.items()))
            ray.wait([ref], timeout=60)
            pool.pinged(ref, key)
        assert pool.pick() == busy
        pool.take(busy)  # a batch died before: it waits for an idle actor, which drains meanwhile
        assert pool.pick(alone=True) is None and pool.pick() is None
        pool.undrain()  # its slide started again: no retried batch waits, the actor takes work again
        assert pool.pick() == busy
    finally:
        pool.kill_all()
