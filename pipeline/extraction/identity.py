"""The identity of a run's rows: everything that decides them, hashed once.

``run_identity`` resolves the configuration against the segmenter (its working µm/px,
tile overlap and test-time augmentation as they will be used), names the model by the
hash of its content (the same weights at another path are the same model), and adds the
nucleiscope version and where and in what precision the network runs. Two runs with one
``config_hash`` give the same rows; an output never mixes two.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from ..segmentation.protocol import Segmenter
from .config import ExtractConfig


@dataclass(frozen=True)
class RunIdentity:
    """What a nucleus file and a slide record say made them."""

    config_hash: str
    segmenter: str
    model_id: str
    nucleiscope_version: str
    device: str
    precision: str

    def metadata(self) -> dict[str, str]:
        """The identity as strings (a nucleus file's ``nucleiscope`` metadata key)."""
        return {k: str(v) for k, v in asdict(self).items()}


def nucleiscope_version() -> str:
    """The installed nucleiscope version (``0+unknown`` when it is not installed)."""
    from .. import __version__

    return str(__version__)


def resolved_config(config: ExtractConfig, segmenter: Segmenter) -> dict[str, Any]:
    """``config`` as it acts: defaults resolved against ``segmenter``, the model named by
    content (``model_path`` left out), storage options (credentials) left out."""
    data = config.public_dict()
    data.pop("model_path", None)
    seg_mpp = config.seg_mpp or segmenter.mpp
    tiles = config.tiles(math.ceil(segmenter.context_um / seg_mpp), segmenter.grid_px)
    data.update(seg_mpp=seg_mpp, overlap_px=tiles.overlap_px, tta=getattr(segmenter, "tta", None))
    return data


def run_identity(config: ExtractConfig, segmenter: Segmenter, device: str | None = None) -> RunIdentity:
    """The identity of rows made with ``config`` by ``segmenter`` on ``device`` (a device
    kind such as ``cpu`` or ``cuda``; default: where ``segmenter`` runs now)."""
    kind = device or segmenter_device(segmenter)
    precision = segmenter.precision(kind)
    version = nucleiscope_version()
    payload = {
        "config": resolved_config(config, segmenter), "segmenter": segmenter.name, "model_id": segmenter.model_id,
        "version": version, "device": kind, "precision": precision,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return RunIdentity(digest, segmenter.name, segmenter.model_id, version, kind, precision)


def segmenter_device(segmenter: Segmenter) -> str:
    """The device kind a segmenter's network runs on (``cpu`` for the classical one)."""
    device = getattr(segmenter, "device", None)
    return str(getattr(device, "type", device or "cpu"))


__all__ = ["RunIdentity", "nucleiscope_version", "resolved_config", "run_identity", "segmenter_device"]
