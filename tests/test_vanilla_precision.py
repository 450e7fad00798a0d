"""The rebuilt vanilla follows the kernel's target rules (arch/x86/mm/tlb.c, mm/rmap.c), on 4-CPU hand-made traces.

* a switch to a kernel thread or idle is lazy (the mm stays loaded, the bit stays set); a switch to another user
  mm leaves the old mm's cpumask at once (``mm_cpumask=switch``, x86 up to 6.12) or only when a flush of that mm
  later reaches the CPU while it runs another mm (``kept``, the default: x86 since "Update mm_cpumask lazily");
* ``arch_tlbbatch_add_pending`` ORs ``mm_cpumask(mm)`` into the batch when the PTE is cleared;
* ``arch_tlbbatch_flush`` (``info->mm == NULL``) IPIs every CPU of that union except the sender and the CPUs lazy
  at that moment (``should_flush_tlb``), whatever mm they run now;
* an unbatched PTE (``ptep_clear_flush``: ``should_defer_flush`` found no other CPU) adds no remote target.

Every scenario: process A (mm 0xA0) with threads on several CPUs, process B (mm 0xB0) elsewhere; A's thread on
CPU0 reclaims one folio of A and the recorded batched flush reaches what the kernel would have reached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from scenarios import Scenario, run

MM_A, MM_B = 0xA0, 0xB0
A = [(100 + k, 100) for k in range(4)]  # thread k of process A
B = [(200 + k, 200) for k in range(4)]  # thread k of process B
KWORKER = (50, 50)  # a kernel thread


def user_on(s: Scenario, ts: int, cpu: int, task: tuple[int, int], mm_id: int, prev: tuple[int, int] = (0, 0)) -> None:
    """``task`` (its process's mm known from its own rss_stat) is switched in on ``cpu`` after ``prev``."""
    s.mm(ts, cpu, *task, mm_id)
    s.sched(ts + 1, cpu, *prev, task[0])


def kthread_known(s: Scenario, ts: int, cpu: int) -> None:
    """The kernel thread runs once on ``cpu`` and is switched out (prev_kthread): its kind is now known."""
    s.sched(ts, cpu, 0, 0, KWORKER[0])
    s.sched(ts + 1, cpu, *KWORKER, 0, prev_kthread=True)


def reclaim_batch(
    s: Scenario, ts: int, targets: list[int], mm_ids: tuple[int, ...] = (MM_A,), imm: bool = False
) -> None:
    """A's thread on CPU0 reclaims pfn 1000 (one PTE per mm) and sends the batched flush to ``targets``. With
    ``imm`` the PTE was cleared by ptep_clear_flush (a local reason-3 flush just before it): not batched."""
    s.reclaim(ts, 0, *A[0], 2)
    if imm:
        s.tlb(ts + 5, 0, *A[0], 3, 1)
    s.reclaim_folio(ts + 10, 0, *A[0], 1000, list(mm_ids))
    if targets or not imm:
        s.batch_flush(ts + 100, 0, *A[0], targets)
    s.free(ts + 200, 0, *A[0], 1000)
    s.reclaim(ts + 300, 0, *A[0], 3)


def rebuilt(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["models"]["vanilla"]


def test_a_lazy_cpu_is_skipped_and_a_cpu_that_left_the_mm_follows_the_kernel(tmp_path: Path) -> None:
    s = Scenario(4)
    kthread_known(s, 100, 2)
    for c in range(4):
        user_on(s, 1000 + 10 * c, c, A[c], MM_A)
    s.sched(5000, 2, *A[2], KWORKER[0])  # CPU2: kthread, lazily keeps mm A (bit stays, is_lazy)
    user_on(s, 5100, 3, B[0], MM_B, prev=A[3])  # CPU3: switch to B
    reclaim_batch(s, 10_000, [1, 3])  # a kernel that keeps CPU3's bit
    doc = run(s, tmp_path, models=["vanilla"])
    v = rebuilt(doc)
    assert v["remote_shootdowns"] == 2 and v["per_cpu"] == [0, 1, 0, 1]
    fid = doc["fidelity"]
    assert fid["recall_pct"] == 100.0 and fid["precision_pct"] == 100.0 and fid["rebuilt_vs_recorded_pct"] == 0.0
    assert fid["precision_by_cause"]["batch"]["precision_pct"] == 100.0
    # a kernel that clears the bit at the switch: CPU3 is not targeted (the recorded CPU3 is not explained)
    doc = run(s, tmp_path, ["mm_cpumask=switch"], models=["vanilla"])
    assert rebuilt(doc)["per_cpu"] == [0, 1, 0, 0]
    assert doc["fidelity"]["recall_pct"] == 50.0 and doc["fidelity"]["precision_pct"] == 100.0
    # the former approximation: the CPUs that ran A within the window (CPU2 is lazy all the same)
    assert rebuilt(run(s, tmp_path, ["mm_cpumask=window"], models=["vanilla"]))["per_cpu"] == [0, 1, 0, 1]


@pytest.mark.parametrize("in_munmap", [True, False], ids=["munmap", "own-mm-flush"])
def test_a_flush_of_the_mm_reaching_a_cpu_that_runs_another_mm_takes_it_out(tmp_path: Path, in_munmap: bool) -> None:
    """kept: CPU3 left A for B; then A's thread on CPU1 flushes mm A (munmap, or any flush of its own mm outside a
    traced syscall), and that flush (trim_cpumask) reaches CPU3 while it runs B (flush_tlb_func:
    TLB_REMOTE_WRONG_CPU clears its bit). The later batch no longer targets it."""
    s = Scenario(4)
    for c in range(4):
        user_on(s, 1000 + 10 * c, c, A[c], MM_A)
    user_on(s, 5100, 3, B[0], MM_B, prev=A[3])
    if in_munmap:
        s.syscall(6000, 1, *A[1], 1, 0x20000000, 4096)
    s.tlb(6002, 1, *A[1], 4, 1 if in_munmap else -1)
    for k, t in enumerate((0, 2, 3)):
        s.sd(6003 + k, 1, *A[1], t)
    s.tlb(6010, 1, *A[1], 3, 1 if in_munmap else -1)
    reclaim_batch(s, 10_000, [1, 2])
    doc = run(s, tmp_path, models=["vanilla"])
    assert doc["vanilla"]["by_cause"] == {"zap" if in_munmap else "other": 3, "batch": 2}
    assert rebuilt(doc)["by_cause"]["batch"] == 2 and rebuilt(doc)["per_cpu"] == [1, 1, 2, 1]
    # a flush outside a traced syscall passes through with no cause: sent as recorded, not explained
    assert doc["fidelity"]["precision_pct"] == 100.0
    assert doc["fidelity"]["recall_pct"] == (100.0 if in_munmap else 40.0)


def test_a_cpu_that_switches_after_the_unmap_is_still_flushed(tmp_path: Path) -> None:
    """The batch holds the cpumask of the PTE-clear moment; a CPU that moved on to another user mm since is not
    lazy, so the mm == NULL flush reaches it. One that went idle since is lazy and skipped."""
    s = Scenario(4)
    for c in range(4):
        user_on(s, 1000 + 10 * c, c, A[c], MM_A)
    s.reclaim(10_000, 0, *A[0], 2)
    s.reclaim_folio(10_010, 0, *A[0], 1000, [MM_A])  # mm_cpumask(A) = {0, 1, 2, 3}
    user_on(s, 10_050, 2, B[0], MM_B, prev=A[2])  # CPU2 runs B now: not lazy
    s.sched(10_060, 3, *A[3], 0)  # CPU3 idles: lazy
    s.batch_flush(10_100, 0, *A[0], [1, 2])
    s.free(10_200, 0, *A[0], 1000)
    s.reclaim(10_300, 0, *A[0], 3)
    doc = run(s, tmp_path, models=["vanilla"])
    assert rebuilt(doc)["per_cpu"] == [0, 1, 1, 0]
    assert doc["fidelity"]["recall_pct"] == 100.0 and doc["fidelity"]["precision_pct"] == 100.0


def test_an_unbatched_pte_adds_no_remote_target(tmp_path: Path) -> None:
    """mm A is loaded on CPU0 only: should_defer_flush is false, the PTE is flushed at once (local reason 3) and
    no batched flush follows. B's PTE in the same folio is batched and reaches B's CPUs."""
    s = Scenario(4)
    user_on(s, 1000, 0, A[0], MM_A)
    for c in (1, 2):
        user_on(s, 1000 + 10 * c, c, B[c], MM_B)
    kthread_known(s, 1100, 3)
    s.reclaim(10_000, 0, *A[0], 2)
    s.tlb(10_005, 0, *A[0], 3, 1)
    s.unmap(10_010, 0, *A[0], MM_A)  # unbatched: right after the local flush
    s.unmap(10_040, 0, *A[0], MM_B)  # batched
    s.pcdel(10_050, 0, *A[0], 1000)
    s.batch_flush(10_100, 0, *A[0], [1, 2])
    s.free(10_200, 0, *A[0], 1000)
    s.reclaim(10_300, 0, *A[0], 3)
    doc = run(s, tmp_path, models=["vanilla"])
    v = rebuilt(doc)
    assert v["by_cause"].get("batch") == 2 and v["per_cpu"] == [0, 1, 1, 0]
    assert doc["fidelity"]["precision_by_cause"]["batch"] == {
        "rebuilt": 2,
        "recall_pct": 100.0,
        "precision_pct": 100.0,
        "rebuilt_vs_recorded_pct": 0.0,
    }


def test_a_skip_the_trace_cannot_see_lowers_precision_not_recall(tmp_path: Path) -> None:
    """A, loaded on CPUs 0-3 (none lazy), but the kernel IPIs only CPU1 (e.g. KVM skipped preempted vCPUs 2, 3):
    the rebuild sends 3, 1 of them recorded. A second batch whose flush traced remote_send_ipi but reached no CPU
    is counted apart: every remote target skipped."""
    s = Scenario(4)
    for c in range(4):
        user_on(s, 1000 + 10 * c, c, A[c], MM_A)
    reclaim_batch(s, 10_000, [1])
    s.reclaim(20_000, 0, *A[0], 2)
    s.reclaim_folio(20_010, 0, *A[0], 1001, [MM_A], index=1)
    s.tlb(20_100, 0, *A[0], 4)  # native_flush_tlb_multi traces before filtering; no csd follows
    s.tlb(20_101, 0, *A[0], 2)
    s.free(20_200, 0, *A[0], 1001)
    s.reclaim(20_300, 0, *A[0], 3)
    doc = run(s, tmp_path, models=["vanilla"])
    fid = doc["fidelity"]
    assert rebuilt(doc)["per_cpu"] == [0, 2, 2, 2]
    assert fid["recall_pct"] == 100.0
    assert fid["precision_pct"] == round(100 / 6, 3)
    assert fid["rebuilt_vs_recorded_pct"] == 500.0
    assert fid["batch_not_recorded"] == {"total": 5, "flush_sent_to_none": 3, "flush_without_remote_cpu": 0}
    # all 5 were skipped by flushes whose send was traced, at CPUs running A (not lazy): the PV-skip estimate
    # counts them (2 of the first flush, 3 of the second) and leaves them in the rebuild
    assert fid["pv_flush"] == {
        "host_pv_tlb_flush": None,
        "skip_candidates": 5,
        "rebuilt_vs_recorded_pct_without_them": 0.0,
    }
    per_cpu = {p["cpu"]: p for p in fid["per_cpu"]}
    assert per_cpu[1]["precision_pct"] == 50.0 and per_cpu[1]["rebuilt_vs_recorded_pct"] == 100.0
    assert per_cpu[2]["recorded"] == 0 and per_cpu[2]["rebuilt"] == 2 and per_cpu[2]["precision_pct"] == 0.0


def test_kind_of_a_task_switched_in_for_the_first_time(tmp_path: Path) -> None:
    """A task never seen before whose process's mm is unknown is taken as a kernel thread (lazy) and counted; a
    known kernel thread and idle are lazy; a known user task is not."""
    s = Scenario(4)
    for c in range(4):
        user_on(s, 1000 + 10 * c, c, A[c], MM_A)
    kthread_known(s, 1100, 0)
    s.sched(2000, 1, *A[1], KWORKER[0])  # known kthread: lazy
    s.sched(2000, 2, *A[2], 0)  # idle: lazy
    s.sched(2000, 3, *A[3], 777)  # never seen, process unknown: guessed kthread, lazy
    reclaim_batch(s, 10_000, [])
    doc = run(s, tmp_path, models=["vanilla"])
    assert rebuilt(doc)["remote_shootdowns"] == 0
    # the kworker's first switch-in (before it was ever switched out) and task 777's were guessed
    assert doc["fidelity"]["cpu_state"]["switches_of_unknown_kind"] == 2
    # CPU3 switches, between the unmap and the flush, to a thread of B never switched in before (its kind unknown)
    # whose process's mm is known: a user task, so CPU3 is not lazy and the batch (mask of the unmap) reaches it
    s2 = Scenario(4)
    for c in range(4):
        user_on(s2, 1000 + 10 * c, c, A[c], MM_A)
    s2.mm(1500, 1, *B[1], MM_B)
    s2.alloc(1600, 1, *B[0], 5000)  # B[0] is seen (its process), not its kind
    s2.reclaim(10_000, 0, *A[0], 2)
    s2.reclaim_folio(10_010, 0, *A[0], 1000, [MM_A])
    s2.sched(10_050, 3, *A[3], B[0][0])
    s2.batch_flush(10_100, 0, *A[0], [1, 2, 3])
    s2.free(10_200, 0, *A[0], 1000)
    s2.reclaim(10_300, 0, *A[0], 3)
    doc2 = run(s2, tmp_path, models=["vanilla"])
    assert rebuilt(doc2)["per_cpu"] == [0, 1, 1, 1]
    assert doc2["fidelity"]["cpu_state"]["switches_of_unknown_kind"] == 1


def _simulate(s: Scenario, tmp_path: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    from lufreplay.report.simulate_cmd import simulate

    doc, _ = simulate(s.write(tmp_path / f"t{len(list(tmp_path.iterdir()))}", meta), ["vanilla"], [])
    return doc


def _mm_flush(
    s: Scenario, ts: int, cpu: int, task: tuple[int, int], targets: list[int], local: int, pages: int
) -> None:
    """A flush of ``task`` outside any traced syscall, reclaim or migration: reason 4, one csd per target, then
    the local row (3: flush_tlb_func of an mm; 2: info->mm == NULL; 0: none)."""
    s.tlb(ts, cpu, *task, 4, pages)
    for k, t in enumerate(targets):
        s.sd(ts + 1 + k, cpu, *task, t)
    if local:
        s.tlb(ts + 10, cpu, *task, local, pages)


def test_a_flush_by_a_task_whose_faults_and_syscalls_are_not_traced_is_untraced(tmp_path: Path) -> None:
    """Issue 7 item 3, recall: in a trace of a target (process A), a 1-page mm flush of another process (the
    recorder's COW breaks: do_wp_page → ptep_clear_flush) and a full flush of a kernel thread (khugepaged's
    pmdp_collapse_flush) are ``untraced``: not reclaim or migration flushes, which no model changes. A flush with
    no mm (local reason 2: a batched unmap's) stays ``other``, and so does a traced task's unexplained flush."""
    s = Scenario(4)
    for c in range(4):
        user_on(s, 1000 + 10 * c, c, A[c], MM_A)
    kthread_known(s, 1100, 3)
    s.mm(1200, 1, *B[1], MM_B)
    _mm_flush(s, 10_000, 1, B[1], [0, 2], 3, 1)  # B outside the target: a COW break
    _mm_flush(s, 20_000, 3, KWORKER, [0, 1], 0, -1)  # a kernel thread: no mm of its own loaded
    _mm_flush(s, 30_000, 1, B[1], [2], 2, -1)  # no mm: could be a batched unmap whose rows the trace lacks
    _mm_flush(s, 40_000, 2, A[2], [0], 3, 1)  # the target's own, outside a traced syscall or fault: unknown
    meta = {"target": {"pids": [100]}, "targets_final": [100]}
    doc = _simulate(s, tmp_path, meta)
    assert doc["vanilla"]["by_cause"] == {"untraced": 4, "other": 2}
    fid = doc["fidelity"]
    assert fid["recall_pct"] == round(100 * 4 / 6, 3) and fid["precision_pct"] == 100.0
    # recorded system-wide (no target), B's faults and syscalls are in the trace: only the kernel thread is untraced
    doc = _simulate(s, tmp_path)
    assert doc["vanilla"]["by_cause"] == {"untraced": 2, "other": 4}
    # ... unless B is the recorder (meta.json recorder.tgid), which the probes never trace
    doc = _simulate(s, tmp_path, {"recorder": {"tgid": B[1][1]}})
    assert doc["vanilla"]["by_cause"] == {"untraced": 4, "other": 2}


@pytest.mark.parametrize("event", [1, 2], ids=["exec", "exit"])
def test_the_old_mm_teardown_before_an_exec_or_exit_row_is_a_zap(tmp_path: Path, event: int) -> None:
    """exec_mmap / exit_mm → mmput → exit_mmap flushes the whole old mm before sched_process_exec / _exit fire
    (rss_stat rows and frees of the teardown may come in between): ``zap``. Anything else of the task in between
    (a syscall) leaves it ``other``."""
    for between in (False, True):
        s = Scenario(4)
        for c in range(4):
            user_on(s, 1000 + 10 * c, c, A[c], MM_A)
        _mm_flush(s, 10_000, 0, A[0], [1, 2], 0, -1)
        s.mm(12_000, 0, *A[0], MM_A)
        s.free(13_000, 0, *A[0], 3000)
        if between:
            s.syscall(14_000, 0, *A[0], 2, 0x20000000, 4096)  # mprotect
        s.proc(5_000_000, 0, *A[0], event)
        doc = _simulate(s, tmp_path)
        assert doc["vanilla"]["by_cause"] == ({"other": 2} if between else {"zap": 2}), between


@pytest.mark.parametrize("delta", [-(2 << 20), -4096])
def test_a_pmd_unmap_is_never_batched(tmp_path: Path, delta: int) -> None:
    """Reclaim splits a PMD-mapped folio: pmdp_huge_clear_flush flushes at once (reason 4, IPIs, local reason 3)
    and the PMD's rss_stat (-2 MiB) may come more than 20 µs later on a busy host (28 µs seen). It adds nothing to
    the batch: the rebuild is the recorded immediate flush. A 4 KiB PTE row as late is batched (the kernel then
    traced no batched flush: its mask had no remote CPU, the model's had three)."""
    s = Scenario(4)
    for c in range(4):
        user_on(s, 1000 + 10 * c, c, A[c], MM_A)
    s.reclaim(10_000, 0, *A[0], 2)
    s.tlb(10_010, 0, *A[0], 4)
    for t in (1, 2, 3):
        s.sd(10_010 + t, 0, *A[0], t)
    s.tlb(10_020, 0, *A[0], 3)
    s.unmap(50_000, 0, *A[0], MM_A, delta=delta)  # 30 µs after the local flush
    s.pcdel(50_010, 0, *A[0], 1000, order=9)
    s.free(50_200, 0, *A[0], 1000, order=9)
    s.reclaim(50_300, 0, *A[0], 3)
    doc = run(s, tmp_path, models=["vanilla"])
    v, fid = rebuilt(doc), doc["fidelity"]
    assert doc["vanilla"]["remote_shootdowns"] == 3 and v["by_cause"].get("immediate") == 3
    if delta == -4096:
        assert v["remote_shootdowns"] == 6 and fid["batch_not_recorded"]["flush_without_remote_cpu"] == 3
    else:
        assert v["remote_shootdowns"] == 3 and v["by_cause"].get("batch", 0) == 0
        assert fid["precision_pct"] == 100.0 and fid["rebuilt_vs_recorded_pct"] == 0.0


@pytest.mark.parametrize("evidence", ["switch_mm", "local_flush", "fault", "none", "lazy_to_init_mm"])
def test_a_cpu_guessed_lazy_is_corrected_by_a_row_only_a_loaded_mm_emits(tmp_path: Path, evidence: str) -> None:
    """CPU3 switches to task 777, never seen, of a process the trace has not named: taken for a kernel thread
    (lazy). switch_mm's reason-0 row right after the switch (it carries the previous task's pid), a traced local
    flush of the task (flush_tlb_func returns untraced on a lazy CPU) or a user fault of it shows that it runs with
    its mm loaded: the batch reaches CPU3, as the kernel's did. With no such row the guess stands (a missed target);
    so it does after a reason 0 of the running task itself (flush_tlb_func moving a lazy CPU to init_mm)."""
    s = Scenario(4)
    for c in range(4):
        user_on(s, 1000 + 10 * c, c, A[c], MM_A)
    s.sched(2000, 3, *A[3], 777)
    if evidence == "switch_mm":
        s.tlb(2001, 3, *A[3], 0)
    elif evidence == "local_flush":
        s.tlb(3000, 3, 777, 777, 3, 1)
    elif evidence == "fault":
        s.fault(3000, 3, 777, 777, 0x7000)
    elif evidence == "lazy_to_init_mm":
        s.tlb(3000, 3, 777, 777, 0, 0)
    reclaim_batch(s, 10_000, [1, 2, 3])
    doc = run(s, tmp_path, models=["vanilla"])
    fid = doc["fidelity"]
    assert fid["cpu_state"]["switches_of_unknown_kind"] == 1
    if evidence in ("none", "lazy_to_init_mm"):
        assert rebuilt(doc)["per_cpu"] == [0, 1, 1, 0] and fid["recall_pct"] < 100.0
    else:
        assert rebuilt(doc)["per_cpu"] == [0, 1, 1, 1]
        assert fid["recall_pct"] == 100.0 and fid["precision_pct"] == 100.0
