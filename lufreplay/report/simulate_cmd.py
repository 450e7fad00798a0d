"""``lufreplay simulate``: replay a trace through the models and print (or --json) the results document.

``simulate()`` is the library function (``report`` and the tests build from the document it returns);
``run_simulate()`` is the command around it: errors, exit codes and output.
"""

from __future__ import annotations

import dataclasses
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

from lufreplay import schema
from lufreplay.console import emit_json, fail, make_console
from lufreplay.inputs import check_option_values
from lufreplay.model import DEFAULT_MODELS, MODELS, SafetyViolation
from lufreplay.model import ops as O
from lufreplay.model.options import OptionError, describe, parse_settings
from lufreplay.replay import scope as SC
from lufreplay.replay.cpustate import mask_mode_for_kernel
from lufreplay.replay.engine import ReplayResult, replay
from lufreplay.report.cost import CostError, cost_block, profile_for
from lufreplay.report.progress import ReplayProgress
from lufreplay.report.results import build, trace_kernel
from lufreplay.report.usage import usage_block
from lufreplay.trace.perturb import recorder_induced
from lufreplay.trace.reader import TraceError, open_trace

#: options ``simulate`` takes from the trace unless set (``auto_options``): what --list-options says of them
AUTO_DOC = {"mm_cpumask": "from the trace's kernel: switch up to 6.12, kept after; {default} if unknown"}


def options_rows() -> list[dict[str, Any]]:
    """describe() with, for an option the trace decides, ``auto``: how."""
    rows = describe()
    for o in rows:
        if o["name"] in AUTO_DOC:
            o["auto"] = AUTO_DOC[o["name"]].format(default=o["default"])
    return rows


def list_options_table(console: Console) -> None:
    t = Table(title="Model options (--set NAME=VALUE); [I] = a modelling assumption of luf-model.md")
    t.add_column("name")
    t.add_column("default")
    t.add_column("meaning")
    for o in options_rows():
        choices = f" (one of: {', '.join(o['choices'])})" if o["choices"] else ""
        t.add_row(o["name"], o.get("auto") or str(o["default"]), o["doc"] + choices)
    console.print(t)


def mask_cpus(masks: np.ndarray, real: np.ndarray) -> pa.ListArray:
    """Model CPU masks (uint64 or rows of W words, bit i = model CPU i) → lists of real CPU ids, ascending."""
    lists = schema.mask_to_cpus(np.asarray(masks).astype(np.uint64))
    flat = np.asarray(lists.values.to_numpy(zero_copy_only=False), np.int64)
    return pa.ListArray.from_arrays(lists.offsets, pa.array(real[flat].astype(np.uint16), pa.uint16()))


def write_decisions(res: ReplayResult, out: Path) -> Path:
    """Every flush decision of every model as one Parquet file (performed / deferred / avoided)."""
    out.mkdir(parents=True, exist_ok=True)
    task_pid = np.zeros(len(res.ids.task) + 1, np.int64)
    for pid, i in res.ids.task.ids.items():
        task_pid[i] = pid
    tables = []
    real = res.real_cpus()  # the models ran on dense CPU ids
    for name, m in res.models.items():
        d = m.decisions_array()
        if d.size == 0:
            continue
        task = d["task"].astype(np.int64)
        cpu = d["cpu"].astype(np.int64)
        tables.append(
            pa.table(
                {
                    "ts_ns": d["ts"],
                    "model": pa.array([name] * d.size).dictionary_encode(),
                    "decision": pa.DictionaryArray.from_arrays(
                        pa.array(d["kind"].astype(np.int8)), pa.array(O.DECISION_KIND)
                    ),
                    "cause": pa.DictionaryArray.from_arrays(pa.array(d["cause"].astype(np.int8)), pa.array(O.CAUSES)),
                    "cpu": np.where(cpu >= 0, real[np.clip(cpu, 0, real.size - 1)], cpu).astype(d["cpu"].dtype),
                    "pid": np.where(task >= 0, task_pid[np.maximum(task, 0)], 0),
                    "targets": mask_cpus(d["targets"], real),
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
    scope: str | None = None,
    jobs: int | None = None,
) -> Simulation:
    """Replay ``trace_path`` through ``models`` (default: all) with model options ``settings``.

    Raises TraceError / OptionError / SafetyViolation / CostError; ``decisions`` keeps every flush
    decision in the result; ``cost`` is a shootdown-cost profile (else the trace's, if any) for the ``cost``
    block; ``progress`` draws a bar on stderr (None: only on a terminal and after a couple of seconds).
    ``scope`` (host / target; None: the default, ``scope.choose_scope``) picks what ``vanilla`` and ``models``
    show; ``doc["scope"]`` has both. ``jobs``: threads the models run on (None: the usable CPUs; same results).
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
    auto = auto_options(trace.meta, opts, settings)
    tgids = SC.target_tgids(trace)
    try:
        shown, why = SC.choose_scope(scope, tgids)
    except ValueError as e:
        raise OptionError(str(e)) from None
    profile = profile_for(trace, cost)  # a bad profile fails before the replay, not after
    run = ["vanilla", *[m for m in requested if m != "vanilla"]]
    t0 = time.perf_counter()
    with ReplayProgress(trace, progress) as bar:
        res = replay(trace, run, opts, decisions=decisions, progress=bar, scope_tgids=tgids, jobs=jobs)
    dt = time.perf_counter() - t0
    doc = build(trace, res, opts, requested, dt)
    doc["options_auto"] = auto
    doc["scope"] = scope_section(trace, res, opts, requested, dt, doc, shown, why, tgids)
    if profile is not None:
        doc["cost"] = cost_block(doc, trace, *profile)
    usage = usage_block(trace, int(doc["vanilla"]["remote_shootdowns"]))
    if usage is not None:
        doc["usage"] = usage
    induced = recorder_induced(trace)
    if induced is not None:  # traces that do not name their recorder keep their results document unchanged
        doc["vanilla"]["recorder_induced"] = induced
    return Simulation(doc, res)


def scope_section(
    trace: Any,
    res: ReplayResult,
    opts: dict[str, Any],
    requested: list[str],
    dt: float,
    doc: dict[str, Any],
    shown: str,
    why: str,
    tgids: set[int] | None,
) -> dict[str, Any]:
    """Host, target and rest-of-host totals; with ``shown == "target"`` the document's ``vanilla``, ``models``
    ``timeline`` and ``eligibility`` become the target's (``fidelity`` stays the host's: the recorded kernel is
    host-wide)."""
    host = SC.summary(doc["models"], doc["vanilla"]["remote_shootdowns"])
    out: dict[str, Any] = {"shown": shown, "why": why, "target_processes": sorted(tgids) if tgids else None}
    out["host"] = host
    if not res.scoped:
        out["target"] = out["rest_of_host"] = None
        return out
    tdoc = build(trace, dataclasses.replace(res, models=res.scoped, recon_stats=res.scoped_stats), opts, requested, dt)
    tgt = SC.summary(tdoc["models"], tdoc["vanilla"]["remote_shootdowns"])
    # the folios the target's unmaps touched: another job's reclaim on the host does not dilute them
    tgt["eligibility"] = tdoc["eligibility"]
    # the rebuild checked against the recorded flushes of the target alone: other processes' own flushes, which
    # the rebuild passes through without a cause, no longer lower its recall
    tgt["fidelity"] = {k: tdoc["fidelity"].get(k) for k in ("recall_pct", "precision_pct", "rebuilt_vs_recorded_pct")}
    out["target"] = tgt
    out["rest_of_host"] = {
        "recorded": host["recorded"] - tgt["recorded"],
        "models": {
            k: {"remote_shootdowns": v["remote_shootdowns"] - tgt["models"][k]["remote_shootdowns"]}
            for k, v in host["models"].items()
        },
    }
    if shown == "target":
        for k in ("vanilla", "models", "timeline", "eligibility"):
            doc[k] = tdoc[k]
    return out


def _user_set(settings: list[str] | dict | None, name: str) -> bool:
    if not settings:
        return False
    if isinstance(settings, dict):
        return name in settings
    return any(s.split("=", 1)[0].strip() == name for s in settings)


def auto_options(meta: dict[str, Any], opts: dict[str, Any], settings: list[str] | dict | None) -> dict[str, Any]:
    """Options the trace decides unless the user set them (``opts`` is updated): ``mm_cpumask`` follows the
    recorded kernel (a 6.12 recording replayed with 6.18's rule sent 14-19 % more rebuilt IPIs than recorded).
    Returns {name: {value, why}} for the document."""
    auto: dict[str, Any] = {}
    if not _user_set(settings, "mm_cpumask"):
        mode, why = mask_mode_for_kernel(trace_kernel(meta), opts["mm_cpumask"])
        opts["mm_cpumask"] = mode
        auto["mm_cpumask"] = {"value": mode, "why": why}
    return auto


def run_simulate(
    trace: Path,
    models: list[str] | None,
    settings: list[str],
    list_options: bool,
    json_out: bool,
    out: Path | None,
    cost: Path | None = None,
    progress: bool | None = None,
    scope: str | None = None,
    jobs: int | None = None,
) -> int:
    """The ``simulate`` command; returns the exit code (raises the Exit of a one-line error)."""
    console = make_console()
    if list_options:
        if json_out:
            emit_json(options_rows())
        else:
            list_options_table(console)
        return 0
    if out is not None and out.exists() and not out.is_dir():
        raise fail(f"--out {out}: exists and is not a directory", 2)
    if jobs is not None and jobs < 1:
        raise fail(f"--jobs {jobs}: expected a positive number of threads", 2)
    try:
        doc, res = simulate(
            trace, models, settings, decisions=out is not None, cost=cost, progress=progress, scope=scope, jobs=jobs
        )
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
