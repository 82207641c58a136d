"""A fixed split of labelled images into a training part and a validation part.

The split is a TOML file with ``train`` and ``validation`` arrays of image stems (file
names without suffix), optionally an ``[organs]`` table. Training job files name it in
their ``[[sources]]`` (``split``, ``part``) so that no training stage can see a validation
image; the quality benchmark scores both parts from the same file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..common.errors import ConfigError
from ..common.tomlfile import read_toml

PARTS = ("train", "validation")


@dataclass(frozen=True)
class Split:
    """Image stems of each part (disjoint), and the organ of each stem where known."""

    train: tuple[str, ...]
    validation: tuple[str, ...]
    organs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        both = sorted(set(self.train) & set(self.validation))
        if both:
            raise ConfigError(f"images in both parts of the split: {both}")
        if not self.train or not self.validation:
            raise ConfigError("a split needs at least one training and one validation image")

    def part(self, name: str) -> tuple[str, ...]:
        """The stems of part ``name`` ("train" or "validation")."""
        if name not in PARTS:
            raise ConfigError(f"split part must be one of {PARTS}, got {name!r}")
        return self.train if name == "train" else self.validation


def load_split(path: str | os.PathLike[str]) -> Split:
    """Read a split file; ConfigError naming the file when it is missing or malformed."""
    name = os.fspath(path)
    data = read_toml(name, "split file")
    parts = {}
    for key in PARTS:
        value = data.get(key)
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ConfigError(f"{name}: {key} must be an array of image stems")
        parts[key] = tuple(value)
    organs = data.get("organs", {})
    if not isinstance(organs, dict):
        raise ConfigError(f"{name}: [organs] must be a table")
    try:
        return Split(parts["train"], parts["validation"], {str(k): str(v) for k, v in organs.items()})
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from exc
