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

from lufreplay.model import kernels as K
from lufreplay.model import ops as O
from lufreplay.model import rmap
from lufreplay.model import rules as P
from lufreplay.model import state as S
from lufreplay.model.base import Model
from lufreplay.model.kernels import U0
from lufreplay.model.state import GEN_DONE, HELD, P_HELD, P_NONE, G


@numba.njit(cache=True, _nrt=False)
def _release(ts, cpu, task, cause, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask):
    """Flush everything held and give the held pages back to the allocator."""
    if SC[GEN_DONE] >= SC[G]:
        return 0
    n = rmap.flush_pending(ts, cpu, task, cause, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask)
    SC[HELD] = 0
    acc[K.O_MISC + O.K_HELD_PAGES_NOW] = 0
    return n


@numba.njit(cache=True, _nrt=False)
def _hold(d, g, SC, buf, pstate, pstamp, sh_mask, sh_ugen, acc, req_ts, req_ugen, req_mask, req_pages, nlog):
    """The batch's eligible folios are held (generation ``g``, debt ``d``) instead of freed."""
    for b in range(SC[S.NBUF]):
        pfn = buf[b, 0]
        order = buf[b, 1]
        for p in range(pfn, pfn + (np.int64(1) << order)):
            pstate[p] = P_HELD
            pstamp[p] = g
            rmap.owe(p, d, g, sh_mask, sh_ugen)
            SC[HELD] += 1
        K.add_request(buf[b, 2], g, d, np.int64(1) << order, req_ts, req_ugen, req_mask, req_pages, nlog)
    acc[K.O_MISC + O.K_HELD_PAGES_NOW] = SC[HELD]
    if SC[HELD] > acc[K.O_MISC + O.K_HELD_PAGES_MAX]:
        acc[K.O_MISC + O.K_HELD_PAGES_MAX] = SC[HELD]


# only folios whose pfn is known can be held (others flush normally); a kept folio is flushed with the batch
WALK = rmap.W_NEED_PFN | rmap.W_KEEP_UNBATCHED


@numba.njit(cache=True, _nrt=False)
def _held_tl(ts, SC, acc, tl):
    """The held-pages timeline: the most pages held in ``ts``'s bin."""
    b = K.timeline_bin(ts, tl)
    if SC[HELD] > acc[K.O_HELD_TL + b]:
        acc[K.O_HELD_TL + b] = SC[HELD]


@numba.njit(cache=True, _nrt=False, inline="always")
def _walk(mops, i, nops, Y, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen, acc, tl):
    """:func:`rmap.next_op`; the held-pages timeline sees every op it walked too."""
    j = rmap.next_op(mops, i, nops, Y, WALK, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen)
    for k in range(i, j):
        _held_tl(mops[k]["ts"], SC, acc, tl)
    return j


@numba.njit(cache=True, nogil=True, _nrt=False)
def run_hbf(
    mops, nops, Y, SC, SU, done, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen, buf, pstate, pstamp, sh_mask, sh_ugen, acc,
    tl, dec, nlog, hist_g, hist_ts, hist_mask, req_ts, req_ugen, req_mask, req_pages,
):  # fmt: skip
    max_held = np.int64(Y[S.Y_HBF_MAX])
    i = _walk(mops, 0, nops, Y, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen, acc, tl)
    while i < nops:
        r = mops[i]
        op, ts, cpu, task = r["op"], r["ts"], r["cpu"], r["task"]
        if op == O.M_BATCH:
            d, nl = rmap.batch_split(K.opm(r["mask"]), Y[S.Y_UNEXPLAINED_FLUSH] != 0, SU)
            for b in range(SC[S.NBUF]):  # a pfn unmapped again: its old debt is settled, or it was re-used held
                for p in range(buf[b, 0], buf[b, 0] + (np.int64(1) << buf[b, 1])):
                    if sh_mask[p] == U0:
                        continue
                    if pstate[p] == P_HELD and pstamp[p] > SC[GEN_DONE]:
                        acc[K.O_MISC + O.K_UNSEEN_REUSES] += 1
                        _release(
                            ts, cpu, task, O.C_HOLD_RELEASE, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts,
                            hist_mask,
                        )  # fmt: skip
                    if K.notdone(sh_mask[p], sh_ugen[p], done) == U0:
                        sh_mask[p] = U0
                        sh_ugen[p] = 0
            if nl != U0:
                K.account_flush(ts, cpu, task, rmap.sent(nl, SU), O.C_BATCH_NONLUF, op, -1, acc, tl, dec, nlog)
            if d != U0:
                g = rmap.open_generation(d, SC, SU)
                rmap.defer(ts, cpu, task, d, op, acc, dec, nlog)
                _hold(d, g, SC, buf, pstate, pstamp, sh_mask, sh_ugen, acc, req_ts, req_ugen, req_mask, req_pages, nlog)
                if SC[HELD] >= max_held:
                    _release(
                        ts, cpu, task, O.C_HOLD_RELEASE, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts,
                        hist_mask,
                    )  # fmt: skip
            SC[S.NBUF] = 0
            rmap.batch_done(SU)
        elif op == O.M_RFLUSH:
            rmap.recorded_flush(ts, cpu, task, r["sub"], K.opm(r["mask"]), r["flags"], op, acc, tl, dec, nlog)
        elif op == O.M_RECLAIM_BEGIN:
            if Y[S.Y_HBF_RECLAIM] != 0 and SC[HELD] > 0:
                _release(
                    ts, cpu, task, O.C_HOLD_RELEASE, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask
                )
        elif op == O.M_FREE or op == O.M_DRAIN:
            pass  # a held page stays held whatever the trace does with it; other pages need nothing
        elif op == O.M_TAKE or op == O.M_ALLOC:
            pfn = r["pfn"]
            npg = np.int64(1) << r["order"]
            for p in range(pfn, pfn + npg):
                if pstate[p] == P_HELD and pstamp[p] > SC[GEN_DONE]:
                    # the trace reuses a held pfn: the hold had to end before this allocation
                    _release(
                        ts, cpu, task, O.C_HOLD_RELEASE, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts,
                        hist_mask,
                    )  # fmt: skip
                    acc[K.O_MISC + O.K_ALLOC_WITH_FLUSH] += 1
                    break
            if op == O.M_ALLOC:
                acc[K.O_MISC + O.K_ALLOC_CLEAN] += 1
                for p in range(pfn, pfn + npg):
                    if not rmap.safety(p, ts, done, sh_mask, sh_ugen, acc):
                        return i  # the op that broke the invariant
                    pstate[p] = P_NONE
        elif op == O.M_HOOK:
            h = r["sub"]
            n = 0
            if P.hook_scope(h, (r["flags"] & 1) != 0, P.HOLD_BEFORE_FREE, False) & P.S_ALL:
                n = _release(
                    ts, cpu, task, O.HOOK_CAUSE[h], op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask
                )
            rmap.count_hook(h, n != 0, acc)
        _held_tl(ts, SC, acc, tl)
        i = _walk(mops, i + 1, nops, Y, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen, acc, tl)
    return -1


class HoldBeforeFree(Model):
    """Pages held out of the allocator until their flush."""

    name = "hold-before-free"
    uses = S.USE_BUF

    def _run(self, mops: np.ndarray, n: int) -> int:
        st, pg = self.st, self.pages
        args = (*st.head(), st.buf, pg.state, pg.stamp, pg.sh_mask, pg.sh_ugen, self.acc, self.tl)
        return self.core(run_hbf)(mops, n, self.Y, *args, *self.logs.args())
