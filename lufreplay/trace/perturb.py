"""How much of a trace's remote shootdown count the recorder itself may have caused (an estimate).

A batched reclaim flush (``arch_tlbbatch_flush``, no mm) skips only CPUs in lazy-TLB idle. A CPU that
would have idled but runs one of the recorder's threads instead is not lazy, so it receives a flush it
would have skipped. The ``sched`` table has every context switch, the recorder's included (its tgid is
``meta.json`` ``recorder.tgid``), so the shootdowns that reached a CPU while it ran the recorder are
counted exactly; how many of them the CPU would have skipped without the recorder is not known (it may
have run something else), so the count is an upper estimate of what recording added, not a correction.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lufreplay.trace.reader import Trace

WHY = (
    "remote shootdowns whose target CPU was running one of the recorder's threads (sched table): the"
    " recorder kept that CPU out of lazy-TLB idle, where a batched flush skips it; an upper estimate of what"
    " recording added (the CPU might have run something else), not subtracted from any result"
)


def recorder_tgid(meta: dict[str, Any]) -> int | None:
    """The recorder's process id, meta.json ``recorder.tgid`` (traces from before it existed: None)."""
    rec = meta.get("recorder")
    v = rec.get("tgid") if isinstance(rec, dict) else None
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def running_tgid(
    sw_ts: np.ndarray, sw_cpu: np.ndarray, sw_tgid: np.ndarray, ts: np.ndarray, cpu: np.ndarray
) -> np.ndarray:
    """tgid of the task running on ``cpu[i]`` at ``ts[i]``: the task switched out by that CPU's first switch
    at or after ``ts[i]`` (-1 after the CPU's last recorded switch: unknown)."""
    out = np.full(len(ts), -1, np.int64)
    for c in np.unique(cpu):
        on = sw_cpu == c
        t, g = sw_ts[on], sw_tgid[on]
        o = np.argsort(t, kind="stable")
        t, g = t[o], g[o]
        sel = np.flatnonzero(cpu == c)
        j = np.searchsorted(t, ts[sel], side="left")
        known = j < len(t)
        out[sel[known]] = g[j[known]]
    return out


def recorder_induced(trace: Trace) -> dict[str, Any] | None:
    """``{tgid, per_cpu, total, of_recorded, pct, why}``; None when the trace does not name its recorder."""
    tgid = recorder_tgid(trace.meta)
    if tgid is None:
        return None
    sw = trace.table("sched", ["ts_ns", "cpu", "tgid"])
    sd = trace.table("shootdown", ["ts_ns", "target_cpu"])
    ts = sd.column("ts_ns").to_numpy()
    cpu = sd.column("target_cpu").to_numpy().astype(np.int64)
    ncpu = int((trace.meta.get("host") or {}).get("nr_cpus") or 0)
    ncpu = max(ncpu, int(cpu.max()) + 1 if len(cpu) else 0)
    run = running_tgid(
        sw.column("ts_ns").to_numpy(),
        sw.column("cpu").to_numpy().astype(np.int64),
        sw.column("tgid").to_numpy().astype(np.int64),
        ts,
        cpu,
    )
    per_cpu = np.bincount(cpu[run == tgid], minlength=ncpu)
    total = int(per_cpu.sum())
    return {
        "tgid": tgid,
        "per_cpu": per_cpu.tolist(),
        "total": total,
        "of_recorded": len(ts),
        "pct": round(100.0 * total / len(ts), 3) if len(ts) else 0.0,
        "unknown": int(np.count_nonzero(run < 0)),
        "why": WHY,
    }


def recorder_induced_line(r: dict[str, Any]) -> str:
    """One line: the remote shootdowns that hit a CPU while it ran the recorder (trace/perturb.py)."""
    per = ", ".join(f"CPU{i} {n:,}" for i, n in enumerate(r["per_cpu"]) if n)
    return (
        f"recorder-induced (estimate): {r['total']:,} of {r['of_recorded']:,} remote shootdowns ({r['pct']:.2f} %)"
        f" reached a CPU while it ran the recorder{f' ({per})' if per else ''}; an upper estimate, not subtracted"
    )
