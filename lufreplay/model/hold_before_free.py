"""Hold-before-free (the talk's first approach, migrc): LUF'd folios are kept out of the allocator until flushed
(policy ``POL_HBF``).

No stale entry can ever reach a new owner, so allocations never flush; the price is memory: the held pages.
Held pages are released by one flush of everything held (``release``: the global mask ``SU[GMASK]`` and hold
generation ``SC[G]``, as v11's global batch) when the hold limit is reached, when reclaim starts (memory is
needed), when the trace shows a held pfn being reused (the real kernel would have had to release it first), and
at the hooks that change what a stale entry would see (write faults F3, F4, F5, F7).
Held pages never enter pcp or buddy, so the allocation-order option (``alloc_order``) does not apply here.
"""

from __future__ import annotations

import numba
import numpy as np

from lufreplay.model import ops as O
from lufreplay.model.base import Model
from lufreplay.model.kernels import O_MISC, U0, notdone
from lufreplay.model.prims import (
    account,
    clear_debt,
    count,
    defer,
    flush_generation,
    free_folios_keyed,
    generation_pending,
    next_ugen,
    safety,
)
from lufreplay.model.state import (
    GEN_DONE,
    GMASK,
    HELD,
    LUF_MASK,
    NBUF,
    NONLUF_MASK,
    P_HELD,
    P_NONE,
    POL_HBF,
    Y_HBF_MAX,
    Y_HBF_RECLAIM,
)


@numba.njit(cache=True)
def release(S, r, cause):
    """Flush everything held and give the held pages back to the allocator."""
    if not generation_pending(S):
        return 0
    n = flush_generation(S, r, cause)
    S.SC[HELD] = 0
    S.acc[O_MISC + O.K_HELD_PAGES_NOW] = 0
    return n


@numba.njit(cache=True)
def held(S, p):
    return S.pstate[p] == P_HELD and S.pstamp[p] > S.SC[GEN_DONE]


@numba.njit(cache=True)
def settle(S, r):
    """A pfn unmapped again: its old debt is settled, or it was re-used while held (the hold had to end)."""
    for b in range(S.SC[NBUF]):
        for p in range(S.buf[b, 0], S.buf[b, 0] + (np.int64(1) << S.buf[b, 1])):
            if S.sh_mask[p] == U0:
                continue
            if held(S, p):
                count(S, O.K_UNSEEN_REUSES)
                release(S, r, O.C_HOLD_RELEASE)
            if notdone(S.sh_mask[p], S.sh_ugen[p], S.done) == U0:
                clear_debt(S, p)


@numba.njit(cache=True)
def try_to_unmap_flush(S, r):
    """Batch end: the non-LUF part is flushed; the deferred folios are held under a new hold generation."""
    settle(S, r)
    d = S.SU[LUF_MASK] & ~S.SU[NONLUF_MASK]
    nl = S.SU[NONLUF_MASK]
    if nl != U0:
        account(S, r, nl, O.C_BATCH_NONLUF, -1)
    if d != U0:
        g = next_ugen(S)
        S.SU[GMASK] |= d
        defer(S, r, d)
        free_folios_keyed(S, POL_HBF, r["task"], 0, d, g)
        S.acc[O_MISC + O.K_HELD_PAGES_NOW] = S.SC[HELD]
        if S.SC[HELD] > S.acc[O_MISC + O.K_HELD_PAGES_MAX]:
            S.acc[O_MISC + O.K_HELD_PAGES_MAX] = S.SC[HELD]
        if S.SC[HELD] >= np.int64(S.Y[Y_HBF_MAX]):
            release(S, r, O.C_HOLD_RELEASE)
    S.SC[NBUF] = 0


@numba.njit(cache=True)
def reclaim_begin(S, r):
    """A reclaim episode starts (memory is needed): release what is held (hbf_flush_on_reclaim)."""
    if S.Y[Y_HBF_RECLAIM] != 0 and S.SC[HELD] > 0:
        release(S, r, O.C_HOLD_RELEASE)


@numba.njit(cache=True)
def alloc_pages(S, r):
    """TAKE / ALLOC: the trace re-uses a held pfn: the hold had to end before it. False on a safety violation."""
    pfn = r["pfn"]
    npg = np.int64(1) << r["order"]
    for p in range(pfn, pfn + npg):
        if held(S, p):
            release(S, r, O.C_HOLD_RELEASE)
            count(S, O.K_ALLOC_WITH_FLUSH)
            break
    if r["op"] == O.M_ALLOC:
        count(S, O.K_ALLOC_CLEAN)
        for p in range(pfn, pfn + npg):
            if not safety(S, p, r["ts"]):
                return False
            S.pstate[p] = P_NONE
    return True


@numba.njit(cache=True)
def on_hook(S, r):
    """Write faults, F4, F5 and F7 release everything held. True: no IPI sent."""
    h = r["sub"]
    fires = h == O.H_WRITE_BEGIN or h == O.H_TRUNCATE or h == O.H_ZAP or (h == O.H_FAULT and (r["flags"] & 1))
    n = 0
    if fires:
        n = release(S, r, O.HOOK_CAUSE[h])
    return n == 0


class HoldBeforeFree(Model):
    """Pages held out of the allocator until their flush."""

    name = "hold-before-free"
    policy = POL_HBF
    uses = frozenset({"buf"})
