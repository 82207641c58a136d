"""One slide, end to end: open, tissue, tiles, segment, measure, write.

The stages are separate functions over plain data so that the Ray job can run them
in different processes (``prepare_slide`` and ``read_tiles`` in tasks, ``predict`` in
an actor, ``measure_tiles`` in tasks, ``SlideSink`` where rows are written) and get
exactly the rows ``extract_slide`` gets in one process. A slide's results are
committed atomically at the end; a failure anywhere commits nothing of that slide.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from ..measure.artefacts import classify_objects, remove_dropped
from ..measure.lymphocytes import LymphocyteRule, hematoxylin_reference, with_flag
from ..measure.morphometrics import measure_nuclei
from ..measure.outputs import NucleiWriter, QcCanvas
from ..measure.records import clear_failure_record, drop_other_files, write_slide_record
from ..measure.summary import SlideSummary
from ..segmentation.protocol import Segmenter, SlideStats
from ..slides.inputs import redact
from ..slides.slide import Slide, SlideInfo, slide_id_from_uri
from ..tiling.plan import Tile, TilePlan, keep_owned, plan_tiles
from ..tiling.tissue import tissue_area_mm2, tissue_mask
from .config import ExtractConfig
from .identity import RunIdentity, run_identity

log = logging.getLogger(__name__)

#: Key of a measured tile table's schema metadata: objects dropped as artefacts (JSON counts).
DROPPED_KEY = b"nucleiscope.artefacts_dropped"

#: Edge (working px) and number of the fixed patches a segmenter is fitted on.
FIT_PATCH_PX = 384
FIT_PATCHES = 16

#: Called after every tile as (tiles done, tiles of the slide, nuclei written so far).
ProgressFn = Callable[[int, int, int], None]


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

    def add(self, seconds: Mapping[str, float]) -> None:
        """Add stage seconds measured elsewhere (another process)."""
        for name, value in seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value


class SlideFailure(Exception):
    """Wraps the error that stopped a slide, with the stage it stopped in."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {cause}")
        self.stage = stage
        self.cause = cause

    def __reduce__(self) -> tuple[type[SlideFailure], tuple[str, BaseException]]:
        return (SlideFailure, (self.stage, self.cause))


@dataclass(frozen=True)
class PreparedSlide:
    """Everything tiles need from their slide, computed once (picklable)."""

    uri: str
    slide_id: str
    info: SlideInfo
    stats: SlideStats
    plan: TilePlan
    seg_mpp: float
    tissue_area_mm2: float
    qc_thumbnail: NDArray[np.uint8]
    seconds: dict[str, float]
    #: Whether objects that are not nuclei are dropped / flagged (``ExtractConfig.artefacts``).
    artefacts: bool = True
    #: The file's size and version when it was opened (``slides.fingerprint``): how a rerun
    #: knows it changed.
    fingerprint: str | None = None
    #: The µm/px override this slide was run with (per slide or for the run), if any.
    mpp_override: float | None = None
    #: The lymphocyte-like rule (``ExtractConfig.lymphocytes``) and the slide's nuclear
    #: haematoxylin reference it compares against, from the fit patches (None: not judged).
    lymphocytes: LymphocyteRule | None = None
    hematoxylin_reference_od: float | None = None


def qc_mpp(info: SlideInfo, max_px: int) -> float:
    """µm/px of the QC picture: the slide at most ``max_px`` on its longer edge."""
    return info.mpp * max(1.0, max(info.width_px, info.height_px) / max_px)


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


def prepare_slide(
    uri: str, slide_id: str, config: ExtractConfig, segmenter: Segmenter, *,
    mpp_override: float | None = None, storage_options: Mapping[str, Any] | None = None,
    timer: StageTimer | None = None,
) -> PreparedSlide:
    """Open a slide, find its tissue, fit the segmenter and plan its tiles."""
    timer = timer or StageTimer()
    opts = storage_options if storage_options is not None else config.storage_options
    seg_mpp = config.seg_mpp or segmenter.mpp
    override = mpp_override or config.mpp_override
    with timer("open"):
        slide = Slide.open(uri, storage_options=opts, mpp_override=override)
    with slide:
        info = slide.info
        with timer("tissue"):
            mask = tissue_mask(slide.thumbnail(config.tissue_mpp), config.tissue_mpp)
            area_mm2 = tissue_area_mm2(mask, config.tissue_mpp)
            view = fit_view(slide, mask, config.tissue_mpp, seg_mpp)
            stats = segmenter.fit(view, seg_mpp)
            reference = hematoxylin_reference(view) if config.lymphocytes is not None else None
            tiles_cfg = config.tiles(math.ceil(segmenter.context_um / seg_mpp), segmenter.grid_px)
            plan = plan_tiles(
                info.width_px, info.height_px, seg_mpp / info.mpp, tiles_cfg, mask, config.tissue_mpp / info.mpp
            )
            qc = slide.thumbnail(qc_mpp(info, config.qc_max_px))
    log.info("%s: %d of %d tiles on tissue at %.3f µm/px", slide_id, len(plan.tiles), plan.total_tiles, seg_mpp)
    return PreparedSlide(uri, slide_id, info, stats, plan, seg_mpp, area_mm2, qc, dict(timer.seconds),
                         config.artefacts, slide.fingerprint, override, config.lymphocytes, reference)


def reopen_slide(prepared: PreparedSlide, storage_options: Mapping[str, Any] | None) -> Slide:
    """Open a prepared slide again to read tiles: its µm/px and checks are known already."""
    return Slide.open(prepared.uri, storage_options=storage_options, mpp_override=prepared.info.mpp,
                      require_brightfield=False)  # fmt: skip


def read_tiles(slide: Slide, prepared: PreparedSlide, tiles: Sequence[Tile]) -> list[NDArray[np.uint8]]:
    """The RGB windows of ``tiles`` at the working resolution."""
    s = prepared.plan.scale
    return [slide.read_region(t.x_px * s, t.y_px * s, t.size_px, t.size_px, prepared.seg_mpp) for t in tiles]


def measure_tile(
    evidence: NDArray[Any], rgb: NDArray[np.uint8], tile: Tile, prepared: PreparedSlide,
    segmenter: Segmenter, timer: StageTimer,
) -> pa.Table:
    """Post-process one tile's evidence, keep the nuclei its core owns, measure them.

    Objects that are not nuclei are dropped or flagged (``artefacts``); the counts of
    dropped ones ride along in the table's schema metadata under ``DROPPED_KEY``.
    """
    with timer("postprocess"):
        window = segmenter.postprocess(evidence, prepared.seg_mpp, prepared.stats)
        labels = keep_owned(window, tile)
    with timer("measure"):
        flags: dict[int, str] = {}
        dropped: dict[str, int] = {}
        if prepared.artefacts:
            # Judged on the whole window so that an owned object's ring sees its real neighbours.
            present = np.flatnonzero(np.bincount(labels.ravel()))
            calls = classify_objects(window, rgb, prepared.seg_mpp).select(present[present > 0])
            labels, flags, dropped = remove_dropped(labels, calls), calls.flags(), calls.dropped_counts()
        s = prepared.plan.scale
        table = measure_nuclei(
            labels, rgb, mpp=prepared.info.mpp, origin_px=(tile.x_px * s, tile.y_px * s),
            scale=s, slide_id=prepared.slide_id, flags=flags,
        )
    if prepared.lymphocytes is not None:
        table = with_flag(table, prepared.hematoxylin_reference_od, prepared.lymphocytes)
    table = order_rows(table)
    return table.replace_schema_metadata({**(table.schema.metadata or {}), DROPPED_KEY: json.dumps(dropped)})


def dropped_counts(table: pa.Table) -> dict[str, int]:
    """Objects dropped as artefacts from a ``measure_tile`` table, by reason."""
    raw = (table.schema.metadata or {}).get(DROPPED_KEY)
    return {str(k): int(v) for k, v in json.loads(raw).items()} if raw else {}


def order_rows(table: pa.Table) -> pa.Table:
    """Rows in a deterministic order (centroid y, then x) so ids do not depend on labels."""
    if table.num_rows < 2:
        return table
    return table.sort_by([("centroid_y_px", "ascending"), ("centroid_x_px", "ascending")])


class SlideSink:
    """Where a slide's rows go, in tile order: GeoParquet file, QC picture, summary.

    ``write`` numbers rows slide-wide; ``commit`` runs the commit sequence of ``records``
    (nucleus file into its partition, QC picture, the record: the commit point, then the
    slide's older files and failure record removed) and returns the record; ``abort``
    leaves nothing behind.
    """

    def __init__(self, out: str, prepared: PreparedSlide, identity: RunIdentity,
                 storage_options: Mapping[str, Any] | None) -> None:
        self.out, self.prepared, self.identity, self.options = out, prepared, identity, storage_options
        provenance = {**identity.metadata(), "mpp": prepared.info.mpp, "seg_mpp": prepared.seg_mpp}
        self.writer = NucleiWriter(out, prepared.slide_id, storage_options=storage_options, provenance=provenance)
        self.qc = QcCanvas(prepared.qc_thumbnail, (prepared.info.width_px, prepared.info.height_px))
        self.summary = SlideSummary()
        self.count = 0

    def write(self, table: pa.Table) -> None:
        self.summary.add_dropped(dropped_counts(table))
        ids = pa.array(np.arange(self.count, self.count + table.num_rows, dtype=np.int64))
        table = table.set_column(table.schema.get_field_index("nucleus_id"), "nucleus_id", ids)
        self.count += table.num_rows
        self.writer.write(table)
        self.qc.add(table)
        self.summary.add(table)

    def commit(self, timer: StageTimer, wall_seconds: float) -> dict[str, Any]:
        """Commit the slide and return its record; ``wall_seconds`` (the slide's time so far)
        is extended by the commit's own, so seconds_total covers every timed stage."""
        start = time.perf_counter()
        slide_id = self.prepared.slide_id
        with timer("write"):
            self.writer.commit()
            self.qc.save(self.out, slide_id, storage_options=self.options)
        wall_seconds += time.perf_counter() - start
        record = slide_record(self.prepared, self.identity, timer, wall_seconds, self.summary,
                              self.writer.file_name)  # fmt: skip
        write_slide_record(self.out, record, storage_options=self.options)  # the commit point
        drop_other_files(self.out, slide_id, self.writer.file_name, storage_options=self.options)
        clear_failure_record(self.out, slide_id, storage_options=self.options)
        return record

    def abort(self) -> None:
        self.writer.abort()


def extract_slide(
    uri: str, out: str, config: ExtractConfig, segmenter: Segmenter, *,
    slide_id: str | None = None, mpp_override: float | None = None,
    storage_options: Mapping[str, Any] | None = None, progress: ProgressFn | None = None,
    identity: RunIdentity | None = None,
) -> dict[str, Any]:
    """Extract every nucleus of one slide into ``out`` in this process; returns its record.
    ``identity`` (default: ``run_identity`` of config and segmenter) is what the rows record.

    Raises ``SlideFailure`` (with the stage and the original error) when the slide
    cannot be processed; nothing of that slide is committed then.
    """
    slide_id = slide_id or slide_id_from_uri(uri)
    opts = storage_options if storage_options is not None else config.storage_options
    identity = identity or run_identity(config, segmenter)
    timer = StageTimer()
    start = time.perf_counter()
    try:
        prepared = prepare_slide(uri, slide_id, config, segmenter, mpp_override=mpp_override,
                                 storage_options=opts, timer=timer)  # fmt: skip
        sink = SlideSink(out, prepared, identity, opts)
        try:
            with reopen_slide(prepared, opts) as slide:
                run_tiles(slide, prepared, segmenter, sink, timer, progress)
            return sink.commit(timer, time.perf_counter() - start)
        except BaseException:
            sink.abort()
            raise
    except Exception as exc:  # every failure becomes a failures row upstream
        raise SlideFailure(timer.stage, exc) from exc


def run_tiles(
    slide: Slide, prepared: PreparedSlide, segmenter: Segmenter, sink: SlideSink, timer: StageTimer,
    progress: ProgressFn | None = None,
) -> None:
    """Every tile of the plan through the segmenter and measurement into ``sink``, in order.

    A segmenter whose ``predict`` runs in threads of its own (a network: ``predict_uses_threads``)
    has each tile post-processed and measured in a second thread while it predicts the next,
    so measurement no longer waits for the network (their stage seconds then overlap).
    """
    tiles = prepared.plan.tiles

    def predicted(tile: Tile) -> tuple[NDArray[np.uint8], NDArray[Any]]:
        with timer("read"):
            rgb = read_tiles(slide, prepared, [tile])[0]
        with timer("segment"):
            return rgb, segmenter.predict(rgb, prepared.seg_mpp, prepared.stats)

    def written(done: int, table: pa.Table) -> None:
        with timer("write"):
            sink.write(table)
        if progress is not None:
            progress(done, len(tiles), sink.count)

    if not getattr(segmenter, "predict_uses_threads", False):
        for done, tile in enumerate(tiles, start=1):
            rgb, evidence = predicted(tile)
            written(done, measure_tile(evidence, rgb, tile, prepared, segmenter, timer))
        return
    side = StageTimer()  # the measuring thread's own (a timer's current stage is not shared)
    with ThreadPoolExecutor(1, thread_name_prefix="measure") as pool:
        waiting: tuple[int, Future[pa.Table]] | None = None
        for done, tile in enumerate(tiles, start=1):
            rgb, evidence = predicted(tile)
            if waiting is not None:
                written(waiting[0], _measured(waiting[1], side, timer))
            waiting = (done, pool.submit(measure_tile, evidence, rgb, tile, prepared, segmenter, side))
        if waiting is not None:
            written(waiting[0], _measured(waiting[1], side, timer))
    timer.add(side.seconds)


def _measured(future: Future[pa.Table], side: StageTimer, timer: StageTimer) -> pa.Table:
    """The measuring thread's table; its failure names the stage it failed in."""
    try:
        return future.result()
    except BaseException:
        timer.stage = side.stage
        raise


def slide_record(
    prepared: PreparedSlide, identity: RunIdentity, timer: StageTimer, wall_seconds: float,
    summary: SlideSummary, nuclei_file: str,
) -> dict[str, Any]:
    """The slide's row of slides.parquet (and its commit record, naming its nucleus file)."""
    info, plan = prepared.info, prepared.plan
    seconds = {f"seconds_{k}": round(v, 4) for k, v in timer.seconds.items()}
    compute = sum(timer.seconds.get(k, 0.0) for k in ("read", "segment", "postprocess", "measure"))
    return summary.finish(
        slide_id=prepared.slide_id, uri=redact(prepared.uri), width_px=info.width_px, height_px=info.height_px,
        mpp=info.mpp, mpp_source=info.mpp_source, mpp_override=prepared.mpp_override, seg_mpp=prepared.seg_mpp,
        segmenter=identity.segmenter, model_id=identity.model_id, config_hash=identity.config_hash,
        fingerprint=prepared.fingerprint, nuclei_file=nuclei_file,
        tissue_area_mm2=prepared.tissue_area_mm2, hematoxylin_reference_od=prepared.hematoxylin_reference_od,
        tiles=len(plan.tiles), tile_px=plan.tile_px,
        overlap_px=plan.overlap_px, megapixels=len(plan.tiles) * plan.tile_px**2 / 1e6,
        tiles_per_s=len(plan.tiles) / compute if compute > 0 else 0.0,
        seconds_total=round(wall_seconds, 4), finished_at=datetime.now(timezone.utc).isoformat(),
        **seconds,
    )
