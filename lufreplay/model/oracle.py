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

from lufreplay.model import kernels as K
from lufreplay.model import ops as O
from lufreplay.model import rmap
from lufreplay.model import rules as P
from lufreplay.model import state as S
from lufreplay.model.base import Model
from lufreplay.model.kernels import U0
from lufreplay.model.pcpfifo import OB_UGEN, ob_release, orphan
from lufreplay.model.rmap import flush, owe


@numba.njit(cache=True, nogil=True)
def run_oracle(
    mops, nops, Y, SC, SU, done, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen, buf, sh_mask, sh_ugen, acc, tl, dec, nlog,
    hist_g, hist_ts, hist_mask, req_ts, req_ugen, req_mask, req_pages, OB, OBM, obfree, FH, OBS, pobl,
):  # fmt: skip
    luf = Y[S.Y_ALLOC_LUF] != 0
    non_luf_ok = Y[S.Y_NON_LUF_OK] != 0
    large = Y[S.Y_LARGE_ELIG] != 0
    i = 0
    while i < nops:
        r = mops[i]
        op, ts, cpu, task = r["op"], r["ts"], r["cpu"], r["task"]
        if op <= O.M_FOLIO_END:  # as luf-v12: mm / mapping batches, a kept folio joins the LUF part (KEEP settles it)
            i = rmap.rmap_walk(
                mops, i, nops, large, True, True, False, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen
            )
            continue
        i += 1
        if op == O.M_KEEP:
            rmap.reclaim_keep_unbatched(SC, SU)
        elif op == O.M_BATCH:
            d, nl = rmap.batch_split(r["mask"], Y[S.Y_UNEXPLAINED_FLUSH] != 0, SU)
            SC[S.G] += 1
            u = SC[S.G]
            if nl != U0:
                flush(
                    ts, cpu, task, nl, O.C_BATCH_NONLUF, op, -1, SC, done, acc, tl, dec, nlog, hist_g, hist_ts,
                    hist_mask,
                )  # fmt: skip
            if d != U0:
                rmap.defer(ts, cpu, task, d, op, acc, dec, nlog)
                for b in range(SC[S.NBUF]):
                    pfn = buf[b, 0]
                    order = buf[b, 1]
                    for p in range(pfn, pfn + (np.int64(1) << order)):
                        if luf and pobl[p] >= 0:
                            orphan(p, OB, pobl)  # re-used without a recorded allocation: its debt stays free
                        owe(p, d, u, sh_mask, sh_ugen)
                    K.add_request(buf[b, 2], u, d, np.int64(1) << order, req_ts, req_ugen, req_mask, req_pages, nlog)
            SC[S.NBUF] = 0
            rmap.batch_done(SU)
        elif op == O.M_RFLUSH:
            tg = rmap.recorded_flush(ts, cpu, task, r["sub"], r["mask"], r["flags"], op, acc, tl, dec, nlog)
            if r["flags"] & 2:  # a full flush: those CPUs hold no stale entry any more
                rmap.retire(ts, tg, SC, done, hist_g, hist_ts, hist_mask, nlog)
        elif op == O.M_LFLUSH:
            rmap.retire(ts, K.bit(cpu), SC, done, hist_g, hist_ts, hist_mask, nlog)
        elif op == O.M_FREE and luf:
            pfn = r["pfn"]
            order = r["order"]
            for p in range(pfn, pfn + (np.int64(1) << order)):
                if pobl[p] >= 0:
                    orphan(p, OB, pobl)  # freed again without a recorded allocation
                if sh_mask[p] == U0:
                    continue
                if order == 0:  # tail placement: the debt waits in this CPU's FIFO
                    rmap.fifo_push_page(p, 0, task, cpu, OB, OBM, obfree, OBS, FH, pobl, sh_mask, sh_ugen)
                elif non_luf_ok:  # buddy serves clean blocks first: this debt is never handed out
                    sh_mask[p] = U0
                    sh_ugen[p] = 0
        elif op == O.M_DRAIN and luf:
            pfn = r["pfn"]
            for p in range(pfn, pfn + (np.int64(1) << r["order"])):
                if pobl[p] >= 0:
                    z = rmap.fifo_drain(p, False, OB, FH, pobl, acc)  # the newest pending page goes to buddy
                    if not non_luf_ok:
                        owe(p, OBM[z], OB[z, OB_UGEN], sh_mask, sh_ugen)
                    ob_release(z, OB, obfree, OBS)
        elif op == O.M_ALLOC or op == O.M_TAKE:
            pfn = r["pfn"]
            target = U0
            if luf and op == O.M_ALLOC and r["order"] == 0 and pobl[pfn] >= 0:
                own = np.int64(pobl[pfn])
                tk = rmap.fifo_head(cpu, own, FH)  # the oldest pending page of this pcp
                target = K.notdone(OBM[tk], OB[tk, OB_UGEN], done)
                rmap.fifo_take(tk, own, pfn, False, OB, FH, pobl, acc)
                ob_release(tk, OB, obfree, OBS)
            elif luf:
                for p in range(pfn, pfn + (np.int64(1) << r["order"])):
                    if pobl[p] >= 0:  # met outside the FIFO path: it pays its own debt
                        rmap.ob_back(p, OB, OBM, obfree, FH, OBS, pobl, sh_mask, sh_ugen)
            for p in range(pfn, pfn + (np.int64(1) << r["order"])):
                if sh_mask[p] != U0:
                    target |= K.notdone(sh_mask[p], sh_ugen[p], done)
                    sh_mask[p] = U0
                    sh_ugen[p] = 0
            if target != U0:
                flush(
                    ts, cpu, task, target, O.C_REALLOC, op, -1, SC, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask
                )
                acc[K.O_MISC + O.K_ALLOC_WITH_FLUSH] += 1
            elif op == O.M_ALLOC:
                acc[K.O_MISC + O.K_ALLOC_CLEAN] += 1
        elif op == O.M_HOOK:
            h = r["sub"]
            scope = P.hook_scope(h, (r["flags"] & 1) != 0, P.ORACLE, False)
            target, _ = P.batch_target(scope, r["mm"], r["mapping"], MMB_mask, MMB_ugen, ASB_mask, ASB_ugen, done)
            rmap.count_hook(h, target != U0, acc)
            if target != U0:
                flush(
                    ts, cpu, task, target, O.HOOK_CAUSE[h], op, -1, SC, done, acc, tl, dec, nlog, hist_g, hist_ts,
                    hist_mask,
                )  # fmt: skip
    return -1


class Oracle(Model):
    """Lower bound."""

    name = "oracle"
    uses = S.USE_BATCHES | S.USE_FIFO | S.USE_BUF

    def _run(self, mops: np.ndarray, n: int) -> int:
        args = (*self.st.head(), self.st.buf, self.pages.sh_mask, self.pages.sh_ugen, self.acc, self.tl)
        return run_oracle(mops, n, self.Y, *args, *self.logs.args(), *self.st.obl.args())
