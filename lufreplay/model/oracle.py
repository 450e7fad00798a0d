"""Oracle: the lower bound (policy ``POL_ORACLE``). A pending flush is paid only when it is strictly needed, and
only to CPUs that can still hold the stale entry.

Strictly needed: a pending pfn is really re-allocated, a file whose pages are pending changes (F4/F5), a VMA of
an mm with pending work is zapped (F7), or a write fault lands in such an mm (F3). A CPU stops holding stale
entries at any full TLB flush it performs or receives (batched flushes, full remote flushes, task-switch
flushes: the loop's ``recorded_flush_credit`` and LFLUSH), so those retire its debt for free. The non-eligible
part of a batch is flushed at once, as in LUF.

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
from lufreplay.model.kernels import U0, notdone
from lufreplay.model.pcpfifo import OB_UGEN, ob_release, orphan
from lufreplay.model.prims import (
    clear_debt,
    count,
    defer,
    flush,
    free_folios_keyed,
    luf_batch_target,
    next_ugen,
    ob_own_back,
    owe,
    pcp_add_tail,
    pcp_drain_tail,
    pcp_head,
    pcp_take,
)
from lufreplay.model.state import LUF_MASK, NBUF, NONLUF_MASK, POL_ORACLE, Y_ALLOC_LUF, Y_NON_LUF_OK


@numba.njit(cache=True)
def try_to_unmap_flush(S, r):
    """Batch end: the non-LUF part is flushed at once; the deferred folios note their debt."""
    d = S.SU[LUF_MASK] & ~S.SU[NONLUF_MASK]
    nl = S.SU[NONLUF_MASK]
    u = next_ugen(S)
    if nl != U0:
        flush(S, r, nl, O.C_BATCH_NONLUF, -1)
    if d != U0:
        defer(S, r, d)
        free_folios_keyed(S, POL_ORACLE, r["task"], 0, d, u)
    S.SC[NBUF] = 0


@numba.njit(cache=True)
def free_page(S, r):
    """alloc_order=luf: an order-0 free of an owing page puts its debt at this CPU's pcp tail; a larger block
    goes to buddy, where (non_luf_ok) clean blocks are served first, so its debt is never handed out."""
    if S.Y[Y_ALLOC_LUF] == 0:
        return
    pfn = r["pfn"]
    order = r["order"]
    for p in range(pfn, pfn + (np.int64(1) << order)):
        if S.pobl[p] >= 0:
            orphan(p, S.OB, S.pobl)  # freed again without a recorded allocation
        if S.sh_mask[p] == U0:
            continue
        if order == 0:
            pcp_add_tail(S, p, 0, r["task"], r["cpu"])
        elif S.Y[Y_NON_LUF_OK] != 0:
            clear_debt(S, p)


@numba.njit(cache=True)
def free_pcppages_bulk(S, r):
    """alloc_order=luf: the newest pending page of that pcp goes to buddy (its debt is dropped while non_luf_ok)."""
    if S.Y[Y_ALLOC_LUF] == 0:
        return
    pfn = r["pfn"]
    for p in range(pfn, pfn + (np.int64(1) << r["order"])):
        if S.pobl[p] >= 0:
            z, own = pcp_drain_tail(S, p)
            if S.Y[Y_NON_LUF_OK] == 0:
                owe(S, p, S.OBM[z], S.OB[z, OB_UGEN])
            ob_release(z, S.OB, S.obfree, S.OBS)


@numba.njit(cache=True)
def realloc(S, r):
    """TAKE / ALLOC of a pending page: flush exactly the CPUs that still owe it."""
    pfn = r["pfn"]
    luf = S.Y[Y_ALLOC_LUF] != 0
    target = U0
    if luf and r["op"] == O.M_ALLOC and r["order"] == 0 and S.pobl[pfn] >= 0:
        tk, own = pcp_head(S, r["cpu"], pfn)  # the oldest pending page of this pcp
        target = notdone(S.OBM[tk], S.OB[tk, OB_UGEN], S.done)
        pcp_take(S, tk, own, pfn)
        ob_release(tk, S.OB, S.obfree, S.OBS)
    elif luf:
        for p in range(pfn, pfn + (np.int64(1) << r["order"])):
            if S.pobl[p] >= 0:  # met outside the FIFO path: it pays its own debt
                ob_own_back(S, p)
    for p in range(pfn, pfn + (np.int64(1) << r["order"])):
        if S.sh_mask[p] != U0:
            target |= notdone(S.sh_mask[p], S.sh_ugen[p], S.done)
            clear_debt(S, p)
    if target != U0:
        flush(S, r, target, O.C_REALLOC, -1)
        count(S, O.K_ALLOC_WITH_FLUSH)
    elif r["op"] == O.M_ALLOC:
        count(S, O.K_ALLOC_CLEAN)


@numba.njit(cache=True)
def on_hook(S, r):
    """Write faults and zaps flush the mm's pending CPUs; F4, F5 and zaps the mapping's. True: no IPI sent."""
    h = r["sub"]
    use_mm = (h == O.H_FAULT and (r["flags"] & 1)) or h == O.H_ZAP
    use_mp = h == O.H_WRITE_BEGIN or h == O.H_TRUNCATE or h == O.H_ZAP
    target, _ = luf_batch_target(S, r["mm"] if use_mm else -1, r["mapping"] if use_mp else -1)
    if target == U0:
        return True
    flush(S, r, target, O.HOOK_CAUSE[h], -1)
    return False


class Oracle(Model):
    """Lower bound."""

    name = "oracle"
    policy = POL_ORACLE
    uses = frozenset({"batches", "buf", "obl"})
