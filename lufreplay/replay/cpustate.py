"""Per-CPU loaded mm and lazy-TLB state, and mm_cpumask, rebuilt from ``sched`` rows the way x86 keeps them.

Kernel rules (arch/x86/mm/tlb.c):

* a switch to a kernel thread or the idle task is lazy (``enter_lazy_tlb``): ``loaded_mm`` and the cpumask bit
  stay, ``is_lazy`` = 1; a switch to a user task loads its mm (``switch_mm_irqs_off``) and sets the CPU's bit;
* what happens to the bit of the mm switched away from depends on the kernel (option ``mm_cpumask``):
  ``switch`` — cleared at the switch (x86 up to 6.12, e.g. Debian's 6.12 source): the mask is the CPUs with the mm
  loaded, running it or lazy; ``kept`` — kept, and cleared only when a flush of that mm reaches the CPU while it
  runs another mm (``flush_tlb_func``: TLB_REMOTE_WRONG_CPU; the once-a-second ``trim_cpumask`` IPIs), x86 since
  commit 209954cbc7d0 "x86/mm/tlb: Update mm_cpumask lazily" (after 6.12), the kernels of the bundled traces (6.18);
  ``window`` — the CPUs that ran the mm within ``mm_cpumask_trim_s`` (an approximation, the former default);
* a batched flush (``arch_tlbbatch_flush``, ``info->mm == NULL``) skips the CPUs lazy at the moment it is sent
  (``should_flush_tlb``).

State lives in two columns of the reconstructor's per-CPU table and one of its per-task table:

* ``C_LOADED``: dense process id + 1 of the mm loaded on the CPU (processes own one mm each), 0 when unknown
  (before the CPU's first switch, or a user task of a process the trace never named);
* ``C_LAZY``: 1 while the CPU runs a kernel thread or idles;
* ``T_KIND``: 0 unknown, 1 user task, 2 kernel thread, learned from every ``sched`` row (the task switched out
  and ``prev_kthread``) and from rows only user tasks emit (their own mm's rss_stat, user faults, syscalls).

The ``kept`` bits are ``LAST_RUN[mm, c] > 0`` (the reconstructor stamps it whenever CPU c runs a task of the mm);
a WRONG_CPU clear zeroes it.

A task switched in whose kind is still unknown (its first switch-in) is a user task when its process's mm is
known, else it is taken as a kernel thread (lazy: the CPU keeps what it had loaded); such switches are counted.
A later row that only a task with its mm loaded causes (``proven_running``) corrects the guess from then on.
"""

from __future__ import annotations

import re

import numba
import numpy as np

from lufreplay.model.kernels import U0, U1, WIDE, bit, carries_lazy, opm, recent, rows_eq, set_mask2, word

K_UNKNOWN, K_USER, K_KTHREAD = 0, 1, 2
MASK_KEPT, MASK_SWITCH, MASK_WINDOW = 0, 1, 2
MASK_MODES = ("kept", "switch", "window")  # option mm_cpumask, in this order


@numba.njit(cache=True)
def learn_kind(T, task, kind, t_kind):
    """Record that ``task`` is a user task or a kernel thread (the latest evidence wins)."""
    if task >= 0:
        T[task, t_kind] = kind


@numba.njit(cache=True)
def switch_in(CPU, c, nxt_task, T, PROC_MMA, t_proc, t_kind, c_loaded, c_lazy):
    """CPU ``c`` switches to ``nxt_task`` (-1: idle). Returns True when the task's kind had to be guessed."""
    if nxt_task < 0:
        CPU[c, c_lazy] = 1  # idle: enter_lazy_tlb
        return False
    kind = T[nxt_task, t_kind]
    proc = T[nxt_task, t_proc]
    guessed = False
    if kind == K_UNKNOWN:
        guessed = True
        kind = K_USER if proc >= 0 and PROC_MMA[proc] >= 0 else K_KTHREAD
    if kind == K_KTHREAD:
        CPU[c, c_lazy] = 1
    else:
        CPU[c, c_lazy] = 0
        CPU[c, c_loaded] = proc + 1 if proc >= 0 else 0  # an unnamed process: this CPU left every known mm
    return guessed


@numba.njit(cache=True)
def proven_running(CPU, c, T, t_kind, t_proc, c_cur_task, c_lazy, c_loaded):
    """The task running on CPU ``c`` has its mm loaded (a row only such a task causes), though its switch-in took
    it for a kernel thread (its kind was unknown then): the CPU is not lazy and holds the task's mm. A known kernel
    thread is left alone (one that borrowed an mm with kthread_use_mm would look the same). True if it changed."""
    t = CPU[c, c_cur_task]
    if t < 0 or CPU[c, c_lazy] == 0 or T[t, t_kind] == K_KTHREAD:
        return False
    T[t, t_kind] = K_USER
    CPU[c, c_lazy] = 0
    p = T[t, t_proc]
    CPU[c, c_loaded] = p + 1 if p >= 0 else 0
    return True


@numba.njit(cache=True)
def loaded_cpus(mm, MM, ncpu, CPU, c_loaded):
    """``mm_cpumask(mm)``: the CPUs with ``mm`` loaded (running it or lazily holding it). An mm whose process the
    trace never named (no rss_stat of its own) is loaded nowhere the model can see: empty."""
    m = U0
    if mm < 0:
        return m
    owner = MM[mm, 0]
    if owner < 0:
        return m
    if WIDE:  # a word at a time: OR-ing bit(c) per CPU would cost O(ncpu · W)
        return rows_eq(CPU, c_loaded, owner + 1, ncpu)
    for c in range(ncpu):
        if CPU[c, c_loaded] == owner + 1:
            m |= bit(c)
    return m


@numba.njit(cache=True)
def lazy_cpus(ncpu, CPU, c_lazy):
    """The CPUs in lazy-TLB mode now: a batched flush sent now skips them."""
    if WIDE:  # as in loaded_cpus (C_LAZY is 0 or 1)
        return rows_eq(CPU, c_lazy, 1, ncpu)
    m = U0
    for c in range(ncpu):
        if CPU[c, c_lazy] != 0:
            m |= bit(c)
    return m


@numba.njit(cache=True)
def cpumask_of(mm, t, mode, trim_ns, ncpu, MM, CPU, c_loaded, last_run):
    """``mm_cpumask(mm)`` at ``t`` under ``mode`` (MASK_*)."""
    m = loaded_cpus(mm, MM, ncpu, CPU, c_loaded)
    if mm < 0 or mode == MASK_SWITCH:
        return m
    if WIDE:  # a word at a time, as in loaded_cpus
        return m | recent(last_run, mm, t, -1 if mode == MASK_KEPT else trim_ns, ncpu)
    for c in range(ncpu):
        lr = last_run[mm, c]
        if lr > 0 and (mode == MASK_KEPT or t - lr <= trim_ns):
            m |= bit(c)
    return m


@numba.njit(cache=True)
def _wrong_cpu(mm, R, ncpu, MM, CPU, c_loaded, last_run):
    """A flush of ``mm`` reached the CPUs ``R``: those running another mm drop out of its mask (WRONG_CPU)."""
    owner = MM[mm, 0]
    if owner < 0:
        return
    if WIDE:  # the bits of R a word at a time, not bit(c) per CPU
        for k in range((ncpu + 63) // 64):
            x = word(R, k)  # a uint64 (U0 is a W-word mask here)
            c = 64 * k
            while x != np.uint64(0):
                if (x & U1) and CPU[c, c_loaded] != owner + 1:
                    last_run[mm, c] = 0
                x >>= U1
                c += 1
        return
    for c in range(ncpu):
        if (R & bit(c)) != U0 and CPU[c, c_loaded] != owner + 1:
            last_run[mm, c] = 0


@numba.njit(cache=True)
def settle(
    out, lo, hi, batch_op, rflush_op, mode, ncpu, CPU, c_lazy, c_loaded, T, t_proc, t_kind, PROC_MMA, MM, last_run
):
    """Apply the CPU state to the ops ``out[lo:hi]`` emitted since the last call; returns ``hi``.

    BATCH without a traced reason 4 (``order`` 0; one with it carries the lazy set of its reason 4), and the ops at
    which a LUF model may flush deferred work (KEEP, FREE, TAKE, ALLOC, HOOK, RECLAIM_BEGIN): ``mask2`` = the CPUs
    lazy now (a flush sent now skips them). A recorded flush of a user task's own mm (or of
    the op's mm) under ``kept``: its targets running another mm leave that mm's mask. Called before every change
    of a CPU's state (``sched``) and before an unmap reads a mask, so each op sees the state of its moment."""
    if lo >= hi:
        return hi
    lz = lazy_cpus(ncpu, CPU, c_lazy)
    for j in range(lo, hi):
        r = out[j]
        op = r["op"]
        if op == batch_op:
            if r["order"] == 0:
                set_mask2(r, lz)
        elif carries_lazy(op):
            set_mask2(r, lz)  # a LUF flush sent here skips them (model/rmap.lazy_now, luf-model §9.7)
        elif r["op"] == rflush_op and mode == MASK_KEPT and opm(r["mask"]) != U0:
            mm = r["mm"]
            task = r["task"]
            if mm < 0 and task >= 0 and T[task, t_kind] == K_USER and T[task, t_proc] >= 0:
                mm = PROC_MMA[T[task, t_proc]]
            if mm >= 0:
                _wrong_cpu(mm, opm(r["mask"]), ncpu, MM, CPU, c_loaded, last_run)
    return hi


#: the last kernel that clears a CPU's mm_cpumask bit at every switch (``switch``); "Update mm_cpumask lazily"
#: (209954cbc7d0) came after it
LAST_SWITCH_TRIM = (6, 12)


def kernel_version(release: str | None) -> tuple[int, int] | None:
    """(major, minor) of a ``uname -r`` string such as ``6.12.118+deb12-amd64``; None when it has none."""
    if not release:
        return None
    m = re.match(r"\s*(\d+)\.(\d+)", str(release))
    return (int(m.group(1)), int(m.group(2))) if m else None


def mask_mode_for_kernel(release: str | None, default: str) -> tuple[str, str]:
    """The ``mm_cpumask`` mode of the recorded kernel and why: ``switch`` up to 6.12, ``kept`` after; ``default``
    when the release is unknown."""
    v = kernel_version(release)
    if v is None:
        return default, f"kernel release unknown: the default {default!r}"
    if v <= LAST_SWITCH_TRIM:
        return "switch", f"kernel {release} ≤ 6.12 clears mm_cpumask at every switch"
    return "kept", f"kernel {release} > 6.12 keeps lazy CPUs in mm_cpumask ('Update mm_cpumask lazily')"
