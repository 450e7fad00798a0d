"""The one replay loop every model runs: the shared rmap-walk prologue, recorded flushes, and dispatch to the
model's policy functions.

``replay(mops, n, S, M)`` reads the model ops (ops.py, luf-model.md §8.2 events) into the state record ``S``
(state.ModelState) under policy ``M`` (state.POL_*). What every LUF model shares is written here once:

- ``can_luf_init`` (FOLIO_BEGIN), ``set_tlb_ubc_flush_pending`` (PTE: §3.2, a writable PTE clears can_luf; the
  PTE's CPUs go to the folio's ro mask or to the non-LUF batch; ``fold_luf_batch`` updates mm/mapping batches),
  ``folio_end_unmap`` (FOLIO_END: the ro mask joins the LUF or the non-LUF batch);
- ``recorded_flush`` (RFLUSH: the flushes LUF leaves alone are passed through; ``recorded_flush_credit``: which
  of them mark done, per policy);
- the batch end's unexplained targets (``unexplained_targets``) and the reset of the open batch.

Everything else is the policy's: one function per event, named after the kernel function making the decision
(luf_v12.py, luf_v11.py, hold_before_free.py, oracle.py, vanilla.py). A policy id is a runtime integer: one
compiled loop serves every model, and each ``if M == ...`` is a branch the CPU predicts (the id never changes
within a run).
"""

from __future__ import annotations

import numba
import numpy as np

from lufreplay.model import hold_before_free as hbf
from lufreplay.model import luf_v11 as v11
from lufreplay.model import luf_v12 as v12
from lufreplay.model import oracle
from lufreplay.model import ops as O
from lufreplay.model import vanilla
from lufreplay.model.kernels import (
    O_HELD_TL,
    O_HOOK_CALLS,
    O_HOOK_NOIPI,
    U0,
    bit,
    folio_begin_ok,
    folio_end_reason,
    popcount,
    timeline_bin,
)
from lufreplay.model.prims import account, count, mark_flushed, next_ugen
from lufreplay.model.state import (
    CAN_LUF,
    COVERED,
    CUR_ORDER,
    CUR_PFN,
    CUR_TS,
    FOLIO_RO,
    HELD,
    LUF_MASK,
    NBUF,
    NONLUF_MASK,
    POL_HBF,
    POL_ORACLE,
    POL_V11,
    POL_V12,
    POL_VANILLA,
    Y_CREDIT_NATURAL,
    Y_LARGE_ELIG,
    Y_UNEXPLAINED_FLUSH,
)


@numba.njit(cache=True)
def can_luf_init(S, r):
    """§3.2: a folio's rmap walk starts; can_luf from the static exclusions (large folios per large_folios)."""
    S.SC[CAN_LUF] = 1 if folio_begin_ok(r["sub"], S.Y[Y_LARGE_ELIG] != 0) else 0
    S.SU[FOLIO_RO] = U0
    S.SC[CUR_PFN] = r["pfn"]
    S.SC[CUR_ORDER] = r["order"]
    S.SC[CUR_TS] = r["ts"]


@numba.njit(cache=True)
def fold_luf_batch(S, mm, mp, m):
    """§2.3 fold_luf_batch_mm / the mapping's: an eligible PTE's CPUs join its mm's (and file mapping's) batch,
    each with a fresh ugen (luf-v12 and the oracle)."""
    if mm >= 0:
        S.MMB_mask[mm] |= m
        S.MMB_ugen[mm] = next_ugen(S)
    if mp >= 0:
        S.ASB_mask[mp] |= m
        S.ASB_ugen[mp] = next_ugen(S)


@numba.njit(cache=True)
def set_tlb_ubc_flush_pending(S, r, M):
    """§8.2.1 unmap_pte on the batched branch (unbatched PTEs were flushed at once: a recorded RFLUSH)."""
    if r["flags"] & O.PTE_UNBATCHED:
        return
    if M == POL_VANILLA:
        vanilla.arch_tlbbatch_add_pending(S, r)
        return
    m = r["mask"]
    if r["flags"] & O.PTE_WRITABLE:
        S.SC[CAN_LUF] = 0
    if S.SC[CAN_LUF] != 0:
        S.SU[FOLIO_RO] |= m
        if M == POL_V12 or M == POL_ORACLE:
            fold_luf_batch(S, r["mm"], r["mapping"], m)
    else:
        S.SU[NONLUF_MASK] |= m


@numba.njit(cache=True)
def folio_end_unmap(S, r, M):
    """§8.2.2: the walk's ro mask joins the LUF batch if the folio stayed eligible (a kept folio too: F11 then
    settles it), else the non-LUF batch. Eligible folios with a known pfn wait in ``buf`` for the batch's key;
    hold-before-free can hold only folios whose pfn is known."""
    reason = folio_end_reason(r["sub"], r["aux"], S.Y[Y_LARGE_ELIG] != 0)
    ok = S.SC[CAN_LUF] != 0 and (reason == 0 or reason == O.J_KEPT_NOT_FREED)
    if M == POL_HBF and reason == 0 and S.SC[CUR_PFN] < 0:
        ok = False
    if not ok:
        S.SU[NONLUF_MASK] |= S.SU[FOLIO_RO]
        return
    S.SU[LUF_MASK] |= S.SU[FOLIO_RO]
    if reason == 0 and S.SC[CUR_PFN] >= 0:
        b = S.SC[NBUF]
        S.buf[b, 0] = S.SC[CUR_PFN]
        S.buf[b, 1] = S.SC[CUR_ORDER]
        S.buf[b, 2] = S.SC[CUR_TS]
        S.SC[NBUF] = b + 1


@numba.njit(cache=True)
def keep_flushes_batch(S):
    """F11 without keys (v11, hold-before-free, oracle): the LUF work of the pass is flushed with the batch."""
    S.SU[NONLUF_MASK] |= S.SU[LUF_MASK]
    S.SU[LUF_MASK] = U0
    S.SC[NBUF] = 0


@numba.njit(cache=True)
def batch_begin(S, r):
    """Recorded batch targets no modelled mask covers: flushed with the non-LUF part (unexplained_targets=flush)."""
    if S.Y[Y_UNEXPLAINED_FLUSH] != 0:
        SU = S.SU
        SU[NONLUF_MASK] |= r["mask"] & ~(SU[LUF_MASK] | SU[NONLUF_MASK] | SU[COVERED])


@numba.njit(cache=True)
def batch_end(S):
    S.SU[LUF_MASK] = U0
    S.SU[NONLUF_MASK] = U0
    S.SU[COVERED] = U0


@numba.njit(cache=True)
def recorded_flush_credit(S, r, M, tg):
    """§5: which recorded flushes mark done. v12: F9 flush_tlb_batched_pending marks mm_cpumask (R6 counts the
    CPUs running another mm); other flushes only with credit_natural_flushes. The oracle: every full flush."""
    if M == POL_V12:
        if r["sub"] == O.C_BATCHED_PENDING:
            count(S, O.K_R6_CREDITS_OTHER_MM, popcount(np.uint64(r["pfn"])))
            return r["mask2"]
        if S.Y[Y_CREDIT_NATURAL] != 0 and (r["flags"] & 2):
            return tg
    elif M == POL_ORACLE and (r["flags"] & 2):
        return tg
    return U0


@numba.njit(cache=True)
def recorded_flush(S, r, M):
    """RFLUSH: a recorded flush LUF leaves alone passes through (immediate, zap, batched_pending, ...)."""
    if M == POL_VANILLA:
        vanilla.fidelity_recorded_flush(S, r)
    tg = r["mask"] | (bit(r["cpu"]) if (r["flags"] & 1) else U0)
    account(S, r, tg, r["sub"], -1)
    credit = recorded_flush_credit(S, r, M, tg)
    if credit != U0:
        mark_flushed(S, r["ts"], credit, next_ugen(S))


@numba.njit(cache=True)
def on_batch(S, r, M):
    """§8.2.3 batch_flush, per policy."""
    if M == POL_VANILLA:
        vanilla.arch_tlbbatch_flush(S, r)
        return
    batch_begin(S, r)
    if M == POL_V12:
        v12.try_to_unmap_flush(S, r)
    elif M == POL_V11:
        v11.try_to_unmap_flush(S, r)
    elif M == POL_HBF:
        hbf.try_to_unmap_flush(S, r)
    else:
        oracle.try_to_unmap_flush(S, r)
    batch_end(S)


@numba.njit(cache=True)
def on_hook(S, r, M):
    """§8.2.9–13 hooks: every call is counted; the policy says whether it sent no IPI."""
    h = r["sub"]
    S.acc[O_HOOK_CALLS + h] += 1
    if M == POL_V12:
        noipi = v12.on_hook(S, r)
    elif M == POL_V11:
        noipi = v11.on_hook(S, r)
    elif M == POL_HBF:
        noipi = hbf.on_hook(S, r)
    else:
        noipi = oracle.on_hook(S, r)
    if noipi:
        S.acc[O_HOOK_NOIPI + h] += 1


@numba.njit(cache=True)
def on_page(S, r, M, op):
    """FREE / DRAIN / TAKE / ALLOC, per policy. False: a safety violation."""
    if M == POL_V12:
        if op == O.M_FREE:
            v12.free_page(S, r)
        elif op == O.M_DRAIN:
            v12.free_pcppages_bulk(S, r)
        elif op == O.M_TAKE:
            v12.rmqueue_buddy(S, r)
        else:
            return v12.alloc_pages(S, r)
    elif M == POL_V11:
        if op == O.M_FREE:
            v11.free_page(S, r)
        elif op == O.M_DRAIN:
            v11.free_pcppages_bulk(S, r)
        else:
            return v11.prep_new_page(S, r)
    elif M == POL_HBF:
        if op == O.M_TAKE or op == O.M_ALLOC:
            return hbf.alloc_pages(S, r)
    elif M == POL_ORACLE:
        if op == O.M_FREE:
            oracle.free_page(S, r)
        elif op == O.M_DRAIN:
            oracle.free_pcppages_bulk(S, r)
        else:
            oracle.realloc(S, r)
    elif op == O.M_FREE or op == O.M_ALLOC:
        vanilla.realloc_delay(S, r)
    return True


@numba.njit(cache=True)
def replay(mops, nops, S, M):
    """Replay ``nops`` model ops under policy ``M``; returns the index of the op that broke the safety
    invariant, or -1."""
    for i in range(nops):
        r = mops[i]
        op = r["op"]
        if op == O.M_PTE:
            set_tlb_ubc_flush_pending(S, r, M)
        elif op == O.M_FOLIO_BEGIN:
            if M != POL_VANILLA:
                can_luf_init(S, r)
        elif op == O.M_FOLIO_END:
            if M != POL_VANILLA:
                folio_end_unmap(S, r, M)
        elif op == O.M_KEEP:
            if M == POL_V12:
                v12.reclaim_keep(S, r)
            elif M != POL_VANILLA:
                keep_flushes_batch(S)
        elif op == O.M_BATCH:
            on_batch(S, r, M)
        elif op == O.M_RFLUSH:
            recorded_flush(S, r, M)
        elif op == O.M_FREE or op == O.M_DRAIN or op == O.M_TAKE or op == O.M_ALLOC:
            if not on_page(S, r, M, op):
                return i
        elif op == O.M_HOOK:
            if M != POL_VANILLA:
                on_hook(S, r, M)
        elif op == O.M_LFLUSH:
            if M == POL_ORACLE:  # a full local flush (task switch): this CPU holds no stale entry any more
                mark_flushed(S, r["ts"], bit(r["cpu"]), next_ugen(S))
        elif op == O.M_RECLAIM_BEGIN:
            if M == POL_HBF:
                hbf.reclaim_begin(S, r)
        if M == POL_HBF:
            b = timeline_bin(r["ts"], S.tl)
            if S.SC[HELD] > S.acc[O_HELD_TL + b]:
                S.acc[O_HELD_TL + b] = S.SC[HELD]
    return -1
