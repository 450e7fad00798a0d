"""Hand-worked 4-CPU scenarios, one per LUF decision point, against the spec reference and the fast path.

Every scenario (scenarios.quad_setup): mm_cpumask(A) = {0, 1, 2} (threads on CPU0–2), mm_cpumask(C) = {3},
mm_cpumask(E) = {1, 3}. File ino 100 is mapped read-only by A and C, shared writable by E. A's thread on CPU0
reclaims; B allocates. The expected decisions are written out by hand from luf-model.md (§ cited in each test):
``D(sender, cpus)`` = the CPUs a batch deferred under its key, ``P(cause, sender, cpus)`` = a flush sent to
``cpus`` (the sender flushes itself locally; the others get an IPI). ``done[c]`` starts at 1 and every flush
takes a fresh ugen g, so "c was flushed after the request" reads "done[c] >= the request's ugen".

The reference (model/reference.py) must give the answer in every combination of its §9 choices (the answer is
written per choice where the choice matters); the fast path must give it for the choices it implements
(``FAST_PATH_CHOICES``), read from ``Model.decisions_array()`` (what ``simulate --out`` writes), and its
``simulate`` document must count the same remote IPIs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

from scenarios import A1, A2, MM_A, MM_C, MM_E, RO_FILE, A, B, C, Scenario, quad_setup, reclaim_batch, run

from lufreplay.model.options import parse_settings
from lufreplay.model.reference import (
    FAST_PATH_CHOICES,
    INTENDED_CHOICES,
    SPEC_CHOICES,
    Decision,
    ReferenceLufV12,
    fast_decisions,
)
from lufreplay.replay.engine import replay
from lufreplay.trace.reader import open_trace

ANON = 0x30000000
T1, T2, T3 = 10_000, 30_000, 50_000
T_EVENT, T_ALLOC = 100_000, 200_000

Row = tuple[str, str, int, tuple[int, ...]]
Expect = Callable[[dict[str, str]], list[Row]]


def D(sender: int, *cpus: int) -> Row:
    return ("deferred", "batch", sender, tuple(cpus))


def P(cause: str, sender: int, *cpus: int) -> Row:
    return ("performed", cause, sender, tuple(cpus))


def view(decisions: list[Decision]) -> list[Row]:
    return [(d.kind, d.cause, d.cpu, tuple(sorted(d.targets))) for d in decisions]


def ipis(rows: list[Row]) -> int:
    return sum(len(set(t) - {c}) for k, _cause, c, t in rows if k == "performed")


#: §9 choices of the reference that the fast path has as a model option (reference choice -> option name)
FAST_PATH_OPTIONS = {"hooks": "hooks", "keep": "keep", "dirty_writeback": "dirty_writeback"}
ALL_CHOICES = [dict(zip(SPEC_CHOICES, v, strict=True)) for v in itertools.product(*SPEC_CHOICES.values())]


def check(s: Scenario, tmp: Path, expect: Expect, settings: list[str] | None = None) -> None:
    """The reference in every §9 combination and the fast path give the hand-worked decisions."""
    sets = settings or []
    path = s.write(tmp / f"t{len(list(tmp.glob('t*')))}")
    opts = parse_settings(sets)
    res = replay(open_trace(path), ["luf-v12", "luf-v12-intended"], opts, keep_ops=True, decisions=True)
    # luf-v12-intended is the fast path with every §9 choice at its intended value, whatever the options say
    intended = fast_decisions(res.models["luf-v12-intended"].decisions_array())
    assert view(intended) == expect(INTENDED_CHOICES), sets
    for choices in ALL_CHOICES:
        ref = ReferenceLufV12(opts, **choices)
        for ops in res.ops:
            ref.run(ops)
        assert view(ref.decisions) == expect(choices), (sets, choices)
        assert ref.violations == []
    want = expect(FAST_PATH_CHOICES)
    assert view(fast_decisions(res.models["luf-v12"].decisions_array())) == want, sets
    assert run(s, tmp, sets, ["luf-v12"])["models"]["luf-v12"]["remote_shootdowns"] == ipis(want), sets
    # the §9 choices the fast path also implements as an option: it must give the same answer in each value
    for name, values in SPEC_CHOICES.items():
        if name not in FAST_PATH_OPTIONS:
            continue
        for value in values[1:]:
            alt = [*sets, f"{FAST_PATH_OPTIONS[name]}={value}"]
            res = replay(open_trace(path), ["luf-v12"], parse_settings(alt), decisions=True)
            want = expect({**FAST_PATH_CHOICES, name: value})
            assert view(fast_decisions(res.models["luf-v12"].decisions_array())) == want, alt


def same(rows: list[Row]) -> Expect:
    return lambda _choices: rows


def test_deferral(tmp_path: Path) -> None:
    """§3.3/§8.2.3: a read-only folio of A: LUF = {0,1,2}, NONLUF = {} → the batch defers D = {0,1,2} (the
    recorded flush to CPU1, CPU2 is not sent). §8.2.8 F1: B on CPU3 reuses the page: key not done → IPIs 0,1,2."""
    s = Scenario(4)
    quad_setup(s)
    reclaim_batch(s, T1, [(1000, [MM_A])], [1, 2])
    s.alloc(T_ALLOC, 3, *B, 1000)
    check(s, tmp_path, same([D(0, 0, 1, 2), P("alloc_pcp", 3, 0, 1, 2)]))


def test_key_fold_and_diet(tmp_path: Path) -> None:
    """Batch 1: key1 = {0,1,2} (ugen u1). Batch 2 (§3.3 fold_unmap_luf): RO folio of A → LUF {0,1,2}; folio of E
    (rw-s: writable PTE) → NONLUF {1,3}; D = LUF \\ NONLUF = {0,2} = key2 (u2 > u1); try_to_unmap_flush sends
    NONLUF {1,3}: done[1], done[3] := g2 > u1. F1 on key2 from CPU3: {0,2} owed → IPIs 0, 2, done[0], done[2] :=
    g3. F1 on key1 (§2.2 diet): done[0], done[1], done[2] >= u1 → free pass, no flush at all."""
    s = Scenario(4)
    quad_setup(s)
    reclaim_batch(s, T1, [(1000, [MM_A])], [1, 2])
    reclaim_batch(s, T2, [(1001, [MM_A]), (1002, [MM_E])], [1, 2, 3])
    s.alloc(T_ALLOC, 3, *B, 1001)
    s.alloc(T_ALLOC + 1000, 3, *B, 1000)
    rows = [D(0, 0, 1, 2), D(0, 0, 2), P("batch_nonluf", 0, 1, 3), P("alloc_pcp", 3, 0, 2)]
    check(s, tmp_path, same(rows))
    check(s, tmp_path, same(rows), ["alloc_order=recorded"])


def test_batch_end_with_mixed_ro_rw_folios(tmp_path: Path) -> None:
    """§3.2: folio 1000 is mapped read-only by A (PTE first: folio_ro {0,1,2}, MMB(A) updated while can_luf) and
    writable by E (can_luf := false, NONLUF |= {1,3}); at its end folio_ro goes to NONLUF too: {0,1,2,3}. Folio
    1001 (A only) is eligible: LUF = {0,1,2}. D = {0,1,2} \\ {0,1,2,3} = {}: no key, one flush of all four CPUs,
    the eligible folio is freed clean. A later fault of A (F3: rw-p is VM_MAYWRITE) finds MMB(A)'s ugen older than
    that flush: nothing; the re-allocation is clean: nothing."""
    s = Scenario(4)
    quad_setup(s)
    reclaim_batch(s, T1, [(1000, [MM_A, MM_E]), (1001, [MM_A])], [1, 2, 3])
    s.fault(T_EVENT, 1, *A1, ANON + 8192)
    s.alloc(T_ALLOC, 3, *B, 1001)
    check(s, tmp_path, same([P("batch_nonluf", 0, 0, 1, 2, 3)]))


def test_kept_folio_f11(tmp_path: Path) -> None:
    """F11 (§8.2.4, §9.3), unknown_rw=eligible so the kept folio (no page-cache row) counts as read-only. Walk:
    folio 1000 (A, RO) LUF {0,1,2}; folio 1001 (E, RW) NONLUF {1,3}; kept folio (A) LUF {0,1,2}. At the keep,
    fold_unmap_luf: D = {0,2} = key1, flushed at once (fresh ugen: no CPU can be done already).
    - key_only (intended): the keep flushes {0,2}; the batch then flushes NONLUF {1,3}.
    - posted (luf-v12 default): luf_flush → try_to_unmap_flush also sends the pending tlb_ubc: one flush
      {0,1,2,3}; the batch then has nothing left. Either way the re-allocation of 1000 (key1, done) is a free
      pass."""
    s = Scenario(4)
    quad_setup(s)
    reclaim_batch(s, T1, [(1000, [MM_A]), (1001, [MM_E])], [1, 2, 3], kept_mm=MM_A)
    s.alloc(T_ALLOC, 3, *B, 1000)

    def expect(ch: dict[str, str]) -> list[Row]:
        if ch["keep"] == "posted":
            return [P("reclaim_keep", 0, 0, 1, 2, 3)]
        return [P("reclaim_keep", 0, 0, 2), P("batch_nonluf", 0, 1, 3)]

    check(s, tmp_path, expect, ["unknown_rw=eligible"])
    # default unknown_rw=reject: the kept folio's CPUs are non-LUF: D = {0,1,2} \\ {0,1,2,3} = {}: one batch flush
    check(s, tmp_path, same([P("batch_nonluf", 0, 0, 1, 2, 3)]))


def test_kept_folio_f11_key_0(tmp_path: Path) -> None:
    """F11 with nothing to key (§9.3 "key 0 still runs try_to_unmap_flush()"), unknown_rw=eligible. Walk: folio
    1001 (E, RW) NONLUF {1,3}; kept folio of C (RO) LUF {3}. fold_unmap_luf: D = {3} \\ {1,3} = {}: key 0.
    - posted: luf_flush(0) still runs try_to_unmap_flush(): the pending NONLUF {1,3} is sent at the keep, from
      CPU0; the batch's own flush then has nothing left to send.
    - key_only: nothing at the keep; the batch flushes NONLUF {1,3}."""
    s = Scenario(4)
    quad_setup(s)
    reclaim_batch(s, T1, [(1001, [MM_E])], [1, 3], kept_mm=MM_C)

    def expect(ch: dict[str, str]) -> list[Row]:
        if ch["keep"] == "posted":
            return [P("reclaim_keep", 0, 1, 3)]
        return [P("batch_nonluf", 0, 1, 3)]

    check(s, tmp_path, expect, ["unknown_rw=eligible"])


def test_dirty_writeback_f13_after_its_flush(tmp_path: Path) -> None:
    """F13 where vanilla's try_to_unmap_flush_dirty flushed: the recorded batch flush (CPU0 → {1,2,3}) is followed
    by the task's pageout row, nothing in between. Batch: folio 1000 (A, RO) LUF {0,1,2}; folio 1001 (E, RW)
    NONLUF {1,3}.
    - posted (§9.4, luf-v12 default): that flush is try_to_unmap_flush_dirty(), which folds tlb_ubc_luf into
      tlb_ubc: NONLUF {1,3} and the LUF part {0,2} are both sent there (no key: fold_unmap_luf does not run).
      The pageout sends nothing more; B's re-allocation of 1000 on CPU3 is clean.
    - last_key (§8.2.5, intended): the batch keys D = {0,2} and flushes {1,3}; the pageout flushes the task's
      last key {0,2} from CPU0; the re-allocation is then a free pass. Same IPIs, one deferral more."""
    s = Scenario(4)
    quad_setup(s)
    t = reclaim_batch(s, T1, [(1000, [MM_A]), (1001, [MM_E])], [1, 2, 3], free=False)
    s.reclaim(t, 0, *A, 12, 1001)
    s.free(t + 10, 0, *A, 1000)
    s.reclaim(t + 20, 0, *A, 3)
    s.alloc(T_ALLOC, 3, *B, 1000)

    def expect(ch: dict[str, str]) -> list[Row]:
        if ch["dirty_writeback"] == "posted":
            return [P("batch_nonluf", 0, 1, 3), P("dirty_writeback", 0, 0, 2)]
        return [D(0, 0, 2), P("batch_nonluf", 0, 1, 3), P("dirty_writeback", 0, 0, 2)]

    check(s, tmp_path, expect)


def test_dirty_writeback_f13_keyed_pages_untouched(tmp_path: Path) -> None:
    """F13 where vanilla's try_to_unmap_flush_dirty sent nothing: the batch (key1 = {0,1,2}) ended with its frees,
    then a dirty folio that no batched PTE mapped is written (no recorded flush before the pageout row).
    - posted (§9.4): the open batch is empty and keyed pages are never touched: nothing; B's re-allocation of
      1000 on CPU3 pays key1, IPIs to 0, 1, 2.
    - last_key: the pageout flushes the task's last key {0,1,2} from CPU0; the re-allocation is a free pass."""
    s = Scenario(4)
    quad_setup(s)
    t = reclaim_batch(s, T1, [(1000, [MM_A])], [1, 2], free=False)
    s.free(t, 0, *A, 1000)
    s.reclaim(t + 10, 0, *A, 12, 1005)
    s.reclaim(t + 20, 0, *A, 3)
    s.alloc(T_ALLOC, 3, *B, 1000)

    def expect(ch: dict[str, str]) -> list[Row]:
        if ch["dirty_writeback"] == "posted":
            return [D(0, 0, 1, 2), P("alloc_pcp", 3, 0, 1, 2)]
        return [D(0, 0, 1, 2), P("dirty_writeback", 0, 0, 1, 2)]

    check(s, tmp_path, expect)


def test_dirty_writeback_f13_after_new_unmaps(tmp_path: Path) -> None:
    """F13 after the task unmapped another folio since its last flush (batch 1, key1 = {0,1,2}, nothing freed
    yet): that flush was not the pageout's try_to_unmap_flush_dirty (vanilla sent none before the pageout: no dirty
    PTE in the open batch), so it is not marked. Batch 2 (folio 1002 of A) then ends with its own flush: key2 =
    {0,1,2}. B re-allocates 1000 on CPU3.
    - posted: the pageout sends nothing; F1 pays key1: IPIs to 0, 1, 2.
    - last_key: the pageout flushes the task's last key (key1) from CPU0; key2 is newer than that flush, but the
      allocation reaches key1 (1000, freed first), done: a free pass."""
    s = Scenario(4)
    quad_setup(s)
    t = reclaim_batch(s, T1, [(1000, [MM_A])], [1, 2], free=False)
    s.reclaim_folio(t, 0, *A, 1002, [MM_A], index=1002 % 256)
    s.reclaim(t + 10, 0, *A, 12, 1005)
    s.batch_flush(t + 20, 0, *A, [1, 2])
    s.free(t + 40, 0, *A, 1000)
    s.free(t + 42, 0, *A, 1002)
    s.reclaim(t + 50, 0, *A, 3)
    s.alloc(T_ALLOC, 3, *B, 1000)

    def expect(ch: dict[str, str]) -> list[Row]:
        if ch["dirty_writeback"] == "posted":
            return [D(0, 0, 1, 2), D(0, 0, 1, 2), P("alloc_pcp", 3, 0, 1, 2)]
        return [D(0, 0, 1, 2), P("dirty_writeback", 0, 0, 1, 2), D(0, 0, 1, 2)]

    check(s, tmp_path, expect)


def _two_keys_on_cpu0_pcp(s: Scenario) -> None:
    """key1 = {0,1,2} (folio of A, freed first), key2 = {3} (folio of C, freed second), both on CPU0's pcp list."""
    quad_setup(s)
    reclaim_batch(s, T1, [(1000, [MM_A])], [1, 2])
    reclaim_batch(s, T2, [(1001, [MM_C])], [3])


def test_pcp_tail_drain(tmp_path: Path) -> None:
    """§9.5: keyed pages sit at the pcp tail, oldest first; free_pcppages_bulk drains from the tail. The trace
    drains 1000 (key1) from CPU0's list, then B takes 1000 from buddy on CPU1, then B allocates 1001 on CPU0.
    - alloc_order=luf: the drain sends the NEWEST keyed page (key2 {3}) to buddy; zone batch {3}. With
      non_luf_ok=false (pend_list first, §4.1) B's take closes epoch 1: IPI to CPU3. The pcp allocation on CPU0
      reaches the oldest keyed page, key1 {0,1,2}: flush {0,1,2} (CPU0 local).
      With non_luf_ok (default) buddy serves a clean block first: no epoch flush.
    - alloc_order=recorded: 1000 itself (key1) goes to buddy: the epoch close flushes {0,1,2} from CPU1; 1001
      (key2) pays {3} from CPU0."""
    s = Scenario(4)
    _two_keys_on_cpu0_pcp(s)
    s.page(T_EVENT, 0, *A, 2, 1000)  # pcpu_drain
    s.page(T_ALLOC, 1, *B, 3, 1000)  # taken from buddy
    s.alloc(T_ALLOC + 1, 1, *B, 1000)
    s.alloc(T_ALLOC + 1000, 0, *B, 1001)
    keys = [D(0, 0, 1, 2), D(0, 3)]
    tail = [*keys, P("alloc_buddy_epoch", 1, 3), P("alloc_pcp", 0, 0, 1, 2)]
    check(s, tmp_path, same(tail), ["non_luf_ok=false"])
    check(s, tmp_path, same([*keys, P("alloc_pcp", 0, 0, 1, 2)]))
    recorded = [*keys, P("alloc_buddy_epoch", 1, 0, 1, 2), P("alloc_pcp", 0, 3)]
    check(s, tmp_path, same(recorded), ["alloc_order=recorded"])


def test_buddy_takeoff_and_epoch_close(tmp_path: Path) -> None:
    """§4.1/§9.6: pages drained to buddy are stamped with the open epoch; the zone batch is the union of their
    keys' CPUs, zone->luf_ugen their newest ugen. Epoch 1: 1000 and 1001 (key1 {0,1,2}). B's take of 1000 on
    CPU3 closes it: flush {0,1,2}; the take of 1001 (stamp 1 <= zone_ugen_done 1) is free. Epoch 2: 1002 (key2
    {0,1,2}, ugen u2); then a batch whose only folio is E's (writable) flushes NONLUF {1,3} (done[1] > u2);
    B's take of 1002 closes epoch 2: the zone batch dieted by luf_ugen u2 = {0,2}.
    With alloc_order=luf and non_luf_ok (default) the free_list is used first: no epoch flush at all."""
    s = Scenario(4)
    quad_setup(s)
    reclaim_batch(s, T1, [(1000, [MM_A]), (1001, [MM_A])], [1, 2])
    s.page(T_EVENT, 0, *A, 2, 1000)
    s.page(T_EVENT + 10, 0, *A, 2, 1001)
    for k, pfn in enumerate((1000, 1001)):
        s.page(T_ALLOC + 1000 * k, 3, *B, 3, pfn)
        s.alloc(T_ALLOC + 1000 * k + 1, 3, *B, pfn)
    t = reclaim_batch(s, 300_000, [(1002, [MM_A])], [1, 2])
    s.page(t, 0, *A, 2, 1002)
    reclaim_batch(s, 400_000, [(1003, [MM_E])], [1, 3])
    s.page(500_000, 3, *B, 3, 1002)
    s.alloc(500_001, 3, *B, 1002)
    rows = [D(0, 0, 1, 2), P("alloc_buddy_epoch", 3, 0, 1, 2), D(0, 0, 1, 2), P("batch_nonluf", 0, 1, 3)]
    rows.append(P("alloc_buddy_epoch", 3, 0, 2))
    for sets in (["non_luf_ok=false"], ["alloc_order=recorded"], ["alloc_order=recorded", "non_luf_ok=false"]):
        check(s, tmp_path, same(rows), sets)
    check(s, tmp_path, same([D(0, 0, 1, 2), D(0, 0, 1, 2), P("batch_nonluf", 0, 1, 3)]))


def _hook_scenario(event: Callable[[Scenario], None]) -> Scenario:
    """Folio 1000 mapped read-only by A and C: LUF = {0,1,2} ∪ {3}, key1 = {0,1,2,3}; MMB(A) = {0,1,2},
    MMB(C) = {3}, ASB(ino 100) = {0,1,2,3}. Then the hook, then B re-allocates 1000 on CPU3."""
    s = Scenario(4)
    quad_setup(s)
    reclaim_batch(s, T1, [(1000, [MM_A, MM_C])], [1, 2, 3])
    event(s)
    s.alloc(T_ALLOC, 3, *B, 1000)
    return s


def _hook_expect(intended: list[Row]) -> Expect:
    """As intended (§8.2.9–13): the hook's flush, then F1 pays what key1 still owes. As posted (§9.1): the hook
    sends nothing (flush_required never set), so F1 pays the whole key."""
    key = D(0, 0, 1, 2, 3)

    def expect(ch: dict[str, str]) -> list[Row]:
        if ch["hooks"] == "posted":
            return [key, P("alloc_pcp", 3, 0, 1, 2, 3)]
        return [key, *intended]

    return expect


def test_f3_fault_hook(tmp_path: Path) -> None:
    """F3: a read fault of A1 (CPU1) in A's rw-p VMA (VM_MAYWRITE): luf_flush(MMB(A)) = {0,1,2} (not a shared
    file VMA: no ASB). F1 then owes only CPU3, the allocating CPU itself: a local flush."""
    s = _hook_scenario(lambda s: s.fault(T_EVENT, 1, *A1, ANON + 8192))
    check(s, tmp_path, _hook_expect([P("fault", 1, 0, 1, 2), P("alloc_pcp", 3, 3)]))


def test_f4_f5_f6_mapping_hooks(tmp_path: Path) -> None:
    """F4 write_begin, F5 truncate, F6 mkclean (dirty_folio) of ino 100 by C on CPU3: luf_flush(ASB) =
    {0,1,2,3}; F1 then finds key1 done: free pass."""
    for event, cause in ((0, "write_begin"), (1, "truncate"), (2, "mkclean")):
        s = _hook_scenario(lambda s, ev=event: s.file(T_EVENT, 3, *C, ev, ino=100))
        check(s, tmp_path, _hook_expect([P(cause, 3, 0, 1, 2, 3)]))


def test_f7_zap_hook(tmp_path: Path) -> None:
    """F7: munmap of A's anon VMA by A1 on CPU1: tlb_end_vma → luf_flush(MMB(A)) = {0,1,2}; F1 owes CPU3 only."""
    s = _hook_scenario(lambda s: s.syscall(T_EVENT, 1, *A1, 1, ANON, 4096))
    check(s, tmp_path, _hook_expect([P("zap_vma", 1, 0, 1, 2), P("alloc_pcp", 3, 3)]))


def test_f10_kthread_to_user_switch(tmp_path: Path) -> None:
    """F10: on CPU2 (last user mm: A) a kernel thread switches to A2: luf_flush(MMB(A)) = {0,1,2} from CPU2."""
    s = _hook_scenario(lambda s: s.sched(T_EVENT, 2, 5, 0, 102, prev_kthread=True))
    check(s, tmp_path, _hook_expect([P("ctxsw_kthread", 2, 0, 1, 2), P("alloc_pcp", 3, 3)]))


def test_f9_batched_pending(tmp_path: Path) -> None:
    """F9 (§3.5, §8.2.12): mprotect in A after its batched unmap: the recorded flush_tlb_mm (CPU1 → 0, 2, plus
    its local flush) passes through unchanged and marks done for mm_cpumask(A) = {0,1,2}: F1 is a free pass.
    Not a hook: the same in both hook modes."""
    s = Scenario(4)
    quad_setup(s)
    reclaim_batch(s, T1, [(1000, [MM_A])], [1, 2])
    s.syscall(T_EVENT, 1, *A1, 2, ANON, 4096, 1)
    s.tlb(T_EVENT + 2, 1, *A1, 4)
    s.sd(T_EVENT + 3, 1, *A1, 0)
    s.sd(T_EVENT + 4, 1, *A1, 2)
    s.tlb(T_EVENT + 5, 1, *A1, 3)
    s.alloc(T_ALLOC, 3, *B, 1000)
    check(s, tmp_path, same([D(0, 0, 1, 2), P("batched_pending", 1, 0, 1, 2)]))


def _lazy_scenario(cpu2_busy_at_alloc: bool) -> Scenario:
    """A2's CPU2 goes idle (lazy, A still loaded: in mm_cpumask(A)) before A's batch; vanilla's batched flush
    skipped it (recorded targets {1}). Folios 1000 and 1001 share the batch's key. B allocates 1000 on CPU3 at
    T_ALLOC, with CPU2 still idle or running A2 again; CPU2 runs A2 by the time 1001 is allocated."""
    s = Scenario(4)
    quad_setup(s)
    s.sched(5_000, 2, *A2, 0)  # A2 → idle: enter_lazy_tlb
    reclaim_batch(s, T1, [(1000, [MM_A]), (1001, [MM_A])], [1])
    wake = T_ALLOC - 50_000 if cpu2_busy_at_alloc else T_ALLOC + 50_000
    s.sched(wake, 2, 0, 0, A2[0])  # idle → A2: CPU2 is busy in A again
    s.alloc(T_ALLOC, 3, *B, 1000)
    s.alloc(T_ALLOC + 100_000, 3, *B, 1001)
    return s


def test_lazy_cpus_at_unmap_vs_at_flush(tmp_path: Path) -> None:
    """§9.7, by hand from the v12 code: fold_unmap_luf keys the whole mm_cpumask(A) = {0,1,2} (CPU2 is lazy, not
    out of the mask), so the batch defers {0,1,2}. F1 at the allocation of 1000 on CPU3 runs arch_tlbbatch_flush
    on KEY = {0,1,2}: should_flush_tlb skips a CPU lazy at that moment. CPU2 still idle: IPIs to {0,1} only, and
    done[] is marked for all of {0,1,2} (arch_tlbbatch_mark_ugen), so 1001's F1 is a free pass although CPU2 is
    busy again by then. CPU2 busy at the allocation: IPIs to {0,1,2}; 1001 is a free pass. clip_to_recorded
    (the former default) takes the lazy skip at the unmap instead: key = recorded targets + sender = {0,1}, and F1
    sends {0,1} whatever CPU2 does later (optimistic when CPU2 is busy again, as here in the second case)."""
    idle, busy = _lazy_scenario(False), _lazy_scenario(True)
    check(idle, tmp_path, same([D(0, 0, 1, 2), P("alloc_pcp", 3, 0, 1)]))
    check(busy, tmp_path, same([D(0, 0, 1, 2), P("alloc_pcp", 3, 0, 1, 2)]))
    for s in (idle, busy):
        check(s, tmp_path, same([D(0, 0, 1), P("alloc_pcp", 3, 0, 1)]), ["clip_to_recorded=true"])


def test_scenario_uses_four_cpus() -> None:
    """The setup really spans four CPUs (a scenario on fewer could not tell {0,2} from {0,1,2})."""
    s = Scenario(4)
    quad_setup(s)
    assert {r["cpu"] for r in s.rows["sched"]} == {0, 1, 2, 3}
    assert RO_FILE and MM_E
