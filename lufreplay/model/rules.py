"""LUF rules that several models share or on which they differ, one function each (docs/simulate.md lists where
every rule lives). Change a rule here and every model that uses it follows.

The model ids below select a model's column of a rule; they are compile-time constants of each core. Compiled
without NRT, as model/rmap.py says why.
"""

from __future__ import annotations

import numba

from lufreplay.model import kernels as K
from lufreplay.model import ops as O

LUF_V12, LUF_V11, HOLD_BEFORE_FREE, ORACLE = range(4)

# what a hook flushes (bits of hook_scope's result)
S_MM, S_MAPPING, S_TASK_KEY, S_ALL = 1, 2, 4, 8


@numba.njit(cache=True, _nrt=False)
def hook_inert(h, posted):
    """§9.1 ``hooks=posted``: fold_luf_batch_mm never sets the mm/mapping batch's flush_required, so
    luf_flush_mm/luf_flush_mapping (F3-F8, F10) fold nothing and send no IPI (the caller's own tlb_ubc is empty at
    a hook: the model fills its open batch only at the batch's end). ``intended``: they flush the batch."""
    return posted and h != O.H_DIRTY_WB


@numba.njit(cache=True, _nrt=False)
def dirty_wb_at_batch(h, posted):
    """§9.4 ``dirty_writeback=posted``: try_to_unmap_flush_dirty() flushes only the open batch, at the recorded
    flush it is (a BATCH op marked B_DIRTY, run_luf_v12), so the pageout itself (F13) flushes no keyed page.
    ``last_key``: F13 flushes the task's last key (hook_scope)."""
    return posted and h == O.H_DIRTY_WB


@numba.njit(cache=True, _nrt=False)
def hook_scope(h, write, model, posted):
    """F3-F13: what hook ``h`` flushes in ``model`` (``write``: a write fault). luf-v12 and the oracle flush the
    pending work of the mm (S_MM) and/or the file mapping (S_MAPPING), F13 the task's last key (S_TASK_KEY);
    luf-v11 and hold-before-free know only one pending generation (S_ALL). The oracle flushes only where a stale
    entry could be observed (a write, a file change, a zap)."""
    if model == LUF_V12 and hook_inert(h, posted):
        return 0
    if h == O.H_FAULT:  # F3
        if model == LUF_V12:
            return S_MM | S_MAPPING
        if not write:
            return 0
        return S_MM if model == ORACLE else S_ALL
    if h == O.H_WRITE_BEGIN:  # F4
        return S_MAPPING if (model == LUF_V12 or model == ORACLE) else S_ALL
    if h == O.H_TRUNCATE:  # F5
        if model == LUF_V11:
            return 0
        return S_ALL if model == HOLD_BEFORE_FREE else S_MAPPING
    if h == O.H_MKCLEAN:  # F6
        return S_MAPPING if model == LUF_V12 else 0
    if h == O.H_ZAP:  # F7/F8
        if model == LUF_V11:
            return 0
        return S_ALL if model == HOLD_BEFORE_FREE else S_MM | S_MAPPING
    if h == O.H_CTXSW:  # F10
        return S_MM if model == LUF_V12 else 0
    if h == O.H_DIRTY_WB:  # F13
        if model == LUF_V12:
            return S_TASK_KEY
        return S_ALL if model == LUF_V11 else 0
    return 0


@numba.njit(cache=True, _nrt=False)
def batch_target(scope, mm, mp, MMB_mask, MMB_ugen, ASB_mask, ASB_ugen, done):
    """luf_flush_mm / luf_flush_mapping: the CPUs of the mm and/or mapping batch not yet done with it, and the
    batch's ugen (the largest of the two)."""
    target = K.U0
    ugen = 0
    if (scope & S_MM) and mm >= 0:
        target |= K.notdone(MMB_mask[mm], MMB_ugen[mm], done)
        ugen = MMB_ugen[mm]
    if (scope & S_MAPPING) and mp >= 0:
        target |= K.notdone(ASB_mask[mp], ASB_ugen[mp], done)
        if ASB_ugen[mp] > ugen:
            ugen = ASB_ugen[mp]
    return target, ugen
