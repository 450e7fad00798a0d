"""`lufreplay doctor` tells which attach type the page allocator probes will get (raw needs calibration)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lufreplay.capture import doctor, features


@pytest.mark.bpf
def test_doctor_reports_the_page_pfn_calibration_and_raw_page_probes() -> None:
    r = subprocess.run([sys.executable, "-m", "lufreplay", "doctor", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    cal = doc["detect"]["page_pfn"]
    assert cal["ok"] is True and cal["base"] == "hidden" and cal["agreement"] >= 0.95
    check = {c["check"]: c for c in doc["checks"]}["struct page → pfn calibration"]
    assert check["status"] == "ok" and f"{cal['agreeing']}/{cal['pairs']}" in check["detail"]
    page = {f["family"]: f for f in doc["families"]}["page frees and re-allocation of tracked pfns"]
    assert page["attach"] == "raw_tracepoint" and "calibrated" in page["note"]


@pytest.mark.bpf  # root: tracefs formats decide whether a family is present
def test_doctor_without_calibration_says_page_probes_stay_classic() -> None:
    """Raw tracepoints work but the calibration failed: the page family is classic, the check says why."""
    det = features.detect(trials=False)
    det["attach"]["tracepoint"] = {"ok": True}
    det["attach"]["raw_tracepoint"] = {"ok": True}
    det["page_pfn"] = {"ok": False, "error": "only 12 pairs (need 256)"}
    check = {c["check"]: c for c in doctor.checks(det)}["struct page → pfn calibration"]
    assert check["status"] == "warn" and check["detail"] == "only 12 pairs (need 256)" and check["fix"]
    fams = {f["family"]: f for f in doctor.families(det)}
    assert fams["page frees and re-allocation of tracked pfns"]["attach"] == "tracepoint"
    assert fams["TLB flushes (sender side: reason, pages)"]["attach"] == "raw_tracepoint"
    det["page_pfn"] = {"ok": True, "pairs": 4096, "agreeing": 4096, "struct_page_size": 64}
    check = {c["check"]: c for c in doctor.checks(det)}["struct page → pfn calibration"]
    assert check["status"] == "ok" and "4096/4096" in check["detail"]
    fams = {f["family"]: f for f in doctor.families(det)}
    assert fams["page frees and re-allocation of tracked pfns"]["attach"] == "raw_tracepoint"
