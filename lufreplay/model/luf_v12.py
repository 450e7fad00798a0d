"""LUF RFC v12 (luf-model.md §2–§5, state machine §8): the default model.

State (§8.1): ``G`` the global ugen, ``K`` the 16-bit key counter, ``KEY[65536] = {mask, ugen}``, ``done[cpu]``,
``MMB`` per mm and ``ASB`` per file mapping (``{mask, ugen}``), the zone (``ZB_mask``, ``Z_lufugen``, ``Z_open``,
``Z_done``, ``nr_luf_pages``), the batch being unmapped (``LUF_mask``, ``NONLUF_mask``, ``FOLIO_ro_mask``,
``can_luf``) and, per page, its state (pcp key / buddy stamp / allocated) plus the shadow debt checked on every
re-allocation (the safety invariant: a violation stops the replay).

The loop below is one ``if`` per §8.2 event; the comments give the event number.
"""

from __future__ import annotations

import numba
import numpy as np

from lufreplay.model import kernels as K
from lufreplay.model import ops as O
from lufreplay.model import rmap
from lufreplay.model import rules as P
from lufreplay.model.base import Model, SafetyViolation
from lufreplay.model.kernels import U0, log_decision, notdone, popcount
from lufreplay.model.pcpfifo import OB_KEY, OB_TASK, OB_UGEN, ob_release, orphan
from lufreplay.model.rmap import luf_flush, owe
from lufreplay.model.state import (
    COVERED,
    KCTR,
    LUF_MASK,
    NBUF,
    NONLUF_MASK,
    NR_LUF,
    P_BUDDY_CLEAN,
    P_BUDDY_LUF,
    P_NONE,
    P_PCP_CLEAN,
    P_PCP_LUF,
    P_TAKEN,
    P_UNMAPPED,
    POOL_MASK,
    POOL_UGEN,
    USE_BATCHES,
    USE_BUF,
    USE_FIFO,
    USE_KEYS,
    USE_TASKS,
    Y_ALLOC_LUF,
    Y_CREDIT_NATURAL,
    Y_DIRTY_POSTED,
    Y_EPOCH_LAT_NS,
    Y_HOOKS_POSTED,
    Y_KEEP_POSTED,
    Y_NON_LUF_OK,
    Y_PCP_STRIKES,
    Y_UNEXPLAINED_FLUSH,
    Z_DONE,
    Z_DONE_TS,
    Z_LUFUGEN,
    Z_OPEN,
    Z_PREV_DONE,
    ZB_MASK,
    G,
)

# folio_begin, 1. unmap_pte, 2. end_folio_unmap: mm / mapping batches; a kept folio joins the LUF part (4. settles it)
WALK = rmap.W_FOLD | rmap.W_KEPT_JOINS


@numba.njit(cache=True, _nrt=False)
def _mi(name_idx):
    return K.O_MISC + name_idx


@numba.njit(cache=True, _nrt=False)
def _new_key(mask, SC, KEY_mask, KEY_ugen, done, acc):
    """fold_unmap_luf step 2: next 16-bit key (0 skipped), merge into a live slot, fresh ugen."""
    SC[KCTR] = (SC[KCTR] + 1) & 0xFFFF
    if SC[KCTR] == 0:
        SC[KCTR] = 1
    k = SC[KCTR]
    SC[G] += 1
    u = SC[G]
    if KEY_ugen[k] != 0:
        old = notdone(KEY_mask[k], KEY_ugen[k], done)  # __fold_luf_batch: diet the old request first
        if old != U0:
            acc[_mi(O.K_KEY_MERGES)] += 1
        KEY_mask[k] = old | mask
    else:
        KEY_mask[k] = mask
    KEY_ugen[k] = u
    return k


@numba.njit(cache=True, _nrt=False)
def _take_buddy(
    ts, cpu, task, pfn, order, can_sd, luf, non_luf_ok, SC, SU, done, pstate, pstamp, punmap_task, acc, tl, dec,
    nlog, hist_g, hist_ts, hist_mask, lat_ns, op,
):  # fmt: skip
    """§4.1 / §8.2.8 buddy path for a block: free pass, epoch close (+flush), wait, or refusal.

    ``alloc_order=recorded``: the recorded block itself is taken; returns True when it may be handed out.
    ``alloc_order=luf``: the pending obligations of buddy live in the zone's pend pool (not on pfns); a recorded
    take of a pending block is served by a clean block while ``non_luf_ok`` (no flush), else by the pend_list
    (epoch logic, ``pend_first``); the recorded block always leaves (True)."""
    s = np.int64(0)
    npg = np.int64(1) << order
    for p in range(pfn, pfn + npg):
        if pstate[p] == P_BUDDY_LUF and pstamp[p] > s:
            s = pstamp[p]
    if s == 0:
        return True
    if s <= SC[Z_DONE]:
        if ts < SC[Z_DONE_TS] and s > SC[Z_PREV_DONE]:
            acc[_mi(O.K_EPOCH_WAITS)] += 1  # another task's epoch flush is still in flight
        acc[_mi(O.K_ALLOC_FREE_PASS)] += 1
        for p in range(pfn, pfn + npg):
            if pstate[p] == P_BUDDY_LUF:
                pstate[p] = P_BUDDY_CLEAN
        return True
    if luf:
        if non_luf_ok:  # get_page_from_free_area: free_list first while non_luf_pages_ok(zone)
            acc[_mi(O.K_BUDDY_CLEAN_FIRST)] += 1
            for p in range(pfn, pfn + npg):
                if pstate[p] == P_BUDDY_LUF:
                    pstate[p] = P_BUDDY_CLEAN
            return True
        acc[_mi(O.K_PEND_FIRST)] += 1
    if not can_sd:
        acc[_mi(O.K_BUDDY_REFUSALS)] += 1
        if luf:  # the pend_list block is unusable: a clean block serves the caller
            for p in range(pfn, pfn + npg):
                if pstate[p] == P_BUDDY_LUF:
                    pstate[p] = P_BUDDY_CLEAN
            return True
        return False
    # s == Z_open: this task closes the epoch and flushes the whole zone batch
    target_mask = SU[ZB_MASK]
    ugen = SC[Z_LUFUGEN]
    n = luf_flush(
        ts, cpu, task, target_mask, ugen, O.C_ALLOC_BUDDY_EPOCH, op, pfn, SC, SU, done, acc, tl, dec, nlog, hist_g,
        hist_ts, hist_mask,
    )  # fmt: skip
    acc[_mi(O.K_EPOCH_CLOSES)] += 1
    if n > 0 or (notdone(target_mask, ugen, done) != target_mask):
        acc[_mi(O.K_ALLOC_WITH_FLUSH)] += 1
        acc[_mi(O.K_PAID_IN_ALLOC_FLUSHES)] += 1
    other = 0
    for p in range(pfn, pfn + npg):
        if pstate[p] == P_BUDDY_LUF and punmap_task[p] != task:
            other += 1
        if pstate[p] == P_BUDDY_LUF:
            pstate[p] = P_BUDDY_CLEAN
    if other > 0 and n > 0:
        acc[_mi(O.K_PAID_BY_OTHER_PAGES)] += other
        acc[_mi(O.K_PAID_BY_OTHER_FLUSHES)] += 1
    if luf:  # the whole pend pool is spliced back to free_list: nothing in it may still be owed
        acc[_mi(O.K_SAFETY_CHECKS)] += SC[NR_LUF]
        if notdone(SU[POOL_MASK], SC[POOL_UGEN], done) != U0:
            rmap.violation(pfn, ts, acc)
        SU[POOL_MASK] = U0
        SC[POOL_UGEN] = 0
    SC[Z_PREV_DONE] = SC[Z_DONE]
    SC[Z_DONE] = SC[Z_OPEN]
    SC[Z_DONE_TS] = ts + lat_ns
    SC[Z_OPEN] += 1
    SU[ZB_MASK] = U0
    SC[Z_LUFUGEN] = 0
    SC[NR_LUF] = 0
    return True


@numba.njit(cache=True, _nrt=False)
def _to_buddy(p, key, sh_m, sh_u, luf, SC, SU, KEY_mask, KEY_ugen, pstate, pkey, pstamp, acc):
    """§8.2.7: a page with a key enters buddy: the zone batch absorbs the key, the page gets the open stamp.
    With alloc_order=luf its shadow debt joins the zone's pend pool (checked when the pool is spliced back)."""
    SU[ZB_MASK] |= KEY_mask[key]
    if KEY_ugen[key] > SC[Z_LUFUGEN]:
        SC[Z_LUFUGEN] = KEY_ugen[key]
    pstate[p] = P_BUDDY_LUF
    pstamp[p] = SC[Z_OPEN]
    pkey[p] = 0
    SC[NR_LUF] += 1
    if SC[NR_LUF] > acc[_mi(O.K_NR_LUF_PAGES_MAX)]:
        acc[_mi(O.K_NR_LUF_PAGES_MAX)] = SC[NR_LUF]
    if luf:
        SU[POOL_MASK] |= sh_m
        if sh_u > SC[POOL_UGEN]:
            SC[POOL_UGEN] = sh_u


@numba.njit(cache=True, _nrt=False)
def _f1(ts, cpu, task, mask, ugen, can_sd, op, pfn, max_strikes, SC, SU, done, strikes, acc, tl, dec, nlog, hist_g,
        hist_ts, hist_mask):  # fmt: skip
    """F1 on one pcp takeoff: 0 = free pass, 1 = flushed (returns its IPIs in [1]), 2 = skipped (no-shootdown)."""
    target = notdone(mask, ugen, done)
    if target == U0:
        acc[_mi(O.K_ALLOC_FREE_PASS)] += 1
        log_decision(ts, 2, O.C_ALLOC_PCP, cpu, task, mask, 0, op, pfn, dec, nlog)
        return 0, 0
    if can_sd:
        n = luf_flush(
            ts, cpu, task, mask, ugen, O.C_ALLOC_PCP, op, pfn, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts,
            hist_mask,
        )  # fmt: skip
        acc[_mi(O.K_ALLOC_WITH_FLUSH)] += 1
        acc[_mi(O.K_PAID_IN_ALLOC_FLUSHES)] += 1
        strikes[cpu] = 0
        return 1, n
    acc[_mi(O.K_PCP_SKIPS)] += 1
    strikes[cpu] += 1
    if strikes[cpu] >= max_strikes:
        acc[_mi(O.K_PCP_FALLBACKS)] += 1
        strikes[cpu] = 0
    return 2, 0


@numba.njit(cache=True, _nrt=False)
def _settle(ts, cpu, task, luf, SC, SU, done, buf, pstate, pkey, sh_mask, sh_ugen, pobl, OB, acc, tl, dec, nlog,
            hist_g, hist_ts, hist_mask, op):  # fmt: skip
    """Pages about to be keyed again that the model still holds pending: the trace re-used them without a
    recorded allocation (a lost event, or a no-shootdown allocation the model served with another page).
    alloc_order=luf: a pcp obligation stays in its FIFO without a label, a buddy one stays in the pend pool.
    Otherwise (or for a page keyed but never freed) the missed allocation pays what the page still owes."""
    for b in range(SC[NBUF]):
        pfn = buf[b, 0]
        for p in range(pfn, pfn + (np.int64(1) << buf[b, 1])):
            st = pstate[p]
            pend = st == P_PCP_LUF or st == P_BUDDY_LUF or (st == P_UNMAPPED and pkey[p] != 0)
            if luf and st == P_PCP_LUF:
                orphan(p, OB, pobl)
            target = U0
            if sh_mask[p] != U0:
                target = notdone(sh_mask[p], sh_ugen[p], done)
                if target != U0:
                    cause = O.C_ALLOC_BUDDY_EPOCH if (st == P_BUDDY_LUF or st == P_TAKEN) else O.C_ALLOC_PCP
                    luf_flush(
                        ts, cpu, task, sh_mask[p], sh_ugen[p], cause, op, p, SC, SU, done, acc, tl, dec, nlog, hist_g,
                        hist_ts, hist_mask,
                    )  # fmt: skip
                sh_mask[p] = U0
                sh_ugen[p] = 0
            if pend or target != U0:
                acc[_mi(O.K_UNSEEN_REUSES)] += 1
            if st == P_PCP_LUF or st == P_BUDDY_LUF:
                pstate[p] = P_NONE


@numba.njit(cache=True, nogil=True, _nrt=False)
def run_luf_v12(
    mops, nops, Y, SC, SU, done, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen, KEY_mask, KEY_ugen, task_key, task_anon_key,
    strikes, buf, pstate, pkey, pstamp, punmap_ts, punmap_task, sh_mask, sh_ugen, acc, tl, dec, nlog,
    hist_g, hist_ts, hist_mask, req_ts, req_ugen, req_mask, req_pages, OB, OBM, obfree, FH, OBS, pobl,
):  # fmt: skip
    lat_ns = np.int64(Y[Y_EPOCH_LAT_NS])
    max_strikes = np.int64(Y[Y_PCP_STRIKES])
    luf = Y[Y_ALLOC_LUF] != 0
    non_luf_ok = Y[Y_NON_LUF_OK] != 0
    hooks_posted = Y[Y_HOOKS_POSTED] != 0
    keep_posted = Y[Y_KEEP_POSTED] != 0
    dirty_posted = Y[Y_DIRTY_POSTED] != 0
    i = rmap.next_op(mops, 0, nops, Y, WALK, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen)
    while i < nops:
        r = mops[i]
        op, ts, cpu, task = r["op"], r["ts"], r["cpu"], r["task"]
        if op == O.M_KEEP:  # 4. reclaim_keep (F11): key the work so far and flush it at once
            _settle(
                ts, cpu, task, luf, SC, SU, done, buf, pstate, pkey, sh_mask, sh_ugen, pobl, OB, acc, tl, dec, nlog,
                hist_g, hist_ts, hist_mask, op,
            )  # fmt: skip
            d = SU[LUF_MASK] & ~SU[NONLUF_MASK]
            k = 0
            if d != U0:
                k = _new_key(d, SC, KEY_mask, KEY_ugen, done, acc)
            _key_buffer(
                k, d, task, SC, KEY_ugen, buf, pstate, pkey, punmap_ts, punmap_task, sh_mask, sh_ugen, acc, req_ts,
                req_ugen, req_mask, req_pages, nlog,
            )  # fmt: skip
            if keep_posted:
                _keep_posted(
                    ts, cpu, task, k, op, r["pfn"], SC, SU, done, KEY_mask, acc, tl, dec, nlog, hist_g, hist_ts,
                    hist_mask,
                )  # fmt: skip
            elif k != 0:
                luf_flush(
                    ts, cpu, task, KEY_mask[k], KEY_ugen[k], O.C_RECLAIM_KEEP, op, r["pfn"], SC, SU, done, acc, tl, dec,
                    nlog, hist_g, hist_ts, hist_mask,
                )  # fmt: skip
            SU[COVERED] |= SU[LUF_MASK]
            SU[LUF_MASK] = U0
        elif op == O.M_BATCH:  # 3. batch_flush: fold_unmap_luf + try_to_unmap_flush
            d, nl = rmap.batch_split(K.opm(r["mask"]), Y[Y_UNEXPLAINED_FLUSH] != 0, SU)
            _settle(
                ts, cpu, task, luf, SC, SU, done, buf, pstate, pkey, sh_mask, sh_ugen, pobl, OB, acc, tl, dec, nlog,
                hist_g, hist_ts, hist_mask, op,
            )  # fmt: skip
            # §9.4 dirty_writeback=posted: this recorded flush is try_to_unmap_flush_dirty, which folds the LUF work
            # into tlb_ubc and flushes it: no key
            dirty = dirty_posted and (r["flags"] & O.B_DIRTY) != 0
            k = 0
            if d != U0 and not dirty:
                k = _new_key(d, SC, KEY_mask, KEY_ugen, done, acc)
                rmap.defer(ts, cpu, task, d, op, acc, dec, nlog)
            if nl != U0:
                rmap.flush(
                    ts, cpu, task, nl, O.C_BATCH_NONLUF, op, -1, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts,
                    hist_mask,
                )  # fmt: skip
            if dirty and d != U0:
                # one try_to_unmap_flush in the kernel; logged as a second flush so that the LUF part counts under
                # F13 (nl and d are disjoint and nothing happens in between: the same IPIs and done[] order)
                rmap.flush(
                    ts, cpu, task, d, O.C_DIRTY_WRITEBACK, op, -1, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts,
                    hist_mask,
                )  # fmt: skip
            _key_buffer(
                k, d, task, SC, KEY_ugen, buf, pstate, pkey, punmap_ts, punmap_task, sh_mask, sh_ugen, acc, req_ts,
                req_ugen, req_mask, req_pages, nlog,
            )  # fmt: skip
            if task >= 0:
                task_key[task] = k
                task_anon_key[task] = k if (r["flags"] & O.B_ANON_UNKNOWN_PFN) else 0
            if (r["flags"] & O.B_MEMFAIL) and k != 0:  # F12
                luf_flush(
                    ts, cpu, task, KEY_mask[k], KEY_ugen[k], O.C_MEMFAIL, op, r["pfn"], SC, SU, done, acc, tl, dec, nlog,
                    hist_g, hist_ts, hist_mask,
                )  # fmt: skip
            rmap.batch_done(SU)
        elif op == O.M_RFLUSH:  # recorded flushes LUF leaves alone (immediate, zap, batched_pending, ...)
            cause = r["sub"]
            tg = rmap.recorded_flush(ts, cpu, task, cause, K.opm(r["mask"]), r["flags"], op, acc, tl, dec, nlog)
            credit = U0
            if cause == O.C_BATCHED_PENDING:  # 12. F9 marks ugen_done for mm_cpumask
                credit = K.opm(r["mask2"])
                acc[_mi(O.K_R6_CREDITS_OTHER_MM)] += r["pfn"]  # the reconstructor counted them
            elif Y[Y_CREDIT_NATURAL] != 0 and (r["flags"] & 2):
                credit = tg
            if credit != U0:
                rmap.retire(ts, credit, SC, done, hist_g, hist_ts, hist_mask, nlog)
        elif op == O.M_FREE:  # 6. free(page, key)
            pfn = r["pfn"]
            order = r["order"]
            for p in range(pfn, pfn + (np.int64(1) << order)):
                if luf and (pstate[p] == P_PCP_LUF or pstate[p] == P_BUDDY_LUF):
                    # freed again with no recorded allocation: the model's obligation stays free, unlabelled
                    acc[_mi(O.K_UNSEEN_REUSES)] += 1
                    orphan(p, OB, pobl)
                    pstate[p] = P_NONE
                k = 0
                if pstate[p] == P_UNMAPPED:
                    k = pkey[p]
                elif (
                    r["sub"] == 3
                    and task >= 0
                    and task_anon_key[task] != 0
                    and pstate[p] != P_PCP_LUF
                    and pstate[p] != P_BUDDY_LUF
                ):
                    k = task_anon_key[task]  # anon folio of the last batch: its pfn shows up only here
                    owe(p, KEY_mask[k], KEY_ugen[k], sh_mask, sh_ugen)
                    punmap_ts[p] = ts
                    punmap_task[p] = task
                if k != 0:
                    acc[_mi(O.K_LUF_PAGES_FREED)] += 1
                    if order == 0:
                        pstate[p] = P_PCP_LUF
                        pkey[p] = k
                        if luf:  # patch 11: a keyed page goes to the pcp tail
                            rmap.fifo_push_page(
                                p, k, punmap_task[p], cpu, OB, OBM, obfree, OBS, FH, pobl, sh_mask, sh_ugen
                            )
                    else:
                        _to_buddy(
                            p, k, sh_mask[p], sh_ugen[p], luf, SC, SU, KEY_mask, KEY_ugen, pstate, pkey, pstamp, acc
                        )
                        if luf:
                            sh_mask[p] = U0
                            sh_ugen[p] = 0
                elif pstate[p] == P_PCP_LUF or pstate[p] == P_BUDDY_LUF:
                    pass  # still free and pending in the model (a no-shootdown allocation skipped it)
                else:
                    pstate[p] = P_PCP_CLEAN if order == 0 else P_BUDDY_CLEAN
        elif op == O.M_DRAIN:  # 7. pcp_drain (free_pcppages_bulk takes from the list tail)
            pfn = r["pfn"]
            for p in range(pfn, pfn + (np.int64(1) << r["order"])):
                if pstate[p] == P_PCP_LUF:
                    if luf:
                        z = rmap.fifo_drain(p, True, OB, FH, pobl, acc)  # the newest keyed page goes to buddy
                        punmap_task[p] = OB[z, OB_TASK]
                        _to_buddy(
                            p, OB[z, OB_KEY], OBM[z], OB[z, OB_UGEN], luf, SC, SU, KEY_mask, KEY_ugen, pstate, pkey,
                            pstamp, acc,
                        )  # fmt: skip
                        ob_release(z, OB, obfree, OBS)
                    else:
                        _to_buddy(
                            p, pkey[p], U0, 0, luf, SC, SU, KEY_mask, KEY_ugen, pstate, pkey, pstamp, acc
                        )  # fmt: skip
                elif pstate[p] == P_PCP_CLEAN:
                    pstate[p] = P_BUDDY_CLEAN
        elif op == O.M_TAKE:  # 8. buddy path (F2), incl. pcp refill
            can_sd = (r["flags"] & O.A_CAN_SD) != 0
            pfn = r["pfn"]
            order = r["order"]
            if _take_buddy(
                ts, cpu, task, pfn, order, can_sd, luf, non_luf_ok, SC, SU, done, pstate, pstamp, punmap_task, acc, tl,
                dec, nlog, hist_g, hist_ts, hist_mask, lat_ns, op,
            ):  # fmt: skip
                for p in range(pfn, pfn + (np.int64(1) << order)):
                    if pstate[p] != P_PCP_LUF:
                        pstate[p] = P_PCP_CLEAN if (r["flags"] & O.A_REFILL) else P_TAKEN
        elif op == O.M_ALLOC:  # 8. alloc: pcp path (F1) / buddy path (F2), then the safety invariant
            can_sd = (r["flags"] & O.A_CAN_SD) != 0
            pfn = r["pfn"]
            order = r["order"]
            npg = np.int64(1) << order
            mask = U0
            ugen = np.int64(0)
            pending_pcp = False
            pending_buddy = False
            fifo = luf and order == 0 and pstate[pfn] == P_PCP_LUF
            taken_ob = np.int64(-1)
            own = np.int64(-1)
            if fifo:  # v12: the pcp head is reached only after clean pages; the oldest keyed page comes first
                own = np.int64(pobl[pfn])
                taken_ob = rmap.fifo_head(cpu, own, FH)
                mask = KEY_mask[OB[taken_ob, OB_KEY]]
                ugen = KEY_ugen[OB[taken_ob, OB_KEY]]
                pending_pcp = True
            else:
                for p in range(pfn, pfn + npg):
                    st = pstate[p]
                    if st == P_PCP_LUF or (st == P_UNMAPPED and pkey[p] != 0):
                        k = OB[pobl[p], OB_KEY] if (luf and st == P_PCP_LUF) else pkey[p]
                        mask |= KEY_mask[k]
                        if KEY_ugen[k] > ugen:
                            ugen = KEY_ugen[k]
                        pending_pcp = True
                    elif st == P_BUDDY_LUF:
                        pending_buddy = True
            if r["flags"] & O.A_ATOMIC and (pending_pcp or pending_buddy):
                acc[_mi(O.K_ATOMIC_ALLOCS_SKIPPING_LUF)] += 1
            taken = True
            if pending_pcp:
                res, n = _f1(
                    ts, cpu, task, mask, ugen, can_sd, op, pfn, max_strikes, SC, SU, done, strikes, acc, tl, dec, nlog,
                    hist_g, hist_ts, hist_mask,
                )  # fmt: skip
                if res == 2:
                    taken = False
                elif res == 1:
                    other = 0
                    if fifo:
                        other = 1 if OB[taken_ob, OB_TASK] != task else 0
                    else:
                        for p in range(pfn, pfn + npg):
                            if pstate[p] == P_PCP_LUF or pstate[p] == P_UNMAPPED:
                                t_un = OB[pobl[p], OB_TASK] if (luf and pstate[p] == P_PCP_LUF) else punmap_task[p]
                                if t_un != task:
                                    other += 1
                    if other > 0 and n > 0:
                        acc[_mi(O.K_PAID_BY_OTHER_PAGES)] += other
                        acc[_mi(O.K_PAID_BY_OTHER_FLUSHES)] += 1
            if taken and pending_buddy:
                taken = _take_buddy(
                    ts, cpu, task, pfn, order, can_sd, luf, non_luf_ok, SC, SU, done, pstate, pstamp, punmap_task,
                    acc, tl, dec, nlog, hist_g, hist_ts, hist_mask, lat_ns, op,
                )  # fmt: skip
            if not taken:  # recorded: this block stays free and pending in the model; a clean page served the caller
                if luf:  # the trace's page left; its obligation stays free in the model, unlabelled
                    for p in range(pfn, pfn + npg):
                        if pstate[p] == P_PCP_LUF:
                            orphan(p, OB, pobl)
                            pstate[p] = P_NONE
                            pkey[p] = 0
            else:
                if not pending_pcp and not pending_buddy:
                    acc[_mi(O.K_ALLOC_CLEAN)] += 1
                if fifo:
                    if not rmap.fifo_alloc(taken_ob, own, pfn, True, ts, done, OB, OBM, obfree, OBS, FH, pobl, acc):
                        return i  # the op that broke the invariant
                    pstate[pfn] = P_NONE
                    pkey[pfn] = 0
                else:
                    for p in range(pfn, pfn + npg):
                        if pstate[p] == P_BUDDY_LUF:
                            pstate[p] = P_BUDDY_CLEAN
                        if luf and pstate[p] == P_PCP_LUF:  # a keyed page inside a larger block: its own obligation
                            own = np.int64(pobl[p])
                            if not rmap.fifo_alloc(own, own, p, False, ts, done, OB, OBM, obfree, OBS, FH, pobl, acc):
                                return i  # the op that broke the invariant
                        elif not rmap.safety(p, ts, done, sh_mask, sh_ugen, acc):
                            return i  # the op that broke the invariant
                        pstate[p] = P_NONE
                        pkey[p] = 0
        elif op == O.M_HOOK:  # 9.-13. hooks F3-F13
            h = r["sub"]
            scope = P.hook_scope(h, (r["flags"] & 1) != 0, P.LUF_V12, hooks_posted)
            if P.dirty_wb_at_batch(h, dirty_posted):
                scope = 0
            target_mask, ugen = P.batch_target(
                scope, r["mm"], r["mapping"], MMB_mask, MMB_ugen, ASB_mask, ASB_ugen, done
            )
            k = task_key[task] if (scope & P.S_TASK_KEY) and task >= 0 else 0
            if k != 0:  # F13: the task's last key
                target_mask = notdone(KEY_mask[k], KEY_ugen[k], done)
                ugen = KEY_ugen[k]
            rmap.count_hook(h, target_mask != U0, acc)
            if target_mask != U0:
                luf_flush(
                    ts, cpu, task, target_mask, ugen + 1, O.HOOK_CAUSE[h], op, r["pfn"], SC, SU, done, acc, tl, dec, nlog,
                    hist_g, hist_ts, hist_mask,
                )  # fmt: skip
        i = rmap.next_op(mops, i + 1, nops, Y, WALK, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen)
    return -1


@numba.njit(cache=True, _nrt=False)
def _keep_posted(ts, cpu, task, k, op, pfn, SC, SU, done, KEY_mask, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask):
    """§9.3 keep=posted: luf_flush(key) folds the key's batch into tlb_ubc with no diet and runs
    try_to_unmap_flush(), which sends the pass's pending non-LUF work too, key 0 or not."""
    key_mask = KEY_mask[k] if k != 0 else U0
    target = key_mask | SU[NONLUF_MASK]
    SU[COVERED] |= SU[NONLUF_MASK]
    SU[NONLUF_MASK] = U0
    if target != U0:
        rmap.flush(
            ts, cpu, task, target, O.C_RECLAIM_KEEP, op, pfn, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts,
            hist_mask,
        )  # fmt: skip
        acc[_mi(O.K_FLUSHED_CPU_SLOTS)] += popcount(rmap.sent(key_mask, SU) & ~K.bit(cpu))


@numba.njit(cache=True, _nrt=False)
def _key_buffer(
    k, d, task, SC, KEY_ugen, buf, pstate, pkey, punmap_ts, punmap_task, sh_mask, sh_ugen, acc, req_ts, req_ugen,
    req_mask, req_pages, nlog,
):  # fmt: skip
    """The eligible folios of the batch are freed with key ``k`` (0: clean); their shadow debt is ``d``."""
    u = KEY_ugen[k] if k != 0 else 0
    for b in range(SC[NBUF]):
        pfn = buf[b, 0]
        order = buf[b, 1]
        for p in range(pfn, pfn + (np.int64(1) << order)):
            pstate[p] = P_UNMAPPED
            pkey[p] = k
            punmap_ts[p] = buf[b, 2]
            punmap_task[p] = task
            if k != 0:
                owe(p, d, u, sh_mask, sh_ugen)
        if k != 0:
            K.add_request(buf[b, 2], u, d, np.int64(1) << order, req_ts, req_ugen, req_mask, req_pages, nlog)
    SC[NBUF] = 0


class LufV12(Model):
    """LUF RFC v12 as the posted code runs it by default (``hooks``, ``keep``, ``dirty_writeback`` = posted,
    luf-model.md §9.1, §9.3, §9.4)."""

    name = "luf-v12"

    uses = USE_KEYS | USE_BATCHES | USE_TASKS | USE_FIFO | USE_BUF

    def init_state(self) -> None:
        self.st.SC[G] = 2  # LUF_UGEN_INIT
        self.st.SC[Z_OPEN] = 1
        self.st.done[:] = 1  # LUF_UGEN_INIT - 1

    def _run(self, mops: np.ndarray, n: int) -> int:
        st, pg = self.st, self.pages
        return self.core(run_luf_v12)(
            mops, n, self.Y, *st.head(), st.KEY_mask, st.KEY_ugen, st.task_key, st.task_anon_key, st.strikes, st.buf,
            pg.state, pg.key, pg.stamp, pg.unmap_ts, pg.unmap_task, pg.sh_mask, pg.sh_ugen, self.acc, self.tl,
            *self.logs.args(), *st.obl.args(),
        )  # fmt: skip

    def extras(self) -> dict:
        return {
            "zone": {
                "open_epoch": int(self.SC[Z_OPEN]),
                "done_epoch": int(self.SC[Z_DONE]),
                "nr_luf_pages_at_end": int(self.SC[NR_LUF]),
            },
            "pcp_fifo_pages_at_end": int(self.obl.OBS[2]),
        }


class LufV12Intended(LufV12):
    """LUF RFC v12 as the cover letter intends it, whatever the options say: the F3-F8/F10 hooks flush the
    mm/mapping batches (``hooks=intended``), F11 flushes its key only (``keep=key_only``), F13 the task's last key
    (``dirty_writeback=last_key``); shown beside the posted code's figures."""

    name = "luf-v12-intended"

    def __init__(self, opts: dict, Y: np.ndarray, tl: np.ndarray, ncpu: int, decisions: bool) -> None:
        Y = Y.copy()
        Y[Y_HOOKS_POSTED] = 0.0
        Y[Y_KEEP_POSTED] = 0.0
        Y[Y_DIRTY_POSTED] = 0.0
        intended = {"hooks": "intended", "keep": "key_only", "dirty_writeback": "last_key"}
        super().__init__({**opts, **intended}, Y, tl, ncpu, decisions)


__all__ = ["LufV12", "LufV12Intended", "SafetyViolation", "run_luf_v12"]
