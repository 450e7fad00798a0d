"""LUF RFC v12 (luf-model.md §2–§5, state machine §8): the default model's policy.

State (§8.1, the shared record ``state.ModelState``): ``G`` the global ugen, ``K`` the 16-bit key counter,
``KEY[65536] = {mask, ugen}``, ``done[cpu]``, ``MMB`` per mm and ``ASB`` per file mapping, the zone
(``ZB_mask``, ``Z_lufugen``, ``Z_open``, ``Z_done``, ``nr_luf_pages``), the open batch (``LUF_mask``,
``NONLUF_mask``, ``FOLIO_ro_mask``, ``can_luf``) and, per page, its state (pcp key / buddy stamp / allocated)
plus the shadow debt checked on every re-allocation (the safety invariant: a violation stops the replay).

The rmap-walk prologue (§8.2.1–2) and the recorded flushes are the loop's (``model/loop.py``); the functions
here are v12's answer to each remaining §8.2 event, named after the kernel function that makes the decision.
"""

from __future__ import annotations

import numba
import numpy as np

from lufreplay.model import ops as O
from lufreplay.model.base import Model, SafetyViolation
from lufreplay.model.kernels import O_MISC, U0, bit, log_decision, notdone, popcount
from lufreplay.model.pcpfifo import OB_KEY, OB_TASK, OB_UGEN, ob_release, orphan
from lufreplay.model.prims import (
    clear_debt,
    count,
    defer,
    flush,
    free_folios_keyed,
    luf_batch_target,
    luf_flush,
    new_key,
    ob_own_back,
    ob_safety,
    owe,
    pcp_add_tail,
    pcp_drain_tail,
    pcp_head,
    pcp_take,
    safety,
    violation,
)
from lufreplay.model.state import (
    COVERED,
    G,
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
    POL_V12,
    POOL_MASK,
    POOL_UGEN,
    Y_ALLOC_LUF,
    Y_EPOCH_LAT_NS,
    Y_HOOKS_POSTED,
    Y_KEEP_POSTED,
    Y_NON_LUF_OK,
    Y_PCP_STRIKES,
    Z_DONE,
    Z_DONE_TS,
    Z_LUFUGEN,
    Z_OPEN,
    Z_PREV_DONE,
    ZB_MASK,
)

NKEYS = 65536


@numba.njit(cache=True)
def clean_block(S, pfn, npg):
    """Pending buddy pages of the block are clean from now on (their epoch is done, or a clean block served)."""
    for p in range(pfn, pfn + npg):
        if S.pstate[p] == P_BUDDY_LUF:
            S.pstate[p] = P_BUDDY_CLEAN


@numba.njit(cache=True)
def takeoff_end(S, r, pfn, npg):
    """luf_takeoff_end of a buddy takeoff that closes the open epoch (§4.1): one flush of the whole zone batch,
    dieted by the zone's luf_ugen; the pend pool is spliced back to free_list and the epoch advances."""
    SC, SU = S.SC, S.SU
    ts = r["ts"]
    target_mask = SU[ZB_MASK]
    ugen = SC[Z_LUFUGEN]
    n = luf_flush(S, r, target_mask, ugen, O.C_ALLOC_BUDDY_EPOCH, pfn)
    count(S, O.K_EPOCH_CLOSES)
    if n > 0 or (notdone(target_mask, ugen, S.done) != target_mask):
        count(S, O.K_ALLOC_WITH_FLUSH)
        count(S, O.K_PAID_IN_ALLOC_FLUSHES)
    other = 0
    for p in range(pfn, pfn + npg):
        if S.pstate[p] == P_BUDDY_LUF and S.punmap_task[p] != r["task"]:
            other += 1
    clean_block(S, pfn, npg)
    if other > 0 and n > 0:
        count(S, O.K_PAID_BY_OTHER_PAGES, other)
        count(S, O.K_PAID_BY_OTHER_FLUSHES)
    if S.Y[Y_ALLOC_LUF] != 0:  # the whole pend pool is spliced back to free_list: nothing in it may still be owed
        count(S, O.K_SAFETY_CHECKS, SC[NR_LUF])
        if notdone(SU[POOL_MASK], SC[POOL_UGEN], S.done) != U0:
            violation(S, pfn, ts)
        SU[POOL_MASK] = U0
        SC[POOL_UGEN] = 0
    SC[Z_PREV_DONE] = SC[Z_DONE]
    SC[Z_DONE] = SC[Z_OPEN]
    SC[Z_DONE_TS] = ts + np.int64(S.Y[Y_EPOCH_LAT_NS])
    SC[Z_OPEN] += 1
    SU[ZB_MASK] = U0
    SC[Z_LUFUGEN] = 0
    SC[NR_LUF] = 0


@numba.njit(cache=True)
def take_buddy(S, r, pfn, order, can_sd):
    """§4.1 / §8.2.8 buddy path for a block (luf_takeoff_check_and_fold(zone)): free pass, epoch close (+flush),
    wait, or refusal.

    ``alloc_order=recorded``: the recorded block itself is taken; returns True when it may be handed out.
    ``alloc_order=luf``: the pending obligations of buddy live in the zone's pend pool (not on pfns); a recorded
    take of a pending block is served by a clean block while ``non_luf_ok`` (no flush), else by the pend_list
    (epoch logic, ``pend_first``); the recorded block always leaves (True)."""
    SC = S.SC
    luf = S.Y[Y_ALLOC_LUF] != 0
    s = np.int64(0)
    npg = np.int64(1) << order
    for p in range(pfn, pfn + npg):
        if S.pstate[p] == P_BUDDY_LUF and S.pstamp[p] > s:
            s = S.pstamp[p]
    if s == 0:
        return True
    if s <= SC[Z_DONE]:
        if r["ts"] < SC[Z_DONE_TS] and s > SC[Z_PREV_DONE]:
            count(S, O.K_EPOCH_WAITS)  # another task's epoch flush is still in flight
        count(S, O.K_ALLOC_FREE_PASS)
        clean_block(S, pfn, npg)
        return True
    if luf:
        if S.Y[Y_NON_LUF_OK] != 0:  # get_page_from_free_area: free_list first while non_luf_pages_ok(zone)
            count(S, O.K_BUDDY_CLEAN_FIRST)
            clean_block(S, pfn, npg)
            return True
        count(S, O.K_PEND_FIRST)
    if not can_sd:
        count(S, O.K_BUDDY_REFUSALS)
        if luf:  # the pend_list block is unusable: a clean block serves the caller
            clean_block(S, pfn, npg)
            return True
        return False
    takeoff_end(S, r, pfn, npg)  # s == Z_open: this task closes the epoch
    return True


@numba.njit(cache=True)
def to_buddy(S, p, key, sh_m, sh_u):
    """§8.2.7: a page with a key enters buddy: the zone batch absorbs the key, the page gets the open stamp.
    With alloc_order=luf its shadow debt joins the zone's pend pool (checked when the pool is spliced back)."""
    SC, SU = S.SC, S.SU
    SU[ZB_MASK] |= S.KEY_mask[key]
    if S.KEY_ugen[key] > SC[Z_LUFUGEN]:
        SC[Z_LUFUGEN] = S.KEY_ugen[key]
    S.pstate[p] = P_BUDDY_LUF
    S.pstamp[p] = SC[Z_OPEN]
    S.pkey[p] = 0
    SC[NR_LUF] += 1
    if SC[NR_LUF] > S.acc[O_MISC + O.K_NR_LUF_PAGES_MAX]:
        S.acc[O_MISC + O.K_NR_LUF_PAGES_MAX] = SC[NR_LUF]
    if S.Y[Y_ALLOC_LUF] != 0:
        SU[POOL_MASK] |= sh_m
        if sh_u > SC[POOL_UGEN]:
            SC[POOL_UGEN] = sh_u


@numba.njit(cache=True)
def luf_takeoff_check_and_fold(S, r, mask, ugen, can_sd, pfn):
    """F1 on one pcp takeoff: 0 = free pass, 1 = flushed (returns its IPIs in [1]), 2 = skipped (no-shootdown)."""
    cpu = r["cpu"]
    target = notdone(mask, ugen, S.done)
    if target == U0:
        count(S, O.K_ALLOC_FREE_PASS)
        log_decision(r["ts"], 2, O.C_ALLOC_PCP, cpu, r["task"], mask, 0, r["op"], pfn, S.dec, S.nlog)
        return 0, 0
    if can_sd:
        n = luf_flush(S, r, mask, ugen, O.C_ALLOC_PCP, pfn)
        count(S, O.K_ALLOC_WITH_FLUSH)
        count(S, O.K_PAID_IN_ALLOC_FLUSHES)
        S.strikes[cpu] = 0
        return 1, n
    count(S, O.K_PCP_SKIPS)
    S.strikes[cpu] += 1
    if S.strikes[cpu] >= np.int64(S.Y[Y_PCP_STRIKES]):
        count(S, O.K_PCP_FALLBACKS)
        S.strikes[cpu] = 0
    return 2, 0


@numba.njit(cache=True)
def settle(S, r):
    """Pages about to be keyed again that the model still holds pending: the trace re-used them without a
    recorded allocation (a lost event, or a no-shootdown allocation the model served with another page).
    alloc_order=luf: a pcp obligation stays in its FIFO without a label, a buddy one stays in the pend pool.
    Otherwise (or for a page keyed but never freed) the missed allocation pays what the page still owes."""
    luf = S.Y[Y_ALLOC_LUF] != 0
    for b in range(S.SC[NBUF]):
        pfn = S.buf[b, 0]
        for p in range(pfn, pfn + (np.int64(1) << S.buf[b, 1])):
            st = S.pstate[p]
            pend = st == P_PCP_LUF or st == P_BUDDY_LUF or (st == P_UNMAPPED and S.pkey[p] != 0)
            if luf and st == P_PCP_LUF:
                orphan(p, S.OB, S.pobl)
            target = U0
            if S.sh_mask[p] != U0:
                target = notdone(S.sh_mask[p], S.sh_ugen[p], S.done)
                if target != U0:
                    cause = O.C_ALLOC_BUDDY_EPOCH if (st == P_BUDDY_LUF or st == P_TAKEN) else O.C_ALLOC_PCP
                    luf_flush(S, r, S.sh_mask[p], S.sh_ugen[p], cause, p)
                clear_debt(S, p)
            if pend or target != U0:
                count(S, O.K_UNSEEN_REUSES)
            if st == P_PCP_LUF or st == P_BUDDY_LUF:
                S.pstate[p] = P_NONE


@numba.njit(cache=True)
def fold_unmap_luf(S, r):
    """§3.3: the deferred part D = LUF \\ NONLUF of the open batch gets a new key (0: nothing deferred); the
    batch's eligible folios leave the walk keyed with it. Returns the key."""
    settle(S, r)
    d = S.SU[LUF_MASK] & ~S.SU[NONLUF_MASK]
    k = 0
    if d != U0:
        k = new_key(S, d)
    return k, d


@numba.njit(cache=True)
def reclaim_keep(S, r):
    """§8.2.4 / F11: reclaim could not free an eligible folio: key the LUF work so far and flush it at once.
    ``reclaim_keep=posted`` (§9.3): luf_flush(fold_unmap_luf()) with no diet, and try_to_unmap_flush() also
    flushes the pending non-LUF work (even for key 0)."""
    k, d = fold_unmap_luf(S, r)
    free_folios_keyed(S, POL_V12, r["task"], k, d, S.KEY_ugen[k] if k != 0 else 0)
    if S.Y[Y_KEEP_POSTED] != 0:
        km = S.KEY_mask[k] if k != 0 else U0
        t = km | S.SU[NONLUF_MASK]
        if t != U0:
            flush(S, r, t, O.C_RECLAIM_KEEP, r["pfn"])
            count(S, O.K_FLUSHED_CPU_SLOTS, popcount(km & ~bit(r["cpu"])))
        S.SU[COVERED] |= S.SU[NONLUF_MASK]
        S.SU[NONLUF_MASK] = U0
    elif k != 0:
        luf_flush(S, r, S.KEY_mask[k], S.KEY_ugen[k], O.C_RECLAIM_KEEP, r["pfn"])
    S.SU[COVERED] |= S.SU[LUF_MASK]
    S.SU[LUF_MASK] = U0


@numba.njit(cache=True)
def try_to_unmap_flush(S, r):
    """§8.2.3 batch_flush: fold_unmap_luf, then the vanilla-style flush of the non-LUF part (marks done), then
    the folios are freed with the key; F12 flushes the key at once for memory-failure migration."""
    task = r["task"]
    k, d = fold_unmap_luf(S, r)
    if d != U0:
        defer(S, r, d)
    nl = S.SU[NONLUF_MASK]
    if nl != U0:
        flush(S, r, nl, O.C_BATCH_NONLUF, -1)
    free_folios_keyed(S, POL_V12, task, k, d, S.KEY_ugen[k] if k != 0 else 0)
    if task >= 0:
        S.task_key[task] = k
        S.task_anon_key[task] = k if (r["flags"] & O.B_ANON_UNKNOWN_PFN) else 0
    if (r["flags"] & O.B_MEMFAIL) and k != 0:  # F12
        luf_flush(S, r, S.KEY_mask[k], S.KEY_ugen[k], O.C_MEMFAIL, r["pfn"])


@numba.njit(cache=True)
def free_page(S, r):
    """§8.2.6 free(page, key): order 0 → pcp (keyed: list tail), else buddy (free_one_page) with the key."""
    luf = S.Y[Y_ALLOC_LUF] != 0
    task = r["task"]
    pfn = r["pfn"]
    order = r["order"]
    for p in range(pfn, pfn + (np.int64(1) << order)):
        st = S.pstate[p]
        if luf and (st == P_PCP_LUF or st == P_BUDDY_LUF):
            # freed again with no recorded allocation: the model's obligation stays free, unlabelled
            count(S, O.K_UNSEEN_REUSES)
            orphan(p, S.OB, S.pobl)
            S.pstate[p] = P_NONE
            st = P_NONE
        k = 0
        if st == P_UNMAPPED:
            k = S.pkey[p]
        elif r["sub"] == 3 and task >= 0 and S.task_anon_key[task] != 0 and st != P_PCP_LUF and st != P_BUDDY_LUF:
            k = S.task_anon_key[task]  # anon folio of the last batch: its pfn shows up only here
            owe(S, p, S.KEY_mask[k], S.KEY_ugen[k])
            S.punmap_ts[p] = r["ts"]
            S.punmap_task[p] = task
        if k != 0:
            count(S, O.K_LUF_PAGES_FREED)
            if order == 0:
                S.pstate[p] = P_PCP_LUF
                S.pkey[p] = k
                if luf:  # patch 11: a keyed page goes to the pcp tail
                    pcp_add_tail(S, p, k, S.punmap_task[p], r["cpu"])
            else:
                to_buddy(S, p, k, S.sh_mask[p], S.sh_ugen[p])
                if luf:
                    clear_debt(S, p)
        elif st == P_PCP_LUF or st == P_BUDDY_LUF:
            pass  # still free and pending in the model (a no-shootdown allocation skipped it)
        else:
            S.pstate[p] = P_PCP_CLEAN if order == 0 else P_BUDDY_CLEAN


@numba.njit(cache=True)
def free_pcppages_bulk(S, r):
    """§8.2.7 pcp_drain: keyed pages enter buddy (alloc_order=luf: the newest of that pcp, from the tail)."""
    pfn = r["pfn"]
    for p in range(pfn, pfn + (np.int64(1) << r["order"])):
        if S.pstate[p] == P_PCP_LUF:
            if S.Y[Y_ALLOC_LUF] != 0:
                z, own = pcp_drain_tail(S, p)
                if z != own:
                    count(S, O.K_FIFO_REORDERS)
                S.punmap_task[p] = S.OB[z, OB_TASK]
                to_buddy(S, p, S.OB[z, OB_KEY], S.OBM[z], S.OB[z, OB_UGEN])
                ob_release(z, S.OB, S.obfree, S.OBS)
            else:
                to_buddy(S, p, S.pkey[p], U0, 0)
        elif S.pstate[p] == P_PCP_CLEAN:
            S.pstate[p] = P_BUDDY_CLEAN


@numba.njit(cache=True)
def rmqueue_buddy(S, r):
    """§8.2.8 a block taken from buddy (F2), incl. the pcp refill."""
    pfn = r["pfn"]
    order = r["order"]
    if take_buddy(S, r, pfn, order, (r["flags"] & O.A_CAN_SD) != 0):
        for p in range(pfn, pfn + (np.int64(1) << order)):
            if S.pstate[p] != P_PCP_LUF:
                S.pstate[p] = P_PCP_CLEAN if (r["flags"] & O.A_REFILL) else P_TAKEN


@numba.njit(cache=True)
def drop_orphans(S, pfn, npg):
    """The trace's page left while the model kept it free: its obligation stays free, unlabelled."""
    for p in range(pfn, pfn + npg):
        if S.pstate[p] == P_PCP_LUF:
            orphan(p, S.OB, S.pobl)
            S.pstate[p] = P_NONE
            S.pkey[p] = 0


@numba.njit(cache=True)
def alloc_pages(S, r):
    """§8.2.8 alloc: pcp path (F1) / buddy path (F2), then the safety invariant. False on a violation."""
    luf = S.Y[Y_ALLOC_LUF] != 0
    cpu = r["cpu"]
    task = r["task"]
    ts = r["ts"]
    can_sd = (r["flags"] & O.A_CAN_SD) != 0
    pfn = r["pfn"]
    order = r["order"]
    npg = np.int64(1) << order
    mask = U0
    ugen = np.int64(0)
    pending_pcp = False
    pending_buddy = False
    fifo = luf and order == 0 and S.pstate[pfn] == P_PCP_LUF
    taken_ob = np.int64(-1)
    own = np.int64(-1)
    if fifo:  # v12: the pcp head is reached only after clean pages; the oldest keyed page comes first
        taken_ob, own = pcp_head(S, cpu, pfn)
        mask = S.KEY_mask[S.OB[taken_ob, OB_KEY]]
        ugen = S.KEY_ugen[S.OB[taken_ob, OB_KEY]]
        pending_pcp = True
    else:
        for p in range(pfn, pfn + npg):
            st = S.pstate[p]
            if st == P_PCP_LUF or (st == P_UNMAPPED and S.pkey[p] != 0):
                k = S.OB[S.pobl[p], OB_KEY] if (luf and st == P_PCP_LUF) else S.pkey[p]
                mask |= S.KEY_mask[k]
                if S.KEY_ugen[k] > ugen:
                    ugen = S.KEY_ugen[k]
                pending_pcp = True
            elif st == P_BUDDY_LUF:
                pending_buddy = True
    if r["flags"] & O.A_ATOMIC and (pending_pcp or pending_buddy):
        count(S, O.K_ATOMIC_ALLOCS_SKIPPING_LUF)
    taken = True
    if pending_pcp:
        res, n = luf_takeoff_check_and_fold(S, r, mask, ugen, can_sd, pfn)
        if res == 2:
            taken = False
        elif res == 1:
            other = 0
            if fifo:
                other = 1 if S.OB[taken_ob, OB_TASK] != task else 0
            else:
                for p in range(pfn, pfn + npg):
                    st = S.pstate[p]
                    if st == P_PCP_LUF or st == P_UNMAPPED:
                        t_un = S.OB[S.pobl[p], OB_TASK] if (luf and st == P_PCP_LUF) else S.punmap_task[p]
                        if t_un != task:
                            other += 1
            if other > 0 and n > 0:
                count(S, O.K_PAID_BY_OTHER_PAGES, other)
                count(S, O.K_PAID_BY_OTHER_FLUSHES)
    if taken and pending_buddy:
        taken = take_buddy(S, r, pfn, order, can_sd)
    if not taken:
        if luf:
            drop_orphans(S, pfn, npg)
        return True  # recorded: this block stays free and pending in the model; a clean page served the caller
    if not pending_pcp and not pending_buddy:
        count(S, O.K_ALLOC_CLEAN)
    if fifo:
        if taken_ob != own:
            count(S, O.K_FIFO_REORDERS)
        pcp_take(S, taken_ob, own, pfn)
        ok = ob_safety(S, taken_ob, pfn, ts)
        ob_release(taken_ob, S.OB, S.obfree, S.OBS)
        if not ok:
            return False
        S.pstate[pfn] = P_NONE
        S.pkey[pfn] = 0
        return True
    for p in range(pfn, pfn + npg):
        if S.pstate[p] == P_BUDDY_LUF:
            S.pstate[p] = P_BUDDY_CLEAN
        if luf and S.pstate[p] == P_PCP_LUF:  # a keyed page inside a larger block: its own obligation
            ob_own_back(S, p)
        if not safety(S, p, ts):
            return False
        S.pstate[p] = P_NONE
        S.pkey[p] = 0
    return True


@numba.njit(cache=True)
def hook_target(S, r, h):
    """luf_flush_mm / luf_flush_mapping (§4 F3–F10, F13): the CPUs a hook must flush (already dieted), and the
    ugen they must reach. F13 flushes the task's last key; F3/F7/F10 the mm batch; F3–F7 the mapping batch."""
    target_mask = U0
    ugen = np.int64(0)
    task = r["task"]
    if h == O.H_DIRTY_WB:
        k = S.task_key[task] if task >= 0 else 0
        if k != 0:
            target_mask = notdone(S.KEY_mask[k], S.KEY_ugen[k], S.done)
            ugen = S.KEY_ugen[k]
        return target_mask, ugen
    if hook_inert(S, h):
        return target_mask, ugen
    use_mm = h == O.H_FAULT or h == O.H_ZAP or h == O.H_CTXSW
    return luf_batch_target(S, r["mm"] if use_mm else -1, r["mapping"] if h != O.H_CTXSW else -1)


@numba.njit(cache=True)
def hook_inert(S, h):
    """§9.1 ``hooks=posted``: fold_luf_batch_mm never sets the mm/mapping batch's flush_required, so
    luf_flush_mm/luf_flush_mapping (F3–F8, F10) fold nothing and send no IPI (the caller's own tlb_ubc is empty
    here: the model's open batch is only filled at a batch's end). ``intended``: they flush the batch."""
    return S.Y[Y_HOOKS_POSTED] != 0 and h != O.H_DIRTY_WB


@numba.njit(cache=True)
def on_hook(S, r):
    """§8.2.9–13 hooks F3–F13: flush what the hook's batches still owe. True: nothing to flush."""
    h = r["sub"]
    target_mask, ugen = hook_target(S, r, h)
    if target_mask == U0:
        return True
    luf_flush(S, r, target_mask, ugen + 1, O.HOOK_CAUSE[h], r["pfn"])
    return False


class LufV12(Model):
    """LUF RFC v12 (default model)."""

    name = "luf-v12"
    policy = POL_V12
    uses = frozenset({"batches", "tasks", "buf", "obl"})

    def init_state(self) -> None:
        self.SC[G] = 2  # LUF_UGEN_INIT
        self.SC[Z_OPEN] = 1
        self.done[:] = 1  # LUF_UGEN_INIT - 1
        self.KEY_mask = np.zeros(NKEYS, np.uint64)
        self.KEY_ugen = np.zeros(NKEYS, np.int64)

    def extras(self) -> dict:
        return {
            "zone": {
                "open_epoch": int(self.SC[Z_OPEN]),
                "done_epoch": int(self.SC[Z_DONE]),
                "nr_luf_pages_at_end": int(self.SC[NR_LUF]),
            },
            "pcp_fifo_pages_at_end": int(self.obl.OBS[2]),
        }


__all__ = ["KCTR", "LufV12", "SafetyViolation"]
