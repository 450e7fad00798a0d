"""The one JSON encoder of every ``--json`` output, meta.json and results.json: strict JSON only.

Strict means what ``JSON.parse`` and ``json.loads(..., parse_constant=...)`` accept: no NaN or Infinity.
A non-finite float becomes ``null`` (its meaning, "unbounded" or "undefined", is documented where the
value is produced); numpy scalars and arrays become plain numbers and lists; Paths and other objects
become their ``str``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def plain(obj: Any) -> Any:
    """``obj`` with every value converted to a strict-JSON-safe Python value (recursively)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, str) else k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return plain(obj.item())
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def dumps(obj: Any, indent: int | None = 1, sort_keys: bool = False) -> str:
    """Strict JSON text of ``obj`` (``allow_nan=False`` double-checks that nothing non-finite slipped through)."""
    return json.dumps(plain(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def loads_strict(text: str) -> Any:
    """Parse JSON, refusing NaN/Infinity (what tests use to check outputs)."""

    def bad(c: str) -> Any:
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(text, parse_constant=bad)
