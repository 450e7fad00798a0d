"""Primitives the policies are built from, on the one state record (state.ModelState, ``S``).

Each is one mechanism of luf-model.md, written once: ``flush`` (try_to_unmap_flush: IPI, then mark done),
``luf_flush`` (§4: diet, flush what is left), ``new_key`` (fold_unmap_luf step 2), ``flush_generation``
(v11 check_luf_flush), ``defer`` (a batch's deferred part), ``free_folios_keyed`` (the batch's eligible folios
leave the rmap walk owing a flush), the safety invariant, and the pcp FIFO moves of ``alloc_order=luf``.
``r`` is the model op being replayed: every flush is accounted at its time, CPU, task and op.
"""

from __future__ import annotations

import numba
import numpy as np

from lufreplay.model import ops as O
from lufreplay.model.kernels import (
    O_MISC,
    O_VIOL,
    U0,
    account_flush,
    add_history,
    add_request,
    bit,
    log_decision,
    mark_done,
    notdone,
    popcount,
)
from lufreplay.model.pcpfifo import (
    FH_HEAD,
    FH_TAIL,
    OB_CPU,
    OB_KEY,
    OB_UGEN,
    fifo_push,
    fifo_unlink,
    ob_new,
    ob_release,
    orphan,
    relabel,
)
from lufreplay.model.state import (
    G,
    GEN_DONE,
    GMASK,
    HELD,
    KCTR,
    NBUF,
    P_HELD,
    P_UNMAPPED,
    POL_HBF,
    POL_ORACLE,
    POL_V11,
    POL_V12,
    Y_ALLOC_LUF,
)


@numba.njit(cache=True)
def count(S, k, n=1):
    """Add ``n`` to the MISC counter ``k`` (ops.K_*)."""
    S.acc[O_MISC + k] += n


@numba.njit(cache=True)
def account(S, r, targets, cause, pfn):
    """One flush to ``targets`` sent by the op's CPU, counted under ``cause``; returns its remote IPIs."""
    return account_flush(r["ts"], r["cpu"], r["task"], targets, cause, r["op"], pfn, S.acc, S.tl, S.dec, S.nlog)


@numba.njit(cache=True)
def next_ugen(S):
    S.SC[G] += 1
    return S.SC[G]


@numba.njit(cache=True)
def mark_flushed(S, ts, mask, g):
    """tlb_flush_end: raise done[c] to ``g`` for the CPUs of ``mask`` (and remember it for the stale window)."""
    mark_done(mask, g, S.done)
    add_history(g, ts, mask, S.hist_g, S.hist_ts, S.hist_mask, S.nlog)


@numba.njit(cache=True)
def flush(S, r, target, cause, pfn):
    """try_to_unmap_flush: a fresh ugen, IPIs to ``target`` (minus self), then mark it done."""
    g = next_ugen(S)
    n = account(S, r, target, cause, pfn)
    mark_flushed(S, r["ts"], target, g)
    return n


@numba.njit(cache=True)
def luf_flush(S, r, mask, ugen, cause, pfn):
    """The shared pattern of every luf_flush_* helper (§4): diet by ugen, flush what is left, mark it done."""
    self_ = bit(r["cpu"])
    target = notdone(mask, ugen, S.done)
    if target == U0:
        if mask != U0:
            count(S, O.K_RETIRED_BY_DONE, popcount(mask & ~self_))
            log_decision(r["ts"], 2, cause, r["cpu"], r["task"], mask, 0, r["op"], pfn, S.dec, S.nlog)
        return 0
    n = flush(S, r, target, cause, pfn)
    count(S, O.K_FLUSHED_CPU_SLOTS, n)
    count(S, O.K_RETIRED_BY_DONE, popcount(mask & ~target & ~self_))
    return n


@numba.njit(cache=True)
def new_key(S, mask):
    """fold_unmap_luf step 2: next 16-bit key (0 skipped), merge into a live slot (__fold_luf_batch), fresh ugen."""
    SC = S.SC
    SC[KCTR] = (SC[KCTR] + 1) & 0xFFFF
    if SC[KCTR] == 0:
        SC[KCTR] = 1
    k = SC[KCTR]
    u = next_ugen(S)
    if S.KEY_ugen[k] != 0:
        old = notdone(S.KEY_mask[k], S.KEY_ugen[k], S.done)  # diet the old request first
        if old != U0:
            count(S, O.K_KEY_MERGES)
        S.KEY_mask[k] = old | mask
    else:
        S.KEY_mask[k] = mask
    S.KEY_ugen[k] = u
    return k


@numba.njit(cache=True)
def luf_batch_target(S, mm, mp):
    """luf_flush_mm / luf_flush_mapping (§4): the CPUs of mm ``mm``'s and mapping ``mp``'s luf_batch (-1: not
    asked) that are not done yet, and the newest of the two ugens."""
    t = U0
    u = np.int64(0)
    if mm >= 0:
        t |= notdone(S.MMB_mask[mm], S.MMB_ugen[mm], S.done)
        u = S.MMB_ugen[mm]
    if mp >= 0:
        t |= notdone(S.ASB_mask[mp], S.ASB_ugen[mp], S.done)
        if S.ASB_ugen[mp] > u:
            u = S.ASB_ugen[mp]
    return t, u


@numba.njit(cache=True)
def generation_pending(S):
    return S.SC[GEN_DONE] < S.SC[G]


@numba.njit(cache=True)
def flush_generation(S, r, cause):
    """check_luf_flush (v11 §2.6; hold-before-free's release): flush the whole global mask unless the done
    generation already passed it."""
    SC = S.SC
    if not generation_pending(S):
        return 0
    m = S.SU[GMASK]
    n = account(S, r, m, cause, -1)
    SC[GEN_DONE] = SC[G]
    mark_flushed(S, r["ts"], m, SC[G])
    S.SU[GMASK] = U0
    return n


@numba.njit(cache=True)
def defer(S, r, d):
    """A batch leaves CPUs ``d`` owing a flush: deferred CPU-slots and a ``deferred`` decision."""
    n = popcount(d & ~bit(r["cpu"]))
    count(S, O.K_DEFERRED_CPU_SLOTS, n)
    log_decision(r["ts"], 1, O.C_BATCH, r["cpu"], r["task"], d, n, r["op"], -1, S.dec, S.nlog)


@numba.njit(cache=True)
def owe(S, p, d, u):
    """Shadow debt: page ``p`` may be stale on ``d`` until they are done at ``u``."""
    S.sh_mask[p] |= d
    if u > S.sh_ugen[p]:
        S.sh_ugen[p] = u


@numba.njit(cache=True)
def clear_debt(S, p):
    S.sh_mask[p] = U0
    S.sh_ugen[p] = 0


@numba.njit(cache=True)
def free_folios_keyed(S, M, task, key, d, u):
    """The open batch's eligible folios leave the rmap walk owing ``d`` at ``u`` (``u == 0``: nothing owed):
    v12 frees them with ``key``, v11 with generation ``u``, hold-before-free holds them, the oracle only notes
    the debt. Each owing folio is one stale-window request."""
    SC = S.SC
    luf = S.Y[Y_ALLOC_LUF] != 0
    for b in range(SC[NBUF]):
        pfn = S.buf[b, 0]
        order = S.buf[b, 1]
        for p in range(pfn, pfn + (np.int64(1) << order)):
            if M == POL_V12:
                S.pstate[p] = P_UNMAPPED
                S.pkey[p] = key
                S.punmap_ts[p] = S.buf[b, 2]
                S.punmap_task[p] = task
            elif M == POL_V11:
                S.pstate[p] = P_UNMAPPED
                S.pkey[p] = 1 if u != 0 else 0
                S.pstamp[p] = u
            elif M == POL_HBF:
                S.pstate[p] = P_HELD
                S.pstamp[p] = u
                SC[HELD] += 1
            elif M == POL_ORACLE and luf and S.pobl[p] >= 0:
                orphan(p, S.OB, S.pobl)  # re-used without a recorded allocation: its debt stays free
            if u != 0:
                owe(S, p, d, u)
        if u != 0:
            add_request(
                S.buf[b, 2], u, d, np.int64(1) << order, S.req_ts, S.req_ugen, S.req_mask, S.req_pages, S.nlog
            )
    SC[NBUF] = 0


@numba.njit(cache=True)
def violation(S, p, ts):
    """Record a safety violation (the first one's pfn and time)."""
    acc = S.acc
    if acc[O_VIOL] == 0:
        acc[O_VIOL + 1] = p
        acc[O_VIOL + 2] = ts
    acc[O_VIOL] += 1


@numba.njit(cache=True)
def safety(S, p, ts):
    """The invariant: no pfn reaches a new owner while a CPU still owes a flush for it."""
    count(S, O.K_SAFETY_CHECKS)
    if S.sh_mask[p] != U0 and notdone(S.sh_mask[p], S.sh_ugen[p], S.done) != U0:
        violation(S, p, ts)
        return False
    clear_debt(S, p)
    return True


@numba.njit(cache=True)
def ob_safety(S, i, pfn, ts):
    """The invariant for an obligation handed out under alloc_order=luf."""
    count(S, O.K_SAFETY_CHECKS)
    if S.OBM[i] != U0 and notdone(S.OBM[i], S.OB[i, OB_UGEN], S.done) != U0:
        violation(S, pfn, ts)
        return False
    return True


# ---- pcp FIFOs of alloc_order=luf (pcpfifo.py) ------------------------------------------------------------
@numba.njit(cache=True)
def pcp_add_tail(S, p, key, task, cpu):
    """Patch 11: a keyed page goes to the pcp tail; its debt moves from the pfn to the obligation."""
    ob = ob_new(key, S.sh_mask[p], S.sh_ugen[p], task, p, S.OB, S.OBM, S.obfree, S.OBS)
    fifo_push(ob, cpu, S.OB, S.FH)
    S.pobl[p] = ob
    clear_debt(S, p)


@numba.njit(cache=True)
def pcp_head(S, cpu, pfn):
    """A recorded pcp allocation of pending ``pfn`` on ``cpu``: (the obligation v12 hands out — the oldest of
    that CPU's FIFO, or the pfn's own if the FIFO is empty —, the pfn's own obligation)."""
    own = np.int64(S.pobl[pfn])
    return (S.FH[cpu, FH_HEAD] if S.FH[cpu, FH_HEAD] >= 0 else own), own


@numba.njit(cache=True)
def pcp_drain_tail(S, p):
    """free_pcppages_bulk takes from the list tail: the newest obligation of pending ``p``'s list leaves the
    FIFO and ``p`` keeps the label of the one it held. Returns (that obligation, p's own)."""
    own = np.int64(S.pobl[p])
    z = S.FH[S.OB[own, OB_CPU], FH_TAIL]
    relabel(z, own, p, S.OB, S.pobl)
    fifo_unlink(z, S.OB, S.FH)
    return z, own


@numba.njit(cache=True)
def pcp_take(S, taken, own, pfn):
    """Obligation ``taken`` leaves its FIFO where the trace handed out ``pfn`` (labelled ``own``)."""
    relabel(taken, own, pfn, S.OB, S.pobl)
    fifo_unlink(taken, S.OB, S.FH)


@numba.njit(cache=True)
def ob_own_back(S, p):
    """A pending pcp page met outside the FIFO path (a block of order > 0, a buddy take): it carries its own
    obligation again, as with alloc_order=recorded. Returns the obligation's key."""
    ob = np.int64(S.pobl[p])
    key = S.OB[ob, OB_KEY]
    owe(S, p, S.OBM[ob], S.OB[ob, OB_UGEN])
    fifo_unlink(ob, S.OB, S.FH)
    ob_release(ob, S.OB, S.obfree, S.OBS)
    S.pobl[p] = -1
    return key
