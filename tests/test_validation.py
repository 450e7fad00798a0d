"""Hostile input at the trace and command-line boundary: one-line errors naming the cause, counted warnings
where a row can be skipped, and strict JSON from every --json output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lufreplay import schema
from lufreplay.cli import app
from lufreplay.jsonout import dumps, loads_strict
from lufreplay.trace.writer import TraceExistsError, prepare_output

REPO = Path(__file__).resolve().parent.parent
COMPACT = REPO / "traces" / "compact"
runner = CliRunner()


def _cli(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r.exit_code, r.stdout, r.stderr


def _one_line_error(code: int, out: str, err: str) -> str:
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lufreplay: error: "), err
    return lines[0]


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    return Path(shutil.copytree(COMPACT, tmp_path / "t"))


def _edit(f: Path, col: str, row: int, value: int) -> None:
    t = pq.read_table(f)
    i = t.schema.get_field_index(col)
    v = t.column(col).to_numpy().copy()
    v[row] = value
    pq.write_table(t.set_column(i, t.schema.field(i), pa.array(v, t.schema.field(i).type)), f)


def test_cpu_past_the_host_is_an_error_naming_file_column_and_row(trace: Path) -> None:
    """Was: info hung building a 65,536-entry per-CPU table and simulate silently dropped the rows."""
    f = trace / "shootdown" / schema.segment_name(0)
    _edit(f, "target_cpu", 17, 65535)
    for cmd in (["info", str(trace)], ["simulate", str(trace), "-m", "vanilla"]):
        msg = _one_line_error(*_cli(*cmd))
        assert f"{f}: column target_cpu row 17: value 65535 is invalid (must be < 2 (host CPUs))" in msg


@pytest.mark.parametrize(
    ("table", "col", "value", "why"),
    [
        ("tlb_flush", "reason", 77, "one of 0, 1, 2, 3, 4, 5"),
        ("page", "pfn", -5, ">= 0 and < 4503599627370496"),
        ("page", "order", 11, "< 11"),
        ("sched", "cpu", 2, "< 2 (host CPUs)"),
        ("migrate", "mode", -2, "one of -1, 0, 1, 2"),
    ],
)
def test_bad_values_are_refused(trace: Path, table: str, col: str, value: int, why: str) -> None:
    f = trace / table / schema.segment_name(0)
    _edit(f, col, 3, value)
    msg = _one_line_error(*_cli("info", str(trace), "--json"))
    assert msg.endswith(f"{f}: column {col} row 3: value {value} is invalid (must be {why})")


def test_unknown_counter_codes_are_skipped_with_a_counted_warning(trace: Path) -> None:
    code, out, _ = _cli("info", str(trace), "--json")
    before = loads_strict(out)
    f = trace / "counters" / schema.segment_name(0)
    t = pq.read_table(f)
    # Two rows that no reconciliation uses (meminfo) get an unknown source code.
    src = t.column("source").to_numpy()
    rows = np.flatnonzero(src == 2)[:2]
    for r in rows:
        _edit(f, "source", int(r), 9)
    code, out, err = _cli("info", str(trace), "--json")
    assert code == 0, err
    doc = loads_strict(out)
    assert doc["warnings"] == [
        {
            "file": str(f),
            "column": "source",
            "rows_skipped": 2,
            "first_row": int(rows[0]),
            "value": 9,
            "why": "not one of 0, 1, 2, 3",
        }
    ]
    assert doc["counts"]["counters"]["rows"] == before["counts"]["counters"]["rows"]  # footer count: as stored
    assert doc["counts"]["counters"]["by_source"]["meminfo"] == before["counts"]["counters"]["by_source"]["meminfo"] - 2
    assert doc["reconciliation"] == before["reconciliation"]
    human = _cli("info", str(trace))[1]
    assert "2 row(s) skipped" in " ".join(human.split())[:200]  # first lines (rich wraps at 80 columns)


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ("[]", "meta.json: must hold a JSON object, not an array"),
        ('{"format": "lufreplay-trace", "format_version": 1, "host": "x"}', "field 'host' must be an object"),
        (
            '{"format": "lufreplay-trace", "format_version": "1"}',
            "field 'format_version' must be an integer, not a string '1'",
        ),
        (
            '{"format": "lufreplay-trace", "format_version": 1, "host": {"nr_cpus": 0}}',
            "host.nr_cpus 0 is out of range",
        ),
        ('{"format": "lufreplay-trace", "format_version": 3}', "format version 3 is not supported"),
        ('{"format": "x", "format_version": 1}', "not a lufreplay trace (format='x')"),
        ("{", "meta.json: not valid JSON"),
        ('{"format_version": 1}', "field 'format' missing"),
        (
            '{"format": "lufreplay-trace", "format_version": 1, "counters": {"pmu": "maybe"}}',
            "field 'counters.pmu' must be one of present, absent, not 'maybe'",
        ),
        (
            '{"format": "lufreplay-trace", "format_version": 1, "counters": {"pmu": "absent", "pmu_error": null}}',
            "'counters.pmu' is 'absent' but 'counters.pmu_error' does not say why",
        ),
        (
            '{"format": "lufreplay-trace", "format_version": 1, "counters": {"events": "dTLB-load-misses"}}',
            "field 'counters.events' must be an array, not a string",
        ),
    ],
)
def test_meta_json_errors_name_the_cause(trace: Path, content: str, expect: str) -> None:
    (trace / "meta.json").write_text(content)
    for cmd in ("info", "simulate"):
        assert expect in _one_line_error(*_cli(cmd, str(trace)))


def test_unreadable_meta_is_not_called_invalid_json(trace: Path) -> None:
    (trace / "meta.json").unlink()
    (trace / "meta.json").mkdir()
    msg = _one_line_error(*_cli("info", str(trace)))
    assert "meta.json: cannot read (Is a directory)" in msg


def test_nr_cpus_must_agree_with_the_per_cpu_counters(trace: Path) -> None:
    meta = json.loads((trace / "meta.json").read_text())
    meta["host"]["nr_cpus"] = 4
    (trace / "meta.json").write_text(json.dumps(meta))
    msg = _one_line_error(*_cli("info", str(trace)))
    assert "host.nr_cpus is 4 but the /proc/interrupts counters cover 2 CPUs" in msg


@pytest.mark.parametrize(
    ("setting", "expect"),
    [
        ("mm_cpumask_trim_s=nan", "option mm_cpumask_trim_s: nan is not a finite number"),
        ("mm_cpumask_trim_s=inf", "option mm_cpumask_trim_s: inf is not a finite number"),
        ("pcp_strikes=1180591620717411303424", "option pcp_strikes: 1180591620717411303424 is too large"),
        ("epoch_flush_latency_us=1e300", "is too large"),
    ],
)
def test_set_refuses_values_no_model_can_use(setting: str, expect: str) -> None:
    assert expect in _one_line_error(*_cli("simulate", str(COMPACT), "--set", setting))


def test_simulate_out_on_an_existing_file(tmp_path: Path) -> None:
    f = tmp_path / "decisions"
    f.write_text("keep me")
    msg = _one_line_error(*_cli("simulate", str(COMPACT), "-m", "vanilla", "--out", str(f)))
    assert f"--out {f}: exists and is not a directory" in msg
    assert f.read_text() == "keep me"


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["-d", "nan", "--", "true"], "-d/--duration must be a positive number of seconds, not nan"),
        (["-d", "inf", "--", "true"], "-d/--duration must be a positive number of seconds, not inf"),
        (["--segment-seconds", "nan", "--", "true"], "--segment-seconds must be a positive number of seconds"),
        (["--workload", "nosuch"], "unknown workload 'nosuch' (choose from mmap-stream"),
        (["--counters", "dTLB-misses", "--", "true"], "--counters: unknown event 'dTLB-misses' (choose from default,"),
        (["--counters", ",", "--", "true"], "--counters: no event given"),
    ],
)
def test_record_refuses_bad_arguments_before_starting(tmp_path: Path, args: list[str], expect: str) -> None:
    out = tmp_path / "rec"
    code, _, err = _cli("record", "-o", str(out), *args)
    assert expect in _one_line_error(code, "", err)
    assert not out.exists()


def test_force_never_overwrites_a_directory_that_is_not_a_trace(tmp_path: Path) -> None:
    d = tmp_path / "home"
    d.mkdir(mode=0o755)
    (d / "thesis.tex").write_text("years of work")
    code, _, err = _cli("record", "-o", str(d), "--force", "--", "true")
    assert "is not empty and is not a lufreplay trace; refusing to overwrite it" in _one_line_error(code, "", err)
    assert (d / "thesis.tex").read_text() == "years of work"
    assert d.stat().st_mode & 0o777 == 0o755
    # A trace directory is still overwritten with --force (and refused without it).
    t = Path(shutil.copytree(COMPACT, tmp_path / "old"))
    with pytest.raises(TraceExistsError, match="use --force"):
        prepare_output(t, force=False)
    prepare_output(t, force=True)
    assert not list(t.glob("*/*.parquet")) and not (t / "meta.json").exists()


# --------------------------------------------------------------------------------------------------
# Strict JSON
# --------------------------------------------------------------------------------------------------


def test_encoder_turns_non_finite_numbers_into_null() -> None:
    doc = {"a": float("inf"), "b": [np.float64("nan"), np.int64(3)], 4: Path("/x")}
    assert loads_strict(dumps(doc)) == {"a": None, "b": [None, 3], "4": "/x"}


def _real(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lufreplay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )


@pytest.mark.parametrize(
    "args",
    [
        ["info", "TRACE", "--json"],
        ["simulate", "TRACE", "--json"],
        ["simulate", "--list-options", "--json"],
        ["repair", "TRACE", "--json"],
        ["doctor", "--json"],
    ],
)
def test_every_json_output_is_strict(trace: Path, args: list[str]) -> None:
    r = _real(*[str(trace) if a == "TRACE" else a for a in args])
    assert r.returncode in (0, 1), r.stderr  # doctor exits 1 when a capability is missing
    doc = loads_strict(r.stdout)
    if args[0] == "simulate" and "--list-options" not in args:
        edges = doc["realloc_delay"]["bin_edges_s"]
        assert edges[-1] is None and all(isinstance(e, float) for e in edges[:-1])  # open last bin
    if args[0] == "repair":
        assert doc["removed"] == [] and doc["complete"] is True and not doc["meta_rewritten"]


def test_report_results_json_is_strict(tmp_path: Path) -> None:
    r = _real("report", str(COMPACT), "-o", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    loads_strict((tmp_path / "rep" / "results.json").read_text())
