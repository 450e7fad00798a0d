"""`lufreplay export --chrome-trace`: Trace Event Format JSON with one track per CPU and every event of the trace.

Counts are checked against the trace's own Parquet files (read with pyarrow, not lufreplay) and against the
decisions `simulate --out` writes for the same trace and model.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "traces" / "compact"
MODEL = "luf-v12"
#: Event types of the Trace Event Format (Google's "Trace Event Format" document) the export may use.
PHASES = {"i", "M"}


def _strict(s: str) -> Any:
    def bad(c: str) -> None:
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(s, parse_constant=bad)


def lufreplay(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "-m", "lufreplay", *args], capture_output=True, text=True, timeout=900, env=env, check=False
    )


def _rows(table: str) -> Any:
    return pq.read_table(sorted((TRACE / table).glob("*.parquet"))).to_pylist() if (TRACE / table).is_dir() else []


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    d = tmp_path_factory.mktemp("export")
    r = lufreplay("export", str(TRACE), "-m", MODEL, "--chrome-trace", str(d / "t.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    s = lufreplay("simulate", str(TRACE), "-m", MODEL, "--out", str(d / "dec"), "--json")
    assert s.returncode == 0, s.stderr[-3000:]
    return _strict((d / "t.json").read_text()), d


def test_strict_json_with_the_required_fields(exported: Any) -> None:
    doc, _ = exported
    assert doc["displayTimeUnit"] in ("ms", "ns")
    ev = doc["traceEvents"]
    assert isinstance(ev, list) and ev
    for e in ev:
        assert e["ph"] in PHASES
        assert isinstance(e["name"], str) and e["name"]
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "thread_name", "process_sort_index", "thread_sort_index")
            assert "name" in e["args"] or "sort_index" in e["args"]
        else:
            assert isinstance(e["ts"], float | int) and e["ts"] >= 0
            assert e["s"] in ("g", "p", "t")
            assert isinstance(e["cat"], str) and isinstance(e["args"], dict)


def test_one_track_per_cpu(exported: Any) -> None:
    doc, _ = exported
    ev = doc["traceEvents"]
    meta = json.loads((TRACE / "meta.json").read_text())
    ncpu = int(meta["host"]["nr_cpus"])
    procs = {e["pid"]: e["args"]["name"] for e in ev if e["name"] == "process_name"}
    assert sorted(procs.values()) == sorted(["recorded kernel", f"model {MODEL}"])
    tracks = collections.defaultdict(dict)
    for e in ev:
        if e["name"] == "thread_name":
            tracks[e["pid"]][e["tid"]] = e["args"]["name"]
    for pid in procs:
        assert tracks[pid] == {c: f"CPU {c}" for c in range(ncpu)}
    for e in ev:
        if e["ph"] != "M":
            assert e["tid"] in tracks[e["pid"]], e


def test_recorded_events_equal_the_trace(exported: Any) -> None:
    doc, _ = exported
    ev = [e for e in doc["traceEvents"] if e["ph"] != "M"]
    flushes, shoots = _rows("tlb_flush"), _rows("shootdown")
    assert len(flushes) > 0 and len(shoots) > 0
    got = collections.Counter((e["cat"], e["tid"]) for e in ev if e["cat"] in ("tlb_flush", "shootdown"))
    want = collections.Counter([("tlb_flush", r["cpu"]) for r in flushes] + [("shootdown", r["cpu"]) for r in shoots])
    assert got == want
    # the targets survive too: IPIs per target CPU, as /proc/interrupts counts them
    assert collections.Counter(e["args"]["target_cpu"] for e in ev if e["cat"] == "shootdown") == collections.Counter(
        r["target_cpu"] for r in shoots
    )
    t0 = min(min(r["ts_ns"] for r in flushes), min(r["ts_ns"] for r in shoots))
    first = min(e["ts"] for e in ev)
    assert first <= (min(r["ts_ns"] for r in flushes) - t0) / 1000.0


def test_decisions_equal_simulate_out(exported: Any) -> None:
    doc, d = exported
    dec = pq.read_table(d / "dec" / "decisions.parquet").to_pylist()
    mine = [r for r in dec if r["model"] == MODEL]
    assert mine
    got = collections.Counter(
        (e["args"]["decision"], e["args"]["cause"], e["tid"])
        for e in doc["traceEvents"]
        if e.get("cat", "").startswith("decision.")
    )
    want = collections.Counter((r["decision"], r["cause"], r["cpu"]) for r in mine)
    assert got == want
    ipis = sum(e["args"]["remote_ipis"] for e in doc["traceEvents"] if e.get("cat", "").startswith("decision."))
    assert ipis == sum(r["remote_ipis"] for r in mine)


def test_bad_trace_is_a_one_line_error(tmp_path: Path) -> None:
    r = lufreplay("export", str(tmp_path / "missing"), "--chrome-trace", str(tmp_path / "o.json"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("lufreplay: error: "), r.stderr
    assert not (tmp_path / "o.json").exists()
