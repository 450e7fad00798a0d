"""Open and validate a trace directory; read tables whole or segment by segment."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lufreplay import schema


class TraceError(Exception):
    """A trace that cannot be used; the message names the file and the problem in one line."""


class Trace:
    """A trace directory opened for reading. Cheap to create: files are read on demand."""

    def __init__(self, path: Path, meta: dict[str, Any], files: dict[str, list[Path]]) -> None:
        self.path = path
        self.meta = meta
        self.files = files

    @property
    def tables(self) -> list[str]:
        return [n for n in schema.TABLES if self.files.get(n)]

    @property
    def n_segments(self) -> int:
        return max((len(v) for v in self.files.values()), default=0)

    def _read(self, f: Path, columns: list[str] | None) -> pa.Table:
        try:
            return pq.read_table(f, columns=columns)
        except Exception as e:  # pyarrow raises several types for truncated/corrupt files
            raise TraceError(f"{f}: unreadable Parquet segment ({str(e).splitlines()[0]})") from None

    def table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """All segments of one table concatenated (an empty table with the right schema if absent)."""
        if name not in schema.TABLES:
            raise TraceError(f"{self.path}: unknown table {name!r}")
        parts = [self._read(f, columns) for f in self.files.get(name, [])]
        if not parts:
            t = schema.empty_table(name)
            return t.select(columns) if columns else t
        return pa.concat_tables(parts)

    def pandas(self, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        """One table as a DataFrame; enum ``*_name`` columns come back as categoricals."""
        return self.table(name, columns).to_pandas()

    def segment(
        self, index: int, names: Iterable[str], columns: dict[str, list[str]] | None = None
    ) -> dict[str, pa.Table]:
        """Segment ``index`` of the given tables."""
        out: dict[str, pa.Table] = {}
        for name in names:
            files = self.files.get(name, [])
            cols = (columns or {}).get(name)
            if index < len(files):
                out[name] = self._read(files[index], cols)
            else:
                t = schema.empty_table(name)
                out[name] = t.select(cols) if cols else t
        return out

    def segments(
        self, names: Iterable[str], columns: dict[str, list[str]] | None = None
    ) -> Iterator[dict[str, pa.Table]]:
        """Iterate over segments in time order; memory is bounded by one segment of each table."""
        names = list(names)
        for i in range(self.n_segments):
            yield self.segment(i, names, columns)


def read_meta(path: Path) -> dict[str, Any]:
    mf = path / schema.META_FILE
    if not mf.is_file():
        # A trace whose recorder died before writing meta.json: fall back to a footer.
        for f in sorted(path.glob(f"*/{schema.SEGMENT_GLOB}")):
            try:
                md = pq.read_schema(f).metadata or {}
            except Exception:
                continue
            if schema.META_KEY in md:
                return json.loads(md[schema.META_KEY])
        raise TraceError(f"{mf}: missing (not a lufreplay trace directory)")
    try:
        return json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise TraceError(f"{mf}: not valid JSON ({e})") from None


def open_trace(path: str | Path, validate: bool = True) -> Trace:
    """Open a trace directory. With ``validate``, check format, version and every segment's schema."""
    p = Path(path)
    if not p.exists():
        raise TraceError(f"{p}: no such trace")
    if not p.is_dir():
        raise TraceError(f"{p}: a trace is a directory (made by `lufreplay record`)")
    meta = read_meta(p)
    if meta.get("format") != schema.FORMAT_NAME:
        raise TraceError(f"{p / schema.META_FILE}: not a lufreplay trace (format={meta.get('format')!r})")
    if meta.get("format_version") != schema.FORMAT_VERSION:
        raise TraceError(
            f"{p / schema.META_FILE}: format version {meta.get('format_version')} is not supported"
            f" (this lufreplay reads version {schema.FORMAT_VERSION})"
        )
    files = {name: sorted((p / name).glob(schema.SEGMENT_GLOB)) for name in schema.TABLES}
    trace = Trace(p, meta, files)
    if validate:
        validate_trace(trace)
    return trace


def validate_trace(trace: Trace) -> None:
    """Schema of every segment, table presence, and per-CPU time order; raises TraceError."""
    missing = [n for n in schema.KERNEL_TABLES if not trace.files.get(n)]
    if missing:
        raise TraceError(f"{trace.path}: missing table(s) {', '.join(missing)}")
    last_ts: dict[tuple[str, int], int] = {}
    for name, files in trace.files.items():
        want = schema.TABLES[name].schema
        for f in files:
            try:
                got = pq.read_schema(f)
            except Exception as e:
                raise TraceError(f"{f}: unreadable Parquet segment ({str(e).splitlines()[0]})") from None
            if not got.remove_metadata().equals(want.remove_metadata()):
                have = {x.name for x in got}
                lacking = [x.name for x in want if x.name not in have]
                what = f"missing column(s) {', '.join(lacking)}" if lacking else "column types differ"
                raise TraceError(f"{f}: schema does not match table {name!r} ({what})")
        if name not in schema.KERNEL_TABLES:
            continue
        for f in files:
            t = trace._read(f, ["ts_ns", "cpu"])
            if t.num_rows == 0:
                continue
            ts = t.column("ts_ns").to_numpy()
            cpu = t.column("cpu").to_numpy()
            for c in np.unique(cpu):
                tc = ts[cpu == c]
                if np.any(np.diff(tc) < 0):
                    raise TraceError(f"{f}: timestamps go backwards on CPU {c}")
                prev = last_ts.get((name, int(c)))
                if prev is not None and tc[0] < prev:
                    raise TraceError(f"{f}: timestamps go backwards on CPU {c} across segments")
                last_ts[(name, int(c))] = int(tc[-1])
