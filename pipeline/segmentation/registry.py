"""The segmenter registry: build a segmenter by name, find the shipped weights."""

from __future__ import annotations

from ..common.errors import ConfigError
from ..networks import weights_dir
from .protocol import Segmenter


def make_segmenter(
    name: str, model_path: str | None = None, *, tta: bool | None = None, device: str | None = None
) -> Segmenter:
    """Build a segmenter by name; heavy dependencies (torch) load only when needed."""
    if name == "classical":
        from .classical import ClassicalSegmenter

        return ClassicalSegmenter()
    if name == "attention":
        model_path = model_path or shipped_weights("attention")
        if not model_path:
            raise ConfigError("the attention segmenter needs model weights (--model PATH)")
        from .attention import AttentionSegmenter

        return AttentionSegmenter(model_path, device=device, tta=True if tta is None else tta)
    if name == "student":
        from .student import StudentSegmenter

        path = model_path or shipped_weights("student")
        if path is None:
            raise ConfigError("the student segmenter needs weights (--model PATH); none are shipped")
        return StudentSegmenter(path, device=device, tta=bool(tta))
    raise ConfigError(f"unknown segmenter {name!r}; choose classical, attention or student")


#: Weights files shipped in pipeline/networks/weights/, by segmenter name.
SHIPPED_WEIGHTS = {"attention": "attention_f.safetensors", "student": "student.safetensors"}


def shipped_weights(name: str) -> str | None:
    """Path of the weights shipped for segmenter ``name``, or None."""
    if name not in SHIPPED_WEIGHTS:
        return None
    path = weights_dir() / SHIPPED_WEIGHTS[name]
    return str(path) if path.exists() else None


def default_segmenter() -> tuple[str, str | None]:
    """The segmenter used when none is named: the shipped self-trained student (it beats
    the classical baseline on MoNuSeg), else the classical baseline."""
    path = shipped_weights("student")
    return ("student", path) if path is not None else ("classical", None)


def segmenter_for_weights(path: str) -> str:
    """"student" or "attention", from the architecture recorded in a weights file."""
    from ..networks.attention_net import read_metadata

    return "student" if read_metadata(path).get("arch") == "student_unet" else "attention"
