"""Trace segment → time-sorted raw ops, fast: projected Parquet reads, vectorised ids, one numba scatter.

The raw-op array of a segment is built without per-row Python and without sorting or concatenating
structured arrays (numpy copies 60-byte records one by one): every table's columns are turned into int64
arrays, one stable argsort of all timestamps gives each row its place, and a numba kernel writes the rows
straight into a reused buffer at those places. Equal timestamps keep the ``EVENT_TABLES`` order, then the
row order, exactly as a stable sort of the concatenated tables would.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lufreplay import schema
from lufreplay.model import ops as O
from lufreplay.trace.reader import Trace, TraceError

#: Tables the engine reads, in tie-break order for equal timestamps.
EVENT_TABLES = (
    "mm",
    "sched",
    "syscall",
    "reclaim",
    "migrate",
    "unmap",
    "page_cache",
    "tlb_flush",
    "shootdown",
    "page",
    "fault",
    "file",
    "proc",
)
_EXTRA: dict[str, list[str]] = {
    "tlb_flush": ["reason", "pages"],
    "shootdown": ["target_cpu"],
    "reclaim": ["event", "pfn"],
    "unmap": ["mm_id", "member", "delta", "ctx"],
    "page_cache": ["pfn", "order", "dev", "ino", "index", "ctx"],
    "migrate": ["event", "addr", "pfn", "order", "mig_type", "writable", "dirty", "mode", "reason"],
    "page": ["event", "pfn", "order", "source", "gfp_flags", "percpu_refill"],
    "fault": ["address", "write"],
    "syscall": ["nr", "arg0", "arg1", "arg2", "arg3", "ret", "duration_ns"],
    "file": ["event", "dev", "ino"],
    "sched": ["next_pid", "prev_kthread"],
    "proc": ["event"],
    "mm": ["mm_id"],
}
#: The only columns read from each table (column projection: the rest of a row is never decoded).
COLUMNS: dict[str, list[str]] = {k: ["ts_ns", "cpu", "pid", "tgid", *v] for k, v in _EXTRA.items()}
KIND = {
    "tlb_flush": O.R_TLB,
    "shootdown": O.R_SD,
    "reclaim": O.R_RECLAIM,
    "unmap": O.R_UNMAP,
    "page_cache": O.R_PCDEL,
    "migrate": O.R_MIG,
    "page": O.R_PAGE,
    "fault": O.R_FAULT,
    "syscall": O.R_SYSCALL,
    "file": O.R_FILE,
    "sched": O.R_SCHED,
    "proc": O.R_PROC,
    "mm": O.R_MM,
}

_LUT_LIMIT = 1 << 23  # keys below this (pids: pid_max ≤ 2^22) are mapped through a flat lookup table
_NONE = np.zeros(0, np.int64)


class IdMap:
    """Dense ids for sparse integer keys (pids, tgids, mm_ids, (dev, ino) pairs), stable across segments.

    New keys of one call get the next ids in ascending key order. Small non-negative keys go through a flat
    lookup table (one gather per call); others through a hash factorisation of the call's keys.
    """

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}
        self._lut = np.full(0, -1, np.int32)

    def __len__(self) -> int:
        return len(self.ids)

    def _assign(self, new: np.ndarray) -> np.ndarray:
        """Ids of the sorted unique keys ``new`` (existing ones kept, new ones appended in order)."""
        d = self.ids
        return np.fromiter((d.setdefault(int(k), len(d)) for k in new), dtype=np.int32, count=new.size)

    def get(self, keys: np.ndarray) -> np.ndarray:
        if keys.size == 0:
            return np.zeros(0, np.int32)
        lo, hi = int(keys.min()), int(keys.max())
        if lo >= 0 and hi < _LUT_LIMIT:
            if hi >= self._lut.size:
                lut = np.full(max(hi + 1, 2 * self._lut.size, 1024), -1, np.int32)
                lut[: self._lut.size] = self._lut
                self._lut = lut
            dense = self._lut[keys]
            missing = dense < 0
            if missing.any():
                new = np.unique(keys[missing])
                self._lut[new] = self._assign(new)
                dense = self._lut[keys]
            return dense
        uniq, inv = np.unique(keys, return_inverse=True)
        dense = self._assign(uniq)
        small = (uniq >= 0) & (uniq < self._lut.size)
        self._lut[uniq[small]] = dense[small]
        return dense[inv]


@dataclass
class Ids:
    task: IdMap = field(default_factory=IdMap)
    proc: IdMap = field(default_factory=IdMap)
    mm: IdMap = field(default_factory=IdMap)
    mapping: IdMap = field(default_factory=IdMap)

    def tasks(self, pid: np.ndarray) -> np.ndarray:
        return np.where(pid > 0, self.task.get(pid), -1).astype(np.int32)

    def procs(self, tgid: np.ndarray) -> np.ndarray:
        return np.where(tgid > 0, self.proc.get(tgid), -1).astype(np.int32)


def col(t: pa.Table, name: str, dtype: Any = np.int64) -> np.ndarray:
    """One column as a numpy array of ``dtype`` (zero-copy when the type already matches)."""
    return np.asarray(t.column(name).to_numpy(zero_copy_only=False)).astype(dtype, copy=False)


def file_key(dev: np.ndarray, ino: np.ndarray) -> np.ndarray:
    return (dev.astype(np.uint64) << np.uint64(40)) | (ino.astype(np.uint64) & np.uint64((1 << 40) - 1))


def _u64(t: pa.Table, name: str) -> np.ndarray:
    return col(t, name, np.uint64).view(np.int64)


def _fields(name: str, t: pa.Table, ids: Ids) -> dict[str, np.ndarray]:
    """A table's raw-op fields as int64 arrays. Id assignment order (task, proc, then the table's own ids)
    matters: ids are handed out in call order."""
    pid = col(t, "pid")
    tgid = col(t, "tgid")
    f: dict[str, np.ndarray] = {
        "ts": col(t, "ts_ns"),
        "cpu": col(t, "cpu"),
        "task": ids.tasks(pid),
        "proc": ids.procs(tgid),
    }
    if name == "tlb_flush":
        f |= {"sub": col(t, "reason"), "a": col(t, "pages")}
    elif name == "shootdown":
        f |= {"a": col(t, "target_cpu")}
    elif name == "reclaim":
        f |= {"sub": col(t, "event"), "a": col(t, "pfn")}
    elif name == "unmap":
        f |= {"a": ids.mm.get(col(t, "mm_id")), "sub": col(t, "member"), "b": col(t, "delta"), "c": col(t, "ctx")}
    elif name == "page_cache":
        f |= {
            "a": col(t, "pfn"),
            "b": col(t, "order"),
            "c": ids.mapping.get(file_key(col(t, "dev", np.uint64), col(t, "ino", np.uint64))),
            "d": col(t, "index"),
            "sub": col(t, "ctx"),
        }
    elif name == "migrate":
        f |= {
            "sub": col(t, "event"),
            "a": col(t, "pfn"),
            "b": col(t, "order"),
            "c": (
                col(t, "mig_type")
                | (col(t, "writable") << 4)
                | (col(t, "dirty") << 5)
                | ((col(t, "mode") & 0xF) << 8)
                | ((col(t, "reason") & 0xF) << 12)
            ),
            "d": _u64(t, "addr"),
        }
    elif name == "page":
        f |= {
            "sub": col(t, "event"),
            "a": col(t, "pfn"),
            "b": col(t, "order"),
            "c": col(t, "source") | (col(t, "percpu_refill") << 8),
            "d": _u64(t, "gfp_flags"),
        }
    elif name == "fault":
        f |= {"a": _u64(t, "address"), "sub": col(t, "write")}
    elif name == "syscall":
        dur = np.maximum(col(t, "duration_ns"), 0)
        f |= {
            "sub": col(t, "nr"),
            "a": _u64(t, "arg0"),
            "b": _u64(t, "arg1"),
            "c": _u64(t, "arg2"),
            "d": _u64(t, "arg3"),
            "e": np.where(col(t, "ret") >= 0, dur, -dur - 1),
        }
    elif name == "file":
        f |= {
            "sub": col(t, "event"),
            "a": ids.mapping.get(file_key(col(t, "dev", np.uint64), col(t, "ino", np.uint64))),
        }
    elif name == "sched":
        f |= {"a": ids.tasks(col(t, "next_pid")), "sub": col(t, "prev_kthread")}
    elif name == "proc":
        f |= {"sub": col(t, "event"), "a": (pid == tgid).astype(np.int64)}
    elif name == "mm":
        f |= {"a": ids.mm.get(col(t, "mm_id"))}
    return f


@numba.njit(cache=True, nogil=True)
def _scatter(out, pos, kind, ts, cpu, task, proc, sub, a, b, c, d, e):  # type: ignore[no-untyped-def]
    """Write one table's rows to their sorted places ``pos`` of ``out``; empty arrays mean 0."""
    max_cpu = O.MAX_CPUS - 1
    for i in range(pos.shape[0]):
        r = out[pos[i]]
        r["ts"] = ts[i]
        r["kind"] = kind
        r["sub"] = sub[i] if sub.shape[0] else 0
        r["cpu"] = min(cpu[i], max_cpu)
        r["task"] = task[i]
        r["proc"] = proc[i]
        r["a"] = a[i] if a.shape[0] else 0
        r["b"] = b[i] if b.shape[0] else 0
        r["c"] = c[i] if c.shape[0] else 0
        r["d"] = d[i] if d.shape[0] else 0
        r["e"] = e[i] if e.shape[0] else 0


def _i64(f: dict[str, np.ndarray], k: str) -> np.ndarray:
    v = f.get(k)
    return _NONE if v is None else np.ascontiguousarray(v, dtype=np.int64)


class RawBuilder:
    """Builds segments' raw ops into reused buffers (no fresh 60-byte-per-row allocation per segment).

    ``nbuf`` buffers are used in turn, so the last ``nbuf`` results stay valid (the prefetch pipeline keeps one
    segment in flight while the previous one is replayed).
    """

    def __init__(self, ids: Ids, nbuf: int = 1) -> None:
        self.ids = ids
        self.bufs = [np.zeros(0, O.RAW_DTYPE) for _ in range(nbuf)]
        self.turn = 0

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.bufs)

    def build(self, seg: dict[str, pa.Table]) -> np.ndarray:
        """One segment's rows of every event table as one time-sorted raw-op array (a view of a buffer)."""
        parts = []
        for name in EVENT_TABLES:
            t = seg.get(name)
            if t is not None and t.num_rows:
                parts.append((KIND[name], _fields(name, t, self.ids)))
        n = sum(p[1]["ts"].size for p in parts)
        k = self.turn
        self.turn = (k + 1) % len(self.bufs)
        if self.bufs[k].shape[0] < n:
            self.bufs[k] = np.empty(int(1.25 * n), O.RAW_DTYPE)  # headroom for the next, slightly larger one
        out = self.bufs[k][:n]
        if n == 0:
            return out
        order = np.argsort(np.concatenate([p[1]["ts"] for p in parts]), kind="stable")
        pos = np.empty(n, np.int64)
        pos[order] = np.arange(n, dtype=np.int64)
        del order
        off = 0
        for kind, f in parts:
            m = f["ts"].size
            g = {k: _i64(f, k) for k in ("ts", "cpu", "task", "proc", "sub", "a", "b", "c", "d", "e")}
            _scatter(out, pos[off : off + m], kind, *g.values())
            off += m
        return out


def _read(f: Path, columns: list[str]) -> pa.Table:
    try:
        return pq.ParquetFile(f).read(columns=columns)
    except Exception as e:  # pyarrow raises several types for truncated/corrupt files
        raise TraceError(f"{f}: unreadable Parquet segment ({str(e).splitlines()[0]})") from None


def read_segments(trace: Trace, names: Iterable[str] = EVENT_TABLES) -> Iterator[dict[str, pa.Table]]:
    """Segments in time order, only the ``COLUMNS`` the engine uses; one segment of each table at a time."""
    names = list(names)
    for i in range(trace.n_segments):
        seg = {}
        for name in names:
            files = trace.files.get(name, [])
            if i < len(files):
                seg[name] = _read(files[i], COLUMNS[name])
        yield seg


@dataclass
class Footers:
    """What the engine needs from the Parquet footers, read in one pass (no row data)."""

    t0: int = 0
    t1: int = 0
    max_pfn: int = -1
    max_cpu: int = -1

    @classmethod
    def scan(cls, trace: Trace) -> Footers:
        lo: int | None = None
        hi: int | None = None
        pfn = cpu = -1
        for name in EVENT_TABLES:
            want = {"ts_ns"}
            if name in ("page", "page_cache", "migrate"):
                want.add("pfn")
            if name in ("tlb_flush", "sched", "shootdown"):
                want.add("cpu")
            if name == "shootdown":
                want.add("target_cpu")
            for f in trace.files.get(name, []):
                try:
                    md = pq.read_metadata(f)
                except Exception as e:
                    raise TraceError(f"{f}: unreadable Parquet segment ({str(e).splitlines()[0]})") from None
                sch = md.schema.to_arrow_schema()
                idx = {c: sch.get_field_index(c) for c in want}
                for g in range(md.num_row_groups):
                    rg = md.row_group(g)
                    for c, j in idx.items():
                        if j < 0:
                            continue
                        st = rg.column(j).statistics
                        if st is None or not st.has_min_max:
                            continue
                        if c == "ts_ns":
                            lo = st.min if lo is None else min(lo, st.min)
                            hi = st.max if hi is None else max(hi, st.max)
                        elif c == "pfn":
                            pfn = max(pfn, int(st.max))
                        else:
                            cpu = max(cpu, int(st.max))
        return cls(int(lo or 0), int(hi or 0), pfn, cpu)


def empty_segment() -> dict[str, pa.Table]:
    return {n: schema.empty_table(n).select(COLUMNS[n]) for n in EVENT_TABLES}
