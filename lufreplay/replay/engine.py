"""The replay engine: trace segments → time-ordered raw ops → model ops → every model, in one pass.

Memory is bounded by one segment of each table plus the model state (per-page arrays over the pages the trace
touches, per-task/mm/mapping arrays, carried across segments). pfns are remapped to compact ids (``PfnMap``,
built by a scan of the pfn columns before the replay), so the per-page arrays do not follow the host's pfn
range; pfns that leave the simulator (``--out`` decisions, error messages) are mapped back. ``maps`` and ``mm``
are small user-side tables and are loaded whole up front. CPUs are relabelled densely (``CpuMap``, built by a scan
of the cpu columns): the models run on the CPUs the trace involves, whatever the host's CPU count (masks of
W = ceil(involved / 64) words: the uint64 code at W = 1, W-word copies beyond, ``model/widemask.py``), and
``ReplayResult.cpus`` maps their per-CPU outputs back to the real CPU ids. The per-segment buffers (raw ops, model ops) are reused from one segment
to the next, so their size follows the largest segment, not the trace. By default the next segment is read and
turned into raw ops in a second thread while the current one is replayed (``prefetch``), and the models run in
parallel threads (``jobs``; their numba cores release the GIL) while the next segment is reconstructed.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from lufreplay import schema
from lufreplay.model import MODELS, widemask
from lufreplay.model import kernels as K
from lufreplay.model import ops as O
from lufreplay.model.base import Model
from lufreplay.model.state import grow, model_options
from lufreplay.replay import cpustate as CS
from lufreplay.replay import reconstruct as RC
from lufreplay.replay import scope as SC
from lufreplay.replay.cpustate import MASK_MODES
from lufreplay.replay.rawops import (
    COLUMNS,
    EVENT_TABLES,
    KIND,
    CpuMap,
    Footers,
    IdMap,
    Ids,
    PfnMap,
    RawBuilder,
    file_key,
    read_segments,
    scan_maps,
)
from lufreplay.replay.rawops import col as _col
from lufreplay.trace import perturb
from lufreplay.trace.reader import Trace

__all__ = ["COLUMNS", "EVENT_TABLES", "KIND", "CpuMap", "IdMap", "Ids", "PfnMap", "ReplayResult", "raw_ops", "replay"]


def raw_ops(seg: dict[str, pa.Table], ids: Ids) -> np.ndarray:
    """One segment's rows of every event table as one time-sorted raw-op array (a fresh array)."""
    return RawBuilder(ids).build(seg)


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
        mapping = np.where(ino != 0, ids.mapping.get(file_key(dev, ino)), -1).astype(np.int64)
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


def mop_dtype(w: int) -> np.dtype:
    """The model-op record of ``w``-word masks (``O.MOP_DTYPE`` at one word)."""
    return O.MOP_DTYPE if w == 1 else widemask.wide_dtype(O.MOP_DTYPE, ("mask", "mask2"), w)


def recon_kernels(w: int) -> Any:
    """The reconstructor module for ``w``-word masks: ``reconstruct`` itself at one word, else a copy compiled by
    ``widemask.modules`` (with cpustate and the kernels; once per process and width, not cached on disk)."""
    return RC if w == 1 else widemask.modules([K, CS, RC], w)[RC.__name__]


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
    x[RC.X_CPUMASK] = float(MASK_MODES.index(opts["mm_cpumask"]))
    return x


class Reconstructor:
    """Carries the reconstruction state (per task, CPU, mm, process; the pending-item pool) across segments."""

    def __init__(
        self,
        opts: dict[str, Any],
        ncpu: int,
        maps: MapsIndex,
        traced_tgids: set[int] | None = None,
        recorder_tgid: int | None = None,
        nbuf: int = 1,
    ) -> None:
        self.X = recon_options(opts, ncpu)
        #: mask words (model/widemask.py), CPU rows of the per-CPU tables (64 per word) and the op record
        self.w = widemask.words(ncpu)
        rows = 64 * self.w
        self.dtype = mop_dtype(self.w)
        self.rc = recon_kernels(self.w)
        self.maps = maps
        #: the processes whose faults and syscalls the trace holds (the target's); None: every user process but
        #: the recorder (``recorder_tgid``, meta.json ``recorder.tgid``), which the probes never trace
        self.traced_tgids = traced_tgids
        self.recorder_tgid = recorder_tgid
        self.T = np.zeros((0, RC.NT), np.int64)
        self.CPU = np.zeros((rows, RC.NC), np.int64)
        self.CPU[:, RC.C_CUR_MM] = -1
        self.CPU[:, RC.C_CUR_TASK] = -1
        self.CPUM = np.zeros(2 * rows, np.uint64) if self.w == 1 else widemask.MaskArray.zeros(2 * rows, self.w)
        self.MM = np.zeros((0, 2), np.int64)
        self.LAST_RUN = np.zeros((0, rows), np.int64)
        self.PROC_MM = np.zeros(0, np.int64)
        self.pool = np.zeros(0, self.dtype)
        self.nxt = np.zeros(0, np.int64)
        #: output buffers used in turn: the models may still read the last ``nbuf - 1`` results
        self.outs = [np.zeros(0, self.dtype) for _ in range(nbuf)]
        self.turn = 0
        self.S = np.zeros(RC.NS, np.int64)
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
        # headroom, so that segments of about the same size do not each grow (and copy) the pool again
        new_cap = max(cap * 2, int(1.25 * (live + need)) + 1024)
        pool = np.zeros(new_cap, self.dtype)  # calloc: slots cost no RSS until pool_new hands them out
        pool.view(np.uint8)[: self.pool.nbytes] = self.pool.view(np.uint8)  # a structured copy goes row by row
        nxt = np.empty(new_cap, np.int64)
        nxt[:cap] = self.nxt
        # chain the new slots onto the free list
        nxt[cap : new_cap - 1] = np.arange(cap + 1, new_cap)
        nxt[new_cap - 1] = self.S[RC.S_FREE]
        self.S[RC.S_FREE] = cap
        self.pool, self.nxt = pool, nxt

    def run(self, raw: np.ndarray, ids: Ids, final: bool) -> np.ndarray:
        """Model ops of one segment: a view of a buffer reused ``nbuf`` calls later (copy it to keep it)."""
        self._grow_tables(ids)
        self._grow_pool(3 * raw.shape[0] + 16)
        need = 4 * raw.shape[0] + int(self.S[RC.S_POOL_LIVE]) + 4 * self.CPU.shape[0] + 64
        k = self.turn
        self.turn = (k + 1) % len(self.outs)
        if self.outs[k].shape[0] < need:
            self.outs[k] = np.empty(int(1.25 * need), self.dtype)
        out = self.outs[k]
        self.S[RC.S_NOUT] = 0
        m = self.maps
        self.rc.reconstruct(
            raw, self.X, self.T, self.CPU, self.CPUM, self.MM, self.LAST_RUN, self.PROC_MM, self.pool, self.nxt,
            self.S, out, self.RS, m.pr_lo, m.pr_hi, m.sn_ts, m.sn_lo, m.sn_hi, m.mp_start, m.mp_end, m.mp_off,
            m.mp_map, m.mp_flags, final,
        )  # fmt: skip
        n = int(self.S[RC.S_NOUT])
        self.rc.untraced_senders(out, n, self.T, self._traced(ids))
        return out[:n]

    def _traced(self, ids: Ids) -> np.ndarray:
        """Per dense process id: 1 when the trace holds its faults and syscalls."""
        if self.traced_tgids is not None:
            return SC.in_scope_procs(ids.proc, self.traced_tgids)
        traced = np.ones(len(ids.proc) + 1, np.uint8)
        i = ids.proc.ids.get(self.recorder_tgid) if self.recorder_tgid is not None else None
        if i is not None:
            traced[i] = 0
        return traced

    @property
    def out(self) -> np.ndarray:
        """The buffer the last ``run`` wrote."""
        return self.outs[(self.turn - 1) % len(self.outs)]

    @property
    def nbytes(self) -> int:
        tables = (self.T, self.CPU, self.MM, self.LAST_RUN, self.PROC_MM, self.pool, self.nxt, *self.outs)
        return sum(a.nbytes for a in tables)


def time_range(trace: Trace) -> tuple[int, int]:
    """First and last event time from the Parquet footers' statistics (no data read)."""
    f = Footers.scan(trace)
    return f.t0, f.t1


def nr_cpus(trace: Trace, footers: Footers | None = None) -> int:
    """CPUs of the recorded machine: meta.json, else the largest CPU number seen (any count up to 8192; the
    models run on the CPUs involved, ``CpuMap``)."""
    host = trace.meta.get("host")
    n = trace.meta.get("nr_cpus") or (host.get("nr_cpus") if isinstance(host, dict) else None)
    if not n:
        n = 1 + max((footers or Footers.scan(trace)).max_cpu, 0)
    return int(n)


def model_cpus(trace: Trace) -> tuple[CpuMap, int]:
    """The dense CPU map of a trace and the CPU count the models run on (the CPUs involved, at least 1)."""
    cpus = CpuMap.scan(trace)
    cpus.limit = 64 * widemask.words(cpus.n)  # the rows of the reconstructor's per-CPU tables
    return cpus, max(cpus.n, 1)


@dataclass
class ReplayResult:
    models: dict[str, Model]
    recon_stats: np.ndarray
    #: CPUs the models ran on (dense ids 0..ncpu-1)
    ncpu: int
    t0: int
    t1: int
    tl: np.ndarray
    raw_events: int
    model_ops: int
    ids: Ids
    ops: list[np.ndarray]
    #: seconds per stage (``read+raw`` overlaps the others when prefetching; models overlap with ``jobs`` > 1),
    #: the same stages' CPU seconds (``cpu:`` keys, the CPU time of the thread that ran them) and the largest
    #: per-segment buffers (``*_bytes``)
    stages: dict[str, float]
    #: the pfn ↔ compact id map the models' pfns are in (``pfns.real`` maps them back)
    pfns: PfnMap
    #: the dense ↔ real CPU map the models' CPUs are in (``cpus.real[i]``: real id of model CPU i)
    cpus: CpuMap
    #: CPUs of the recorded host (meta.json): the length of per-CPU outputs indexed by real CPU id
    host_cpus: int

    def real_cpus(self) -> np.ndarray:
        """Real CPU id of each model CPU 0..ncpu-1 (a CPU the trace never names keeps its own id)."""
        r = np.arange(self.ncpu, dtype=np.int64)
        r[: self.cpus.n] = self.cpus.real[: self.ncpu]
        return r

    def per_cpu(self, values: Iterable[int] | np.ndarray) -> list[int]:
        """Values per model CPU → a list indexed by real CPU id, ``host_cpus`` long (0 where not involved)."""
        v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, np.int64)[: self.ncpu]
        real = self.real_cpus()[: v.size]
        out = np.zeros(max(self.host_cpus, int(real.max()) + 1 if real.size else 0), np.int64)
        out[real] = v
        return [int(x) for x in out]

    #: the same models replayed over the target scope's ops (``lufreplay.replay.scope``); empty without a target
    scoped: dict[str, Model] = field(default_factory=dict)
    #: ``recon_stats`` with the folio and page counts (eligibility) of the target scope's folios alone
    scoped_stats: np.ndarray | None = None


class _Prefetch:
    """Reads and builds the next segment's raw ops in a thread while the caller replays the current one.

    Two raw buffers go back and forth: the worker fills a free one, the iterator hands it back when the caller
    asks for the next segment, so at most two segments' raw ops and one segment's Arrow columns are alive.
    Parquet decoding and the scatter kernel run without the GIL; the model cores hold it, so the overlap needs
    a second core. Results do not depend on it: ids are handed out by the worker alone, in segment order.
    """

    _DONE = object()

    def __init__(self, segs: Iterable[dict[str, pa.Table]], builder: RawBuilder) -> None:
        self.segs = segs
        self.builder = builder
        self.free: queue.Queue[int] = queue.Queue()
        for k in range(len(builder.bufs)):
            self.free.put(k)
        self.ready: queue.Queue[Any] = queue.Queue()
        self.stop = threading.Event()
        self.busy_s = 0.0
        self.busy_cpu_s = 0.0
        self.thread = threading.Thread(target=self._work, name="lufreplay-prefetch", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        try:
            it = iter(self.segs)
            while True:
                k = self._take_free()
                if k is None:
                    return
                t, c = time.perf_counter(), time.thread_time()
                seg = next(it, None)
                if seg is None:
                    self.ready.put(self._DONE)
                    return
                self.builder.turn = k
                raw = self.builder.build(seg)
                del seg  # the Arrow columns are not needed once the raw ops exist
                self.busy_s += time.perf_counter() - t
                self.busy_cpu_s += time.thread_time() - c
                self.ready.put((k, raw))
        except BaseException as e:  # handed to the caller, which raises it
            self.ready.put(e)

    def _take_free(self) -> int | None:
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            item = self.ready.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            k, raw = item
            yield raw
            self.free.put(k)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def _sequential(
    segs: Iterable[dict[str, pa.Table]], builder: RawBuilder, stages: dict[str, float]
) -> Iterator[np.ndarray]:
    it = iter(segs)
    while True:
        t, c = time.perf_counter(), time.thread_time()
        seg = next(it, None)
        if seg is None:
            return
        raw = builder.build(seg)
        del seg  # free the Arrow columns before the segment is replayed
        stages["read+raw"] += time.perf_counter() - t
        stages["cpu:read+raw"] = stages.get("cpu:read+raw", 0.0) + time.thread_time() - c
        yield raw


def default_jobs() -> int:
    """Threads for the models: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


class _Runner:
    """Runs every model (host and scoped) over one segment's ops: inline with one job, else on a thread pool.

    Each model's state is its own and its runs stay in segment order (a segment's runs are all waited for before
    the next segment's are started), so the results do not depend on ``jobs``. The runs of one segment read the
    reconstruction buffer of that segment while the engine reconstructs the next one into the other buffer.
    """

    def __init__(self, jobs: int, stages: dict[str, float]) -> None:
        self.stages = stages
        self.pool = ThreadPoolExecutor(jobs, thread_name_prefix="lufreplay-model") if jobs > 1 else None
        self.pending: list[Future[None]] = []

    def _one(self, key: str, m: Model, mops: np.ndarray, n: int, mp: int, sizes: tuple[int, int, int]) -> None:
        t, c = time.perf_counter(), time.thread_time()
        m.run(mops, n, mp, sizes)
        # one key per model: a model's runs never overlap, so these updates never race
        self.stages[key] = self.stages.get(key, 0.0) + time.perf_counter() - t
        self.stages["cpu:" + key] = self.stages.get("cpu:" + key, 0.0) + time.thread_time() - c

    def wait(self) -> None:
        """Wait for the runs in flight; the first error is raised once all have stopped."""
        pending, self.pending = self.pending, []
        err: BaseException | None = None
        for f in pending:
            try:
                f.result()
            except BaseException as e:  # re-raised below, once the others have finished
                err = err or e
        if err is not None:
            raise err

    def submit(self, runs: list[tuple[str, Model, np.ndarray, int]], mp: int, sizes: tuple[int, int, int]) -> None:
        """Start one segment's runs (after the previous segment's have finished)."""
        self.wait()
        if self.pool is None:
            for key, m, mops, n in runs:
                self._one(key, m, mops, n, mp, sizes)
            return
        # the costliest first (as measured so far), so that the last to start is a short one
        runs = sorted(runs, key=lambda r: -self.stages.get(r[0], 0.0))
        self.pending = [self.pool.submit(self._one, key, m, mops, n, mp, sizes) for key, m, mops, n in runs]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def replay(
    trace: Trace,
    model_names: Iterable[str],
    opts: dict[str, Any],
    decisions: bool = False,
    segments: Iterable[dict[str, pa.Table]] | None = None,
    keep_ops: bool = False,
    prefetch: bool = True,
    pfn_scan: bool = True,
    progress: Callable[[int], None] | None = None,
    scope_tgids: set[int] | None = None,
    jobs: int | None = None,
) -> ReplayResult:
    """Replay a trace through the named models (one pass over the segments, after a scan of the pfn columns).

    ``progress`` is called after each segment with the number of raw events it held.

    ``pfn_scan=False`` skips the scan: compact ids are then handed out by aligned 1024-pfn chunks in order of
    first appearance (same results, per-page memory follows the chunks touched instead of the pages).
    ``scope_tgids``: also replay every model over the ops of these processes' mms alone (``ReplayResult.scoped``).
    ``jobs``: threads the models run on (None: ``default_jobs()``; 1: all in the calling thread); same results.
    """
    jobs = default_jobs() if jobs is None else max(1, int(jobs))
    footers = Footers.scan(trace)
    host_cpus = nr_cpus(trace, footers)
    t = time.perf_counter()
    scanned = scan_maps(trace, pfns=pfn_scan)  # one read of the cpu and pfn columns
    cpus = scanned[0] or CpuMap()
    ncpu = max(cpus.n, 1)
    # the masks are sized for the CPUs the scan found (64 per word); a segment naming more is refused (CpuMap)
    cpus.limit = 64 * widemask.words(ncpu)
    t_cpus = time.perf_counter() - t
    t0, t1 = footers.t0, footers.t1
    tl = np.array([t0, max(1, (t1 - t0) // O.TIMELINE_BINS + 1)], np.int64)
    ids = Ids()
    maps = MapsIndex(trace, ids)
    rec = Reconstructor(
        opts, ncpu, maps, SC.target_tgids(trace), perturb.recorder_tgid(trace.meta), nbuf=2 if jobs > 1 else 1
    )
    Y = model_options(opts, ncpu)
    pfns = scanned[1] or PfnMap()
    models = {n: MODELS[n](opts, Y, tl, ncpu, decisions) for n in model_names}
    scoped = {n: MODELS[n](opts, Y, tl, ncpu, False) for n in model_names} if scope_tgids is not None else {}
    scope_bufs = [np.empty(0, rec.dtype) for _ in range(2 if jobs > 1 else 1)]
    scope_elig = np.zeros(2 * RC.NREJ + 1, np.int64)  # scope.scope_filter's layout
    for m in (*models.values(), *scoped.values()):
        m.pfn_of = pfns.real_one
        m.pages.ensure(pfns.limit, exact=True)  # the scan saw every block: no growth unless segments are injected
    seg_iter = segments if segments is not None else read_segments(trace)
    stages = {"scan": t_cpus, "read+raw": 0.0, "reconstruct": 0.0, **{n: 0.0 for n in models}}
    builder = RawBuilder(ids, nbuf=2 if prefetch else 1, pfns=pfns, cpus=cpus)
    pf = _Prefetch(seg_iter, builder) if prefetch else None
    raws = iter(pf) if pf is not None else _sequential(seg_iter, builder, stages)
    runner = _Runner(jobs, stages)
    n_raw = n_ops = 0
    n_seg = 0
    kept: list[np.ndarray] = []
    sizes = (0, 0, 0)

    def feed(raw: np.ndarray, final: bool) -> int:
        nonlocal sizes, n_seg
        t, c = time.perf_counter(), time.thread_time()
        mops = rec.run(raw, ids, final)
        stages["reconstruct"] += time.perf_counter() - t
        stages["cpu:reconstruct"] = stages.get("cpu:reconstruct", 0.0) + time.thread_time() - c
        if keep_ops:
            kept.append(mops.copy())
        sizes = (max(sizes[0], len(ids.task) + 1), max(sizes[1], len(ids.mm) + 1), max(sizes[2], len(ids.mapping) + 1))
        mp = pfns.limit - 1  # the builder only grows the map: at least what this segment's ids need
        runs = [(name, m, mops, int(mops.shape[0])) for name, m in models.items()]
        if scoped:
            # the filter reads the reconstruction's tables, which the next segment changes: done here, not later
            t, c = time.perf_counter(), time.thread_time()
            b = n_seg % len(scope_bufs)
            if scope_bufs[b].shape[0] < mops.shape[0]:
                scope_bufs[b] = np.empty(int(1.25 * mops.shape[0]) + 16, rec.dtype)
            ins = SC.in_scope_procs(ids.proc, scope_tgids or set())
            k = SC.scope_filter(mops, mops.shape[0], ins, rec.MM, rec.T, RC.T_PROC, scope_bufs[b], scope_elig)
            stages["scope"] = stages.get("scope", 0.0) + time.perf_counter() - t
            stages["cpu:scope"] = stages.get("cpu:scope", 0.0) + time.thread_time() - c
            runs += [("scope:" + name, m, scope_bufs[b], int(k)) for name, m in scoped.items()]
        n_seg += 1
        runner.submit(runs, mp, sizes)
        return int(mops.shape[0])

    try:
        for raw in raws:
            n_raw += raw.shape[0]
            n_ops += feed(raw, False)
            if progress is not None:
                progress(raw.shape[0])
            del raw
        n_ops += feed(np.zeros(0, O.RAW_DTYPE), True)
        runner.wait()
    finally:
        if pf is not None:
            pf.close()
            stages["read+raw"] = pf.busy_s
            stages["cpu:read+raw"] = pf.busy_cpu_s
        runner.close()
    if scoped:  # the scoped runs' seconds count in "scope", as before
        for k in ("", "cpu:"):
            stages[k + "scope"] = stages.get(k + "scope", 0.0) + sum(stages.pop(k + "scope:" + n, 0.0) for n in scoped)
    stages["raw_buffer_bytes"] = float(builder.nbytes)
    stages["reconstruct_bytes"] = float(rec.nbytes)
    stages["pfn_map_bytes"] = float(pfns.nbytes)
    scoped_stats = None
    if scoped:
        scoped_stats = rec.RS.copy()
        scoped_stats[RC.RS_FOLIOS : RC.RS_PAGES + RC.NREJ] = scope_elig[:-1]
        scoped_stats[RC.RS_BATCHES] = scope_elig[-1]
    return ReplayResult(
        models,
        rec.RS.copy(),
        ncpu,
        t0,
        t1,
        tl,
        n_raw,
        n_ops,
        ids,
        kept,
        stages,
        pfns,
        cpus,
        host_cpus,
        scoped,
        scoped_stats,
    )
