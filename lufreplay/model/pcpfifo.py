"""Pending pcp pages as obligations in per-CPU FIFOs: the allocation order of v12 (option ``alloc_order=luf``).

v12 adds pages that carry a luf_key at the *tail* of the pcp list while plain frees go to the head and
allocation takes from the head (patch 11, luf-model.md §2.5). Keyed pages are therefore reused last, oldest
first, and a pcp drain (which takes from the tail) sends the newest keyed page to buddy first.

The trace only shows which pfn the vanilla kernel handed out. Under ``alloc_order=luf`` a model therefore tracks
*obligations* (the key or generation, the shadow debt: CPUs owed + request ugen, the unmapping task) in one
FIFO per CPU, ordered by free time, instead of pfn identities. A pfn is only the storage label of the obligation
the trace still shows on a pcp list (``pobl[pfn]``); when the model consumes another obligation than the recorded
pfn's, the labels are swapped so that pfns still free in the trace keep an obligation. An obligation whose pfn
the trace re-used while the model kept it free (a no-shootdown allocation skipped it, or an allocation the trace
lost) stays in its FIFO without a label (``pfn = -1``): it is consumed later like any other.

Table layout (``OB`` int64 rows + ``OBM`` uint64 shadow masks); ``FH[cpu] = (head, tail, count)``; ``OBS`` =
(top of never-used ids, free-stack size, live count).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from lufreplay.model.widemask import MaskArray

OB_KEY, OB_UGEN, OB_TASK, OB_PFN, OB_NEXT, OB_PREV, OB_CPU = range(7)
NOB = 7
FH_HEAD, FH_TAIL, FH_COUNT = range(3)
OBS_TOP, OBS_NFREE, OBS_LIVE = range(3)


class Obligations:
    """The obligation table, the per-CPU FIFOs and the pfn → obligation labels of one model."""

    def __init__(self, w: int = 1) -> None:
        self.OB = np.zeros((0, NOB), np.int64)
        self.OBM: Any = np.zeros(0, np.uint64) if w == 1 else MaskArray.zeros(0, w)
        self.free = np.zeros(0, np.int64)
        self.FH = np.full((64 * w, 3), -1, np.int64)  # per CPU: as many as the masks hold
        self.FH[:, FH_COUNT] = 0
        self.OBS = np.zeros(3, np.int64)
        self.pobl = np.zeros(0, np.int32)

    def ensure(self, n_pages: int, n_ops: int) -> None:
        """Room for ``n_ops`` new obligations and labels for ``n_pages`` pfns (pfns < 2**31)."""
        if self.pobl.shape[0] < n_pages:
            new = np.full(n_pages, -1, np.int32)
            new[: self.pobl.shape[0]] = self.pobl
            self.pobl = new
        need = int(self.OBS[OBS_TOP]) + n_ops + 16
        if self.OB.shape[0] < need:
            n = max(int(1.25 * need), int(self.OB.shape[0] * 1.5))  # headroom: the next segment needs as much
            ob = np.zeros((n, NOB), np.int64)
            ob[: self.OB.shape[0]] = self.OB
            if isinstance(self.OBM, MaskArray):
                obm: Any = MaskArray.zeros(n, self.OBM.width)
                obm.data[: len(self.OBM.data)] = self.OBM.data
            else:
                obm = np.zeros(n, np.uint64)
                obm[: self.OBM.shape[0]] = self.OBM
            fr = np.zeros(n, np.int64)
            fr[: self.free.shape[0]] = self.free
            self.OB, self.OBM, self.free = ob, obm, fr

    def args(self) -> tuple[np.ndarray, ...]:
        """The arrays a core takes, in its order."""
        return (self.OB, self.OBM, self.free, self.FH, self.OBS, self.pobl)

    def fifo(self, cpu: int) -> list[int]:
        """The obligation ids of ``cpu``'s FIFO, oldest first (tests and debugging)."""
        out = []
        i = int(self.FH[cpu, FH_HEAD])
        while i >= 0:
            out.append(i)
            i = int(self.OB[i, OB_NEXT])
        return out


@numba.njit(cache=True, _nrt=False)
def ob_new(key, mask, ugen, task, pfn, OB, OBM, free, OBS):
    """A new (unlinked) obligation."""
    if OBS[OBS_NFREE] > 0:
        OBS[OBS_NFREE] -= 1
        i = free[OBS[OBS_NFREE]]
    else:
        i = OBS[OBS_TOP]
        OBS[OBS_TOP] += 1
    OB[i, OB_KEY] = key
    OB[i, OB_UGEN] = ugen
    OB[i, OB_TASK] = task
    OB[i, OB_PFN] = pfn
    OB[i, OB_NEXT] = -1
    OB[i, OB_PREV] = -1
    OB[i, OB_CPU] = -1
    OBM[i] = mask
    OBS[OBS_LIVE] += 1
    return i


@numba.njit(cache=True, _nrt=False)
def ob_release(i, OB, free, OBS):
    free[OBS[OBS_NFREE]] = i
    OBS[OBS_NFREE] += 1
    OBS[OBS_LIVE] -= 1
    OB[i, OB_PFN] = -1
    OB[i, OB_CPU] = -1


@numba.njit(cache=True, _nrt=False)
def fifo_push(i, cpu, OB, FH):
    """Append obligation ``i`` at the tail of ``cpu``'s FIFO (newest)."""
    t = FH[cpu, FH_TAIL]
    OB[i, OB_PREV] = t
    OB[i, OB_NEXT] = -1
    OB[i, OB_CPU] = cpu
    if t >= 0:
        OB[t, OB_NEXT] = i
    else:
        FH[cpu, FH_HEAD] = i
    FH[cpu, FH_TAIL] = i
    FH[cpu, FH_COUNT] += 1


@numba.njit(cache=True, _nrt=False)
def fifo_unlink(i, OB, FH):
    c = OB[i, OB_CPU]
    p = OB[i, OB_PREV]
    n = OB[i, OB_NEXT]
    if p >= 0:
        OB[p, OB_NEXT] = n
    else:
        FH[c, FH_HEAD] = n
    if n >= 0:
        OB[n, OB_PREV] = p
    else:
        FH[c, FH_TAIL] = p
    FH[c, FH_COUNT] -= 1
    OB[i, OB_NEXT] = -1
    OB[i, OB_PREV] = -1
    OB[i, OB_CPU] = -1


@numba.njit(cache=True, _nrt=False)
def relabel(taken, own, pfn, OB, pobl):
    """The model hands out obligation ``taken`` where the trace handed out ``pfn`` (label of ``own``): the pfn
    that labelled ``taken`` (still free in the trace) now labels ``own``; ``pfn`` labels nothing."""
    if own >= 0 and taken != own:
        y = OB[taken, OB_PFN]
        OB[own, OB_PFN] = y
        if y >= 0:
            pobl[y] = own
    pobl[pfn] = -1


@numba.njit(cache=True, _nrt=False)
def orphan(p, OB, pobl):
    """The trace re-used pfn ``p`` while the model keeps its obligation free: the obligation loses its label."""
    i = pobl[p]
    if i >= 0:
        OB[i, OB_PFN] = -1
        pobl[p] = -1
