"""Pictures a pathologist would check, from what nucleiscope writes (docs/quality/*.png).

    python benchmarks/quality_pictures.py [--out docs/quality] [--segmenter student]

Runs ``nucleiscope extract --local`` on CMU-1-Small-Region.svs (20x skin) and
OS-1-detail.ome.tif (40x) from ../shared/data/slides and draws the nucleus table's
outlines (level-0 polygons) on the slide: green kept, yellow flagged as a possible
non-nucleus (the ``artefact`` column); objects dropped as ink are not in the table, so
nothing is drawn on them. For three validation images of the MoNuSeg split it draws the
annotated outlines (left) beside the segmenter's (right). Crops are level-0 pixels,
enlarged 2x where the slide is 20x; PNGs are palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import shapely
from numpy.typing import NDArray
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
#: name -> (slide file, (x0, y0, x1, y1) level-0 px, what a reader should look for)
CROPS = {
    "cmu1-epidermis": ("CMU-1-Small-Region.svs", (950, 1500, 1250, 1800), "epidermis: one outline per nucleus"),
    "cmu1-dermis": ("CMU-1-Small-Region.svs", (600, 2000, 900, 2300), "dermis"),
    "cmu1-ink-margin": ("CMU-1-Small-Region.svs", (1700, 1080, 2000, 1380), "teal ink: no outlines on it"),
    "cmu1-keratin": ("CMU-1-Small-Region.svs", (1250, 1200, 1550, 1500), "keratin: flagged (yellow) or not"),
    "os1": ("OS-1-detail.ome.tif", (300, 300, 800, 800), "OS-1, 40x"),
}
VALIDATION = ("TCGA-A7-A13E-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1", "TCGA-CH-5767-01Z-00-DX1")
KEPT, FLAGGED, TRUTH = (0, 255, 0), (255, 255, 0), (0, 160, 255)


def extract(slide: Path, out: Path, segmenter: str) -> None:
    cmd = [sys.executable, "-m", "nucleiscope.jobs.cli", "extract", str(slide), "--out", str(out), "--local",
           "--segmenter", segmenter]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def outlines(table_dir: Path) -> tuple[list[NDArray[np.float64]], list[bool]]:
    """Exterior rings (level-0 px) of every nucleus, and whether each is flagged."""
    table = pq.read_table(table_dir)
    rings = [np.asarray(g.exterior.coords) for g in shapely.from_wkb(table.column("geometry").to_numpy())]
    flagged = [a is not None for a in table.column("artefact").to_pylist()]
    return rings, flagged


def draw(rgb: NDArray[np.uint8], rings: list[tuple[NDArray[np.float64], tuple[int, int, int]]],
         origin: tuple[int, int], zoom: int, title: str) -> Image.Image:
    image = Image.fromarray(rgb).resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.Resampling.NEAREST)
    pen = ImageDraw.Draw(image)
    for ring, colour in rings:
        xy = [((x - origin[0]) * zoom, (y - origin[1]) * zoom) for x, y in ring]
        if len(xy) > 2:
            pen.line([*xy, xy[0]], fill=colour, width=zoom)
    pen.rectangle([0, 0, min(image.width, 7 * len(title) + 6), 13], fill=(255, 255, 255))
    pen.text((3, 1), title, fill=(0, 0, 0))
    return image


def save(image: Image.Image, path: Path) -> None:
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {path.stat().st_size // 1024} kB")


def slide_crops(out: Path, segmenter: str, work: Path) -> None:
    from nucleiscope.pipeline.slides.slide import Slide

    for name, (file, (x0, y0, x1, y1), note) in CROPS.items():
        run = work / Path(file).stem
        if not run.exists():
            extract(SHARED / "slides" / file, run, segmenter)
        rings, flagged = outlines(run / "nuclei")
        inside = [(r, FLAGGED if f else KEPT) for r, f in zip(rings, flagged)
                  if x0 <= r[:, 0].mean() < x1 and y0 <= r[:, 1].mean() < y1]  # fmt: skip
        with Slide.open(str(SHARED / "slides" / file)) as slide:
            rgb = slide.read_region(x0, y0, x1 - x0, y1 - y0, slide.info.mpp)
            zoom = 2 if slide.info.mpp > 0.4 else 1
        n_flag = sum(c == FLAGGED for _, c in inside)
        title = f"{name} ({segmenter}): {len(inside)} nuclei, {n_flag} flagged - {note}"
        save(draw(rgb, inside, (x0, y0), zoom, title), out / f"{name}.png")


def validation_pairs(out: Path, segmenter: str) -> None:
    from skimage.measure import find_contours

    from nucleiscope.jobs.segment_images import segment_image
    from nucleiscope.pipeline.common.images import read_rgb
    from nucleiscope.pipeline.evaluation.metrics import quality_pair, read_label_image
    from nucleiscope.pipeline.segmentation.registry import make_segmenter

    seg = make_segmenter(segmenter)
    box = (300, 300, 700, 700)
    for stem in VALIDATION:
        rgb = read_rgb(SHARED / "monuseg-train" / "images" / f"{stem}.tif")
        truth = read_label_image(SHARED / "monuseg-train" / "labels" / f"{stem}.png")
        pred = segment_image(rgb, 0.25, seg)
        scores = quality_pair(truth, pred)
        panels = []
        for labels, colour, what in ((truth, TRUTH, "annotation"), (pred, KEPT, segmenter)):
            crop = labels[box[1]:box[3], box[0]:box[2]]
            rings = []
            for value in np.unique(crop[crop > 0]):
                for c in find_contours(np.pad(crop == value, 1).astype(float), 0.5):
                    rings.append((c[:, ::-1] - 1 + np.array(box[:2]), colour))
            title = f"{stem[:12]} {what}" + ("" if labels is truth else
                                             f": AJI {scores['aji']:.2f} area ratio {scores['area_ratio']:.2f}")
            panels.append(draw(rgb[box[1]:box[3], box[0]:box[2]], rings, box[:2], 1, title))
        pair = Image.new("RGB", (panels[0].width * 2 + 4, panels[0].height), (255, 255, 255))
        pair.paste(panels[0], (0, 0))
        pair.paste(panels[1], (panels[0].width + 4, 0))
        save(pair, out / f"validation-{stem[:12]}.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "quality"))
    parser.add_argument("--segmenter", default="student")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"needs {SHARED} (the team's data)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        slide_crops(out, args.segmenter, Path(tmp))
    validation_pairs(out, args.segmenter)
    return 0


if __name__ == "__main__":
    sys.exit(main())
