"""Oracle: the lower bound. A pending flush is paid only when it is strictly needed, and only to CPUs that can
still hold the stale entry.

Strictly needed: a pending pfn is really re-allocated, a file whose pages are pending changes (F4/F5), a VMA of
an mm with pending work is zapped (F7), or a write fault lands in such an mm (F3). A CPU stops holding stale
entries at any full TLB flush it performs or receives (batched flushes, full remote flushes, task-switch
flushes), so those retire its debt for free. The non-eligible part of a batch is flushed at once, as in LUF.

"Really re-allocated" follows the allocation policy (option ``alloc_order``) so that the oracle stays a lower
bound of the LUF models under the same policy: with ``luf`` a recorded pcp allocation of a pending page hands
out the *oldest* pending page of that CPU (model/pcpfifo.py), a drain sends the newest to buddy, and while
``non_luf_ok`` buddy serves clean blocks first, so a pending page that reaches buddy is never handed out within
the trace. With ``recorded`` the pfns the kernel re-used are the ones that pay.
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
    notdone,
    popcount,
)
from lufreplay.model.pcpfifo import (
    FH_HEAD,
    FH_TAIL,
    OB_CPU,
    OB_UGEN,
    Obligations,
    fifo_push,
    fifo_unlink,
    ob_new,
    ob_release,
    orphan,
    relabel,
)
from lufreplay.model.state import Y_ALLOC_LUF, Y_LARGE_ELIG, Y_NON_LUF_OK, Y_UNEXPLAINED_FLUSH, LufBatches

G, CAN_LUF, CUR_PFN, CUR_ORDER, CUR_TS, NBUF = range(6)
LUF_MASK, NONLUF_MASK, FOLIO_RO = range(3)


@numba.njit(cache=True)
def _flush(ts, cpu, task, target, cause, op, SC, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask):
    SC[G] += 1
    n = account_flush(ts, cpu, task, target, cause, op, -1, acc, tl, dec, nlog)
    mark_done(target, SC[G], done)
    add_history(SC[G], ts, target, hist_g, hist_ts, hist_mask, nlog)
    return n


@numba.njit(cache=True)
def run_oracle(
    mops,
    nops,
    Y,
    SC,
    SU,
    done,
    MMB_mask,
    MMB_ugen,
    ASB_mask,
    ASB_ugen,
    buf,
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
    non_luf_ok = Y[Y_NON_LUF_OK] != 0
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
            m = r["mask"]
            if r["flags"] & O.PTE_WRITABLE:
                SC[CAN_LUF] = 0
            if SC[CAN_LUF] != 0:
                SU[FOLIO_RO] |= m
                if r["mm"] >= 0:  # fold_luf_batch_mm: a fresh ugen for each batch, as luf-v12
                    MMB_mask[r["mm"]] |= m
                    SC[G] += 1
                    MMB_ugen[r["mm"]] = SC[G]
                if r["mapping"] >= 0:
                    ASB_mask[r["mapping"]] |= m
                    SC[G] += 1
                    ASB_ugen[r["mapping"]] = SC[G]
            else:
                SU[NONLUF_MASK] |= m
        elif op == O.M_FOLIO_END:
            reason = folio_end_reason(r["sub"], r["aux"], large)
            if SC[CAN_LUF] != 0 and (reason == 0 or reason == O.J_KEPT_NOT_FREED):  # as luf-v12: KEEP settles it
                SU[LUF_MASK] |= SU[FOLIO_RO]
                if reason == 0 and SC[CUR_PFN] >= 0:
                    b = SC[NBUF]
                    buf[b, 0] = SC[CUR_PFN]
                    buf[b, 1] = SC[CUR_ORDER]
                    buf[b, 2] = SC[CUR_TS]
                    SC[NBUF] = b + 1
            else:
                SU[NONLUF_MASK] |= SU[FOLIO_RO]
        elif op == O.M_KEEP:
            SU[NONLUF_MASK] |= SU[LUF_MASK]
            SU[LUF_MASK] = U0
            SC[NBUF] = 0
        elif op == O.M_BATCH:
            R = r["mask"]
            if Y[Y_UNEXPLAINED_FLUSH] != 0:
                SU[NONLUF_MASK] |= R & ~(SU[LUF_MASK] | SU[NONLUF_MASK])
            d = SU[LUF_MASK] & ~SU[NONLUF_MASK]
            nl = SU[NONLUF_MASK]
            SC[G] += 1
            u = SC[G]
            if nl != U0:
                _flush(
                    ts, cpu, task, nl, O.C_BATCH_NONLUF, op, SC, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask
                )
            if d != U0:
                acc[O_MISC + O.K_DEFERRED_CPU_SLOTS] += popcount(d & ~bit(cpu))
                log_decision(ts, 1, O.C_BATCH, cpu, task, d, popcount(d & ~bit(cpu)), op, -1, dec, nlog)
                for b in range(SC[NBUF]):
                    pfn = buf[b, 0]
                    order = buf[b, 1]
                    for p in range(pfn, pfn + (np.int64(1) << order)):
                        if luf and pobl[p] >= 0:
                            orphan(p, OB, pobl)  # re-used without a recorded allocation: its debt stays free
                        sh_mask[p] |= d
                        sh_ugen[p] = max(sh_ugen[p], u)
                    add_request(buf[b, 2], u, d, np.int64(1) << order, req_ts, req_ugen, req_mask, req_pages, nlog)
            SC[NBUF] = 0
            SU[LUF_MASK] = U0
            SU[NONLUF_MASK] = U0
        elif op == O.M_RFLUSH:
            tg = r["mask"] | (bit(cpu) if (r["flags"] & 1) else U0)
            account_flush(ts, cpu, task, tg, r["sub"], op, -1, acc, tl, dec, nlog)
            if r["flags"] & 2:  # a full flush: those CPUs hold no stale entry any more
                SC[G] += 1
                mark_done(tg, SC[G], done)
                add_history(SC[G], ts, tg, hist_g, hist_ts, hist_mask, nlog)
        elif op == O.M_LFLUSH:
            SC[G] += 1
            mark_done(bit(cpu), SC[G], done)
            add_history(SC[G], ts, bit(cpu), hist_g, hist_ts, hist_mask, nlog)
        elif op == O.M_FREE and luf:
            pfn = r["pfn"]
            order = r["order"]
            for p in range(pfn, pfn + (np.int64(1) << order)):
                if pobl[p] >= 0:
                    orphan(p, OB, pobl)  # freed again without a recorded allocation
                if sh_mask[p] == U0:
                    continue
                if order == 0:  # tail placement: the debt waits in this CPU's FIFO
                    ob = ob_new(0, sh_mask[p], sh_ugen[p], task, p, OB, OBM, obfree, OBS)
                    fifo_push(ob, cpu, OB, FH)
                    pobl[p] = ob
                    sh_mask[p] = U0
                    sh_ugen[p] = 0
                elif non_luf_ok:  # buddy serves clean blocks first: this debt is never handed out
                    sh_mask[p] = U0
                    sh_ugen[p] = 0
        elif op == O.M_DRAIN and luf:
            pfn = r["pfn"]
            for p in range(pfn, pfn + (np.int64(1) << r["order"])):
                if pobl[p] >= 0:
                    own = np.int64(pobl[p])
                    z = FH[OB[own, OB_CPU], FH_TAIL]  # the newest pending page of that pcp goes to buddy
                    relabel(z, own, p, OB, pobl)
                    fifo_unlink(z, OB, FH)
                    if not non_luf_ok:
                        sh_mask[p] |= OBM[z]
                        sh_ugen[p] = max(sh_ugen[p], OB[z, OB_UGEN])
                    ob_release(z, OB, obfree, OBS)
        elif op == O.M_ALLOC or op == O.M_TAKE:
            pfn = r["pfn"]
            target = U0
            if luf and op == O.M_ALLOC and r["order"] == 0 and pobl[pfn] >= 0:
                own = np.int64(pobl[pfn])
                tk = FH[cpu, FH_HEAD] if FH[cpu, FH_HEAD] >= 0 else own  # the oldest pending page of this pcp
                target = notdone(OBM[tk], OB[tk, OB_UGEN], done)
                relabel(tk, own, pfn, OB, pobl)
                fifo_unlink(tk, OB, FH)
                ob_release(tk, OB, obfree, OBS)
            elif luf:
                for p in range(pfn, pfn + (np.int64(1) << r["order"])):
                    if pobl[p] >= 0:  # met outside the FIFO path: it pays its own debt
                        ob = np.int64(pobl[p])
                        sh_mask[p] |= OBM[ob]
                        sh_ugen[p] = max(sh_ugen[p], OB[ob, OB_UGEN])
                        fifo_unlink(ob, OB, FH)
                        ob_release(ob, OB, obfree, OBS)
                        pobl[p] = -1
            for p in range(pfn, pfn + (np.int64(1) << r["order"])):
                if sh_mask[p] != U0:
                    target |= notdone(sh_mask[p], sh_ugen[p], done)
                    sh_mask[p] = U0
                    sh_ugen[p] = 0
            if target != U0:
                _flush(ts, cpu, task, target, O.C_REALLOC, op, SC, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask)
                acc[O_MISC + O.K_ALLOC_WITH_FLUSH] += 1
            elif op == O.M_ALLOC:
                acc[O_MISC + O.K_ALLOC_CLEAN] += 1
        elif op == O.M_HOOK:
            h = r["sub"]
            acc[O_HOOK_CALLS + h] += 1
            target = U0
            if (h == O.H_FAULT and (r["flags"] & 1)) or h == O.H_ZAP:
                if r["mm"] >= 0:
                    target |= notdone(MMB_mask[r["mm"]], MMB_ugen[r["mm"]], done)
            if h == O.H_WRITE_BEGIN or h == O.H_TRUNCATE or h == O.H_ZAP:
                if r["mapping"] >= 0:
                    target |= notdone(ASB_mask[r["mapping"]], ASB_ugen[r["mapping"]], done)
            if target != U0:
                _flush(
                    ts, cpu, task, target, O.HOOK_CAUSE[h], op, SC, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask
                )
            else:
                acc[O_HOOK_NOIPI + h] += 1
    return -1


class Oracle(Model):
    """Lower bound."""

    name = "oracle"

    def init_state(self) -> None:
        self.SC = np.zeros(6, np.int64)
        self.SU = np.zeros(3, np.uint64)
        self.done = np.zeros(64, np.int64)
        self.batches = LufBatches()
        self.buf = np.zeros((0, 3), np.int64)
        self.obl = Obligations()

    def ensure(self, n_task: int, n_mm: int, n_map: int, n_ops: int) -> None:
        from lufreplay.model.state import grow

        self.batches.ensure(n_mm, n_map)
        self.buf = grow(self.buf, n_ops + 1)
        self.obl.ensure(self.pages.n, n_ops)

    def _run(self, mops: np.ndarray, n: int) -> int:
        pg, lg, ob, b = self.pages, self.logs, self.obl, self.batches
        return run_oracle(
            mops, n, self.Y, self.SC, self.SU, self.done, b.MMB_mask, b.MMB_ugen, b.ASB_mask, b.ASB_ugen,
            self.buf, pg.sh_mask, pg.sh_ugen, self.acc, self.tl, lg.dec, lg.nlog, lg.hist_g, lg.hist_ts,
            lg.hist_mask, lg.req_ts, lg.req_ugen, lg.req_mask, lg.req_pages, ob.OB, ob.OBM, ob.free, ob.FH, ob.OBS,
            ob.pobl,
        )  # fmt: skip
