"""The exact tier: kprobes on the rmap walk give each cleared PTE's write bit and the mm of migration entries.

This host has no kprobes, so here: the capability check says so and `record` falls back (real, as root: the
stream recording of test_record), the decoding of the tier's raw records, and hand-made traces with pte rows
that the replay must use instead of the /proc/PID/maps inference (docs/simulate.md, "Exact tier")."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scenarios import A1, ANON, MM_A, RO_FILE, T_BATCH, T_EVENT, A, Scenario, run

from lufreplay import schema
from lufreplay.capture import decode, doctor, features, probes

W = (300, 300)  # the task writing compact_memory: migrates A's pages, on CPU0
MM_W = 0xC0
UNMAP, MIGRATE = 1, 2


def luf(doc: dict) -> dict:
    return doc["models"]["luf-v12"]


# ---- capability check and fallback (real, on this kprobe-less host) ------------------------------------------


@pytest.mark.bpf
def test_this_host_has_no_kprobes_and_says_why() -> None:
    assert os.geteuid() == 0
    ex = probes.exact_tier()
    assert ex["ok"] is False and ex["kprobes"] is False
    assert "no kprobes" in ex["reason"]
    assert features.kernel_config()["flags"]["KPROBES"] == "n"  # what the check found by looking, confirmed
    det = features.detect(trials=False)
    assert det["exact_tier"]["ok"] is False
    checks = {c["check"]: c for c in doctor.checks(det)}
    assert checks["exact tier"]["status"] == "warn" and "no kprobes" in checks["exact tier"]["detail"]
    fam = {f["family"]: f for f in doctor.families(det)}
    assert fam["RO/RW of pages unmapped by reclaim"]["fidelity"] == "inferred"
    assert fam["mm of migration entries"]["fidelity"] == "missing"


def test_exact_meta_names_the_tier_and_the_reason() -> None:
    off = probes.exact_meta(probes.BuildOptions(), {"ok": False, "reason": "this kernel offers no kprobes"})
    assert off["tier"] == "tracepoint" and off["probes"] == [] and off["reason"] == "this kernel offers no kprobes"
    on = probes.exact_meta(probes.BuildOptions(exact=True), {"ok": True})
    assert on["tier"] == "exact" and on["table"] == "pte"
    assert {p["function"] for p in on["probes"]} == set(probes.EXACT_FUNCTIONS)
    assert "-DLR_EXACT=1" in probes.cflags(probes.BuildOptions(flush_tlb_func=1, exact=True))
    assert not any("LR_EXACT" in f for f in probes.cflags(probes.BuildOptions(flush_tlb_func=1)))
    assert "pte_exact" in probes.probes_meta(True, exact=True)
    assert "pte_exact" not in probes.probes_meta(True)


def test_exact_probes_are_compiled_only_with_lr_exact() -> None:
    src = probes.PROBE_SOURCE.read_text()
    section = src.split("#ifdef LR_EXACT\n", 1)[1].split("\n#endif\n#endif", 1)[0]
    for _, _, prog in probes.EXACT_PROBES:
        assert f"int {prog}(" in section and f"int {prog}(" not in src.split("#ifdef LR_EXACT\n", 1)[0]


# ---- decoding ---------------------------------------------------------------------------------------------------


def test_decode_pte_rows() -> None:
    r = np.zeros(3, schema.RAW_RECORD)
    r["kind"] = schema.RAW_KIND["pte_exact"]
    r["ts"] = [10, 20, 30]
    r["pid"], r["tgid"], r["cpu"] = 7, 7, 1
    # a present writable dirty PTE in a shared writable VMA; a read-only PMD; a non-present entry
    r["x"] = [UNMAP | 0 << 4 | 0x0B << 8, MIGRATE | 1 << 4 | 0x01 << 8, UNMAP]
    r["a"] = [0x7F0000001000, 0x7F0000200000, 0x1000]
    r["b"] = [(0x1234 << 12) | 0x63, (0x40000 << 12) | 0xA1, 0x1234 << 12]
    r["c"] = [0x1234, 0x40000, 5]
    r["d"] = [4242, 4243, 0]
    t = decode.decode(r, decode.DecodeContext())["pte"].to_pandas()
    assert t["op_name"].tolist() == ["unmap", "migrate", "unmap"]
    assert t["level_name"].tolist() == ["pte", "pmd", "pte"]
    assert t["writable"].tolist() == [True, False, False]
    assert t["dirty"].tolist() == [True, False, False]
    assert t["pfn"].tolist() == [0x1234, 0x40000, -1]
    assert t["folio_pfn"].tolist() == [0x1234, 0x40000, 5]
    assert t["vm_flags"].tolist() == [0x0B, 0x01, 0]
    assert t["owner_tgid"].tolist() == [4242, 4243, 0]
    assert t["addr"].tolist() == [0x7F0000001000, 0x7F0000200000, 0x1000]


# ---- replay: exact rows replace the inference ------------------------------------------------------------------


def _reclaim(perms: str, exact: bool | None) -> Scenario:
    """A (mm_cpumask {0, 1}) maps file ino 100 with ``perms``; its reclaimer on CPU0 unmaps one folio in a batch
    whose flush targets CPU1. ``exact``: a pte row with that write bit precedes the unmap (None: no exact tier)."""
    s = Scenario()
    s.maps(0, 100, 1, RO_FILE, RO_FILE + 0x100000, perms, 0, 1, 100)
    s.run_on(1000, 0, *A, MM_A)
    s.run_on(2000, 1, *A1, MM_A)
    s.reclaim(T_BATCH, 0, *A, 2)
    if exact is not None:
        s.pte(T_BATCH + 5, 0, *A, UNMAP, RO_FILE, exact, owner=A[1])
    s.reclaim_folio(T_BATCH + 10, 0, *A, 1000, [MM_A], index=0)
    s.batch_flush(T_BATCH + 30, 0, *A, [1])
    s.free(T_BATCH + 40, 0, *A, 1000)
    s.reclaim(T_BATCH + 50, 0, *A, 3)
    return s


def test_exact_write_bit_overrides_the_maps_inference(tmp_path: Path) -> None:
    # tracepoint tier: a read-only shared mapping is inferred read-only: eligible, the flush deferred
    doc = run(_reclaim("r--s", None), tmp_path)
    assert doc["eligibility"]["pte_provenance"] == {"exact": 0, "inferred": 1, "unknown": 0}
    assert doc["eligibility"]["eligible"] == 1 and "exact_tier" not in doc["eligibility"]
    assert luf(doc)["by_cause"] == {}
    # exact tier: the entry was writable after all (the inference is wrong): rejected, the flush is sent
    doc = run(_reclaim("r--s", True), tmp_path)
    el = doc["eligibility"]
    assert el["pte_provenance"] == {"exact": 1, "inferred": 0, "unknown": 0}
    assert el["rejected"] == {"writable_pte": 1}
    assert el["exact_tier"]["pte_rows"] == 1
    assert el["exact_tier"]["reclaim_ptes_inferred_disagrees"] == 1
    assert el["exact_tier"]["reclaim_ptes_inferred_agrees"] == 0
    assert luf(doc)["by_cause"] == {"batch_nonluf": 1}
    # and the other way: a rw-s mapping (inferred writable) whose entry was clean read-only is eligible
    doc = run(_reclaim("rw-s", False), tmp_path)
    assert doc["eligibility"]["eligible"] == 1
    assert doc["eligibility"]["exact_tier"]["reclaim_ptes_inferred_disagrees"] == 1
    # agreeing rows change nothing but the provenance
    doc = run(_reclaim("r--s", False), tmp_path)
    assert doc["eligibility"]["eligible"] == 1
    assert doc["eligibility"]["exact_tier"]["reclaim_ptes_inferred_agrees"] == 1
    assert luf(doc)["by_cause"] == {}


def test_exact_row_of_another_process_or_too_old_is_not_used(tmp_path: Path) -> None:
    s = Scenario()
    s.maps(0, 100, 1, RO_FILE, RO_FILE + 0x100000, "r--s", 0, 1, 100)
    s.run_on(1000, 0, *A, MM_A)
    s.run_on(1500, 1, *W, MM_W)  # names W's mm
    s.run_on(2000, 1, *A1, MM_A)
    s.reclaim(T_BATCH, 0, *A, 2)
    s.pte(T_BATCH + 5, 0, *A, UNMAP, RO_FILE, True, owner=W[1])  # the walk's entry was in W's mm: not this unmap
    s.reclaim_folio(T_BATCH + 10, 0, *A, 1000, [MM_A], index=0)
    s.pte(T_BATCH + 15, 0, *A, UNMAP, RO_FILE, True, owner=A[1])  # 200 ms before the next unmap: given up
    s.reclaim_folio(T_BATCH + 200_000_000, 0, *A, 1001, [MM_A], index=1)
    s.batch_flush(T_BATCH + 200_000_100, 0, *A, [1])
    doc = run(s, tmp_path)
    assert doc["eligibility"]["pte_provenance"] == {"exact": 0, "inferred": 2, "unknown": 0}
    assert doc["eligibility"]["exact_tier"]["pte_rows"] == 2


def _migration(exact: bool, fault: bool) -> Scenario:
    """W migrates two read-only folios of A (mm_cpumask {1, 2}) in one batch flushed to CPUs 1 and 2; then
    (``fault``) A write-faults on its anon VMA. ``exact``: each set_pte is preceded by its pte row (owner A)."""
    s = Scenario(nr_cpus=3)
    s.maps(0, 100, 1, ANON, ANON + 0x100000, "rw-p", 0, 0, 0)
    s.run_on(1000, 0, *W, MM_W)
    s.run_on(1100, 1, *A, MM_A)
    s.run_on(1200, 2, *A1, MM_A)
    t = T_BATCH
    s.mig(t, 0, *W, 4, mode=0, reason=0)
    for k, pfn in enumerate((2000, 2001)):
        addr = ANON + k * 4096
        if exact:
            s.pte(t + 9 + 2 * k, 0, *W, MIGRATE, addr, False, owner=A[1], pfn=pfn)
        s.mig(t + 10 + 2 * k, 0, *W, 0, pfn=pfn, mig_type=1, addr=addr)
    s.batch_flush(t + 100, 0, *W, [1, 2])
    for k, pfn in enumerate((2000, 2001)):
        s.mig(t + 200 + 3 * k, 0, *W, 1, pfn=pfn + 10_000)
        s.free(t + 201 + 3 * k, 0, *W, pfn, source=2)
    s.mig(t + 300, 0, *W, 5)
    if fault:
        s.fault(T_EVENT, 1, *A, ANON + 0x5000, write=True)
    return s


def test_migration_entries_get_their_mm(tmp_path: Path) -> None:
    base = run(_migration(exact=False, fault=True), tmp_path)
    doc = run(_migration(exact=True, fault=True), tmp_path)
    for d in (base, doc):
        assert d["eligibility"]["eligible"] == 2
        assert d["eligibility"]["pte_provenance"]["exact"] == 2  # migration entries were always exact RO/RW
    assert doc["eligibility"]["exact_tier"]["migration_ptes_with_mm"] == 2
    assert doc["eligibility"]["exact_tier"]["migration_ptes_mm_unnamed"] == 0
    # without an mm the deferred batch is in no mm's LUF batch: A's write fault (F3) flushes nothing. With the
    # exact tier it is in A's: the fault flushes it, to the batch's CPUs (recorded targets + sender) but the
    # faulting CPU1. The posted v12 code's F3 sends no IPI either way (luf-model §9.1).
    intended = "luf-v12-intended"
    assert base["models"][intended]["by_cause"] == {}
    assert doc["models"][intended]["by_cause"] == {"fault": 2}
    assert luf(base)["by_cause"] == luf(doc)["by_cause"] == {}
    # the recorded flush and the vanilla rebuild do not depend on the tier
    assert doc["vanilla"] == base["vanilla"]
    assert doc["models"]["vanilla"]["by_cause"] == base["models"]["vanilla"]["by_cause"]
