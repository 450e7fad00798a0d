"""Child process of test_crash_segments: re-write a bundled trace as N segments with the real TraceWriter and
SIGKILL itself at a chosen file operation (``os.replace`` call), before or after it.

Usage: python tests/crash_writer.py SOURCE_TRACE OUT NSEG KILL_AT(before|after)  (KILL_AT -1: never; the
operations are logged to OUT.ops so the parent knows what was on disk when the kill came).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from lufreplay import open_trace, schema
from lufreplay.trace import writer as W


def split(src: Path, nseg: int) -> tuple[dict, list[dict[str, pa.Table]]]:
    """The source trace's meta and its rows cut into ``nseg`` equal time windows per table."""
    tr = open_trace(src)
    tables = {n: tr.table(n) for n in schema.TABLES}
    ts = np.concatenate([t.column(schema.TABLES[n].sort_by).to_numpy() for n, t in tables.items() if t.num_rows])
    edges = np.linspace(ts.min(), ts.max() + 1, nseg + 1).astype(np.int64)
    segs = []
    for i in range(nseg):
        seg = {}
        for n, t in tables.items():
            col = t.column(schema.TABLES[n].sort_by).to_numpy()
            seg[n] = t.filter(pa.array((col >= edges[i]) & (col < edges[i + 1])))
        segs.append(seg)
    keep = ("run_id", "host", "clock", "tool_version", "enums", "probes", "raw_kinds", "flush_function")
    meta = {k: v for k, v in tr.meta.items() if k in keep}
    return meta, segs


def main() -> None:
    src, out, nseg, kill = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    m = re.fullmatch(r"(-1|\d+)(before|after)?", kill)
    assert m, kill
    kill_at, when = int(m.group(1)), m.group(2) or ""
    meta, segs = split(src, nseg)
    log = open(str(out) + ".ops", "w")
    real_replace = os.replace
    count = 0

    def replace(a: str | os.PathLike, b: str | os.PathLike) -> None:
        nonlocal count
        count += 1
        log.write(f"{count} {Path(b).relative_to(out)}\n")
        log.flush()
        if count == kill_at and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(a, b)
        if count == kill_at and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    W.os.replace = replace  # type: ignore[attr-defined]
    W.prepare_output(out, force=False)
    w = W.TraceWriter(out, meta)
    for i, seg in enumerate(segs):
        for n, t in seg.items():
            w.add(n, t)
        if i < len(segs) - 1:
            w.rotate()
    w.close({"stop_reason": "command exited"})


if __name__ == "__main__":
    main()
