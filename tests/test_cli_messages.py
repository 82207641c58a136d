"""What the command line says: help as plain text, and bad image files named in our words."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from nucleiscope.jobs.cli import build_parser, main
from nucleiscope.pipeline.common.errors import SlideFormatError, SlideNotFoundError
from nucleiscope.pipeline.common.images import read_rgb

#: Markup that means a docstring leaked into the help (RST roles, literals, directives).
RST_MARKS = ("``", ":class:", ":func:", ":meth:", ".. ", "::")


def _parsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _parsers(child)
    return found


def test_every_help_is_plain_text() -> None:
    parsers = _parsers(build_parser())
    assert {prog for prog, _ in parsers} >= {f"nucleiscope {c}" for c in ("segment", "extract", "export qupath")}
    for prog, parser in parsers:
        text = parser.format_help()
        assert not [m for m in RST_MARKS if m in text], f"{prog} --help shows markup:\n{text}"
    top = build_parser().format_help()
    for line in ("0  success", "1  some slides or images failed", "2  bad usage or configuration"):
        assert line in top


def _good_image(path: Path) -> None:
    image = np.full((200, 200, 3), (235, 170, 205), np.uint8)
    yy, xx = np.mgrid[:200, :200]
    for cy, cx in ((50, 50), (140, 120)):
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 14**2] = (80, 45, 130)
    Image.fromarray(image).save(path)


def test_segment_names_bad_images_in_plain_words(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Not an image, damaged data, empty, a directory: each is one error line in our words, and the
    good image among them is still segmented (exit 1: some images failed)."""
    _good_image(tmp_path / "good.png")
    (tmp_path / "notes.png").write_text("meeting notes, not a picture\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    tiled = tmp_path / "tiled.tif"
    tifffile.imwrite(tiled, np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8), tile=(64, 64),
                     compression="zlib")  # fmt: skip
    (tmp_path / "cut.tif").write_bytes(tiled.read_bytes()[: tiled.stat().st_size // 2])
    names = ["notes.png", "cut.tif", "good.png", "empty.jpg", "folder.png"]
    with caplog.at_level(logging.ERROR):
        code = main(["segment", *(str(tmp_path / n) for n in names), "--out", str(tmp_path / "labels"),
                     "--mpp", "0.25", "--segmenter", "classical"])  # fmt: skip
    assert code == 1
    assert (tmp_path / "labels" / "good.tif").exists()
    errors = {Path(r.getMessage().split(":", 1)[0]).name: r.getMessage() for r in caplog.records}
    assert set(errors) == {"notes.png", "cut.tif", "empty.jpg", "folder.png"}
    assert "not an image file" in errors["notes.png"]
    assert "damaged or incomplete image data" in errors["cut.tif"]
    assert "empty file" in errors["empty.jpg"]
    assert "a directory" in errors["folder.png"]
    for message in errors.values():  # no decoder's own hints or object reprs
        assert "pip install" not in message and " object at 0x" not in message and "Traceback" not in message


def test_image_errors_chain_their_cause(tmp_path: Path) -> None:
    (tmp_path / "notes.tif").write_text("II*\0 looks like a TIFF for four bytes only")
    with pytest.raises(SlideFormatError) as caught:
        read_rgb(tmp_path / "notes.tif")
    assert caught.value.__cause__ is not None and caught.value.uri.endswith("notes.tif")
    with pytest.raises(SlideNotFoundError):
        read_rgb(tmp_path / "missing.png")
