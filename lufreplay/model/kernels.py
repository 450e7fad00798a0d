"""Small numba helpers shared by the reconstructor and the model cores: CPU-mask algebra and flush accounting.

CPU masks are uint64 bitsets here (64 CPUs, ops.MAX_CPUS); ``model/widemask.py`` compiles the same functions for
W-word masks (64·W CPUs), replacing the primitives that look inside a mask. Every flush a model performs goes
through :func:`account_flush`, which is where remote IPIs are counted under exactly one cause; that is what makes
``by_cause`` sum to the totals.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

from lufreplay.model.ops import (
    M_ALLOC,
    M_FREE,
    M_HOOK,
    M_KEEP,
    M_RECLAIM_BEGIN,
    M_TAKE,
    MAX_CPUS,
    NCAUSE,
    NMISC,
    TIMELINE_BINS,
)
from lufreplay.model.ops import REJECT as _REJECT

J_LARGE_FOLIO = _REJECT.index("large_folio")

U0 = np.uint64(0)
U1 = np.uint64(1)
M1 = np.uint64(0x5555555555555555)
M2 = np.uint64(0x3333333333333333)
M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
H01 = np.uint64(0x0101010101010101)


def cpu_ugen(ugen, c):  # type: ignore[no-untyped-def]
    """In numba code: the ugen CPU ``c`` must reach, ``ugen[c]`` for an array of one per CPU, else ``ugen``."""
    raise NotImplementedError("numba only")


@overload(cpu_ugen, jit_options={"_nrt": False})
def _cpu_ugen(ugen, c):  # type: ignore[no-untyped-def]
    if isinstance(ugen, types.Array):
        return lambda ugen, c: ugen[c]
    return lambda ugen, c: ugen


RD_BINS = 36  # realloc delay: 4 bins per decade from 1 µs to 100 s, plus under/overflow


def acc_layout(max_cpus: int) -> dict[str, int]:
    """Offsets of a model's int64 accumulator vector ``acc`` for masks over ``max_cpus`` CPUs (the module's
    ``O_*`` constants are the 64-CPU layout: compile-time constants for numba)."""
    o: dict[str, int] = {}
    at = 0

    def put(name: str, size: int) -> None:
        nonlocal at
        o[name] = at
        at += size

    put("O_IPIS", NCAUSE)
    put("O_EVENTS", NCAUSE)
    put("O_LOCAL", NCAUSE)
    put("O_PERCPU", max_cpus)
    put("O_MISC", NMISC)
    put("O_HOOK_CALLS", 8)
    put("O_HOOK_NOIPI", 8)
    put("O_TL", TIMELINE_BINS)
    put("O_HELD_TL", TIMELINE_BINS)
    put("O_FID_REC", NCAUSE)
    put("O_FID_EXPL", NCAUSE)
    put("O_FID_PRED", NCAUSE)
    put("O_RD", RD_BINS)
    put("O_REC_PERCPU", max_cpus)  # recorded (vanilla): remote shootdowns received per CPU
    put("O_REC_EVENTS", NCAUSE)  # recorded flush events per cause
    put("O_REC_TL", TIMELINE_BINS)  # recorded remote shootdowns per timeline bin
    put("O_VIOL", 4)  # safety violations (count, pfn, ts)
    # vanilla rebuild, per target CPU: recorded shootdowns it explains, and rebuilt ones that were really sent
    put("O_FID_EXPL_CPU", max_cpus)
    put("O_FID_MATCH_CPU", max_cpus)
    # vanilla rebuild: predicted IPIs of batch flushes that reached no CPU although the kernel traced sending (every
    # remote target skipped: lazy, or a preempted vCPU under KVM PV flush), and of flushes with no remote CPU at all;
    # then the predicted targets (not lazy in the model) that a flush with a traced send did not reach (PV-skip
    # candidates, vanilla.pv_skip_candidates)
    put("O_FID_SKIPPED", 2)
    put("O_FID_PV", 1)
    o["ACC_SIZE"] = at
    return o


_L = acc_layout(MAX_CPUS)
O_IPIS, O_EVENTS, O_LOCAL, O_PERCPU = _L["O_IPIS"], _L["O_EVENTS"], _L["O_LOCAL"], _L["O_PERCPU"]
O_MISC, O_HOOK_CALLS, O_HOOK_NOIPI, O_TL = _L["O_MISC"], _L["O_HOOK_CALLS"], _L["O_HOOK_NOIPI"], _L["O_TL"]
O_HELD_TL, O_FID_REC, O_FID_EXPL, O_FID_PRED = _L["O_HELD_TL"], _L["O_FID_REC"], _L["O_FID_EXPL"], _L["O_FID_PRED"]
O_RD, O_REC_PERCPU, O_REC_EVENTS, O_REC_TL = _L["O_RD"], _L["O_REC_PERCPU"], _L["O_REC_EVENTS"], _L["O_REC_TL"]
O_VIOL, O_FID_EXPL_CPU, O_FID_MATCH_CPU = _L["O_VIOL"], _L["O_FID_EXPL_CPU"], _L["O_FID_MATCH_CPU"]
O_FID_SKIPPED, O_FID_PV, ACC_SIZE = _L["O_FID_SKIPPED"], _L["O_FID_PV"], _L["ACC_SIZE"]

# Log vector ``nlog``: [decisions written, stale requests written, done-history entries written, decision capacity]
L_DEC, L_REQ, L_HIST = 0, 1, 2


@numba.njit(cache=True, _nrt=False)
def bit(c):
    return U1 << np.uint64(c)


@numba.njit(cache=True, _nrt=False)
def carries_lazy(op):
    """Model ops at which a LUF model may flush deferred work: their ``mask2`` holds the CPUs lazy at the op."""
    return op == M_KEEP or op == M_FREE or op == M_TAKE or op == M_ALLOC or op == M_HOOK or op == M_RECLAIM_BEGIN


@numba.njit(cache=True, _nrt=False)
def opm(x):
    """A mask field of a model-op record as a mask (the identity here; a W-word load in ``widemask``)."""
    return x


@numba.njit(cache=True, _nrt=False)
def set_targets(r, targets):
    """Store a decision record's target mask (a W-word store in ``widemask``)."""
    r["targets"] = targets


#: False in the uint64 code, True in the W-word copies (``widemask.primitives``): a constant numba folds, so code
#: may pick a word-wise form for W words while the uint64 form stays as it is
WIDE = False


@numba.njit(cache=True, _nrt=False)
def word(m, k):
    """Word ``k`` of mask ``m`` (CPUs 64k..64k+63): ``m`` itself here."""
    return m


@numba.njit(cache=True, _nrt=False)
def rows_eq_word(T, col, value, n, k):
    """Word ``k`` of the mask of the rows ``c < n`` with ``T[c, col] == value``."""
    x = U0
    for c in range(64 * k, min(n, 64 * k + 64)):
        if T[c, col] == value:
            x |= U1 << np.uint64(c - 64 * k)
    return x


@numba.njit(cache=True, _nrt=False)
def recent_word(last, row, t, window, n, k):
    """Word ``k`` of the mask of the CPUs ``c < n`` with ``last[row, c] > 0`` and, unless ``window`` < 0,
    ``t - last[row, c] <= window``."""
    x = U0
    for c in range(64 * k, min(n, 64 * k + 64)):
        lr = last[row, c]
        if lr > 0 and (window < 0 or t - lr <= window):
            x |= U1 << np.uint64(c - 64 * k)
    return x


@numba.njit(cache=True, _nrt=False)
def rows_eq(T, col, value, n):
    """The mask of the rows ``c < n`` with ``T[c, col] == value``, built a word at a time (``widemask``)."""
    return rows_eq_word(T, col, value, n, 0)


@numba.njit(cache=True, _nrt=False)
def recent(last, row, t, window, n):
    """:func:`recent_word` over the whole mask, a word at a time (``widemask``)."""
    return recent_word(last, row, t, window, n, 0)


@numba.njit(cache=True, _nrt=False)
def set_mask(r, m):
    """Store a model-op record's ``mask`` (a W-word store in ``widemask``)."""
    r["mask"] = m


@numba.njit(cache=True, _nrt=False)
def set_mask2(r, m):
    """Store a model-op record's ``mask2`` (a W-word store in ``widemask``)."""
    r["mask2"] = m


@numba.njit(cache=True, _nrt=False)
def owing(mask, done, owed):
    """The CPUs of ``mask`` that still owe a flush: ``done[c] < owed[c]``."""
    return notdone(mask, owed, done)


@numba.njit(cache=True, _nrt=False)
def popcount(x):
    x = x - ((x >> U1) & M1)
    x = (x & M2) + ((x >> np.uint64(2)) & M2)
    x = (x + (x >> np.uint64(4))) & M4
    return np.int64((x * H01) >> np.uint64(56))


@numba.njit(cache=True, _nrt=False)
def notdone(mask, ugen, done):
    """arch_tlbbatch_diet: the CPUs of ``mask`` whose done stamp is still below ``ugen`` (one ugen for all, or an
    array of one per CPU: :func:`owing`)."""
    out = U0
    m = mask
    c = 0
    while m != U0:
        if m & U1:
            if done[c] < cpu_ugen(ugen, c):
                out |= bit(c)
        m >>= U1
        c += 1
    return out


@numba.njit(cache=True, _nrt=False)
def mark_done(mask, g, done):
    """Raise done[c] to ``g`` for every CPU of ``mask`` (never lowers it)."""
    m = mask
    c = 0
    while m != U0:
        if m & U1:
            if done[c] < g:
                done[c] = g
        m >>= U1
        c += 1


@numba.njit(cache=True, _nrt=False)
def folio_begin_ok(sub, large):
    """FOLIO_BEGIN: the folio may be LUF'd (no static exclusion; large folios allowed with large_folios=eligible)."""
    return sub == 0 or (large and sub == J_LARGE_FOLIO)


@numba.njit(cache=True, _nrt=False)
def folio_end_reason(sub, aux, large):
    """FOLIO_END: the rejection reason the model uses (aux = the reason without the large-folio exclusion)."""
    if large and sub == J_LARGE_FOLIO:
        return aux
    return sub


@numba.njit(cache=True, _nrt=False)
def add_per_cpu(acc, off, m):
    """One count per CPU of mask ``m`` in the per-CPU counters starting at ``acc[off]``."""
    c = 0
    while m != U0:
        if m & U1:
            acc[off + c] += 1
        m >>= U1
        c += 1


@numba.njit(cache=True, _nrt=False)
def account_flush(ts, cpu, task, targets, cause, op, pfn, acc, tl, dec, nlog):
    """Count one flush to ``targets`` sent by ``cpu``: remote IPIs per cause and per target CPU, local flush,
    timeline bin, and (if a decision log is attached) one ``performed`` row. Returns the remote IPI count."""
    remote = targets & ~bit(cpu)
    n = popcount(remote)
    acc[O_IPIS + cause] += n
    if n > 0:
        acc[O_EVENTS + cause] += 1
        add_per_cpu(acc, O_PERCPU, remote)
        b = (ts - tl[0]) // tl[1]
        if b < 0:
            b = 0
        if b >= TIMELINE_BINS:
            b = TIMELINE_BINS - 1
        acc[O_TL + b] += n
    if (targets & bit(cpu)) != U0:
        acc[O_LOCAL + cause] += 1
    log_decision(ts, 0, cause, cpu, task, targets, n, op, pfn, dec, nlog)
    return n


@numba.njit(cache=True, _nrt=False)
def log_decision(ts, kind, cause, cpu, task, targets, ipis, op, pfn, dec, nlog):
    i = nlog[L_DEC]
    if i < dec.shape[0]:
        r = dec[i]
        r["ts"] = ts
        r["kind"] = kind
        r["cause"] = cause
        r["cpu"] = cpu
        r["task"] = task
        set_targets(r, targets)
        r["ipis"] = ipis
        r["op"] = op
        r["pfn"] = pfn
        nlog[L_DEC] = i + 1


@numba.njit(cache=True, _nrt=False)
def add_history(g, ts, mask, hist_g, hist_ts, hist_mask, nlog):
    """Remember that CPUs ``mask`` became done up to ``g`` at ``ts`` (stale-window resolution)."""
    i = nlog[L_HIST]
    if i < hist_g.shape[0]:
        hist_g[i] = g
        hist_ts[i] = ts
        hist_mask[i] = mask
        nlog[L_HIST] = i + 1


@numba.njit(cache=True, _nrt=False)
def add_request(ts, ugen, mask, pages, req_ts, req_ugen, req_mask, req_pages, nlog):
    """A LUF'd folio: ``pages`` pages unmapped at ``ts`` whose stale entries on ``mask`` need done >= ``ugen``."""
    i = nlog[L_REQ]
    if i < req_ts.shape[0]:
        req_ts[i] = ts
        req_ugen[i] = ugen
        req_mask[i] = mask
        req_pages[i] = pages
        nlog[L_REQ] = i + 1


@numba.njit(cache=True, _nrt=False)
def timeline_bin(ts, tl):
    b = (ts - tl[0]) // tl[1]
    if b < 0:
        return 0
    if b >= TIMELINE_BINS:
        return TIMELINE_BINS - 1
    return b


_ = NMISC  # re-exported for the layout above


@numba.njit(cache=True, nogil=True)
def resolve_stale(req_ugen, req_mask, hist_g, hist_ts, hist_mask, ncpu):
    """For each request, the time its last owing CPU reached done >= ugen (-1 if not yet): the covering flush.

    The history is in flush order, so each CPU's (g, ts) sequence is increasing and can be binary-searched. The
    folios of one batch make consecutive requests with the same (ugen, mask): their answer is computed once."""
    nh = hist_g.shape[0]
    counts = np.zeros(ncpu + 1, np.int64)
    for i in range(nh):
        m = hist_mask[i]
        c = 0
        while m != U0 and c < ncpu:
            if m & U1:
                counts[c + 1] += 1
            m >>= U1
            c += 1
    start = np.cumsum(counts)
    fill = start[:ncpu].copy()
    g_by = np.empty(max(start[ncpu], 1), np.int64)
    ts_by = np.empty(max(start[ncpu], 1), np.int64)
    for i in range(nh):
        m = hist_mask[i]
        c = 0
        while m != U0 and c < ncpu:
            if m & U1:
                g_by[fill[c]] = hist_g[i]
                ts_by[fill[c]] = hist_ts[i]
                fill[c] += 1
            m >>= U1
            c += 1
    out = np.empty(req_ugen.shape[0], np.int64)
    for r in range(req_ugen.shape[0]):
        if r > 0 and req_ugen[r] == req_ugen[r - 1] and req_mask[r] == req_mask[r - 1]:
            out[r] = out[r - 1]
            continue
        cover = np.int64(0)
        m = req_mask[r]
        c = 0
        while m != U0:
            if m & U1:
                lo = start[c] if c < ncpu else 0
                hi = start[c + 1] if c < ncpu else 0
                k = lo + np.searchsorted(g_by[lo:hi], req_ugen[r])
                if k >= hi:
                    cover = -1
                    break
                if ts_by[k] > cover:
                    cover = ts_by[k]
            m >>= U1
            c += 1
        out[r] = cover
    return out


@numba.njit(cache=True, nogil=True)
def fold_stale(req_ts, req_pages, cover, edges, hist_counts, prod, keep):
    """Fold the stale-window requests ``cover`` resolved (:func:`resolve_stale`, :func:`resolve_stale_wide`) into
    the histogram ``hist_counts`` (bins: ``searchsorted(edges, w, "right")``, weighted by pages). Writes
    ``w * pages`` of the covered requests, in request order, to ``prod`` (the caller sums it with numpy: the same
    float sum as numpy over the covered requests) and ``keep[r]`` = request r is still open. Returns (covered
    requests, their pages, their largest w in s)."""
    n = 0
    pages = np.int64(0)
    mx = 0.0
    ne = edges.shape[0]
    b = -1  # the last request's bin: the folios of one batch mostly share it
    for r in range(cover.shape[0]):
        if cover[r] < 0:
            keep[r] = True
            continue
        keep[r] = False
        d = cover[r] - req_ts[r]
        if d < 0:
            d = 0
        w = d / 1e9
        pg = req_pages[r]
        pages += pg
        prod[n] = w * np.float64(pg)
        if n == 0 or w > mx:
            mx = w
        if not (b >= 0 and (b == 0 or edges[b - 1] <= w) and (b == ne or w < edges[b])):
            b = np.searchsorted(edges, w, side="right")
        hist_counts[b] += pg
        n += 1
    return n, pages, mx


@numba.njit(cache=True, _nrt=False)
def _cpu_list(row, ncpu, out):
    """The CPUs of a W-word mask ``row`` below ``ncpu`` into ``out``; returns how many."""
    n = 0
    for k in range(row.shape[0]):
        m = row[k]
        c = 64 * k
        while m != U0 and c < ncpu:
            if m & U1:
                out[n] = c
                n += 1
            m >>= U1
            c += 1
    return n


@numba.njit(cache=True, nogil=True)
def resolve_stale_wide(req_ugen, req_mask, hist_g, hist_ts, hist_mask, ncpu):
    """:func:`resolve_stale` for W-word masks (``(n, W)`` uint64 rows)."""
    nh = hist_g.shape[0]
    cpus = np.empty(64 * max(hist_mask.shape[1], req_mask.shape[1]), np.int64)
    counts = np.zeros(ncpu + 1, np.int64)
    for i in range(nh):
        for j in range(_cpu_list(hist_mask[i], ncpu, cpus)):
            counts[cpus[j] + 1] += 1
    start = np.cumsum(counts)
    fill = start[:ncpu].copy()
    g_by = np.empty(max(start[ncpu], 1), np.int64)
    ts_by = np.empty(max(start[ncpu], 1), np.int64)
    for i in range(nh):
        for j in range(_cpu_list(hist_mask[i], ncpu, cpus)):
            c = cpus[j]
            g_by[fill[c]] = hist_g[i]
            ts_by[fill[c]] = hist_ts[i]
            fill[c] += 1
    out = np.empty(req_ugen.shape[0], np.int64)
    for r in range(req_ugen.shape[0]):
        cover = np.int64(0)
        for j in range(_cpu_list(req_mask[r], cpus.shape[0], cpus)):
            c = cpus[j]
            if c >= ncpu:  # no history beyond the model's CPUs: never covered (as in resolve_stale)
                cover = -1
                break
            k = start[c] + np.searchsorted(g_by[start[c] : start[c + 1]], req_ugen[r])
            if k >= start[c + 1]:
                cover = -1
                break
            if ts_by[k] > cover:
                cover = ts_by[k]
        out[r] = cover
    return out


def layout_of(acc: np.ndarray) -> dict[str, int]:
    """The :func:`acc_layout` an accumulator vector was made for (its size says how many CPUs its masks hold)."""
    fixed = ACC_SIZE - 4 * MAX_CPUS  # four blocks are per CPU
    return acc_layout((acc.shape[0] - fixed) // 4)
