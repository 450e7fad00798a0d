"""More than 64 involved CPUs: the replay runs the W-word copies of the reconstructor and of every model
(model/widemask.py), with W = ceil(involved / 64).

The traces are generated (tests/scenarios.py). Compiling the W-word copies costs tens of seconds per model and
width, so every test here uses W = 5 (257-320 involved CPUs) except the one 4096-CPU run (W = 64)."""

from __future__ import annotations

import copy
import json
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from scenarios import Scenario, random_scenario
from test_cpus import _expected, relabel
from typer.testing import CliRunner

from lufreplay.cli import app
from lufreplay.model.options import parse_settings
from lufreplay.model.reference import ReferenceLufV12, fast_decisions
from lufreplay.replay.engine import replay
from lufreplay.report.simulate_cmd import simulate, write_decisions
from lufreplay.trace.reader import open_trace

runner = CliRunner()
HOST = 4096
REPO = Path(__file__).resolve().parent.parent
#: the 12 CPUs of the original spread over the host (every word of a 5-word mask gets some)
SPREAD = [25 * c + 3 for c in range(12)]


def spread(s: Scenario, lut: list[int], nr_cpus: int, idle: list[int]) -> Scenario:
    """``s`` recorded on CPUs ``lut[c]`` of an ``nr_cpus``-CPU host, and CPUs ``idle`` idling from the start (one
    idle-to-idle switch each: they take part, load no mm, are never a target, so they change nothing)."""
    out = copy.deepcopy(s)
    out.nr_cpus = nr_cpus
    for rows in out.rows.values():
        for r in rows:
            if r.get("cpu", -1) >= 0:
                r["cpu"] = lut[r["cpu"]]
            if r.get("target_cpu", -1) >= 0:
                r["target_cpu"] = lut[r["target_cpu"]]
            if "targets" in r:
                r["targets"] = [lut[c] for c in r["targets"]]
    t0 = min(r["ts_ns"] for rows in s.rows.values() for r in rows if "cpu" in r)
    for c in idle:
        out.sched(t0, c, 0, 0, 0)  # not before the first event: the time bins stay the same
    return out


def _moved(doc: dict[str, Any], lut: list[int], nr_cpus: int) -> dict[str, Any]:
    """``doc`` with every per-CPU output moved to CPU ``lut[c]`` of an ``nr_cpus``-CPU host."""
    return _expected(doc, dict(enumerate(lut)), nr_cpus)


def _decisions(res: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every model's decision file rows (real CPU ids), by model."""
    with tempfile.TemporaryDirectory() as d:
        t = pq.read_table(write_decisions(res, Path(d))).to_pydict()
    out: dict[str, list[tuple[Any, ...]]] = {}
    keys = ("ts_ns", "decision", "cause", "cpu", "targets", "remote_ipis", "event", "pfn")
    for i, m in enumerate(t["model"]):
        out.setdefault(m, []).append(tuple(t[k][i] for k in keys))
    return out


@pytest.fixture(scope="module")
def twelve(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random 12-CPU trace and the same trace on CPUs 25c + 3 of a 4096-CPU host with 288 more CPUs idling
    (300 involved: 5-word masks)."""
    tmp = tmp_path_factory.mktemp("wide")
    s = random_scenario(random.Random(5), 150, 12, kept=True)
    idle = [c for c in range(300) if c not in SPREAD]
    return s.write(tmp / "twelve"), spread(s, SPREAD, HOST, idle).write(tmp / "wide")


def test_300_cpu_trace_gives_the_results_of_its_12_cpu_original(twelve: tuple[Path, Path]) -> None:
    """Every model's counts per cause and per CPU, the vanilla rebuild's fidelity, eligibility, stale windows and
    timelines, and every model's decisions: those of the 12-CPU original (uint64 masks), moved to the spread ids."""
    src, dst = twelve
    a, ra = simulate(src, None, [], decisions=True)
    b, rb = simulate(dst, None, [], decisions=True)
    assert ra.ncpu == 12 and rb.ncpu == 300 and rb.models["luf-v12"].w == 5 and ra.models["luf-v12"].w == 1
    assert b["trace"]["cpus_involved"] == list(range(300))
    exp = _moved(a, SPREAD, HOST)
    for k in ("vanilla", "models", "eligibility", "realloc_delay", "timeline", "losses"):
        assert exp[k] == b[k], k
    idle = {c for c in range(300)} - set(SPREAD)
    fid = {k: v for k, v in b["fidelity"].items() if k != "per_cpu"}
    assert fid == {k: v for k, v in exp["fidelity"].items() if k != "per_cpu"}
    assert [p for p in b["fidelity"]["per_cpu"] if p["cpu"] not in idle] == exp["fidelity"]["per_cpu"]
    assert all(p["recorded"] == p["rebuilt"] == 0 for p in b["fidelity"]["per_cpu"] if p["cpu"] in idle)
    assert a["replay"]["model_ops"] == b["replay"]["model_ops"]
    for name in a["models"]:
        assert a["models"][name]["remote_shootdowns"] > 0, name
    assert a["models"]["luf-v12"]["by_cause"] != a["models"]["vanilla"]["by_cause"]  # LUF deferred something
    da, db = _decisions(ra), _decisions(rb)
    assert set(da) == set(db) == set(a["models"])
    for name, rows in da.items():
        moved = [(*r[:3], SPREAD[r[3]] if r[3] >= 0 else r[3], [SPREAD[c] for c in r[4]], *r[5:]) for r in rows]
        assert db[name] == moved and len(rows) > 20, name
    assert any(t and max(t) >= 256 for r in db["luf-v12"] for t in [r[4]])  # the fifth word carries targets


def _by_cause_and_cpu(decisions: list[Any]) -> tuple[Counter[str], Counter[int]]:
    """Remote IPIs per cause and per target CPU of the performed decisions."""
    cause: Counter[str] = Counter()
    cpu: Counter[int] = Counter()
    for d in decisions:
        if d.kind == "performed":
            remote = d.targets - {d.cpu}
            cause[d.cause] += len(remote)
            cpu.update(remote)
    return cause, cpu


def test_bundled_trace_spread_over_300_cpus_gives_its_results(tmp_path: Path) -> None:
    """A real trace (bundled mmap-stream, 2 CPUs) relabelled to CPUs 3 and 2,900 of a 4096-CPU host with 298
    more CPUs idling (300 involved: 5-word masks) gives every model's counts per cause and per CPU, the
    rebuilt vanilla's fidelity, eligibility, stale windows and timelines of the original, moved."""
    src = REPO / "traces" / "mmap-stream"
    lut = [3, 2900]
    idle = tuple(c for c in range(299) if c not in lut)  # 298 CPUs
    dst = relabel(src, tmp_path / "spread", dict(enumerate(lut)), HOST, idle)
    a, ra = simulate(src)
    b, rb = simulate(dst)
    assert ra.ncpu == 2 and rb.ncpu == 300 and rb.models["luf-v12"].w == 5
    exp = _moved(a, lut, HOST)
    for k in ("vanilla", "models", "eligibility", "realloc_delay", "timeline", "losses"):
        assert exp[k] == b[k], k
    fid = {k: v for k, v in b["fidelity"].items() if k != "per_cpu"}
    assert fid == {k: v for k, v in exp["fidelity"].items() if k != "per_cpu"}
    assert [p for p in b["fidelity"]["per_cpu"] if p["cpu"] in lut] == exp["fidelity"]["per_cpu"]
    assert a["replay"]["model_ops"] == b["replay"]["model_ops"]
    assert a["vanilla"]["remote_shootdowns"] > 1000 and b["models"]["luf-v12"]["per_cpu"][2900] > 0


def test_300_cpu_trace_makes_the_reference_decisions(tmp_path: Path) -> None:
    """A random trace on 300 CPUs, all busy (5-word masks): luf-v12's decisions, its remote IPIs per cause and per
    CPU are those of the spec reference (model/reference.py, CPU sets) on the same model ops."""
    s = random_scenario(random.Random(8), 400, 300, kept=True)
    opts = parse_settings([])
    res = replay(open_trace(s.write(tmp_path / "t")), ["luf-v12"], opts, keep_ops=True, decisions=True)
    m = res.models["luf-v12"]
    assert res.ncpu == 300 and m.w == 5
    ref = ReferenceLufV12(opts)
    ref.run(np.concatenate(res.ops))
    got = fast_decisions(m.decisions_array())
    assert got == ref.decisions and len(got) > 100
    assert max(max(d.targets, default=0) for d in got) >= 256
    cause, cpu = _by_cause_and_cpu(got)
    c = m.counts()
    assert {k: v for k, v in c["by_cause"].items() if v} == {k: v for k, v in cause.items() if v}
    assert {i: v for i, v in enumerate(c["per_cpu"]) if v} == dict(cpu)
    assert c["remote_shootdowns"] == sum(cause.values()) > 100
    assert m.acc[m.L["O_VIOL"]] == 0


def test_4096_cpu_trace_replays_through_the_cli(tmp_path: Path) -> None:
    """A random trace with all 4,096 CPUs of its host taking part (64-word masks) replays through ``simulate``
    (vanilla and luf-v12) and prints its result; the 65th to 4,096th CPUs get flushed."""
    s = random_scenario(random.Random(2), 120, 4096)
    path = s.write(tmp_path / "t")
    r = runner.invoke(app, ["simulate", str(path), "-m", "vanilla", "-m", "luf-v12", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["trace"]["nr_cpus"] == 4096 and len(doc["trace"]["cpus_involved"]) == 4096
    v = doc["models"]["luf-v12"]
    assert sum(v["by_cause"].values()) == v["remote_shootdowns"] > 0
    assert sum(v["per_cpu"][64:]) > 0 and len(v["per_cpu"]) == 4096
    assert doc["vanilla"]["remote_shootdowns"] > 0
    text = runner.invoke(app, ["simulate", str(path), "-m", "vanilla", "-m", "luf-v12"])
    assert text.exit_code == 0 and "luf-v12" in text.output
