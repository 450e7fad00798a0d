"""The ``usage`` block of the results: TLB-miss (perf) counts and the traced processes' CPU time and runtime
over the recorded window, next to the remote shootdown count. Only for traces whose meta.json has
``counters`` (recorded with the usage sampler); older traces get no block, so their results are unchanged.
"""

from __future__ import annotations

from typing import Any

from lufreplay import schema
from lufreplay.trace.reader import Trace

_KIND = {v: k for k, v in schema.USAGE_KIND.items()}


def _span(df: Any) -> Any:
    """First and last sample of each group, ordered by time."""
    df = df.sort_values("ts_ns")
    return df.groupby(["name", "cpu", "pid"], sort=True).agg(
        v0=("value", "first"),
        v1=("value", "last"),
        e0=("enabled_ns", "first"),
        e1=("enabled_ns", "last"),
        r0=("running_ns", "first"),
        r1=("running_ns", "last"),
        n=("value", "size"),
    )


def usage_block(trace: Trace, remote_shootdowns: int) -> dict[str, Any] | None:
    """Counts between the first and the last sample (start and stop of a finished recording)."""
    ctr = trace.meta.get("counters")
    if not isinstance(ctr, dict):
        return None
    df = trace.table("usage").to_pandas()
    events: dict[str, Any] = {}
    processes: dict[str, Any] = {}
    if len(df):
        perf = df[df["kind"] == _KIND["perf"]]
        if len(perf):
            for name, g in _span(perf).groupby(level="name", sort=False):
                per_cpu = {int(cpu): int(r.v1 - r.v0) for (_, cpu, _), r in g.iterrows()}
                count = sum(per_cpu.values())
                enabled, running = int((g.e1 - g.e0).sum()), int((g.r1 - g.r0).sum())
                scaled = count if running in (0, enabled) else round(count * enabled / running)
                events[str(name)] = {
                    "count": count,
                    "count_scaled": scaled,
                    "multiplexed": running < enabled,
                    "per_cpu": per_cpu,
                    "per_remote_shootdown": round(count / remote_shootdowns, 3) if remote_shootdowns else None,
                }
        proc = df[df["kind"] == _KIND["process"]]
        if len(proc):
            sp = _span(proc)
            for (name, _, pid), r in sp.iterrows():
                p = processes.setdefault(str(int(pid)), {"samples": int(r.n)})
                key = "cpu_s" if name == "cpu_ns" else "runtime_s" if name == "runtime_ns" else str(name)
                p[key] = round(int(r.v1 - r.v0) / 1e9, 3)
                if name == "runtime_ns":
                    p["runtime_total_s"] = round(int(r.v1) / 1e9, 3)
    return {
        "pmu": ctr.get("pmu"),
        "pmu_error": ctr.get("pmu_error"),
        "failed": dict(ctr.get("failed") or {}),
        "events": events,
        "processes": processes,
    }
