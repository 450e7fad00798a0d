"""Eligibility rules (luf-model.md §3.2), a writable folio in a read-only batch, key-slot reuse, pcp skips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scenarios import A1, GFP_ATOMIC, RO_FILE, T_ALLOC, T_BATCH, A, B, Scenario, ro_setup, run

from lufreplay.model import ops as O
from lufreplay.model.luf_v12 import KCTR, LufV12
from lufreplay.model.options import parse_settings
from lufreplay.model.state import model_options
from lufreplay.replay.engine import replay
from lufreplay.trace.reader import open_trace


def luf(doc: dict) -> dict:
    return doc["models"]["luf-v12"]


def test_writable_shared_vma_rejects_the_folio(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s, perms="rw-s")
    doc = run(s, tmp_path)
    assert doc["eligibility"]["rejected"] == {"writable_pte": 1}
    assert luf(doc)["by_cause"] == {"batch_nonluf": 1}
    assert luf(doc)["avoided_pct"] == 0.0
    # the option that trusts mkclean's write-protection makes it eligible again
    doc = run(s, tmp_path, ["shared_writable_vma=readonly"])
    assert doc["eligibility"]["eligible"] == 1
    assert luf(doc)["remote_shootdowns"] == 0


def test_private_writable_file_vma_maps_page_cache_read_only(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s, perms="rw-p")  # a page-cache folio in a private mapping is mapped read-only (COW)
    assert run(s, tmp_path)["eligibility"]["eligible"] == 1


def test_large_folio_is_not_eligible(tmp_path: Path) -> None:
    s = Scenario()
    s.maps(0, 100, 1, RO_FILE, RO_FILE + 0x100000, "r--s", 0, 1, 100)
    s.run_on(1000, 0, *A, 0xA0)
    s.run_on(2000, 1, *A1, 0xA0)
    s.reclaim(T_BATCH, 0, *A, 2)
    s.reclaim_folio(T_BATCH + 10, 0, *A, 1024, [0xA0, 0xA0], order=2)
    s.batch_flush(T_BATCH + 30, 0, *A, [1])
    s.free(T_BATCH + 40, 0, *A, 1024, order=2)
    doc = run(s, tmp_path)
    assert doc["eligibility"]["rejected"] == {"large_folio": 1}
    assert doc["eligibility"]["rejected_pages"] == {"large_folio": 4}
    assert luf(doc)["by_cause"] == {"batch_nonluf": 1}


def test_immediately_flushed_pte_is_not_batched(tmp_path: Path) -> None:
    s = Scenario()
    s.maps(0, 100, 1, RO_FILE, RO_FILE + 0x100000, "r--s", 0, 1, 100)
    s.run_on(1000, 0, *A, 0xA0)
    s.reclaim(T_BATCH, 0, *A, 2)
    s.tlb(T_BATCH + 10, 0, *A, 3, 1)  # ptep_clear_flush: mm only on this CPU, should_defer_flush false
    s.unmap(T_BATCH + 11, 0, *A, 0xA0)
    s.pcdel(T_BATCH + 12, 0, *A, 1000)
    s.free(T_BATCH + 20, 0, *A, 1000)
    s.reclaim(T_BATCH + 30, 0, *A, 3)
    doc = run(s, tmp_path)
    assert doc["eligibility"]["rejected"] == {"not_batched": 1}
    assert doc["vanilla"]["remote_shootdowns"] == 0
    assert luf(doc)["local_flushes"] == 1  # the recorded local flush, passed through
    assert luf(doc)["remote_shootdowns"] == 0


def _anon_scenario() -> Scenario:
    s = Scenario()
    s.run_on(1000, 0, *A, 0xA0)
    s.run_on(2000, 1, *A1, 0xA0)
    s.reclaim(T_BATCH, 0, *A, 2)
    s.unmap(T_BATCH + 10, 0, *A, 0xA0, member=1)  # anon: no page-cache row, RO/RW unknown
    s.batch_flush(T_BATCH + 20, 0, *A, [1])
    s.free(T_BATCH + 30, 0, *A, 7000, source=3)  # its pfn appears only at the free
    s.reclaim(T_BATCH + 40, 0, *A, 3)
    s.alloc(T_ALLOC, 1, *B, 7000)
    return s


def test_unknown_rw_policy(tmp_path: Path) -> None:
    doc = run(_anon_scenario(), tmp_path)
    assert doc["eligibility"]["rejected"] == {"unknown_rw": 1}
    assert doc["eligibility"]["pte_provenance"]["unknown"] == 1
    assert luf(doc)["by_cause"] == {"batch_nonluf": 1}
    doc = run(_anon_scenario(), tmp_path, ["unknown_rw=eligible"])
    assert doc["eligibility"]["eligible"] == 1
    m = luf(doc)
    assert m["by_cause"] == {"alloc_pcp": 1}  # the anon page got the batch key at its free
    assert m["allocations"]["luf_pages_freed"] == 1


def test_migration_rules(tmp_path: Path) -> None:
    def mig(mode: int, mig_type: int) -> Scenario:
        s = Scenario()
        s.run_on(1000, 0, *A, 0xA0)
        s.mig(T_BATCH, 0, *A, 4, mode=mode, reason=0)
        s.mig(T_BATCH + 10, 0, *A, 0, pfn=2000, mig_type=mig_type, writable=mig_type == 3)
        s.batch_flush(T_BATCH + 20, 0, *A, [1])
        s.free(T_BATCH + 31, 0, *A, 2000, source=2)
        s.mig(T_BATCH + 40, 0, *A, 5)
        return s

    assert run(mig(0, 1), tmp_path)["eligibility"]["eligible"] == 1  # async, read-only entry
    assert run(mig(0, 2), tmp_path)["eligibility"]["eligible"] == 1  # read-exclusive
    assert run(mig(0, 3), tmp_path)["eligibility"]["rejected"] == {"writable_pte": 1}
    # MIGRATE_SYNC: migrate_pages_sync's first pass is batched (MIGRATE_ASYNC): the batched flush decides
    assert run(mig(2, 1), tmp_path)["eligibility"]["eligible"] == 1
    assert run(mig(0, 0), tmp_path)["eligibility"]["rejected"] == {"unknown_rw": 1}


def test_config_and_arch_exclusions(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s)
    doc = run(s, tmp_path, ["config_excludes=true"])
    assert doc["eligibility"]["rejected"] == {"config_init_on_free_kasan": 1}
    doc = run(s, tmp_path, ["arch=arm64"])
    assert doc["eligibility"]["rejected"] == {"arch_noop": 1}
    assert luf(doc)["remote_shootdowns"] == doc["vanilla"]["remote_shootdowns"]


def test_writable_folio_in_read_only_batch_disqualifies_only_itself(tmp_path: Path) -> None:
    """Folio 1000: file ino 100, read-only, mapped by A (CPUs {0,1}). Folio 1001: ino 101 mapped writable by C,
    which only ever ran on CPU0 (the sender). LUF = {0,1}, NONLUF = {0} → D = {1} deferred under the key; the
    non-LUF flush is local only (no IPI). Re-allocating 1001 (clean) costs nothing, 1000 costs one IPI."""
    s = Scenario()
    s.maps(0, 100, 1, RO_FILE, RO_FILE + 0x100000, "r--s", 0, 1, 100)
    s.maps(0, 400, 2, 0x40000000, 0x40100000, "rw-s", 0, 1, 101)
    s.run_on(1000, 1, *A1, 0xA0)
    s.run_on(1500, 0, 400, 400, 0xC0)
    s.run_on(2000, 0, *A, 0xA0)
    s.reclaim(T_BATCH, 0, *A, 2)
    s.reclaim_folio(T_BATCH + 10, 0, *A, 1000, [0xA0], ino=100)
    s.reclaim_folio(T_BATCH + 20, 0, *A, 1001, [0xC0], ino=101)
    s.batch_flush(T_BATCH + 30, 0, *A, [1])
    s.free(T_BATCH + 40, 0, *A, 1000)
    s.free(T_BATCH + 41, 0, *A, 1001)
    s.reclaim(T_BATCH + 50, 0, *A, 3)
    s.alloc(T_ALLOC, 0, *B, 1001)
    s.alloc(T_ALLOC + 10, 0, *B, 1000)
    doc = run(s, tmp_path)
    assert doc["eligibility"]["eligible"] == 1
    assert doc["eligibility"]["rejected"] == {"writable_pte": 1}
    m = luf(doc)
    assert m["by_cause"] == {"batch_nonluf": 0, "alloc_pcp": 1}  # batch_nonluf: one local flush, no IPI
    assert m["local_flushes"] >= 1
    assert m["allocations"]["alloc_clean"] == 1
    assert m["per_cpu"] == [0, 1]


def test_pcp_skip_three_strikes_then_flush(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s, folios=(1000, 1001, 1002))
    for k, pfn in enumerate((1000, 1001, 1002)):
        s.alloc(T_ALLOC + 10 * k, 1, *B, pfn, gfp=GFP_ATOMIC)  # atomic: cannot shoot down → skip
    s.alloc(T_ALLOC + 1000, 1, *B, 1000)  # GFP_KERNEL: flushes
    m = luf(run(s, tmp_path, ["alloc_order=recorded"]))  # the pending pfns stay labelled: 1000 pays at its re-use
    assert m["allocations"]["pcp_skips"] == 3
    assert m["allocations"]["pcp_fallbacks"] == 1
    assert m["risks"]["R3_atomic_allocs_hitting_luf_pages"] == 3
    assert m["by_cause"] == {"alloc_pcp": 1}
    # alloc_order=luf: the three obligations stay on CPU0's pcp (no CPU1 allocation reaches them), the pfns the
    # trace handed out are clean in the model, so the GFP_KERNEL allocation of 1000 needs no flush
    m = luf(run(s, tmp_path))
    assert m["allocations"]["pcp_skips"] == 3
    assert m["by_cause"] == {}
    assert m["allocations"]["alloc_clean"] == 1
    assert m["pcp_fifo_pages_at_end"] == 3
    # with atomic contexts allowed to shoot down, the first atomic allocation pays instead
    m = luf(run(s, tmp_path, ["atomic_no_shootdown=false"]))
    assert m["allocations"]["pcp_skips"] == 0
    assert m["by_cause"] == {"alloc_pcp": 1}
    assert m["allocations"]["alloc_free_pass"] == 2  # 1001 and 1002; 1000 was already handed out
    assert m["allocations"]["alloc_clean"] == 1  # the GFP_KERNEL re-allocation of 1000 finds it clean


def _ops(tmp_path: Path, s: Scenario) -> tuple[np.ndarray, object]:
    res = replay(open_trace(s.write(tmp_path / "t")), ["vanilla"], parse_settings([]), keep_ops=True)
    return np.concatenate(res.ops), res


def test_key_slot_reuse_merges_conservatively(tmp_path: Path) -> None:
    """A's mm ran only on CPU1; the reclaimer (kswapd-like, no mm of A) on CPU0 defers D = {1}. If the 16-bit key
    counter wraps onto slot 1 while it still holds an old request owed by CPU0, the slots merge: the page then
    also waits for CPU0 (over-flush, never under-flush)."""
    s = Scenario()
    s.maps(0, 100, 1, RO_FILE, RO_FILE + 0x100000, "r--s", 0, 1, 100)
    s.run_on(1000, 1, *A1, 0xA0)
    s.reclaim_folio(T_BATCH + 10, 0, 50, 50, 1000, [0xA0])
    s.batch_flush(T_BATCH + 20, 0, 50, 50, [1])
    s.free(T_BATCH + 30, 0, 50, 50, 1000)
    s.alloc(T_ALLOC, 1, *B, 1000)  # on CPU1: D = {1} is its own CPU → a local flush, no IPI
    ops, res = _ops(tmp_path, s)
    opts = parse_settings([])
    sizes = (len(res.ids.task) + 1, len(res.ids.mm) + 1, len(res.ids.mapping) + 1)

    def model(preset: bool) -> LufV12:
        m = LufV12(opts, model_options(opts, 2), res.tl, 2, False)
        if preset:
            m.SC[KCTR] = 0xFFFF  # the next key wraps to 1 (0 is skipped)
            m.KEY_mask[1] = np.uint64(0b01)  # an old request still owed by CPU0
            m.KEY_ugen[1] = 2
        m.run(ops, ops.size, 2048, sizes)
        return m

    fresh = model(False).counts()
    assert fresh["remote_shootdowns"] == 0 and fresh["misc"]["key_merges"] == 0
    merged = model(True).counts()
    assert merged["misc"]["key_merges"] == 1
    assert merged["by_cause"] == {"alloc_pcp": 1}
    assert merged["per_cpu"] == [1, 0]


def test_safety_invariant_fails_loudly() -> None:
    """A page that reaches a new owner while a CPU still owes a flush is a model bug: SafetyViolation."""
    from lufreplay.model.base import SafetyViolation

    opts = parse_settings([])
    m = LufV12(opts, model_options(opts, 2), np.array([0, 1], np.int64), 2, False)
    m.pages.ensure(16)
    m.pages.sh_mask[5] = np.uint64(0b10)  # CPU1 owes a flush for pfn 5 at ugen 100...
    m.pages.sh_ugen[5] = 100
    op = np.zeros(1, O.MOP_DTYPE)
    op["op"], op["pfn"], op["flags"], op["task"] = O.M_ALLOC, 5, O.A_CAN_SD, 0
    with pytest.raises(SafetyViolation, match="pfn 5"):
        m.run(op, 1, 16, (1, 1, 1))  # ...but the page is clean in the model's own state: nothing flushes it
