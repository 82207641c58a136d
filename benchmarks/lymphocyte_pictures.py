"""Pictures of the lymphocyte-like flag: crops with flagged nuclei outlined in yellow, the others in cyan.

Usage:
    python benchmarks/lymphocyte_pictures.py slide OUT SLIDE_ID PNG [--crop-um 160] [--view-mpp 0.5]
    python benchmarks/lymphocyte_pictures.py monuseg IMAGE_ID PNG [DATA_DIR]

``slide``: reads an extract output (its slides.parquet row gives the slide's file) and draws two
crops: around the 50 µm cell with the most lymphocyte-like nuclei, and around the cell with the
most nuclei of which none is lymphocyte-like (the rule's other side). ``monuseg``: the annotated
outlines of a MoNuSeg image (labels, not a segmenter), flagged by the rule with the image's own
reference; two crops chosen the same way. Every picture's title says what it counts.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
import tifffile
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from numpy.typing import NDArray
from PIL import Image
from skimage.measure import find_contours

from nucleiscope.pipeline.evaluation.metrics import read_label_image
from nucleiscope.pipeline.measure.lymphocytes import DEFAULT_RULE, hematoxylin_reference, lymphocyte_like
from nucleiscope.pipeline.measure.morphometrics import measure_nuclei
from nucleiscope.pipeline.slides.slide import Slide

FLAGGED, OTHER = "#ffff00", "#00d5ff"
CELL_UM = 50.0
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "monuseg-train"


def pick_centres(x: NDArray[np.float64], y: NDArray[np.float64], flag: NDArray[np.bool_],
                 apart_um: float) -> list[tuple[float, float]]:
    """Centres (µm) of the cell with most flagged nuclei and of the busiest cell with none flagged
    at least ``apart_um`` from it (so the two crops show different tissue)."""
    cx, cy = np.floor(x / CELL_UM).astype(int), np.floor(y / CELL_UM).astype(int)
    frame = pd.DataFrame({"cx": cx, "cy": cy, "flag": flag})
    cells = frame.groupby(["cx", "cy"])["flag"].agg(["sum", "count"]).reset_index()
    best = cells.loc[cells["sum"].idxmax()]
    far = np.hypot(cells.cx - best.cx, cells.cy - best.cy) * CELL_UM >= apart_um
    plain = cells[far & (cells["sum"] == 0)]
    plain = plain if len(plain) else cells[far] if far.any() else cells
    other = plain.loc[plain["count"].idxmax()]
    return [((float(c.cx) + 0.5) * CELL_UM, (float(c.cy) + 0.5) * CELL_UM) for c in (best, other)]


def draw(panels: list[tuple[NDArray[np.uint8], list[NDArray[np.float64]], list[bool], str]], title: str,
         png: Path) -> None:
    """Crops side by side; rings are (N, 2) x, y in crop pixels."""
    figure = Figure(figsize=(5.2 * len(panels), 5.6), dpi=80, layout="constrained")
    for ax, (rgb, rings, flags, caption) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.imshow(rgb, interpolation="nearest")
        for colour, want in ((OTHER, False), (FLAGGED, True)):
            segments = [r for r, f in zip(rings, flags) if f == want]
            ax.add_collection(LineCollection(segments, colors=colour, linewidths=1.6))
        ax.set_xlim(0, rgb.shape[1])
        ax.set_ylim(rgb.shape[0], 0)
        ax.set_axis_off()
        ax.set_title(caption, fontsize=10)
    figure.suptitle(f"{title}\nyellow: lymphocyte_like, cyan: other nuclei", fontsize=11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    with Image.open(buffer) as image:  # 256 colours: a third of the bytes, no visible loss at this scale
        image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(png, optimize=True)
    print(f"{png}: {png.stat().st_size / 1024:.0f} KB")


def slide_pictures(out: Path, slide_id: str, png: Path, crop_um: float, view_mpp: float) -> None:
    slides = pd.read_parquet(out / "slides.parquet").set_index("slide_id")
    row = slides.loc[slide_id]
    nuclei = pd.read_parquet(out / "nuclei" / f"slide_id={slide_id}" / row.nuclei_file)
    flag = nuclei["lymphocyte_like"].fillna(False).to_numpy(bool)
    centres = pick_centres(nuclei.centroid_x_um.to_numpy(), nuclei.centroid_y_um.to_numpy(), flag, crop_um)
    size = int(round(crop_um / view_mpp))
    panels = []
    with Slide.open(str(row.uri), mpp_override=float(row.mpp)) as slide:
        for (x_um, y_um), what in zip(centres, ("most flagged", "most nuclei, none flagged")):
            span_px = crop_um / row.mpp  # the crop stays inside the slide
            x0 = float(np.clip((x_um - crop_um / 2) / row.mpp, 0, max(row.width_px - span_px, 0)))
            y0 = float(np.clip((y_um - crop_um / 2) / row.mpp, 0, max(row.height_px - span_px, 0)))
            x_um, y_um = (x0 + span_px / 2) * row.mpp, (y0 + span_px / 2) * row.mpp
            rgb = slide.read_region(x0, y0, size, size, view_mpp)
            inside = ((nuclei.centroid_x_um - x_um).abs() < crop_um / 2 + 10) & \
                     ((nuclei.centroid_y_um - y_um).abs() < crop_um / 2 + 10)
            rows = nuclei[inside]
            rings = [np.asarray(shapely.from_wkb(g).exterior.coords) for g in rows.geometry]
            rings = [(r - (x0, y0)) * row.mpp / view_mpp for r in rings]
            flags = rows["lymphocyte_like"].fillna(False).astype(bool).tolist()
            panels.append((rgb, rings, flags, f"around the 50 µm cell with the {what}: {sum(flags)} of {len(flags)}"))
    total = f"{int(flag.sum()):,} of {len(flag):,} nuclei lymphocyte-like"
    draw(panels, f"{slide_id} ({row.segmenter}, {crop_um:g} µm crops): {total}", png)


def monuseg_pictures(image_id: str, png: Path, data_dir: Path, mpp: float = 0.25) -> None:
    rgb = tifffile.imread(data_dir / "images" / f"{image_id}.tif")[..., :3]
    labels = read_label_image(data_dir / "labels" / f"{image_id}.png")
    table = measure_nuclei(labels, rgb, mpp=mpp, origin_px=(0.0, 0.0), scale=1.0, slide_id="m")
    flag = np.asarray(lymphocyte_like(table, hematoxylin_reference(rgb), DEFAULT_RULE).to_numpy(zero_copy_only=False),
                      bool)  # fmt: skip
    ids = table.column("nucleus_id").to_numpy()
    x, y = table.column("centroid_x_um").to_numpy(), table.column("centroid_y_um").to_numpy()
    panels = []
    half = int(round(60.0 / mpp))  # 120 µm crops
    for (x_um, y_um), what in zip(pick_centres(x, y, flag, 120.0), ("most flagged", "most nuclei, none flagged")):
        c, r = int(x_um / mpp), int(y_um / mpp)
        r0, c0 = max(0, min(r - half, rgb.shape[0] - 2 * half)), max(0, min(c - half, rgb.shape[1] - 2 * half))
        crop, lab = rgb[r0:r0 + 2 * half, c0:c0 + 2 * half], labels[r0:r0 + 2 * half, c0:c0 + 2 * half]
        rings, flags = [], []
        for k, value in enumerate(ids):
            mask = lab == value
            if not mask.any():
                continue
            contour = max(find_contours(np.pad(mask, 1).astype(float), 0.5), key=len)
            rings.append(contour[:, ::-1] - 1.0)
            flags.append(bool(flag[k]))
        panels.append((crop, rings, flags, f"around the 50 µm cell with the {what}: {sum(flags)} of {len(flags)}"))
    draw(panels, f"MoNuSeg {image_id} (annotated outlines, 120 µm crops): {int(flag.sum())} of {flag.size} "
                 "lymphocyte-like", png)  # fmt: skip


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("slide")
    s.add_argument("out", type=Path)
    s.add_argument("slide_id")
    s.add_argument("png", type=Path)
    s.add_argument("--crop-um", type=float, default=160.0)
    s.add_argument("--view-mpp", type=float, default=0.5)
    m = sub.add_parser("monuseg")
    m.add_argument("image_id")
    m.add_argument("png", type=Path)
    m.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    if args.mode == "slide":
        slide_pictures(args.out, args.slide_id, args.png, args.crop_um, args.view_mpp)
    else:
        monuseg_pictures(args.image_id, args.png, args.data_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
