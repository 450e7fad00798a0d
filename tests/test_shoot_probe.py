"""Remote shootdowns on kernels without csd:csd_queue_cpu (before 6.7, e.g. the 6.1 LTS): fentry or a kprobe on
the flush function on the receiving CPU, the sender taken from its TLB_REMOTE_SEND_IPI tlb_flush row
(probes/lufreplay.bpf.c, LR_SHOOT).

This host has csd:csd_queue_cpu, no kprobes, and refuses fentry: here the program with the kprobe compiles and the
verifier loads it, `load` falls back from fentry to kprobe to neither (real, as root), the capability check and
doctor say what record does, and the trace says where its shootdown rows came from. The recordings on 6.1 are
in the test bed (testbed/README.md, "6.1")."""

from __future__ import annotations

from pathlib import Path

import pytest

from lufreplay.capture import doctor, features, probes

CSD = probes.SHOOT_TRACEPOINT


@pytest.mark.bpf
def test_the_shootdown_kprobe_compiles_and_the_verifier_loads_it() -> None:
    bcc = probes.import_bcc()
    for raw in (True, False):  # the sender's row comes from the raw or the classic tlb_flush program
        opts = probes.BuildOptions(
            rb_bytes=1 << 20, flush_tlb_func=1, absent=(*probes.absent_tracepoints(), CSD), shoot_probe="kprobe"
        )
        opts.raw_ipi = raw
        assert "-DLR_SHOOT=1" in probes.cflags(opts)
        b = bcc.BPF(src_file=str(probes.PROBE_SOURCE).encode(), cflags=probes.cflags(opts))
        try:
            assert b.load_func(probes.SHOOT_KPROBE_PROG.encode(), bcc.BPF.KPROBE).fd >= 0
            tlb = b.load_func(b"raw_tracepoint__tlb_flush", bcc.BPF.RAW_TRACEPOINT) if raw else None
            assert tlb is None or tlb.fd >= 0
            assert len(b[b"shoot_from"]) >= probes.nr_cpu_ids()  # one sender slot per possible CPU id
        finally:
            b.cleanup()
    # without the flag, none of it is in the program
    plain = probes.BuildOptions(rb_bytes=1 << 20, flush_tlb_func=1)
    assert not any("SHOOT" in f for f in probes.cflags(plain))


def test_the_check_asks_for_a_probe_the_symbol_and_matching_headers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    func = probes.FLUSH_FUNC["x86_64"]
    assert probes.shoot_probe_check(())["needed"] is False  # csd:csd_queue_cpu present: nothing to do
    pmu, btf = tmp_path / "type", tmp_path / "vmlinux"
    monkeypatch.setattr(probes, "KPROBE_PMU", pmu)
    monkeypatch.setattr(probes, "VMLINUX_BTF", btf)
    monkeypatch.setattr(features, "tracefs_path", lambda mount=False: None)
    assert "no kprobes" in probes.shoot_probe_check((CSD,), symbols={func: 1})["reason"]
    pmu.write_text("6\n")
    assert "no symbol" in probes.shoot_probe_check((CSD,), symbols={})["reason"]
    monkeypatch.setattr(features, "kernel_headers", lambda: {"matches": False})
    assert "headers" in probes.shoot_probe_check((CSD,), symbols={func: 1})["reason"]
    monkeypatch.setattr(features, "kernel_headers", lambda: {"matches": True})
    ok = probes.shoot_probe_check((CSD,), symbols={func: 1})
    assert ok["ok"] is True and ok["probes"] == ["kprobe"]
    btf.write_bytes(b"\x9f\xeb")  # with the kernel's BTF, fentry is tried first
    assert probes.shoot_probe_check((CSD,), symbols={func: 1})["probes"] == ["fentry", "kprobe"]


@pytest.mark.bpf
def test_load_falls_back_from_fentry_to_kprobe_to_none_on_this_host() -> None:
    # this host refuses fentry (EPERM) and has no kprobes: both are tried, in order, and the program loads without
    opts = probes.BuildOptions(
        rb_bytes=1 << 20, flush_tlb_func=1, absent=(*probes.absent_tracepoints(), CSD), shoot_probe="fentry"
    )
    prog = probes.load(opts, ("kprobe",))
    try:
        assert opts.shoot_probe == "" and not any("SHOOT" in f for f in probes.cflags(opts))
        failed = [e for e in prog.load_errors if "with the shootdown" in e]
        assert [e.rsplit("shootdown ", 1)[1] for e in failed] == ["fentry)", "kprobe)"], prog.load_errors
    finally:
        prog.close()
    assert probes.shootdown_source(opts, {"reason": "x"})["source"] is None


def test_the_trace_says_where_its_shootdown_rows_came_from() -> None:
    func = probes.FLUSH_FUNC["x86_64"]
    csd = probes.shootdown_source(probes.BuildOptions(), None)
    assert csd["source"] == CSD and csd["exact"] is True
    fe = probes.shootdown_source(probes.BuildOptions(absent=(CSD,), shoot_probe="fentry"), {"ok": True})
    assert fe["source"] == f"fentry:{func}" and fe["exact"] is True
    kp = probes.shootdown_source(probes.BuildOptions(absent=(CSD,), shoot_probe="kprobe"), {"ok": True})
    assert kp["source"] == f"kprobe:{func}" and kp["exact"] is False and "skipped" in kp["note"]
    none = probes.shootdown_source(probes.BuildOptions(absent=(CSD,)), {"ok": False, "reason": "no kprobes here"})
    assert none["source"] is None and none["exact"] is False and "no kprobes here" in none["note"]
    meta = probes.probes_meta(True, absent=(CSD,), shoot_probe="kprobe")["csd_queue_cpu"]
    assert meta["attach"] == "kprobe" and meta["via"].startswith(f"kprobe:{func}") and meta["absent"] == [CSD]
    assert probes.probes_meta(True)["csd_queue_cpu"]["attach"] == "raw_tracepoint"


@pytest.mark.bpf
def test_doctor_names_the_shootdown_source_of_a_kernel_without_csd() -> None:
    det = features.detect(trials=False)
    assert det["shoot_probe"]["needed"] is False  # this host has csd:csd_queue_cpu

    def family(d: dict) -> dict:
        return {f["family"]: f for f in doctor.families(d)}["remote shootdowns (targets)"]

    assert family(det)["source"].startswith(CSD)
    det["tracepoints"][CSD]["format"] = None  # a 6.1-like kernel
    for tp in ("ipi:ipi_send_cpu", "ipi:ipi_send_cpumask"):
        det["tracepoints"][tp]["format"] = None
    det["shoot_probe"] = {"ok": False, "reason": "this kernel offers no kprobes (CONFIG_KPROBES=n)"}
    fam = family(det)
    assert fam["fidelity"] == "missing" and "no kprobes" in fam["fix"]
    det["shoot_probe"] = {"ok": True, "function": probes.FLUSH_FUNC["x86_64"], "probes": ["fentry", "kprobe"]}
    det["attach"]["kprobe"] = {"ok": True}
    det["attach"]["fentry"] = {"ok": True}
    fam = family(det)
    assert fam["fidelity"] == "exact" and fam["attach"] == "fentry" and "receiving CPU" in fam["source"]
    det["attach"]["fentry"] = {"ok": False, "error": "EPERM"}  # the trial saw fentry fail: the kprobe, inexact
    fam = family(det)
    assert fam["fidelity"] == "inferred" and fam["attach"] == "kprobe" and "fentry" in fam["fix"]


def test_simulate_and_info_say_when_a_trace_has_no_shootdown_source(tmp_path: Path) -> None:
    from scenarios import A, Scenario

    from lufreplay.report.simulate_cmd import simulate
    from lufreplay.trace.info import summarize
    from lufreplay.trace.reader import open_trace

    s = Scenario()
    s.run_on(1000, 0, *A, 0xA0)
    # a 6.1 recording made before the flush function's probe existed: csd absent, no shootdown_source
    old = s.write(tmp_path / "old", {"probes_absent": [CSD]})
    doc, _ = simulate(old, None, [])
    assert doc["trace"]["shootdown_source"]["source"] is None
    assert "no remote shootdowns were recorded" in doc["trace"]["shootdown_source"]["note"]
    assert summarize(open_trace(old))["shootdown_source"]["exact"] is False
    src = {"source": "fentry:flush_tlb_func", "exact": True, "note": "n"}
    new = s.write(tmp_path / "new", {"probes_absent": [CSD], "shootdown_source": src})
    assert simulate(new, None, [])[0]["trace"]["shootdown_source"] == src
    plain = s.write(tmp_path / "plain")
    assert simulate(plain, None, [])[0]["trace"]["shootdown_source"]["source"] == CSD
