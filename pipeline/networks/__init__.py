"""Stage 4, networks and their shipped weights: the attention network F and the scale
classifier G of the method (``attention_net``), the student U-Net (``student_net``), and
the ``weights/`` folder (safetensors files and their model card).

May use: ``common``.
"""

from __future__ import annotations

from pathlib import Path


def weights_dir() -> Path:
    """The folder of the weights shipped with the package."""
    return Path(__file__).with_name("weights")
