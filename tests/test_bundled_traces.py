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
from lufreplay.model.ops import DEFERRABLE_CAUSES

TRACES = Path(__file__).resolve().parent.parent / "traces"
BUNDLED = sorted(p for p in TRACES.iterdir() if (p / "meta.json").is_file())
#: traces recorded in the many-CPU test bed (testbed/): guest<vCPUs>-<case>
GUEST = [p for p in BUNDLED if p.name.startswith("guest")]
#: bundled traces with lost events (BPF recursion misses under TCG: one csd_queue_cpu record in 306,474, two
#: ipi_send_cpu in 390,040), counted and bounded; their per-CPU shootdowns still equal /proc/interrupts
KNOWN_LOSSES = {"guest8-stream": 1, "guest4-three": 2}
#: the lrwork mode each test-bed case runs (testbed/guest-record.sh records the C helper directly)
GUEST_MODES = {"stream": ["stream"], "mixed": ["stream", "writer"], "three": ["stream"], "migration": ["regions"]}


def lr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lufreplay", *args], capture_output=True, text=True, timeout=300, check=False
    )


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def test_the_sample_set_is_there_and_small() -> None:
    names = {p.name for p in BUNDLED}
    assert {"mmap-stream", "anon-churn", "mixed-file"} <= names
    assert names & {"compact", "cow-fork"}
    # issue 7: 4- and 8-vCPU recordings of the stream case, and the other cases at 4 vCPUs
    assert {"guest4-stream", "guest8-stream", "guest4-mixed", "guest4-three", "guest4-migration"} <= names
    assert _size(TRACES) < 40 << 20, _size(TRACES)
    for p in BUNDLED:
        assert _size(p) < 6 << 20, (p.name, _size(p))
    readme = (TRACES / "README.md").read_text()
    for name in names:
        assert f"## `{name}`" in readme  # every trace is documented with its command
        section = readme.split(f"## `{name}`", 1)[1].split("\n## ", 1)[0]
        if name in {p.name for p in GUEST}:  # recorded inside the guest, then copied here
            assert "testbed/run-guest.sh" in section and f"`traces/{name}`" in section
            assert "hooks=posted" in section and "precision_pct" in section
        else:
            assert f"-o traces/{name}" in section


@pytest.mark.parametrize("trace", BUNDLED, ids=lambda p: p.name)
def test_bundled_trace_validates_and_reconciles(trace: Path) -> None:
    t = open_trace(trace, validate=True)
    assert t.meta["complete"] is True and t.meta["workload"]["exit_status"] == 0
    if trace in GUEST:
        _check_guest_meta(trace, t.meta)
    else:
        assert t.meta["target"]["workload"] == trace.name
    # readable by anyone after a fresh clone (the recorder writes 0600)
    for f in trace.rglob("*"):
        assert f.stat().st_mode & stat.S_IROTH, f
    r = lr("info", str(trace), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    losses = info["losses"]
    assert losses["total"] == KNOWN_LOSSES.get(trace.name, 0), losses
    if losses["total"]:  # counted, and the replay widens its bounds by them
        assert losses["bounded"] is True and losses["fraction"] < 1e-5
    rec = info["reconciliation"]
    assert rec["tlb_shootdowns"]["max_rel_error"] <= 0.01
    for kind in ("allocated", "freed"):
        assert abs(rec["pages"][kind]["rel_error"]) <= 0.01, rec["pages"]
    assert sum(rec["tlb_shootdowns"]["recorded"]) > 0


def _check_guest_meta(trace: Path, meta: dict[str, Any]) -> None:
    """A test-bed trace says what its name says: the vCPU count, the 6.12 guest kernel (which lacks one
    probe), and the case's workload run as the C helper."""
    cpus, case = trace.name.removeprefix("guest").split("-", 1)
    host = meta["host"]
    assert host["nr_cpus"] == int(cpus) and host["cpus_online"] == f"0-{int(cpus) - 1}"
    assert host["uname"]["release"].startswith("6.12.") and "TCG" in host["cpu_model"]
    assert meta["probes_absent"] == ["vmscan:mm_vmscan_reclaim_pages"]
    cmd = meta["target"]["command"]
    assert cmd[:2] == ["sh", "-c"]
    for mode in GUEST_MODES[case]:
        assert "/lrwork-" in cmd[2] and f" {mode} " in cmd[2], cmd


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


def _deferrable(m: dict[str, Any]) -> int:
    return sum(m["by_cause"].get(c, 0) for c in DEFERRABLE_CAUSES)


def _oracle_is_a_floor(models: dict[str, Any], also: list[str]) -> None:
    """The oracle pays no more IPIs for deferred work than any scheme that pays the hooks (docs/simulate.md, "The
    oracle"), nor in all; luf-v12 as posted (``also`` with hooks=intended) leaves the hooks' stale entries."""
    oracle = models["oracle"]
    for name in ["luf-v12-intended", "luf-v11", "hold-before-free", *also]:
        assert _deferrable(oracle) <= _deferrable(models[name]), (name, _deferrable(oracle), models[name]["by_cause"])
        assert oracle["remote_shootdowns"] <= models[name]["remote_shootdowns"], name


@pytest.mark.parametrize("trace", [p for p in BUNDLED if p not in GUEST], ids=lambda p: p.name)
def test_oracle_is_a_floor_on_the_host_traces(trace: Path) -> None:
    """The 2-vCPU host traces: the same floor (the test-bed traces are checked below, in both hook modes)."""
    r = lr("simulate", str(trace), "--json")
    assert r.returncode == 0, r.stderr
    _oracle_is_a_floor(json.loads(r.stdout)["models"], [])


@pytest.mark.parametrize("trace", GUEST, ids=lambda p: p.name)
def test_many_cpu_trace_replays_safely_within_the_bound(trace: Path) -> None:
    """The test-bed traces (4 and 8 vCPUs) through every model, by default (luf-v12 as posted, luf-v12-intended
    beside it) and with the intended §9 choices (``hooks``, ``keep``, ``dirty_writeback``): the recorded side is the kernel's per-CPU count, no model is unsafe, and
    the oracle is a floor for every LUF model that pays the hooks."""
    info = json.loads(lr("info", str(trace), "--json").stdout)
    nr_cpus = info["meta"]["host"]["nr_cpus"]
    intended = ["--set", "hooks=intended", "--set", "keep=key_only", "--set", "dirty_writeback=last_key"]
    for extra in ([], intended):
        r = lr("simulate", str(trace), "--json", *extra)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["options"]["hooks"] == ("intended" if extra else "posted")
        # the replayed kernel side is every recorded shootdown: those between the two /proc/interrupts reads
        # (which match them per CPU) and the few outside
        tlb = info["reconciliation"]["tlb_shootdowns"]
        assert all(s >= w for s, w in zip(doc["vanilla"]["per_cpu"], tlb["recorded"], strict=True))
        assert doc["vanilla"]["remote_shootdowns"] == sum(tlb["recorded"]) + tlb["outside_window"]
        assert len(doc["vanilla"]["per_cpu"]) == nr_cpus
        _sums(doc["vanilla"])
        models = doc["models"]
        for name, m in models.items():
            _sums(m)
            assert len(m["per_cpu"]) == nr_cpus
            assert m["safety"]["violations"] == 0, (name, extra)
        # a floor for the schemes that pay the hooks; luf-v12 as posted skips them (F3-F8/F10 inert) and can go
        # below it (guest4-mixed: the writer's write_begin and write faults)
        _oracle_is_a_floor(models, ["luf-v12"] if extra else [])
        if extra:  # with every §9 choice at its intended value the two luf-v12 rows are the same model
            assert models["luf-v12"] == models["luf-v12-intended"]
        fid = doc["fidelity"]
        assert fid["rebuilt"] == models["vanilla"]["remote_shootdowns"]
        assert [c["recorded"] for c in fid["per_cpu"]] == doc["vanilla"]["per_cpu"]
        _issue_7_bounds(fid)


def _issue_7_bounds(fid: dict[str, Any]) -> None:
    """Issue 7's bounds on the rebuilt vanilla: recall ≥ 98 %, rebuilt within ±2 % of recorded, and per CPU
    within ±5 % (or 2 shootdowns, for the CPUs that received a handful)."""
    assert fid["recall_pct"] >= 98.0, fid["by_cause"]
    assert abs(fid["rebuilt_vs_recorded_pct"]) <= 2.0, fid["rebuilt_vs_recorded_pct"]
    for c in fid["per_cpu"]:
        assert abs(c["rebuilt"] - c["recorded"]) <= max(0.05 * c["recorded"], 2), c


@pytest.mark.parametrize("trace", [p for p in BUNDLED if p not in GUEST], ids=lambda p: p.name)
def test_the_rebuilt_vanilla_follows_the_kernel_on_a_host_trace(trace: Path) -> None:
    """The 2-vCPU host traces meet the same bounds (the guest traces are checked above)."""
    r = lr("simulate", str(trace), "--json", "-m", "vanilla")
    assert r.returncode == 0, r.stderr
    _issue_7_bounds(json.loads(r.stdout)["fidelity"])
