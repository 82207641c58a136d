"""Small checks shared by the frozen config dataclasses of every stage."""

from __future__ import annotations

import math


def finite_number(value: object) -> bool:
    """Whether ``value`` is a finite int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
