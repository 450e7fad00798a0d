"""Recorded single-page flushes LUF leaves alone, identified from what surrounds them: a COW break after a write
fault (wp_page_copy → ptep_clear_flush) and writeback's folio_mkclean (page_mkclean_one). Hand-built traces with
worked-out answers: every model passes them through, and fidelity counts them as explained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scenarios import A1, MM_A, T_EVENT, US, A, Scenario, run

PRIV = 0x30000000  # rw-p anonymous VMA of process A
SHARED = 0x20000000  # rw-s file VMA of process A (dev 1, ino 7)
KW = (50, 50)  # a writeback kworker: no mm
SYS_MPROTECT = 2


def _base() -> Scenario:
    """Process A runs on CPU0 and CPU1 and maps a private anonymous VMA and a shared writable file VMA."""
    s = Scenario()
    s.maps(0, 100, 1, PRIV, PRIV + 0x100000, "rw-p", 0, 0, 0)
    s.maps(0, 100, 1, SHARED, SHARED + 0x100000, "rw-s", 0, 1, 7)
    s.run_on(1000, 0, *A, MM_A)
    s.run_on(2000, 1, *A1, MM_A)
    return s


def _page_flush(s: Scenario, t: int, task: tuple[int, int], local: bool = True, pages: int = 1) -> None:
    """flush_tlb_page from CPU0: reason 4 (1 page), one IPI to CPU1, then the local flush (reason 3) if the mm is
    loaded here."""
    s.tlb(t, 0, *task, 4, pages)
    s.sd(t + 1, 0, *task, 1)
    if local:
        s.tlb(t + 2, 0, *task, 3, pages)


def _cow(addr: int, gap_ns: int = 5 * US) -> Scenario:
    s = _base()
    s.fault(T_EVENT, 0, *A, addr + 0x40, write=True)
    _page_flush(s, T_EVENT + gap_ns, A)
    return s


def _mkclean(shared_write: bool = True, pages: int = 1, in_syscall: bool = False) -> Scenario:
    """A dirties a page of its shared file mapping; 1 ms later the kworker cleans it: one IPI to CPU1."""
    s = _base()
    s.fault(T_EVENT, 0, *A, (SHARED if shared_write else PRIV) + 0x1000, write=True)
    s.file(T_EVENT + 1, 0, *A, 2, 1, 7)
    t = T_EVENT + 1000 * US
    if in_syscall:  # the flush comes inside a traced mprotect of A: that syscall's, not writeback's
        s.syscall(t - 10, 0, *A, SYS_MPROTECT, 0x50000000, 4096, 1, 0, 0, duration_ns=100)
        _page_flush(s, t, A, pages=pages)
    else:
        _page_flush(s, t, KW, local=False, pages=pages)
    return s


def _causes(doc: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {name: m["by_cause"] for name, m in doc["models"].items()}


def test_cow_break_after_a_private_write_fault(tmp_path: Path) -> None:
    doc = run(_cow(PRIV), tmp_path)
    assert doc["vanilla"]["by_cause"] == {"cow_fault": 1}
    assert set(map(str, _causes(doc).values())) == {str({"cow_fault": 1})}  # LUF changes nothing
    assert doc["fidelity"]["explained_pct"] == 100.0


def test_cow_needs_a_private_vma_and_a_recent_fault(tmp_path: Path) -> None:
    # a write fault in a shared VMA copies nothing (wp_page_shared): the flush stays unexplained
    assert run(_cow(SHARED), tmp_path)["vanilla"]["by_cause"] == {"other": 1}
    # 200 µs after the fault (> 50 µs window), no shared page ever written: not a COW, not mkclean
    assert run(_cow(PRIV, gap_ns=200 * US), tmp_path)["vanilla"]["by_cause"] == {"other": 1}
    # another event of the task in between ends the window
    s = _base()
    s.fault(T_EVENT, 0, *A, PRIV, write=True)
    s.file(T_EVENT + 2 * US, 0, *A, 0, 1, 9)
    _page_flush(s, T_EVENT + 5 * US, A)
    assert run(s, tmp_path)["vanilla"]["by_cause"] == {"other": 1}


def test_one_flush_per_cow_fault(tmp_path: Path) -> None:
    s = _cow(PRIV)
    _page_flush(s, T_EVENT + 10 * US, A)  # a second single-page flush after the same fault
    assert run(s, tmp_path)["vanilla"]["by_cause"] == {"cow_fault": 1, "other": 1}


def test_writeback_mkclean_by_a_kworker(tmp_path: Path) -> None:
    doc = run(_mkclean(), tmp_path)
    assert doc["vanilla"]["by_cause"] == {"folio_mkclean": 1}
    assert set(map(str, _causes(doc).values())) == {str({"folio_mkclean": 1})}
    assert doc["fidelity"]["explained_pct"] == 100.0


def test_mkclean_needs_a_shared_write_a_single_page_and_no_syscall(tmp_path: Path) -> None:
    # the only written page is private: writeback has nothing mapped to clean
    assert run(_mkclean(shared_write=False), tmp_path)["vanilla"]["by_cause"] == {"other": 1}
    # a full flush is not page_mkclean_one's
    assert run(_mkclean(pages=-1), tmp_path)["vanilla"]["by_cause"] == {"other": 1}
    # inside a traced mprotect with no pending batch: mprotect's flush, stays other
    assert run(_mkclean(in_syscall=True), tmp_path)["vanilla"]["by_cause"] == {"other": 1}
