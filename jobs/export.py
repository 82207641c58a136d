"""``nucleiscope export qupath``: a run's finished slides as GeoJSON files QuPath imports."""

from __future__ import annotations

import argparse
import json
import logging

from ..pipeline.common.errors import ConfigError
from ..pipeline.common.redact import redact
from ..pipeline.export.qupath import QupathExportConfig, default_target, export_qupath
from ..pipeline.slides.inputs import with_s3_retries

log = logging.getLogger(__name__)


def add_export_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``export`` command and its formats."""
    export = sub.add_parser("export", help="finished results in other tools' formats (qupath)")
    formats = export.add_subparsers(dest="format", required=True)
    qupath = formats.add_parser(
        "qupath", help="one gzipped GeoJSON file of detections per slide, for QuPath 0.4-0.6 (File > Import objects)"
    )
    qupath.add_argument("out", help="output folder or URL of an extract run")
    qupath.add_argument("--slides", nargs="+", default=None, metavar="ID",
                        help="only these slide ids (default: every finished slide)")  # fmt: skip
    qupath.add_argument("--to", default=None, help="folder or URL for <slide_id>.geojson.gz (default: OUT/qupath)")
    qupath.add_argument("--offset-px", nargs=2, type=float, default=(0.0, 0.0), metavar=("X", "Y"),
                        help="subtract this level-0 offset from every coordinate, for a viewer whose origin "
                             "is the slide's non-empty bounds (default: 0 0)")  # fmt: skip
    qupath.add_argument("--storage-options", default=None, help="JSON of fsspec storage options (e.g. S3 endpoint)")


def run_export(args: argparse.Namespace) -> int:
    """Run ``export <format>``; 0 when every slide was exported, 1 when any failed."""
    try:
        options = json.loads(args.storage_options) if args.storage_options else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--storage-options is not valid JSON: {exc}") from exc
    to = args.to or default_target(args.out)
    config = QupathExportConfig(offset_px=(args.offset_px[0], args.offset_px[1]),
                                storage_options=with_s3_retries(options, [args.out, to]))  # fmt: skip
    outcome = export_qupath(args.out, to=to, slide_ids=args.slides, config=config)
    for item in outcome.done:
        rate = item.features / item.seconds if item.seconds > 0 else 0.0
        log.info("%s: %d nuclei in %.1f s (%.0f/s)", item.slide_id, item.features, item.seconds, rate)
    print(f"{len(outcome.done)} slides exported for QuPath, {len(outcome.failed)} failed; "
          f"files in {redact(to)}")  # fmt: skip
    return 1 if outcome.failed else 0
