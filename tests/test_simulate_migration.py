"""Migration unmaps are classified by what the trace shows around each set_migration_pte, not by the requested
mode: a sync-mode migrate_pages() runs a batched MIGRATE_ASYNC first pass (one batched flush, LUF-eligible) and
retries the folios it could not move one by one, each PTE flushed at once (not batched). Hand-built traces with
worked-out answers; also the fork flush (dup_mmap) that the reconstruction now identifies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scenarios import A1, MM_A, T_ALLOC, T_BATCH, T_EVENT, US, A, Scenario, run

W = (300, 300)  # the task writing compact_memory: migrates other processes' pages, on CPU0
MM_W = 0xC0
B = (200, 200)  # allocates the freed pages later
READ, READ_EXCL, WRITE = 1, 2, 3
SYNC, ASYNC = 2, 0


def luf(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["models"]["luf-v12"]


def _three_cpus() -> Scenario:
    """Process A runs on CPU1 and CPU2 (its pages' flushes target {1, 2}); W runs on CPU0."""
    s = Scenario(nr_cpus=3)
    s.run_on(1000, 0, *W, MM_W)
    s.run_on(1100, 1, *A, MM_A)
    s.run_on(1200, 2, *A1, MM_A)
    return s


def _move(s: Scenario, t: int, pfns: list[int]) -> int:
    """The move phase: each folio's migration entry is replaced (remove_pte), then the old page is freed."""
    for k, pfn in enumerate(pfns):
        s.mig(t + 3 * k, 0, *W, 1, pfn=pfn + 10_000)
        s.free(t + 3 * k + 1, 0, *W, pfn, source=2)
    return t + 3 * len(pfns)


def _sync_retry(s: Scenario, t: int, pfn: int, mig_type: int = READ, local_only: bool = False) -> int:
    """migrate_pages_sync's one-by-one retry of a folio: ptep_clear_flush flushes its PTE *before* the
    set_migration_pte row (a 1-page range flush), then the move phase; try_to_unmap_flush has nothing to do."""
    if local_only:  # W migrates a page of its own mm, loaded here only: a local mm flush
        s.tlb(t, 0, *W, 3, 1)
    else:  # A's mm is not loaded on CPU0: remote IPIs, no local flush row
        s.tlb(t, 0, *W, 4, 1)
        s.sd(t + 1, 0, *W, 1)
        s.sd(t + 2, 0, *W, 2)
    s.mig(t + 5, 0, *W, 0, pfn=pfn, mig_type=mig_type, writable=mig_type == WRITE)
    return _move(s, t + 50, [pfn])


def _sync_compaction(rw_in_batch: bool = True, realloc: bool = False) -> Scenario:
    """compact_memory (MIGRATE_SYNC): a batched first pass of 3 read-only folios (+ 1 writable one) with one
    batched flush to CPUs 1 and 2, then a sync retry of folio 2004 (2 immediate IPIs)."""
    s = _three_cpus()
    t = T_BATCH
    s.mig(t, 0, *W, 4, mode=SYNC, reason=0)
    batch = [(2000, READ), (2001, READ_EXCL), (2002, READ)] + ([(2003, WRITE)] if rw_in_batch else [])
    for k, (pfn, mt) in enumerate(batch):
        s.mig(t + 10 + 2 * k, 0, *W, 0, pfn=pfn, mig_type=mt, writable=mt == WRITE)
    s.batch_flush(t + 100, 0, *W, [1, 2])  # arch_tlbbatch_flush: reason 4 full, 2 csds, local reason 2 full
    t = _move(s, t + 200, [pfn for pfn, _ in batch])
    t = _sync_retry(s, t + 100, 2004)
    s.mig(t + 100, 0, *W, 5)
    if realloc:
        s.alloc(T_ALLOC, 0, *B, 2000)
    return s


def test_sync_compaction_batched_first_pass_and_sync_retry(tmp_path: Path) -> None:
    doc = run(_sync_compaction(), tmp_path)
    # recorded: the batch's 2 IPIs and the retry's 2
    assert doc["vanilla"]["by_cause"] == {"batch": 2, "immediate": 2}
    # the vanilla rebuild equals the recording, and explains all of it
    van = doc["models"]["vanilla"]
    assert van["by_cause"] == {"batch": 2, "immediate": 2}
    assert van["per_cpu"] == doc["vanilla"]["per_cpu"] == [0, 2, 2]
    assert doc["fidelity"]["explained_pct"] == 100.0
    assert doc["fidelity"]["by_cause"]["batch"]["explained"] == 2
    # the first pass's read-only folios are eligible whatever the requested mode; the retry is not batched
    el = doc["eligibility"]
    assert el["eligible"] == 3
    assert el["rejected"] == {"writable_pte": 1, "not_batched": 1}
    assert el["pte_provenance"] == {"exact": 5, "inferred": 0, "unknown": 0}
    # set_migration_pte has no mm: the writable folio's CPUs are the whole batch (R + sender), so LUF defers
    # {0, 1, 2} minus {0, 1, 2}: nothing; the retry's IPIs pass through
    m = luf(doc)
    assert m["by_cause"] == {"batch_nonluf": 2, "immediate": 2}
    assert m["deferred"]["deferred_cpu_slots"] == 0
    assert m["allocations"]["luf_pages_freed"] == 0


def test_sync_compaction_read_only_batch_is_deferred(tmp_path: Path) -> None:
    doc = run(_sync_compaction(rw_in_batch=False), tmp_path)
    assert doc["vanilla"]["by_cause"] == {"batch": 2, "immediate": 2}
    assert doc["models"]["vanilla"]["by_cause"] == {"batch": 2, "immediate": 2}
    assert doc["eligibility"]["rejected"] == {"not_batched": 1}
    m = luf(doc)
    # the whole batch is deferred (CPUs 1 and 2); nothing re-uses the pages: only the retry's IPIs remain
    assert m["by_cause"] == {"immediate": 2}
    assert m["deferred"]["deferred_cpu_slots"] == 2
    assert m["allocations"]["luf_pages_freed"] == 3  # the retried folio is freed without a key
    assert m["avoided_pct"] == 50.0
    # a re-allocation of a keyed page pays the deferred flush (F1)
    m = luf(run(_sync_compaction(rw_in_batch=False, realloc=True), tmp_path))
    assert m["by_cause"] == {"alloc_pcp": 2, "immediate": 2}
    assert m["safety"]["violations"] == 0


def test_requested_mode_does_not_decide(tmp_path: Path) -> None:
    """The same rows under MIGRATE_ASYNC / SYNC_LIGHT / SYNC give the same answer."""
    docs = []
    for mode in (ASYNC, 1, SYNC):
        s = _three_cpus()
        s.mig(T_BATCH, 0, *W, 4, mode=mode, reason=0)
        s.mig(T_BATCH + 10, 0, *W, 0, pfn=2000, mig_type=READ)
        s.batch_flush(T_BATCH + 100, 0, *W, [1, 2])
        _move(s, T_BATCH + 200, [2000])
        docs.append(run(s, tmp_path))
    for doc in docs:
        assert doc["eligibility"]["eligible"] == 1
        assert luf(doc)["by_cause"] == {}
        assert luf(doc)["deferred"]["deferred_cpu_slots"] == 2


def test_batch_without_any_flush_batched_nothing(tmp_path: Path) -> None:
    """mm_cpumask holds only this CPU (or none): should_defer_flush is false and ptep_clear_flush has nothing to
    send (the mm is not loaded here): no flush row at all. Vanilla sends nothing; LUF has nothing to defer."""
    for mode in (ASYNC, SYNC):
        s = _three_cpus()
        s.mig(T_BATCH, 0, *W, 4, mode=mode, reason=0)
        s.mig(T_BATCH + 10, 0, *W, 0, pfn=2000, mig_type=READ)
        s.mig(T_BATCH + 12, 0, *W, 0, pfn=2001, mig_type=READ_EXCL)
        _move(s, T_BATCH + 200, [2000, 2001])
        s.mig(T_BATCH + 300, 0, *W, 5)
        s.alloc(T_ALLOC, 1, *B, 2000)  # on another CPU: a keyed page would cost an IPI to CPU0 here
        doc = run(s, tmp_path)
        assert doc["eligibility"]["rejected"] == {"not_batched": 2}, mode
        assert doc["vanilla"]["remote_shootdowns"] == 0
        for name, m in doc["models"].items():
            assert m["remote_shootdowns"] == 0, (mode, name, m["by_cause"])


def test_local_mm_pte_inside_a_batched_pass_is_not_batched(tmp_path: Path) -> None:
    """In the batched pass, a page of W's own mm (loaded only on CPU0: should_defer_flush is false) is flushed at
    once, a local mm flush (reason 3) right before its set_pte; A's pages around it stay in the batch."""
    s = _three_cpus()
    s.mig(T_BATCH, 0, *W, 4, mode=SYNC, reason=0)
    s.mig(T_BATCH + 10, 0, *W, 0, pfn=2000, mig_type=READ)
    s.tlb(T_BATCH + 20, 0, *W, 3, 1)
    s.mig(T_BATCH + 22, 0, *W, 0, pfn=2001, mig_type=READ_EXCL)
    s.mig(T_BATCH + 30, 0, *W, 0, pfn=2002, mig_type=READ)
    s.batch_flush(T_BATCH + 100, 0, *W, [1, 2])
    t = _move(s, T_BATCH + 200, [2000, 2001, 2002])
    t = _sync_retry(s, t + 100, 2003, local_only=True)  # and a sync retry of another of W's pages
    s.mig(t + 10, 0, *W, 5)
    doc = run(s, tmp_path)
    assert doc["eligibility"]["eligible"] == 2
    assert doc["eligibility"]["rejected"] == {"not_batched": 2}
    assert doc["vanilla"]["by_cause"] == {"batch": 2}
    van = doc["models"]["vanilla"]
    assert van["by_cause"] == {"batch": 2, "immediate": 0}  # the two local flushes: no IPI
    assert van["local_flushes"] == 3  # the batch's reason 2 and the two reason-3 flushes
    m = luf(doc)
    assert m["by_cause"] == {"immediate": 0}
    assert m["deferred"]["deferred_cpu_slots"] == 2


def test_pmd_flush_inside_a_batch_does_not_close_it(tmp_path: Path) -> None:
    """A PMD-mapped folio inside a batched pass: set_pmd_migration_entry flushes at once (pmdp_invalidate, a
    full range flush with IPIs to CPUs 1 and 2 and no local row); the batch around it goes on to its own flush."""
    s = _three_cpus()
    s.mig(T_BATCH, 0, *W, 4, mode=ASYNC, reason=0)
    s.mig(T_BATCH + 10, 0, *W, 0, pfn=2000, mig_type=READ)
    s.tlb(T_BATCH + 20, 0, *W, 4, -1)
    s.sd(T_BATCH + 21, 0, *W, 1)
    s.sd(T_BATCH + 22, 0, *W, 2)
    s.mig(T_BATCH + 25, 0, *W, 2, pfn=4096, order=9, mig_type=READ)
    s.mig(T_BATCH + 30, 0, *W, 0, pfn=2001, mig_type=READ)
    s.batch_flush(T_BATCH + 100, 0, *W, [1, 2])
    _move(s, T_BATCH + 200, [2000, 2001])
    doc = run(s, tmp_path)
    assert doc["vanilla"]["by_cause"] == {"batch": 2, "immediate": 2}
    assert doc["models"]["vanilla"]["by_cause"] == {"batch": 2, "immediate": 2}
    assert doc["eligibility"]["eligible"] == 2
    assert doc["eligibility"]["rejected"] == {"large_folio": 1}
    assert doc["eligibility"]["batches"] == 1
    # both order-0 folios are in the one batch, deferred; the PMD flush passes through
    m = luf(doc)
    assert m["by_cause"] == {"immediate": 2}
    assert m["deferred"]["deferred_cpu_slots"] == 2
    # without the large-folio exclusion the PMD folio is still not batched: nothing changes
    assert luf(run(s, tmp_path, ["large_folios=eligible"]))["by_cause"] == {"immediate": 2}


def test_memory_failure_in_sync_mode_flushes_its_key(tmp_path: Path) -> None:
    s = _three_cpus()
    s.mig(T_BATCH, 0, *W, 4, mode=SYNC, reason=1)  # MR_MEMORY_FAILURE
    s.mig(T_BATCH + 10, 0, *W, 0, pfn=2000, mig_type=READ)
    s.batch_flush(T_BATCH + 100, 0, *W, [1, 2])
    _move(s, T_BATCH + 200, [2000])
    doc = run(s, tmp_path)
    assert doc["eligibility"]["eligible"] == 1
    assert luf(doc)["by_cause"] == {"memfail": 2}  # F12: the key is flushed at once


# ---- fork: the parent's mm flush in dup_mmap ----------------------------------------------------------------
def _fork_flush(gap_ns: int, between: bool = False) -> Scenario:
    """A's thread on CPU0 forks; dup_mmap's flush_tlb_mm(oldmm) (reason 4 full, an IPI to CPU1 where A also
    runs, local reason 3 full) comes ``gap_ns`` before the fork row."""
    s = Scenario()
    s.run_on(1000, 0, *A, MM_A)
    s.run_on(2000, 1, *A1, MM_A)
    s.tlb(T_EVENT, 0, *A, 4, -1)
    s.sd(T_EVENT + 1, 0, *A, 1)
    s.tlb(T_EVENT + 2, 0, *A, 3, -1)
    if between:  # the task did something else in between: the flush was not the fork's
        s.fault(T_EVENT + gap_ns // 2, 0, *A, 0x30000000)
    s.proc(T_EVENT + gap_ns, 0, *A, 0)
    return s


def test_fork_flush_is_identified(tmp_path: Path) -> None:
    doc = run(_fork_flush(30 * US), tmp_path)
    assert doc["vanilla"]["by_cause"] == {"fork": 1}
    assert doc["fidelity"]["explained_pct"] == 100.0
    for name, m in doc["models"].items():
        assert m["by_cause"] == {"fork": 1}, name
    # too far from the fork row, or another event of the task in between: stays unexplained
    assert run(_fork_flush(5000 * US), tmp_path)["vanilla"]["by_cause"] == {"other": 1}
    assert run(_fork_flush(30 * US, between=True), tmp_path)["vanilla"]["by_cause"] == {"other": 1}
