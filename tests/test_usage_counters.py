"""The ``usage`` table for real (root): perf counts per CPU sampled at start, segment boundaries and stop, the
workload's CPU time and runtime, the PMU state said and never faked, and simulate's text and --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lufreplay import open_trace
from lufreplay.capture import _trials
from lufreplay.capture.perfcount import online_cpus
from lufreplay.jsonout import loads_strict
from lufreplay.report.html import render_html

HANG_S = 900  # a hang guard only: compiling the probes on a loaded 2-vCPU host can take minutes

# Faults in a fresh 32 MiB anonymous mapping over and over for ~2.5 s, then writes its own rusage.
FAULTER = textwrap.dedent(
    """
    import json, mmap, resource, sys, time
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.5:
        m = mmap.mmap(-1, 32 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for off in range(0, 32 << 20, 4096):
            m[off] = 1
        m.close()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    json.dump({"minflt": ru.ru_minflt, "cpu_s": ru.ru_utime + ru.ru_stime, "elapsed_s": time.monotonic() - t0},
              open(sys.argv[1], "w"))
    """
)


@pytest.fixture(scope="module")
def usage_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("usage")
    script, selfrep, out = d / "faulter.py", d / "self.json", d / "T"
    script.write_text(FAULTER)
    r = subprocess.run(
        [
            *(sys.executable, "-m", "lufreplay", "record", "-o", str(out), "--segment-seconds", "0.5"),
            *("--counters", "page-faults,cpu-clock,default", "--", sys.executable, str(script), str(selfrep)),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert r.returncode == 0, r.stderr
    return out, json.loads(selfrep.read_text())


@pytest.mark.bpf
def test_pmu_state_is_what_the_kernel_said_and_nothing_is_faked(usage_trace) -> None:
    out, _ = usage_trace
    t = open_trace(out)
    ctr = t.meta["counters"]
    # an independent perf_event_open of dTLB-load-misses (doctor's trial) decides what the trace must say
    trial = _trials._trial_pmu(_trials._Sys())
    u = t.pandas("usage")
    tlb = u[u["name"].isin(["dTLB-load-misses", "dTLB-store-misses", "iTLB-load-misses"])]
    assert ctr["requested"] == ["page-faults", "cpu-clock", "dTLB-load-misses", "dTLB-store-misses", "iTLB-load-misses"]
    if trial["ok"]:
        assert ctr["pmu"] == "present" and ctr["pmu_error"] is None
        assert "dTLB-load-misses" in ctr["events"] and len(tlb) > 0
    else:
        assert ctr["pmu"] == "absent" and ctr["pmu_error"] == trial["error"]
        assert set(ctr["failed"]) == {"dTLB-load-misses", "dTLB-store-misses", "iTLB-load-misses"}
        assert all(v == trial["error"] for v in ctr["failed"].values())
        assert len(tlb) == 0  # no row for an event the kernel refused
    assert ctr["events"][:2] == ["page-faults", "cpu-clock"]


@pytest.mark.bpf
def test_perf_counts_per_cpu_at_every_boundary_cover_the_workloads_faults(usage_trace) -> None:
    out, selfrep = usage_trace
    t = open_trace(out)
    u = t.pandas("usage")
    pf = u[(u["kind_name"] == "perf") & (u["name"] == "page-faults")].sort_values("ts_ns")
    assert set(pf["cpu"]) == set(online_cpus())
    phases = pf.groupby("cpu")["phase_name"].apply(list)
    for cpu, ph in phases.items():
        # one start, at least one segment boundary (a ~2.5 s run cut every 0.5 s), one end, in that order
        assert ph[0] == "start" and ph[-1] == "end" and ph.count("start") == ph.count("end") == 1, (cpu, ph)
        assert ph.count("segment") >= 2, (cpu, ph)
    for _, g in pf.groupby("cpu"):
        assert (g["value"].diff().dropna() >= 0).all()  # cumulative counts never go back
        assert (g["running_ns"] == g["enabled_ns"]).all()  # a software event is never multiplexed
        assert g["enabled_ns"].iloc[-1] > g["enabled_ns"].iloc[0]
    w = t.meta["window"]
    assert pf["ts_ns"].min() >= w["start_ns"] and pf["ts_ns"].max() >= w["end_ns"]
    delta = int(pf.groupby("cpu")["value"].agg(lambda v: v.iloc[-1] - v.iloc[0]).sum())
    # every fault the workload took (it reports its own count) happened inside the window, on some CPU
    assert delta >= selfrep["minflt"] > 8192

    # the workload's own CPU time and runtime: the end sample is wait4's, after the command exited
    child = t.meta["workload"]["pid"]
    p = u[(u["kind_name"] == "process") & (u["pid"] == child)]
    end = p[p["phase_name"] == "end"].set_index("name")["value"]
    assert end["cpu_ns"] >= selfrep["cpu_s"] * 1e9 - 1e6
    assert end["runtime_ns"] >= selfrep["elapsed_s"] * 1e9
    start = p[p["phase_name"] == "start"].set_index("name")["value"]
    assert start["cpu_ns"] <= end["cpu_ns"] and start["runtime_ns"] < end["runtime_ns"]


@pytest.mark.bpf
def test_simulate_shows_the_counts_next_to_the_shootdowns(usage_trace) -> None:
    out, selfrep = usage_trace
    r = subprocess.run(
        [sys.executable, "-m", "lufreplay", "simulate", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert r.returncode == 0, r.stderr
    doc = loads_strict(r.stdout)
    u = doc["usage"]
    t = open_trace(out)
    assert u["pmu"] == t.meta["counters"]["pmu"]
    tab = t.pandas("usage")
    pf = tab[(tab["kind_name"] == "perf") & (tab["name"] == "page-faults")].sort_values("ts_ns")
    per_cpu = pf.groupby("cpu")["value"].agg(lambda v: int(v.iloc[-1] - v.iloc[0]))
    ev = u["events"]["page-faults"]
    assert ev["per_cpu"] == {str(k): v for k, v in per_cpu.items()} and ev["count"] == sum(per_cpu)
    sd = doc["vanilla"]["remote_shootdowns"]
    assert ev["per_remote_shootdown"] == (round(ev["count"] / sd, 3) if sd else None)
    proc = u["processes"][str(t.meta["workload"]["pid"])]
    assert proc["cpu_s"] >= selfrep["cpu_s"] - 0.02  # start sample: before exec, near zero CPU time

    text = subprocess.run(
        [sys.executable, "-m", "lufreplay", "simulate", str(out)],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        env={"COLUMNS": "200", **os.environ},
    )
    assert text.returncode == 0, text.stderr
    assert f"page-faults: {ev['count']:,} in the window" in text.stdout
    if u["pmu"] == "absent":
        assert f"TLB-miss counters: not recorded (no PMU: {u['pmu_error']})" in text.stdout

    # the report page shows the same block
    page = render_html(doc, [])
    table = page[page.index('<table id="usage-table">') :]
    table = table[: table.index("</table>")]
    assert f"{ev['count']:,} in the window" in table and f"process {t.meta['workload']['pid']}" in table
