"""TOML files read whole, with errors translated into ``ConfigError`` naming the file."""

from __future__ import annotations

import os
import tomllib
from typing import Any

from .errors import ConfigError


def read_toml(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The parsed TOML of ``path``; ``what`` names the file in errors ("config file", "split file")."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} not found: {name}") from exc
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {name}: {exc}") from exc
