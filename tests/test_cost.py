"""What the shootdowns cost: `lufreplay calibrate` (for real, as root), `simulate --cost` and the trace's
`shootdown_cost`, and the replay's progress bar on stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from scenarios import T_ALLOC, B, Scenario, ro_setup
from typer.testing import CliRunner

from lufreplay.cli import app
from lufreplay.schema import shootdown_cost_problem

runner = CliRunner()
PROFILE: dict[str, Any] = {
    "format": "lufreplay-shootdown-cost",
    "version": 1,
    "method": "test",
    "sender_ns": {"p10": 1000.0, "p50": 2000.0, "p90": 4000.0},
    "receiver_ns": {"p10": 500.0, "p50": 1000.0, "p90": 3000.0},
    "nr_threads": 1,
    "host": {"hostname": "testhost"},
}
WORKLOAD_NS = 1_500_000  # what the sched rows below give process 100


def _strict(text: str) -> Any:
    def bad(c: str) -> None:
        raise ValueError(f"non-strict JSON constant {c}")

    return json.loads(text, parse_constant=bad)


def _trace(tmp_path: Path, meta: dict[str, Any] | None = None) -> Path:
    s = Scenario()
    ro_setup(s, folios=(1000, 1001))
    s.alloc(T_ALLOC, 1, *B, 1000)
    # process 100 runs 1.0 ms on CPU0 (1001 → 1_001_001) and 0.5 ms on CPU1 (2001 → 502_001), then B runs on
    # CPU1 to the end of the window: B is not traced, so it is busy time but not the workload's
    s.sched(502_001, 1, 101, 100, B[0])
    s.sched(1_001_001, 0, 100, 100, 0)
    m = {"window": {"start_ns": 0, "end_ns": 2_000_000}, "target": {"mode": "command", "pids": [100]}}
    return s.write(tmp_path / "t", {**m, **(meta or {})})


def _cost(events: int, ipis: int) -> list[float]:
    s, r = PROFILE["sender_ns"], PROFILE["receiver_ns"]
    return [(events * s[q] + ipis * r[q]) * 1e-9 for q in ("p10", "p50", "p90")]


def _close(a: list[float], b: list[float], tol: float = 1e-9) -> bool:
    """Equal up to the rounding of the document (seconds to 1 ns, percentages to 1e-4)."""
    return all(abs(x - y) <= tol + 1e-6 * abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.bpf
def test_calibrate_short_measures_positive_ordered_intervals(tmp_path: Path) -> None:
    out = tmp_path / "cfg" / "host.json"
    r = subprocess.run(
        [sys.executable, "-m", "lufreplay", "calibrate", "--short", "--save", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    doc = _strict(r.stdout)
    assert _strict(out.read_text()) == doc  # the saved profile is what was printed
    assert shootdown_cost_problem(doc) is None  # positive and p10 <= p50 <= p90 for both sides
    assert doc["nr_threads"] >= 1 and doc["trials"] == 3 and doc["ops_per_trial"] == 4000
    # every zap flushed the receivers by IPI: /proc/interrupts saw them and the spinners' gaps matched them
    assert doc["ipis_received"] >= 0.5 * doc["trials"] * doc["ops_per_trial"] * doc["nr_threads"]
    assert doc["ipis_matched"] >= 0.5 * doc["ipis_received"]
    assert doc["chance_matches"] < doc["ipis_matched"]
    # a flush the sender waits for is a round trip through the receiver's handler: microseconds, not ms or ns
    for side in ("sender_ns", "receiver_ns"):
        assert 50 <= doc[side]["p50"] <= 500_000, (side, doc[side])
    assert doc["host"]["nr_cpus"] >= 2 and "TLB refills" in doc["leaves_out"]


def test_calibrate_bad_threads_is_a_one_line_error() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "lufreplay", "calibrate", "--threads", "100000", "--save", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("lufreplay: error: ")
    assert "Traceback" not in r.stderr


def _check_cost_block(doc: dict[str, Any]) -> None:
    c = doc["cost"]
    assert c["workload_cpu_s"] == pytest.approx(WORKLOAD_NS / 1e9)
    assert c["cpu_time"]["busy_s"] > c["workload_cpu_s"]  # B ran too
    van = doc["vanilla"]
    rec = c["recorded"]
    assert _close(rec["total_s"], _cost(van["flush_events"], van["remote_shootdowns"]))
    assert _close(rec["share_of_workload_cpu_pct"], [100 * v * 1e9 / WORKLOAD_NS for v in rec["total_s"]], 1e-4)
    for name, m in doc["models"].items():
        e = c["models"][name]
        assert _close(e["total_s"], _cost(m["flush_events"], m["remote_shootdowns"])), name
        assert _close(e["saved_s"], [a - b for a, b in zip(rec["total_s"], e["total_s"], strict=True)]), name
        assert _close(e["runtime_change_pct"], [-100 * v * 1e9 / WORKLOAD_NS for v in e["saved_s"]], 1e-4), name
        for iv in (e["total_s"], e["share_of_workload_cpu_pct"]):
            assert iv[0] <= iv[1] <= iv[2]
    v12 = c["models"]["luf-v12"]["luf_extra"]
    # luf-v12 pays its one deferred flush at allocation time (F1): the late and allocation-time flushes are it
    assert doc["models"]["luf-v12"]["by_cause"] == {"alloc_pcp": 1}
    events = doc["models"]["luf-v12"]["flush_events_by_cause"]["alloc_pcp"]
    assert _close(v12["late_flushes_s"], _cost(events, 1)) and v12["alloc_time_flushes_s"] == v12["late_flushes_s"]
    assert v12["epoch_waits"] == 0 and v12["epoch_waits_s"] == [0.0, 0.0, 0.0]
    assert any("TLB refills" in x for x in c["leaves_out"])


def test_simulate_with_cost_profile(tmp_path: Path) -> None:
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps(PROFILE))
    t = _trace(tmp_path)
    r = runner.invoke(app, ["simulate", str(t), "--cost", str(prof), "--json"])
    assert r.exit_code == 0, r.output
    doc = _strict(r.stdout)
    assert doc["cost"]["source"] == str(prof)
    _check_cost_block(doc)
    from lufreplay.report.text import render

    buf = StringIO()
    render(doc, Console(file=buf, width=120))
    text = " ".join(buf.getvalue().split())  # captions wrap
    assert (
        "CPU time on TLB shootdowns" in text and "│ vanilla (recorded) │ 0.0015..0.007 │ 0.10..0.47 │ — │ — │" in text
    )
    assert "│ luf-v12 │ 0.0015..0.007 │" in text and "Leaves out: TLB refills" in text
    r = runner.invoke(app, ["simulate", str(t), "--cost", str(prof)])  # the command prints the same block
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert "sender 1..4 us per flush, receiver 0.5..3 us per IPI; workload CPU time 0.002 s" in text
    # without a profile there is no cost block (and the document is otherwise the same)
    r = runner.invoke(app, ["simulate", str(t), "--json"])
    plain = _strict(r.stdout)
    assert "cost" not in plain and "CPU time on TLB" not in runner.invoke(app, ["simulate", str(t)]).stdout
    for d in (plain, doc):
        d.pop("cost", None)
        d.pop("replay")
    assert plain == doc


def test_simulate_uses_the_trace_calibration(tmp_path: Path) -> None:
    t = _trace(tmp_path, {"shootdown_cost": PROFILE})
    r = runner.invoke(app, ["simulate", str(t), "--json"])
    assert r.exit_code == 0, r.output
    doc = _strict(r.stdout)
    assert doc["cost"]["source"] == "trace" and doc["cost"]["profile"]["host"] == {"hostname": "testhost"}
    _check_cost_block(doc)


@pytest.mark.parametrize(
    ("meta", "profile", "needle"),
    [
        (None, {**PROFILE, "sender_ns": {"p10": 5.0, "p50": 2.0, "p90": 9.0}}, "positive, ordered p10 <= p50 <= p90"),
        (None, {**PROFILE, "receiver_ns": {"p10": 0, "p50": 2.0, "p90": 9.0}}, "positive, ordered"),
        (None, {"format": "something-else"}, "not a lufreplay shootdown-cost profile"),
        (None, "[1, 2", "not JSON"),
        (None, None, "No such file"),
        ({"shootdown_cost": "fast"}, None, "field 'shootdown_cost' must be an object or null"),
        (
            {"shootdown_cost": {**PROFILE, "receiver_ns": {"p10": 9, "p50": 2, "p90": 1}}},
            None,
            "field 'shootdown_cost': receiver_ns must",
        ),
    ],
)
def test_bad_cost_profiles_are_one_line_errors(tmp_path: Path, meta: Any, profile: Any, needle: str) -> None:
    t = _trace(tmp_path, meta)
    args = ["simulate", str(t), "--json"]
    if profile is not None or meta is None:
        p = tmp_path / "p.json"
        if profile is not None:
            p.write_text(profile if isinstance(profile, str) else json.dumps(profile))
        args += ["--cost", str(p)]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert needle in r.output and r.output.count("\n") == 1 and "Traceback" not in r.output


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lufreplay", *args], capture_output=True, text=True, timeout=600, check=True
    )


def test_forced_progress_goes_to_stderr_only(tmp_path: Path) -> None:
    t = str(_trace(tmp_path))
    with_bar = _run(["simulate", t, "--json", "--progress"])
    without = _run(["simulate", t, "--json"])
    assert without.stderr == ""  # stderr is a pipe: no bar unless asked
    lines = with_bar.stderr.splitlines()
    doc = _strict(with_bar.stdout)
    n = doc["replay"]["raw_events"]
    assert lines and lines[-1].startswith(f"replay: {n:,}/{n:,} events (100 %), segment 1/1, ")
    assert "M events/s" in lines[-1] and "s left" in lines[-1]
    a, b = doc, _strict(without.stdout)
    a.pop("replay"), b.pop("replay")
    assert a == b  # the bar changes nothing on stdout
    text = _run(["simulate", t, "--progress"])
    assert "replay: " not in text.stdout and "Remote TLB shootdowns" in text.stdout
    assert _run(["simulate", t, "--json", "--no-progress"]).stderr == ""


def test_live_bar_on_a_terminal(tmp_path: Path) -> None:
    from lufreplay.report.progress import ReplayProgress
    from lufreplay.trace.reader import open_trace

    tr = open_trace(_trace(tmp_path))
    buf = StringIO()
    con = Console(file=buf, force_terminal=True, width=160)
    with ReplayProgress(tr, None, delay_s=0.0, console=con) as bar:
        assert bar.total > 0
        bar.timer.join()  # type: ignore[union-attr]  # the delayed start has happened
        bar(bar.total)
    out = buf.getvalue()
    assert f"{bar.total:,}/{bar.total:,} events" in out and "segment 1/1" in out
    quiet = StringIO()
    with ReplayProgress(tr, None, delay_s=60.0, console=Console(file=quiet, force_terminal=True)) as bar:
        bar(bar.total)  # finished before the delay: nothing drawn
    assert quiet.getvalue() == ""


@pytest.mark.bpf
def test_record_calibrate_stores_the_cost_and_simulate_uses_it(tmp_path: Path) -> None:
    out = tmp_path / "t"
    script = (
        "import mmap\nfor _ in range(200):\n    m = mmap.mmap(-1, 1 << 20)\n    m[::4096] = b'x' * 256\n    m.close()\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lufreplay",
            "record",
            "-o",
            str(out),
            "--calibrate",
            "--",
            sys.executable,
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    assert "measuring the cost of a remote TLB shootdown" in r.stderr
    meta = json.loads((out / "meta.json").read_text())
    sc = meta["shootdown_cost"]
    assert shootdown_cost_problem(sc) is None and sc["trials"] == 8 and sc["ipis_received"] > 0
    doc = _strict(_run(["simulate", str(out), "--json"]).stdout)
    c = doc["cost"]
    assert c["source"] == "trace" and c["profile"]["sender_ns"] == sc["sender_ns"]
    # the recorded python process ran: its CPU time comes from the sched table, within the window
    assert 0 < c["workload_cpu_s"] <= doc["trace"]["duration_s"] * doc["trace"]["nr_cpus"]
    van = doc["vanilla"]
    assert _close(c["recorded"]["total_s"], [
        (van["flush_events"] * sc["sender_ns"][q] + van["remote_shootdowns"] * sc["receiver_ns"][q]) * 1e-9
        for q in ("p10", "p50", "p90")
    ])  # fmt: skip


def test_report_page_has_the_cost_table_of_a_calibrated_trace(tmp_path: Path) -> None:
    import re

    from lufreplay.report.html import render_html
    from lufreplay.report.simulate_cmd import simulate

    doc = simulate(_trace(tmp_path, {"shootdown_cost": PROFILE})).doc
    page = render_html(doc, [])
    table = re.search(r'<table id="cost-table">(.*?)</table>', page)
    assert table is not None and "CPU time on shootdowns" in page
    c = doc["cost"]["recorded"]["total_s"]
    recorded = f'<td class="l">vanilla (recorded)</td><td>{c[0] * 1e3:.3g}–{c[2] * 1e3:.3g}</td>'
    assert recorded in table.group(1) and "luf-v12" in table.group(1)
    assert "Leaves out: TLB refills" in page
    plain = simulate(_trace(tmp_path / "plain")).doc
    assert "cost-table" not in render_html(plain, [])
