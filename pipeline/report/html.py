"""The report page: one static HTML file; every string from the data is escaped."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

import pyarrow as pa

from ..measure.cohort import DEFAULT_QC

#: Columns of the cohort table shown on the page (all of them are in cohort.csv), with headings.
COHORT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("slide_id", "slide"), ("tissue_area_mm2", "tissue mm²"), ("nuclei_count", "nuclei"),
    ("nuclei_per_mm2", "nuclei / mm²"), ("lymphocyte_like_per_mm2", "lymphocyte-like / mm²"),
    ("lymphocyte_like_fraction", "lymphocyte-like share"), ("area_um2_median", "area µm² (median)"),
    ("circularity_median", "circularity (median)"), ("eccentricity_median", "eccentricity (median)"),
    ("hematoxylin_od_mean_median", "haematoxylin OD (median)"), ("hematoxylin_od_z", "H z"),
    ("eosin_od_mean_median", "eosin OD (median)"), ("eosin_od_z", "E z"),
    ("artefacts_flagged_fraction", "flagged share"), ("artefacts_dropped", "dropped"), ("qc_flags", "QC flags"),
)
FAILURE_COLUMNS: tuple[str, ...] = ("slide_id", "uri", "stage", "error_type", "message", "failed_at")

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #eee; } td.text { text-align: left; }
tr.flagged td { background: #fde8e8; }
img { max-width: 100%; border: 1px solid #ddd; }
img.qc { max-height: 420px; }
section.slide { border-top: 2px solid #999; margin-top: 2em; }
p.note { font-size: 13px; color: #555; max-width: 70em; }
"""


@dataclass(frozen=True)
class SlideSection:
    """One slide's part of the page: its row of the cohort table and its pictures (file names)."""

    slide_id: str
    row: Mapping[str, Any]
    qc_png: str | None
    density_png: str | None
    histograms_png: str | None


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<td>–</td>"
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}"
        return f"<td>{text}</td>"
    if isinstance(value, int):
        return f"<td>{value:,}</td>"
    return f'<td class="text">{escape(str(value))}</td>'


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], flag: str | None = None) -> str:
    head = "".join(f"<th>{escape(title)}</th>" for _, title in columns)
    body = []
    for row in rows:
        css = ' class="flagged"' if flag is not None and row.get(flag) is False else ""
        cells = "".join(_cell(row.get(name)) for name, _ in columns)
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(name: str | None, alt: str, css: str = "") -> str:
    if name is None:
        return f"<p class=\"note\">{escape(alt)}: none.</p>"
    klass = f' class="{css}"' if css else ""
    return f'<img{klass} src="{escape(name, quote=True)}" alt="{escape(alt, quote=True)}">'


def render_page(*, out: str, run: Mapping[str, Any] | None, cohort: pa.Table, failures: pa.Table,
                sections: Sequence[SlideSection], cohort_pngs: Sequence[str]) -> str:
    """The whole page as a string."""
    run, qc = run or {}, DEFAULT_QC
    facts = [("output", out), ("segmenter", run.get("segmenter")), ("config hash", run.get("config_hash")),
             ("nucleiscope", run.get("nucleiscope_version")), ("device", run.get("device")),
             ("slides done", cohort.num_rows), ("slides failed", failures.num_rows)]
    fact_rows = "".join(f"<tr><th>{escape(k)}</th>{_cell(v)}</tr>" for k, v in facts)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>nucleiscope report: {escape(out)}</title><style>{_STYLE}</style></head><body>",
        "<h1>nucleiscope report</h1>", f"<table>{fact_rows}</table>",
        "<h2>Cohort</h2>",
        '<p class="note">One row per finished slide (<a href="cohort.csv">cohort.csv</a> has every column of '
        f"cohort.parquet). Rows with a QC flag are shaded: low_tissue (under {qc.min_tissue_mm2:g} mm² of "
        "tissue), stain_outlier_* (median nuclear haematoxylin or eosin OD with a robust z-score beyond "
        f"{qc.max_stain_z:g} against the cohort; needs {qc.min_slides} slides), artefacts (over "
        f"{qc.max_flagged_fraction:.0%} of nuclei flagged or over {qc.max_dropped_fraction:.0%} of objects "
        "dropped as ink). "
        "Lymphocyte-like is a morphology rule (small, round, dark, evenly stained), not a classifier.</p>",
        _table(cohort.to_pylist(), COHORT_COLUMNS, flag="qc_ok"),
        *(_img(name, "cohort plot") for name in cohort_pngs),
        "<h2>Failures</h2>",
        _table(failures.to_pylist(), [(c, c) for c in FAILURE_COLUMNS]) if failures.num_rows
        else '<p class="note">No slide failed.</p>',
    ]
    for section in sections:
        parts += [
            '<section class="slide">', f"<h2>{escape(section.slide_id)}</h2>",
            _table([section.row], COHORT_COLUMNS[1:], flag="qc_ok"),
            '<p class="note">QC picture: every nucleus outlined in green.</p>',
            _img(section.qc_png, f"QC picture of {section.slide_id}", "qc"),
            _img(section.density_png, f"density maps of {section.slide_id}"),
            _img(section.histograms_png, f"histograms of {section.slide_id}"),
            "</section>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


__all__ = ["COHORT_COLUMNS", "SlideSection", "render_page"]
