"""Vanilla: the kernel as recorded, rebuilt from the reconstructed batches.

A batched flush targets the union of the modelled mm_cpumasks of every PTE the batch cleared, minus the sender
and minus the CPUs in lazy-TLB mode when it is sent (BATCH.mask2: ``should_flush_tlb`` skips them for a flush
with ``info->mm == NULL``); every other recorded flush passes through. Comparing the rebuilt targets with the recorded ones gives the
fidelity figure: the share of recorded remote shootdowns that the reconstruction explains, per cause.
It also measures the free → re-allocation delay of tracked pages.
"""

from __future__ import annotations

import numba
import numpy as np

from lufreplay.model import ops as O
from lufreplay.model.base import Model
from lufreplay.model.kernels import (
    O_FID_EXPL,
    O_FID_EXPL_CPU,
    O_FID_MATCH_CPU,
    O_FID_PRED,
    O_FID_PV,
    O_FID_REC,
    O_FID_SKIPPED,
    O_RD,
    O_REC_EVENTS,
    O_REC_PERCPU,
    O_REC_TL,
    RD_BINS,
    U0,
    account_flush,
    add_per_cpu,
    bit,
    opm,
    popcount,
    timeline_bin,
)
from lufreplay.model.rmap import recorded_flush
from lufreplay.model.state import BATCH_ALL


@numba.njit(cache=True, _nrt=False)
def _recorded(ts, R, n, cause, acc, tl):
    """What the kernel really did: the recorded targets of one flush event."""
    acc[O_FID_REC + cause] += n
    if n > 0:
        acc[O_REC_EVENTS + cause] += 1
        acc[O_REC_TL + timeline_bin(ts, tl)] += n
    add_per_cpu(acc, O_REC_PERCPU, R)


@numba.njit(cache=True, _nrt=False)
def pv_skip_candidates(pred, R, sent):
    """Rebuilt targets of a batched flush whose send was traced (reason 4) that the kernel did not reach, though
    the model has them running a task (not lazy). ``should_flush_tlb`` IPIs every such CPU (``info->mm == NULL``:
    whatever mm it runs), so what skipped them is ``kvm_flush_tlb_multi`` leaving a preempted vCPU to the host
    (invisible to tracepoints), or a lazy state the reconstruction missed. Counted, not fitted: the rebuild keeps
    them."""
    return popcount(pred & ~R) if sent != 0 else 0


@numba.njit(cache=True, nogil=True)
def run_vanilla(mops, nops, SU, free_ts, acc, tl, dec, nlog):
    for i in range(nops):
        r = mops[i]
        op = r["op"]
        if op == O.M_PTE:
            if (r["flags"] & O.PTE_UNBATCHED) == 0:
                SU[BATCH_ALL] |= opm(r["mask2"])
        elif op == O.M_BATCH:
            cpu = r["cpu"]
            R = opm(r["mask"])
            pred = SU[BATCH_ALL] & ~bit(cpu) & ~opm(r["mask2"])  # mask2: the CPUs lazy at this flush
            cb = O.C_BATCH
            _recorded(r["ts"], R, r["aux"], cb, acc, tl)
            acc[O_FID_EXPL + cb] += popcount(pred & R)
            add_per_cpu(acc, O_FID_EXPL_CPU, pred & R)
            add_per_cpu(acc, O_FID_MATCH_CPU, pred & R)
            acc[O_FID_PRED + cb] += popcount(pred)
            if r["aux"] == 0 and pred != U0:  # the kernel reached none: all skipped, or no remote CPU in its mask
                acc[O_FID_SKIPPED + (0 if r["order"] != 0 else 1)] += popcount(pred)
            acc[O_FID_PV] += pv_skip_candidates(pred, R, r["order"])
            tg = pred | (bit(cpu) if r["sub"] != 0 else U0)
            account_flush(r["ts"], cpu, r["task"], tg, cb, op, -1, acc, tl, dec, nlog)
            SU[BATCH_ALL] = U0
        elif op == O.M_RFLUSH:
            cause = r["sub"]
            cpu = r["cpu"]
            _recorded(r["ts"], opm(r["mask"]), r["aux"], cause, acc, tl)
            acc[O_FID_PRED + cause] += r["aux"]
            if cause != O.C_OTHER and cause != O.C_BATCH_UNSEEN:
                acc[O_FID_EXPL + cause] += r["aux"]
                add_per_cpu(acc, O_FID_EXPL_CPU, opm(r["mask"]))
            add_per_cpu(acc, O_FID_MATCH_CPU, opm(r["mask"]))  # passed through: sent as recorded
            recorded_flush(r["ts"], cpu, r["task"], cause, opm(r["mask"]), r["flags"], op, acc, tl, dec, nlog)
        elif op == O.M_FREE:
            pfn = r["pfn"]
            for p in range(pfn, pfn + (np.int64(1) << r["order"])):
                free_ts[p] = r["ts"]
        elif op == O.M_ALLOC:
            pfn = r["pfn"]
            for p in range(pfn, pfn + (np.int64(1) << r["order"])):
                if free_ts[p] > 0:
                    d = (r["ts"] - free_ts[p]) / 1e9
                    if d <= 1e-6:
                        b = 0
                    else:
                        b = 1 + np.int64(np.floor((np.log10(d) + 6.0) * 4.0))
                        if b > RD_BINS - 1:
                            b = RD_BINS - 1
                    acc[O_RD + b] += 1
                    free_ts[p] = 0
    return -1


class Vanilla(Model):
    """The recorded kernel, rebuilt."""

    name = "vanilla"

    def _run(self, mops: np.ndarray, n: int) -> int:
        lg = self.logs
        return self.core(run_vanilla)(mops, n, self.st.SU, self.pages.unmap_ts, self.acc, self.tl, lg.dec, lg.nlog)


def realloc_bin_edges() -> list[float]:
    """Edges (s) of the realloc-delay histogram: [0, 1 µs], then 4 bins per decade up to 100 s, then overflow."""
    return [0.0] + [10 ** (-6 + k / 4) for k in range(RD_BINS - 1)] + [float("inf")]
