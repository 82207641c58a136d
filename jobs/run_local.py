"""In-process cohort driver: every slide through the spine, one after another.

A bad slide becomes a failures row and the cohort goes on. The Ray driver reuses
the same per-slide function and the same records.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from tqdm import tqdm

from ..pipeline.config import ExtractConfig
from ..pipeline.errors import NucleiscopeError
from ..pipeline.extract import SlideFailure, config_hash, extract_slide
from ..pipeline.outputs import (
    clear_failure_record,
    consolidate,
    package_versions,
    write_failure_record,
    write_run_json,
)
from ..pipeline.segmenters import Segmenter, make_segmenter
from ..pipeline.slide import slide_id_from_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortResult:
    """What a cohort run did."""

    done: int
    failed: int
    out: str


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Paths and local globs to a sorted, de-duplicated list of slide URIs."""
    uris: list[str] = []
    for item in inputs:
        if "://" not in item and any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                log.warning("no file matches %s", item)
            uris.extend(matches)
        else:
            uris.append(item)
    return list(dict.fromkeys(uris))


def unique_slide_ids(uris: Sequence[str]) -> list[str]:
    """Slide ids from URIs, suffixed where two slides would share one."""
    seen: dict[str, int] = {}
    ids = []
    for uri in uris:
        base = slide_id_from_uri(uri)
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.append(base if n == 0 else f"{base}-{n + 1}")
    return ids


def run_payload(config: ExtractConfig, segmenter: Segmenter, uris: Sequence[str]) -> dict[str, Any]:
    """The run.json content: resolved config, model identity, versions, inputs."""
    return {
        "started_at": datetime.now(timezone.utc).isoformat(),
        "config": config.public_dict(),
        "segmenter": segmenter.name,
        "model_id": segmenter.model_id,
        "seg_mpp": config.seg_mpp or segmenter.mpp,
        "context_um": segmenter.context_um,
        "config_hash": config_hash(config, segmenter.model_id),
        "versions": package_versions(),
        "slides": list(uris),
    }


def run_cohort(
    inputs: Sequence[str], out: str, config: ExtractConfig, *, show_progress: bool = True
) -> CohortResult:
    """Extract every slide of ``inputs`` into ``out`` in this process."""
    uris = expand_inputs(inputs)
    segmenter = make_segmenter(config.segmenter, config.model_path, tta=config.tta)
    if "://" not in out:
        os.makedirs(out, exist_ok=True)
    write_run_json(out, run_payload(config, segmenter, uris), storage_options=config.storage_options)
    done = failed = 0
    bar = tqdm(total=len(uris), unit="slide", disable=not show_progress)
    for uri, slide_id in zip(uris, unique_slide_ids(uris)):
        bar.set_postfix_str(slide_id[:30])
        try:
            record = extract_slide(uri, out, config, segmenter, slide_id=slide_id)
        except SlideFailure as failure:
            failed += 1
            cause = failure.cause
            message = cause.reason if isinstance(cause, NucleiscopeError) and hasattr(cause, "reason") else str(cause)
            log.error("slide %s failed at %s: %s: %s", slide_id, failure.stage, type(cause).__name__, message)
            write_failure_record(
                out, slide_id, uri, failure.stage, type(cause).__name__, message or repr(cause),
                storage_options=config.storage_options,
            )
        else:
            done += 1
            clear_failure_record(out, slide_id, storage_options=config.storage_options)
            log.info("slide %s: %d nuclei in %.1f s", slide_id, record["nuclei_count"], record["seconds_total"])
        bar.update(1)
    bar.close()
    consolidate(out, storage_options=config.storage_options)
    return CohortResult(done, failed, out)
