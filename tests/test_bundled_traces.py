"""The real traces bundled in traces/: they open and validate, reconcile with the kernel's counters,
lost nothing, and `simulate` on the default sample gives a complete, self-consistent answer."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lufreplay import open_trace

TRACES = Path(__file__).resolve().parent.parent / "traces"
BUNDLED = sorted(p for p in TRACES.iterdir() if (p / "meta.json").is_file())


def lr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lufreplay", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_the_sample_set_is_there_and_small() -> None:
    names = {p.name for p in BUNDLED}
    assert {"mmap-stream", "anon-churn", "mixed-file"} <= names
    assert names & {"compact", "cow-fork"}
    total = sum(f.stat().st_size for f in TRACES.rglob("*") if f.is_file())
    assert total < 20 << 20, total
    readme = (TRACES / "README.md").read_text()
    for name in names:
        assert f"## `{name}`" in readme  # every trace is documented with its command
        assert f"-o traces/{name}" in readme


@pytest.mark.parametrize("trace", BUNDLED, ids=lambda p: p.name)
def test_bundled_trace_validates_and_reconciles(trace: Path) -> None:
    t = open_trace(trace, validate=True)
    assert t.meta["complete"] is True and t.meta["workload"]["exit_status"] == 0
    assert t.meta["target"]["workload"] == trace.name
    # readable by anyone after a fresh clone (the recorder writes 0600)
    for f in trace.rglob("*"):
        assert f.stat().st_mode & stat.S_IROTH, f
    r = lr("info", str(trace), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["losses"]["total"] == 0
    rec = info["reconciliation"]
    assert rec["tlb_shootdowns"]["max_rel_error"] <= 0.01
    for kind in ("allocated", "freed"):
        assert abs(rec["pages"][kind]["rel_error"]) <= 0.01, rec["pages"]
    assert sum(rec["tlb_shootdowns"]["recorded"]) > 0


def _sums(doc: dict[str, Any]) -> None:
    assert sum(doc["by_cause"].values()) == doc["remote_shootdowns"], doc["by_cause"]
    assert sum(doc["flush_events_by_cause"].values()) == doc["flush_events"], doc["flush_events_by_cause"]
    assert sum(doc["per_cpu"]) == doc["remote_shootdowns"]


def test_simulate_default_sample() -> None:
    r = lr("simulate", str(TRACES / "mmap-stream"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for key in ("trace", "options", "vanilla", "models", "fidelity", "eligibility", "losses", "replay"):
        assert key in doc
    assert set(doc["models"]) >= {"vanilla", "luf-v12", "luf-v11", "hold-before-free", "oracle"}
    _sums(doc["vanilla"])
    for name, m in doc["models"].items():
        _sums(m)
        assert m["safety"]["violations"] == 0, name
        lo, hi = m["remote_shootdowns_bounds"]
        assert lo <= m["remote_shootdowns"] <= hi
        # avoided_pct is measured against the recorded vanilla count
        rec = doc["vanilla"]["remote_shootdowns"]
        assert m["avoided_pct"] == pytest.approx(100 * (rec - m["remote_shootdowns"]) / rec, abs=0.01)
    # without an argument simulate replays this same sample
    r0 = lr("simulate", "--json")
    assert r0.returncode == 0, r0.stderr
    assert json.loads(r0.stdout)["models"] == doc["models"]
