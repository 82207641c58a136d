"""``nucleiscope report OUT``: a static HTML report of an output, in a local folder."""

from __future__ import annotations

import json
from pathlib import Path

from ..pipeline.common.errors import ConfigError
from ..pipeline.common.redact import redact
from ..pipeline.common.storage import is_local, resolve


def report_folder(out: str, to: str | None) -> str:
    """``to``, else ``OUT/report`` when the output is local (a URL needs ``--to``)."""
    if to:
        return to
    fs, root = resolve(out, None)
    if not is_local(fs):
        raise ConfigError(f"{redact(out)} is not a local folder: say where the report goes with --to DIR")
    return str(Path(root) / "report")


def run_report(out: str, to: str | None, storage_options: str | None) -> int:
    """Build the report and print where it is; returns the exit code (0)."""
    from ..pipeline.report.build import build_report

    try:
        options = json.loads(storage_options) if storage_options else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--storage-options is not valid JSON: {exc}") from exc
    result = build_report(out, report_folder(out, to), storage_options=options)
    print(f"report of {result.slides} slides ({result.nuclei:,} nuclei, {result.failures} failed): {result.index}")
    return 0
