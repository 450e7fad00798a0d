"""LUF v10/v11 (luf-model.md §2.6): one global pending batch and a generation counter (policy ``POL_V11``).

At the end of a batch the deferred CPUs join the global mask (``SU[GMASK]``) and the freed pages carry the new
generation (``SC[G]``). Allocating such a page while ``luf_gen_done`` (``SC[GEN_DONE]``) has not passed its
generation flushes the *whole* global batch (``prims.flush_generation``, v11's check_luf_flush). v11's hooks:
file writes (file_end_write → F4 here) and faults that make a PTE writable (write faults, F3), plus the reclaim
paths F11–F13 as in v12. No per-CPU done tracking: normal flushes retire nothing.

``alloc_order=luf`` applies v12's pcp tail placement here too [I: the v11 postings do not say]: a recorded pcp
allocation of a pending page takes the oldest pending page of that CPU (model/pcpfifo.py), so it flushes the global
batch only when *that* page's generation is not done yet. v11 has no pend_list, so buddy keeps pfn identities.
"""

from __future__ import annotations

import numba
import numpy as np

from lufreplay.model import ops as O
from lufreplay.model.base import Model
from lufreplay.model.kernels import U0
from lufreplay.model.pcpfifo import OB_KEY, OB_UGEN, ob_release, orphan
from lufreplay.model.prims import (
    account,
    clear_debt,
    count,
    defer,
    flush_generation,
    free_folios_keyed,
    generation_pending,
    next_ugen,
    ob_own_back,
    ob_safety,
    owe,
    pcp_add_tail,
    pcp_drain_tail,
    pcp_head,
    pcp_take,
    safety,
)
from lufreplay.model.state import (
    GEN_DONE,
    GMASK,
    LUF_MASK,
    NBUF,
    NONLUF_MASK,
    P_BUDDY_CLEAN,
    P_BUDDY_LUF,
    P_NONE,
    P_PCP_CLEAN,
    P_PCP_LUF,
    P_TAKEN,
    P_UNMAPPED,
    POL_V11,
    Y_ALLOC_LUF,
    Y_V11_ATOMIC,
)


@numba.njit(cache=True)
def pending_gen(S, p):
    """Page ``p`` carries a generation luf_gen_done has not passed."""
    st = S.pstate[p]
    pend = st == P_PCP_LUF or st == P_BUDDY_LUF or (st == P_UNMAPPED and S.pkey[p] != 0)
    return pend and S.pstamp[p] > S.SC[GEN_DONE]


@numba.njit(cache=True)
def settle(S, r):
    """Pages about to get a generation again that the model still holds pending: re-used without a recorded
    allocation (alloc_order=luf: a pcp obligation stays in its FIFO, unlabelled; else the missed allocation
    pays the global batch)."""
    luf = S.Y[Y_ALLOC_LUF] != 0
    for b in range(S.SC[NBUF]):
        for p in range(S.buf[b, 0], S.buf[b, 0] + (np.int64(1) << S.buf[b, 1])):
            st = S.pstate[p]
            if st == P_PCP_LUF or st == P_BUDDY_LUF or (st == P_UNMAPPED and S.pkey[p] != 0):
                count(S, O.K_UNSEEN_REUSES)
                if luf and st == P_PCP_LUF:
                    orphan(p, S.OB, S.pobl)
                elif S.pstamp[p] > S.SC[GEN_DONE]:
                    flush_generation(S, r, O.C_ALLOC_BUDDY_EPOCH if st == P_BUDDY_LUF else O.C_ALLOC_PCP)
                clear_debt(S, p)


@numba.njit(cache=True)
def try_to_unmap_flush(S, r):
    """Batch end: the non-LUF part is flushed (no done tracking), the deferred part joins the global batch under
    a new generation, which the batch's eligible folios carry."""
    d = S.SU[LUF_MASK] & ~S.SU[NONLUF_MASK]
    nl = S.SU[NONLUF_MASK]
    if nl != U0:
        account(S, r, nl, O.C_BATCH_NONLUF, -1)
    g = np.int64(0)
    if d != U0:
        g = next_ugen(S)
        S.SU[GMASK] |= d
        defer(S, r, d)
    settle(S, r)
    free_folios_keyed(S, POL_V11, r["task"], 0, d, g)
    if r["task"] >= 0:
        S.task_anon_key[r["task"]] = g if (r["flags"] & O.B_ANON_UNKNOWN_PFN) else 0
    if (r["flags"] & O.B_MEMFAIL) and g != 0:
        flush_generation(S, r, O.C_MEMFAIL)


@numba.njit(cache=True)
def free_page(S, r):
    """A free: pages carrying a generation go to pcp (alloc_order=luf: the list tail) or buddy."""
    luf = S.Y[Y_ALLOC_LUF] != 0
    task = r["task"]
    pfn = r["pfn"]
    order = r["order"]
    for p in range(pfn, pfn + (np.int64(1) << order)):
        if luf and S.pstate[p] == P_PCP_LUF:
            count(S, O.K_UNSEEN_REUSES)  # freed again with no recorded allocation
            orphan(p, S.OB, S.pobl)
            S.pstate[p] = P_NONE
        elif luf and S.pstate[p] == P_BUDDY_LUF:
            # v11 has no pend_list: a buddy page keeps its pfn and its debt, so the missed allocation pays
            count(S, O.K_UNSEEN_REUSES)
            if S.pstamp[p] > S.SC[GEN_DONE]:
                flush_generation(S, r, O.C_ALLOC_BUDDY_EPOCH)
            clear_debt(S, p)
            S.pstate[p] = P_NONE
        st = S.pstate[p]
        g = 0
        if st == P_UNMAPPED and S.pkey[p] != 0:
            g = S.pstamp[p]
        elif r["sub"] == 3 and task >= 0 and S.task_anon_key[task] != 0 and st != P_PCP_LUF and st != P_BUDDY_LUF:
            g = S.task_anon_key[task]
            owe(S, p, S.SU[GMASK], g)
        if g != 0:
            count(S, O.K_LUF_PAGES_FREED)
            S.pstate[p] = P_PCP_LUF if order == 0 else P_BUDDY_LUF
            S.pstamp[p] = g
            if luf and order == 0:  # tail placement: the page's obligation joins this CPU's FIFO
                pcp_add_tail(S, p, g, 0, r["cpu"])
        elif st != P_PCP_LUF and st != P_BUDDY_LUF:
            S.pstate[p] = P_PCP_CLEAN if order == 0 else P_BUDDY_CLEAN


@numba.njit(cache=True)
def free_pcppages_bulk(S, r):
    """A pcp drain: pending pages keep their generation in buddy (alloc_order=luf: the newest of that pcp)."""
    pfn = r["pfn"]
    for p in range(pfn, pfn + (np.int64(1) << r["order"])):
        if S.pstate[p] == P_PCP_LUF and S.Y[Y_ALLOC_LUF] != 0:
            z, own = pcp_drain_tail(S, p)
            if z != own:
                count(S, O.K_FIFO_REORDERS)
            S.pstamp[p] = S.OB[z, OB_KEY]
            owe(S, p, S.OBM[z], S.OB[z, OB_UGEN])
            ob_release(z, S.OB, S.obfree, S.OBS)
            S.pstate[p] = P_BUDDY_LUF
        elif S.pstate[p] == P_PCP_LUF:
            S.pstate[p] = P_BUDDY_LUF
        elif S.pstate[p] == P_PCP_CLEAN:
            S.pstate[p] = P_BUDDY_CLEAN


@numba.njit(cache=True)
def alloc_flush(S, r, cause):
    """The allocation-time flush (prep_new_page): the whole global batch."""
    flush_generation(S, r, cause)
    count(S, O.K_ALLOC_WITH_FLUSH)
    count(S, O.K_PAID_IN_ALLOC_FLUSHES)


@numba.njit(cache=True)
def pcp_fifo_alloc(S, r, can):
    """alloc_order=luf: a recorded pcp allocation of a pending page takes the oldest pending page of its CPU."""
    pfn = r["pfn"]
    tk, own = pcp_head(S, r["cpu"], pfn)
    if S.OB[tk, OB_KEY] > S.SC[GEN_DONE]:
        if not can:
            count(S, O.K_PCP_SKIPS)
            orphan(pfn, S.OB, S.pobl)  # the trace's page left; the obligation stays free
            S.pstate[pfn] = P_NONE
            S.pkey[pfn] = 0
            return True
        alloc_flush(S, r, O.C_ALLOC_PCP)
    else:
        count(S, O.K_ALLOC_CLEAN)
    if tk != own:
        count(S, O.K_FIFO_REORDERS)
    pcp_take(S, tk, own, pfn)
    ok = ob_safety(S, tk, pfn, r["ts"])
    ob_release(tk, S.OB, S.obfree, S.OBS)
    S.pstate[pfn] = P_NONE
    S.pkey[pfn] = 0
    return ok


@numba.njit(cache=True)
def prep_new_page(S, r):
    """TAKE / ALLOC: a page whose generation is not done flushes the whole global batch (v11's prep_new_page),
    if the context may (v11_atomic_flush). False on a safety violation."""
    op = r["op"]
    pfn = r["pfn"]
    npg = np.int64(1) << r["order"]
    can = (r["flags"] & 1) != 0 or S.Y[Y_V11_ATOMIC] != 0
    luf = S.Y[Y_ALLOC_LUF] != 0
    if luf and op == O.M_ALLOC and r["order"] == 0 and S.pstate[pfn] == P_PCP_LUF:
        return pcp_fifo_alloc(S, r, can)
    need = False
    pcp = False
    for p in range(pfn, pfn + npg):
        if luf and S.pstate[p] == P_PCP_LUF:
            S.pstamp[p] = ob_own_back(S, p)
        if pending_gen(S, p):
            need = True
            pcp = pcp or S.pstate[p] != P_BUDDY_LUF
    if need:
        if not can:
            count(S, O.K_PCP_SKIPS if pcp else O.K_BUDDY_REFUSALS)
            return True
        alloc_flush(S, r, O.C_ALLOC_PCP if pcp else O.C_ALLOC_BUDDY_EPOCH)
    elif op == O.M_ALLOC:
        count(S, O.K_ALLOC_CLEAN)
    for p in range(pfn, pfn + npg):
        if op == O.M_TAKE:
            S.pstate[p] = P_PCP_CLEAN if (r["flags"] & O.A_REFILL) else P_TAKEN
        else:
            if not safety(S, p, r["ts"]):
                return False
            S.pstate[p] = P_NONE
            S.pkey[p] = 0
    return True


@numba.njit(cache=True)
def on_hook(S, r):
    """v11's hooks: write faults, file writes (F4) and dirty writeback flush the whole global batch. True: no
    IPI sent."""
    h = r["sub"]
    fires = h == O.H_WRITE_BEGIN or h == O.H_DIRTY_WB or (h == O.H_FAULT and (r["flags"] & 1))
    n = 0
    if fires and generation_pending(S):
        n = flush_generation(S, r, O.HOOK_CAUSE[h])
    return n == 0


class LufV11(Model):
    """LUF v11: single global pending batch."""

    name = "luf-v11"
    policy = POL_V11
    uses = frozenset({"tasks", "buf", "obl"})
