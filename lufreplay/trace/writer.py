"""Write a trace directory: ``meta.json`` plus rolling Parquet segments per table.

Segment N of every table covers the same time window, so a reader can merge tables segment by segment
with bounded memory. A segment is committed by its manifest (``commits/segment-NNNNNN.json``), written
last, after every table's file of the segment is synced and renamed into place: a crash at any instant
leaves a prefix of committed segments plus remains the reader ignores. Files are created 0600: traces
hold pids, comms and paths.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lufreplay import schema


class TraceExistsError(Exception):
    """The output directory already holds something and --force was not given."""


def _is_trace_dir(path: Path) -> bool:
    """True when every entry of ``path`` is something a lufreplay recorder writes (tables, commits, meta)."""
    known = {*schema.TABLES, schema.COMMIT_DIR, schema.META_FILE, schema.META_FILE + ".tmp", f".{schema.META_FILE}.tmp"}
    entries = list(path.iterdir())
    if not all(e.name in known for e in entries):
        return False
    mf = path / schema.META_FILE
    if mf.is_file():
        try:
            return json.loads(mf.read_text()).get("format") == schema.FORMAT_NAME
        except (OSError, ValueError, AttributeError):
            return False
    return True  # a recorder killed before its first meta.json: only (empty) table directories


def prepare_output(path: Path, force: bool) -> None:
    """Create the trace directory, refusing to clobber an existing non-empty one without ``force``, and
    refusing, even with ``force``, a directory that is not a lufreplay trace (its files are not ours to delete)."""
    if path.exists() and not path.is_dir():
        raise TraceExistsError(f"{path} exists and is not a directory")
    if path.exists() and any(path.iterdir()):
        if not _is_trace_dir(path):
            raise TraceExistsError(f"{path} is not empty and is not a lufreplay trace; refusing to overwrite it")
        if not force:
            raise TraceExistsError(f"{path} already exists and is not empty (use --force to overwrite)")
        # The commit manifests go first: a crash half-way through leaves a trace with fewer segments, never
        # a manifest naming a deleted file.
        for d, pattern in [(schema.COMMIT_DIR, "*")] + [(t, "*") for t in schema.TABLES]:
            if (path / d).is_dir():
                for f in (path / d).glob(pattern):
                    if f.is_file():
                        f.unlink()
        (path / schema.META_FILE).unlink(missing_ok=True)
        (path / (schema.META_FILE + ".tmp")).unlink(missing_ok=True)
        (path / f".{schema.META_FILE}.tmp").unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a synced temporary file and a rename, 0600."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a truncated temporary behind
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write meta.json atomically (rename), 0600."""
    from lufreplay.jsonout import dumps

    _write_atomic(path / schema.META_FILE, dumps(meta, indent=1, sort_keys=True).encode())


#: Bulky metadata kept only in meta.json: every Parquet footer carries the rest twice (key-value metadata
#: and the serialized Arrow schema), once per table per segment.
FOOTER_EXCLUDE = ("tracepoint_formats",)


def footer_meta(meta: dict[str, Any]) -> bytes:
    """The trace metadata embedded in each Parquet footer (enough to identify and read an orphaned segment)."""
    return json.dumps({k: v for k, v in meta.items() if k not in FOOTER_EXCLUDE}, default=str).encode()


def _dictionary_columns(sch: pa.Schema) -> list[str]:
    return [
        f.name
        for f in sch
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type) or pa.types.is_dictionary(f.type)
    ]


def _is_sorted(table: pa.Table, column: str) -> bool:
    """``column`` is non-decreasing (the recorder decodes in time order: sorting again would copy every column)."""
    a = table.column(column)
    if a.null_count:
        return False
    v = a.to_numpy()
    return bool(np.all(v[1:] >= v[:-1]))


class TraceWriter:
    """Accumulates Arrow tables per trace table and writes one sorted segment per table on ``rotate``."""

    def __init__(self, path: Path, meta: dict[str, Any], row_group_size: int = 131072) -> None:
        self.path = Path(path)
        self.meta = meta
        self.row_group_size = row_group_size
        self.segment = 0
        self.rows: dict[str, int] = {name: 0 for name in schema.TABLES}
        self.bytes_written = 0
        self._pending: dict[str, list[pa.Table]] = {name: [] for name in schema.TABLES}
        self._lock = threading.Lock()
        for name in (*schema.TABLES, schema.COMMIT_DIR):
            (self.path / name).mkdir(parents=True, exist_ok=True)
        self.meta.setdefault("complete", False)
        write_meta(self.path, self._full_meta())
        self._reserve_meta_space()

    def _reserve_meta_space(self) -> None:
        """Hold room for the final meta.json in its own temporary file, which writing meta.json truncates and
        reuses: on a full disk the final meta (stop reason, what was kept) still fits. Best effort."""
        f = self.path / f".{schema.META_FILE}.tmp"
        size = (self.path / schema.META_FILE).stat().st_size + (64 << 10)
        try:
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError:
            f.unlink(missing_ok=True)

    def _full_meta(self) -> dict[str, Any]:
        m = dict(self.meta)
        m["format"] = schema.FORMAT_NAME
        m["format_version"] = schema.FORMAT_VERSION
        m["segment_manifests"] = True
        m["segments"] = self.segment
        m["rows"] = dict(self.rows)
        return m

    def add(self, name: str, table: pa.Table) -> None:
        """Queue rows for the current segment of ``name``."""
        if table.num_rows == 0:
            return
        if not table.schema.equals(schema.TABLES[name].schema, check_metadata=False):
            raise ValueError(f"table {name}: schema does not match lufreplay.schema")
        with self._lock:
            self._pending[name].append(table)

    def rotate(self) -> None:
        """Write the current segment of every table (empty tables too, so segments line up) and start the next.

        When writing fails (a full disk), the segment's files are removed before the error propagates: the
        trace is left as its committed segments, with no partial or uncommitted file."""
        with self._lock:
            pending, self._pending = self._pending, {name: [] for name in schema.TABLES}
        written: list[Path] = []
        try:
            self._write_segment(pending, written)
        except BaseException:
            for f in written:
                f.unlink(missing_ok=True)
            raise
        self.segment += 1

    def _write_segment(self, pending: dict[str, list[pa.Table]], written: list[Path]) -> None:
        """Write and commit segment ``self.segment``; every file it creates is appended to ``written`` first."""
        meta_bytes = footer_meta(self._full_meta())
        manifest: dict[str, Any] = {"segment": self.segment, "tables": {}}
        ts_lo: int | None = None
        ts_hi: int | None = None
        sizes: dict[str, int] = {}
        for name, parts in pending.items():
            t = schema.TABLES[name]
            table = pa.concat_tables(parts) if parts else schema.empty_table(name)
            if table.num_rows > 1 and not _is_sorted(table, t.sort_by):
                table = table.sort_by(t.sort_by)
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), schema.META_KEY: meta_bytes})
            f = self.path / name / schema.segment_name(self.segment)
            # Write under a hidden temporary name and rename when the footer is on disk, so a crash never
            # leaves a truncated part-*.parquet behind.
            tmp = f.with_name(f".{f.name}.tmp")
            written += [tmp, f]
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                self._encode(table, t.sort_by, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, f)
            size = sizes[name] = f.stat().st_size
            manifest["tables"][name] = {"file": f"{name}/{f.name}", "rows": table.num_rows, "bytes": size}
            if table.num_rows and t.sort_by in table.column_names:
                col = table.column(t.sort_by)
                lo, hi = int(col[0].as_py()), int(col[-1].as_py())
                ts_lo = lo if ts_lo is None else min(ts_lo, lo)
                ts_hi = hi if ts_hi is None else max(ts_hi, hi)
        for name in schema.TABLES:
            _fsync_dir(self.path / name)
        manifest["ts_min_ns"] = ts_lo
        manifest["ts_max_ns"] = ts_hi
        manifest["committed_at"] = time.time()
        # The commit point: the segment exists for readers from this rename on.
        _write_atomic(self.path / schema.COMMIT_DIR / schema.commit_name(self.segment), json.dumps(manifest).encode())
        written.clear()  # committed: nothing of it may be removed any more
        for name, e in manifest["tables"].items():
            self.rows[name] += e["rows"]
        self.bytes_written += sum(sizes.values())
        _fsync_dir(self.path / schema.COMMIT_DIR)

    def _encode(self, table: pa.Table, sort_by: str, sink: Any) -> None:
        pq.write_table(
            table,
            sink,
            compression="zstd",
            # Dictionaries only where values repeat (strings): on timestamps, pfns and addresses
            # they cost over half of the encode time and make the files larger.
            use_dictionary=_dictionary_columns(table.schema),
            row_group_size=self.row_group_size,
            sorting_columns=[pq.SortingColumn(table.schema.get_field_index(sort_by))],
            write_page_index=True,
            write_page_checksum=True,  # bit rot in a page becomes a read error, not wrong numbers
        )

    def rehearse(self, tables: dict[str, pa.Table]) -> None:
        """Encode ``tables`` as a segment would, into memory, and drop them: the first encode's one-time
        costs (code paged in, lazy initialisation) are then paid before the recording window opens."""
        for name, table in tables.items():
            self._encode(table, schema.TABLES[name].sort_by, io.BytesIO())

    def close(self, final_meta: dict[str, Any] | None = None) -> None:
        """Write the last segment and the final metadata."""
        if final_meta:
            self.meta.update(final_meta)
        self.rotate()
        self.meta["complete"] = True
        write_meta(self.path, self._full_meta())
