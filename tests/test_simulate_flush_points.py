"""One hand-made trace per LUF flush point (luf-model.md §4, F1–F13), answers worked out by hand.

Common setup (scenarios.ro_setup): process A runs on CPU0 and CPU1, so mm_cpumask(A) = {0, 1}. Its thread on CPU0
reclaims pfn 1000 (read-only shared file mapping, one PTE) and the recorded batched flush IPIs CPU1 once. In
luf-v12 the whole batch is LUF-eligible: D = {0, 1} is deferred under a key, so the batch itself sends nothing;
whatever flush point comes first then pays 1 remote IPI (the other CPU of {0, 1}), and the pfn's later
allocation finds the key done (free pass).
"""

from __future__ import annotations

from pathlib import Path

from scenarios import A1, ANON, GFP_KERNEL, RO_FILE, T_ALLOC, T_BATCH, T_EVENT, A, B, Scenario, ro_setup, run


def luf(doc: dict) -> dict:
    """luf-v12 as the cover letter intends it: these tests check each flush point's rule (§8.2); the posted code
    leaves the F3-F8/F10 hooks inert (test_hooks_as_posted_send_no_ipi)."""
    return doc["models"]["luf-v12-intended"]


def test_baseline_batch_is_deferred_and_recorded(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s)
    doc = run(s, tmp_path)
    assert doc["vanilla"]["remote_shootdowns"] == 1
    assert doc["vanilla"]["by_cause"] == {"batch": 1}
    assert doc["vanilla"]["per_cpu"] == [0, 1]
    assert doc["fidelity"]["explained_pct"] == 100.0
    m = luf(doc)
    assert m["remote_shootdowns"] == 0  # deferred, never needed within the trace
    assert m["avoided_pct"] == 100.0
    assert m["deferred"]["deferred_cpu_slots"] == 1  # CPU1 (CPU0 is the sender: a deferred local flush)
    assert m["stale_window"]["pending_at_end"] == 1
    assert doc["eligibility"] == {
        **doc["eligibility"],
        "folios": 1,
        "eligible": 1,
        "rejected": {},
        "pte_provenance": {"exact": 0, "inferred": 1, "unknown": 0},
    }


def test_f1_pcp_allocation_flushes_then_free_pass(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s, folios=(1000, 1001))
    s.alloc(T_ALLOC, 1, *B, 1000)  # B on CPU1 takes the LUF page from pcp: flush {0,1} minus self = CPU0
    s.alloc(T_ALLOC + 1000, 1, *B, 1001)  # same key, already done: free pass
    m = luf(run(s, tmp_path))
    assert m["by_cause"] == {"alloc_pcp": 1}
    assert m["per_cpu"] == [1, 0]
    assert m["allocations"]["alloc_with_flush"] == 1
    assert m["allocations"]["alloc_free_pass"] == 1
    assert m["paid_by_other_task"] == 1  # B paid for A's unmap (R2)
    assert m["stale_window"]["count"] == 2 and m["stale_window"]["pending_at_end"] == 0


def test_f2_buddy_allocation_closes_the_zone_epoch(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s)
    s.page(T_EVENT, 0, *A, 2, 1000)  # pcp drain: the key's mask joins the zone batch, page stamped epoch 1
    s.page(T_ALLOC, 1, *B, 3, 1000)  # taken from buddy: closes epoch 1 → flush the zone batch
    s.alloc(T_ALLOC + 1, 1, *B, 1000)
    for sets in (["non_luf_ok=false"], ["alloc_order=recorded"]):  # pend_list first, or the recorded pfn itself
        m = luf(run(s, tmp_path, sets))
        assert m["by_cause"] == {"alloc_buddy_epoch": 1}
        assert m["allocations"]["epoch_closes"] == 1
        assert m["allocations"]["pend_first"] == (1 if sets == ["non_luf_ok=false"] else 0)
        assert m["allocations"]["nr_luf_pages_max"] == 1
        assert m["zone"] == {"open_epoch": 2, "done_epoch": 1, "nr_luf_pages_at_end": 0}
    # default (alloc_order=luf, non_luf_ok): buddy hands out a clean block; the pending page stays on pend_list
    m = luf(run(s, tmp_path))
    assert m["by_cause"] == {}
    assert m["allocations"]["buddy_clean_first"] == 1
    assert m["zone"] == {"open_epoch": 1, "done_epoch": 0, "nr_luf_pages_at_end": 1}
    assert m["stale_window"]["pending_at_end"] == 1


def test_f2_epoch_wait_while_another_task_flushes(tmp_path: Path) -> None:
    def scenario() -> Scenario:
        s = Scenario()
        ro_setup(s, folios=(1000, 1001))
        s.page(T_EVENT, 0, *A, 2, 1000)
        s.page(T_EVENT + 1, 0, *A, 2, 1001)  # both in epoch 1
        s.page(T_ALLOC, 1, *B, 3, 1000)  # B closes epoch 1 and flushes (5 µs by default)
        s.page(T_ALLOC + 1000, 0, 300, 300, 3, 1001)  # 1 µs later another task takes a block of epoch 1: waits
        return s

    m = luf(run(scenario(), tmp_path, ["non_luf_ok=false"]))  # pend_list first (the zone is short of clean pages)
    assert m["by_cause"] == {"alloc_buddy_epoch": 1}
    assert m["allocations"]["epoch_waits"] == 1
    assert m["risks"]["R2_epoch_waits"] == 1
    m = luf(run(scenario(), tmp_path, ["non_luf_ok=false", "epoch_flush_latency_us=0"]))
    assert m["allocations"]["epoch_waits"] == 0
    assert m["remote_shootdowns"] == 1


def test_f3_fault_hooks(tmp_path: Path) -> None:
    # a read fault on the read-only shared file VMA: no VM_WRITE/VM_MAYWRITE, no check
    s = Scenario()
    ro_setup(s)
    s.fault(T_EVENT, 1, *A1, RO_FILE + 4096)
    s.alloc(T_ALLOC, 1, *B, 1000)
    m = luf(run(s, tmp_path))
    assert m["hooks"]["fault"]["calls"] == 0
    assert m["by_cause"] == {"alloc_pcp": 1}
    # a write fault runs luf_flush(mm A): IPI to CPU0; the later allocation is a free pass
    s = Scenario()
    ro_setup(s)
    s.fault(T_EVENT, 1, *A1, RO_FILE + 4096, write=True)
    s.alloc(T_ALLOC, 1, *B, 1000)
    m = luf(run(s, tmp_path))
    assert m["by_cause"] == {"fault": 1}
    assert m["per_cpu"] == [1, 0]
    assert m["allocations"]["alloc_free_pass"] == 1
    # a read fault in a private (VM_MAYWRITE) VMA also checks; a second one finds nothing to flush
    s = Scenario()
    ro_setup(s)
    s.fault(T_EVENT, 0, *A, ANON + 8192)
    s.fault(T_EVENT + 10, 0, *A, ANON + 8192)
    m = luf(run(s, tmp_path))
    assert m["by_cause"] == {"fault": 1}
    assert m["per_cpu"] == [0, 1]
    assert m["hooks"]["fault"] == {"calls": 2, "no_ipi": 1}
    # shared_ro_maywrite: the r--s VMA of a file opened O_RDWR has VM_MAYWRITE
    s = Scenario()
    ro_setup(s)
    s.fault(T_EVENT, 1, *A1, RO_FILE + 4096)
    assert luf(run(s, tmp_path, ["shared_ro_maywrite=true"]))["by_cause"] == {"fault": 1}


def test_f4_write_begin_flushes_the_mapping_batch(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s)
    s.file(T_EVENT, 0, 300, 300, 0, ino=100)  # another process writes the file: ASB of ino 100
    s.file(T_EVENT + 10, 0, 300, 300, 0, ino=999)  # an unrelated file: nothing pending
    m = luf(run(s, tmp_path))
    assert m["by_cause"] == {"write_begin": 1}
    assert m["per_cpu"] == [0, 1]
    assert m["hooks"]["write_begin"] == {"calls": 2, "no_ipi": 1}


def test_hooks_as_posted_send_no_ipi(tmp_path: Path) -> None:
    """§9.1: as posted, fold_luf_batch_mm never sets flush_required, so F4 (and F3-F8, F10) fold nothing: the
    write sends no IPI and the page's allocation on CPU1 pays the key instead (CPU0). As intended, the write
    flushes CPU1 and marks {0, 1} done, so the allocation is a free pass."""
    s = Scenario()
    ro_setup(s)
    s.file(T_EVENT, 0, 300, 300, 0, ino=100)
    s.alloc(T_ALLOC, 1, *B, 1000)
    intended = luf(run(s, tmp_path))
    assert intended["by_cause"] == {"write_begin": 1}
    assert intended["per_cpu"] == [0, 1]
    assert intended["allocations"]["alloc_free_pass"] == 1
    doc = run(s, tmp_path)  # luf-v12 follows the posted code by default (hooks=posted)
    assert run(s, tmp_path, ["hooks=intended"])["models"]["luf-v12"]["by_cause"] == {"write_begin": 1}
    posted = doc["models"]["luf-v12"]
    assert posted["by_cause"] == {"alloc_pcp": 1}
    assert posted["per_cpu"] == [1, 0]
    assert posted["hooks"]["write_begin"] == {"calls": 1, "no_ipi": 1}


def test_f5_truncate_and_invalidate(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s)
    s.file(T_EVENT, 1, 300, 300, 1, ino=100)
    assert luf(run(s, tmp_path))["by_cause"] == {"truncate": 1}
    s = Scenario()
    ro_setup(s)
    s.pcdel(T_EVENT, 1, 300, 300, 5000, ino=100, ctx=0)  # page-cache removal outside reclaim
    m = luf(run(s, tmp_path))
    assert m["by_cause"] == {"truncate": 1}
    assert m["per_cpu"] == [1, 0]


def test_f6_mkclean(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s)
    s.file(T_EVENT, 0, 300, 300, 2, ino=100)  # dirty_folio → its writeback runs folio_mkclean
    s.alloc(T_ALLOC, 1, *B, 1000)
    assert luf(run(s, tmp_path))["by_cause"] == {"mkclean": 1}
    assert luf(run(s, tmp_path, ["dirty_folio_is_mkclean=false"]))["by_cause"] == {"alloc_pcp": 1}


def test_f7_zap_munmap_and_exit(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s)
    s.syscall(T_EVENT, 1, *A1, 1, ANON, 4096)  # munmap: tlb_end_vma → luf_flush(mm A)
    m = luf(run(s, tmp_path))
    assert m["by_cause"] == {"zap_vma": 1}
    assert m["per_cpu"] == [1, 0]
    s = Scenario()
    ro_setup(s)
    s.syscall(T_EVENT, 1, *A1, 3, ANON, 4096, 4)  # madvise(MADV_DONTNEED)
    assert luf(run(s, tmp_path))["by_cause"] == {"zap_vma": 1}
    s = Scenario()
    ro_setup(s)
    s.syscall(T_EVENT, 1, *A1, 3, ANON, 4096, 3)  # madvise(MADV_WILLNEED): no zap
    assert luf(run(s, tmp_path))["remote_shootdowns"] == 0
    s = Scenario()
    ro_setup(s)
    s.proc(T_EVENT, 1, *A, 2)  # the process exits: exit_mmap zaps everything
    assert luf(run(s, tmp_path))["by_cause"] == {"zap_vma": 1}


def test_f9_batched_pending_marks_done(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s)
    # mprotect in A after a batched unmap of A: vanilla flush_tlb_mm (recorded, passed through) marks done
    s.syscall(T_EVENT, 1, *A1, 2, ANON, 4096, 1)
    s.tlb(T_EVENT + 2, 1, *A1, 4)
    s.sd(T_EVENT + 3, 1, *A1, 0)
    s.tlb(T_EVENT + 4, 1, *A1, 3)
    s.alloc(T_ALLOC, 1, *B, 1000)  # free pass: done[0], done[1] were raised by the F9 flush
    doc = run(s, tmp_path)
    assert doc["vanilla"]["by_cause"] == {"batch": 1, "batched_pending": 1}
    m = luf(doc)
    assert m["by_cause"] == {"batched_pending": 1}
    assert m["avoided_pct"] == 50.0
    assert m["allocations"]["alloc_free_pass"] == 1
    assert m["risks"]["R6_credits_to_cpus_running_other_mm"] == 0  # CPU0 runs mm A
    # without the credit (the flush is an ordinary zap: munmap with no batched unmap pending) the alloc pays
    s = Scenario()
    ro_setup(s)
    for k in (0, 1):
        t = T_EVENT + 1000 * k
        s.syscall(t, 1, *A1, 1, 0x50000000, 4096)
        s.tlb(t + 2, 1, *A1, 4)
        s.sd(t + 3, 1, *A1, 0)
        s.tlb(t + 4, 1, *A1, 3)
    doc = run(s, tmp_path)
    assert doc["vanilla"]["by_cause"] == {"batch": 1, "batched_pending": 1, "zap": 1}


def test_f10_kthread_switch_drops_borrowed_mm(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s)
    s.sched(T_EVENT, 1, 5, 0, 101, prev_kthread=True)  # kthread (lazily on mm A) → A's thread
    m = luf(run(s, tmp_path))
    assert m["by_cause"] == {"ctxsw_kthread": 1}
    assert m["hooks"]["ctxsw_kthread"]["calls"] == 1


def _kept_folio_scenario() -> Scenario:
    s = Scenario()
    s.maps(0, 100, 1, RO_FILE, RO_FILE + 0x100000, "r--s", 0, 1, 100)
    s.run_on(1000, 0, *A, 0xA0)
    s.run_on(2000, 1, *A1, 0xA0)
    s.reclaim(T_BATCH, 0, *A, 2)
    s.reclaim_folio(T_BATCH + 10, 0, *A, 1000, [0xA0])
    s.unmap(T_BATCH + 20, 0, *A, 0xA0)  # unmapped but never deleted: reclaim kept it
    s.batch_flush(T_BATCH + 40, 0, *A, [1])
    s.free(T_BATCH + 50, 0, *A, 1000)
    s.reclaim(T_BATCH + 60, 0, *A, 3)
    s.alloc(T_ALLOC, 1, *B, 1000)
    return s


def test_f11_reclaim_keep(tmp_path: Path) -> None:
    # the kept folio's RO/RW is unknown (no page-cache row names its file): with unknown_rw=eligible it joins the
    # LUF batch, then F11 folds and flushes everything at once; the freed folio's key is then already done
    doc = run(_kept_folio_scenario(), tmp_path, ["unknown_rw=eligible"])
    m = luf(doc)
    assert m["by_cause"] == {"reclaim_keep": 1}
    assert m["allocations"]["alloc_free_pass"] == 1
    assert doc["eligibility"]["rejected"] == {"kept_not_freed": 1}
    # default (unknown rejected): its CPUs go to the non-LUF part, D is empty, the batch flushes normally
    doc = run(_kept_folio_scenario(), tmp_path)
    assert luf(doc)["by_cause"] == {"batch_nonluf": 1}
    assert doc["eligibility"]["rejected"] == {"unknown_rw": 1}


def _migration(s: Scenario, reason: int, mode: int = 0, mig_type: int = 1) -> None:
    s.run_on(1000, 0, *A, 0xA0)
    s.run_on(2000, 1, *A1, 0xA0)
    s.mig(T_BATCH, 0, *A, 4, mode=mode, reason=reason)
    s.mig(T_BATCH + 10, 0, *A, 0, pfn=2000, mig_type=mig_type, writable=mig_type == 3)
    s.batch_flush(T_BATCH + 20, 0, *A, [1])
    s.mig(T_BATCH + 30, 0, *A, 1, pfn=3000)
    s.free(T_BATCH + 31, 0, *A, 2000, source=2)
    s.mig(T_BATCH + 40, 0, *A, 5)
    s.alloc(T_ALLOC, 1, *B, 2000)


def test_f12_memory_failure_migration_flushes_its_key(tmp_path: Path) -> None:
    s = Scenario()
    _migration(s, reason=1)
    doc = run(s, tmp_path)
    assert luf(doc)["by_cause"] == {"memfail": 1}
    assert doc["eligibility"]["pte_provenance"]["exact"] == 1
    s = Scenario()
    _migration(s, reason=0)  # async compaction: deferred, paid at the allocation
    assert luf(run(s, tmp_path))["by_cause"] == {"alloc_pcp": 1}


def test_f13_dirty_writeback_in_reclaim(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s, free=False)
    s.reclaim(T_BATCH + 70, 0, *A, 12, 1000)  # pageout of a dirty folio: try_to_unmap_flush_dirty
    s.free(T_BATCH + 80, 0, *A, 1000)
    s.alloc(T_ALLOC, 1, *B, 1000)
    m = luf(run(s, tmp_path))
    assert m["by_cause"] == {"dirty_writeback": 1}
    assert m["per_cpu"] == [0, 1]


def test_recorded_flushes_pass_through_every_model(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s)
    # an immediate PMD flush inside reclaim (remote + local reason 3), then the PMD unmap
    s.reclaim(T_EVENT - 10, 0, *A, 2)
    s.tlb(T_EVENT, 0, *A, 4)
    s.sd(T_EVENT + 1, 0, *A, 1)
    s.tlb(T_EVENT + 2, 0, *A, 3)
    s.unmap(T_EVENT + 3, 0, *A, 0xA0, delta=-(2 << 20))
    s.pcdel(T_EVENT + 4, 0, *A, 4096, order=9)
    s.free(T_EVENT + 5, 0, *A, 4096, order=9)
    doc = run(s, tmp_path)
    assert doc["vanilla"]["by_cause"] == {"batch": 1, "immediate": 1}
    for name, m in doc["models"].items():
        assert m["by_cause"].get("immediate") == 1, name
    assert doc["eligibility"]["rejected"] == {"large_folio": 1}  # static exclusions come first


def test_alloc_gfp_kernel_constant() -> None:
    assert GFP_KERNEL & 0x400
