"""The writer actors of a cohort run: a few long-lived ones, each holding the slides given to it."""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray import ObjectRef
from ray.actor import ActorHandle

from ..actors.segment import SlideWriterActor
from ..pipeline.extraction.config import ExtractConfig
from ..pipeline.extraction.extract import PreparedSlide
from ..pipeline.extraction.identity import RunIdentity
from .ray_pool import actor_id

log = logging.getLogger(__name__)


class WriterPool:
    """Up to ``size`` writer actors, started when first needed and kept for the run.

    A slide goes to the writer holding the fewest slides; one writer per slide in flight is
    the most there are. A writer that died is dropped (its slides start again on others).
    """

    def __init__(self, out: str, config: ExtractConfig, identity: RunIdentity) -> None:
        self.out, self.config, self.identity = out, config, identity
        self.load: dict[str, tuple[ActorHandle[Any], set[str]]] = {}  # actor id -> (handle, its slides)

    def assign(self, prepared: PreparedSlide | ObjectRef[PreparedSlide], slide_id: str, size: int) -> ActorHandle[Any]:
        """The writer of ``slide_id`` from now on (told to open it)."""
        if len(self.load) < max(1, size) and all(self.load[k][1] for k in self.load):
            handle = SlideWriterActor.remote(self.out, self.config, self.identity)  # type: ignore[attr-defined]
            self.load[actor_id(handle)] = (handle, set())
            log.debug("writer %d started", len(self.load))
        key = min(self.load, key=lambda k: len(self.load[k][1]))
        handle, slides = self.load[key]
        slides.add(slide_id)
        handle.open.remote(prepared)
        return handle

    def release(self, handle: ActorHandle[Any], slide_id: str) -> None:
        """``slide_id`` is no longer on ``handle`` (committed, failed or started again)."""
        entry = self.load.get(actor_id(handle))
        if entry is not None:
            entry[1].discard(slide_id)

    def lost(self, handle: ActorHandle[Any]) -> None:
        """``handle`` died: never give it a slide again."""
        entry = self.load.pop(actor_id(handle), None)
        if entry is not None:
            ray.kill(entry[0])

    def kill_all(self) -> None:
        for handle, _ in self.load.values():
            ray.kill(handle)
        self.load.clear()
