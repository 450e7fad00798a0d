"""LUF v10/v11 (luf-model.md §2.6): one global pending batch and a generation counter.

At the end of a batch the deferred CPUs join the global mask and the freed pages carry the new generation.
Allocating such a page while ``luf_gen_done`` has not passed its generation flushes the *whole* global batch.
v11's hooks: file writes (file_end_write → F4 here) and faults that make a PTE writable (write faults, F3),
plus the reclaim paths F11–F13 as in v12. No per-CPU done tracking: normal flushes retire nothing.

``alloc_order=luf`` applies v12's pcp tail placement here too [I: the v11 postings do not say]: a recorded pcp
allocation of a pending page takes the oldest pending page of that CPU (model/pcpfifo.py), so it flushes the global
batch only when *that* page's generation is not done yet. v11 has no pend_list, so buddy keeps pfn identities.
"""

from __future__ import annotations

import numba
import numpy as np

from lufreplay.model import ops as O
from lufreplay.model.base import Model
from lufreplay.model.kernels import (
    O_HOOK_CALLS,
    O_HOOK_NOIPI,
    O_MISC,
    U0,
    account_flush,
    add_history,
    add_request,
    bit,
    folio_begin_ok,
    folio_end_reason,
    log_decision,
    mark_done,
    popcount,
)
from lufreplay.model.luf_v12 import _ob_safety, _safety
from lufreplay.model.pcpfifo import (
    FH_HEAD,
    FH_TAIL,
    OB_CPU,
    OB_KEY,
    OB_UGEN,
    Obligations,
    fifo_push,
    fifo_unlink,
    ob_new,
    ob_release,
    orphan,
    relabel,
)
from lufreplay.model.state import (
    P_BUDDY_CLEAN,
    P_BUDDY_LUF,
    P_NONE,
    P_PCP_CLEAN,
    P_PCP_LUF,
    P_TAKEN,
    P_UNMAPPED,
    Y_ALLOC_LUF,
    Y_LARGE_ELIG,
    Y_UNEXPLAINED_FLUSH,
    Y_V11_ATOMIC,
)

GEN, GEN_DONE, CAN_LUF, CUR_PFN, CUR_ORDER, CUR_TS, NBUF = range(7)
GMASK, LUF_MASK, NONLUF_MASK, FOLIO_RO = range(4)


@numba.njit(cache=True)
def _global_flush(ts, cpu, task, cause, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask):
    """check_luf_flush: flush the whole global batch unless luf_gen_done already passed it."""
    if SC[GEN_DONE] >= SC[GEN]:
        return 0
    m = SU[GMASK]
    n = account_flush(ts, cpu, task, m, cause, op, -1, acc, tl, dec, nlog)
    SC[GEN_DONE] = SC[GEN]
    mark_done(m, SC[GEN], done)
    add_history(SC[GEN], ts, m, hist_g, hist_ts, hist_mask, nlog)
    SU[GMASK] = U0
    return n


@numba.njit(cache=True)
def _own_back(p, OB, OBM, obfree, FH, OBS, pobl, pstamp, sh_mask, sh_ugen):
    """A pending pcp page met outside the FIFO path (block of order > 0, buddy take): it carries its own
    obligation again, as with alloc_order=recorded."""
    ob = np.int64(pobl[p])
    pstamp[p] = OB[ob, OB_KEY]
    sh_mask[p] |= OBM[ob]
    if OB[ob, OB_UGEN] > sh_ugen[p]:
        sh_ugen[p] = OB[ob, OB_UGEN]
    fifo_unlink(ob, OB, FH)
    ob_release(ob, OB, obfree, OBS)
    pobl[p] = -1


@numba.njit(cache=True)
def run_luf_v11(
    mops,
    nops,
    Y,
    SC,
    SU,
    done,
    task_anon,
    buf,
    pstate,
    pkey,
    pstamp,
    sh_mask,
    sh_ugen,
    acc,
    tl,
    dec,
    nlog,
    hist_g,
    hist_ts,
    hist_mask,
    req_ts,
    req_ugen,
    req_mask,
    req_pages,
    OB,
    OBM,
    obfree,
    FH,
    OBS,
    pobl,
):
    luf = Y[Y_ALLOC_LUF] != 0
    large = Y[Y_LARGE_ELIG] != 0
    for i in range(nops):
        r = mops[i]
        op = r["op"]
        ts = r["ts"]
        cpu = r["cpu"]
        task = r["task"]
        if op == O.M_FOLIO_BEGIN:
            SC[CAN_LUF] = 1 if folio_begin_ok(r["sub"], large) else 0
            SU[FOLIO_RO] = U0
            SC[CUR_PFN] = r["pfn"]
            SC[CUR_ORDER] = r["order"]
            SC[CUR_TS] = ts
        elif op == O.M_PTE:
            if r["flags"] & O.PTE_UNBATCHED:
                continue
            if r["flags"] & O.PTE_WRITABLE:
                SC[CAN_LUF] = 0
            if SC[CAN_LUF] != 0:
                SU[FOLIO_RO] |= r["mask"]
            else:
                SU[NONLUF_MASK] |= r["mask"]
        elif op == O.M_FOLIO_END:
            if SC[CAN_LUF] != 0 and folio_end_reason(r["sub"], r["aux"], large) == 0:
                SU[LUF_MASK] |= SU[FOLIO_RO]
                if SC[CUR_PFN] >= 0:
                    b = SC[NBUF]
                    buf[b, 0] = SC[CUR_PFN]
                    buf[b, 1] = SC[CUR_ORDER]
                    buf[b, 2] = SC[CUR_TS]
                    SC[NBUF] = b + 1
            else:
                SU[NONLUF_MASK] |= SU[FOLIO_RO]
        elif op == O.M_KEEP:  # kept folio: everything accumulated is flushed with the batch
            SU[NONLUF_MASK] |= SU[LUF_MASK]
            SU[LUF_MASK] = U0
            SC[NBUF] = 0
        elif op == O.M_BATCH:
            R = r["mask"]
            if Y[Y_UNEXPLAINED_FLUSH] != 0:
                SU[NONLUF_MASK] |= R & ~(SU[LUF_MASK] | SU[NONLUF_MASK])
            d = SU[LUF_MASK] & ~SU[NONLUF_MASK]
            nl = SU[NONLUF_MASK]
            if nl != U0:
                account_flush(ts, cpu, task, nl, O.C_BATCH_NONLUF, op, -1, acc, tl, dec, nlog)
            g = np.int64(0)
            if d != U0:
                SC[GEN] += 1
                g = SC[GEN]
                SU[GMASK] |= d
                acc[O_MISC + O.K_DEFERRED_CPU_SLOTS] += popcount(d & ~bit(cpu))
                log_decision(ts, 1, O.C_BATCH, cpu, task, d, popcount(d & ~bit(cpu)), op, -1, dec, nlog)
            for b in range(SC[NBUF]):  # pages still pending in the model: re-used without a recorded allocation
                for p in range(buf[b, 0], buf[b, 0] + (np.int64(1) << buf[b, 1])):
                    st = pstate[p]
                    if st == P_PCP_LUF or st == P_BUDDY_LUF or (st == P_UNMAPPED and pkey[p] != 0):
                        acc[O_MISC + O.K_UNSEEN_REUSES] += 1
                        if luf and st == P_PCP_LUF:
                            orphan(p, OB, pobl)
                        elif pstamp[p] > SC[GEN_DONE]:
                            _global_flush(
                                ts, cpu, task, O.C_ALLOC_BUDDY_EPOCH if st == P_BUDDY_LUF else O.C_ALLOC_PCP, op, SC,
                                SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask,
                            )  # fmt: skip
                        sh_mask[p] = U0
                        sh_ugen[p] = 0
            for b in range(SC[NBUF]):
                pfn = buf[b, 0]
                order = buf[b, 1]
                for p in range(pfn, pfn + (np.int64(1) << order)):
                    pstate[p] = P_UNMAPPED
                    pkey[p] = 1 if g != 0 else 0
                    pstamp[p] = g
                    if g != 0:
                        sh_mask[p] |= d
                        sh_ugen[p] = max(sh_ugen[p], g)
                if g != 0:
                    add_request(buf[b, 2], g, d, np.int64(1) << order, req_ts, req_ugen, req_mask, req_pages, nlog)
            SC[NBUF] = 0
            if task >= 0:
                task_anon[task] = g if (r["flags"] & O.B_ANON_UNKNOWN_PFN) else 0
            if (r["flags"] & O.B_MEMFAIL) and g != 0:
                _global_flush(
                    ts, cpu, task, O.C_MEMFAIL, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask
                )
            SU[LUF_MASK] = U0
            SU[NONLUF_MASK] = U0
        elif op == O.M_RFLUSH:
            tg = r["mask"] | (bit(cpu) if (r["flags"] & 1) else U0)
            account_flush(ts, cpu, task, tg, r["sub"], op, -1, acc, tl, dec, nlog)
        elif op == O.M_FREE:
            pfn = r["pfn"]
            order = r["order"]
            for p in range(pfn, pfn + (np.int64(1) << order)):
                if luf and pstate[p] == P_PCP_LUF:
                    acc[O_MISC + O.K_UNSEEN_REUSES] += 1  # freed again with no recorded allocation
                    orphan(p, OB, pobl)
                    pstate[p] = P_NONE
                elif luf and pstate[p] == P_BUDDY_LUF:
                    # v11 has no pend_list: a buddy page keeps its pfn and its debt, so the missed allocation pays
                    acc[O_MISC + O.K_UNSEEN_REUSES] += 1
                    if pstamp[p] > SC[GEN_DONE]:
                        _global_flush(
                            ts, cpu, task, O.C_ALLOC_BUDDY_EPOCH, op, SC, SU, done, acc, tl, dec, nlog, hist_g,
                            hist_ts, hist_mask,
                        )  # fmt: skip
                    sh_mask[p] = U0
                    sh_ugen[p] = 0
                    pstate[p] = P_NONE
                g = 0
                if pstate[p] == P_UNMAPPED and pkey[p] != 0:
                    g = pstamp[p]
                elif (
                    r["sub"] == 3
                    and task >= 0
                    and task_anon[task] != 0
                    and pstate[p] != P_PCP_LUF
                    and pstate[p] != P_BUDDY_LUF
                ):
                    g = task_anon[task]
                    sh_mask[p] |= SU[GMASK]
                    sh_ugen[p] = max(sh_ugen[p], g)
                if g != 0:
                    acc[O_MISC + O.K_LUF_PAGES_FREED] += 1
                    pstate[p] = P_PCP_LUF if order == 0 else P_BUDDY_LUF
                    pstamp[p] = g
                    if luf and order == 0:  # tail placement: the page's obligation joins this CPU's FIFO
                        ob = ob_new(g, sh_mask[p], sh_ugen[p], 0, p, OB, OBM, obfree, OBS)
                        fifo_push(ob, cpu, OB, FH)
                        pobl[p] = ob
                        sh_mask[p] = U0
                        sh_ugen[p] = 0
                elif pstate[p] != P_PCP_LUF and pstate[p] != P_BUDDY_LUF:
                    pstate[p] = P_PCP_CLEAN if order == 0 else P_BUDDY_CLEAN
        elif op == O.M_DRAIN:
            pfn = r["pfn"]
            for p in range(pfn, pfn + (np.int64(1) << r["order"])):
                if pstate[p] == P_PCP_LUF and luf:  # the newest pending page of that pcp goes to buddy
                    own = np.int64(pobl[p])
                    z = FH[OB[own, OB_CPU], FH_TAIL]
                    if z != own:
                        acc[O_MISC + O.K_FIFO_REORDERS] += 1
                    relabel(z, own, p, OB, pobl)
                    fifo_unlink(z, OB, FH)
                    pstamp[p] = OB[z, OB_KEY]
                    sh_mask[p] |= OBM[z]
                    if OB[z, OB_UGEN] > sh_ugen[p]:
                        sh_ugen[p] = OB[z, OB_UGEN]
                    ob_release(z, OB, obfree, OBS)
                    pstate[p] = P_BUDDY_LUF
                elif pstate[p] == P_PCP_LUF:
                    pstate[p] = P_BUDDY_LUF
                elif pstate[p] == P_PCP_CLEAN:
                    pstate[p] = P_BUDDY_CLEAN
        elif op == O.M_TAKE or op == O.M_ALLOC:
            pfn = r["pfn"]
            order = r["order"]
            npg = np.int64(1) << order
            need = False
            pcp = False
            can = (r["flags"] & 1) != 0 or Y[Y_V11_ATOMIC] != 0
            if luf and op == O.M_ALLOC and order == 0 and pstate[pfn] == P_PCP_LUF:
                own = np.int64(pobl[pfn])
                tk = FH[cpu, FH_HEAD] if FH[cpu, FH_HEAD] >= 0 else own  # the oldest pending page of this pcp
                if OB[tk, OB_KEY] > SC[GEN_DONE]:
                    if not can:
                        acc[O_MISC + O.K_PCP_SKIPS] += 1
                        orphan(pfn, OB, pobl)  # the trace's page left; the obligation stays free
                        pstate[pfn] = P_NONE
                        pkey[pfn] = 0
                        continue
                    _global_flush(
                        ts, cpu, task, O.C_ALLOC_PCP, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask
                    )
                    acc[O_MISC + O.K_ALLOC_WITH_FLUSH] += 1
                    acc[O_MISC + O.K_PAID_IN_ALLOC_FLUSHES] += 1
                else:
                    acc[O_MISC + O.K_ALLOC_CLEAN] += 1
                if tk != own:
                    acc[O_MISC + O.K_FIFO_REORDERS] += 1
                relabel(tk, own, pfn, OB, pobl)
                fifo_unlink(tk, OB, FH)
                ok = _ob_safety(tk, pfn, ts, done, OB, OBM, acc)
                ob_release(tk, OB, obfree, OBS)
                if not ok:
                    return i
                pstate[pfn] = P_NONE
                pkey[pfn] = 0
                continue
            if luf:
                for p in range(pfn, pfn + npg):
                    if pstate[p] == P_PCP_LUF:
                        _own_back(p, OB, OBM, obfree, FH, OBS, pobl, pstamp, sh_mask, sh_ugen)
            for p in range(pfn, pfn + npg):
                st = pstate[p]
                if (st == P_PCP_LUF or st == P_BUDDY_LUF or (st == P_UNMAPPED and pkey[p] != 0)) and pstamp[p] > SC[
                    GEN_DONE
                ]:
                    need = True
                    pcp = pcp or st != P_BUDDY_LUF
            if need:
                if not can:
                    acc[O_MISC + O.K_PCP_SKIPS if pcp else O_MISC + O.K_BUDDY_REFUSALS] += 1
                    continue
                _global_flush(
                    ts,
                    cpu,
                    task,
                    O.C_ALLOC_PCP if pcp else O.C_ALLOC_BUDDY_EPOCH,
                    op,
                    SC,
                    SU,
                    done,
                    acc,
                    tl,
                    dec,
                    nlog,
                    hist_g,
                    hist_ts,
                    hist_mask,
                )
                acc[O_MISC + O.K_ALLOC_WITH_FLUSH] += 1
                acc[O_MISC + O.K_PAID_IN_ALLOC_FLUSHES] += 1
            elif op == O.M_ALLOC:
                acc[O_MISC + O.K_ALLOC_CLEAN] += 1
            for p in range(pfn, pfn + npg):
                if op == O.M_TAKE:
                    pstate[p] = P_PCP_CLEAN if (r["flags"] & O.A_REFILL) else P_TAKEN
                else:
                    if not _safety(p, ts, done, sh_mask, sh_ugen, acc):
                        return i
                    pstate[p] = P_NONE
                    pkey[p] = 0
        elif op == O.M_HOOK:
            h = r["sub"]
            acc[O_HOOK_CALLS + h] += 1
            fires = h == O.H_WRITE_BEGIN or h == O.H_DIRTY_WB or (h == O.H_FAULT and (r["flags"] & 1))
            n = 0
            if fires and SC[GEN_DONE] < SC[GEN]:
                n = _global_flush(
                    ts, cpu, task, O.HOOK_CAUSE[h], op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask
                )
            if n == 0:
                acc[O_HOOK_NOIPI + h] += 1
    return -1


class LufV11(Model):
    """LUF v11: single global pending batch."""

    name = "luf-v11"

    def init_state(self) -> None:
        self.SC = np.zeros(7, np.int64)
        self.SU = np.zeros(4, np.uint64)
        self.done = np.zeros(64, np.int64)
        self.task_anon = np.zeros(0, np.int64)
        self.buf = np.zeros((0, 3), np.int64)
        self.obl = Obligations()

    def ensure(self, n_task: int, n_mm: int, n_map: int, n_ops: int) -> None:
        from lufreplay.model.state import grow

        self.task_anon = grow(self.task_anon, n_task)
        self.buf = grow(self.buf, n_ops + 1)
        self.obl.ensure(self.pages.n, n_ops)

    def _run(self, mops: np.ndarray, n: int) -> int:
        pg, lg, ob = self.pages, self.logs, self.obl
        return run_luf_v11(
            mops, n, self.Y, self.SC, self.SU, self.done, self.task_anon, self.buf, pg.state, pg.key, pg.stamp,
            pg.sh_mask, pg.sh_ugen, self.acc, self.tl, lg.dec, lg.nlog, lg.hist_g, lg.hist_ts, lg.hist_mask,
            lg.req_ts, lg.req_ugen, lg.req_mask, lg.req_pages, ob.OB, ob.OBM, ob.free, ob.FH, ob.OBS, ob.pobl,
        )  # fmt: skip
