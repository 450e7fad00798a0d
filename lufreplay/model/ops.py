"""The model op stream every model consumes: op codes, dtypes, causes, hooks, rejection reasons, counters.

The replay engine turns trace rows into *raw ops* (one per row, time-ordered) and the batch reconstructor
(lufreplay.replay.reconstruct) turns those into *model ops*: the §8.2 events of luf-model.md
(unmap_pte, end_folio_unmap, batch_flush, free, pcp_drain, alloc, hooks F3-F13) plus the recorded
flushes that LUF does not change. All models read the same model-op arrays.
"""

from __future__ import annotations

import numpy as np

MAX_CPUS = 64  # CPUs of one mask word: a uint64 (more involved CPUs take W-word masks, model/widemask.py)

# ---- raw ops (one per trace row) -----------------------------------------------------------------
R_TLB, R_SD, R_RECLAIM, R_UNMAP, R_PCDEL, R_MIG, R_PAGE, R_FAULT, R_SYSCALL, R_FILE, R_SCHED, R_PROC, R_MM = range(13)
R_PTEX = 13  # exact tier: the PTE/PMD an rmap walk is about to clear (replay.reconstruct.exact_row)
RAW_DTYPE = np.dtype(
    [
        ("ts", "<i8"),
        ("kind", "u1"),
        ("sub", "u1"),
        ("cpu", "<i2"),
        ("task", "<i4"),  # dense thread id
        ("proc", "<i4"),  # dense process id (tgid)
        ("a", "<i8"),
        ("b", "<i8"),
        ("c", "<i8"),
        ("d", "<i8"),
        ("e", "<i8"),
    ]
)

# ---- model ops ---------------------------------------------------------------------------------------
(
    M_FOLIO_BEGIN,  # a folio's rmap walk starts: pfn, order, mapping (-1 anon), sub = static rejection reason
    M_PTE,  # unmap_pte: mm, mapping, mask (clipped), mask2 (modelled, unclipped), flags PTE_*
    M_FOLIO_END,  # end_folio_unmap: sub = rejection reason of the folio (0 = eligible), aux = the reason without
    #               the large-folio exclusion (option large_folios=eligible)
    # KEEP, FREE, TAKE, ALLOC, HOOK and RECLAIM_BEGIN: mask2 = the CPUs lazy at the op (a flush sent there skips them)
    M_KEEP,  # F11: reclaim could not free an eligible folio
    M_BATCH,  # batch_flush: cpu = sender, mask = recorded remote targets, aux = shootdown rows, flags B_*,
    #           mask2 = CPUs lazy at the flush, order = 1 if the kernel traced remote_send_ipi (a remote CPU in
    #           its cpumask)
    M_RFLUSH,  # a recorded flush LUF leaves alone: sub = cause, mask = targets, aux = shootdown rows,
    #            mask2 = CPUs credited (F9), pfn = how many of them run another mm (R6), flags RF_*
    M_LFLUSH,  # a full local flush (task switch): only the oracle uses it
    M_FREE,  # free(page): pfn, order, sub = PAGE_SOURCE
    M_DRAIN,  # pcp_drain(page)
    M_TAKE,  # a block taken from buddy (alloc_zone_locked): flags A_*
    M_ALLOC,  # alloc(pfn, order): flags A_*
    M_HOOK,  # a LUF hook F3-F13: sub = H_*, mm, mapping
    M_RECLAIM_BEGIN,  # a reclaim episode starts (hold-before-free releases)
) = range(13)
MODEL_OP_NAMES = (
    "folio_begin",
    "pte",
    "folio_end",
    "keep",
    "batch",
    "recorded_flush",
    "local_flush",
    "free",
    "drain",
    "take",
    "alloc",
    "hook",
    "reclaim_begin",
)
MOP_DTYPE = np.dtype(
    [
        ("ts", "<i8"),
        ("op", "u1"),
        ("sub", "u1"),
        ("cpu", "<i2"),
        ("task", "<i4"),
        ("mm", "<i4"),
        ("mapping", "<i4"),
        ("pfn", "<i8"),
        ("order", "<i4"),
        ("flags", "<u4"),
        ("mask", "<u8"),
        ("mask2", "<u8"),
        ("aux", "<i8"),
    ]
)

PTE_WRITABLE, PTE_UNBATCHED, PTE_EXACT, PTE_INFERRED = 1, 2, 4, 8  # provenance: neither bit = unknown
B_MIGRATION, B_MEMFAIL, B_ANON_UNKNOWN_PFN = 1, 2, 4
# M_BATCH flag: the task's next row after this recorded flush is its pageout of a dirty folio, i.e. the flush is
# vanilla's try_to_unmap_flush_dirty (a dirty PTE was cleared in the open batch; luf-model §9.4, option
# dirty_writeback)
B_DIRTY = 8
# M_RFLUSH flags: the sender flushed locally too; a full flush; no mm (local tlb_flush reason 2, TLB_LOCAL_SHOOTDOWN:
# flush_tlb_func with info->mm == NULL, the signature of arch_tlbbatch_flush)
RF_LOCAL, RF_FULL, RF_MM_NULL = 1, 2, 4
A_CAN_SD, A_REFILL, A_ATOMIC = 1, 2, 4

# ---- hooks (M_HOOK.sub) --------------------------------------------------------------------------------
H_FAULT, H_WRITE_BEGIN, H_TRUNCATE, H_MKCLEAN, H_ZAP, H_CTXSW, H_DIRTY_WB = range(7)
HOOKS = ("fault", "write_begin", "truncate", "mkclean", "zap_vma", "ctxsw_kthread", "dirty_writeback")

# ---- causes of flushes (every IPI is counted under exactly one) -------------------------------------------
CAUSES = (
    "batch",  # vanilla batched reclaim/migration flush
    "batch_nonluf",  # LUF: the non-deferred part of a batch flush
    "batch_unseen",  # recorded batched flush whose unmaps the trace did not see (passed through)
    "immediate",  # recorded unbatched flush in reclaim/migration (per-PTE, PMD unmap, PMD young-clear)
    "zap",  # recorded flush of munmap/madvise/mremap/mmap MAP_FIXED
    "batched_pending",  # recorded flush_tlb_batched_pending (F9)
    "fork",  # recorded full flush of the parent's mm in fork (dup_mmap: flush_tlb_mm)
    "cow_fault",  # recorded single-page flush of a COW break (wp_page_copy → ptep_clear_flush) after a write fault
    "folio_mkclean",  # recorded single-page flush of writeback's folio_mkclean (page_mkclean_one); not F6
    "untraced",  # recorded mm flush outside reclaim/migration by a task whose faults and syscalls are not traced
    "other",  # any other recorded flush
    "alloc_pcp",  # F1
    "alloc_buddy_epoch",  # F2
    "fault",  # F3
    "write_begin",  # F4
    "truncate",  # F5
    "mkclean",  # F6
    "zap_vma",  # F7/F8
    "ctxsw_kthread",  # F10
    "reclaim_keep",  # F11
    "memfail",  # F12
    "dirty_writeback",  # F13
    "hold_release",  # hold-before-free: held pages released
    "realloc",  # oracle: a pending pfn is really re-used
)
C = {n: i for i, n in enumerate(CAUSES)}
NCAUSE = len(CAUSES)
RECORDED_CAUSES = (
    "batch",
    "batch_unseen",
    "immediate",
    "zap",
    "batched_pending",
    "fork",
    "cow_fault",
    "folio_mkclean",
    "untraced",
    "other",
)
#: IPIs that pay for deferred work: every cause a deferring model adds on top of the recorded flushes it passes
#: through and of a batch flush's non-deferred part (``batch_nonluf``), which is sent at the batch
DEFERRABLE_CAUSES = tuple(c for c in CAUSES if c not in RECORDED_CAUSES and c != "batch_nonluf")
HOOK_CAUSE = np.array(
    [C["fault"], C["write_begin"], C["truncate"], C["mkclean"], C["zap_vma"], C["ctxsw_kthread"], C["dirty_writeback"]],
    dtype=np.int64,
)

# ---- why a folio was not LUF-eligible (M_FOLIO_END.sub) ------------------------------------------------
REJECT = (
    "eligible",
    "writable_pte",
    "large_folio",
    "not_batched",
    "unknown_rw",
    "kept_not_freed",
    "config_init_on_free_kasan",
    "shared_anon",
    "arch_noop",
)
J = {n: i for i, n in enumerate(REJECT)}

# ---- scalar counters (per model) -------------------------------------------------------------------------
MISC = (
    "alloc_clean",
    "alloc_free_pass",
    "alloc_with_flush",
    "pcp_skips",
    "pcp_fallbacks",
    "buddy_refusals",
    "epoch_closes",
    "epoch_waits",
    "pend_first",
    "alloc_failures",
    "atomic_allocs_skipping_luf",
    "key_merges",
    "r6_credits_other_mm",
    "deferred_cpu_slots",
    "retired_by_done",
    "flushed_cpu_slots",
    "paid_by_other_pages",
    "paid_by_other_flushes",
    "paid_in_alloc_flushes",
    "luf_pages_freed",
    "nr_luf_pages_max",
    "held_pages_max",
    "held_pages_now",
    "safety_checks",
    "potential_stale_reads",
    "fifo_reorders",  # alloc_order=luf: a pcp allocation consumed an older obligation than the recorded pfn's
    "buddy_clean_first",  # alloc_order=luf: a recorded take of a pending buddy block was served by a clean block
    "unseen_reuses",  # a pfn the model still held pending was re-used by the trace without a recorded allocation
)
#: The allocator's share of MISC, reported together as ``allocations`` (luf-model §8.3).
ALLOC_COUNTERS = (
    *MISC[: MISC.index("alloc_failures") + 1],
    "luf_pages_freed",
    "nr_luf_pages_max",
    "fifo_reorders",
    "buddy_clean_first",
    "unseen_reuses",
)
K = {n: i for i, n in enumerate(MISC)}
NMISC = len(MISC)

# ---- decisions (--out) -----------------------------------------------------------------------------------
D_PERFORMED, D_DEFERRED, D_AVOIDED = 0, 1, 2
DECISION_KIND = ("performed", "deferred", "avoided")
DEC_DTYPE = np.dtype(
    [
        ("ts", "<i8"),
        ("kind", "u1"),
        ("cause", "u1"),
        ("cpu", "<i2"),
        ("task", "<i4"),
        ("targets", "<u8"),
        ("ipis", "<i4"),
        ("op", "u1"),
        ("pfn", "<i8"),
    ]
)
TIMELINE_BINS = 500

# Integer constants for numba (which cannot index dicts): C_BATCH, J_WRITABLE_PTE, K_PCP_SKIPS, ...
for _prefix, _names in (("C_", CAUSES), ("J_", REJECT), ("K_", MISC)):
    for _i, _n in enumerate(_names):
        globals()[_prefix + _n.upper()] = _i
