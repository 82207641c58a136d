"""An output's tables as two runs of the same slides must agree: the comparison helpers of the
resume, chaos and scaling tests."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

#: slides.parquet columns that differ between two runs of the same slides: timings, when, and the
#: token in the nucleus file's name.
RUN_COLUMNS = ("seconds_", "tiles_per_s", "finished_at", "nuclei_file")


def nuclei_frame(out: Path) -> pd.DataFrame:
    """Every nucleus row under ``out/nuclei`` (empty when there is none), in a fixed order."""
    if not (out / "nuclei").exists():
        return pd.DataFrame()
    frame = pd.read_parquet(out / "nuclei")
    frame["slide_id"] = frame["slide_id"].astype(str)
    return frame.sort_values(["slide_id", "nucleus_id"]).reset_index(drop=True)


def slides_frame(out: Path) -> pd.DataFrame:
    """slides.parquet without the columns that differ between runs, in a fixed order."""
    frame = pd.read_parquet(out / "slides.parquet")
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith(RUN_COLUMNS)])
    return frame.sort_values("slide_id").reset_index(drop=True)


def tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(nuclei, slides) of ``out``."""
    return nuclei_frame(out), slides_frame(out)
