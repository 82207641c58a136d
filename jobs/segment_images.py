"""``nucleiscope segment``: plain RGB images in, instance label images out."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from skimage.transform import resize

from ..pipeline.common.errors import NucleiscopeError
from ..pipeline.common.images import label_tiff_bytes, read_rgb
from ..pipeline.segmentation.protocol import Segmenter
from ..pipeline.segmentation.registry import make_segmenter

log = logging.getLogger(__name__)

#: Relative mismatch between image and segmenter µm/px tolerated without resampling.
MPP_TOLERANCE = 0.05


def segment_image(rgb: NDArray[np.uint8], mpp: float, segmenter: Segmenter) -> NDArray[np.int32]:
    """Instance labels of one image at its own size, segmenting at the segmenter's µm/px."""
    factor = mpp / segmenter.mpp
    if abs(factor - 1.0) <= MPP_TOLERANCE:
        return np.asarray(segmenter.segment(rgb, mpp, segmenter.fit(rgb, mpp)), dtype=np.int32)
    shape = (round(rgb.shape[0] * factor), round(rgb.shape[1] * factor))
    work = resize(rgb, shape, order=1, anti_aliasing=factor < 1, preserve_range=True)  # type: ignore[no-untyped-call]
    work = (work + 0.5).astype(np.uint8)
    labels = segmenter.segment(work, segmenter.mpp, segmenter.fit(work, segmenter.mpp))
    back = resize(labels, rgb.shape[:2], order=0, anti_aliasing=False, preserve_range=True)  # type: ignore[no-untyped-call]
    return np.asarray(back, dtype=np.int32)


def write_labels(path: str, labels: NDArray[np.int32]) -> None:
    """Labels as a compressed TIFF: uint16 when they fit, else uint32 (``label_tiff_bytes``)."""
    with open(path, "wb") as handle:
        handle.write(label_tiff_bytes(labels))


def run_segment(
    images: Sequence[str], out: str, mpp: float, segmenter_name: str, model: str | None, tta: bool | None
) -> int:
    """Segment every image into ``out/<stem>.tif``; 1 if any image failed, else 0."""
    segmenter = make_segmenter(segmenter_name, model, tta=tta)
    os.makedirs(out, exist_ok=True)
    failed = 0
    for path in images:
        try:
            labels = segment_image(read_rgb(path), mpp, segmenter)
        except NucleiscopeError as exc:
            failed += 1
            log.error("%s", exc)
            continue
        target = os.path.join(out, Path(path).stem + ".tif")
        write_labels(target, labels)
        log.info("%s: %d nuclei -> %s", Path(path).name, int(labels.max(initial=0)), target)
    print(f"{len(images) - failed} images segmented with {segmenter.name}, {failed} failed; labels in {out}")
    return 1 if failed else 0
