"""Write a trace directory: ``meta.json`` plus rolling Parquet segments per table.

Segment N of every table covers the same time window, so a reader can merge tables segment by segment
with bounded memory. Each segment file is closed (footer written) when the writer rotates, so a crash
loses at most the segment being written. Files are created 0600: traces hold pids, comms and paths.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lufreplay import schema


class TraceExistsError(Exception):
    """The output directory already holds something and --force was not given."""


def prepare_output(path: Path, force: bool) -> None:
    """Create the trace directory, refusing to clobber an existing non-empty one without ``force``."""
    if path.exists() and any(path.iterdir()):
        if not force:
            raise TraceExistsError(f"{path} already exists and is not empty (use --force to overwrite)")
        for table in schema.TABLES:
            d = path / table
            if d.is_dir():
                for f in d.glob(schema.SEGMENT_GLOB):
                    f.unlink()
        (path / schema.META_FILE).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write meta.json atomically (rename), 0600."""
    tmp = path / (schema.META_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path / schema.META_FILE)


#: Bulky metadata kept only in meta.json: every Parquet footer carries the rest twice (key-value metadata
#: and the serialized Arrow schema), once per table per segment.
FOOTER_EXCLUDE = ("tracepoint_formats",)


def footer_meta(meta: dict[str, Any]) -> bytes:
    """The trace metadata embedded in each Parquet footer (enough to identify and read an orphaned segment)."""
    return json.dumps({k: v for k, v in meta.items() if k not in FOOTER_EXCLUDE}, default=str).encode()


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
        for name in schema.TABLES:
            (self.path / name).mkdir(parents=True, exist_ok=True)
        write_meta(self.path, self._full_meta())

    def _full_meta(self) -> dict[str, Any]:
        m = dict(self.meta)
        m["format"] = schema.FORMAT_NAME
        m["format_version"] = schema.FORMAT_VERSION
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
        """Write the current segment of every table (empty tables too, so segments line up) and start the next."""
        with self._lock:
            pending, self._pending = self._pending, {name: [] for name in schema.TABLES}
        meta_bytes = footer_meta(self._full_meta())
        for name, parts in pending.items():
            t = schema.TABLES[name]
            table = pa.concat_tables(parts) if parts else schema.empty_table(name)
            if table.num_rows > 1:
                table = table.sort_by(t.sort_by)
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), schema.META_KEY: meta_bytes})
            f = self.path / name / schema.segment_name(self.segment)
            # Write under a hidden temporary name and rename when the footer is on disk, so a crash never
            # leaves a truncated part-*.parquet behind.
            tmp = f.with_name(f".{f.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                pq.write_table(
                    table,
                    fh,
                    compression="zstd",
                    row_group_size=self.row_group_size,
                    sorting_columns=[pq.SortingColumn(table.schema.get_field_index(t.sort_by))],
                    write_page_index=True,
                )
            os.replace(tmp, f)
            self.bytes_written += f.stat().st_size
            self.rows[name] += table.num_rows
        self.segment += 1
        write_meta(self.path, self._full_meta())

    def close(self, final_meta: dict[str, Any] | None = None) -> None:
        """Write the last segment and the final metadata."""
        if final_meta:
            self.meta.update(final_meta)
        self.rotate()
        self.meta["complete"] = True
        write_meta(self.path, self._full_meta())
