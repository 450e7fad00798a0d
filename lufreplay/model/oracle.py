"""Oracle: a lower bound on the remote IPIs of any safe scheme that defers the same work and flushes where LUF
can, with the kernel's own batching.

The bound (docs/simulate.md, "The oracle"): each CPU owes a flush for the stale entries a deferred batch left on
it, due at the first point where one could be used: the pending page is really handed out again (a takeoff that
can shoot down), a file whose pages are pending changes (F4/F5), a VMA of an mm with pending work is zapped (F7),
or a write fault lands in such an mm (F3). One flush of a CPU retires everything it owes (done[] takes a fresh
ugen, as a LUF flush or a takeoff of many keyed pages folded into one flush does), so paying each CPU at its
first due point, and only then, is the fewest flushes per CPU (interval stabbing): a whole takeoff (pcp refill,
bulk allocation) costs at most one IPI per CPU, like v12's one flush per takeoff. No IPI is counted where none
is needed: a CPU lazy at any LUF point after its debt began (or skipped by the batch's own recorded flush) owes
nothing more (a flush sent then skips it and marks it done, §9.7, and it reloads its TLB when it returns: the
unmap bumped the mm's tlb_gen), a CPU that runs a LUF point itself (batch end, takeoff, hook) flushes its own TLB
there (option ``oracle_local_flushes``), a full TLB flush it performs or receives
(batched flushes, full remote flushes, task-switch flushes) retires its debt for free, and a context that cannot
shoot down is served a clean page (the pending one stays free, as in luf-v12). The non-eligible part of a batch
is flushed at once, as in LUF.

It bounds *safe* schemes only: luf-v12 as posted (hooks inert, §9.1) skips the F3-F7 flushes, leaving stale
entries, and goes below it (guest4-mixed). "Really handed out" follows the allocation policy (option
``alloc_order``): with ``luf`` a recorded pcp allocation of a pending page hands out the *oldest* pending page of
that CPU (model/pcpfifo.py), a drain sends the newest to buddy, a buddy takeoff leaves the pages still queued on
a pcp list where they are, and while ``non_luf_ok`` buddy serves clean blocks first, so a pending page that
reaches buddy is never handed out within the trace. With ``recorded`` the pfns the kernel re-used are the ones
that pay.
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

# as luf-v12: mm / mapping batches; a kept folio joins the LUF part (its KEEP op settles it)
WALK = rmap.W_FOLD | rmap.W_KEPT_JOINS


@numba.njit(cache=True, nogil=True, _nrt=False)
def run_oracle(
    mops, nops, Y, SC, SU, done, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen, buf, sh_mask, sh_ugen, acc, tl, dec, nlog,
    hist_g, hist_ts, hist_mask, req_ts, req_ugen, req_mask, req_pages, OB, OBM, obfree, FH, OBS, pobl, owed,
):  # fmt: skip
    luf = Y[S.Y_ALLOC_LUF] != 0
    non_luf_ok = Y[S.Y_NON_LUF_OK] != 0
    lazy_flush = Y[S.Y_LAZY_AT_FLUSH] != 0
    local = Y[S.Y_ORACLE_LOCAL] != 0
    i = rmap.next_op(mops, 0, nops, Y, WALK, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen)
    while i < nops:
        r = mops[i]
        op, ts, cpu, task = r["op"], r["ts"], r["cpu"], r["task"]
        skipped = U0
        if op == O.M_KEEP:
            rmap.reclaim_keep_unbatched(SC, SU)
        elif op == O.M_BATCH:
            d, nl = rmap.batch_split(K.opm(r["mask"]), Y[S.Y_UNEXPLAINED_FLUSH] != 0, SU)
            skipped = (d | nl) & ~(K.opm(r["mask"]) | K.bit(cpu))  # what the trace says the batch's flush skipped
            SC[S.G] += 1
            u = SC[S.G]
            if nl != U0:
                flush(
                    ts, cpu, task, nl, O.C_BATCH_NONLUF, op, -1, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts,
                    hist_mask,
                )  # fmt: skip
            if d != U0:
                rmap.defer(ts, cpu, task, d, op, acc, dec, nlog)
                K.mark_done(d, u, owed)
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
            tg = rmap.recorded_flush(ts, cpu, task, r["sub"], K.opm(r["mask"]), r["flags"], op, acc, tl, dec, nlog)
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
            if (r["flags"] & O.A_CAN_SD) == 0 and _pending_remote(
                r, cpu, luf, done, FH, OB, OBM, pobl, sh_mask, sh_ugen
            ):
                # a context that cannot shoot down does not get a pending page: a clean one serves it, this one
                # stays free (as luf-v12's skip / refusal; what it owes is never due within the trace)
                for p in range(pfn, pfn + (np.int64(1) << r["order"])):
                    if luf and op == O.M_ALLOC and pobl[p] >= 0:
                        orphan(p, OB, pobl)  # its obligation stays queued, unlabelled
                    sh_mask[p] = U0
                    sh_ugen[p] = 0
            elif luf and op == O.M_ALLOC and r["order"] == 0 and pobl[pfn] >= 0:
                own = np.int64(pobl[pfn])
                tk = rmap.fifo_head(cpu, own, FH)  # the oldest pending page of this pcp
                target = K.notdone(OBM[tk], OB[tk, OB_UGEN], done)
                rmap.fifo_take(tk, own, pfn, False, OB, FH, pobl, acc)
                ob_release(tk, OB, obfree, OBS)
            elif luf and op == O.M_ALLOC:
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
                    ts, cpu, task, target, O.C_REALLOC, op, -1, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts,
                    hist_mask,
                )  # fmt: skip
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
                    ts, cpu, task, target, O.HOOK_CAUSE[h], op, -1, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts,
                    hist_mask,
                )  # fmt: skip
        # flushes no scheme pays an IPI for: this CPU, running a LUF point (batch end, F11, takeoff, hook, reclaim
        # start), flushes its own TLB there; a CPU lazy now (at a batch end: one its flush skipped) is skipped and
        # marked done by any flush sent now (it reloads its TLB when it switches back: the unmap bumped tlb_gen)
        free = U0
        if local and (op == O.M_BATCH or K.carries_lazy(op)) and op != O.M_FREE:
            free = K.bit(cpu)
        if lazy_flush and K.carries_lazy(op):
            free |= K.opm(r["mask2"])
        elif lazy_flush and op == O.M_BATCH:
            free |= skipped
        free = K.owing(free, done, owed)
        if free != U0:
            rmap.retire(ts, free, SC, done, hist_g, hist_ts, hist_mask, nlog)
        i = rmap.next_op(mops, i + 1, nops, Y, WALK, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen)
    return -1


@numba.njit(cache=True, _nrt=False)
def _pending_remote(r, cpu, luf, done, FH, OB, OBM, pobl, sh_mask, sh_ugen):
    """Whether handing out the block of ALLOC/TAKE ``r`` needs an IPI: what it owes (for an order-0 pcp
    allocation under alloc_order=luf, the oldest pending page of the CPU's list) on a CPU other than ``cpu``."""
    pfn = r["pfn"]
    m = U0
    if luf and r["op"] == O.M_ALLOC and r["order"] == 0 and pobl[pfn] >= 0:
        tk = rmap.fifo_head(cpu, np.int64(pobl[pfn]), FH)
        m = K.notdone(OBM[tk], OB[tk, OB_UGEN], done)
    else:
        for p in range(pfn, pfn + (np.int64(1) << r["order"])):
            if luf and r["op"] == O.M_ALLOC and pobl[p] >= 0:
                m |= K.notdone(OBM[pobl[p]], OB[pobl[p], OB_UGEN], done)
            if sh_mask[p] != U0:
                m |= K.notdone(sh_mask[p], sh_ugen[p], done)
    return (m & ~K.bit(cpu)) != U0


class Oracle(Model):
    """Lower bound."""

    name = "oracle"
    uses = S.USE_BATCHES | S.USE_FIFO | S.USE_BUF

    def _run(self, mops: np.ndarray, n: int) -> int:
        args = (*self.st.head(), self.st.buf, self.pages.sh_mask, self.pages.sh_ugen, self.acc, self.tl)
        return self.core(run_oracle)(mops, n, self.Y, *args, *self.logs.args(), *self.st.obl.args(), self.owed)

    def init_state(self) -> None:
        self.owed = np.zeros(self.st.done.shape[0], np.int64)  # per CPU: the newest ugen it owes
