"""Cohort drivers' shared parts, and the in-process driver (``extract --local``).

A bad slide becomes a failures row and the cohort goes on. Both drivers check that
``out`` holds no results of another configuration or model, skip slides already
committed with this one (resume), and write the same records and tables.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from tqdm import tqdm

from ..pipeline.common.errors import ConfigError, NucleiscopeError
from ..pipeline.extraction.config import ExtractConfig
from ..pipeline.extraction.extract import SlideFailure, config_hash, extract_slide
from ..pipeline.measure.outputs import (
    clear_failure_record,
    consolidate,
    package_versions,
    read_run_json,
    read_slide_records,
    write_failure_record,
    write_run_json,
)
from ..pipeline.segmentation.protocol import Segmenter
from ..pipeline.slides.inputs import SlideInput, redact, redacted_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortResult:
    """What a cohort run did."""

    done: int
    failed: int
    skipped: int
    out: str


def start_run(out: str, config: ExtractConfig, segmenter: Segmenter, items: Sequence[SlideInput]) -> str:
    """Check ``out`` against earlier runs and write run.json; returns the config hash.

    Raises ConfigError when ``out`` holds results of another config or model: rows of
    two configurations never mix in one output.
    """
    chash = config_hash(config, segmenter.model_id)
    earlier = read_run_json(out, storage_options=config.storage_options)
    if earlier is not None and earlier.get("config_hash") != chash:
        raise ConfigError(
            f"{redact(out)} holds results of another configuration or model "
            f"(config hash {earlier.get('config_hash')}, this run {chash}); choose a new --out"
        )
    payload: dict[str, Any] = {
        "started_at": datetime.now(timezone.utc).isoformat(),
        "config": config.public_dict(),
        "storage_options": redacted_options(config.storage_options),
        "segmenter": segmenter.name,
        "model_id": segmenter.model_id,
        "seg_mpp": config.seg_mpp or segmenter.mpp,
        "context_um": segmenter.context_um,
        "config_hash": chash,
        "versions": package_versions(),
        "slides": [{"slide_id": i.slide_id, "uri": redact(i.uri), "mpp": i.mpp} for i in items],
    }
    write_run_json(out, payload, storage_options=config.storage_options)
    return chash


def pending_items(items: Sequence[SlideInput], out: str, chash: str, config: ExtractConfig) -> list[SlideInput]:
    """The slides not yet committed with this config and model (resume)."""
    records = read_slide_records(out, storage_options=config.storage_options)
    done = {sid for sid, rec in records.items() if rec.get("config_hash") == chash}
    todo = [i for i in items if i.slide_id not in done]
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
    chash = start_run(out, config, segmenter, items)
    todo = pending_items(items, out, chash, config)
    done = failed = 0
    for item in tqdm(todo, unit="slide", disable=not show_progress):
        try:
            record = extract_slide(item.uri, out, config, segmenter, slide_id=item.slide_id, mpp_override=item.mpp)
        except SlideFailure as failure:
            failed += 1
            record_failure(out, config, item, failure)
        else:
            done += 1
            clear_failure_record(out, item.slide_id, storage_options=config.storage_options)
            log.info("slide %s: %d nuclei in %.1f s", item.slide_id, record["nuclei_count"], record["seconds_total"])
    consolidate(out, storage_options=config.storage_options)
    return CohortResult(done, failed, len(items) - len(todo), out)
