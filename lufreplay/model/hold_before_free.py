"""Hold-before-free (the talk's first approach, migrc): LUF'd folios are kept out of the allocator until flushed.

No stale entry can ever reach a new owner, so allocations never flush; the price is memory: the held pages.
Held pages are released by one flush of everything held when the hold limit is reached, when reclaim starts
(memory is needed), when the trace shows a held pfn being reused (the real kernel would have had to release it
first), and at the hooks that change what a stale entry would see (write faults F3, F4, F5, F7).
Held pages never enter pcp or buddy, so the allocation-order option (``alloc_order``) does not apply here.
"""

from __future__ import annotations

import numba
import numpy as np

from lufreplay.model import ops as O
from lufreplay.model.base import Model
from lufreplay.model.kernels import (
    O_HELD_TL,
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
    timeline_bin,
)
from lufreplay.model.luf_v12 import _safety
from lufreplay.model.state import P_HELD, P_NONE, Y_HBF_MAX, Y_HBF_RECLAIM, Y_LARGE_ELIG, Y_UNEXPLAINED_FLUSH

HGEN, HGEN_DONE, CAN_LUF, CUR_PFN, CUR_ORDER, CUR_TS, NBUF, HELD = range(8)
HMASK, LUF_MASK, NONLUF_MASK, FOLIO_RO = range(4)


@numba.njit(cache=True)
def _release(ts, cpu, task, cause, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask):
    """Flush everything held and give the held pages back to the allocator."""
    if SC[HGEN_DONE] >= SC[HGEN]:
        return 0
    m = SU[HMASK]
    n = account_flush(ts, cpu, task, m, cause, op, -1, acc, tl, dec, nlog)
    SC[HGEN_DONE] = SC[HGEN]
    mark_done(m, SC[HGEN], done)
    add_history(SC[HGEN], ts, m, hist_g, hist_ts, hist_mask, nlog)
    SU[HMASK] = U0
    SC[HELD] = 0
    acc[O_MISC + O.K_HELD_PAGES_NOW] = 0
    return n


@numba.njit(cache=True)
def run_hbf(
    mops,
    nops,
    Y,
    SC,
    SU,
    done,
    buf,
    pstate,
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
):
    max_held = np.int64(Y[Y_HBF_MAX])
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
            # only folios whose pfn is known can be held; anon folios seen without a pfn flush normally
            if SC[CAN_LUF] != 0 and folio_end_reason(r["sub"], r["aux"], large) == 0 and SC[CUR_PFN] >= 0:
                SU[LUF_MASK] |= SU[FOLIO_RO]
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
            for b in range(SC[NBUF]):  # a pfn unmapped again: its old debt is settled, or it was re-used held
                for p in range(buf[b, 0], buf[b, 0] + (np.int64(1) << buf[b, 1])):
                    if sh_mask[p] == U0:
                        continue
                    if pstate[p] == P_HELD and pstamp[p] > SC[HGEN_DONE]:
                        acc[O_MISC + O.K_UNSEEN_REUSES] += 1
                        _release(
                            ts, cpu, task, O.C_HOLD_RELEASE, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts,
                            hist_mask,
                        )  # fmt: skip
                    if notdone(sh_mask[p], sh_ugen[p], done) == U0:
                        sh_mask[p] = U0
                        sh_ugen[p] = 0
            d = SU[LUF_MASK] & ~SU[NONLUF_MASK]
            nl = SU[NONLUF_MASK]
            if nl != U0:
                account_flush(ts, cpu, task, nl, O.C_BATCH_NONLUF, op, -1, acc, tl, dec, nlog)
            if d != U0:
                SC[HGEN] += 1
                g = SC[HGEN]
                SU[HMASK] |= d
                acc[O_MISC + O.K_DEFERRED_CPU_SLOTS] += popcount(d & ~bit(cpu))
                log_decision(ts, 1, O.C_BATCH, cpu, task, d, popcount(d & ~bit(cpu)), op, -1, dec, nlog)
                for b in range(SC[NBUF]):
                    pfn = buf[b, 0]
                    order = buf[b, 1]
                    for p in range(pfn, pfn + (np.int64(1) << order)):
                        pstate[p] = P_HELD
                        pstamp[p] = g
                        sh_mask[p] |= d
                        sh_ugen[p] = max(sh_ugen[p], g)
                        SC[HELD] += 1
                    add_request(buf[b, 2], g, d, np.int64(1) << order, req_ts, req_ugen, req_mask, req_pages, nlog)
                acc[O_MISC + O.K_HELD_PAGES_NOW] = SC[HELD]
                if SC[HELD] > acc[O_MISC + O.K_HELD_PAGES_MAX]:
                    acc[O_MISC + O.K_HELD_PAGES_MAX] = SC[HELD]
                if SC[HELD] >= max_held:
                    _release(
                        ts,
                        cpu,
                        task,
                        O.C_HOLD_RELEASE,
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
            SC[NBUF] = 0
            SU[LUF_MASK] = U0
            SU[NONLUF_MASK] = U0
        elif op == O.M_RFLUSH:
            tg = r["mask"] | (bit(cpu) if (r["flags"] & 1) else U0)
            account_flush(ts, cpu, task, tg, r["sub"], op, -1, acc, tl, dec, nlog)
        elif op == O.M_RECLAIM_BEGIN:
            if Y[Y_HBF_RECLAIM] != 0 and SC[HELD] > 0:
                _release(
                    ts, cpu, task, O.C_HOLD_RELEASE, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask
                )
        elif op == O.M_FREE or op == O.M_DRAIN:
            pass  # a held page stays held whatever the trace does with it; other pages need nothing
        elif op == O.M_TAKE or op == O.M_ALLOC:
            pfn = r["pfn"]
            npg = np.int64(1) << r["order"]
            for p in range(pfn, pfn + npg):
                if pstate[p] == P_HELD and pstamp[p] > SC[HGEN_DONE]:
                    # the trace reuses a held pfn: the hold had to end before this allocation
                    _release(
                        ts,
                        cpu,
                        task,
                        O.C_HOLD_RELEASE,
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
                    break
            if op == O.M_ALLOC:
                acc[O_MISC + O.K_ALLOC_CLEAN] += 1
                for p in range(pfn, pfn + npg):
                    if not _safety(p, ts, done, sh_mask, sh_ugen, acc):
                        return i
                    pstate[p] = P_NONE
        elif op == O.M_HOOK:
            h = r["sub"]
            acc[O_HOOK_CALLS + h] += 1
            fires = h == O.H_WRITE_BEGIN or h == O.H_TRUNCATE or h == O.H_ZAP or (h == O.H_FAULT and (r["flags"] & 1))
            n = 0
            if fires:
                n = _release(
                    ts, cpu, task, O.HOOK_CAUSE[h], op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask
                )
            if n == 0:
                acc[O_HOOK_NOIPI + h] += 1
        b = timeline_bin(ts, tl)
        if SC[HELD] > acc[O_HELD_TL + b]:
            acc[O_HELD_TL + b] = SC[HELD]
    return -1


class HoldBeforeFree(Model):
    """Pages held out of the allocator until their flush."""

    name = "hold-before-free"

    def init_state(self) -> None:
        self.SC = np.zeros(8, np.int64)
        self.SU = np.zeros(4, np.uint64)
        self.done = np.zeros(64, np.int64)
        self.buf = np.zeros((0, 3), np.int64)

    def ensure(self, n_task: int, n_mm: int, n_map: int, n_ops: int) -> None:
        from lufreplay.model.state import grow

        self.buf = grow(self.buf, n_ops + 1)

    def _run(self, mops: np.ndarray, n: int) -> int:
        pg, lg = self.pages, self.logs
        return run_hbf(
            mops, n, self.Y, self.SC, self.SU, self.done, self.buf, pg.state, pg.stamp, pg.sh_mask, pg.sh_ugen,
            self.acc, self.tl, lg.dec, lg.nlog, lg.hist_g, lg.hist_ts, lg.hist_mask, lg.req_ts, lg.req_ugen,
            lg.req_mask, lg.req_pages,
        )  # fmt: skip
