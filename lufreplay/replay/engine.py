"""The replay engine: trace segments → time-ordered raw ops → model ops → every model, in one pass.

Memory is bounded by one segment of each table plus the model state (per-page arrays over the pfn range the
trace touches, per-task/mm/mapping arrays, carried across segments). ``maps`` and ``mm`` are small user-side
tables and are loaded whole up front.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lufreplay import schema
from lufreplay.model import MODELS
from lufreplay.model import ops as O
from lufreplay.model.base import Model
from lufreplay.model.state import grow, model_options
from lufreplay.replay import reconstruct as RC
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
COLUMNS: dict[str, list[str]] = {
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
COLUMNS = {k: ["ts_ns", "cpu", "pid", "tgid", *v] for k, v in COLUMNS.items()}
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


class IdMap:
    """Dense ids for sparse integer keys (pids, tgids, mm_ids, (dev, ino) pairs), stable across segments."""

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, keys: np.ndarray) -> np.ndarray:
        if keys.size == 0:
            return np.zeros(0, np.int32)
        uniq, inv = np.unique(keys, return_inverse=True)
        d = self.ids
        dense = np.fromiter((d.setdefault(int(k), len(d)) for k in uniq), dtype=np.int32, count=uniq.size)
        return dense[inv]


def _col(t: pa.Table, name: str, dtype: Any = np.int64) -> np.ndarray:
    return np.asarray(t.column(name).to_numpy(zero_copy_only=False)).astype(dtype, copy=False)


def _file_key(dev: np.ndarray, ino: np.ndarray) -> np.ndarray:
    return (dev.astype(np.uint64) << np.uint64(40)) | (ino.astype(np.uint64) & np.uint64((1 << 40) - 1))


@dataclass
class Ids:
    task: IdMap = field(default_factory=IdMap)
    proc: IdMap = field(default_factory=IdMap)
    mm: IdMap = field(default_factory=IdMap)
    mapping: IdMap = field(default_factory=IdMap)

    def tasks(self, pid: np.ndarray) -> np.ndarray:
        out = self.task.get(pid)
        return np.where(pid > 0, out, -1).astype(np.int32)

    def procs(self, tgid: np.ndarray) -> np.ndarray:
        out = self.proc.get(tgid)
        return np.where(tgid > 0, out, -1).astype(np.int32)


def raw_ops(seg: dict[str, pa.Table], ids: Ids) -> np.ndarray:
    """One segment's rows of every event table as one time-sorted raw-op array."""
    parts = []
    for name in EVENT_TABLES:
        t = seg.get(name)
        if t is None or t.num_rows == 0:
            continue
        n = t.num_rows
        r = np.zeros(n, O.RAW_DTYPE)
        r["ts"] = _col(t, "ts_ns")
        r["kind"] = KIND[name]
        r["cpu"] = np.minimum(_col(t, "cpu"), O.MAX_CPUS - 1)
        pid = _col(t, "pid")
        tgid = _col(t, "tgid")
        r["task"] = ids.tasks(pid)
        r["proc"] = ids.procs(tgid)
        if name == "tlb_flush":
            r["sub"] = _col(t, "reason")
            r["a"] = _col(t, "pages")
        elif name == "shootdown":
            r["a"] = _col(t, "target_cpu")
        elif name == "reclaim":
            r["sub"] = _col(t, "event")
            r["a"] = _col(t, "pfn")
        elif name == "unmap":
            r["a"] = ids.mm.get(_col(t, "mm_id"))
            r["sub"] = _col(t, "member")
            r["b"] = _col(t, "delta")
            r["c"] = _col(t, "ctx")
        elif name == "page_cache":
            r["a"] = _col(t, "pfn")
            r["b"] = _col(t, "order")
            r["c"] = ids.mapping.get(_file_key(_col(t, "dev", np.uint64), _col(t, "ino", np.uint64)))
            r["d"] = _col(t, "index")
            r["sub"] = _col(t, "ctx")
        elif name == "migrate":
            r["sub"] = _col(t, "event")
            r["a"] = _col(t, "pfn")
            r["b"] = _col(t, "order")
            r["c"] = (
                _col(t, "mig_type")
                | (_col(t, "writable") << 4)
                | (_col(t, "dirty") << 5)
                | ((_col(t, "mode") & 0xF) << 8)
                | ((_col(t, "reason") & 0xF) << 12)
            )
            r["d"] = _col(t, "addr", np.uint64).view(np.int64)
        elif name == "page":
            r["sub"] = _col(t, "event")
            r["a"] = _col(t, "pfn")
            r["b"] = _col(t, "order")
            r["c"] = _col(t, "source") | (_col(t, "percpu_refill") << 8)
            r["d"] = _col(t, "gfp_flags", np.uint64).view(np.int64)
        elif name == "fault":
            r["a"] = _col(t, "address", np.uint64).view(np.int64)
            r["sub"] = _col(t, "write")
        elif name == "syscall":
            r["sub"] = _col(t, "nr")
            for k, c in zip("abcd", ("arg0", "arg1", "arg2", "arg3"), strict=True):
                r[k] = _col(t, c, np.uint64).view(np.int64)
            dur = np.maximum(_col(t, "duration_ns"), 0)
            r["e"] = np.where(_col(t, "ret") >= 0, dur, -dur - 1)
        elif name == "file":
            r["sub"] = _col(t, "event")
            r["a"] = ids.mapping.get(_file_key(_col(t, "dev", np.uint64), _col(t, "ino", np.uint64)))
        elif name == "sched":
            r["a"] = ids.tasks(_col(t, "next_pid"))
            r["sub"] = _col(t, "prev_kthread")
        elif name == "proc":
            r["sub"] = _col(t, "event")
            r["a"] = (pid == tgid).astype(np.int64)
        elif name == "mm":
            r["a"] = ids.mm.get(_col(t, "mm_id"))
        parts.append(r)
    if not parts:
        return np.zeros(0, O.RAW_DTYPE)
    raw = np.concatenate(parts)
    return raw[np.argsort(raw["ts"], kind="stable")]


class MapsIndex:
    """maps snapshots as arrays for the numba lookups: per process, snapshots by time, rows by start."""

    def __init__(self, trace: Trace | None, ids: Ids) -> None:
        t = trace.table("maps") if trace is not None else schema.empty_table("maps")
        n = t.num_rows
        if n == 0:
            self.pr_lo = np.zeros(0, np.int64)
            self.pr_hi = np.zeros(0, np.int64)
            self.sn_ts = self.sn_lo = self.sn_hi = np.zeros(0, np.int64)
            self.mp_start = self.mp_end = self.mp_off = self.mp_map = self.mp_flags = np.zeros(0, np.int64)
            return
        proc = ids.procs(_col(t, "tgid")).astype(np.int64)
        snap = _col(t, "snapshot")
        ts = _col(t, "ts_ns")
        start = _col(t, "start", np.uint64).view(np.int64)
        end = _col(t, "end", np.uint64).view(np.int64)
        off = _col(t, "offset", np.uint64).view(np.int64)
        ino = _col(t, "ino", np.uint64)
        dev = _col(t, "dev", np.uint64)
        mapping = np.where(ino != 0, ids.mapping.get(_file_key(dev, ino)), -1).astype(np.int64)
        perms = t.column("perms").to_pylist()
        flags = np.array(
            [
                (p[0] == "r") | (p[1] == "w") << 1 | (p[2] == "x") << 2 | (p[3] == "s") << 3 if p and len(p) >= 4 else 0
                for p in perms
            ],
            dtype=np.int64,
        )
        order = np.lexsort((start, ts, snap, proc))
        proc, snap, ts = proc[order], snap[order], ts[order]
        self.mp_start, self.mp_end, self.mp_off = start[order], end[order], off[order]
        self.mp_map, self.mp_flags = mapping[order], flags[order]
        # snapshots: runs of equal (proc, snapshot)
        brk = np.flatnonzero((np.diff(proc) != 0) | (np.diff(snap) != 0)) + 1
        lo = np.concatenate([[0], brk]).astype(np.int64)
        hi = np.concatenate([brk, [n]]).astype(np.int64)
        sn_proc = proc[lo]
        so = np.lexsort((ts[lo], sn_proc))
        self.sn_lo, self.sn_hi, self.sn_ts = lo[so], hi[so], ts[lo][so]
        sp = sn_proc[so]
        nproc = max(len(ids.proc), int(sp.max()) + 1)
        self.pr_lo = np.searchsorted(sp, np.arange(nproc), side="left").astype(np.int64)
        self.pr_hi = np.searchsorted(sp, np.arange(nproc), side="right").astype(np.int64)


def recon_options(opts: dict[str, Any], ncpu: int) -> np.ndarray:
    x = np.zeros(RC.NX, np.float64)
    x[RC.X_TRIM_NS] = float(opts["mm_cpumask_trim_s"]) * 1e9
    x[RC.X_CLIP] = 1.0 if opts["clip_to_recorded"] else 0.0
    x[RC.X_UNKNOWN_ELIG] = 1.0 if opts["unknown_rw"] == "eligible" else 0.0
    x[RC.X_SHARED_W_RO] = 1.0 if opts["shared_writable_vma"] == "readonly" else 0.0
    x[RC.X_SHARED_RO_MAYWRITE] = 1.0 if opts["shared_ro_maywrite"] else 0.0
    x[RC.X_NO_VMA_MAYWRITE] = 1.0 if opts["no_vma_maywrite"] else 0.0
    x[RC.X_CONFIG] = 1.0 if opts["config_excludes"] else 0.0
    x[RC.X_ARM64] = 1.0 if opts["arch"] == "arm64" else 0.0
    x[RC.X_ATOMIC_NO_SD] = 1.0 if opts["atomic_no_shootdown"] else 0.0
    x[RC.X_DIRTY_MKCLEAN] = 1.0 if opts["dirty_folio_is_mkclean"] else 0.0
    x[RC.X_NCPU] = float(ncpu)
    return x


class Reconstructor:
    """Carries the reconstruction state (per task, CPU, mm, process; the pending-item pool) across segments."""

    def __init__(self, opts: dict[str, Any], ncpu: int, maps: MapsIndex) -> None:
        self.X = recon_options(opts, ncpu)
        self.maps = maps
        self.T = np.zeros((0, RC.NT), np.int64)
        self.CPU = np.zeros((O.MAX_CPUS, RC.NC), np.int64)
        self.CPU[:, RC.C_CUR_MM] = -1
        self.CPU[:, RC.C_CUR_TASK] = -1
        self.CPUM = np.zeros(O.MAX_CPUS, np.uint64)
        self.MM = np.zeros((0, 2), np.int64)
        self.LAST_RUN = np.zeros((0, O.MAX_CPUS), np.int64)
        self.PROC_MM = np.zeros(0, np.int64)
        self.pool = np.zeros(0, O.MOP_DTYPE)
        self.nxt = np.zeros(0, np.int64)
        self.S = np.zeros(4, np.int64)
        self.S[RC.S_FREE] = -1
        self.RS = np.zeros(RC.NRS, np.int64)

    def _grow_tables(self, ids: Ids) -> None:
        nt, nm, npr = len(ids.task) + 1, len(ids.mm) + 1, len(ids.proc) + 1
        if self.T.shape[0] < nt:
            old = self.T.shape[0]
            self.T = grow(self.T, nt, 0)
            new = self.T[old:]
            new[:, :] = 0
            new[:, RC.T_PROC] = -1
            for c in (RC.T_PEND_HEAD, RC.T_PEND_TAIL, RC.T_BATCH_HEAD, RC.T_BATCH_TAIL, RC.T_MIG_PFN):
                new[:, c] = -1
            new[:, RC.T_SYS_UNTIL] = -1
        if self.MM.shape[0] < nm:
            old = self.MM.shape[0]
            self.MM = grow(self.MM, nm, 0)
            self.MM[old:, 0] = -1
            self.LAST_RUN = grow(self.LAST_RUN, self.MM.shape[0], 0)
        if self.PROC_MM.shape[0] < npr:
            self.PROC_MM = grow(self.PROC_MM, npr, -1)

    def _grow_pool(self, need: int) -> None:
        live = int(self.S[RC.S_POOL_LIVE])
        cap = self.pool.shape[0]
        if cap - live >= need:
            return
        new_cap = max(cap * 2, live + need + 1024)
        pool = np.zeros(new_cap, O.MOP_DTYPE)
        pool[:cap] = self.pool
        nxt = np.empty(new_cap, np.int64)
        nxt[:cap] = self.nxt
        # chain the new slots onto the free list
        nxt[cap : new_cap - 1] = np.arange(cap + 1, new_cap)
        nxt[new_cap - 1] = self.S[RC.S_FREE]
        self.S[RC.S_FREE] = cap
        self.pool, self.nxt = pool, nxt

    def run(self, raw: np.ndarray, ids: Ids, final: bool) -> np.ndarray:
        self._grow_tables(ids)
        self._grow_pool(3 * raw.shape[0] + 16)
        out = np.empty(4 * raw.shape[0] + int(self.S[RC.S_POOL_LIVE]) + 4 * O.MAX_CPUS + 64, O.MOP_DTYPE)
        self.S[RC.S_NOUT] = 0
        m = self.maps
        RC.reconstruct(
            raw, self.X, self.T, self.CPU, self.CPUM, self.MM, self.LAST_RUN, self.PROC_MM, self.pool, self.nxt,
            self.S, out, self.RS, m.pr_lo, m.pr_hi, m.sn_ts, m.sn_lo, m.sn_hi, m.mp_start, m.mp_end, m.mp_off,
            m.mp_map, m.mp_flags, final,
        )  # fmt: skip
        return out[: int(self.S[RC.S_NOUT])]


def _max_pfn(mops: np.ndarray) -> int:
    """Upper bound of the pfns a segment's ops touch (head pfn + the largest block, order 9)."""
    return int(mops["pfn"].max()) + 512 if mops.size else 0


def time_range(trace: Trace) -> tuple[int, int]:
    """First and last event time from the Parquet footers' statistics (no data read)."""
    lo, hi = None, None
    for name in EVENT_TABLES:
        for f in trace.files.get(name, []):
            try:
                md = pq.ParquetFile(f).metadata
            except Exception as e:
                raise TraceError(f"{f}: unreadable Parquet segment ({str(e).splitlines()[0]})") from None
            idx = md.schema.to_arrow_schema().get_field_index("ts_ns")
            for g in range(md.num_row_groups):
                st = md.row_group(g).column(idx).statistics
                if st is None or not st.has_min_max:
                    continue
                lo = st.min if lo is None else min(lo, st.min)
                hi = st.max if hi is None else max(hi, st.max)
    return (int(lo or 0), int(hi or 0))


def _stat_max(trace: Trace, table: str, column: str) -> int:
    n = -1
    for f in trace.files.get(table, []):
        md = pq.ParquetFile(f).metadata
        idx = md.schema.to_arrow_schema().get_field_index(column)
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(idx).statistics
            if st is not None and st.has_min_max:
                n = max(n, int(st.max))
    return n


def nr_cpus(trace: Trace) -> int:
    """CPUs of the recorded machine: meta.json, else the largest CPU number seen."""
    host = trace.meta.get("host")
    n = trace.meta.get("nr_cpus") or (host.get("nr_cpus") if isinstance(host, dict) else None)
    if not n:
        n = 1 + max(
            _stat_max(trace, "tlb_flush", "cpu"),
            _stat_max(trace, "sched", "cpu"),
            _stat_max(trace, "shootdown", "cpu"),
            _stat_max(trace, "shootdown", "target_cpu"),
            0,
        )
    n = int(n)
    if n > O.MAX_CPUS:
        raise TraceError(f"{trace.path}: {n} CPUs; lufreplay models at most {O.MAX_CPUS} (uint64 CPU masks)")
    return n


def _feed(
    rec: Reconstructor, models: dict[str, Model], raw: np.ndarray, ids: Ids, final: bool, keep: list | None
) -> int:
    mops = rec.run(raw, ids, final)
    if keep is not None:
        keep.append(mops)
    sizes = (len(ids.task) + 1, len(ids.mm) + 1, len(ids.mapping) + 1)
    mp = _max_pfn(mops)
    for m in models.values():
        m.run(mops, mops.shape[0], mp, sizes)
    return int(mops.shape[0])


@dataclass
class ReplayResult:
    models: dict[str, Model]
    recon_stats: np.ndarray
    ncpu: int
    t0: int
    t1: int
    tl: np.ndarray
    raw_events: int
    model_ops: int
    ids: Ids
    ops: list[np.ndarray]


def replay(
    trace: Trace,
    model_names: Iterable[str],
    opts: dict[str, Any],
    decisions: bool = False,
    segments: Iterable[dict[str, pa.Table]] | None = None,
    keep_ops: bool = False,
) -> ReplayResult:
    """Replay a trace through the named models (one pass over the segments)."""
    ncpu = nr_cpus(trace)
    t0, t1 = time_range(trace)
    tl = np.array([t0, max(1, (t1 - t0) // O.TIMELINE_BINS + 1)], np.int64)
    ids = Ids()
    maps = MapsIndex(trace, ids)
    rec = Reconstructor(opts, ncpu, maps)
    Y = model_options(opts, ncpu)
    models = {n: MODELS[n](opts, Y, tl, ncpu, decisions) for n in model_names}
    # size the per-page arrays once from the footers (largest pfn + the largest block)
    top = max(
        _stat_max(trace, "page", "pfn"), _stat_max(trace, "page_cache", "pfn"), _stat_max(trace, "migrate", "pfn")
    )
    for m in models.values():
        m.pages.ensure(top + 512 + 1, exact=True)
    seg_iter = segments if segments is not None else trace.segments(EVENT_TABLES, COLUMNS)
    n_raw = n_ops = 0
    kept: list[np.ndarray] | None = [] if keep_ops else None
    for seg in seg_iter:
        raw = raw_ops(seg, ids)
        n_raw += raw.shape[0]
        n_ops += _feed(rec, models, raw, ids, False, kept)
    n_ops += _feed(rec, models, np.zeros(0, O.RAW_DTYPE), ids, True, kept)
    return ReplayResult(models, rec.RS.copy(), ncpu, t0, t1, tl, n_raw, n_ops, ids, kept or [])
