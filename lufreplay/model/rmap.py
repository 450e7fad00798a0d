"""The mechanism every model core shares, named like the kernel code it stands for.

The rmap walk (``try_to_unmap_one``): :func:`rmap_walk` dispatches :func:`can_luf_init` at FOLIO_BEGIN,
:func:`set_tlb_ubc_flush_pending` per PTE (with :func:`fold_luf_batches` into the mm / mapping batches) and
:func:`folio_end_unmap` at FOLIO_END. The batch end: :func:`batch_split`, :func:`defer`, :func:`batch_done`. Hooks:
:func:`count_hook`. Flushes: :func:`flush` (send, then raise
done[] to a fresh ugen), :func:`luf_flush` (diet first), :func:`flush_pending` (a whole pending generation),
:func:`recorded_flush` (a flush LUF leaves alone) and :func:`retire` (CPUs known to have flushed). Debts:
:func:`owe`, :func:`safety`, :func:`ob_safety`. The pcp FIFO moves: :func:`fifo_head`, :func:`fifo_take`,
:func:`fifo_drain`, :func:`fifo_push_page`, :func:`ob_back`.

Every function takes only the arrays it needs as separate arguments: numba passes an array as a few scalars, while
a record of all of them would be flattened into hundreds of arguments at each call (see bench/state_record).
"""

from __future__ import annotations

import numba
import numpy as np

from lufreplay.model import kernels as K
from lufreplay.model import ops as O
from lufreplay.model import pcpfifo as F
from lufreplay.model import state as S

U0 = K.U0


# ---- the rmap walk ---------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def can_luf_init(sub, pfn, order, ts, large, SC, SU):
    """FOLIO_BEGIN: a folio's walk starts; it may be LUF'd unless statically excluded (§3.2)."""
    SC[S.CAN_LUF] = 1 if K.folio_begin_ok(sub, large) else 0
    SU[S.FOLIO_RO] = U0
    SC[S.CUR_PFN] = pfn
    SC[S.CUR_ORDER] = order
    SC[S.CUR_TS] = ts


@numba.njit(cache=True)
def fold_luf_batch(i, m, mask, ugen, SC):
    """fold_luf_batch_mm / _mapping: the batch of mm (or mapping) ``i`` absorbs ``m`` with a fresh ugen."""
    mask[i] |= m
    SC[S.G] += 1
    ugen[i] = SC[S.G]


@numba.njit(cache=True)
def set_tlb_ubc_flush_pending(flags, m, SC, SU):
    """PTE: a read-only PTE of an eligible folio joins the folio's LUF part (returns True); a writable one makes
    the whole folio non-LUF. An unbatched PTE is flushed at once (ptep_clear_flush): a recorded flush carries its
    IPIs, so it adds nothing here."""
    if flags & O.PTE_UNBATCHED:
        return False
    if flags & O.PTE_WRITABLE:
        SC[S.CAN_LUF] = 0
    if SC[S.CAN_LUF] != 0:
        SU[S.FOLIO_RO] |= m
        return True
    SU[S.NONLUF_MASK] |= m
    return False


@numba.njit(cache=True)
def fold_luf_batches(mm, mp, m, SC, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen):
    """A LUF'd PTE also joins the batch of its mm and of its file mapping, which the hooks F3-F10 flush."""
    if mm >= 0:
        fold_luf_batch(mm, m, MMB_mask, MMB_ugen, SC)
    if mp >= 0:
        fold_luf_batch(mp, m, ASB_mask, ASB_ugen, SC)


@numba.njit(cache=True)
def folio_end_unmap(sub, aux, large, kept_joins, need_pfn, SC, SU, buf):
    """FOLIO_END: an eligible folio's ro PTEs join the batch's LUF part and the folio is buffered (freed with the
    batch's key); otherwise they join the non-LUF part. ``kept_joins``: a kept folio's ro PTEs join the LUF part
    too (its KEEP settles them); ``need_pfn``: a folio with no known pfn cannot be deferred."""
    reason = K.folio_end_reason(sub, aux, large)
    ok = SC[S.CAN_LUF] != 0 and (reason == 0 or (kept_joins and reason == O.J_KEPT_NOT_FREED))
    if need_pfn and SC[S.CUR_PFN] < 0:
        ok = False
    if not ok:
        SU[S.NONLUF_MASK] |= SU[S.FOLIO_RO]
        return
    SU[S.LUF_MASK] |= SU[S.FOLIO_RO]
    if reason == 0 and SC[S.CUR_PFN] >= 0:
        b = SC[S.NBUF]
        buf[b, 0] = SC[S.CUR_PFN]
        buf[b, 1] = SC[S.CUR_ORDER]
        buf[b, 2] = SC[S.CUR_TS]
        SC[S.NBUF] = b + 1


@numba.njit(cache=True)
def rmap_walk(r, large, fold, kept_joins, need_pfn, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen):
    """One step of try_to_unmap's walk (op FOLIO_BEGIN, PTE or FOLIO_END), the same for every LUF model; ``fold``:
    the model keeps mm / mapping batches (zero-size arrays otherwise)."""
    op = r["op"]
    if op == O.M_FOLIO_BEGIN:
        can_luf_init(r["sub"], r["pfn"], r["order"], r["ts"], large, SC, SU)
    elif op == O.M_PTE:
        if set_tlb_ubc_flush_pending(r["flags"], r["mask"], SC, SU) and fold:
            fold_luf_batches(r["mm"], r["mapping"], r["mask"], SC, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen)
    else:
        folio_end_unmap(r["sub"], r["aux"], large, kept_joins, need_pfn, SC, SU, buf)


@numba.njit(cache=True)
def reclaim_keep_unbatched(SC, SU):
    """KEEP without a key of its own: the LUF work so far is flushed with the batch (non-LUF), nothing is freed."""
    SU[S.NONLUF_MASK] |= SU[S.LUF_MASK]
    SU[S.LUF_MASK] = U0
    SC[S.NBUF] = 0


@numba.njit(cache=True)
def batch_split(R, unexplained_flush, SU):
    """try_to_unmap_flush: the batch's deferrable part (LUF, not also needed by a non-LUF folio) and the part flushed
    now. Option unexplained_targets=flush: recorded targets ``R`` no modelled PTE explains are flushed now too."""
    if unexplained_flush:
        SU[S.NONLUF_MASK] |= R & ~(SU[S.LUF_MASK] | SU[S.NONLUF_MASK] | SU[S.COVERED])
    return SU[S.LUF_MASK] & ~SU[S.NONLUF_MASK], SU[S.NONLUF_MASK]


@numba.njit(cache=True)
def defer(ts, cpu, task, d, op, acc, dec, nlog):
    """The batch's LUF part ``d`` is not flushed now: count the remote CPU slots and log the deferral."""
    n = K.popcount(d & ~K.bit(cpu))
    acc[K.O_MISC + O.K_DEFERRED_CPU_SLOTS] += n
    K.log_decision(ts, 1, O.C_BATCH, cpu, task, d, n, op, -1, dec, nlog)


@numba.njit(cache=True)
def batch_done(SU):
    SU[S.LUF_MASK] = U0
    SU[S.NONLUF_MASK] = U0
    SU[S.COVERED] = U0


@numba.njit(cache=True)
def count_hook(h, sent, acc):
    """One call of hook ``h``; ``sent``: it sent a flush (else it counts as a call with no IPI)."""
    acc[K.O_HOOK_CALLS + h] += 1
    if not sent:
        acc[K.O_HOOK_NOIPI + h] += 1


# ---- flushes ---------------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def mark(g, ts, mask, done, hist_g, hist_ts, hist_mask, nlog):
    """CPUs ``mask`` flushed up to ``g`` at ``ts``: raise done[] and remember it (stale-window resolution)."""
    K.mark_done(mask, g, done)
    K.add_history(g, ts, mask, hist_g, hist_ts, hist_mask, nlog)


@numba.njit(cache=True)
def retire(ts, mask, SC, done, hist_g, hist_ts, hist_mask, nlog):
    """CPUs ``mask`` flushed (a flush sent, or one the kernel did anyway): done[] reaches a fresh ugen."""
    SC[S.G] += 1
    mark(SC[S.G], ts, mask, done, hist_g, hist_ts, hist_mask, nlog)


@numba.njit(cache=True)
def flush(ts, cpu, task, target, cause, op, pfn, SC, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask):
    """Send a flush to ``target`` and retire it. Returns the remote IPIs."""
    n = K.account_flush(ts, cpu, task, target, cause, op, pfn, acc, tl, dec, nlog)
    retire(ts, target, SC, done, hist_g, hist_ts, hist_mask, nlog)
    return n


@numba.njit(cache=True)
def luf_flush(ts, cpu, task, mask, ugen, cause, op, pfn, SC, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask):
    """The shared pattern of every luf_flush_* helper (§4): diet by ugen, flush what is left, mark it done."""
    target = K.notdone(mask, ugen, done)
    if target == U0:
        if mask != U0:
            acc[K.O_MISC + O.K_RETIRED_BY_DONE] += K.popcount(mask & ~K.bit(cpu))
            K.log_decision(ts, 2, cause, cpu, task, mask, 0, op, pfn, dec, nlog)
        return 0
    n = flush(ts, cpu, task, target, cause, op, pfn, SC, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask)
    acc[K.O_MISC + O.K_FLUSHED_CPU_SLOTS] += n
    acc[K.O_MISC + O.K_RETIRED_BY_DONE] += K.popcount(mask & ~target & ~K.bit(cpu))
    return n


@numba.njit(cache=True)
def open_generation(d, SC, SU):
    """luf-v11 / hold-before-free: the batch's LUF part joins the one pending mask under a new generation."""
    SC[S.G] += 1
    SU[S.PMASK] |= d
    return SC[S.G]


@numba.njit(cache=True)
def flush_pending(ts, cpu, task, cause, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask):
    """check_luf_flush (luf-v11) / a hold release: flush the whole pending mask unless its generation is done."""
    if SC[S.GEN_DONE] >= SC[S.G]:
        return 0
    m = SU[S.PMASK]
    n = K.account_flush(ts, cpu, task, m, cause, op, -1, acc, tl, dec, nlog)
    SC[S.GEN_DONE] = SC[S.G]
    mark(SC[S.G], ts, m, done, hist_g, hist_ts, hist_mask, nlog)
    SU[S.PMASK] = U0
    return n


@numba.njit(cache=True)
def recorded_flush(ts, cpu, task, cause, R, flags, op, acc, tl, dec, nlog):
    """A recorded flush LUF leaves alone (immediate, zap, batched_pending, ...): sent as recorded, with the
    sender's own flush when it did one (flags bit 0). Returns its targets."""
    tg = R | (K.bit(cpu) if (flags & 1) else U0)
    K.account_flush(ts, cpu, task, tg, cause, op, -1, acc, tl, dec, nlog)
    return tg


# ---- debts -----------------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def owe(p, d, u, sh_mask, sh_ugen):
    """Page ``p`` may be stale on ``d`` until done[] reaches ``u`` (its shadow debt, checked at re-allocation)."""
    sh_mask[p] |= d
    if u > sh_ugen[p]:
        sh_ugen[p] = u


@numba.njit(cache=True)
def violation(pfn, ts, acc):
    """Record a safety violation (the first one's pfn and time are reported)."""
    if acc[K.O_VIOL] == 0:
        acc[K.O_VIOL + 1] = pfn
        acc[K.O_VIOL + 2] = ts
    acc[K.O_VIOL] += 1


@numba.njit(cache=True)
def safety(p, ts, done, sh_mask, sh_ugen, acc):
    """The invariant: no pfn reaches a new owner while a CPU still owes a flush for it."""
    acc[K.O_MISC + O.K_SAFETY_CHECKS] += 1
    if sh_mask[p] != U0 and K.notdone(sh_mask[p], sh_ugen[p], done) != U0:
        violation(p, ts, acc)
        return False
    sh_mask[p] = U0
    sh_ugen[p] = 0
    return True


@numba.njit(cache=True)
def ob_safety(i, pfn, ts, done, OB, OBM, acc):
    """The invariant for an obligation handed out under alloc_order=luf."""
    acc[K.O_MISC + O.K_SAFETY_CHECKS] += 1
    if OBM[i] != U0 and K.notdone(OBM[i], OB[i, F.OB_UGEN], done) != U0:
        violation(pfn, ts, acc)
        return False
    return True


# ---- the pcp FIFO of pending pages (alloc_order=luf, model/pcpfifo.py) ----------------------------------------
@numba.njit(cache=True)
def fifo_head(cpu, own, FH):
    """The obligation an order-0 allocation on ``cpu`` consumes: the oldest of its FIFO, else the page's own."""
    return FH[cpu, F.FH_HEAD] if FH[cpu, F.FH_HEAD] >= 0 else own


@numba.njit(cache=True)
def fifo_take(tk, own, pfn, count, OB, FH, pobl, acc):
    """Obligation ``tk`` leaves its FIFO where the trace moved ``pfn`` (label of ``own``); ``count``: count the
    reorder when they differ."""
    if count and tk != own:
        acc[K.O_MISC + O.K_FIFO_REORDERS] += 1
    F.relabel(tk, own, pfn, OB, pobl)
    F.fifo_unlink(tk, OB, FH)


@numba.njit(cache=True)
def fifo_alloc(tk, own, pfn, count, ts, done, OB, OBM, obfree, OBS, FH, pobl, acc):
    """An allocation hands out obligation ``tk`` (see :func:`fifo_take`): its debt must be paid by now (the
    safety invariant; returns False on a violation) and the obligation is gone."""
    fifo_take(tk, own, pfn, count, OB, FH, pobl, acc)
    ok = ob_safety(tk, pfn, ts, done, OB, OBM, acc)
    F.ob_release(tk, OB, obfree, OBS)
    return ok


@numba.njit(cache=True)
def fifo_drain(p, count, OB, FH, pobl, acc):
    """free_pcppages_bulk takes from the tail: a recorded drain of pending ``p`` moves the newest obligation of its
    list (returned, still allocated) to buddy."""
    own = np.int64(pobl[p])
    z = FH[OB[own, F.OB_CPU], F.FH_TAIL]
    fifo_take(z, own, p, count, OB, FH, pobl, acc)
    return z


@numba.njit(cache=True)
def fifo_push_page(p, key, task, cpu, OB, OBM, obfree, OBS, FH, pobl, sh_mask, sh_ugen):
    """Patch 11: a keyed page goes to the pcp tail; its debt moves from the pfn to a new obligation."""
    ob = F.ob_new(key, sh_mask[p], sh_ugen[p], task, p, OB, OBM, obfree, OBS)
    F.fifo_push(ob, cpu, OB, FH)
    pobl[p] = ob
    sh_mask[p] = U0
    sh_ugen[p] = 0


@numba.njit(cache=True)
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
