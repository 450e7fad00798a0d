"""What the shootdowns cost in CPU time: the ``cost`` block of the results document (``simulate --cost``).

A shootdown-cost profile (``lufreplay calibrate``; stored in the trace by ``record --calibrate``) gives per-flush
sender and per-IPI receiver costs as 10th/50th/90th percentile intervals. Every figure here is such an interval
``[p10, p50, p90]``: counts × costs, for the recorded kernel and for each model, as a share of the workload's
CPU time measured from the trace's ``sched`` table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lufreplay import schema
from lufreplay.model import ops as O
from lufreplay.trace.reader import Trace

Q = ("p10", "p50", "p90")
#: Flushes a LUF-like model performs that the vanilla kernel did not: the deferred flushes paid later.
LATE_CAUSES = O.CAUSES[O.CAUSES.index("alloc_pcp") :]
ALLOC_CAUSES = ("alloc_pcp", "alloc_buddy_epoch")
LEAVES_OUT = [
    "TLB refills after each flush (misses that re-walk the page tables; the calibrating host has no PMU)",
    "cache misses of the flush handler and of the sender's wait beyond what the calibration loop saw",
    "IPIs a KVM guest skips to preempted vCPUs (counted by the models as if sent)",
    "the runtime estimate assumes the workload is CPU-bound and every shootdown cycle is on its critical path",
]


class CostError(ValueError):
    """An unusable ``--cost`` profile; the message is one line."""


def load_profile(path: Path) -> dict[str, Any]:
    """A shootdown-cost profile file (``lufreplay calibrate --save``), checked like meta.json's."""
    try:
        text = path.read_text()
    except OSError as e:
        raise CostError(f"--cost {path}: {e.strerror or e}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise CostError(f"--cost {path}: not JSON ({e.msg}, line {e.lineno})") from None
    bad = schema.shootdown_cost_problem(doc)
    if bad:
        raise CostError(f"--cost {path}: {bad}")
    return doc


def profile_for(trace: Trace, cost: Path | None) -> tuple[dict[str, Any], str] | None:
    """The profile to use and where it came from: ``--cost PROFILE``, else the trace's own (``record
    --calibrate``; checked when the trace was opened), else None."""
    if cost is not None:
        return load_profile(cost), str(cost)
    p = trace.meta.get("shootdown_cost")
    return (p, "trace") if p is not None else None


def workload_tgids(trace: Trace) -> set[int] | None:
    """The traced processes (meta target pids, processes with maps snapshots, and what they forked);
    None when the recording was system-wide (every task counts)."""
    target = trace.meta.get("target")
    if isinstance(target, dict) and target.get("mode") == "system":
        return None
    tg: set[int] = set()
    if isinstance(target, dict):
        tg.update(int(p) for p in target.get("pids") or [] if isinstance(p, int))
    tg.update(int(x) for x in np.unique(trace.table("maps", ["tgid"]).column("tgid").to_numpy()))
    proc = trace.table("proc", ["tgid", "child_tgid"])
    if proc.num_rows:
        parent = proc.column("tgid").to_numpy()
        child = proc.column("child_tgid").to_numpy()
        while True:  # descendants of the traced processes are part of the workload
            more = set(child[np.isin(parent, list(tg)) & (child > 0)].tolist()) - tg
            if not more:
                break
            tg |= more
    return tg


def cpu_time(trace: Trace, start_ns: int | None, end_ns: int | None) -> dict[str, Any]:
    """On-CPU seconds from context switches: each ``sched`` row closes the interval its CPU spent on the task
    switched out; the first interval of each CPU starts at ``start_ns`` (if known), the last runs to ``end_ns``."""
    t = trace.table("sched", ["ts_ns", "cpu", "pid", "tgid", "next_pid", "prev_kthread"])
    tg = workload_tgids(trace)
    out: dict[str, Any] = {"workload_s": 0.0, "busy_s": 0.0, "switches": t.num_rows}
    if t.num_rows == 0:
        return out
    ts = t.column("ts_ns").to_numpy().astype(np.int64)
    cpu = t.column("cpu").to_numpy().astype(np.int64)
    pid = t.column("pid").to_numpy().astype(np.int64)
    tgid = t.column("tgid").to_numpy().astype(np.int64)
    nxt = t.column("next_pid").to_numpy().astype(np.int64)
    kth = t.column("prev_kthread").to_numpy(zero_copy_only=False).astype(bool)
    order = np.lexsort((ts, cpu))
    ts, cpu, pid, tgid, nxt, kth = ts[order], cpu[order], pid[order], tgid[order], nxt[order], kth[order]
    first = np.ones(ts.size, bool)
    first[1:] = cpu[1:] != cpu[:-1]
    prev_ts = np.empty_like(ts)
    prev_ts[1:] = ts[:-1]
    prev_ts[first] = start_ns if start_ns is not None else ts[first]
    dur = np.maximum(ts - np.maximum(prev_ts, start_ns or 0), 0)
    user = (pid != 0) & ~kth
    mine = user if tg is None else user & np.isin(tgid, list(tg))
    # the tail of each CPU: from its last switch to the end of the window, on the task switched in
    last = np.ones(ts.size, bool)
    last[:-1] = cpu[1:] != cpu[:-1]
    tail_busy = tail_mine = 0
    if end_ns is not None:
        for i in np.flatnonzero(last):
            n, d = int(nxt[i]), max(int(end_ns) - int(ts[i]), 0)
            seen = np.flatnonzero(pid == n)  # the task's process, from a row where it was switched out
            tgi, k = (int(tgid[seen[0]]), bool(kth[seen[0]])) if seen.size else (-1, False)
            if n != 0 and not k:
                tail_busy += d
                tail_mine += d if tg is None or tgi in tg else 0
    out["workload_s"] = round((int(dur[mine].sum()) + tail_mine) / 1e9, 6)
    out["busy_s"] = round((int(dur[user].sum()) + tail_busy) / 1e9, 6)
    out["system_wide"] = tg is None
    out["processes"] = None if tg is None else len(tg)
    return out


def _iv(x: dict[str, float]) -> list[float]:
    return [float(x[q]) for q in Q]


def _cpu_s(events: float, ipis: float, send: list[float], recv: list[float]) -> dict[str, Any]:
    s = [events * v * 1e-9 for v in send]
    r = [ipis * v * 1e-9 for v in recv]
    return {
        "sender_s": [round(v, 9) for v in s],
        "receivers_s": [round(v, 9) for v in r],
        "total_s": [round(a + b, 9) for a, b in zip(s, r, strict=True)],
    }


def _share(x: list[float], den: float) -> list[float] | None:
    return [round(100.0 * v / den, 4) for v in x] if den > 0 else None


def cost_block(doc: dict[str, Any], trace: Trace, profile: dict[str, Any], source: str) -> dict[str, Any]:
    """CPU-seconds on shootdowns for the recorded kernel and each model, shares, savings and LUF's extra cost."""
    send, recv = _iv(profile["sender_ns"]), _iv(profile["receiver_ns"])
    w = trace.meta.get("window") if isinstance(trace.meta.get("window"), dict) else {}
    cpu = cpu_time(trace, w.get("start_ns"), w.get("end_ns"))
    den = cpu["workload_s"]
    van = doc["vanilla"]
    rec = _cpu_s(van["flush_events"], van["remote_shootdowns"], send, recv)
    rec["share_of_workload_cpu_pct"] = _share(rec["total_s"], den)
    models: dict[str, Any] = {}
    for name, m in doc["models"].items():
        e = _cpu_s(m["flush_events"], m["remote_shootdowns"], send, recv)
        e["share_of_workload_cpu_pct"] = _share(e["total_s"], den)
        saved = [a - b for a, b in zip(rec["total_s"], e["total_s"], strict=True)]
        e["saved_s"] = [round(v, 9) for v in saved]
        # less CPU on shootdowns is a shorter run only as far as the workload is CPU-bound: an estimate
        e["runtime_change_pct"] = None if den <= 0 else [round(-100.0 * v / den, 4) + 0.0 for v in saved]  # no -0.0
        ev, ip = m.get("flush_events_by_cause", {}), m.get("by_cause", {})
        late = _cpu_s(sum(ev.get(c, 0) for c in LATE_CAUSES), sum(ip.get(c, 0) for c in LATE_CAUSES), send, recv)
        alloc = _cpu_s(sum(ev.get(c, 0) for c in ALLOC_CAUSES), sum(ip.get(c, 0) for c in ALLOC_CAUSES), send, recv)
        waits = int(m.get("risks", {}).get("R2_epoch_waits", 0))
        e["luf_extra"] = {
            "late_flushes_s": late["total_s"],  # included in total_s above
            "alloc_time_flushes_s": alloc["total_s"],  # part of late_flushes_s
            "epoch_waits": waits,
            # a waiter waits for at most one flush it did not send: nothing to one sender's wait each
            "epoch_waits_s": [0.0, round(waits * send[1] * 1e-9, 9), round(waits * send[2] * 1e-9, 9)],
        }
        models[name] = e
    return {
        "source": source,
        "profile": {
            "method": profile.get("method"),
            "sender_ns": profile["sender_ns"],
            "receiver_ns": profile["receiver_ns"],
            "nr_threads": profile.get("nr_threads"),
            "host": profile.get("host"),
            "created": profile.get("created"),
        },
        "interval": "p10, p50, p90 of the calibrated per-flush and per-IPI costs",
        "workload_cpu_s": den,
        "cpu_time": cpu,
        "recorded": rec,
        "models": models,
        "leaves_out": LEAVES_OUT,
    }


__all__ = ["CostError", "cost_block", "cpu_time", "load_profile", "profile_for", "workload_tgids"]
