"""One slide, end to end, in one process: open, tissue, tiles, segment, measure, write.

This is the spine the Ray job distributes: every function here is pure Python over
paths, arrays and tables. A slide's results are committed atomically at the end; a
failure anywhere raises, and the caller records it as a failures row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from .config import ExtractConfig
from .morphometrics import measure_nuclei
from .outputs import NucleiWriter, QcCanvas, write_slide_record
from .segmenters import Segmenter, SlideStats
from .slide import Slide, SlideInfo, slide_id_from_uri
from .summary import SlideSummary
from .tiling import Tile, TilePlan, keep_owned, plan_tiles
from .tissue import tissue_area_mm2, tissue_mask

log = logging.getLogger(__name__)

#: Edge (working px) and number of the fixed patches a segmenter is fitted on.
FIT_PATCH_PX = 384
FIT_PATCHES = 16

ProgressFn = Callable[[int, int], None]


@dataclass
class StageTimer:
    """Seconds spent per stage; ``stage`` names the stage running now (for failures)."""

    seconds: dict[str, float] = field(default_factory=dict)
    stage: str = "open"

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.stage = name
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class SlideFailure(Exception):
    """Wraps the error that stopped a slide, with the stage it stopped in."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {cause}")
        self.stage = stage
        self.cause = cause


def config_hash(config: ExtractConfig, model_id: str) -> str:
    """Identifier of everything that decides a slide's rows (config and model)."""
    payload = json.dumps({"config": config.public_dict(), "model_id": model_id}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def fit_view(slide: Slide, mask: NDArray[np.bool_], mask_mpp: float, seg_mpp: float) -> NDArray[np.uint8]:
    """A mosaic of up to FIT_PATCHES tissue patches at ``seg_mpp``, independent of tiling.

    Patches sit at evenly spaced tissue pixels of the mask, so the per-slide
    statistics a segmenter fits on do not depend on the tile size.
    """
    info = slide.info
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        ys, xs = np.array([mask.shape[0] // 2]), np.array([mask.shape[1] // 2])
    picks = np.unique(np.linspace(0, ys.size - 1, min(FIT_PATCHES, ys.size)).round().astype(int))
    step = mask_mpp / info.mpp  # level-0 px per mask px
    half = FIT_PATCH_PX * seg_mpp / info.mpp / 2
    patches = [
        slide.read_region((xs[k] + 0.5) * step - half, (ys[k] + 0.5) * step - half, FIT_PATCH_PX, FIT_PATCH_PX, seg_mpp)
        for k in picks
    ]
    cols = math.ceil(math.sqrt(len(patches)))
    rows = math.ceil(len(patches) / cols)
    mosaic = np.full((rows * FIT_PATCH_PX, cols * FIT_PATCH_PX, 3), 255, dtype=np.uint8)
    for n, patch in enumerate(patches):
        r, c = divmod(n, cols)
        mosaic[r * FIT_PATCH_PX : (r + 1) * FIT_PATCH_PX, c * FIT_PATCH_PX : (c + 1) * FIT_PATCH_PX] = patch
    return mosaic


def segment_tile(
    slide: Slide, tile: Tile, plan: TilePlan, segmenter: Segmenter, stats: SlideStats,
    seg_mpp: float, slide_id: str, timer: StageTimer,
) -> pa.Table:
    """Read one tile window, segment it, keep the nuclei its core owns, measure them."""
    scale = plan.scale
    with timer("read"):
        rgb = slide.read_region(tile.x_px * scale, tile.y_px * scale, tile.size_px, tile.size_px, seg_mpp)
    with timer("segment"):
        evidence = segmenter.predict(rgb, seg_mpp, stats)
    with timer("postprocess"):
        labels = keep_owned(segmenter.postprocess(evidence, seg_mpp, stats), tile)
    with timer("measure"):
        table = measure_nuclei(
            labels, rgb, mpp=slide.info.mpp, origin_px=(tile.x_px * scale, tile.y_px * scale),
            scale=scale, slide_id=slide_id,
        )
    return order_rows(table)


def order_rows(table: pa.Table) -> pa.Table:
    """Rows in a deterministic order (centroid y, then x) so ids do not depend on labels."""
    if table.num_rows < 2:
        return table
    return table.sort_by([("centroid_y_px", "ascending"), ("centroid_x_px", "ascending")])


def number_rows(table: pa.Table, first_id: int) -> pa.Table:
    """Replace ``nucleus_id`` by a slide-wide running number starting at ``first_id``."""
    ids = pa.array(np.arange(first_id, first_id + table.num_rows, dtype=np.int64))
    return table.set_column(table.schema.get_field_index("nucleus_id"), "nucleus_id", ids)


def extract_slide(
    uri: str,
    out: str,
    config: ExtractConfig,
    segmenter: Segmenter,
    *,
    slide_id: str | None = None,
    mpp_override: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Extract every nucleus of one slide into ``out``; returns the slide's summary record.

    Raises ``SlideFailure`` (with the stage and the original error) when the slide
    cannot be processed; nothing of that slide is committed then.
    """
    slide_id = slide_id or slide_id_from_uri(uri)
    timer = StageTimer()
    start = time.perf_counter()
    try:
        return _extract(uri, out, config, segmenter, slide_id, mpp_override, storage_options, progress, timer, start)
    except Exception as exc:  # every failure becomes a failures row upstream
        raise SlideFailure(timer.stage, exc) from exc


def _extract(
    uri: str, out: str, config: ExtractConfig, segmenter: Segmenter, slide_id: str,
    mpp_override: float | None, storage_options: Mapping[str, Any] | None,
    progress: ProgressFn | None, timer: StageTimer, start: float,
) -> dict[str, Any]:
    opts = storage_options if storage_options is not None else config.storage_options
    seg_mpp = config.seg_mpp or segmenter.mpp
    with timer("open"):
        slide = Slide.open(uri, storage_options=opts, mpp_override=mpp_override or config.mpp_override)
    with slide:
        info = slide.info
        with timer("tissue"):
            thumb = slide.thumbnail(config.tissue_mpp)
            mask = tissue_mask(thumb, config.tissue_mpp)
            area_mm2 = tissue_area_mm2(mask, config.tissue_mpp)
            stats = segmenter.fit(fit_view(slide, mask, config.tissue_mpp, seg_mpp), seg_mpp)
            tiles_cfg = config.tiles(math.ceil(segmenter.context_um / seg_mpp))
            plan = plan_tiles(
                info.width_px, info.height_px, seg_mpp / info.mpp, tiles_cfg, mask, config.tissue_mpp / info.mpp
            )
        log.info("%s: %d of %d tiles on tissue at %.3f µm/px", slide_id, len(plan.tiles), plan.total_tiles, seg_mpp)
        with timer("tissue"):
            qc = QcCanvas(slide.thumbnail(qc_mpp(info, config.qc_max_px)), (info.width_px, info.height_px))
        writer = NucleiWriter(out, slide_id, storage_options=opts)
        summary = SlideSummary()
        try:
            count = 0
            for done, tile in enumerate(plan.tiles, start=1):
                table = number_rows(segment_tile(slide, tile, plan, segmenter, stats, seg_mpp, slide_id, timer), count)
                count += table.num_rows
                with timer("write"):
                    writer.write(table)
                    qc.add(table)
                    summary.add(table)
                if progress is not None:
                    progress(done, len(plan.tiles))
            with timer("write"):
                writer.commit()
                qc.save(out, slide_id, storage_options=opts)
        except BaseException:
            writer.abort()
            raise
    record = _record(uri, slide_id, info, config, segmenter, seg_mpp, plan, area_mm2, timer, start, summary)
    write_slide_record(out, record, storage_options=opts)
    return record


def qc_mpp(info: SlideInfo, max_px: int) -> float:
    """µm/px of the QC picture: the slide at most ``max_px`` on its longer edge."""
    return info.mpp * max(1.0, max(info.width_px, info.height_px) / max_px)


def _record(
    uri: str, slide_id: str, info: SlideInfo, config: ExtractConfig, segmenter: Segmenter,
    seg_mpp: float, plan: TilePlan, area_mm2: float, timer: StageTimer, start: float,
    summary: SlideSummary,
) -> dict[str, Any]:
    total = time.perf_counter() - start
    seconds = {f"seconds_{k}": round(v, 4) for k, v in timer.seconds.items()}
    compute = sum(timer.seconds.get(k, 0.0) for k in ("read", "segment", "postprocess", "measure"))
    return summary.finish(
        slide_id=slide_id, uri=uri, width_px=info.width_px, height_px=info.height_px,
        mpp=info.mpp, mpp_source=info.mpp_source, seg_mpp=seg_mpp, segmenter=segmenter.name,
        model_id=segmenter.model_id, config_hash=config_hash(config, segmenter.model_id),
        tissue_area_mm2=area_mm2, tiles=len(plan.tiles), tile_px=plan.tile_px, overlap_px=plan.overlap_px,
        megapixels=len(plan.tiles) * plan.tile_px**2 / 1e6,
        tiles_per_s=len(plan.tiles) / compute if compute > 0 else 0.0,
        seconds_total=round(total, 4), finished_at=datetime.now(timezone.utc).isoformat(),
        **seconds,
    )
