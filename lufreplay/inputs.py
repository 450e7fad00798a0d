"""Checks of command-line values that the option parsers let through (NaN, infinities, integers past int64)."""

from __future__ import annotations

import math
from typing import Any

#: Largest model option values: integers stay well inside int64 (numba), floats inside what a
#: seconds/microseconds option can mean (1e9 s is 31 years) and what converts to int64 nanoseconds.
MAX_INT_OPTION = 1 << 62
MAX_FLOAT_OPTION = 1e9


def check_option_values(opts: dict[str, Any]) -> str | None:
    """The first model option whose value no model can use, as an error message; None when all are fine."""
    for name, v in opts.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            return f"option {name}: {v} is not a finite number"
        limit = MAX_INT_OPTION if isinstance(v, int) else MAX_FLOAT_OPTION
        if abs(v) > limit:
            return f"option {name}: {v} is too large (at most {limit})"
    return None


def positive_seconds(flag: str, v: float | None) -> str | None:
    """An error message when a duration option is not a positive finite number of seconds."""
    if v is None:
        return None
    if not math.isfinite(v) or v <= 0:
        return f"{flag} must be a positive number of seconds, not {v}"
    return None
