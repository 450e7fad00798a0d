"""Trace segment → time-sorted raw ops, fast: projected Parquet reads, vectorised ids, one numba scatter.

The raw-op array of a segment is built without per-row Python and without sorting or concatenating
structured arrays (numpy copies 60-byte records one by one): every table's columns are turned into int64
arrays, one stable argsort of all timestamps gives each row its place, and a numba kernel writes the rows
straight into a reused buffer at those places. Equal timestamps keep the ``EVENT_TABLES`` order, then the
row order, exactly as a stable sort of the concatenated tables would.

pfns are remapped to compact ids here (``PfnMap``), before the reconstruction and the models see them, so that
the models' per-page arrays follow the pages the trace touches, not the host's pfn range. CPUs likewise
(``CpuMap``): the CPUs a trace involves get dense ids 0..n-1 in ascending order, so a trace of CPUs 0 and 100 of a
200-CPU host replays as one of CPUs 0 and 1, and the models' CPU masks are as wide as the CPUs involved (one
uint64 up to 64, W words up to 64·W: model/widemask.py), whatever the host's CPU count.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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
    "pte",
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
    "pte": ["op", "level", "addr", "writable", "dirty", "owner_tgid"],
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
    "pte": O.R_PTEX,
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

MAX_PAGE_ORDER = 10  # the largest buddy block: 1024 pages
#: pfns at or beyond this are not pfns (x86-64 and arm64 physical addresses are < 2^52 bytes)
PFN_LIMIT = 1 << 52
#: Tables with a ``pfn`` column, and the raw-op field holding it; the block order is in field ``b`` (reclaim: 0).
PFN_TABLES = ("reclaim", "migrate", "page_cache", "page")
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


@numba.njit(cache=True, nogil=True)
def _to_compact(pfn, start, end, base, lut, lut_lo, lut_shift, out):  # type: ignore[no-untyped-def]
    """Compact id of each pfn (negative pfns unchanged); -2 for a pfn in no run. Returns the misses."""
    miss = 0
    nl = lut.shape[0] - 1
    for i in range(pfn.shape[0]):
        p = pfn[i]
        if p < 0:
            out[i] = p
            continue
        k = (p >> lut_shift) - lut_lo
        if k < 0 or k >= nl:
            out[i] = -2
            miss += 1
            continue
        # the runs starting in super-chunk k, and the last one starting before it (it may reach into it)
        lo = max(lut[k] - 1, 0)
        hi = lut[k + 1]
        while lo < hi:  # first run starting after p
            mid = (lo + hi) >> 1
            if start[mid] <= p:
                lo = mid + 1
            else:
                hi = mid
        j = lo - 1
        if j >= 0 and p < end[j]:
            out[i] = base[j] + (p - start[j])
        else:
            out[i] = -2
            miss += 1
    return miss


def _merge(s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union of the intervals [s, e) as sorted disjoint runs (touching intervals merge too: fewer runs)."""
    if s.size == 0:
        return s.astype(np.int64), e.astype(np.int64)
    o = np.argsort(s, kind="stable")
    s, e = s[o], e[o]
    cm = np.maximum.accumulate(e)
    new = np.empty(s.size, bool)
    new[0] = True
    new[1:] = s[1:] > cm[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, s.size - 1)
    return s[first], cm[last]


def block_order(name: str, f: dict[str, np.ndarray]) -> np.ndarray:
    """Block order of each row of a ``PFN_TABLES`` table's raw-op fields (set_pmd/remove_pmd: a PMD, order 9)."""
    if name == "reclaim":
        return np.zeros(f["a"].size, np.int64)
    order = f["b"]
    if name == "migrate":
        order = np.where((f["sub"] == 2) | (f["sub"] == 3), np.maximum(order, 9), order)
    return order


class PfnMap:
    """Real pfn ↔ compact id, so that per-page model arrays are sized by the pages a trace touches.

    The map is a sorted list of disjoint runs of real pfns; each run gets a contiguous range of compact ids.
    ``scan`` builds it before the replay from the pfn/order columns alone: the runs are the unions of the
    overlapping blocks [pfn, pfn + 2^order) the trace names, laid out in ascending pfn order, so the map is
    monotone, every block stays contiguous, and there are exactly as many compact ids as pages touched.
    A pfn no run covers (segments not from the scanned files) gets the rest of its aligned 1024-pfn chunk as new
    runs at the end of the compact range: any buddy block (order ≤ 10) lies inside one aligned chunk, so a block
    of a chunk seen first this way stays contiguous too. Not thread-safe: one builder thread calls ``compact``.
    """

    def __init__(self) -> None:
        self.start = np.zeros(0, np.int64)
        self.end = np.zeros(0, np.int64)
        self.base = np.zeros(0, np.int64)
        #: compact ids handed out: every id is < n_slots
        self.n_slots = 0
        self._lut = np.zeros(1, np.int32)
        self._lut_lo = 0
        self._lut_shift = MAX_PAGE_ORDER
        self._inv: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def limit(self) -> int:
        """Size a per-page array needs: every compact id plus room for a largest block from the last one."""
        return self.n_slots + (1 << MAX_PAGE_ORDER)

    @property
    def nbytes(self) -> int:
        return self.start.nbytes + self.end.nbytes + self.base.nbytes + self._lut.nbytes

    @classmethod
    def from_blocks(cls, start: np.ndarray, end: np.ndarray) -> PfnMap:
        """The map of the given blocks (merged into runs, compact ids in ascending pfn order)."""
        m = cls()
        s, e = _merge(np.asarray(start, np.int64), np.asarray(end, np.int64))
        m._set(s, e, np.concatenate([[0], np.cumsum(e - s)[:-1]]).astype(np.int64) if s.size else s)
        return m

    @classmethod
    def scan(cls, trace: Trace) -> PfnMap:
        """The map of every block a trace's pfn tables name (reads only their pfn, order and event columns)."""
        pfns = scan_maps(trace, cpus=False)[1]
        assert pfns is not None
        return pfns

    def _set(self, start: np.ndarray, end: np.ndarray, base: np.ndarray) -> None:
        o = np.argsort(start, kind="stable")
        self.start, self.end, self.base = start[o], end[o], base[o]
        self.n_slots = int((self.base + self.end - self.start).max()) if start.size else 0
        self._inv = None
        if start.size == 0:
            self._lut = np.zeros(1, np.int32)
            return
        lo, hi = int(self.start[0]), int(self.end[-1] - 1)
        # super-chunks of 2^shift pfns, as few as keeps the table within 2 entries per run (or 1 Ki entries)
        shift = MAX_PAGE_ORDER
        while ((hi >> shift) - (lo >> shift)) >= max(1 << 10, 2 * start.size):
            shift += 1
        self._lut_shift, self._lut_lo = shift, lo >> shift
        bounds = (np.arange((hi >> shift) - (lo >> shift) + 2, dtype=np.int64) + (lo >> shift)) << shift
        self._lut = np.searchsorted(self.start, bounds, side="left").astype(np.int32)

    def compact(self, pfn: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Compact ids of the blocks (pfn, order); negative pfns stay as they are."""
        pfn = np.ascontiguousarray(pfn, np.int64)
        out = np.empty_like(pfn)
        args = (self.start, self.end, self.base, self._lut, self._lut_lo, self._lut_shift, out)
        if _to_compact(pfn, *args) == 0:
            return out
        miss = out == -2
        self._add_chunks(pfn[miss], np.asarray(order, np.int64)[miss] if np.ndim(order) else order)
        args = (self.start, self.end, self.base, self._lut, self._lut_lo, self._lut_shift, out)
        if _to_compact(pfn, *args):
            raise TraceError(f"pfn {int(pfn[out == -2][0])} cannot be mapped (beyond 2^52?)")
        return out

    def _add_chunks(self, pfn: np.ndarray, order: np.ndarray) -> None:
        """New runs, at the end of the compact range, for the uncovered parts of the chunks ``pfn`` lies in."""
        pfn = pfn[(pfn >= 0) & (pfn < PFN_LIMIT)]
        if pfn.size == 0:
            return
        last = pfn + (np.int64(1) << np.clip(order, 0, MAX_PAGE_ORDER)) - 1
        first_c, last_c = pfn >> MAX_PAGE_ORDER, last >> MAX_PAGE_ORDER
        # chunks in order of first appearance
        chunks = np.stack([first_c, last_c], 1).ravel()
        _, idx = np.unique(chunks, return_index=True)
        chunks = chunks[np.sort(idx)]
        ns, ne = [], []
        for c in chunks.tolist():
            a, b = c << MAX_PAGE_ORDER, (c + 1) << MAX_PAGE_ORDER
            i0 = int(np.searchsorted(self.end, a, side="right"))
            i1 = int(np.searchsorted(self.start, b, side="left"))
            for k in range(i0, i1):  # the gaps between the runs already in the chunk
                if self.start[k] > a:
                    ns.append(a)
                    ne.append(int(self.start[k]))
                a = max(a, int(self.end[k]))
            if a < b:
                ns.append(a)
                ne.append(b)
        if not ns:
            return
        s, e = np.array(ns, np.int64), np.array(ne, np.int64)
        base = self.n_slots + np.concatenate([[0], np.cumsum(e - s)[:-1]]).astype(np.int64)
        self._set(np.concatenate([self.start, s]), np.concatenate([self.end, e]), np.concatenate([self.base, base]))

    def real(self, compact: np.ndarray) -> np.ndarray:
        """Real pfns of compact ids (negative ids unchanged; ids in no run: -1)."""
        c = np.asarray(compact, np.int64)
        if self._inv is None:
            o = np.argsort(self.base, kind="stable")
            self._inv = (self.base[o], self.start[o], self.end[o] - self.start[o])
        b, s, n = self._inv
        j = np.searchsorted(b, c, side="right") - 1
        jj = np.maximum(j, 0)
        ok = (j >= 0) & (c - b[jj] < n[jj]) if b.size else np.zeros(c.shape, bool)
        out = np.where(ok, s[jj] + (c - b[jj]), -1) if b.size else np.full(c.shape, -1, np.int64)
        return np.where(c < 0, c, out).astype(np.int64)

    def real_one(self, compact: int) -> int:
        return int(self.real(np.array([compact], np.int64))[0])


#: Tables whose rows name a CPU besides their ``cpu`` column.
CPU_COLUMNS = {"shootdown": ("target_cpu",)}


class CpuMap:
    """Real CPU id ↔ dense model CPU id, for the CPUs a trace involves (ascending: dense order = real order).

    ``scan`` reads the ``cpu`` column of every event table the replay reads, and ``shootdown.target_cpu``.
    A CPU the scan did not see (segments not from the scanned files) gets the next id, within ``limit``
    (the CPUs the models' masks hold); a CPU id of ``schema.MAX_NR_CPUS`` or more is a TraceError.
    """

    def __init__(self, real: np.ndarray | list[int] | None = None, where: str = "trace") -> None:
        r = np.unique(np.asarray(real if real is not None else [], np.int64))
        self.where = where
        #: the most CPUs the map may hold (the engine sets the models' mask size once the scan is done)
        self.limit = schema.MAX_NR_CPUS
        self.real = np.zeros(0, np.int64)
        self._lut = np.full(0, -1, np.int64)
        self._add(r)

    @property
    def n(self) -> int:
        return int(self.real.size)

    def _add(self, new: np.ndarray) -> None:
        real = np.concatenate([self.real, new.astype(np.int64)])
        if real.size > self.limit:
            raise TraceError(
                f"{self.where}: CPU {int(new.max())} takes part but the scan of the trace found only"
                f" {self.real.size} CPUs; the models' CPU masks were sized for {self.limit}"
            )
        if new.size and int(new.max()) >= schema.MAX_NR_CPUS:
            raise TraceError(f"{self.where}: CPU id {int(new.max())} is beyond {schema.MAX_NR_CPUS - 1}")
        lut = np.full(max(int(real.max()) + 1 if real.size else 0, self._lut.size), -1, np.int64)
        lut[: self._lut.size] = self._lut
        lut[new] = np.arange(self.real.size, real.size)
        self.real, self._lut = real, lut

    def dense(self, cpu: np.ndarray) -> np.ndarray:
        """Dense ids of real CPU ids (new CPUs get the next ids, in ascending order)."""
        cpu = np.asarray(cpu, np.int64)
        if cpu.size == 0:
            return cpu
        if int(cpu.min()) < 0:
            raise TraceError(f"{self.where}: negative CPU id {int(cpu.min())}")
        hi = int(cpu.max())
        if hi >= self._lut.size or (self._lut[cpu] < 0).any():
            seen = np.unique(cpu)
            known = seen < self._lut.size
            known[known] = self._lut[seen[known]] >= 0
            self._add(seen[~known])
        return self._lut[cpu]

    @property
    def identity(self) -> bool:
        """Dense ids equal the real ones (CPUs 0..n-1 all involved)."""
        return bool((self.real == np.arange(self.real.size)).all())

    @classmethod
    def scan(cls, trace: Trace) -> CpuMap:
        """The CPUs of every event table's ``cpu`` column and of ``CPU_COLUMNS`` (reads only those columns)."""
        cpus = scan_maps(trace, pfns=False)[0]
        assert cpus is not None
        return cpus


#: the columns the pfn scan reads per ``PFN_TABLES`` table
PFN_SCAN_COLUMNS = {
    "reclaim": ["pfn"],
    "page_cache": ["pfn", "order"],
    "page": ["pfn", "order"],
    "migrate": ["pfn", "order", "event"],
}


def _distinct(v: np.ndarray) -> np.ndarray:
    """Distinct values of a CPU column (small non-negative ints: a bincount, not numpy 2's slow hashed unique)."""
    if v.size == 0:
        return v.astype(np.int64)
    lo, hi = int(v.min()), int(v.max())
    if lo < 0 or hi >= 1 << 20:
        return np.unique(v).astype(np.int64)  # CpuMap refuses such ids with a clear message
    return np.flatnonzero(np.bincount(v.astype(np.int64, copy=False), minlength=hi + 1))


def scan_maps(trace: Trace, cpus: bool = True, pfns: bool = True) -> tuple[CpuMap | None, PfnMap | None]:
    """``CpuMap.scan`` and ``PfnMap.scan`` in one pass: a pfn table's file is read once for both (its cpu and pfn
    columns together), segment by segment; the pfn runs are merged file by file (memory: the runs, not the rows)."""
    seen: list[np.ndarray] = []
    s = e = np.zeros(0, np.int64)
    for i in range(trace.n_segments):
        for name in EVENT_TABLES:
            files = trace.files.get(name, [])
            if i >= len(files):
                continue
            ccols = ["cpu", *CPU_COLUMNS.get(name, ())] if cpus else []
            pcols = PFN_SCAN_COLUMNS.get(name, []) if pfns else []
            if not ccols and not pcols:
                continue
            t = trace.read_file(files[i], [*ccols, *pcols])
            seen += [_distinct(col(t, c)) for c in ccols]
            if pcols:
                ns, ne = _blocks(t, name, str(files[i]))
                s, e = _merge(np.concatenate([s, ns]), np.concatenate([e, ne]))
    cmap = CpuMap(np.concatenate(seen) if seen else None, where=str(trace.path)) if cpus else None
    return cmap, PfnMap.from_blocks(s, e) if pfns else None


@numba.njit(cache=True, nogil=True)
def _block_keys(pfn, order, event, out):  # type: ignore[no-untyped-def]
    """One key pfn * 2048 + pages per row with a pfn (order: empty = 0; event 2/3 = a PMD, ≥ order 9).
    Returns (keys written, index of a bad row or -1, smallest and largest pfn written)."""
    n = 0
    lo = PFN_LIMIT
    hi = np.int64(-1)
    for i in range(pfn.shape[0]):
        p = pfn[i]
        if p < 0:
            continue
        o = order[i] if order.shape[0] else 0
        if event.shape[0] and (event[i] == 2 or event[i] == 3):
            o = max(o, 9)
        if p >= PFN_LIMIT or o < 0 or o > MAX_PAGE_ORDER:
            return n, i, lo, hi
        out[n] = p * 2048 + (np.int64(1) << o)
        lo = min(lo, p)
        hi = max(hi, p)
        n += 1
    return n, -1, lo, hi


@numba.njit(cache=True, nogil=True)
def _distinct_dense(key, lo, span):  # type: ignore[no-untyped-def]
    """The distinct ``key`` values in ascending order, for pfns within [lo, lo + span): one bit per (pfn, order)
    in a table over the span, read back in pfn then order order (= ascending keys), instead of a sort."""
    seen = np.zeros(span, np.uint16)
    for i in range(key.shape[0]):
        k = key[i]
        pages = k & 2047
        o = 0
        while (np.int64(1) << o) < pages:
            o += 1
        seen[(k >> 11) - lo] |= np.uint16(1) << np.uint16(o)
    m = 0
    for j in range(span):
        x = seen[j]
        while x:
            m += 1
            x &= x - np.uint16(1)
    out = np.empty(m, np.int64)
    m = 0
    for j in range(span):
        x = seen[j]
        o = 0
        while x:
            if x & 1:
                out[m] = (lo + j) * 2048 + (np.int64(1) << o)
                m += 1
            x >>= np.uint16(1)
            o += 1
    return out


def _blocks(t: pa.Table, name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The distinct blocks [pfn, pfn + 2^order) of a pfn table's rows, sorted; a bad pfn/order: TraceError."""
    pfn = col(t, "pfn")
    order = col(t, "order") if name != "reclaim" else _NONE
    event = col(t, "event") if name == "migrate" else _NONE
    key = np.empty(pfn.size, np.int64)
    n, bad, lo, hi = _block_keys(pfn, order, event, key)
    if bad >= 0:
        o = int(order[bad]) if order.size else 0
        if pfn[bad] >= PFN_LIMIT:
            raise TraceError(f"{where}: pfn {int(pfn[bad])} is not a page frame number (≥ 2^52)")
        raise TraceError(f"{where}: block order {o} outside 0..{MAX_PAGE_ORDER} (MAX_PAGE_ORDER)")
    if n and hi - lo < 4 * n + (1 << 16):
        # pfns dense enough (rows name the same pages again and again): a table over their span, not a sort
        key = _distinct_dense(key[:n], lo, hi - lo + 1)
    else:
        key = np.sort(key[:n])  # sort + diff: numpy 2's hash-based np.unique is ~30x slower here
        key = key[np.append(True, key[1:] != key[:-1])] if key.size else key
    return key >> 11, (key >> 11) + (key & 2047)


def col(t: pa.Table, name: str, dtype: Any = np.int64) -> np.ndarray:
    """One column as a numpy array of ``dtype`` (zero-copy when the type already matches)."""
    return np.asarray(t.column(name).to_numpy(zero_copy_only=False)).astype(dtype, copy=False)


def file_key(dev: np.ndarray, ino: np.ndarray) -> np.ndarray:
    return (dev.astype(np.uint64) << np.uint64(40)) | (ino.astype(np.uint64) & np.uint64((1 << 40) - 1))


def _u64(t: pa.Table, name: str) -> np.ndarray:
    return col(t, name, np.uint64).view(np.int64)


def _fields(name: str, t: pa.Table, ids: Ids, cpus: CpuMap | None = None) -> dict[str, np.ndarray]:
    """A table's raw-op fields as int64 arrays. Id assignment order (task, proc, then the table's own ids)
    matters: ids are handed out in call order. With ``cpus``, CPU ids are written as its dense ids."""
    pid = col(t, "pid")
    tgid = col(t, "tgid")

    def cpu(c: str) -> np.ndarray:
        return col(t, c) if cpus is None else cpus.dense(col(t, c))

    f: dict[str, np.ndarray] = {
        "ts": col(t, "ts_ns"),
        "cpu": cpu("cpu"),
        "task": ids.tasks(pid),
        "proc": ids.procs(tgid),
    }
    if name == "tlb_flush":
        f |= {"sub": col(t, "reason"), "a": col(t, "pages")}
    elif name == "shootdown":
        f |= {"a": cpu("target_cpu")}
    elif name == "reclaim":
        f |= {"sub": col(t, "event"), "a": col(t, "pfn")}
    elif name == "unmap":
        f |= {"a": ids.mm.get(col(t, "mm_id")), "sub": col(t, "member"), "b": col(t, "delta"), "c": col(t, "ctx")}
    elif name == "pte":
        owner = col(t, "owner_tgid")
        known = owner > 0
        proc = np.full(owner.shape, -1, np.int64)
        proc[known] = ids.procs(owner[known])
        f |= {
            "sub": col(t, "op") | (col(t, "level") << 4),
            "a": proc,
            "b": col(t, "writable") | (col(t, "dirty") << 1),
            "d": _u64(t, "addr"),
        }
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
def _scatter(out, pos, kind, max_cpu, ts, cpu, task, proc, sub, a, b, c, d, e):  # type: ignore[no-untyped-def]
    """Write one table's rows to their sorted places ``pos`` of ``out``; empty arrays mean 0. CPU ids are capped at
    ``max_cpu``, the last row of the reconstructor's per-CPU tables."""
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

    With ``pfns``, the pfn column of every ``PFN_TABLES`` row is written as a compact id; with ``cpus``, every CPU
    id as a dense one.
    ``nbuf`` buffers are used in turn, so the last ``nbuf`` results stay valid (the prefetch pipeline keeps one
    segment in flight while the previous one is replayed).
    """

    def __init__(self, ids: Ids, nbuf: int = 1, pfns: PfnMap | None = None, cpus: CpuMap | None = None) -> None:
        self.ids = ids
        #: CPU ids are written as this map's dense ids (None: as recorded)
        self.cpus = cpus
        #: pfns are written as this map's compact ids (None: as recorded)
        self.pfns = pfns
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
                f = _fields(name, t, self.ids, self.cpus)
                if self.pfns is not None and name in PFN_TABLES:
                    f["a"] = self.pfns.compact(f["a"], block_order(name, f))
                parts.append((KIND[name], f))
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
        # the reconstructor's per-CPU tables have 64 rows per mask word (the engine sets the map's limit to them)
        max_cpu = (
            self.cpus.limit if self.cpus is not None and self.cpus.limit < schema.MAX_NR_CPUS else O.MAX_CPUS
        ) - 1
        for kind, f in parts:
            m = f["ts"].size
            g = {k: _i64(f, k) for k in ("ts", "cpu", "task", "proc", "sub", "a", "b", "c", "d", "e")}
            _scatter(out, pos[off : off + m], kind, max_cpu, *g.values())
            off += m
        return out


def read_segments(trace: Trace, names: Iterable[str] = EVENT_TABLES) -> Iterator[dict[str, pa.Table]]:
    """Segments in time order, only the ``COLUMNS`` the engine uses; one segment of each table at a time."""
    names = list(names)
    for i in range(trace.n_segments):
        seg = {}
        for name in names:
            files = trace.files.get(name, [])
            if i < len(files):
                seg[name] = trace.read_file(files[i], COLUMNS[name])  # values checked
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
