"""The validation pass at the trace boundary: meta.json types and every value read against ``lufreplay.schema``.

``check_meta`` runs once when a trace is opened; ``check_columns`` runs on every block of rows any reader
reads (``Trace.read_file``), so no value reaches the replay or ``info`` unchecked and nothing is read twice.
Checks are vectorised (one ``min_max`` per column; the first bad row is searched only after a violation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lufreplay import schema


class TraceError(Exception):
    """A trace that cannot be used; the message names the file and the problem in one line."""


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", dict: "an object"}
_JSON_NAMES.update({list: "an array", type(None): "null"})


def _json_type(v: Any) -> str:
    return _JSON_NAMES.get(type(v), type(v).__name__)


def _type_ok(v: Any, types: tuple[type | None, ...]) -> bool:
    for t in types:
        if t is None and v is None:
            return True
        if t is int and isinstance(v, int) and not isinstance(v, bool):
            return True
        if t is float and isinstance(v, float | int) and not isinstance(v, bool):
            return True
        if t in (str, bool, dict, list) and isinstance(v, t):  # type: ignore[arg-type]
            return True
    return False


def check_meta(meta: Any, where: Path) -> None:
    """meta.json is an object whose known fields have the JSON types of ``schema.META_FIELDS``."""
    if not isinstance(meta, dict):
        raise TraceError(f"{where}: must hold a JSON object, not {_json_type(meta)}")
    for key, (types, required) in schema.META_FIELDS.items():
        parent: Any = meta
        parts = key.split(".")
        for p in parts[:-1]:
            parent = parent.get(p) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or parts[-1] not in parent:
            if required and len(parts) == 1:
                raise TraceError(f"{where}: field {key!r} missing")
            continue
        v = parent[parts[-1]]
        if not _type_ok(v, types):
            want = " or ".join(_JSON_NAMES.get(t or type(None), str(t)) for t in types)
            raise TraceError(f"{where}: field {key!r} must be {want}, not {_json_type(v)} {_short(v)}")
    if meta["format"] != schema.FORMAT_NAME:
        raise TraceError(f"{where}: not a lufreplay trace (format={meta['format']!r})")
    if meta["format_version"] not in schema.READABLE_VERSIONS:
        raise TraceError(
            f"{where}: format version {meta['format_version']} is not supported"
            f" (this lufreplay reads versions {', '.join(map(str, schema.READABLE_VERSIONS))})"
        )
    if meta.get("shootdown_cost") is not None:
        bad = schema.shootdown_cost_problem(meta["shootdown_cost"])
        if bad:
            raise TraceError(f"{where}: field 'shootdown_cost': {bad}")
    ctr = meta.get("counters")
    if isinstance(ctr, dict) and "pmu" in ctr and ctr["pmu"] not in schema.PMU_STATES:
        raise TraceError(
            f"{where}: field 'counters.pmu' must be one of {', '.join(schema.PMU_STATES)}, not {_short(ctr['pmu'])}"
        )
    if isinstance(ctr, dict) and ctr.get("pmu") == "absent" and not ctr.get("pmu_error"):
        raise TraceError(f"{where}: field 'counters.pmu' is 'absent' but 'counters.pmu_error' does not say why")
    n = nr_cpus_of(meta)
    if n is not None and not 1 <= n <= schema.MAX_NR_CPUS:
        raise TraceError(f"{where}: host.nr_cpus {n} is out of range (1..{schema.MAX_NR_CPUS})")
    for k in ("segments", "events"):
        if isinstance(meta.get(k), int) and meta[k] < 0:
            raise TraceError(f"{where}: field {k!r} is negative ({meta[k]})")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def nr_cpus_of(meta: dict[str, Any]) -> int | None:
    """host.nr_cpus (or a top-level nr_cpus) of a checked meta.json; None when absent."""
    host = meta.get("host")
    n = meta.get("nr_cpus") or (host.get("nr_cpus") if isinstance(host, dict) else None)
    return int(n) if n is not None else None


@dataclass
class Warnings:
    """Rows skipped because of a bad value in a ``skip`` column, counted once per (file, column)."""

    items: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def add(self, f: Path, column: str, rows: int, first_row: int, value: Any, allowed: str) -> None:
        self.items[(str(f), column)] = {
            "file": str(f),
            "column": column,
            "rows_skipped": rows,
            "first_row": first_row,
            "value": value,
            "why": f"not {allowed}",
        }

    def as_list(self) -> list[dict[str, Any]]:
        return list(self.items.values())

    def lines(self) -> list[str]:
        return [
            f"{w['file']}: {w['rows_skipped']} row(s) skipped: column {w['column']} {w['why']}"
            f" (first: row {w['first_row']}, value {w['value']})"
            for w in self.items.values()
        ]


def _bounds(col: schema.Column, nr_cpus: int) -> tuple[int | None, int | None, bool]:
    """(lowest valid, exclusive upper bound, has gaps) of a column; every sentinel is lo - 1 ("-1: not given")."""
    if col.enum is not None:
        lo, hi = min(col.enum), max(col.enum) + 1
        gaps = len(col.enum) != hi - lo
    else:
        lo, hi, gaps = col.lo, (nr_cpus if col.hi == schema.NR_CPUS else col.hi), False  # type: ignore[assignment]
    if col.sentinel is not None and lo is not None and col.sentinel == lo - 1:
        lo = col.sentinel
    return lo, hi, gaps  # type: ignore[return-value]


def stats_out_of_bounds(col: schema.Column, mn: Any, mx: Any, nr_cpus: int | None) -> bool:
    """Whether a row group's footer statistics (min, max) admit an invalid value of ``col``."""
    lo, hi, gaps = _bounds(col, nr_cpus if nr_cpus is not None else schema.MAX_NR_CPUS)
    if isinstance(mn, bool) or not isinstance(mn, int) or not isinstance(mx, int):
        return False
    return gaps or (lo is not None and mn < lo) or (hi is not None and mx >= hi)


def ranged_columns(name: str) -> list[schema.Column]:
    """Columns of table ``name`` that have bounds to check."""
    return [c for c in schema.TABLES[name].columns if c.enum is not None or c.lo is not None or c.hi is not None]


def _bad_mask(col: schema.Column, arr: pa.ChunkedArray | pa.Array, nr_cpus: int) -> np.ndarray | None:
    """Boolean mask of the rows whose value is invalid, or None when every value is valid (the usual case)."""
    if arr.null_count:
        return np.asarray(pc.is_null(arr).to_numpy(zero_copy_only=False), bool)
    if len(arr) == 0:
        return None
    if pa.types.is_list(col.type):  # a row is bad when any of its elements is
        vals = pc.list_flatten(arr)
        bad_v = _bad_mask(dataclasses.replace(col, type=col.type.value_type), vals, nr_cpus)
        if bad_v is None:
            return None
        bad = np.zeros(len(arr), bool)
        bad[np.asarray(pc.list_parent_indices(arr).to_numpy(zero_copy_only=False))[bad_v]] = True
        return bad
    eff_lo, hi, gaps = _bounds(col, nr_cpus)
    if eff_lo is None and hi is None:
        return None
    mm = pc.min_max(arr)
    mn, mx = mm["min"].as_py(), mm["max"].as_py()
    if not gaps and (eff_lo is None or mn >= eff_lo) and (hi is None or mx < hi):
        return None
    lo, s = (min(col.enum) if col.enum is not None else col.lo), col.sentinel
    v = np.asarray(arr.to_numpy(zero_copy_only=False)).astype(np.int64, copy=False)
    ok = np.ones(len(v), bool)
    if col.enum is not None:
        ok = np.isin(v, np.fromiter(col.enum, np.int64))
    else:
        if lo is not None:
            ok &= v >= lo
        if hi is not None:
            ok &= v < hi
    if s is not None:
        ok |= v == s
    if ok.all():
        return None
    return ~ok


def check_columns(
    table: pa.Table, name: str, f: Path, nr_cpus: int | None, warnings: Warnings, row0: int = 0
) -> pa.Table:
    """``table`` (rows of table ``name`` read from ``f``) with every value checked. A bad value in an ``error``
    column raises TraceError naming file, column and first bad row; bad rows of ``skip`` columns are dropped
    and counted in ``warnings``."""
    t = schema.TABLES[name]
    ncpu = nr_cpus if nr_cpus is not None else schema.MAX_NR_CPUS
    drop: np.ndarray | None = None
    for col in t.columns:
        if col.name not in table.column_names:
            continue
        arr = table.column(col.name)
        bad = _bad_mask(col, arr, ncpu)
        if bad is None:
            continue
        i = int(np.argmax(bad))
        value = arr[i].as_py()
        allowed = "null-free" if value is None else col.allowed().replace(schema.NR_CPUS, f"{ncpu} (host CPUs)")
        if col.on_bad == "skip":
            warnings.add(f, col.name, int(bad.sum()), row0 + i, value, allowed)
            drop = bad if drop is None else (drop | bad)
            continue
        raise TraceError(f"{f}: column {col.name} row {row0 + i}: value {value} is invalid (must be {allowed})")
    if drop is not None:
        table = table.filter(pa.array(~drop))
    return table


def skip_columns(name: str) -> list[str]:
    """Columns whose bad rows are skipped: a read of ``name`` must include them to know which rows to drop."""
    return [c.name for c in schema.TABLES[name].columns if c.on_bad == "skip"]
