"""The Ray driver's segmentation actors: a pool that follows the cluster, and lost workers.

The pool is sized from the cluster's resources whenever the driver re-reads them:
it grows up to what the cluster offers (and ``max_actors``) and retires idle actors
when nodes leave. An actor takes work only once it runs (its ``info`` call has
returned); after its process dies it takes none until it runs again. When no actor
has been able to run for ``start_timeout_s`` (``--gpus`` on a cluster without
GPUs), the run stops with a ``ConfigError`` saying so.

A batch whose worker died is retried; one that died once is retried *alone* on an
idle actor (nothing else queued there), so a tile that kills its worker every time
is named after a bounded number of tries and innocent batches that died beside it
go on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray import ObjectRef
from ray.actor import ActorHandle

from ..actors.resources import WorkerResources
from ..actors.segment import SEGMENT_ACTOR_OPTIONS, SegmentActor
from ..pipeline.common.errors import ConfigError, NucleiscopeError
from ..pipeline.extraction.config import ExtractConfig

log = logging.getLogger(__name__)

#: Ray errors that mean a worker process, its node or an object it held was lost (not a bad input).
LOST_WORKER_ERRORS: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OutOfMemoryError,
    ray.exceptions.LocalRayletDiedError,
)


#: Segmentation actors found dead for good (not restarting) that a run replaces, at most.
MAX_REPLACED = 16


class WorkerLostError(NucleiscopeError):
    """Workers kept dying on a slide's work (a poison tile, out of memory): ``reason`` says where."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_lost_worker(exc: BaseException) -> bool:
    """Whether ``exc`` (a task's cause, unwrapped) is a lost worker rather than an error of the work."""
    return isinstance(exc, LOST_WORKER_ERRORS)


def actor_id(handle: ActorHandle[Any]) -> str:
    """The hex id Ray puts in ``RayActorError.actor_id`` for this actor."""
    return str(handle._actor_id.hex())


def lost_actor_id(exc: BaseException) -> str | None:
    """The id of the actor whose loss ``exc`` reports, if it reports one."""
    return getattr(exc, "actor_id", None) if isinstance(exc, ray.exceptions.RayActorError) else None


@dataclass
class PoolActor:
    """One segmentation actor and the driver's view of it."""

    handle: ActorHandle[Any]
    actor_id: str
    ping: ObjectRef[dict[str, Any]] | None  #: its pending ``info`` call until it runs (again)
    info: dict[str, Any] | None = None
    load: int = 0  #: batches sent to it whose write has not returned yet
    exclusive: bool = False  #: running a batch that died before, alone
    draining: bool = False  #: takes no new batch (a retried batch waits for it to be idle)
    retiring: bool = False  #: ended once idle (the cluster shrank)

    @property
    def running(self) -> bool:
        return self.ping is None


class SegmentPool:
    """Segmentation actors of one cohort run, keyed by a number that is never reused."""

    def __init__(self, config: ExtractConfig, resources: WorkerResources, start_timeout_s: float,
                 size: int | None = None) -> None:
        self.config, self.resources, self.start_timeout_s = config, resources, start_timeout_s
        self.members: dict[int, PoolActor] = {}
        self.by_id: dict[str, int] = {}
        self.next_key = 0
        self.idle_since = time.monotonic()  #: since when no actor has been running
        self.start_failed: BaseException | None = None  #: an actor's constructor raised: grow no more
        self.replaced = 0  #: actors found dead for good and replaced
        self.resize(resources.actors if size is None else size)

    # --- size -------------------------------------------------------------------------
    def resize(self, target: int, resources: WorkerResources | None = None) -> None:
        """Grow to ``target`` actors, or retire idle ones beyond it (waiting ones first)."""
        self.resources = resources or self.resources
        live = [k for k, m in self.members.items() if not m.retiring]
        for _ in range(0 if self.start_failed else target - len(live)):
            self._add()
        if len(live) > target:
            idle = sorted((k for k in live if self.members[k].load == 0), key=lambda k: self.members[k].running)
            for key in idle[: len(live) - target]:
                self.members[key].retiring = True
        self._end_retired()

    def _add(self) -> None:
        handle: ActorHandle[Any] = SegmentActor.options(**self.resources.actor_options(), **SEGMENT_ACTOR_OPTIONS)\
            .remote(self.config.segmenter, self.config.model_path, self.config.tta)
        key, self.next_key = self.next_key, self.next_key + 1
        self.members[key] = PoolActor(handle, actor_id(handle), handle.info.remote())
        self.by_id[self.members[key].actor_id] = key
        log.info("segmentation actor %d started (%d in the pool)", key, len(self.members))

    def _end_retired(self) -> None:
        for key in [k for k, m in self.members.items() if m.retiring and m.load == 0]:
            self._drop(key)
            log.info("segmentation actor %d retired (%d in the pool)", key, len(self.members))

    @property
    def size(self) -> int:
        return sum(not m.retiring for m in self.members.values())

    @property
    def handles(self) -> list[ActorHandle[Any]]:
        return [m.handle for m in self.members.values()]

    # --- readiness --------------------------------------------------------------------
    @property
    def pings(self) -> dict[ObjectRef[dict[str, Any]], int]:
        return {m.ping: k for k, m in self.members.items() if m.ping is not None}

    def pinged(self, ref: ObjectRef[dict[str, Any]], key: int) -> None:
        """An actor's ``info`` returned: it runs; or it is restarting (ask again); or it is dead
        for good (replace it); or its constructor raised (drop it; raise once none is left)."""
        member = self.members.get(key)
        if member is None or member.ping != ref:
            return
        try:
            member.info = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if exc.actor_init_failed:
                self._drop(key)
                log.error("a segmentation actor could not start: %s", exc)
                self.start_failed = exc
                if not self.members:
                    raise NucleiscopeError(f"no segmentation actor could start: {exc}") from exc
            elif isinstance(exc, ray.exceptions.ActorDiedError) and self.replaced < MAX_REPLACED:
                self._drop(key)
                self.replaced += 1
                self._add()
            else:
                member.ping = member.handle.info.remote()
            return
        member.ping = None

    def _drop(self, key: int) -> None:
        member = self.members.pop(key)
        self.by_id.pop(member.actor_id, None)
        ray.kill(member.handle)

    def lost(self, exc: BaseException) -> bool:
        """Note that ``exc`` reports one of these actors died; whether it did."""
        key = self.by_id.get(lost_actor_id(exc) or "")
        if key is None:
            return False
        member = self.members[key]
        if member.ping is None:
            member.ping = member.handle.info.remote()
        return True

    def check_running(self) -> None:
        """Raise ConfigError when no actor has run for ``start_timeout_s`` (they cannot be placed)."""
        now = time.monotonic()
        if not self.members or any(m.running for m in self.members.values()):
            self.idle_since = now
        elif now - self.idle_since > self.start_timeout_s:
            cluster = ray.cluster_resources()  # type: ignore[no-untyped-call]
            raise ConfigError(
                f"no segmentation actor could run for {self.start_timeout_s:.0f} s: each asks for "
                f"{self.resources.actor_bundle() or 'no resources'}, the cluster has "
                f"{ {k: v for k, v in sorted(cluster.items()) if '_group_' not in k and 'node:' not in k} }; "
                "add such nodes, give an autoscaler more time (--gpu-wait-s) or drop --gpus")

    # --- work -------------------------------------------------------------------------
    def pick(self, alone: bool = False) -> int | None:
        """An actor for a batch (least loaded), or None when none can take it now.

        ``alone``: the batch died before, so it gets an idle actor to itself; when none
        is idle the least loaded one stops taking other batches until it is.
        """
        ready = [k for k, m in self.members.items() if m.running and not (m.retiring or m.exclusive)]
        if alone:
            idle = [k for k in ready if self.members[k].load == 0]
            if idle:
                self.members[idle[0]].exclusive = True
                self.members[idle[0]].draining = False
                return idle[0]
            if ready and not any(self.members[k].draining for k in ready):
                self.members[min(ready, key=lambda k: self.members[k].load)].draining = True
            return None
        ready = [k for k in ready if not self.members[k].draining]
        return min(ready, key=lambda k: self.members[k].load) if ready else None

    def undrain(self) -> None:
        """No retried batch waits any more (its slide failed or started again): every actor
        takes new batches again (a draining actor would otherwise idle for good)."""
        for member in self.members.values():
            member.draining = False

    def take(self, key: int) -> ActorHandle[Any]:
        self.members[key].load += 1
        return self.members[key].handle

    def release(self, key: int) -> None:
        """A batch sent to actor ``key`` is through (written or failed)."""
        member = self.members.get(key)
        if member is not None:
            member.load -= 1
            member.exclusive = False
        self._end_retired()

    def is_member(self, exc: BaseException) -> bool:
        return (lost_actor_id(exc) or "") in self.by_id

    def survey(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """``info`` of every running actor now (pid, node, batches served)."""
        refs: list[ObjectRef[dict[str, Any]]] = [m.handle.info.remote() for m in self.members.values() if m.running]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        return [ray.get(r) for r in ready]

    def kill_all(self) -> None:
        for member in self.members.values():
            ray.kill(member.handle)
