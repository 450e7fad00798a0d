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

from lufreplay.model import kernels as K
from lufreplay.model import ops as O
from lufreplay.model import rmap
from lufreplay.model import rules as P
from lufreplay.model import state as S
from lufreplay.model.base import Model
from lufreplay.model.kernels import U0
from lufreplay.model.pcpfifo import OB_KEY, OB_UGEN, ob_release, orphan
from lufreplay.model.rmap import flush_pending, owe

WALK = rmap.W_KEEP_UNBATCHED  # no mm / mapping batches; a kept folio is non-LUF at once, its LUF work flushed


@numba.njit(cache=True, _nrt=False)
def _settle(p, ts, cpu, task, st, luf, op, SC, SU, done, pstamp, sh_mask, sh_ugen, pobl, OB, acc, tl, dec, nlog,
            hist_g, hist_ts, hist_mask):  # fmt: skip
    """A page the model still holds pending was re-used by the trace without a recorded allocation: a pcp
    obligation (alloc_order=luf) stays in its FIFO unlabelled; otherwise the missed allocation paid the global
    flush if the page's generation was not done (v11 has no pend_list: a buddy page keeps its pfn and debt).
    The caller clears the page's own debt where it is settled."""
    acc[K.O_MISC + O.K_UNSEEN_REUSES] += 1
    if luf and st == S.P_PCP_LUF:
        orphan(p, OB, pobl)
    elif pstamp[p] > SC[S.GEN_DONE]:
        cause = O.C_ALLOC_BUDDY_EPOCH if st == S.P_BUDDY_LUF else O.C_ALLOC_PCP
        flush_pending(ts, cpu, task, cause, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask)


@numba.njit(cache=True, _nrt=False)
def _paid(acc):
    acc[K.O_MISC + O.K_ALLOC_WITH_FLUSH] += 1
    acc[K.O_MISC + O.K_PAID_IN_ALLOC_FLUSHES] += 1


@numba.njit(cache=True, _nrt=False, inline="always")
def _on_alloc(
    r, op, ts, cpu, task, luf, Y, SC, SU, done, pstate, pkey, pstamp, sh_mask, sh_ugen, acc, tl, dec, nlog, hist_g,
    hist_ts, hist_mask, OB, OBM, obfree, FH, OBS, pobl,
):  # fmt: skip
    """TAKE / ALLOC (v11's check_luf_flush at takeoff): a pending page handed out flushes the whole pending
    generation (under alloc_order=luf a pcp page: the oldest of the CPU's list). False: the safety invariant broke."""
    pfn = r["pfn"]
    order = r["order"]
    npg = np.int64(1) << order
    need = False
    pcp = False
    can = (r["flags"] & 1) != 0 or Y[S.Y_V11_ATOMIC] != 0
    if luf and op == O.M_ALLOC and order == 0 and pstate[pfn] == S.P_PCP_LUF:
        own = np.int64(pobl[pfn])
        tk = rmap.fifo_head(cpu, own, FH)  # the oldest pending page of this pcp
        if OB[tk, OB_KEY] > SC[S.GEN_DONE]:
            if not can:
                acc[K.O_MISC + O.K_PCP_SKIPS] += 1
                orphan(pfn, OB, pobl)  # the trace's page left; the obligation stays free
                pstate[pfn] = S.P_NONE
                pkey[pfn] = 0
                return True
            flush_pending(
                ts, cpu, task, O.C_ALLOC_PCP, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask
            )
            _paid(acc)
        else:
            acc[K.O_MISC + O.K_ALLOC_CLEAN] += 1
        if not rmap.fifo_alloc(tk, own, pfn, True, ts, done, OB, OBM, obfree, OBS, FH, pobl, acc):
            return False  # the invariant broke
        pstate[pfn] = S.P_NONE
        pkey[pfn] = 0
        return True
    if luf:
        for p in range(pfn, pfn + npg):
            if pstate[p] == S.P_PCP_LUF:  # met outside the FIFO path: it carries its own obligation again
                pstamp[p] = rmap.ob_back(p, OB, OBM, obfree, FH, OBS, pobl, sh_mask, sh_ugen)
    for p in range(pfn, pfn + npg):
        st = pstate[p]
        if st == S.P_PCP_LUF or st == S.P_BUDDY_LUF or (st == S.P_UNMAPPED and pkey[p] != 0):
            if pstamp[p] > SC[S.GEN_DONE]:
                need = True
                pcp = pcp or st != S.P_BUDDY_LUF
    if need:
        if not can:
            acc[K.O_MISC + O.K_PCP_SKIPS if pcp else K.O_MISC + O.K_BUDDY_REFUSALS] += 1
            return True
        cause = O.C_ALLOC_PCP if pcp else O.C_ALLOC_BUDDY_EPOCH
        flush_pending(ts, cpu, task, cause, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask)
        _paid(acc)
    elif op == O.M_ALLOC:
        acc[K.O_MISC + O.K_ALLOC_CLEAN] += 1
    for p in range(pfn, pfn + npg):
        if op == O.M_TAKE:
            pstate[p] = S.P_PCP_CLEAN if (r["flags"] & O.A_REFILL) else S.P_TAKEN
        else:
            if not rmap.safety(p, ts, done, sh_mask, sh_ugen, acc):
                return False  # the invariant broke
            pstate[p] = S.P_NONE
            pkey[p] = 0
    return True


@numba.njit(cache=True, nogil=True, _nrt=False)
def run_luf_v11(
    mops, nops, Y, SC, SU, done, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen, task_anon, buf, pstate, pkey, pstamp,
    sh_mask, sh_ugen, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask, req_ts, req_ugen, req_mask, req_pages, OB, OBM,
    obfree, FH, OBS, pobl,
):  # fmt: skip
    luf = Y[S.Y_ALLOC_LUF] != 0
    i = rmap.next_op(mops, 0, nops, Y, WALK, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen)
    while i < nops:
        r = mops[i]
        op, ts, cpu, task = r["op"], r["ts"], r["cpu"], r["task"]
        if op == O.M_BATCH:
            d, nl = rmap.batch_split(K.opm(r["mask"]), Y[S.Y_UNEXPLAINED_FLUSH] != 0, SU)
            if nl != U0:
                K.account_flush(ts, cpu, task, rmap.sent(nl, SU), O.C_BATCH_NONLUF, op, -1, acc, tl, dec, nlog)
            g = np.int64(0)
            if d != U0:
                g = rmap.open_generation(d, SC, SU)
                rmap.defer(ts, cpu, task, d, op, acc, dec, nlog)
            for b in range(SC[S.NBUF]):  # pages still pending in the model: re-used without a recorded allocation
                for p in range(buf[b, 0], buf[b, 0] + (np.int64(1) << buf[b, 1])):
                    st = pstate[p]
                    if st == S.P_PCP_LUF or st == S.P_BUDDY_LUF or (st == S.P_UNMAPPED and pkey[p] != 0):
                        _settle(
                            p, ts, cpu, task, st, luf, op, SC, SU, done, pstamp, sh_mask, sh_ugen, pobl, OB, acc, tl,
                            dec, nlog, hist_g, hist_ts, hist_mask,
                        )  # fmt: skip
                        sh_mask[p] = U0
                        sh_ugen[p] = 0
            for b in range(SC[S.NBUF]):
                pfn = buf[b, 0]
                order = buf[b, 1]
                for p in range(pfn, pfn + (np.int64(1) << order)):
                    pstate[p] = S.P_UNMAPPED
                    pkey[p] = 1 if g != 0 else 0
                    pstamp[p] = g
                    if g != 0:
                        owe(p, d, g, sh_mask, sh_ugen)
                if g != 0:
                    K.add_request(buf[b, 2], g, d, np.int64(1) << order, req_ts, req_ugen, req_mask, req_pages, nlog)
            SC[S.NBUF] = 0
            if task >= 0:
                task_anon[task] = g if (r["flags"] & O.B_ANON_UNKNOWN_PFN) else 0
            if (r["flags"] & O.B_MEMFAIL) and g != 0:
                flush_pending(
                    ts, cpu, task, O.C_MEMFAIL, op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask
                )
            rmap.batch_done(SU)
        elif op == O.M_RFLUSH:
            rmap.recorded_flush(ts, cpu, task, r["sub"], K.opm(r["mask"]), r["flags"], op, acc, tl, dec, nlog)
        elif op == O.M_FREE:
            pfn = r["pfn"]
            order = r["order"]
            for p in range(pfn, pfn + (np.int64(1) << order)):
                if luf and (pstate[p] == S.P_PCP_LUF or pstate[p] == S.P_BUDDY_LUF):  # freed again, no recorded alloc
                    _settle(
                        p, ts, cpu, task, pstate[p], luf, op, SC, SU, done, pstamp, sh_mask, sh_ugen, pobl, OB, acc,
                        tl, dec, nlog, hist_g, hist_ts, hist_mask,
                    )  # fmt: skip
                    if pstate[p] == S.P_BUDDY_LUF:
                        sh_mask[p] = U0
                        sh_ugen[p] = 0
                    pstate[p] = S.P_NONE
                g = 0
                if pstate[p] == S.P_UNMAPPED and pkey[p] != 0:
                    g = pstamp[p]
                elif (
                    r["sub"] == 3
                    and task >= 0
                    and task_anon[task] != 0
                    and pstate[p] != S.P_PCP_LUF
                    and pstate[p] != S.P_BUDDY_LUF
                ):
                    g = task_anon[task]
                    owe(p, SU[S.PMASK], g, sh_mask, sh_ugen)
                if g != 0:
                    acc[K.O_MISC + O.K_LUF_PAGES_FREED] += 1
                    pstate[p] = S.P_PCP_LUF if order == 0 else S.P_BUDDY_LUF
                    pstamp[p] = g
                    if luf and order == 0:  # tail placement: the page's obligation joins this CPU's FIFO
                        rmap.fifo_push_page(p, g, 0, cpu, OB, OBM, obfree, OBS, FH, pobl, sh_mask, sh_ugen)
                elif pstate[p] != S.P_PCP_LUF and pstate[p] != S.P_BUDDY_LUF:
                    pstate[p] = S.P_PCP_CLEAN if order == 0 else S.P_BUDDY_CLEAN
        elif op == O.M_DRAIN:
            pfn = r["pfn"]
            for p in range(pfn, pfn + (np.int64(1) << r["order"])):
                if pstate[p] == S.P_PCP_LUF and luf:  # the newest pending page of that pcp goes to buddy
                    z = rmap.fifo_drain(p, True, OB, FH, pobl, acc)
                    pstamp[p] = OB[z, OB_KEY]
                    owe(p, OBM[z], OB[z, OB_UGEN], sh_mask, sh_ugen)
                    ob_release(z, OB, obfree, OBS)
                    pstate[p] = S.P_BUDDY_LUF
                elif pstate[p] == S.P_PCP_LUF:
                    pstate[p] = S.P_BUDDY_LUF
                elif pstate[p] == S.P_PCP_CLEAN:
                    pstate[p] = S.P_BUDDY_CLEAN
        elif op == O.M_TAKE or op == O.M_ALLOC:
            if not _on_alloc(
                r, op, ts, cpu, task, luf, Y, SC, SU, done, pstate, pkey, pstamp, sh_mask, sh_ugen, acc, tl, dec, nlog,
                hist_g, hist_ts, hist_mask, OB, OBM, obfree, FH, OBS, pobl,
            ):  # fmt: skip
                return i  # the op that broke the invariant
        elif op == O.M_HOOK:
            h = r["sub"]
            n = 0
            if P.hook_scope(h, (r["flags"] & 1) != 0, P.LUF_V11, False) & P.S_ALL and SC[S.GEN_DONE] < SC[S.G]:
                n = flush_pending(
                    ts, cpu, task, O.HOOK_CAUSE[h], op, SC, SU, done, acc, tl, dec, nlog, hist_g, hist_ts, hist_mask
                )
            rmap.count_hook(h, n != 0, acc)
        i = rmap.next_op(mops, i + 1, nops, Y, WALK, SC, SU, buf, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen)
    return -1


class LufV11(Model):
    """LUF v11: single global pending batch."""

    name = "luf-v11"
    uses = S.USE_TASKS | S.USE_FIFO | S.USE_BUF

    def _run(self, mops: np.ndarray, n: int) -> int:
        st, pg = self.st, self.pages
        return self.core(run_luf_v11)(
            mops, n, self.Y, *st.head(), st.task_anon_key, st.buf, pg.state, pg.key, pg.stamp, pg.sh_mask, pg.sh_ugen,
            self.acc, self.tl, *self.logs.args(), *st.obl.args(),
        )  # fmt: skip
