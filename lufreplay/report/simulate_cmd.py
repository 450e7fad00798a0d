"""``lufreplay simulate``: replay a trace through the models and print (or --json) the results document.

``simulate()`` is the library function (``report`` and the tests build from the document it returns);
``run_simulate()`` is the command around it: errors, exit codes and output.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from lufreplay.console import emit_json, fail, make_console
from lufreplay.inputs import check_option_values
from lufreplay.model import DEFAULT_MODELS, MODELS, SafetyViolation
from lufreplay.model import ops as O
from lufreplay.model.options import OptionError, describe, parse_settings
from lufreplay.replay.engine import ReplayResult, replay
from lufreplay.report.cost import CostError, cost_block, profile_for
from lufreplay.report.progress import ReplayProgress
from lufreplay.report.results import build
from lufreplay.report.usage import usage_block
from lufreplay.trace.reader import TraceError, open_trace


def list_options_table(console: Console) -> None:
    t = Table(title="Model options (--set NAME=VALUE); [I] = a modelling assumption of luf-model.md")
    t.add_column("name")
    t.add_column("default")
    t.add_column("meaning")
    for o in describe():
        choices = f" (one of: {', '.join(o['choices'])})" if o["choices"] else ""
        t.add_row(o["name"], str(o["default"]), o["doc"] + choices)
    console.print(t)


def write_decisions(res: ReplayResult, out: Path) -> Path:
    """Every flush decision of every model as one Parquet file (performed / deferred / avoided)."""
    out.mkdir(parents=True, exist_ok=True)
    task_pid = np.zeros(len(res.ids.task) + 1, np.int64)
    for pid, i in res.ids.task.ids.items():
        task_pid[i] = pid
    tables = []
    for name, m in res.models.items():
        d = m.decisions_array()
        if d.size == 0:
            continue
        task = d["task"].astype(np.int64)
        tables.append(
            pa.table(
                {
                    "ts_ns": d["ts"],
                    "model": pa.array([name] * d.size).dictionary_encode(),
                    "decision": pa.DictionaryArray.from_arrays(
                        pa.array(d["kind"].astype(np.int8)), pa.array(O.DECISION_KIND)
                    ),
                    "cause": pa.DictionaryArray.from_arrays(pa.array(d["cause"].astype(np.int8)), pa.array(O.CAUSES)),
                    "cpu": d["cpu"],
                    "pid": np.where(task >= 0, task_pid[np.maximum(task, 0)], 0),
                    "target_mask": d["targets"],
                    "remote_ipis": d["ipis"],
                    "event": pa.DictionaryArray.from_arrays(
                        pa.array(d["op"].astype(np.int8)), pa.array(O.MODEL_OP_NAMES)
                    ),
                    "pfn": res.pfns.real(d["pfn"]),  # the models saw compact ids
                }
            )
        )
    f = out / "decisions.parquet"
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = pa.table({"ts_ns": pa.array([], pa.int64()), "model": pa.array([], pa.string())})
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
    return f


class Simulation(NamedTuple):
    """What ``simulate`` returns: the results document (``simulate --json``) and the replay it was built from."""

    doc: dict[str, Any]
    result: ReplayResult


def simulate(
    trace_path: Path,
    models: list[str] | None = None,
    settings: list[str] | dict | None = None,
    decisions: bool = False,
    cost: Path | None = None,
    progress: bool | None = False,
) -> Simulation:
    """Replay ``trace_path`` through ``models`` (default: all) with model options ``settings``.

    Raises TraceError / OptionError / SafetyViolation / CostError; ``decisions`` keeps every flush
    decision in the result; ``cost`` is a shootdown-cost profile (else the trace's, if any) for the ``cost``
    block; ``progress`` draws a bar on stderr (None: only on a terminal and after a couple of seconds).
    """
    opts = parse_settings(settings)
    bad = check_option_values(opts)
    if bad:
        raise OptionError(bad)
    requested = list(models) if models else list(DEFAULT_MODELS)
    unknown = [m for m in requested if m not in MODELS]
    if unknown:
        raise OptionError(f"unknown model(s) {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    trace = open_trace(trace_path)
    profile = profile_for(trace, cost)  # a bad profile fails before the replay, not after
    run = ["vanilla", *[m for m in requested if m != "vanilla"]]
    t0 = time.perf_counter()
    with ReplayProgress(trace, progress) as bar:
        res = replay(trace, run, opts, decisions=decisions, progress=bar)
    doc = build(trace, res, opts, requested, time.perf_counter() - t0)
    if profile is not None:
        doc["cost"] = cost_block(doc, trace, *profile)
    usage = usage_block(trace, int(doc["vanilla"]["remote_shootdowns"]))
    if usage is not None:
        doc["usage"] = usage
    return Simulation(doc, res)


def run_simulate(
    trace: Path,
    models: list[str] | None,
    settings: list[str],
    list_options: bool,
    json_out: bool,
    out: Path | None,
    cost: Path | None = None,
    progress: bool | None = None,
) -> int:
    """The ``simulate`` command; returns the exit code (raises the Exit of a one-line error)."""
    console = make_console()
    if list_options:
        if json_out:
            emit_json(describe())
        else:
            list_options_table(console)
        return 0
    if out is not None and out.exists() and not out.is_dir():
        raise fail(f"--out {out}: exists and is not a directory", 2)
    try:
        doc, res = simulate(trace, models, settings, decisions=out is not None, cost=cost, progress=progress)
    except (TraceError, OptionError, CostError) as e:
        raise fail(str(e), 2) from None
    except SafetyViolation as e:
        raise fail(f"safety invariant violated: {e}", 3) from None
    if out is not None:
        try:
            f = write_decisions(res, out)
        except OSError as e:
            raise fail(f"--out {e.filename or out}: {e.strerror or e}", 2) from None
        print(f"lufreplay: decisions written to {f}", file=sys.stderr)
    if json_out:
        emit_json(doc)
    else:
        from lufreplay.report.text import render

        render(doc, console)
    return 0


__all__ = ["Simulation", "build", "run_simulate", "simulate", "write_decisions"]
