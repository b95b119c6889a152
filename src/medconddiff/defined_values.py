"""Scores where some are undefined: Dice or HD95 of an empty class set is NaN (or None in JSON)."""

from __future__ import annotations

import math
from typing import Iterable, Optional


def defined(values: Iterable[Optional[float]]) -> list[float]:
    """The values that are neither None nor NaN, in order, as floats."""
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def max_defined(values: Iterable[Optional[float]]) -> float:
    """The largest defined value; NaN when none is."""
    kept = defined(values)
    return max(kept) if kept else float("nan")
