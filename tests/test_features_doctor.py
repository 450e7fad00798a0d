"""features.detect and `lufreplay doctor` on this host: the measured truths of a tracepoint-only kernel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from lufreplay.capture import doctor, features


@pytest.fixture(scope="module")
def det() -> dict:
    return features.detect()


@pytest.mark.bpf
def test_detect_measured_truths(det: dict) -> None:
    assert det["root"] is True
    assert det["tracefs"]["ok"] and det["tracefs"]["path"] in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
    # Every tracepoint record needs is here, with its format file.
    assert det["tracepoints_missing"] == []
    assert set(det["tracepoints"]) == set(features.NEEDED_TRACEPOINTS)
    assert all(v["id"] > 0 for v in det["tracepoints"].values())
    att = det["attach"]
    assert att["tracepoint"]["ok"] is True and att["tracepoint"]["fired"] > 0
    assert att["raw_tracepoint"]["ok"] is True and att["raw_tracepoint"]["fired"] > 0
    assert att["tp_btf"]["ok"] is True
    assert att["fentry"]["ok"] is False and "Operation not permitted" in att["fentry"]["error"]
    assert att["kprobe"]["ok"] is False
    assert det["ringbuf"]["ok"] is True
    assert det["btf"]["vmlinux"] is True
    assert det["memcg"] == {"version": 1, "mount": "/sys/fs/cgroup/memory"}
    flags = det["kernel_config"]["flags"]
    assert flags["KPROBES"] == "n" and flags["ARCH_WANT_BATCHED_UNMAP_TLB_FLUSH"] == "y"
    assert det["luf"]["present"] is False
    assert int(det["flush_tlb_func"], 16) > 0
    assert "TLB" in det["interrupts_rows"] and "CAL" in det["interrupts_rows"]
    assert det["bcc"]["import"] is True and det["bcc"]["compile_load_attach_s"] > 0


def test_available_tracepoints_agree_with_tracefs() -> None:
    tps = features.available_tracepoints()
    if os.geteuid() == 0:
        assert "tlb:tlb_flush" in tps and "sched:sched_switch" in tps
        fmt = features.tracepoint_format("tlb:tlb_flush")
        assert fmt is not None and "field:int reason" in fmt
    assert features.tracepoint_format("nosuch:event") is None
    assert features.tracepoint_format("garbage") is None


def test_kernel_config_and_headers_shape() -> None:
    cfg = features.kernel_config()
    assert set(cfg["flags"]) == set(features.CONFIG_FLAGS)
    assert all(v in ("y", "m", "n", "unknown") or v.isdigit() for v in cfg["flags"].values())
    hdr = features.kernel_headers()
    if hdr["release"] is not None:
        assert hdr["matches"] == (hdr["release"] == os.uname().release)


@pytest.mark.bpf
def test_doctor_json_shape() -> None:
    r = subprocess.run([sys.executable, "-m", "lufreplay", "doctor", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"can_record", "root", "checks", "families", "detect"}
    assert doc["can_record"] is True
    for c in doc["checks"]:
        assert set(c) == {"check", "status", "ok", "required", "detail", "fix"}
        assert c["status"] in ("ok", "warn", "fail", "unknown")
        if c["status"] in ("warn", "fail"):
            assert c["fix"], f"{c['check']} fails without a fix"
    by_check = {c["check"]: c for c in doc["checks"]}
    assert by_check["attach kprobe"]["status"] == "warn"
    assert by_check["attach tp_btf"]["status"] == "ok"
    assert "only tracepoint fields are safe" in by_check["kernel headers"]["detail"]  # 6.1 headers on 6.18
    fams = {f["family"]: f for f in doc["families"]}
    for f in doc["families"]:
        assert f["fidelity"] in ("exact", "inferred", "missing") and f["attach"]
    assert fams["remote shootdowns (targets)"]["fidelity"] == "exact"
    assert fams["migration (old/new pfn, READ/READ_EXCLUSIVE/WRITE)"]["fidelity"] == "exact"
    assert fams["RO/RW of pages unmapped by reclaim"]["fidelity"] == "inferred"
    assert fams["PMU TLB-miss counts"]["fidelity"] == ("exact" if doc["detect"]["pmu_tlb"]["ok"] else "missing")
    # the three events record counts per CPU by default, each named with what the kernel said about it
    pmu = doc["detect"]["pmu_tlb"]
    assert set(pmu["events"]) == {"dTLB-load-misses", "dTLB-store-misses", "iTLB-load-misses"}
    detail = by_check["PMU TLB events"]["detail"]
    for name, said in pmu["events"].items():
        assert name in detail and (said == "ok" or said in detail)
    assert by_check["PMU TLB events"]["ok"] == (pmu["events"]["dTLB-load-misses"] == "ok")


@pytest.mark.bpf
def test_doctor_without_capabilities_fails_clearly() -> None:
    """Root stripped of every capability: BPF loads are refused, doctor says why and exits 1."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "util-linux setpriv is part of every Debian install"
    r = subprocess.run(
        [setpriv, "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-m", "lufreplay", "doctor", "--json"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["can_record"] is False
    by_check = {c["check"]: c for c in doc["checks"]}
    assert by_check["root"]["status"] == "fail" and "CAP_BPF" in by_check["root"]["detail"]
    assert by_check["bcc trial TRACEPOINT_PROBE"]["status"] == "fail"
    assert "not permitted" in by_check["bcc trial TRACEPOINT_PROBE"]["detail"]
    assert by_check["BPF ring buffer"]["status"] == "fail"


def test_doctor_not_root_runs_what_it_can(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """As a non-root user no BPF trial runs; file checks still do; exit 1 with the reason."""
    monkeypatch.setattr(features.os, "geteuid", lambda: 1000)
    rc = doctor.run_doctor(json_out=False)
    out = capsys.readouterr().out
    assert rc == 1
    assert "not root: BPF trials were not run" in out
    assert "record cannot run here: root" in out
    det = features.detect()
    assert det["attach"]["tp_btf"] == {"ok": None, "error": "not tried: loading a BPF program needs root"}
    assert det["memcg"]["version"] in (1, 2)  # read from /proc/self/mounts, no privilege needed
    fams = doctor.families(det)
    assert all(f["fidelity"] in ("exact", "inferred", "missing") for f in fams)
