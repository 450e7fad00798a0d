"""``lufreplay info`` on synthetic traces built with TraceWriter: counts, losses, reconciliation math, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from edges import assert_edges_explained

from lufreplay import schema
from lufreplay.trace.info import rel_error
from lufreplay.trace.writer import TraceWriter, prepare_output

START_NS, END_NS = 1_000_000_000, 3_000_000_000  # a 2 s window

# Kernel counters at start and end of the window.
TLB_START, TLB_END = [1000, 2000], [1100, 2250]  # deltas 100 and 250
VMSTAT_START = {"pgalloc_normal": 5000, "pgalloc_dma32": 10, "pgfree": 7000, "pgsteal_anon": 0, "pgsteal_file": 300}
VMSTAT_END = {"pgalloc_normal": 5900, "pgalloc_dma32": 110, "pgfree": 8000, "pgsteal_anon": 20, "pgsteal_file": 665}
# pgsteal_kswapd/direct stay 0: memcg reclaim counts in neither, so info must use anon + file.
for d in (VMSTAT_START, VMSTAT_END):
    d.update(pgsteal_kswapd=0, pgsteal_direct=0)
RECORDER_END = {"pages_allocated": 990, "pages_freed": 1010}


def _counters(
    phase: int, ts: int, tlb: list[int], vm: dict[str, int], rec: dict[str, int], read: dict[int, int] | None = None
) -> pa.Table:
    """One snapshot; ``read`` gives a source (0 interrupts, 1 vmstat) its own read time instead of ``ts``."""
    names = ["TLB", "TLB", "CAL", "CAL", *vm, *rec]
    cpus = [0, 1, 0, 1] + [-1] * (len(vm) + len(rec))
    values = [*tlb, 5, 6, *vm.values(), *rec.values()]
    src = [0] * 4 + [1] * len(vm) + [3] * len(rec)
    stamps = [(read or {}).get(x, ts) for x in src]
    n = len(names)
    return schema.from_columns(
        "counters",
        {"ts_ns": stamps, "phase": [phase] * n, "source": src, "name": names, "cpu": cpus, "value": values},
    )


def _task(n: int, ts0: int, cpu: list[int] | None = None) -> dict[str, list[int]]:
    return {
        "ts_ns": [ts0 + i for i in range(n)],
        "cpu": cpu if cpu is not None else [0] * n,
        "pid": [42] * n,
        "tgid": [42] * n,
    }


def _shootdowns(targets: list[int], ts0: int) -> pa.Table:
    n = len(targets)
    # Rows on one source CPU, time-ordered: the target alternates.
    return schema.from_columns(
        "shootdown", {**_task(n, ts0), "target_cpu": targets, "callsite": ["arch_tlbbatch_flush+0x1"] * n}
    )


def _reclaim(events: list[int], reclaimed: list[int], ts0: int) -> pa.Table:
    n = len(events)
    neg = [-1] * n
    zero = [0] * n
    return schema.from_columns(
        "reclaim",
        {
            **_task(n, ts0),
            "event": events,
            "nid": neg,
            "order": neg,
            "gfp_flags": zero,
            "nr_scanned": reclaimed,
            "nr_reclaimed": reclaimed,
            "nr_unmap_fail": zero,
            "nr_ref_keep": zero,
            "nr_dirty": zero,
            "reclaim_flags": zero,
            "pfn": neg,
        },
    )


def _losses(rows: list[tuple[int, str, int, int]]) -> pa.Table:
    return schema.from_columns(
        "losses",
        {
            "ts_start_ns": [START_NS] * len(rows),
            "ts_end_ns": [END_NS] * len(rows),
            "cpu": [r[0] for r in rows],
            "probe": [r[1] for r in rows],
            "source": [r[2] for r in rows],
            "lost": [r[3] for r in rows],
        },
    )


def make_trace(
    path: Path, losses: list[tuple[int, str, int, int]] | None = None, start_read: dict[int, int] | None = None
) -> Path:
    """Two segments; shootdowns 98 to CPU0 and 252 to CPU1 (vs TLB deltas 100 and 250)."""
    prepare_output(path, force=False)
    w = TraceWriter(path, {"run_id": "synthetic", "host": {"nr_cpus": 2, "hostname": "h"}})
    w.add("counters", _counters(0, START_NS, TLB_START, VMSTAT_START, {}, start_read))
    w.add("shootdown", _shootdowns([0] * 50 + [1] * 100, START_NS + 10))
    w.add("reclaim", _reclaim([2, 10, 10, 3, 11], [0, 200, 150, 210, 50], START_NS + 20))
    w.rotate()
    w.add("shootdown", _shootdowns([0] * 48 + [1] * 152, START_NS + 500))
    w.add("reclaim", _reclaim([10, 0, 1], [30, 0, 999], START_NS + 600))  # direct_end's nr_reclaimed not summed
    if losses:
        w.add("losses", _losses(losses))
    w.add("counters", _counters(1, END_NS, TLB_END, VMSTAT_END, RECORDER_END))
    w.close()
    return path


def run_info(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lufreplay", "info", *args], capture_output=True, text=True)


def test_info_json_reconciliation_math(tmp_path: Path) -> None:
    p = make_trace(tmp_path / "t")
    r = run_info(str(p), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {
        "recording",
        "recorder",
        "recorder_induced",
        "shootdown_source",
        "meta",
        "counts",
        "losses",
        "reconciliation",
        "warnings",
    }
    assert doc["meta"]["run_id"] == "synthetic"
    assert doc["shootdown_source"]["source"] == "csd:csd_queue_cpu"  # no probes_absent: the tracepoint's rows
    assert doc["recorder"] is None  # a synthetic trace says nothing about a recorder

    tlb = doc["reconciliation"]["tlb_shootdowns"]
    assert tlb["recorded"] == [98, 252]
    assert tlb["proc_interrupts"] == [100, 250]
    assert tlb["rel_error"] == pytest.approx([-2 / 100, 2 / 250])
    assert tlb["max_rel_error"] == pytest.approx(0.02)

    pages = doc["reconciliation"]["pages"]
    assert pages["allocated"]["vmstat"] == (5900 - 5000) + (110 - 10)
    assert pages["allocated"]["recorded"] == 990
    assert pages["allocated"]["rel_error"] == pytest.approx((990 - 1000) / 1000)
    assert pages["freed"]["vmstat"] == 1000
    assert pages["freed"]["rel_error"] == pytest.approx(10 / 1000)

    rec = doc["reconciliation"]["reclaim"]
    assert rec["recorded"] == 200 + 150 + 30  # shrink_inactive only: the rows pgsteal counts
    assert rec["vmstat"] == 20 + 365  # pgsteal_anon + pgsteal_file deltas
    assert rec["rel_error"] == pytest.approx((380 - 385) / 385)
    # reclaim_pages (DAMON, MADV_PAGEOUT) is in no pgsteal counter: shown beside, not compared
    assert rec["reclaim_pages"]["recorded"] == 50 and rec["reclaim_pages"]["vmstat"] is None
    assert doc["reconciliation"]["window_ns"] == END_NS - START_NS

    c = doc["counts"]
    assert c["shootdown"]["rows"] == 350
    assert c["reclaim"]["by_event"] == {"shrink_inactive": 3, "memcg_begin": 1, "memcg_end": 1,
                                        "reclaim_pages": 1, "direct_begin": 1, "direct_end": 1}  # fmt: skip
    assert c["counters"]["by_phase"] == {"start": 4 + len(VMSTAT_START), "end": 4 + len(VMSTAT_END) + 2}
    assert c["_total"]["kernel_events"] == 350 + 8
    assert c["_total"]["events_per_s"] == pytest.approx(358 / 2.0)
    assert doc["losses"]["total"] == 0 and doc["losses"]["warning"] is None


def test_info_compares_only_events_between_the_counter_reads(tmp_path: Path) -> None:
    """Events recorded before a file's start read are already in its start values: left out, and counted."""
    # /proc/interrupts read after the first 50 shootdowns (all to CPU0), vmstat after the first three
    # reclaim rows (two shrink_inactive rows, 200 + 150 pages).
    p = make_trace(tmp_path / "t", start_read={0: START_NS + 10 + 49, 1: START_NS + 22})
    rec = json.loads(run_info(str(p), "--json").stdout)["reconciliation"]
    tlb = rec["tlb_shootdowns"]
    assert tlb["recorded"] == [48, 252] and tlb["outside_window"] == 50
    assert rec["reclaim"]["recorded"] == 30 and rec["reclaim"]["outside_window"] == 350
    whole = json.loads(run_info(str(make_trace(tmp_path / "u")), "--json").stdout)["reconciliation"]
    assert whole["tlb_shootdowns"]["outside_window"] == 0 and whole["reclaim"]["outside_window"] == 0


def test_info_losses_warn_and_shout(tmp_path: Path) -> None:
    small = make_trace(tmp_path / "small", losses=[(0, "shootdown", 0, 2), (1, "tlb_flush", 1, 1)])
    doc = json.loads(run_info(str(small), "--json").stdout)
    lo = doc["losses"]
    assert lo["total"] == 3
    assert lo["by_probe"] == {"shootdown": 2, "tlb_flush": 1}
    assert lo["by_cpu"] == {"0": 2, "1": 1}
    assert lo["by_source"] == {"ringbuf_reserve": 2, "recursion_miss": 1}
    assert lo["fraction"] == pytest.approx(3 / (358 + 3))
    assert lo["warning"].startswith("3 events lost")

    big = make_trace(tmp_path / "big", losses=[(0, "page", 0, 100)])
    r = run_info(str(big))
    assert r.returncode == 0
    assert "HEAVY LOSS" in r.stdout and "100 events lost" in r.stdout


def test_info_human_output(tmp_path: Path) -> None:
    p = make_trace(tmp_path / "t")
    r = run_info(str(p))
    assert r.returncode == 0, r.stderr
    assert "remote shootdowns CPU1" in r.stdout
    assert "+0.80%" in r.stdout and "-2.00%" in r.stdout  # per-CPU rel. errors of the TLB rows
    assert "-1.30%" in r.stdout  # LRU reclaim vs pgsteal
    assert "reclaim_pages" in r.stdout and "no counter" in r.stdout
    assert "losses: none" in r.stdout


def test_info_unfinished_trace_has_no_reference(tmp_path: Path) -> None:
    """A recorder killed before its end snapshot: counts still shown, reconciliation says why it is empty."""
    p = tmp_path / "t"
    prepare_output(p, force=False)
    w = TraceWriter(p, {"run_id": "killed"})
    w.add("counters", _counters(0, START_NS, TLB_START, VMSTAT_START, {}))
    w.add("shootdown", _shootdowns([0, 1, 1], START_NS))
    w.rotate()  # no close(): no end snapshot
    doc = json.loads(run_info(str(p), "--json").stdout)
    tlb = doc["reconciliation"]["tlb_shootdowns"]
    assert tlb["recorded"] == [1, 2] and tlb["proc_interrupts"] is None
    assert "did not finish" in tlb["note"]
    assert doc["reconciliation"]["pages"]["freed"]["rel_error"] is None


@pytest.mark.parametrize("damage", ["no_meta_dir", "bad_json", "truncated_segment", "missing_dir", "wrong_version"])
def test_info_malformed_trace(tmp_path: Path, damage: str) -> None:
    p = make_trace(tmp_path / "t")
    if damage == "no_meta_dir":
        p = tmp_path / "empty"
        p.mkdir()
    elif damage == "bad_json":
        (p / schema.META_FILE).write_text("{not json")
    elif damage == "truncated_segment":
        f = p / "shootdown" / schema.segment_name(0)
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "missing_dir":
        p = tmp_path / "nope"
    elif damage == "wrong_version":
        meta = json.loads((p / schema.META_FILE).read_text())
        meta["format_version"] = 999
        (p / schema.META_FILE).write_text(json.dumps(meta))
    r = run_info(str(p), "--json")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lufreplay: error: "), r.stderr
    assert "Traceback" not in r.stderr


def test_rel_error_definition() -> None:
    assert rel_error(98, 100) == pytest.approx(-0.02)
    assert rel_error(5, 0) == 5.0  # denominator at least 1: finite, and loud
    assert rel_error(0, 0) == 0.0
    assert np.isfinite(rel_error(1, 0))


@pytest.mark.bpf
def test_info_reconciles_a_real_recording(tmp_path: Path) -> None:
    """Record a short memcg-reclaim workload for real; the recorded counts match the kernel's counters.
    (A 64M limit: reclaim starts after 16k pages, which even a starved reader reaches within its 3 s.)"""
    out = tmp_path / "rec"
    r = subprocess.run(
        [sys.executable, "-m", "lufreplay", "record", "-o", str(out), "--memory-limit", "64M",
         "--workload", "mmap-stream", "--", "--file-size", "384M", "--sparse", "--duration", "3",
         "--dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=900,  # a hang guard: probe compilation is slow on a busy host
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    info = run_info(str(out), "--json")
    assert info.returncode == 0, info.stderr
    doc = json.loads(info.stdout)
    rec = doc["reconciliation"]
    tlb = rec["tlb_shootdowns"]
    assert len(tlb["recorded"]) == len(tlb["proc_interrupts"]) == doc["meta"]["host"]["nr_cpus"]
    assert sum(tlb["proc_interrupts"]) > 0  # reclaim under the limit really shot down TLBs
    # The TLB row is read at an unknown instant of a /proc/interrupts read (0.1 ms, up to 84 ms seen on a busy
    # host): the kernel's count lies between the shootdowns recorded strictly between the two reads and those
    # recorded during them too. That explains the 4-16 per recording that used to be unmatched (issue 10
    # item 7); what is left over is bounded in tests/edges.py.
    edges = tlb["read_edges"]
    assert all(0 <= a - b <= 1_000 for a, b in zip(edges["recorded_max"], edges["recorded_min"], strict=True))
    assert_edges_explained(edges)
    # Probes and counters both see the whole host: other work on a busy box adds to both sides alike.
    # LRU reclaim (shrink_inactive) is what pgsteal counts, so the two agree but for the pages reclaimed
    # in the few ms between the stop flag and the counter reads at the window edges: 2% is ample.
    recl = rec["reclaim"]
    assert abs(recl["rel_error"]) <= 0.02 and recl["vmstat"] > 0, recl
    # DAMON's proactive reclaim (kdamond) is reported, outside the comparison it does not belong in.
    assert recl["reclaim_pages"]["recorded"] >= 0 and recl["reclaim_pages"]["vmstat"] is None
    assert abs(rec["pages"]["allocated"]["rel_error"]) <= 0.02
    assert abs(rec["pages"]["freed"]["rel_error"]) <= 0.02
    assert doc["counts"]["_total"]["kernel_events"] > 0


def test_recorder_usage_per_cpu_and_rates() -> None:
    """meta.recorder → info's recorder figures: per-CPU seconds and shares of the window, rates per second."""
    from lufreplay.trace.info import _recorder_line, recorder_usage

    meta = {
        "window": {"start_ns": 1_000_000_000, "end_ns": 5_000_000_000},
        "recorder": {
            "cpu_ns": 3_000_000_000,
            "max_rss_kb": 204800,
            "polls": 16,
            "watermark_wakeups": 1,
            "cpu_ns_per_cpu": [200_000_000, 600_000_000],
            "slices_per_cpu": [30, 50],
            "shootdowns_sent_per_cpu": [2, 3],
            "stage_cpu_ns": {"decode": 100_000_000},
        },
    }
    u = recorder_usage(meta)
    assert u is not None and u["window_s"] == 4.0
    assert u["cpu_s_per_cpu"] == [0.2, 0.6] and u["cpu_share_per_cpu"] == [0.05, 0.15]
    assert u["polls_per_s"] == 4.0 and u["slices"] == 80 and u["slices_per_s"] == 20.0
    assert u["shootdowns_sent"] == 5 and u["max_rss_mb"] == 200 and u["stage_cpu_s"] == {"decode": 0.1}
    line = _recorder_line(u)
    assert "CPU0 0.20 s (5.0%)" in line and "CPU1 0.60 s (15.0%)" in line and "16 polls (4.0/s)" in line
    assert line.endswith("peak RSS 200 MB")  # no window figure in this meta: nothing invented
    meta["recorder"]["window_max_rss_kb"] = 153600
    assert _recorder_line(recorder_usage(meta)).endswith("peak RSS 200 MB (150 MB while recording)")
    # Older traces carry only the totals; a trace without a recorder section has none.
    old = recorder_usage({"recorder": {"cpu_ns": 7_700_000_000, "max_rss_kb": 1024}})
    assert old is not None and old["cpu_s_per_cpu"] is None and old["polls_per_s"] is None
    assert _recorder_line(old) == "recorder: 7.70 CPU-s in all; peak RSS 1 MB"
    assert recorder_usage({}) is None


def _sched(rows: list[tuple[int, int, int]]) -> pa.Table:
    """(ts, cpu, tgid of the task switched out) → sched rows."""
    n = len(rows)
    return schema.from_columns(
        "sched",
        {
            "ts_ns": [r[0] for r in rows],
            "cpu": [r[1] for r in rows],
            "pid": [r[2] for r in rows],
            "tgid": [r[2] for r in rows],
            "next_pid": [0] * n,
            "prev_state": [0] * n,
            "prev_kthread": [False] * n,
            "prev_comm": ["x"] * n,
        },
    )


def test_recorder_induced_counts_shootdowns_that_reached_the_recorder(tmp_path: Path) -> None:
    """A shootdown is recorder-induced when its target CPU was running one of the recorder's threads: the task
    switched out by that CPU's next context switch. Shootdowns after a CPU's last switch are unknown."""
    rec, wl, t0 = 4242, 42, START_NS
    path = tmp_path / "t"
    prepare_output(path, force=False)
    w = TraceWriter(path, {"run_id": "synthetic", "host": {"nr_cpus": 2, "hostname": "h"}, "recorder": {"tgid": rec}})
    # CPU1 runs the recorder until t0+100, the workload until t0+200, the recorder until t0+300; CPU0 the
    # workload until t0+1000. Two segments: the lookup crosses them.
    w.add("sched", _sched([(t0 + 100, 1, rec), (t0 + 1000, 0, wl)]))
    w.add("shootdown", _shootdowns([1, 1, 0], t0 + 50))  # t0+50, +51 → recorder; CPU0 at +52 → workload
    w.rotate()
    w.add("sched", _sched([(t0 + 200, 1, wl), (t0 + 300, 1, rec)]))
    # +199 and +200 (the switch's own instant) workload, +250 recorder; CPU0 at +2000 is after its last switch
    ts = [t0 + 199, t0 + 200, t0 + 250, t0 + 2000]
    task = {"ts_ns": ts, "cpu": [0] * 4, "pid": [wl] * 4, "tgid": [wl] * 4}
    w.add("shootdown", schema.from_columns("shootdown", {**task, "target_cpu": [1, 1, 1, 0], "callsite": ["f"] * 4}))
    w.close()
    r = run_info(str(path), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["recorder_induced"]
    assert got["tgid"] == rec and got["per_cpu"] == [0, 3] and got["total"] == 3
    assert got["of_recorded"] == 7 and got["unknown"] == 1 and got["pct"] == pytest.approx(100 * 3 / 7, abs=1e-3)
    human = " ".join(run_info(str(path)).stdout.split())
    assert "recorder-induced (estimate): 3 of 7 remote shootdowns (42.86 %)" in human and "CPU1 3" in human


def test_recorder_induced_needs_the_recorder_named() -> None:
    """Traces from before ``recorder.tgid`` say nothing (no guess from comms), so their results are unchanged."""
    from lufreplay.trace.perturb import recorder_tgid

    assert recorder_tgid({}) is None and recorder_tgid({"recorder": {"tgid": True}}) is None
    assert recorder_tgid({"recorder": {"tgid": 0}}) is None and recorder_tgid({"recorder": {"tgid": 17}}) == 17
    assert recorder_tgid({"recorder": "x"}) is None


def test_info_without_recorder_tgid_has_no_estimate(tmp_path: Path) -> None:
    doc = json.loads(run_info(str(make_trace(tmp_path / "t")), "--json").stdout)
    assert doc["recorder_induced"] is None
