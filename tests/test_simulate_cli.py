"""`lufreplay simulate` as a command: the results document, --out, --list-options, losses, malformed traces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from scenarios import T_ALLOC, A, B, Scenario, ro_setup, run
from typer.testing import CliRunner

from lufreplay.cli import app
from lufreplay.model.options import OPTIONS

runner = CliRunner()


def _trace(tmp_path: Path) -> Path:
    s = Scenario()
    ro_setup(s, folios=(1000, 1001))
    s.alloc(T_ALLOC, 1, *B, 1000)
    return s.write(tmp_path / "t")


def test_json_document_shape(tmp_path: Path) -> None:
    r = runner.invoke(app, ["simulate", str(_trace(tmp_path)), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["vanilla"]["remote_shootdowns"] == 1
    assert set(doc["trace"]) >= {"path", "run_id", "duration_s", "nr_cpus", "host", "kernel"}
    assert doc["options"] == doc["option_defaults"]
    for name, m in doc["models"].items():
        for k in ("remote_shootdowns", "remote_shootdowns_bounds", "flush_events", "cpus_flushed", "local_flushes",
                  "avoided_pct", "by_cause", "per_cpu", "allocations", "hooks", "stale_window", "paid_by_other_task", "risks"):  # fmt: skip
            assert k in m, (name, k)
        assert sum(m["by_cause"].values()) == m["remote_shootdowns"]
        assert set(m["stale_window"]) >= {"count", "mean_s", "p50_s", "p99_s", "max_s", "pending_at_end"}
    assert doc["models"]["luf-v12"]["by_cause"] == {"alloc_pcp": 1}
    assert doc["fidelity"]["explained_pct"] == 100.0
    assert doc["eligibility"]["folios"] == 2
    tl = doc["timeline"]
    assert len(tl["t_s"]) <= 500 and tl["vanilla"][-1] == 1 and tl["luf-v12"][-1] == 1
    assert tl["vanilla_rebuilt"][-1] == doc["models"]["vanilla"]["remote_shootdowns"]
    assert all(x <= y for x, y in zip(tl["vanilla"], tl["vanilla"][1:], strict=False))
    assert len(doc["realloc_delay"]["counts"]) == len(doc["realloc_delay"]["bin_edges_s"]) - 1
    assert sum(doc["realloc_delay"]["counts"]) == 1  # pfn 1000 freed then re-allocated
    assert doc["losses"] == {"total": 0, "counted": 0, "complete": True, "bounded": False, "by_probe": {}}


def test_text_output_and_model_selection(tmp_path: Path) -> None:
    r = runner.invoke(app, ["simulate", str(_trace(tmp_path)), "-m", "luf-v12", "--set", "pcp_strikes=2"])
    assert r.exit_code == 0, r.output
    assert "Remote TLB shootdowns" in r.stdout and "luf-v12" in r.stdout and "luf-v11" not in r.stdout
    assert "pcp_strikes=2" in r.stdout and "changed: pcp_strikes" in r.stdout
    assert "TLB recorded" in r.stdout  # the /proc/interrupts-shaped per-CPU table


def test_list_options(tmp_path: Path) -> None:
    r = runner.invoke(app, ["simulate", "--list-options", "--json"])
    assert r.exit_code == 0
    rows = json.loads(r.stdout)
    assert [o["name"] for o in rows] == [o.name for o in OPTIONS]
    assert all("default" in o and o["doc"] for o in rows)
    r = runner.invoke(app, ["simulate", "--list-options"])
    assert "mm_cpumask_trim_s" in r.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "nope=1"], "unknown option 'nope'"),
        (["--set", "pcp_strikes=x"], "option pcp_strikes: bad value"),
        (["--set", "arch=sparc"], "not one of x86, arm64"),
        (["--set", "pcp_strikes"], "NAME=VALUE"),
        (["-m", "luf-v13"], "unknown model(s) luf-v13"),
        (["--jobs", "0"], "--jobs 0: expected a positive number"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    r = runner.invoke(app, ["simulate", str(_trace(tmp_path)), *args])
    assert r.exit_code == 2
    assert needle in r.stderr and r.stderr.startswith("lufreplay: error: ") and r.stderr.count("\n") == 1


def test_jobs_do_not_change_the_document() -> None:
    """A bundled trace with a target (so the scoped replay runs too), on one thread and on three."""
    trace = Path(__file__).resolve().parent.parent / "traces" / "mixed-file"
    docs = []
    for jobs in ("1", "3"):
        r = runner.invoke(app, ["simulate", str(trace), "--json", "--jobs", jobs])
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        del doc["replay"]["seconds"], doc["replay"]["events_per_s"]
        docs.append(doc)
    assert docs[0]["scope"]["target"] is not None and docs[0]["models"]["luf-v12"]["remote_shootdowns"] > 0
    assert docs[0] == docs[1]


def test_out_writes_every_decision(tmp_path: Path) -> None:
    out = tmp_path / "dec"
    r = runner.invoke(app, ["simulate", str(_trace(tmp_path)), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out / "decisions.parquet")
    v12 = df[df["model"] == "luf-v12"]
    assert set(v12["decision"].astype(str)) == {"deferred", "performed"}
    performed = v12[v12["decision"] == "performed"]
    assert list(performed["cause"].astype(str)) == ["alloc_pcp"]
    assert (
        int(performed["remote_ipis"].sum()) == 1
        and list(performed["pid"]) == [B[0]]
        and list(performed["pfn"]) == [1000]
    )
    deferred = v12[v12["decision"] == "deferred"]
    assert [list(t) for t in deferred["targets"]] == [[0, 1]] and list(deferred["pid"]) == [A[0]]
    for name in ("vanilla", "luf-v11", "hold-before-free"):
        assert int(df[(df["model"] == name) & (df["decision"] == "performed")]["remote_ipis"].sum()) == 1
    # the oracle: CPU0, the only remote CPU at the allocation, flushed its own TLB at its batch end for free
    oracle = df[(df["model"] == "oracle") & (df["decision"] == "performed")]
    assert int(oracle["remote_ipis"].sum()) == 0 and list(oracle["cause"].astype(str)) == ["realloc"]


def test_losses_widen_every_count(tmp_path: Path) -> None:
    s = Scenario()
    ro_setup(s)
    s.loss(0, 10**9, "page", 3)
    doc = run(s, tmp_path)
    assert doc["losses"] == {"total": 3, "counted": 3, "complete": True, "bounded": True, "by_probe": {"page": 3}}
    assert doc["vanilla"]["remote_shootdowns_bounds"] == [1, 4]
    m = doc["models"]["luf-v12"]
    assert m["remote_shootdowns_bounds"] == [0, 3]  # 0 ± 3 lost events × 1 other CPU
    r = runner.invoke(app, ["simulate", str(tmp_path / "trace0")])
    assert "lost 3 events: counts are shown as value [lower, upper]" in r.stdout  # not eaten as rich markup
    assert "1 [1, 4]" in r.stdout  # the recorded count with its bounds


def test_cause_and_model_names_stay_whole_in_80_columns(tmp_path: Path) -> None:
    """Piped output is 80 columns wide: every cause and model name must still be readable in full."""
    from io import StringIO

    from rich.console import Console

    from lufreplay.report.simulate_cmd import simulate
    from lufreplay.report.text import render

    doc = simulate(Path(__file__).resolve().parent.parent / "traces" / "mixed-file").doc
    buf = StringIO()
    render(doc, Console(file=buf, width=80, color_system=None))
    out = buf.getvalue()
    assert "…" not in out
    for cause in doc["models"]["luf-v12"]["by_cause"]:
        assert any(line.split("│")[1].strip() == cause for line in out.splitlines() if line.count("│") > 2), cause


def test_fidelity_on_read_only_mmap_reclaim(tmp_path: Path) -> None:
    """A read-only mmap streamed by two threads under memcg reclaim: 40 batches of 31 folios, each batched flush
    IPIs the other CPU; every recorded shootdown is explained, LUF defers them all and the re-allocations by the
    workload's own page-cache refills pay one IPI per batch key at most."""
    s = Scenario()
    ro_setup(s, folios=(), flush=False, free=False)
    t = 50_000
    pfn = 10_000
    for b in range(40):
        s.reclaim(t, b % 2, 100 + b % 2, 100, 2)
        pfns = list(range(pfn, pfn + 31))
        for k, p in enumerate(pfns):
            s.reclaim_folio(t + 10 + 3 * k, b % 2, 100 + b % 2, 100, p, [0xA0], index=p % 256)
        s.batch_flush(t + 200, b % 2, 100 + b % 2, 100, [1 - b % 2])
        for k, p in enumerate(pfns):
            s.free(t + 210 + k, b % 2, 100 + b % 2, 100, p)
        s.reclaim(t + 300, b % 2, 100 + b % 2, 100, 3)
        for k, p in enumerate(pfns):
            s.alloc(t + 5000 + k, b % 2, 100 + b % 2, 100, p)
        pfn += 31
        t += 10_000
    doc = run(s, tmp_path)
    assert doc["vanilla"]["remote_shootdowns"] == 40
    assert doc["fidelity"]["explained_pct"] >= 95.0
    assert doc["eligibility"]["eligible"] == 40 * 31
    m = doc["models"]["luf-v12"]
    assert m["by_cause"] == {"alloc_pcp": 40}  # the first re-allocation of each batch flushes its key
    assert m["allocations"]["alloc_free_pass"] == 40 * 30
    assert doc["models"]["oracle"]["remote_shootdowns"] <= m["remote_shootdowns"]


# ---- malformed traces: one line naming the file and the problem, exit 2, never a traceback ------------------
def _expect_error(path: Path, needle: str) -> None:
    r = runner.invoke(app, ["simulate", str(path)])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("lufreplay: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.output


def test_missing_table(tmp_path: Path) -> None:
    p = _trace(tmp_path)
    shutil.rmtree(p / "shootdown")
    _expect_error(p, "shootdown/part-000000.parquet: missing, but committed")


def test_wrong_version(tmp_path: Path) -> None:
    p = _trace(tmp_path)
    meta = json.loads((p / "meta.json").read_text())
    meta["format_version"] = 99
    (p / "meta.json").write_text(json.dumps(meta))
    _expect_error(p, "meta.json: format version 99 is not supported")


def test_timestamps_backwards(tmp_path: Path) -> None:
    s = Scenario()
    s.tlb(5000, 0, 1, 1, 2)
    s.new_segment()
    s.tlb(4000, 0, 1, 1, 2)  # the next segment starts earlier on the same CPU
    _expect_error(s.write(tmp_path / "t"), "timestamps go backwards on CPU 0")


def test_truncated_file(tmp_path: Path) -> None:
    p = _trace(tmp_path)
    f = next((p / "page").glob("part-*.parquet"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _expect_error(p, str(f))


def test_not_a_trace(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nothing", "no such trace")
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path / "empty", "meta.json: missing")


def test_default_trace() -> None:
    """Without a trace argument simulate uses the bundled sample trace; until it exists, a clean error."""
    import lufreplay.cli as cli

    r = runner.invoke(app, ["simulate", "--json", "-m", "luf-v12"])
    if cli.DEFAULT_TRACE.exists():
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["trace"]["path"] == str(cli.DEFAULT_TRACE)
    else:
        assert r.exit_code == 2
        assert r.stderr == f"lufreplay: error: {cli.DEFAULT_TRACE}: no such trace\n"


def test_recorder_induced_estimate_is_shown_and_changes_no_result(tmp_path: Path) -> None:
    """With ``meta.recorder.tgid``, the recorded vanilla carries the shootdowns that reached a CPU while it ran
    the recorder (an estimate, printed); every other figure is the same as without it."""

    def trace(name: str, meta: dict[str, int] | None) -> Path:
        s = Scenario()
        ro_setup(s, folios=(1000, 1001))
        s.alloc(T_ALLOC, 1, *B, 1000)
        s.sched(T_ALLOC + 10_000, 1, 777, 777, 0)  # CPU1 ran the recorder (tgid 777) until this switch
        return s.write(tmp_path / name, meta)

    docs = []
    for name, meta in (("plain", None), ("named", {"recorder": {"tgid": 777}})):
        r = runner.invoke(app, ["simulate", str(trace(name, meta)), "--json"])
        assert r.exit_code == 0, r.output
        docs.append(json.loads(r.stdout))
    plain, named = docs
    induced = named["vanilla"].pop("recorder_induced")
    assert induced["total"] == 1 and induced["of_recorded"] == named["vanilla"]["remote_shootdowns"] == 1
    assert induced["per_cpu"] == [0, 1] and induced["tgid"] == 777
    assert "recorder_induced" not in plain["vanilla"]
    for doc in docs:
        for k in ("trace", "replay", "elapsed_s"):
            doc.pop(k, None)
    assert named == plain
    r = runner.invoke(app, ["simulate", str(tmp_path / "named")])
    assert "recorder-induced (estimate): 1 of 1 remote shootdowns" in " ".join(r.stdout.split())
