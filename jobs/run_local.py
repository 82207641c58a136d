"""Cohort drivers' shared parts, and the in-process driver (``extract --local``).

A bad slide becomes a failures row and the cohort goes on. Both drivers check that
``out`` holds no results of another configuration or model, skip slides already
committed with this one (resume), and write the same records and tables.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from tqdm import tqdm

from ..pipeline.common.errors import ConfigError, NucleiscopeError
from ..pipeline.extraction.config import ExtractConfig
from ..pipeline.extraction.extract import SlideFailure, extract_slide
from ..pipeline.extraction.identity import RunIdentity, resolved_config, run_identity
from ..pipeline.measure.outputs import (
    consolidate,
    package_versions,
    read_run_json,
    reconcile,
    write_failure_record,
    write_run_json,
    write_slide_record,
)
from ..pipeline.segmentation.protocol import Segmenter
from ..pipeline.slides.fingerprint import fingerprints
from ..pipeline.slides.inputs import SlideInput, redact, redacted_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortResult:
    """What a cohort run did."""

    done: int
    failed: int
    skipped: int
    out: str


def start_run(out: str, config: ExtractConfig, segmenter: Segmenter, items: Sequence[SlideInput], *,
              device: str | None = None) -> RunIdentity:
    """Check ``out`` against earlier runs, write run.json and return the run's identity
    (``device``: where the network runs, default where ``segmenter`` is).

    Raises ConfigError when ``out`` holds results of another config, model, version, device
    or precision: rows of two identities never mix in one output.
    """
    identity = run_identity(config, segmenter, device)
    earlier = read_run_json(out, storage_options=config.storage_options)
    if earlier is not None and earlier.get("config_hash") != identity.config_hash:
        raise ConfigError(
            f"{redact(out)} holds results of another configuration, model, version or device "
            f"(config hash {earlier.get('config_hash')}, this run {identity.config_hash}); choose a new --out"
        )
    payload: dict[str, Any] = {
        "started_at": datetime.now(timezone.utc).isoformat(),
        "config": config.public_dict(),
        "resolved_config": resolved_config(config, segmenter),
        "storage_options": redacted_options(config.storage_options),
        **identity.metadata(),
        "seg_mpp": config.seg_mpp or segmenter.mpp,
        "context_um": segmenter.context_um,
        "versions": package_versions(),
        "slides": [{"slide_id": i.slide_id, "uri": redact(i.uri), "mpp": i.mpp} for i in items],
    }
    write_run_json(out, payload, storage_options=config.storage_options)
    return identity


def pending_items(items: Sequence[SlideInput], out: str, identity: RunIdentity,
                  config: ExtractConfig) -> list[SlideInput]:
    """The slides not yet committed in their present form (resume).

    A slide is done when its record (same id, so same location) has this run's config
    hash, the same µm/px override and the fingerprint (size, ETag or mtime) the file has
    now (one it cannot read now is kept as done: a storage hiccup must not discard results);
    a changed file is redone and its rows replaced. A slide whose own record is
    missing but whose fingerprint and override equal those of a done slide that this run
    does not name has moved: it is not redone, and that record learns its new URI.
    """
    ledger = reconcile(out, storage_options=config.storage_options)
    done = {k: r for k, r in ledger.done.items() if r.get("config_hash") == identity.config_hash}
    ids = {i.slide_id for i in items}
    absent = {(r.get("fingerprint"), r.get("mpp_override")): r for k, r in done.items()
              if k not in ids and r.get("fingerprint")}  # fmt: skip
    wanted = [i.uri for i in items if absent or i.slide_id in done]
    prints = fingerprints(wanted, config.storage_options)
    todo: list[SlideInput] = []
    for item in items:
        key = (prints.get(item.uri), item.mpp or config.mpp_override)
        record = done.get(item.slide_id)
        if record is not None and key[0] is None and record.get("mpp_override") == key[1]:
            log.warning("slide %s: cannot read its size and version now; kept as done", item.slide_id)
            continue
        if record is not None and (record.get("fingerprint"), record.get("mpp_override")) == key:
            continue
        moved = absent.pop(key, None) if key[0] is not None and record is None else None
        if moved is not None:
            log.info("slide %s moved to %s: not redone", moved["slide_id"], redact(item.uri))
            write_slide_record(out, {**moved, "uri": redact(item.uri)}, storage_options=config.storage_options)
            continue
        if record is not None:
            log.info("slide %s changed (file or mpp override): redone", item.slide_id)
        todo.append(item)
    if len(todo) < len(items):
        log.info("resuming: %d slides already committed with this config are skipped", len(items) - len(todo))
    return todo


def record_failure(out: str, config: ExtractConfig, item: SlideInput, failure: BaseException) -> None:
    """Write the failures record of a slide from the error that stopped it."""
    cause = failure.cause if isinstance(failure, SlideFailure) else failure
    stage = failure.stage if isinstance(failure, SlideFailure) else "ray"
    message = getattr(cause, "reason", None) if isinstance(cause, NucleiscopeError) else None
    message = redact(message or str(cause) or repr(cause))
    log.error("slide %s failed at %s: %s: %s", item.slide_id, stage, type(cause).__name__, message)
    write_failure_record(out, item.slide_id, redact(item.uri), stage, type(cause).__name__, message,
                         storage_options=config.storage_options)  # fmt: skip


def run_cohort_local(
    items: Sequence[SlideInput], out: str, config: ExtractConfig, segmenter: Segmenter, *, show_progress: bool = True
) -> CohortResult:
    """Extract every pending slide of ``items`` into ``out`` in this process."""
    identity = start_run(out, config, segmenter, items)
    todo = pending_items(items, out, identity, config)
    done = failed = committed = 0
    started = time.perf_counter()
    bar = tqdm(todo, unit="slide", disable=not show_progress)

    def on_tile(tiles_done: int, tiles: int, nuclei: int) -> None:  # nuclei as tiles finish
        rate = (committed + nuclei) / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(nuclei=committed + nuclei, nuclei_per_s=f"{rate:.0f}", tile=f"{tiles_done}/{tiles}")

    for item in bar:
        try:
            record = extract_slide(item.uri, out, config, segmenter, slide_id=item.slide_id, mpp_override=item.mpp,
                                   identity=identity, progress=on_tile if show_progress else None)  # fmt: skip
        except SlideFailure as failure:
            failed += 1
            record_failure(out, config, item, failure)
        else:
            done += 1
            committed += int(record["nuclei_count"])
            log.info("slide %s: %d nuclei in %.1f s", item.slide_id, record["nuclei_count"], record["seconds_total"])
    consolidate(out, storage_options=config.storage_options)
    return CohortResult(done, failed, len(items) - len(todo), out)
