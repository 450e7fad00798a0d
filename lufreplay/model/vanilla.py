"""Vanilla: the kernel as recorded, rebuilt from the reconstructed batches (policy ``POL_VANILLA`` of the loop).

A batched flush targets the union of the modelled mm_cpumasks of every PTE the batch cleared (minus the sender);
every other recorded flush passes through (the loop's ``recorded_flush``). Comparing the rebuilt targets with the
recorded ones gives the fidelity figure: the share of recorded remote shootdowns that the reconstruction
explains, per cause. It also measures the free → re-allocation delay of tracked pages.
"""

from __future__ import annotations

import numba
import numpy as np

from lufreplay.model import ops as O
from lufreplay.model.base import Model
from lufreplay.model.kernels import (
    O_FID_EXPL,
    O_FID_PRED,
    O_FID_REC,
    O_RD,
    O_REC_EVENTS,
    O_REC_PERCPU,
    O_REC_TL,
    RD_BINS,
    U0,
    U1,
    bit,
    popcount,
    timeline_bin,
)
from lufreplay.model.prims import account
from lufreplay.model.state import POL_VANILLA, VAN_MASK


@numba.njit(cache=True)
def recorded(S, ts, R, n, cause):
    """What the kernel really did: the recorded targets of one flush event."""
    acc = S.acc
    acc[O_FID_REC + cause] += n
    if n > 0:
        acc[O_REC_EVENTS + cause] += 1
        acc[O_REC_TL + timeline_bin(ts, S.tl)] += n
    m = R
    c = 0
    while m != U0:
        if m & U1:
            acc[O_REC_PERCPU + c] += 1
        m >>= U1
        c += 1


@numba.njit(cache=True)
def fidelity_recorded_flush(S, r):
    """A recorded flush LUF leaves alone: explained when the reconstruction identified its cause."""
    cause = r["sub"]
    recorded(S, r["ts"], r["mask"], r["aux"], cause)
    S.acc[O_FID_PRED + cause] += r["aux"]
    if cause != O.C_OTHER and cause != O.C_BATCH_UNSEEN:
        S.acc[O_FID_EXPL + cause] += r["aux"]


@numba.njit(cache=True)
def arch_tlbbatch_add_pending(S, r):
    """A batched PTE clear adds its (unclipped) mm_cpumask to the batch."""
    S.SU[VAN_MASK] |= r["mask2"]


@numba.njit(cache=True)
def arch_tlbbatch_flush(S, r):
    """The rebuilt batched flush, compared with the recorded one."""
    cpu = r["cpu"]
    R = r["mask"]
    pred = S.SU[VAN_MASK] & ~bit(cpu)
    cb = O.C_BATCH
    recorded(S, r["ts"], R, r["aux"], cb)
    S.acc[O_FID_EXPL + cb] += popcount(pred & R)
    S.acc[O_FID_PRED + cb] += popcount(pred)
    account(S, r, pred | (bit(cpu) if r["sub"] != 0 else U0), cb, -1)
    S.SU[VAN_MASK] = U0


@numba.njit(cache=True)
def realloc_delay(S, r):
    """FREE remembers when each page was freed; ALLOC bins the delay to its re-allocation."""
    pfn = r["pfn"]
    free_ts = S.punmap_ts
    for p in range(pfn, pfn + (np.int64(1) << r["order"])):
        if r["op"] == O.M_FREE:
            free_ts[p] = r["ts"]
        elif free_ts[p] > 0:
            d = (r["ts"] - free_ts[p]) / 1e9
            if d <= 1e-6:
                b = 0
            else:
                b = 1 + np.int64(np.floor((np.log10(d) + 6.0) * 4.0))
                if b > RD_BINS - 1:
                    b = RD_BINS - 1
            S.acc[O_RD + b] += 1
            free_ts[p] = 0


class Vanilla(Model):
    """The recorded kernel, rebuilt."""

    name = "vanilla"
    policy = POL_VANILLA


def realloc_bin_edges() -> list[float]:
    """Edges (s) of the realloc-delay histogram: [0, 1 µs], then 4 bins per decade up to 100 s, then overflow."""
    return [0.0] + [10 ** (-6 + k / 4) for k in range(RD_BINS - 1)] + [float("inf")]
