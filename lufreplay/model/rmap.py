"""The mechanism every model core shares, named like the kernel code it stands for.

The rmap walk (``try_to_unmap_one``): :func:`rmap_walk` (can_luf_init at FOLIO_BEGIN, set_tlb_ubc_flush_pending
and fold_luf_batch per PTE, folio_end_unmap at FOLIO_END). The batch end: :func:`batch_split`, :func:`defer`,
:func:`batch_done`, :func:`reclaim_keep_unbatched`. Hooks: :func:`count_hook`. Flushes: :func:`flush` (send, then
raise done[] to a fresh ugen), :func:`luf_flush` (diet first), :func:`flush_pending` (a whole pending generation),
:func:`recorded_flush` (a flush LUF leaves alone) and :func:`retire` (CPUs known to have flushed). Debts:
:func:`owe`, :func:`violation`, :func:`safety`, :func:`ob_safety`. The pcp FIFO moves: :func:`fifo_head`,
:func:`fifo_take`, :func:`fifo_alloc`, :func:`fifo_drain`, :func:`fifo_push_page`, :func:`ob_back`.

Every function takes only the arrays it needs as separate arguments: numba passes an array as a few scalars, while
a record of all of them would be flattened into hundreds of arguments at each call (see bench/state_record). And
every function is compiled without NRT (``_nrt=False``: none allocates), so a call costs no reference counting of
its array arguments: with it (plain calls, or numba-level ``inline="always"``, which copies the arguments into new
variables) the atomic increments made the cores 1.3-4x slower, since several of these run for every op. The cores
are compiled without NRT as well (nothing in them allocates), which is what lets :func:`next_op`, the loop head
they share, be inlined at no cost.
"""

from __future__ import annotations

import numba
import numpy as np

from lufreplay.model import kernels as K
from lufreplay.model import ops as O
from lufreplay.model import pcpfifo as F
from lufreplay.model import state as S

U0 = K.U0

# what a core's rmap walk does beyond the common part (next_op's ``walk``: a module constant of each core)
W_FOLD = 1  # keep mm / mapping batches (fold_luf_batch)
W_KEPT_JOINS = 2  # a kept folio's ro PTEs join the LUF part; the core's KEEP op settles them
W_NEED_PFN = 4  # a folio with no known pfn is not deferred
W_KEEP_UNBATCHED = 8  # a KEEP op is settled in the walk: reclaim_keep_unbatched


# ---- the rmap walk ---------------------------------------------------------------------------------------------
@numba.njit(cache=True, _nrt=False)
def rmap_walk(mops, i, nops, large, fold, kept_joins, need_pfn, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen):
    """try_to_unmap's walk, the same for every LUF model: the run of FOLIO_BEGIN / PTE / FOLIO_END ops starting at
    ``i``; returns the index of the first op after it (one call per run of ops).

    ``fold``: the model keeps mm / mapping batches (zero-size arrays otherwise); ``kept_joins``: a kept folio's ro
    PTEs join the LUF part too (its KEEP settles them); ``need_pfn``: a folio with no known pfn is not deferred."""
    while i < nops:
        r = mops[i]
        op = r["op"]
        if op > O.M_FOLIO_END:
            break
        i += 1
        if op == O.M_FOLIO_BEGIN:  # can_luf_init: static exclusions (§3.2), large folios with large_folios=eligible
            SC[S.CAN_LUF] = 1 if K.folio_begin_ok(r["sub"], large) else 0
            SU[S.FOLIO_RO] = U0
            SC[S.CUR_PFN] = r["pfn"]
            SC[S.CUR_ORDER] = r["order"]
            SC[S.CUR_TS] = r["ts"]
        elif op == O.M_PTE:  # set_tlb_ubc_flush_pending
            flags = r["flags"]
            if flags & O.PTE_UNBATCHED:
                continue  # flushed at once (ptep_clear_flush): a recorded flush carries its IPIs
            m = K.opm(r["mask"])
            if flags & O.PTE_WRITABLE:
                SC[S.CAN_LUF] = 0  # a writable PTE makes the whole folio non-LUF
            if SC[S.CAN_LUF] == 0:
                SU[S.NONLUF_MASK] |= m
                continue
            SU[S.FOLIO_RO] |= m
            if fold:  # fold_luf_batch_mm / _mapping: the batches the hooks flush, a fresh ugen each
                mm = r["mm"]
                if mm >= 0:
                    MMB_mask[mm] |= m
                    SC[S.G] += 1
                    MMB_ugen[mm] = SC[S.G]
                mp = r["mapping"]
                if mp >= 0:
                    ASB_mask[mp] |= m
                    SC[S.G] += 1
                    ASB_ugen[mp] = SC[S.G]
        else:  # folio_end_unmap: an eligible folio's ro PTEs join the LUF part and the folio is buffered
            reason = K.folio_end_reason(r["sub"], r["aux"], large)
            ok = SC[S.CAN_LUF] != 0 and (reason == 0 or (kept_joins and reason == O.J_KEPT_NOT_FREED))
            if not ok or (need_pfn and SC[S.CUR_PFN] < 0):
                SU[S.NONLUF_MASK] |= SU[S.FOLIO_RO]
                continue
            SU[S.LUF_MASK] |= SU[S.FOLIO_RO]
            if reason == 0 and SC[S.CUR_PFN] >= 0:
                b = SC[S.NBUF]
                buf[b, 0] = SC[S.CUR_PFN]
                buf[b, 1] = SC[S.CUR_ORDER]
                buf[b, 2] = SC[S.CUR_TS]
                SC[S.NBUF] = b + 1
    return i


@numba.njit(cache=True, _nrt=False, inline="always")
def next_op(mops, i, nops, Y, walk, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen):
    """The shared head of every LUF core's loop, called for op 0 and at the end of each op: from op ``i`` walk
    the rmap ops (:func:`walk_ops`, called only for a run of them), then set the lazy CPUs of the op that follows
    (:func:`lazy_now`). Returns the index of that op, the next the core handles (``nops``: the end). Inlined into
    the core (``inline="always"``; the cores are compiled without NRT too): a call per op with its dozen array
    arguments made the luf-v12 core 19 % slower. A core's loop therefore has no ``continue``."""
    if i < nops and walks(mops[i]["op"], walk):
        i = walk_ops(mops, i, nops, Y, walk, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen)
    if i < nops:
        r = mops[i]
        SU[S.LAZY_MASK] = lazy_now(r, r["cpu"], Y[S.Y_LAZY_AT_FLUSH] != 0)
    return i


@numba.njit(cache=True, _nrt=False)
def walks(op, walk):
    """Whether op code ``op`` belongs to the rmap walk (:func:`walk_ops`) of a core with walk flags ``walk``."""
    return op <= O.M_FOLIO_END or ((walk & W_KEEP_UNBATCHED) != 0 and op == O.M_KEEP)


@numba.njit(cache=True, _nrt=False)
def walk_ops(mops, i, nops, Y, walk, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen):
    """The run of rmap ops from ``i`` (:func:`rmap_walk`; with ``W_KEEP_UNBATCHED`` a KEEP too,
    :func:`reclaim_keep_unbatched`); returns the index of the first op after it."""
    large = Y[S.Y_LARGE_ELIG] != 0
    fold, kept, need_pfn = (walk & W_FOLD) != 0, (walk & W_KEPT_JOINS) != 0, (walk & W_NEED_PFN) != 0
    while True:
        i = rmap_walk(mops, i, nops, large, fold, kept, need_pfn, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen)
        if i == nops or not (walk & W_KEEP_UNBATCHED) or mops[i]["op"] != O.M_KEEP:
            return i
        reclaim_keep_unbatched(SC, SU)
        i += 1


@numba.njit(cache=True, _nrt=False)
def reclaim_keep_unbatched(SC, SU):
    """KEEP without a key of its own: the LUF work so far is flushed with the batch (non-LUF), nothing is freed."""
    SU[S.NONLUF_MASK] |= SU[S.LUF_MASK]
    SU[S.LUF_MASK] = U0
    SC[S.NBUF] = 0


@numba.njit(cache=True, _nrt=False)
def batch_split(R, unexplained_flush, SU):
    """try_to_unmap_flush: the batch's deferrable part (LUF, not also needed by a non-LUF folio) and the part flushed
    now. Option unexplained_targets=flush: recorded targets ``R`` no modelled PTE explains are flushed now too."""
    if unexplained_flush:
        SU[S.NONLUF_MASK] |= R & ~(SU[S.LUF_MASK] | SU[S.NONLUF_MASK] | SU[S.COVERED])
    return SU[S.LUF_MASK] & ~SU[S.NONLUF_MASK], SU[S.NONLUF_MASK]


@numba.njit(cache=True, _nrt=False)
def defer(ts, cpu, task, d, op, acc, dec, nlog):
    """The batch's LUF part ``d`` is not flushed now: count the remote CPU slots and log the deferral."""
    n = K.popcount(d & ~K.bit(cpu))
    acc[K.O_MISC + O.K_DEFERRED_CPU_SLOTS] += n
    K.log_decision(ts, 1, O.C_BATCH, cpu, task, d, n, op, -1, dec, nlog)


@numba.njit(cache=True, _nrt=False)
def batch_done(SU):
    SU[S.LUF_MASK] = U0
    SU[S.NONLUF_MASK] = U0
    SU[S.COVERED] = U0


@numba.njit(cache=True, _nrt=False)
def count_hook(h, sent, acc):
    """One call of hook ``h``; ``sent``: it sent a flush (else it counts as a call with no IPI)."""
    acc[K.O_HOOK_CALLS + h] += 1
    if not sent:
        acc[K.O_HOOK_NOIPI + h] += 1


# ---- flushes ---------------------------------------------------------------------------------------------------
@numba.njit(cache=True, _nrt=False)
def mark(g, ts, mask, done, hist_g, hist_ts, hist_mask, nlog):
    """CPUs ``mask`` flushed up to ``g`` at ``ts``: raise done[] and remember it (stale-window resolution)."""
    K.mark_done(mask, g, done)
    K.add_history(g, ts, mask, hist_g, hist_ts, hist_mask, nlog)


@numba.njit(cache=True, _nrt=False)
def retire(ts, mask, SC, done, hist_g, hist_ts, hist_mask, nlog):
    """CPUs ``mask`` flushed (a flush sent, or one the kernel did anyway): done[] reaches a fresh ugen."""
    SC[S.G] += 1
    mark(SC[S.G], ts, mask, done, hist_g, hist_ts, hist_mask, nlog)


@numba.njit(cache=True, _nrt=False)
def lazy_now(r, cpu, at_flush):
    """§9.7 (``clip_to_recorded=false``): the remote CPUs a flush sent by op ``r`` skips, set in ``SU[LAZY_MASK]`` for
    each op. A batch's own flush skips what its recorded flush did not reach (lazy or PV-preempted right then: the
    trace's own answer); any later flush (F1/F2 takeoff, F3-F13, F11) the CPUs lazy at its op (``mask2``, stamped
    by the reconstructor, replay/cpustate.settle). With clipping the masks already left them out: none."""
    if not at_flush:
        return U0
    op = r["op"]
    if op == O.M_BATCH:
        return ~(K.opm(r["mask"]) | K.bit(cpu))
    if K.carries_lazy(op):
        return K.opm(r["mask2"]) & ~K.bit(cpu)
    return U0


@numba.njit(cache=True, _nrt=False)
def sent(target, SU):
    """The CPUs of ``target`` a flush really interrupts: arch_tlbbatch_flush skips lazy CPUs (should_flush_tlb);
    they are still marked done (luf-model §9.7: a lazy CPU reloads its TLB when it switches back)."""
    return target & ~SU[S.LAZY_MASK]


@numba.njit(cache=True, _nrt=False)
def flush(ts, cpu, task, target, cause, op, pfn, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask):
    """Send a flush to ``target`` (minus the lazy CPUs) and retire all of it. Returns the remote IPIs."""
    n = K.account_flush(ts, cpu, task, sent(target, SU), cause, op, pfn, acc, tl, dec, nlog)
    retire(ts, target, SC, done, hist_g, hist_ts, hist_mask, nlog)
    return n


@numba.njit(cache=True, _nrt=False)
def luf_flush(ts, cpu, task, mask, ugen, cause, op, pfn, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask):
    """The shared pattern of every luf_flush_* helper (§4): diet by ugen, flush what is left, mark it done."""
    target = K.notdone(mask, ugen, done)
    if target == U0:
        if mask != U0:
            acc[K.O_MISC + O.K_RETIRED_BY_DONE] += K.popcount(mask & ~K.bit(cpu))
            K.log_decision(ts, 2, cause, cpu, task, mask, 0, op, pfn, dec, nlog)
        return 0
    n = flush(ts, cpu, task, target, cause, op, pfn, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask)
    acc[K.O_MISC + O.K_FLUSHED_CPU_SLOTS] += n
    acc[K.O_MISC + O.K_RETIRED_BY_DONE] += K.popcount(mask & ~target & ~K.bit(cpu))
    return n


@numba.njit(cache=True, _nrt=False)
def open_generation(d, SC, SU):
    """luf-v11 / hold-before-free: the batch's LUF part joins the one pending mask under a new generation."""
    SC[S.G] += 1
    SU[S.PMASK] |= d
    return SC[S.G]


@numba.njit(cache=True, _nrt=False)
def flush_pending(ts, cpu, task, cause, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask):
    """check_luf_flush (luf-v11) / a hold release: flush the whole pending mask unless its generation is done."""
    if SC[S.GEN_DONE] >= SC[S.G]:
        return 0
    m = SU[S.PMASK]
    n = K.account_flush(ts, cpu, task, sent(m, SU), cause, op, -1, acc, tl, dec, nlog)
    SC[S.GEN_DONE] = SC[S.G]
    mark(SC[S.G], ts, m, done, hist_g, hist_ts, hist_mask, nlog)
    SU[S.PMASK] = U0
    return n


@numba.njit(cache=True, _nrt=False)
def recorded_flush(ts, cpu, task, cause, R, flags, op, acc, tl, dec, nlog):
    """A recorded flush LUF leaves alone (immediate, zap, batched_pending, ...): sent as recorded, with the
    sender's own flush when it did one (flags bit 0). Returns its targets."""
    tg = R | (K.bit(cpu) if (flags & 1) else U0)
    K.account_flush(ts, cpu, task, tg, cause, op, -1, acc, tl, dec, nlog)
    return tg


# ---- debts -----------------------------------------------------------------------------------------------------
@numba.njit(cache=True, _nrt=False)
def owe(p, d, u, sh_mask, sh_ugen):
    """Page ``p`` may be stale on ``d`` until done[] reaches ``u`` (its shadow debt, checked at re-allocation)."""
    sh_mask[p] |= d
    if u > sh_ugen[p]:
        sh_ugen[p] = u


@numba.njit(cache=True, _nrt=False)
def violation(pfn, ts, acc):
    """Record a safety violation (the first one's pfn and time are reported)."""
    if acc[K.O_VIOL] == 0:
        acc[K.O_VIOL + 1] = pfn
        acc[K.O_VIOL + 2] = ts
    acc[K.O_VIOL] += 1


@numba.njit(cache=True, _nrt=False)
def safety(p, ts, done, sh_mask, sh_ugen, acc):
    """The invariant: no pfn reaches a new owner while a CPU still owes a flush for it."""
    acc[K.O_MISC + O.K_SAFETY_CHECKS] += 1
    if sh_mask[p] != U0 and K.notdone(sh_mask[p], sh_ugen[p], done) != U0:
        violation(p, ts, acc)
        return False
    sh_mask[p] = U0
    sh_ugen[p] = 0
    return True


@numba.njit(cache=True, _nrt=False)
def ob_safety(i, pfn, ts, done, OB, OBM, acc):
    """The invariant for an obligation handed out under alloc_order=luf."""
    acc[K.O_MISC + O.K_SAFETY_CHECKS] += 1
    if OBM[i] != U0 and K.notdone(OBM[i], OB[i, F.OB_UGEN], done) != U0:
        violation(pfn, ts, acc)
        return False
    return True


# ---- the pcp FIFO of pending pages (alloc_order=luf, model/pcpfifo.py) ----------------------------------------
@numba.njit(cache=True, _nrt=False)
def fifo_head(cpu, own, FH):
    """The obligation an order-0 allocation on ``cpu`` consumes: the oldest of its FIFO, else the page's own."""
    return FH[cpu, F.FH_HEAD] if FH[cpu, F.FH_HEAD] >= 0 else own


@numba.njit(cache=True, _nrt=False)
def fifo_take(tk, own, pfn, count, OB, FH, pobl, acc):
    """Obligation ``tk`` leaves its FIFO where the trace moved ``pfn`` (label of ``own``); ``count``: count the
    reorder when they differ."""
    if count and tk != own:
        acc[K.O_MISC + O.K_FIFO_REORDERS] += 1
    F.relabel(tk, own, pfn, OB, pobl)
    F.fifo_unlink(tk, OB, FH)


@numba.njit(cache=True, _nrt=False)
def fifo_alloc(tk, own, pfn, count, ts, done, OB, OBM, obfree, OBS, FH, pobl, acc):
    """An allocation hands out obligation ``tk`` (see :func:`fifo_take`): its debt must be paid by now (the
    safety invariant; returns False on a violation) and the obligation is gone."""
    fifo_take(tk, own, pfn, count, OB, FH, pobl, acc)
    ok = ob_safety(tk, pfn, ts, done, OB, OBM, acc)
    F.ob_release(tk, OB, obfree, OBS)
    return ok


@numba.njit(cache=True, _nrt=False)
def fifo_drain(p, count, OB, FH, pobl, acc):
    """free_pcppages_bulk takes from the tail: a recorded drain of pending ``p`` moves the newest obligation of its
    list (returned, still allocated) to buddy."""
    own = np.int64(pobl[p])
    z = FH[OB[own, F.OB_CPU], F.FH_TAIL]
    fifo_take(z, own, p, count, OB, FH, pobl, acc)
    return z


@numba.njit(cache=True, _nrt=False)
def fifo_push_page(p, key, task, cpu, OB, OBM, obfree, OBS, FH, pobl, sh_mask, sh_ugen):
    """Patch 11: a keyed page goes to the pcp tail; its debt moves from the pfn to a new obligation."""
    ob = F.ob_new(key, sh_mask[p], sh_ugen[p], task, p, OB, OBM, obfree, OBS)
    F.fifo_push(ob, cpu, OB, FH)
    pobl[p] = ob
    sh_mask[p] = U0
    sh_ugen[p] = 0


@numba.njit(cache=True, _nrt=False)
def ob_back(p, OB, OBM, obfree, FH, OBS, pobl, sh_mask, sh_ugen):
    """A pending pcp page met outside the FIFO path (a block of order > 0, a buddy take): it carries its own
    obligation's debt again, as with alloc_order=recorded. Returns the obligation's key (or generation)."""
    ob = np.int64(pobl[p])
    key = OB[ob, F.OB_KEY]
    owe(p, OBM[ob], OB[ob, F.OB_UGEN], sh_mask, sh_ugen)
    F.fifo_unlink(ob, OB, FH)
    F.ob_release(ob, OB, obfree, OBS)
    pobl[p] = -1
    return key
