"""``lufreplay export T --chrome-trace out.json``: a trace and the models' flush decisions as Chrome trace events.

The output is the Trace Event Format's JSON object form (``{"traceEvents": [...], "displayTimeUnit": "ns"}``)
that Perfetto UI (ui.perfetto.dev) and chrome://tracing open. One process per source, one thread (track) per
CPU in each: process 1 is the recorded kernel (every ``tlb_flush`` row and every ``shootdown`` row, on the CPU
the event fired on), processes 2… are the models, one instant event per logged flush decision on the CPU that
made it. Timestamps are microseconds since the first exported event (the format's unit), with ns precision.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lufreplay.console import error

RECORDED_PID = 1
#: Track for a decision with no CPU (cpu < 0): sorted after the CPUs.
NO_CPU_TID = 100_000


def decisions_table(trace: Path, models: list[str] | None, settings: list[str]) -> tuple[pa.Table, dict[str, Any]]:
    """Every model's flush decisions (the ``simulate --out`` decisions.parquet table) and the results document."""
    from lufreplay.report.simulate_cmd import simulate, write_decisions

    doc, res = simulate(trace, models, settings, decisions=True)
    with tempfile.TemporaryDirectory(prefix="lufreplay-export-") as d:
        f = write_decisions(res, Path(d))
        table = pq.read_table(f)
    return table, doc


def _rows(table: pa.Table, columns: list[str]) -> Iterator[dict[str, Any]]:
    present = [c for c in columns if c in table.column_names]
    for batch in table.select(present).to_batches(max_chunksize=65536):
        yield from batch.to_pylist()


def events(trace: Path, models: list[str] | None = None, settings: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """The trace events, metadata first (process and per-CPU thread names), then one instant event per row."""
    from lufreplay.trace.reader import open_trace

    tr = open_trace(trace)
    flushes = tr.table("tlb_flush", ["ts_ns", "cpu", "pid", "tgid", "reason", "reason_name", "pages"])
    shoots = tr.table("shootdown", ["ts_ns", "cpu", "pid", "tgid", "target_cpu", "callsite"])
    dec, doc = decisions_table(trace, models, settings or [])
    names = list(doc["models"])  # the requested models, in the document's order
    cpus = doc["trace"].get("cpus_involved") or range(int(doc["trace"]["nr_cpus"]))  # real CPU ids
    starts = [int(pc.min(t["ts_ns"]).as_py()) for t in (flushes, shoots, dec) if t.num_rows]
    t0 = min(starts, default=0)

    def us(ts: int) -> float:
        return (ts - t0) / 1000.0

    procs = [(RECORDED_PID, "recorded kernel")] + [
        (RECORDED_PID + 1 + i, f"model {m} (replayed)" if m == "vanilla" else f"model {m}") for i, m in enumerate(names)
    ]
    for pid, pname in procs:
        yield {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": pname}}
        yield {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}
        for cpu in cpus:
            yield {"name": "thread_name", "ph": "M", "pid": pid, "tid": cpu, "args": {"name": f"CPU {cpu}"}}
            yield {"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": cpu, "args": {"sort_index": cpu}}
    if dec.num_rows and "cpu" in dec.column_names and pc.min(dec["cpu"]).as_py() < 0:
        for i in range(len(names)):
            yield {
                "name": "thread_name",
                "ph": "M",
                "pid": RECORDED_PID + 1 + i,
                "tid": NO_CPU_TID,
                "args": {"name": "no CPU"},
            }

    for r in _rows(flushes, flushes.column_names):
        reason = r.get("reason_name") or str(r["reason"])
        yield {
            "name": f"tlb_flush {reason}",
            "cat": "tlb_flush",
            "ph": "i",
            "s": "t",
            "ts": us(r["ts_ns"]),
            "pid": RECORDED_PID,
            "tid": r["cpu"],
            "args": {"reason": reason, "pages": r["pages"], "pid": r["pid"], "tgid": r["tgid"]},
        }
    for r in _rows(shoots, shoots.column_names):
        yield {
            "name": f"shootdown IPI → CPU {r['target_cpu']}",
            "cat": "shootdown",
            "ph": "i",
            "s": "t",
            "ts": us(r["ts_ns"]),
            "pid": RECORDED_PID,
            "tid": r["cpu"],
            "args": {"target_cpu": r["target_cpu"], "callsite": r["callsite"], "pid": r["pid"], "tgid": r["tgid"]},
        }
    mpid = {m: RECORDED_PID + 1 + i for i, m in enumerate(names)}
    cols = ["ts_ns", "model", "decision", "cause", "cpu", "pid", "targets", "remote_ipis", "event", "pfn"]
    for r in _rows(dec, cols):
        if r["model"] not in mpid:  # the rebuilt vanilla runs as the reference even when not requested
            continue
        yield {
            "name": f"{r['decision']} {r['cause']}",
            "cat": f"decision.{r['decision']}",
            "ph": "i",
            "s": "t",
            "ts": us(r["ts_ns"]),
            "pid": mpid[r["model"]],
            "tid": r["cpu"] if r["cpu"] >= 0 else NO_CPU_TID,
            "args": {
                "decision": r["decision"],
                "cause": r["cause"],
                "remote_ipis": r["remote_ipis"],
                "targets": list(r["targets"]),
                "event": r["event"],
                "pid": r["pid"],
                "pfn": r["pfn"],
            },
        }


def write_chrome_trace(
    trace: Path, out: Path | IO[str], models: list[str] | None = None, settings: list[str] | None = None
) -> int:
    """Stream the events into ``out`` as one JSON object; returns the number of non-metadata events."""
    it = events(trace, models, settings)
    head = next(it)  # opens and replays the trace: a bad trace fails before the output file is created
    fh = out.open("w", encoding="utf-8") if isinstance(out, Path) else out
    n = 0
    try:
        fh.write('{"displayTimeUnit": "ns", "otherData": ')
        fh.write(json.dumps({"generator": "lufreplay export", "trace": str(trace)}))
        fh.write(', "traceEvents": [\n')
        first = True
        for ev in itertools.chain([head], it):
            if not first:
                fh.write(",\n")
            fh.write(json.dumps(ev, allow_nan=False, ensure_ascii=False))
            first = False
            n += ev["ph"] != "M"
        fh.write("\n]}\n")
    finally:
        if isinstance(out, Path):
            fh.close()
    return n


def run_export(trace: Path, chrome_trace: Path | None, models: list[str] | None, settings: list[str]) -> int:
    """The CLI command; returns the exit code."""
    import sys

    from lufreplay.model import SafetyViolation
    from lufreplay.model.options import OptionError
    from lufreplay.trace.reader import TraceError

    if chrome_trace is None:
        error("nothing to export: give --chrome-trace FILE")
        return 2
    try:
        n = write_chrome_trace(trace, chrome_trace, models, settings)
    except (TraceError, OptionError) as e:
        error(str(e))
        return 2
    except SafetyViolation as e:
        error(f"safety invariant violated: {e}")
        return 3
    except OSError as e:
        error(f"{e.filename or chrome_trace}: {e.strerror}")
        return 2
    print(f"lufreplay: {n} events written to {chrome_trace} (open it in https://ui.perfetto.dev)", file=sys.stderr)
    return 0
