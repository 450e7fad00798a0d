"""Open and validate a trace directory; read tables whole or segment by segment.

Only committed segments are read (see ``lufreplay.trace.writer``); every row read goes through
``Trace.read_file``, which checks its values (``lufreplay.trace.validate``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lufreplay import schema
from lufreplay.trace.validate import (
    TraceError,
    Warnings,
    check_columns,
    check_meta,
    nr_cpus_of,
    ranged_columns,
    skip_columns,
    stats_out_of_bounds,
)

if TYPE_CHECKING:  # pandas takes seconds to import and only Trace.pandas needs it (to_pandas imports it)
    import pandas as pd


class Trace:
    """A trace directory opened for reading. Cheap to create: files are read on demand."""

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        files: dict[str, list[Path]],
        manifests: list[dict[str, Any]] | None = None,
        remains: list[Path] | None = None,
    ) -> None:
        self.path = path
        self.meta = meta
        self.files = files
        self.manifests = manifests or []
        self.remains = remains or []
        self.nr_cpus = nr_cpus_of(meta)
        #: the format version the segments were written in (older ones are converted on read)
        self.version = int(meta.get("format_version", schema.FORMAT_VERSION))
        self.warnings = Warnings()

    @property
    def complete(self) -> bool:
        """The recorder finished and finalised meta.json."""
        return self.meta.get("complete") is True

    def interruption(self) -> dict[str, Any] | None:
        """What an interrupted recording kept (None when it finished)."""
        if self.complete:
            return None
        out: dict[str, Any] = {"segments_committed": self.n_segments, "last_event_ns": None}
        if isinstance(self.meta.get("stop_reason"), str):  # a recorder that stopped on an error says which
            out["reason"] = self.meta["stop_reason"]
        out["remains"] = [str(f.relative_to(self.path)) for f in self.remains]
        lo = [m["ts_min_ns"] for m in self.manifests if isinstance(m.get("ts_min_ns"), int)]
        hi = [m["ts_max_ns"] for m in self.manifests if isinstance(m.get("ts_max_ns"), int)]
        if hi:
            out["last_event_ns"] = max(hi)
            out["recorded_s"] = round((max(hi) - min(lo)) / 1e9, 3)
            off = (self.meta.get("clock") or {}).get("realtime_minus_monotonic_ns")
            if isinstance(off, int):
                when = dt.datetime.fromtimestamp((max(hi) + off) / 1e9, dt.UTC)
                out["last_event_utc"] = when.isoformat(timespec="seconds")
        if isinstance(self.meta.get("repaired"), dict):
            out["repaired"] = self.meta["repaired"]
        return out

    def shootdown_source(self) -> dict[str, Any]:
        """Where the ``shootdown`` rows came from and whether they are exact (meta ``shootdown_source``; a trace
        recorded before that key existed: from ``probes_absent``)."""
        src = self.meta.get("shootdown_source")
        if isinstance(src, dict):
            return src
        if "csd:csd_queue_cpu" in (self.meta.get("probes_absent") or []):
            return {
                "source": None,
                "exact": False,
                "note": "the recording kernel lacks csd:csd_queue_cpu and this recorder had no other source: "
                "no remote shootdowns were recorded",
            }
        return {"source": "csd:csd_queue_cpu", "exact": True, "note": ""}

    def interruption_line(self) -> str | None:
        """One sentence for the first lines of info/simulate/report (None when the recording finished)."""
        i = self.interruption()
        if i is None:
            return None
        when = ""
        if i["last_event_ns"] is not None:
            when = f", data up to {i.get('recorded_s', 0):.1f} s into the recording"
            if i.get("last_event_utc"):
                when += f" ({i['last_event_utc']})"
        left = f"; {len(i['remains'])} uncommitted file(s) ignored (`lufreplay repair` removes them)"
        why = f" ({i['reason']})" if i.get("reason") else ""
        return (
            f"recording interrupted{why}: {i['segments_committed']} whole segment(s) kept{when}; events and losses"
            f" after that point are unknown{left if i['remains'] else ''}"
        )

    def read_file(self, f: Path, columns: list[str] | None = None) -> pa.Table:
        """Rows of one segment file, every value checked (bad rows of ``skip`` columns dropped and counted)."""
        name = f.parent.name
        extra = [c for c in skip_columns(name) if columns is not None and c not in columns]
        want = schema.legacy_columns(name, None if columns is None else [*columns, *extra], self.version)
        try:
            t = pq.ParquetFile(f, page_checksum_verification=True).read(columns=want)
        except Exception as e:  # pyarrow raises several types for truncated/corrupt files
            raise TraceError(f"{f}: unreadable Parquet segment ({_first_line(e)})") from None
        if self.version != schema.FORMAT_VERSION:
            t = schema.upgrade(name, t, self.version)
        t = check_columns(t, name, f, self.nr_cpus, self.warnings)
        return t.select(columns) if extra else t

    @property
    def tables(self) -> list[str]:
        return [n for n in schema.TABLES if self.files.get(n)]

    @property
    def n_segments(self) -> int:
        return max((len(v) for v in self.files.values()), default=0)

    def _read(self, f: Path, columns: list[str] | None) -> pa.Table:
        return self.read_file(f, columns)

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


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json (or, when it is gone, the copy in a segment footer), type-checked."""
    mf = path / schema.META_FILE
    if not mf.exists():
        # meta.json deleted or lost: fall back to a footer.
        for f in sorted(path.glob(f"*/{schema.SEGMENT_GLOB}")):
            try:
                md = pq.read_schema(f).metadata or {}
                meta = json.loads(md[schema.META_KEY]) if schema.META_KEY in md else None
            except Exception:
                continue
            if meta is not None:
                check_meta(meta, f)
                return meta
        raise TraceError(f"{mf}: missing (not a lufreplay trace directory)")
    try:
        text = mf.read_bytes()
    except OSError as e:
        raise TraceError(f"{mf}: cannot read ({e.strerror or e})") from None
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise TraceError(f"{mf}: not valid JSON ({_first_line(e)})") from None
    check_meta(meta, mf)
    return meta


_REMAINS = (schema.SEGMENT_GLOB, ".part-*.tmp")


def _manifest(f: Path, index: int, path: Path) -> dict[str, Any]:
    try:
        m = json.loads(f.read_bytes())
    except OSError as e:
        raise TraceError(f"{f}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise TraceError(f"{f}: commit manifest is not valid JSON ({_first_line(e)})") from None
    tables = m.get("tables") if isinstance(m, dict) else None
    if not isinstance(tables, dict) or m.get("segment") != index:
        raise TraceError(f"{f}: not a commit manifest of segment {index}")
    for name, e in tables.items():
        ok = isinstance(e, dict) and all(isinstance(e.get(k), int) and e[k] >= 0 for k in ("rows", "bytes"))
        if name not in schema.TABLES or not ok or e.get("file") != f"{name}/{schema.segment_name(index)}":
            raise TraceError(f"{f}: bad entry for table {name!r}")
        seg = path / e["file"]
        try:
            size = seg.stat().st_size
        except OSError:
            raise TraceError(f"{seg}: missing, but committed in {f.name}") from None
        if size != e["bytes"]:
            raise TraceError(f"{seg}: {size} bytes, but committed with {e['bytes']} (changed after recording)")
    for k in ("ts_min_ns", "ts_max_ns"):
        if m.get(k) is not None and not isinstance(m.get(k), int):
            raise TraceError(f"{f}: {k} must be an integer")
    return m


def committed_segments(p: Path, meta: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """How many segments are committed, and their manifests (none for traces written before manifests)."""
    cdir = p / schema.COMMIT_DIR
    if meta.get("segment_manifests") or cdir.is_dir():
        manifests = []
        while (f := cdir / schema.commit_name(len(manifests))).is_file():
            manifests.append(_manifest(f, len(manifests), p))
        if meta.get("complete") is True and meta.get("segments") != len(manifests):
            raise TraceError(
                f"{p / schema.META_FILE}: says {meta.get('segments')} segments, {len(manifests)} are committed"
            )
        return len(manifests), manifests
    # The writer before manifests rewrote meta.json (atomically) after each whole segment: its
    # ``segments`` was the commit record. A footer copy of meta (meta.json lost) counts whole segments.
    if isinstance(meta.get("segments"), int) and (p / schema.META_FILE).exists():
        return meta["segments"], []
    n = 0
    while all((p / t / schema.segment_name(n)).is_file() for t in schema.REQUIRED_TABLES):
        n += 1
    return n, []


def open_trace(path: str | Path, validate: bool = True) -> Trace:
    """Open a trace directory: meta.json checked, committed segments only; with ``validate``, every segment's
    schema and per-CPU time order too (values are checked whenever rows are read)."""
    p = Path(path)
    if not p.exists():
        raise TraceError(f"{p}: no such trace")
    if not p.is_dir():
        raise TraceError(f"{p}: a trace is a directory (made by `lufreplay record`)")
    meta = read_meta(p)
    n, manifests = committed_segments(p, meta)
    files: dict[str, list[Path]] = {}
    remains: list[Path] = []
    for name in schema.TABLES:
        d = p / name
        want = [d / schema.segment_name(i) for i in range(n)]
        if manifests:
            want = [d / schema.segment_name(i) for i, m in enumerate(manifests) if name in m["tables"]]
        elif name in schema.REQUIRED_TABLES:
            lacking = [f for f in want if not f.is_file()]
            if lacking:
                raise TraceError(f"{lacking[0]}: missing (segment {lacking[0].name} of table {name!r})")
        else:
            want = [f for f in want if f.is_file()]
        files[name] = want
        keep = set(want)
        if d.is_dir():
            remains += sorted({f for pat in _REMAINS for f in d.glob(pat)} - keep)
    cdir = p / schema.COMMIT_DIR
    if cdir.is_dir():
        kept = {cdir / schema.commit_name(i) for i in range(len(manifests))}
        remains += sorted({*cdir.glob(schema.COMMIT_GLOB), *cdir.glob(".segment-*.tmp")} - kept)
    remains += [f for f in (p / f".{schema.META_FILE}.tmp", p / f"{schema.META_FILE}.tmp") if f.exists()]
    trace = Trace(p, meta, files, manifests, remains)
    if validate:
        validate_trace(trace)
    return trace


def validate_trace(trace: Trace) -> None:
    """Schema of every segment, table presence, rows vs commit manifests, CPU ids against host.nr_cpus,
    and per-CPU time order; raises TraceError."""
    missing = [n for n in schema.REQUIRED_TABLES if not trace.files.get(n)]
    if missing and trace.n_segments:
        raise TraceError(f"{trace.path}: missing table(s) {', '.join(missing)}")
    last_ts: dict[tuple[str, int], int] = {}
    for name, files in trace.files.items():
        want = schema.legacy_schema(name, trace.version)
        for i, f in enumerate(files):
            try:
                md = pq.read_metadata(f)
                got = md.schema.to_arrow_schema()
            except Exception as e:
                raise TraceError(f"{f}: unreadable Parquet segment ({_first_line(e)})") from None
            if not got.remove_metadata().equals(want.remove_metadata()):
                have = {x.name for x in got}
                lacking = [x.name for x in want if x.name not in have]
                extra = [x.name for x in got if x.name not in {w.name for w in want}]
                what = (
                    f"missing column(s) {', '.join(lacking)}"
                    if lacking
                    else f"unknown column(s) {', '.join(extra)}"
                    if extra
                    else "column types differ"
                )
                raise TraceError(f"{f}: schema does not match table {name!r} ({what})")
            _check_stats(trace, name, f, md)
            if trace.manifests and i < len(trace.manifests):
                committed = trace.manifests[i]["tables"].get(name, {}).get("rows")
                if committed is not None and committed != md.num_rows:
                    raise TraceError(f"{f}: {md.num_rows} rows, but committed with {committed}")
        if name not in schema.KERNEL_TABLES:
            continue
        for f in files:
            t = trace.read_file(f, ["ts_ns", "cpu"])
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
    _check_counter_cpus(trace)


def _check_stats(trace: Trace, name: str, f: Path, md: pq.FileMetaData) -> None:
    """Footer min/max of every bounded column, so a bad value is found even in columns this command does not
    read (no data read unless the statistics admit one; then the column is read for the exact first row)."""
    cols = ranged_columns(name)
    if not cols or md.num_rows == 0:
        return
    names = [md.schema.column(j).path.split(".")[0] for j in range(md.num_columns)]  # a list's leaf: its column
    idx = {c.name: names.index(c.name) for c in cols if c.name in names}
    suspect = []
    for c in cols:
        j = idx.get(c.name)
        if j is None:
            continue
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(j).statistics
            if st is not None and st.has_min_max and stats_out_of_bounds(c, st.min, st.max, trace.nr_cpus):
                suspect.append(c.name)
                break
    if suspect:
        trace.read_file(f, suspect)  # raises with file, column and first bad row (or counts skipped rows)


def _check_counter_cpus(trace: Trace) -> None:
    """host.nr_cpus must agree with the per-CPU rows of /proc/interrupts the recorder snapshotted."""
    if trace.nr_cpus is None or not trace.files.get("counters"):
        return
    t = trace.table("counters", ["source", "name", "cpu"])
    if t.num_rows == 0:
        return
    src = {v: k for k, v in schema.COUNTER_SOURCE.items()}["interrupts"]
    cpu = t.column("cpu").to_numpy()
    m = (t.column("source").to_numpy() == src) & (cpu >= 0)
    if not m.any():
        return
    seen = int(cpu[m].max()) + 1
    if seen != trace.nr_cpus:
        raise TraceError(
            f"{trace.path / schema.META_FILE}: host.nr_cpus is {trace.nr_cpus} but the /proc/interrupts"
            f" counters cover {seen} CPUs"
        )
