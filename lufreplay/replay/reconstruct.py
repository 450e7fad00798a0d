"""Batch reconstruction: time-ordered raw ops (one per trace row) → model ops (luf-model.md §8.2 events).

What the trace shows on a tracepoint-only host (host-probing §4.4–4.6) and how it is read here:

* reclaim: ``unmap`` rows (one per PTE/PMD, mm of the mapping) come just before the folio's ``page_cache`` delete
  (pfn, order, dev/ino, index) → one folio = FOLIO_BEGIN, one PTE op per (folio, mm), FOLIO_END. A local
  ``tlb_flush`` reason 3 right before an unmap means the PTE was flushed immediately (should_defer_flush false):
  the PTE is *not batched*. The batched flush of the task (``tlb_flush`` 4 + ``shootdown`` rows + reason 2) closes
  the batch → BATCH op carrying the recorded remote targets. Unmaps left without a delete at that point are a
  kept folio (F11) if file, or anon folios whose pfn is only seen at their free.
* migration: ``set_pte`` rows give the old pfn and the exact RO/RW of each mapping. Whether a PTE was batched
  follows the pass that unmapped it, read from the trace like reclaim: ``migrate_pages_sync`` (SYNC/SYNC_LIGHT,
  e.g. compact_memory) first runs a batched MIGRATE_ASYNC pass whose set_ptes accumulate until one batched flush
  (mm == NULL: ``tlb_flush`` 4 full + shootdowns + local reason 2); the folios it could not move are retried one
  by one in sync mode, where ``ptep_clear_flush`` flushes each PTE just *before* its set_pte row (reason 4 with a
  small page count + shootdowns, and/or a local reason 3). Such a PTE is not batched; so is every PTE of a
  migration batch that ends (move phase) without any recorded flush (nothing needed one: vanilla sends nothing,
  LUF has nothing to defer). set_pmd (``pmdp_invalidate``) is always flushed at once. Memory-failure migrations
  flush their key at once (F12).
* exact tier (kernels with kprobes; ``meta.exact``): a ``pte`` row is the entry the task's rmap walk is about to
  clear, read before the clear. It gives the task's next ``unmap`` row its own write bit (PTE_EXACT; the VMA
  inference is only compared with it) and the next set_pte of its address the mm of its owner process. No other step
  sees the rows, so a trace without them replays exactly as before.
* the other recorded flushes (immediate/PMD in reclaim and migration, munmap zaps, flush_tlb_batched_pending, the
  parent's full flush in fork (dup_mmap), anything else) become RFLUSH ops that every model passes through unchanged.
* allocator rows → FREE / DRAIN / TAKE / ALLOC; faults, syscalls, file rows, kthread switches → HOOK ops (F3–F13).

The masks of a PTE are the modelled ``mm_cpumask(mm)`` at the unmap (lufreplay.replay.cpustate, option
``mm_cpumask``), lazy CPUs included (the models skip the CPUs lazy when a flush is sent: the ops where one may be
sent carry that lazy set in ``mask2``); with ``clip_to_recorded`` they are clipped instead to the CPUs the
recorded batch flush really targeted plus the sender. A batch's items are emitted together right before its BATCH op, so the
model sees the PTE clears at the batch's flush time (µs later than the trace): the ordering of a batch's
internal events is kept, and the stale window uses each folio's own unmap time.
"""

from __future__ import annotations

import numba
import numpy as np

from lufreplay.model import ops as O
from lufreplay.model.kernels import U0, U1, bit, opm, set_mask, set_mask2, word
from lufreplay.replay import cpustate as CS

# ---- per-task columns of T ------------------------------------------------------------------------------
T_PROC, T_CTX, T_OTHER_J, T_MIG_REASON, T_SYS_NR, T_SYS_UNTIL, T_IMM = 0, 1, 2, 3, 4, 5, 6
T_PEND_HEAD, T_PEND_TAIL, T_BATCH_HEAD, T_BATCH_TAIL, T_BATCH_N, T_MIG_PFN, T_MIG_FLAGS, T_BFLAGS = (
    7,
    8,
    9,
    10,
    11,
    12,
    13,
    14,
)
T_FAULT_TS, T_FAULT_COW = 15, 16  # the task's last fault (ts + 1), and whether it could break a COW
T_KIND = 17  # user task or kernel thread (lufreplay.replay.cpustate)
T_MMPUT_J = 18  # the task's first unattributed flush (index into ``out`` + 1) that its exec or exit row may name
# the task's last exact-tier row not yet matched (exact_row): EX_* flags (0: none), its time, owner process, address
T_EX, T_EX_TS, T_EX_PROC, T_EX_ADDR = 19, 20, 21, 22
NT = 23
# ---- per-CPU columns of CPU -----------------------------------------------------------------------------
C_OPEN, C_TASK, C_N, C_TS, C_LOCAL, C_FULL, C_CUR_TASK, C_CUR_MM, C_PROC, C_PAGES = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9
C_LOADED, C_LAZY = 10, 11  # the mm loaded (process + 1) and lazy-TLB mode (lufreplay.replay.cpustate)
C_SENT = 12  # the open flush traced reason 4 (remote_send_ipi, before lazy/PV filtering)
NC = 13
# CPUM (CPU masks, 2 rows per CPU): row c = the targets of CPU c's open recorded flush; row ncpu + c = the CPUs lazy
# at its reason 4 (should_flush_tlb reads them right then), ncpu = the rows of CPU
# ---- scalars S --------------------------------------------------------------------------------------------
S_FREE, S_NOUT, S_POOL_LIVE, S_LAST_TS = 0, 1, 2, 3
S_STAMPED = 4  # BATCH ops of ``out`` before this index carry their lazy set (cpustate.settle)
NS = 5
# ---- options vector -------------------------------------------------------------------------------------------
(
    X_TRIM_NS,
    X_CLIP,
    X_UNKNOWN_ELIG,
    X_SHARED_W_RO,
    X_SHARED_RO_MAYWRITE,
    X_NO_VMA_MAYWRITE,
    X_CONFIG,
    X_ARM64,
    X_ATOMIC_NO_SD,
    X_DIRTY_MKCLEAN,
    X_NCPU,
    X_CPUMASK,  # cpustate.MASK_*
) = range(12)
NX = 12
# ---- reconstruction statistics (int64 vector) ----------------------------------------------------------------
NREJ = len(O.REJECT)
RS_FOLIOS = 0  # folios by rejection reason
RS_PAGES = RS_FOLIOS + NREJ  # pages by rejection reason
RS_PROV = RS_PAGES + NREJ  # PTEs: exact, inferred, unknown
RS_BATCHES = RS_PROV + 3
RS_RECORDED_ROWS = RS_BATCHES + 1
RS_SHARED_W_FAULTS = RS_RECORDED_ROWS + 1  # write faults in shared writable file VMAs: pages mkclean may clean
RS_SWITCH_GUESSED = RS_SHARED_W_FAULTS + 1  # switches to a task of unknown kind (cpustate.switch_in guessed)
RS_PTE_NO_OWNER = RS_SWITCH_GUESSED + 1  # batched PTE ops of an mm whose process the trace never named
# exact tier: pte rows; reclaim PTEs whose exact RO/RW the maps inference agrees with / contradicts / cannot tell;
# migration PTEs given their mm / left without one (owner process unnamed by the trace)
RS_EX_ROWS = RS_PTE_NO_OWNER + 1
RS_EX_AGREE, RS_EX_DISAGREE, RS_EX_NO_INFERENCE = RS_EX_ROWS + 1, RS_EX_ROWS + 2, RS_EX_ROWS + 3
RS_EX_MIG_MM, RS_EX_MIG_NO_MM = RS_EX_ROWS + 4, RS_EX_ROWS + 5
NRS = RS_EX_MIG_NO_MM + 1

# migration-folio running flags (T_MIG_FLAGS)
F_WRITABLE, F_UNBATCHED, F_UNKNOWN = 1, 2, 4
# a pending PTE item of a migration folio (pool only: cleared before the op is emitted)
PTE_MIG_ITEM = 0x100
# T_EX: an exact-tier row is pending, its entry's write bit, and its rmap walk (op: 1 unmap, 2 migrate) << 4
EX_PENDING, EX_WRITABLE = 1, 2
# an exact row is matched only by the task's next unmap within this time: the rss_stat decrement follows the clear
# by µs (median 3.9 µs in the 4-vCPU test bed, but up to 44 ms when TCG stalls the vCPU); a later one is not from
# this walk (it gave up on that entry)
EXACT_WINDOW_NS = 100_000_000
# a migration FOLIO_END waiting in the batch list for its batch's end (flags = FE_MIG | static << 8 | F_*): whether
# the batch got a recorded flush decides whether its PTEs were batched
FE_MIG = 1 << 31
# maps flags
V_R, V_W, V_X, V_S = 1, 2, 4, 8

GFP_DIRECT_RECLAIM = 0x400
MAP_FIXED = 0x10
SYS_MMAP, SYS_MUNMAP, SYS_MPROTECT, SYS_MADVISE, SYS_MREMAP = 0, 1, 2, 3, 4
ZAP_MADVISE = (4, 8, 9, 24)  # DONTNEED, FREE, REMOVE, DONTNEED_LOCKED
CTX_MIGRATION = 6
IMM_WINDOW_NS = 20_000
PMD_BYTES = 2 << 20  # HPAGE_PMD_SIZE with 4 KiB pages (x86-64; arm64 4K)
# dup_mmap's flush_tlb_mm(oldmm) comes before the fork row (sched_process_fork fires when copy_process is done);
# 1.5 ms was seen for a large python parent, ~30 µs for bash
FORK_WINDOW_NS = 2_000_000
# exec_mmap's mmput of the old mm and exit_mm's come before the exec / exit row (sched_process_exec fires when
# the new image is set up, sched_process_exit after exit_mm); 5.5 ms and 28 ms were seen under qemu TCG
MMPUT_WINDOW_NS = 100_000_000
# wp_page_copy flushes the old PTE µs after the fault row (exceptions:page_fault_user fires at fault entry); the
# new page's allocation (and nothing else of the task) may come in between
COW_WINDOW_NS = 50_000


# ---------------------------------------------------------------------------------------------------------------
# maps lookups: snapshots per process, rows sorted by start
# ---------------------------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def find_snapshot(proc, t, pr_lo, pr_hi, sn_ts):
    """Index of the newest maps snapshot of ``proc`` taken at or before ``t`` (else its first one, else -1)."""
    if proc < 0 or proc >= pr_lo.shape[0]:
        return -1
    lo = pr_lo[proc]
    hi = pr_hi[proc]
    if lo >= hi:
        return -1
    best = lo
    for s in range(lo, hi):  # snapshots per process are few; sorted by time
        if sn_ts[s] <= t:
            best = s
        else:
            break
    return best


@numba.njit(cache=True)
def vma_by_addr(snap, addr, sn_lo, sn_hi, mp_start, mp_end):
    if snap < 0:
        return -1
    for r in range(sn_lo[snap], sn_hi[snap]):
        if mp_start[r] <= addr < mp_end[r]:
            return r
    return -1


@numba.njit(cache=True)
def vma_by_fileoff(snap, mapping, off, sn_lo, sn_hi, mp_start, mp_end, mp_off, mp_map):
    if snap < 0:
        return -1
    for r in range(sn_lo[snap], sn_hi[snap]):
        if mp_map[r] == mapping and mp_off[r] <= off < mp_off[r] + (mp_end[r] - mp_start[r]):
            return r
    return -1


@numba.njit(cache=True)
def shared_file_vma_in_range(snap, a0, a1, sn_lo, sn_hi, mp_start, mp_end, mp_map, mp_flags):
    if snap < 0:
        return -1
    for r in range(sn_lo[snap], sn_hi[snap]):
        if mp_start[r] < a1 and a0 < mp_end[r] and mp_map[r] >= 0 and (mp_flags[r] & V_S):
            return mp_map[r]
    return -1


# ---------------------------------------------------------------------------------------------------------------
# pool of pending batch items (linked lists per task)
# ---------------------------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def pool_new(pool, nxt, S):
    i = S[S_FREE]
    S[S_FREE] = nxt[i]
    nxt[i] = -1
    S[S_POOL_LIVE] += 1
    r = pool[i]
    r["ts"] = 0
    r["op"] = 0
    r["sub"] = 0
    r["cpu"] = 0
    r["task"] = -1
    r["mm"] = -1
    r["mapping"] = -1
    r["pfn"] = -1
    r["order"] = 0
    r["flags"] = 0
    set_mask(r, U0)
    set_mask2(r, U0)
    r["aux"] = 0
    return i


@numba.njit(cache=True)
def pool_free(i, nxt, S):
    nxt[i] = S[S_FREE]
    S[S_FREE] = i
    S[S_POOL_LIVE] -= 1


@numba.njit(cache=True)
def list_append(T, task, head_col, tail_col, i, nxt):
    if T[task, tail_col] < 0:
        T[task, head_col] = i
    else:
        nxt[T[task, tail_col]] = i
    T[task, tail_col] = i


@numba.njit(cache=True)
def emit(out, S, ts, op, sub, cpu, task, mm, mapping, pfn, order, flags, mask, mask2, aux):
    j = S[S_NOUT]
    r = out[j]
    r["ts"] = ts
    r["op"] = op
    r["sub"] = sub
    r["cpu"] = cpu
    r["task"] = task
    r["mm"] = mm
    r["mapping"] = mapping
    r["pfn"] = pfn
    r["order"] = order
    r["flags"] = flags
    set_mask(r, mask)
    set_mask2(r, mask2)
    r["aux"] = aux
    S[S_NOUT] = j + 1


@numba.njit(cache=True)
def _folio_reason(static, flags, unknown_elig):
    if static != 0:
        return static
    if flags & F_UNBATCHED:
        return O.J_NOT_BATCHED
    if flags & F_WRITABLE:
        return O.J_WRITABLE_PTE
    if (flags & F_UNKNOWN) and not unknown_elig:
        return O.J_UNKNOWN_RW
    return 0


@numba.njit(cache=True)
def _static_reason(order, X):
    if X[X_ARM64] != 0:
        return O.J_ARCH_NOOP
    if X[X_CONFIG] != 0:
        return O.J_CONFIG_INIT_ON_FREE_KASAN
    if order > 0:
        return O.J_LARGE_FOLIO
    return 0


@numba.njit(cache=True)
def _unlarge_reason(static, flags, X):
    """The folio's reason if v12's large-folio exclusion were removed (FOLIO_END.aux; option large_folios)."""
    if static != O.J_LARGE_FOLIO:
        return static if static != 0 else _folio_reason(0, flags, X[X_UNKNOWN_ELIG] != 0)
    return _folio_reason(0, flags, X[X_UNKNOWN_ELIG] != 0)


@numba.njit(cache=True)
def _count_folio(reason, order, RS):
    RS[RS_FOLIOS + reason] += 1
    RS[RS_PAGES + reason] += np.int64(1) << order


@numba.njit(cache=True)
def _close_mig_folio(task, T, pool, nxt, S):
    """Append FOLIO_END to the open migration folio of ``task`` (set_pte rows of one folio are consecutive).
    Its reason is decided when the batch ends (``_finish_mig_folio``): a batch without a recorded flush batched
    nothing."""
    if T[task, T_MIG_PFN] < 0:
        return
    fl = T[task, T_MIG_FLAGS]
    e = pool_new(pool, nxt, S)
    r = pool[e]
    r["op"] = O.M_FOLIO_END
    r["flags"] = FE_MIG | (fl & 0xFFFF)  # static << 8 | F_*
    r["task"] = task
    r["pfn"] = T[task, T_MIG_PFN]
    tail = T[task, T_BATCH_TAIL]
    r["ts"] = pool[tail]["ts"] if tail >= 0 else 0
    r["order"] = (fl >> 16) & 0xFF
    list_append(T, task, T_BATCH_HEAD, T_BATCH_TAIL, e, nxt)
    T[task, T_MIG_PFN] = -1
    T[task, T_MIG_FLAGS] = 0


@numba.njit(cache=True)
def _finish_mig_folio(r, flushed, RS, X):
    """A migration folio's batch ended: its rejection reason (F_UNBATCHED if the batch had no recorded flush)."""
    fl = r["flags"] & 0xFF
    static = (r["flags"] >> 8) & 0xFF
    if not flushed:
        fl |= F_UNBATCHED
    reason = _folio_reason(static, fl, X[X_UNKNOWN_ELIG] != 0)
    r["sub"] = reason
    r["aux"] = _unlarge_reason(static, fl, X)
    r["flags"] = 0
    _count_folio(reason, r["order"], RS)


@numba.njit(cache=True)
def _attach_leftover(task, ts, T, pool, nxt, S, RS, X):
    """Unmaps not followed by a page-cache delete when the batch ends: a kept file folio (F11) or anon folios."""
    h = T[task, T_PEND_HEAD]
    if h < 0:
        return
    anon = True
    fl = 0
    i = h
    while i >= 0:
        RS[RS_PROV + (0 if pool[i]["flags"] & O.PTE_EXACT else 2)] += pool[i]["aux"]
        if pool[i]["sub"] != 1:  # rss member: 1 = anon
            anon = False
        if pool[i]["flags"] & O.PTE_UNBATCHED:
            fl |= F_UNBATCHED
        if pool[i]["flags"] & O.PTE_WRITABLE:
            fl |= F_WRITABLE
        if (pool[i]["flags"] & (O.PTE_EXACT | O.PTE_INFERRED)) == 0:
            fl |= F_UNKNOWN
        i = nxt[i]
    static = _static_reason(0, X)
    reason = _folio_reason(static, fl, X[X_UNKNOWN_ELIG] != 0)
    b = pool_new(pool, nxt, S)
    pool[b]["ts"] = pool[h]["ts"]
    pool[b]["op"] = O.M_FOLIO_BEGIN
    pool[b]["sub"] = static
    pool[b]["task"] = task
    list_append(T, task, T_BATCH_HEAD, T_BATCH_TAIL, b, nxt)
    nxt[T[task, T_BATCH_TAIL]] = h
    T[task, T_BATCH_TAIL] = T[task, T_PEND_TAIL]
    T[task, T_PEND_HEAD] = -1
    T[task, T_PEND_TAIL] = -1
    e = pool_new(pool, nxt, S)
    pool[e]["ts"] = ts
    pool[e]["op"] = O.M_FOLIO_END
    pool[e]["task"] = task
    if anon:
        pool[e]["sub"] = reason
        if reason == 0:
            T[task, T_BFLAGS] |= O.B_ANON_UNKNOWN_PFN
        _count_folio(reason, 0, RS)
        list_append(T, task, T_BATCH_HEAD, T_BATCH_TAIL, e, nxt)
    else:
        # kept: eligible during the walk (its mask joins LUF), then reclaim could not free it
        pool[e]["sub"] = O.J_KEPT_NOT_FREED if reason == 0 else reason
        _count_folio(pool[e]["sub"], 0, RS)
        list_append(T, task, T_BATCH_HEAD, T_BATCH_TAIL, e, nxt)
        if reason == 0:
            k = pool_new(pool, nxt, S)
            pool[k]["ts"] = ts
            pool[k]["op"] = O.M_KEEP
            pool[k]["task"] = task
            list_append(T, task, T_BATCH_HEAD, T_BATCH_TAIL, k, nxt)


@numba.njit(cache=True)
def close_batch(task, ts, sender, R, nrows, local, T, pool, nxt, S, out, RS, X):
    """End of a reclaim/migration batch: emit its items (masks clipped to the recorded targets) and BATCH."""
    _close_mig_folio(task, T, pool, nxt, S)
    _attach_leftover(task, ts, T, pool, nxt, S, RS, X)
    if T[task, T_BATCH_HEAD] < 0 and nrows == 0:
        return False
    allowed = R | bit(sender)
    clip = X[X_CLIP] != 0
    # a batched migration PTE always ends in a recorded flush (arch_tlbbatch_flush traces reason 4, or reason 2
    # when only the sender is left); none at all: every PTE was cleared by ptep_clear_flush with nothing to flush
    flushed = nrows > 0 or local != 0 or R != U0
    i = T[task, T_BATCH_HEAD]
    while i >= 0:
        r = pool[i]
        if r["op"] == O.M_PTE:
            mig = (r["flags"] & PTE_MIG_ITEM) != 0
            r["flags"] = r["flags"] & ~np.uint32(PTE_MIG_ITEM)
            # migration: the recorded targets are the evidence (set_migration_pte has no mm; the exact tier's mm
            # joins the mm's LUF batch, the masks stay the recorded ones)
            if r["mm"] < 0 or mig:
                set_mask2(r, allowed)
                if not flushed:
                    r["flags"] |= O.PTE_UNBATCHED
            set_mask(r, (opm(r["mask2"]) & allowed) if clip else opm(r["mask2"]))
        elif r["op"] == O.M_FOLIO_END and (r["flags"] & FE_MIG):
            _finish_mig_folio(r, flushed, RS, X)
        emit(
            out,
            S,
            r["ts"],
            r["op"],
            r["sub"],
            r["cpu"],
            r["task"],
            r["mm"],
            r["mapping"],
            r["pfn"],
            r["order"],
            r["flags"],
            opm(r["mask"]),
            opm(r["mask2"]),
            r["aux"],
        )
        j = nxt[i]
        pool_free(i, nxt, S)
        i = j
    fl = T[task, T_BFLAGS]
    if T[task, T_CTX] == CTX_MIGRATION:
        fl |= O.B_MIGRATION
        if T[task, T_MIG_REASON] == 1:
            fl |= O.B_MEMFAIL
    emit(out, S, ts, O.M_BATCH, local, sender, task, -1, -1, -1, 0, fl, R, U0, nrows)
    RS[RS_BATCHES] += 1
    T[task, T_BATCH_HEAD] = -1
    T[task, T_BATCH_TAIL] = -1
    T[task, T_BATCH_N] = 0
    T[task, T_BFLAGS] = 0
    return True


@numba.njit(cache=True)
def _has_batch(task, T):
    return T[task, T_BATCH_HEAD] >= 0 or T[task, T_PEND_HEAD] >= 0 or T[task, T_MIG_PFN] >= 0


@numba.njit(cache=True)
def close_group(c, T, CPU, CPUM, MM, PROC_MMA, pool, nxt, S, out, RS, X, nx_set=False):
    """A recorded sender-side flush is complete: classify it and emit BATCH or RFLUSH. ``nx_set``: the row that
    closes it is a set_pte (of a range flush) / set_pmd of the same task right after it."""
    task = CPU[c, C_TASK]
    R = CPUM[c]
    n = CPU[c, C_N]
    local = CPU[c, C_LOCAL]
    ts = CPU[c, C_TS]
    full = CPU[c, C_FULL]
    pages = CPU[c, C_PAGES]
    CPU[c, C_OPEN] = 0
    CPUM[c] = U0
    CPU[c, C_N] = 0
    CPU[c, C_LOCAL] = 0
    RS[RS_RECORDED_ROWS] += n
    lflag = 1 if local != 0 else 0
    fflag = 2 if full != 0 else 0
    in_ctx = task >= 0 and T[task, T_CTX] != 0
    if local == 0 and nx_set and in_ctx:
        # ptep_clear_flush / pmdp_invalidate of a migration entry about to be set, in an mm not loaded here (no
        # local flush row): the PTE is flushed at once, not batched; the open batch, if any, goes on
        T[task, T_IMM] = ts + 1
        emit(out, S, ts, O.M_RFLUSH, O.C_IMMEDIATE, c, task, -1, -1, -1, 0, fflag, R, U0, n)
        return
    sent = CPU[c, C_SENT]
    CPU[c, C_SENT] = 0
    if task >= 0 and local != 3 and _has_batch(task, T):
        if close_batch(task, ts, c, R, n, lflag, T, pool, nxt, S, out, RS, X):
            b = out[S[S_NOUT] - 1]
            b["order"] = sent  # BATCH.order: reason 4 traced, the cpumask had a remote CPU
            if sent != 0:
                # the lazy set when the IPIs went out, not when the group closed (the sender's next row may come
                # ms later, after other CPUs switched): cpustate.settle leaves it
                set_mask2(b, CPUM[CPU.shape[0] + c])
        return
    if local == 2:
        cause = O.C_BATCH_UNSEEN if in_ctx else O.C_OTHER
        emit(out, S, ts, O.M_RFLUSH, cause, c, task, -1, -1, -1, 0, lflag | fflag | O.RF_MM_NULL, R, U0, n)
        return
    if local == 3 and in_ctx:
        T[task, T_IMM] = ts + 1  # the next unmap of this task was flushed right here (PMD / per-PTE)
        emit(out, S, ts, O.M_RFLUSH, O.C_IMMEDIATE, c, task, -1, -1, -1, 0, lflag | fflag, R, U0, n)
        return
    _emit_context_flush(ts, c, task, R, n, lflag | fflag, pages, T, CPU, MM, PROC_MMA, out, S, RS)


@numba.njit(cache=True)
def _single_page_cause(ts, task, n, T, RS):
    """A single-page flush outside any traced syscall, reclaim or migration: a COW break of the task's write fault
    just before, or (it sent IPIs, no fault of the task just before, and some page of a shared writable file
    mapping was written) writeback's folio_mkclean. Heuristic: the trace has no row for either; anything else
    stays other (so do local-only flushes with no recent fault: too many other causes flush one local page)."""
    recent = T[task, T_FAULT_TS] != 0 and ts - (T[task, T_FAULT_TS] - 1) <= COW_WINDOW_NS
    if recent:
        cow = T[task, T_FAULT_COW] != 0
        T[task, T_FAULT_COW] = 0  # one COW break (one flush) per fault
        return O.C_COW_FAULT if cow else O.C_OTHER
    if n > 0 and RS[RS_SHARED_W_FAULTS] > 0:
        return O.C_FOLIO_MKCLEAN
    return O.C_OTHER


@numba.njit(cache=True)
def _emit_context_flush(ts, c, task, R, n, flags, pages, T, CPU, MM, PROC_MMA, out, S, RS):
    """A recorded flush outside reclaim: batched_pending, zap, cow_fault, folio_mkclean or other, by the syscall
    the task is in (or is not in)."""
    cause = O.C_OTHER
    mm = -1
    credit = U0
    other_mm = 0  # how many credited CPUs run another mm (R6): a count, for any CPU count
    if task >= 0 and ts <= T[task, T_SYS_UNTIL]:
        nr = T[task, T_SYS_NR]
        proc = T[task, T_PROC]
        mm = PROC_MMA[proc] if proc >= 0 else -1
        if nr in (SYS_MMAP, SYS_MUNMAP, SYS_MPROTECT, SYS_MADVISE, SYS_MREMAP):
            if mm >= 0 and MM[mm, 1] != 0:
                cause = O.C_BATCHED_PENDING
                MM[mm, 1] = 0
                credit = R | bit(c)
                for w in range(CPU.shape[0] // 64):  # the bits of R, a word at a time
                    m = word(R, w)  # a uint64 (U0 is a W-word mask in the W-word copy)
                    k = 64 * w
                    while m != np.uint64(0):
                        if (m & U1) and CPU[k, C_CUR_MM] != mm:
                            other_mm += 1
                        m >>= U1
                        k += 1
            elif nr != SYS_MPROTECT:
                cause = O.C_ZAP
    elif task >= 0 and pages == 1 and (flags & 2) == 0 and T[task, T_CTX] == 0:
        cause = _single_page_cause(ts, task, n, T, RS)
    if cause == O.C_OTHER and (flags & 2) and task >= 0:
        T[task, T_OTHER_J] = S[S_NOUT] + 1  # a fork row of this task may follow: dup_mmap's flush_tlb_mm
    if cause == O.C_OTHER and task >= 0 and T[task, T_MMPUT_J] == 0:
        T[task, T_MMPUT_J] = S[S_NOUT] + 1  # an exec or exit row of this task may follow: exit_mmap's flushes
    emit(out, S, ts, O.M_RFLUSH, cause, c, task, mm, -1, other_mm, 0, flags, R, credit, n)


@numba.njit(cache=True, inline="always")
def settle_lazy(S, CPU, T, PROC_MMA, MM, LAST_RUN, X, out):
    """mm_cpumask: BATCH ops emitted since the last CPU-state change get the lazy CPUs of that moment."""
    S[S_STAMPED] = CS.settle(
        out, S[S_STAMPED], S[S_NOUT], O.M_BATCH, O.M_RFLUSH, np.int64(X[X_CPUMASK]), np.int64(X[X_NCPU]), CPU,
        C_LAZY, C_LOADED, T, T_PROC, T_KIND, PROC_MMA, MM, LAST_RUN,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# the steps of reconstruct(), one per kind of raw op (docs/simulate.md, "Pipeline", names them in this order)
# ---------------------------------------------------------------------------------------------------------------
@numba.njit(cache=True, inline="always")
def track_task(r, T, LAST_RUN, PROC_MMA):
    """Task tracking: the task's process, the CPUs its mm ran on, and the windows a row of the task ends
    (a full flush waiting for its fork row, flushes waiting for an exec or exit row; a write fault waiting for its
    COW break). Returns the mm or -1."""
    ts = r["ts"]
    kind = r["kind"]
    task = r["task"]
    proc = r["proc"]
    if task >= 0 and proc >= 0:
        T[task, T_PROC] = proc
    if kind == O.R_MM or kind == O.R_FAULT or kind == O.R_SYSCALL:  # rows only user tasks emit
        CS.learn_kind(T, task, CS.K_USER, T_KIND)
    pmm = PROC_MMA[proc] if proc >= 0 else -1
    if pmm >= 0:
        LAST_RUN[pmm, r["cpu"]] = ts
    if task >= 0 and kind != O.R_TLB and kind != O.R_SD and kind != O.R_SCHED and kind != O.R_PROC and kind != O.R_PTEX:
        if kind != O.R_PAGE and kind != O.R_MM:  # the mm teardown frees pages and moves rss counters (rss_stat)
            T[task, T_MMPUT_J] = 0
        if kind != O.R_PAGE:  # copy_process may allocate pages; anything else: the flush was not the fork's
            T[task, T_OTHER_J] = 0
            if kind != O.R_FAULT:  # wp_page_copy allocates the new page; anything else ends the COW window
                T[task, T_FAULT_COW] = 0
    return pmm


@numba.njit(cache=True, inline="always")
def shows_mm_loaded(r, CPU):
    """Lazy state: ``r`` is a row that only a CPU running a task with its mm loaded emits: that task's own
    rss_stat, user fault or syscall; a traced local flush (reasons 2, 3: flush_tlb_func returns untraced on a
    lazy CPU); or switch_mm's reason 0 at a context switch (switch_mm_irqs_off runs only when the next task has an
    mm; the row still carries the previous task's pid: one of the running task is flush_tlb_func moving a lazy CPU
    to init_mm, no proof)."""
    kind = r["kind"]
    if kind == O.R_TLB:
        sub = r["sub"]
        if sub == 0:
            return r["task"] != CPU[r["cpu"], C_CUR_TASK]
        if sub != 2 and sub != 3:
            return False
    elif kind != O.R_MM and kind != O.R_FAULT and kind != O.R_SYSCALL:
        return False
    return r["task"] == CPU[r["cpu"], C_CUR_TASK]


@numba.njit(cache=True, inline="always")
def flush_ends_at(r, CPU):
    """Flush grouping: whether this row ends its CPU's open recorded flush (another row of the sender task), and
    (second value) whether it is the set_pte / set_pmd that a per-PTE or PMD flush was for."""
    c = r["cpu"]
    kind = r["kind"]
    if CPU[c, C_OPEN] == 0 or kind == O.R_TLB or kind == O.R_SD or kind == O.R_PTEX or CPU[c, C_TASK] != r["task"]:
        return False, False
    sub = r["sub"]
    # a per-PTE flush is a range flush (a few pages), a batched one is full; a PMD flush is full too
    nx_set = (
        kind == O.R_MIG and (sub == 2 or (sub == 0 and CPU[c, C_FULL] == 0)) and r["ts"] - CPU[c, C_TS] <= IMM_WINDOW_NS
    )
    return True, nx_set


@numba.njit(cache=True, inline="always")
def _open_group(c, task, ts, pages, CPU):
    """A recorded flush starts on CPU ``c`` (its local row, if any, is set by the caller)."""
    CPU[c, C_OPEN] = 1
    CPU[c, C_TASK] = task
    CPU[c, C_TS] = ts
    CPU[c, C_FULL] = 1 if pages == -1 else 0
    CPU[c, C_PAGES] = pages


@numba.njit(cache=True, inline="always")
def tlb_flush_row(r, T, CPU, CPUM, MM, PROC_MMA, pool, nxt, S, out, RS, X):
    """Flush grouping: a ``tlb_flush`` row opens (reason 4: the remote send), or ends (2, 3: the local flush that
    follows) a recorded flush of its CPU; a local full flush alone (reason 0) is a local-only flush."""
    c = r["cpu"]
    sub = r["sub"]
    pages = r["a"]
    if sub == 4:
        if CPU[c, C_OPEN] != 0:
            close_group(c, T, CPU, CPUM, MM, PROC_MMA, pool, nxt, S, out, RS, X)
        _open_group(c, r["task"], r["ts"], pages, CPU)
        CPU[c, C_SENT] = 1
        CPUM[CPU.shape[0] + c] = CS.lazy_cpus(np.int64(X[X_NCPU]), CPU, C_LAZY)
    elif sub == 2 or sub == 3:
        if CPU[c, C_OPEN] != 0:
            if pages == -1:
                CPU[c, C_FULL] = 1
        else:
            _open_group(c, r["task"], r["ts"], pages, CPU)
        CPU[c, C_LOCAL] = sub
        close_group(c, T, CPU, CPUM, MM, PROC_MMA, pool, nxt, S, out, RS, X)
    elif sub == 0 and pages == -1:
        emit(out, S, r["ts"], O.M_LFLUSH, 0, c, r["task"], -1, -1, -1, 0, 0, bit(c), U0, 0)


@numba.njit(cache=True, inline="always")
def shootdown_row(r, T, CPU, CPUM, MM, PROC_MMA, pool, nxt, S, out, RS, X):
    """Flush grouping: a ``shootdown`` row adds its target to its CPU's open recorded flush (a target seen twice,
    or another task, starts a new one)."""
    c = r["cpu"]
    task = r["task"]
    tgt = r["a"]
    if tgt < 0 or tgt >= CPU.shape[0]:
        return
    if CPU[c, C_OPEN] != 0 and ((CPUM[c] & bit(tgt)) != U0 or CPU[c, C_TASK] != task):
        close_group(c, T, CPU, CPUM, MM, PROC_MMA, pool, nxt, S, out, RS, X)
    if CPU[c, C_OPEN] == 0:
        _open_group(c, task, r["ts"], 0, CPU)  # shootdowns with no send row: the size is unknown
    CPUM[c] |= bit(tgt)
    CPU[c, C_N] += 1


@numba.njit(cache=True, inline="always")
def exact_row(r, T, RS):
    """Exact tier: a ``pte`` row (the entry the task's rmap walk is about to clear) waits for the task's next unmap
    or set_pte row; every other step ignores it, so a trace without the tier replays the same."""
    task = r["task"]
    RS[RS_EX_ROWS] += 1
    if task < 0:
        return
    T[task, T_EX] = EX_PENDING | (EX_WRITABLE if r["b"] & 1 else 0) | ((r["sub"] & 0xF) << 4)
    T[task, T_EX_TS] = r["ts"]
    T[task, T_EX_PROC] = r["a"]
    T[task, T_EX_ADDR] = r["d"]


@numba.njit(cache=True, inline="always")
def _take_exact(task, ts, op, addr, mm, T, MM):
    """The task's pending exact row if it is the entry of this unmap (op 1: within EXACT_WINDOW_NS, of the same
    process when both are known) or set_pte (op 2: same address); its EX_* flags, or 0. A match consumes it."""
    ex = T[task, T_EX]
    if ex == 0 or (ex >> 4) != op:
        return 0
    if op == 1:
        if ts - T[task, T_EX_TS] > EXACT_WINDOW_NS:
            return 0
        pp = T[task, T_EX_PROC]
        if mm >= 0 and pp >= 0 and MM[mm, 0] >= 0 and MM[mm, 0] != pp:
            return 0
    elif T[task, T_EX_ADDR] != addr:
        return 0
    T[task, T_EX] = 0
    return ex


@numba.njit(cache=True, inline="always")
def pmd_unmap(delta):
    """An rss_stat drop of a whole PMD is never batched: reclaim splits a PMD-mapped folio (TTU_SPLIT_HUGE_PMD:
    split_huge_pmd_locked → pmdp_huge_clear_flush, and a file PMD is then dropped, not remapped), which flushes at
    once; only PTEs go to the batch (set_tlb_ubc_flush_pending). Its flush can come more than IMM_WINDOW_NS before
    the row on a busy host (28 µs seen), so the size decides, not the delay."""
    return delta <= -PMD_BYTES


@numba.njit(cache=True, inline="always")
def unmap_pte(r, T, CPU, MM, LAST_RUN, PROC_MMA, pool, nxt, S, out, RS, X):
    """Folio grouping: an ``unmap`` row becomes a pending PTE item of its task (consecutive rows of one mm are
    counted in one item) until a page-cache delete names the folio or the batch ends."""
    ts = r["ts"]
    c = r["cpu"]
    task = r["task"]
    mm = r["a"]
    T[task, T_CTX] = r["c"]
    # a local flush of this task just before (≤ 20 µs) the rss_stat: ptep_clear_flush / PMD flush
    unb = (T[task, T_IMM] != 0 and ts - (T[task, T_IMM] - 1) <= IMM_WINDOW_NS) or pmd_unmap(r["b"])
    T[task, T_IMM] = 0
    fl = O.PTE_UNBATCHED if unb else 0
    ex = _take_exact(task, ts, 1, -1, mm, T, MM)
    if ex != 0:
        fl |= O.PTE_EXACT | (O.PTE_WRITABLE if ex & EX_WRITABLE else 0)
    tail = T[task, T_PEND_TAIL]
    if tail >= 0 and pool[tail]["mm"] == mm and pool[tail]["flags"] == fl:
        pool[tail]["aux"] += 1
    else:
        p = pool_new(pool, nxt, S)
        q = pool[p]
        q["ts"] = ts
        q["op"] = O.M_PTE
        q["sub"] = r["sub"]  # rss member
        q["cpu"] = c
        q["task"] = task
        q["mm"] = mm
        q["flags"] = fl
        q["aux"] = 1
        settle_lazy(S, CPU, T, PROC_MMA, MM, LAST_RUN, X, out)
        m2 = CS.cpumask_of(
            mm, ts, np.int64(X[X_CPUMASK]), np.int64(X[X_TRIM_NS]), np.int64(X[X_NCPU]), MM, CPU, C_LOADED, LAST_RUN
        )
        set_mask2(q, m2)
        if mm >= 0 and MM[mm, 0] < 0 and not unb:
            RS[RS_PTE_NO_OWNER] += 1
        list_append(T, task, T_PEND_HEAD, T_PEND_TAIL, p, nxt)
    if not unb and mm >= 0:
        MM[mm, 1] = 1  # mm->tlb_flush_batched pending: the next mprotect/munmap flushes the mm (F9)


@numba.njit(cache=True, inline="always")
def _pte_rw_from_maps(q, ts, mapping, off, MM, maps, RS, X):
    """A file PTE's RO/RW from the VMA that maps its file offset (else unknown); returns the folio's F_* flags."""
    pr_lo, pr_hi, sn_ts, sn_lo, sn_hi, mp_start, mp_end, mp_off, mp_map, mp_flags = maps
    fl = 0
    member = q["sub"]
    found = -1
    if member == 0 or member == 3:  # file / shmem: RO/RW from the VMA that maps this file offset
        mp = q["mm"]
        pp = MM[mp, 0] if mp >= 0 else -1
        snap = find_snapshot(pp, ts, pr_lo, pr_hi, sn_ts)
        found = vma_by_fileoff(snap, mapping, off, sn_lo, sn_hi, mp_start, mp_end, mp_off, mp_map)
    if q["flags"] & O.PTE_EXACT:  # exact tier: the entry's own write bit; the inference is only compared
        w = (q["flags"] & O.PTE_WRITABLE) != 0
        RS[RS_PROV] += q["aux"]
        if found < 0:
            RS[RS_EX_NO_INFERENCE] += q["aux"]
        else:
            vf = mp_flags[found]
            inferred_w = (vf & V_W) != 0 and (vf & V_S) != 0 and X[X_SHARED_W_RO] == 0
            RS[RS_EX_AGREE if inferred_w == w else RS_EX_DISAGREE] += q["aux"]
        return F_WRITABLE if w else 0
    if found >= 0:
        q["flags"] |= O.PTE_INFERRED
        RS[RS_PROV + 1] += q["aux"]
        vf = mp_flags[found]
        if (vf & V_W) and (vf & V_S) and X[X_SHARED_W_RO] == 0:
            q["flags"] |= O.PTE_WRITABLE
            fl |= F_WRITABLE
    else:
        RS[RS_PROV + 2] += q["aux"]
        fl |= F_UNKNOWN
        if X[X_UNKNOWN_ELIG] == 0:
            q["flags"] |= O.PTE_WRITABLE
    return fl


@numba.njit(cache=True, inline="always")
def page_cache_delete(r, T, MM, pool, nxt, S, out, RS, X, maps):
    """Folio grouping: a ``page_cache`` delete in reclaim closes the folio of the task's pending PTEs
    (FOLIO_BEGIN, its PTEs, FOLIO_END with its reason) into the open batch; outside reclaim it is a truncate (F5)."""
    ts = r["ts"]
    task = r["task"]
    pfn = r["a"]
    order = r["b"]
    mapping = r["c"]
    if r["sub"] == 0:
        emit(out, S, ts, O.M_HOOK, O.H_TRUNCATE, r["cpu"], task, -1, mapping, pfn, order, 0, U0, U0, 0)
        return
    T[task, T_CTX] = r["sub"]
    h = T[task, T_PEND_HEAD]
    if h < 0:
        return  # not mapped: nothing to flush, LUF is irrelevant for this folio
    static = _static_reason(order, X)
    fl = 0
    off = r["d"] * 4096
    p = h
    while p >= 0:
        q = pool[p]
        q["mapping"] = mapping
        if q["flags"] & O.PTE_UNBATCHED:
            fl |= F_UNBATCHED
        fl |= _pte_rw_from_maps(q, ts, mapping, off, MM, maps, RS, X)
        p = nxt[p]
    reason = _folio_reason(static, fl, X[X_UNKNOWN_ELIG] != 0)
    b = pool_new(pool, nxt, S)
    pool[b]["ts"] = pool[h]["ts"]
    pool[b]["op"] = O.M_FOLIO_BEGIN
    pool[b]["sub"] = static
    pool[b]["task"] = task
    pool[b]["pfn"] = pfn
    pool[b]["order"] = order
    pool[b]["mapping"] = mapping
    list_append(T, task, T_BATCH_HEAD, T_BATCH_TAIL, b, nxt)
    nxt[b] = h
    T[task, T_BATCH_TAIL] = T[task, T_PEND_TAIL]
    T[task, T_PEND_HEAD] = -1
    T[task, T_PEND_TAIL] = -1
    e = pool_new(pool, nxt, S)
    pool[e]["ts"] = ts
    pool[e]["op"] = O.M_FOLIO_END
    pool[e]["sub"] = reason
    pool[e]["aux"] = _unlarge_reason(static, fl, X)
    pool[e]["task"] = task
    pool[e]["pfn"] = pfn
    pool[e]["order"] = order
    pool[e]["mapping"] = mapping
    list_append(T, task, T_BATCH_HEAD, T_BATCH_TAIL, e, nxt)
    T[task, T_BATCH_N] += 1
    _count_folio(reason, order, RS)


@numba.njit(cache=True, inline="always")
def migration_pte(r, T, MM, PROC_MMA, pool, nxt, S, RS, X):
    """Folio grouping: a migration set_pte / set_pmd row is one PTE of the task's open migration folio (a new pfn
    closes the previous folio and opens the next), with its exact RO/RW and whether it was flushed at once."""
    ts = r["ts"]
    task = r["task"]
    sub = r["sub"]
    pfn = r["a"]
    order = 9 if sub == 2 else r["b"]
    cc = r["c"]
    migtype = cc & 0xF
    writable = (cc >> 4) & 1
    T[task, T_CTX] = CTX_MIGRATION
    # flushed just before (ptep_clear_flush: sync retry, or an mm only on this CPU; PMD always)
    unb = sub == 2 or (T[task, T_IMM] != 0 and ts - (T[task, T_IMM] - 1) <= IMM_WINDOW_NS)
    T[task, T_IMM] = 0
    if T[task, T_MIG_PFN] != pfn:
        _close_mig_folio(task, T, pool, nxt, S)
        static = _static_reason(order, X)
        b = pool_new(pool, nxt, S)
        pool[b]["ts"] = ts
        pool[b]["op"] = O.M_FOLIO_BEGIN
        pool[b]["sub"] = static
        pool[b]["task"] = task
        pool[b]["pfn"] = pfn
        pool[b]["order"] = order
        list_append(T, task, T_BATCH_HEAD, T_BATCH_TAIL, b, nxt)
        T[task, T_MIG_PFN] = pfn
        T[task, T_MIG_FLAGS] = (static << 8) | (order << 16)
        T[task, T_BATCH_N] += 1
    p = pool_new(pool, nxt, S)
    q = pool[p]
    q["ts"] = ts
    q["op"] = O.M_PTE
    q["cpu"] = r["cpu"]
    q["task"] = task
    q["aux"] = 1
    ex = _take_exact(task, ts, 2, r["d"], -1, T, MM)
    if ex != 0:
        pp = T[task, T_EX_PROC]
        q["mm"] = PROC_MMA[pp] if pp >= 0 else -1
        RS[RS_EX_MIG_MM if q["mm"] >= 0 else RS_EX_MIG_NO_MM] += 1
    fl = PTE_MIG_ITEM
    if migtype == 0:
        T[task, T_MIG_FLAGS] |= F_UNKNOWN
        RS[RS_PROV + 2] += 1
        if X[X_UNKNOWN_ELIG] == 0:
            fl |= O.PTE_WRITABLE
    else:
        fl |= O.PTE_EXACT
        RS[RS_PROV + 0] += 1
    if writable or migtype == 3:
        fl |= O.PTE_WRITABLE
        T[task, T_MIG_FLAGS] |= F_WRITABLE
    if unb:
        fl |= O.PTE_UNBATCHED
        T[task, T_MIG_FLAGS] |= F_UNBATCHED
    q["flags"] = fl
    list_append(T, task, T_BATCH_HEAD, T_BATCH_TAIL, p, nxt)


@numba.njit(cache=True, inline="always")
def migrate_row(r, T, MM, PROC_MMA, pool, nxt, S, out, RS, X):
    """Folio grouping and batch closing for ``migrate`` rows: start, set_pte/set_pmd, remove (the move phase: the
    batch's flush is behind us) and end."""
    task = r["task"]
    sub = r["sub"]
    if sub == 4:  # start; the mode (r["c"] >> 8) does not tell the pass: SYNC runs a batched async pass first
        T[task, T_MIG_REASON] = r["c"] >> 12 & 0xF
        T[task, T_CTX] = CTX_MIGRATION
    elif sub == 0 or sub == 2:  # set_pte / set_pmd
        migration_pte(r, T, MM, PROC_MMA, pool, nxt, S, RS, X)
    elif sub == 1 or sub == 3:  # remove: the move phase started, the batch flush is behind us
        if T[task, T_MIG_PFN] >= 0 or T[task, T_BATCH_HEAD] >= 0:
            close_batch(task, r["ts"], r["cpu"], U0, 0, 0, T, pool, nxt, S, out, RS, X)
    elif sub == 5:  # end
        if _has_batch(task, T):
            close_batch(task, r["ts"], r["cpu"], U0, 0, 0, T, pool, nxt, S, out, RS, X)
        T[task, T_CTX] = 0


@numba.njit(cache=True, inline="always")
def page_row(raw, i, T, pool, nxt, S, out, RS, X):
    """Allocator ops: a free (which also ends the task's open batch: reclaim frees after its flush), an
    allocation, a pcp drain, or a buddy take (in the context of the allocation that follows it)."""
    r = raw[i]
    ts = r["ts"]
    c = r["cpu"]
    task = r["task"]
    sub = r["sub"]
    pfn = r["a"]
    order = r["b"]
    if sub == 0:
        if _has_batch(task, T):
            close_batch(task, ts, c, U0, 0, 0, T, pool, nxt, S, out, RS, X)
        emit(out, S, ts, O.M_FREE, r["c"] & 0xFF, c, task, -1, -1, pfn, order, 0, U0, U0, 0)
    elif sub == 1:
        gfp = r["d"]
        fl = 0
        if (gfp & GFP_DIRECT_RECLAIM) == 0:
            fl |= O.A_ATOMIC
        if not ((fl & O.A_ATOMIC) and X[X_ATOMIC_NO_SD] != 0):
            fl |= O.A_CAN_SD
        emit(out, S, ts, O.M_ALLOC, 0, c, task, -1, -1, pfn, order, fl, U0, U0, gfp)
    elif sub == 2:
        emit(out, S, ts, O.M_DRAIN, 0, c, task, -1, -1, pfn, order, 0, U0, U0, 0)
    else:
        # the context of a buddy take is the allocation that follows it in the same task
        fl = O.A_CAN_SD
        for k in range(i + 1, min(raw.shape[0], i + 256)):
            rk = raw[k]
            if rk["kind"] == O.R_PAGE and rk["sub"] == 1 and rk["task"] == task:
                if (rk["d"] & GFP_DIRECT_RECLAIM) == 0 and X[X_ATOMIC_NO_SD] != 0:
                    fl = O.A_ATOMIC
                break
        if (r["c"] >> 8) & 1:
            fl |= O.A_REFILL
        emit(out, S, ts, O.M_TAKE, 0, c, task, -1, -1, pfn, order, fl, U0, U0, 0)


@numba.njit(cache=True, inline="always")
def fault_hook(r, pmm, T, S, out, RS, X, maps):
    """Hook generation: a page fault is F3 if it writes or its VMA may be written (VM_WRITE / VM_MAYWRITE); it
    also opens the task's COW window (a write fault in a private VMA)."""
    pr_lo, pr_hi, sn_ts, sn_lo, sn_hi, mp_start, mp_end, _off, mp_map, mp_flags = maps
    ts = r["ts"]
    task = r["task"]
    addr = r["a"]
    write = r["sub"] != 0
    snap = find_snapshot(r["proc"], ts, pr_lo, pr_hi, sn_ts)
    v = vma_by_addr(snap, addr, sn_lo, sn_hi, mp_start, mp_end)
    maywrite = write
    mapping = -1
    cow = False
    if v >= 0:
        vf = mp_flags[v]
        cow = write and (vf & V_S) == 0  # a write fault in a private VMA may break a COW
        if write and (vf & V_S) and (vf & V_W) and mp_map[v] >= 0:
            RS[RS_SHARED_W_FAULTS] += 1
        if vf & V_W:
            maywrite = True
        elif (vf & V_S) == 0:
            maywrite = True  # VM_MAYWRITE is set on private mappings
        elif X[X_SHARED_RO_MAYWRITE] != 0:
            maywrite = True
        if (vf & V_S) and mp_map[v] >= 0:
            mapping = mp_map[v]
    elif X[X_NO_VMA_MAYWRITE] != 0:
        maywrite = True
    if task >= 0:
        T[task, T_FAULT_TS] = ts + 1
        T[task, T_FAULT_COW] = 1 if cow else 0
    if maywrite:
        emit(out, S, ts, O.M_HOOK, O.H_FAULT, r["cpu"], task, pmm, mapping, -1, 0, 1 if write else 0, U0, U0, addr)


@numba.njit(cache=True, inline="always")
def syscall_hook(r, pmm, T, S, out, maps):
    """Hook generation: a syscall sets the window its task's flushes are attributed to; a completed zap
    (munmap, mremap, madvise DONTNEED/FREE/REMOVE, mmap MAP_FIXED) is F7 (+ a shared file VMA's mapping)."""
    pr_lo, pr_hi, sn_ts, sn_lo, sn_hi, mp_start, mp_end, _off, mp_map, mp_flags = maps
    ts = r["ts"]
    task = r["task"]
    nr = r["sub"]
    dur = r["e"]
    ok = dur >= 0
    if dur < 0:
        dur = -dur - 1
    T[task, T_SYS_NR] = nr
    T[task, T_SYS_UNTIL] = ts + dur
    if not ok:
        return
    zap = False
    if nr == SYS_MUNMAP or nr == SYS_MREMAP:
        zap = True
    elif nr == SYS_MADVISE:
        zap = r["c"] in ZAP_MADVISE
    elif nr == SYS_MMAP:
        zap = (r["d"] & MAP_FIXED) != 0
    if zap:
        snap = find_snapshot(r["proc"], ts, pr_lo, pr_hi, sn_ts)
        a0 = r["a"]
        mapping = shared_file_vma_in_range(snap, a0, a0 + r["b"], sn_lo, sn_hi, mp_start, mp_end, mp_map, mp_flags)
        emit(out, S, ts, O.M_HOOK, O.H_ZAP, r["cpu"], task, pmm, mapping, -1, 0, 0, U0, U0, 0)


@numba.njit(cache=True, inline="always")
def file_hook(r, S, out, X):
    """Hook generation: write_begin (F4), truncate (F5), dirty_folio (F6 when ``dirty_folio_is_mkclean``)."""
    sub = r["sub"]
    hook = -1
    if sub == 0:
        hook = O.H_WRITE_BEGIN
    elif sub == 1:
        hook = O.H_TRUNCATE
    elif sub == 2 and X[X_DIRTY_MKCLEAN] != 0:
        hook = O.H_MKCLEAN
    if hook >= 0:
        emit(out, S, r["ts"], O.M_HOOK, hook, r["cpu"], r["task"], -1, r["a"], -1, 0, 0, U0, U0, 0)


@numba.njit(cache=True, inline="always")
def sched_switch(r, pmm, T, CPU, MM, LAST_RUN, PROC_MMA, S, out, RS, X):
    """Hook generation and mm_cpumask: a context switch records the mm each CPU runs; a kthread → user switch
    while the CPU still holds a user mm lazily is F10."""
    ts = r["ts"]
    c = r["cpu"]
    nxt_task = r["a"]
    CS.learn_kind(T, r["task"], CS.K_KTHREAD if r["sub"] != 0 else CS.K_USER, T_KIND)
    settle_lazy(S, CPU, T, PROC_MMA, MM, LAST_RUN, X, out)
    if CS.switch_in(CPU, c, nxt_task, T, PROC_MMA, T_PROC, T_KIND, C_LOADED, C_LAZY):
        RS[RS_SWITCH_GUESSED] += 1
    if pmm >= 0:
        LAST_RUN[pmm, c] = ts
    np_ = T[nxt_task, T_PROC] if nxt_task >= 0 else -1
    nmm = PROC_MMA[np_] if np_ >= 0 else -1
    if r["sub"] != 0 and CPU[c, C_CUR_MM] >= 0 and nmm >= 0:
        # kthread -> user switch: finish_task_switch drops the lazily borrowed mm (F10)
        emit(out, S, ts, O.M_HOOK, O.H_CTXSW, c, r["task"], CPU[c, C_CUR_MM], -1, -1, 0, 0, U0, U0, 0)
    CPU[c, C_CUR_TASK] = nxt_task
    if nmm >= 0:
        CPU[c, C_CUR_MM] = nmm
        LAST_RUN[nmm, c] = ts


@numba.njit(cache=True, inline="always")
def reclaim_row(r, T, pool, nxt, S, out, RS, X):
    """Batch closing and hooks for ``reclaim`` rows: a reclaim begins (its context), ends (the open batch ends
    with it), or writes a dirty folio (F13)."""
    ts = r["ts"]
    task = r["task"]
    sub = r["sub"]
    if sub in (0, 2, 4, 6):
        T[task, T_CTX] = 1 if sub == 0 else 2 if sub == 2 else 2 if sub == 4 else 3
        emit(out, S, ts, O.M_RECLAIM_BEGIN, 0, r["cpu"], task, -1, -1, -1, 0, 0, U0, U0, 0)
    elif sub in (1, 3, 5, 7):
        if _has_batch(task, T):
            close_batch(task, ts, r["cpu"], U0, 0, 0, T, pool, nxt, S, out, RS, X)
        T[task, T_CTX] = 0
    elif sub == 12:
        if not _has_batch(task, T):  # unmaps since the last flush: that flush was not this pageout's
            _mark_dirty_flush(task, out, S)
        emit(out, S, ts, O.M_HOOK, O.H_DIRTY_WB, r["cpu"], task, -1, -1, r["a"], 0, 0, U0, U0, 0)


#: how far back (model ops of other tasks) a pageout row looks for its task's batch flush
DIRTY_LOOKBACK = 256


@numba.njit(cache=True, inline="always")
def _mark_dirty_flush(task, out, S):
    """A pageout of a dirty folio: shrink_folio_list ran try_to_unmap_flush_dirty() right before it. If that flushed
    (a dirty PTE was cleared in the open batch) the trace shows it as the recorded batch flush the pageout row
    itself closed: the task's last model op but allocations (writepage may allocate) is then its BATCH (a flush
    that closed otherwise, e.g. the free batch filling, is followed by the task's FREE ops). Mark it B_DIRTY
    (luf-model §9.4: the posted code flushes the open batch's LUF work there too). The caller checks that the
    task unmapped nothing since (its unmaps wait in the pool, not in ``out``)."""
    j = S[S_NOUT] - 1
    lo = max(np.int64(0), j - DIRTY_LOOKBACK)
    while j >= lo:
        q = out[j]
        if q["task"] == task and q["op"] != O.M_ALLOC and q["op"] != O.M_TAKE and q["op"] != O.M_DRAIN:
            if q["op"] == O.M_BATCH and (q["flags"] & O.B_MIGRATION) == 0:
                q["flags"] |= O.B_DIRTY
            return
        j -= 1


@numba.njit(cache=True)
def exit_mmap_flushes(task, ts, T, S, out):
    """The task's flushes left without a cause since its last other row, just before its exec or exit row: the
    old mm's teardown (exec_mmap / exit_mm → mmput → exit_mmap: unmap_vmas, tlb_finish_mmu) and exec's
    setup_arg_pages (relocate_vma_down: move_page_tables). A zap of a whole mm: ``zap``. A flush with no mm
    (reason 2: a batched unmap's) is not one of them."""
    for j in range(T[task, T_MMPUT_J] - 1, S[S_NOUT]):
        f = out[j]
        if f["op"] == O.M_RFLUSH and f["sub"] == O.C_OTHER and f["task"] == task and (f["flags"] & O.RF_MM_NULL) == 0:
            if ts - f["ts"] <= MMPUT_WINDOW_NS:
                f["sub"] = O.C_ZAP
    T[task, T_MMPUT_J] = 0


@numba.njit(cache=True)
def untraced_senders(out, n, T, traced):
    """Recorded flushes left ``other`` whose sender's faults and syscalls the trace cannot show (a kernel thread,
    or, in a trace of a target, a process outside it; ``traced[proc]`` = 1 where the recorder followed them):
    ``untraced``. They flush one mm (a local ``tlb_flush`` reason 3, or none: not reason 2, the no-mm flush of a
    batched unmap) from outside reclaim and migration, whose rows are host-wide: a COW break, munmap, mprotect,
    khugepaged's collapse... which no model changes. Flushes of traced tasks stay ``other``."""
    for i in range(n):
        r = out[i]
        if r["op"] != O.M_RFLUSH or r["sub"] != O.C_OTHER or (r["flags"] & O.RF_MM_NULL) != 0:
            continue
        task = r["task"]
        if task < 0 or task >= T.shape[0]:
            continue
        proc = T[task, T_PROC]
        outside = proc >= 0 and proc < traced.shape[0] and traced[proc] == 0
        if outside or T[task, T_KIND] == CS.K_KTHREAD:
            r["sub"] = O.C_UNTRACED


@numba.njit(cache=True, inline="always")
def proc_row(r, pmm, T, S, out):
    """Hook generation and flush attribution for ``proc`` rows: an exit zaps every VMA (F7); a fork row names the
    full flush just before it dup_mmap's (``fork``); an exec or exit row names the flushes just before it the old
    mm's teardown (``zap``, exit_mmap_flushes)."""
    task = r["task"]
    sub = r["sub"]
    if (sub == 1 or sub == 2) and task >= 0 and T[task, T_MMPUT_J] > 0:
        exit_mmap_flushes(task, r["ts"], T, S, out)
    if sub == 2 and r["a"] != 0 and pmm >= 0:  # the process exits: exit_mmap zaps every VMA (F7)
        emit(out, S, r["ts"], O.M_HOOK, O.H_ZAP, r["cpu"], task, pmm, -1, -1, 0, 0, U0, U0, 0)
    elif sub == 0 and task >= 0 and T[task, T_OTHER_J] > 0:
        # the parent's full mm flush just before: dup_mmap's flush_tlb_mm(oldmm) (write-protected COW PTEs)
        f = out[T[task, T_OTHER_J] - 1]
        if f["op"] == O.M_RFLUSH and f["sub"] == O.C_OTHER and f["task"] == task:
            if r["ts"] - f["ts"] <= FORK_WINDOW_NS:
                f["sub"] = O.C_FORK
        T[task, T_OTHER_J] = 0


@numba.njit(cache=True, inline="always")
def end_of_trace(T, CPU, CPUM, MM, PROC_MMA, pool, nxt, S, out, RS, X):
    """The last segment: close every open recorded flush, then every open batch."""
    for c in range(np.int64(X[X_NCPU])):
        if CPU[c, C_OPEN] != 0:
            close_group(c, T, CPU, CPUM, MM, PROC_MMA, pool, nxt, S, out, RS, X)
    for t in range(T.shape[0]):
        if _has_batch(t, T):
            close_batch(t, S[S_LAST_TS], 0, U0, 0, 0, T, pool, nxt, S, out, RS, X)


# The steps are inlined (inline="always") and the loop allocates nothing, so it runs without numba's reference
# counting (_nrt=False): with it, every state array handed to a step was increfed and decrefed per row and the
# reconstruct stage of bench/simulate_speed took twice as long as the single function it replaces.
@numba.njit(cache=True, nogil=True, _nrt=False)
def reconstruct(
    raw,
    X,
    T,
    CPU,
    CPUM,
    MM,
    LAST_RUN,
    PROC_MMA,
    pool,
    nxt,
    S,
    out,
    RS,
    pr_lo,
    pr_hi,
    sn_ts,
    sn_lo,
    sn_hi,
    mp_start,
    mp_end,
    mp_off,
    mp_map,
    mp_flags,
    final,
):
    """Turn one segment of raw ops into model ops (appended to ``out``; count in S[S_NOUT]): each row goes to the
    step of its kind, after task tracking and the end of its CPU's open recorded flush."""
    maps = (pr_lo, pr_hi, sn_ts, sn_lo, sn_hi, mp_start, mp_end, mp_off, mp_map, mp_flags)
    T[:, T_OTHER_J] = 0  # indices into ``out``, which starts empty for every segment
    T[:, T_MMPUT_J] = 0
    S[S_STAMPED] = 0
    for i in range(raw.shape[0]):
        r = raw[i]
        S[S_LAST_TS] = r["ts"]
        kind = r["kind"]
        pmm = track_task(r, T, LAST_RUN, PROC_MMA)
        if CPU[r["cpu"], C_LAZY] != 0 and shows_mm_loaded(r, CPU):
            settle_lazy(S, CPU, T, PROC_MMA, MM, LAST_RUN, X, out)
            CS.proven_running(CPU, r["cpu"], T, T_KIND, T_PROC, C_CUR_TASK, C_LAZY, C_LOADED)
        ends, nx_set = flush_ends_at(r, CPU)
        if ends:
            close_group(r["cpu"], T, CPU, CPUM, MM, PROC_MMA, pool, nxt, S, out, RS, X, nx_set)
        if kind == O.R_TLB:
            tlb_flush_row(r, T, CPU, CPUM, MM, PROC_MMA, pool, nxt, S, out, RS, X)
        elif kind == O.R_SD:
            shootdown_row(r, T, CPU, CPUM, MM, PROC_MMA, pool, nxt, S, out, RS, X)
        elif kind == O.R_UNMAP:
            unmap_pte(r, T, CPU, MM, LAST_RUN, PROC_MMA, pool, nxt, S, out, RS, X)
        elif kind == O.R_PCDEL:
            page_cache_delete(r, T, MM, pool, nxt, S, out, RS, X, maps)
        elif kind == O.R_MIG:
            migrate_row(r, T, MM, PROC_MMA, pool, nxt, S, out, RS, X)
        elif kind == O.R_PAGE:
            page_row(raw, i, T, pool, nxt, S, out, RS, X)
        elif kind == O.R_FAULT:
            fault_hook(r, pmm, T, S, out, RS, X, maps)
        elif kind == O.R_SYSCALL:
            syscall_hook(r, pmm, T, S, out, maps)
        elif kind == O.R_FILE:
            file_hook(r, S, out, X)
        elif kind == O.R_SCHED:
            sched_switch(r, pmm, T, CPU, MM, LAST_RUN, PROC_MMA, S, out, RS, X)
        elif kind == O.R_RECLAIM:
            reclaim_row(r, T, pool, nxt, S, out, RS, X)
        elif kind == O.R_PROC:
            proc_row(r, pmm, T, S, out)
        elif kind == O.R_PTEX:
            exact_row(r, T, RS)
        elif kind == O.R_MM:
            if r["proc"] >= 0 and r["a"] >= 0:
                PROC_MMA[r["proc"]] = r["a"]
                MM[r["a"], 0] = r["proc"]
    if final:
        end_of_trace(T, CPU, CPUM, MM, PROC_MMA, pool, nxt, S, out, RS, X)
    settle_lazy(S, CPU, T, PROC_MMA, MM, LAST_RUN, X, out)
