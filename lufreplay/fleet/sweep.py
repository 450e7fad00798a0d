"""``lufreplay sweep``: every (trace × option combination) replayed as one Ray task, collected into one table.

The per-task work is :func:`run_one`, a thin call of the simulate library entry; everything else here is
the grid, the Ray plumbing and the table. Ray is an optional extra (``pip install lufreplay[fleet]``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lufreplay.console import error


class SweepError(Exception):
    """A sweep cannot start (bad grid, Ray missing or unreachable); one-line message."""


def run_one(trace: str, options: dict[str, str], models: list[str] | None = None) -> dict[str, Any]:
    """Replay one trace with one option combination; returns the ``simulate --json`` results document."""
    from lufreplay.report.simulate_cmd import simulate

    doc, _ = simulate(Path(trace), models, [f"{k}={v}" for k, v in options.items()])
    return doc


def parse_grid(settings: Iterable[str]) -> list[dict[str, str]]:
    """``NAME=V1,V2`` settings → every combination, as ``{name: value}`` dicts (values validated here).

    A name given twice is an error (its values would silently multiply the grid otherwise).
    """
    from lufreplay.model.options import OptionError, parse_settings

    axes: dict[str, list[str]] = {}
    for s in settings:
        if "=" not in s:
            raise SweepError(f"--set expects NAME=V1[,V2...], got {s!r}")
        name, values = (x.strip() for x in s.split("=", 1))
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise SweepError(f"--set {name}: no value given")
        if name in axes:
            raise SweepError(f"--set {name} given twice; list its values once: {name}=V1,V2")
        if len(set(vals)) != len(vals):
            raise SweepError(f"--set {name}: a value is listed twice")
        try:
            for v in vals:
                parse_settings([f"{name}={v}"])
        except OptionError as e:
            raise SweepError(str(e)) from None
        axes[name] = vals
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def _task(trace: str, options: dict[str, str], models: list[str] | None) -> dict[str, Any]:
    """The Ray task body: a result document or an error, never an exception (one failure must not stop a sweep)."""
    try:
        return {"doc": run_one(trace, options, models)}
    except Exception as e:  # any failure of one replay is that task's result, reported with the others
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {"error": f"{type(e).__name__}: {msg}"}


def _finite(v: Any) -> Any:
    """NaN/±inf → None (strict JSON and a clean Parquet null)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _trace_name(trace: str) -> str:
    return Path(trace).name or str(trace)


def rows_from_doc(trace: str, options: dict[str, str], doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model of one results document."""
    van = doc.get("vanilla") or {}
    fid = doc.get("fidelity") or {}
    losses = doc.get("losses") or {}
    tr = doc.get("trace") or {}
    rec = van.get("remote_shootdowns")
    rec_b = van.get("remote_shootdowns_bounds") or [rec, rec]
    out = []
    for model, m in (doc.get("models") or {}).items():
        b = m.get("remote_shootdowns_bounds") or [None, None]
        risks = m.get("risks") or {}
        out.append(
            {
                "trace": _trace_name(trace),
                "trace_path": str(trace),
                "options": dict(options),
                "model": model,
                "recorded_shootdowns": rec,
                "recorded_shootdowns_hi": rec_b[1],
                "remote_shootdowns": m.get("remote_shootdowns"),
                "remote_shootdowns_lo": b[0],
                "remote_shootdowns_hi": b[1],
                "avoided_pct": _finite(m.get("avoided_pct")),
                "flush_events": m.get("flush_events"),
                "cpus_flushed": m.get("cpus_flushed"),
                "alloc_flushes": risks.get("R2_alloc_flushes"),
                "stale_window_max_s": _finite((m.get("stale_window") or {}).get("max_s")),
                "fidelity_explained_pct": _finite(fid.get("explained_pct")),
                "events_lost": losses.get("total", 0),
                "nr_cpus": tr.get("nr_cpus"),
                "duration_s": _finite(tr.get("duration_s")),
                "raw_events": (doc.get("replay") or {}).get("raw_events"),
                "error": None,
            }
        )
    return out


#: Column order and Arrow types of results.parquet (``options`` is a struct of the swept names, added per sweep).
COLUMNS: dict[str, pa.DataType] = {
    "trace": pa.string(),
    "trace_path": pa.string(),
    "model": pa.string(),
    "recorded_shootdowns": pa.int64(),
    "recorded_shootdowns_hi": pa.int64(),
    "remote_shootdowns": pa.int64(),
    "remote_shootdowns_lo": pa.int64(),
    "remote_shootdowns_hi": pa.int64(),
    "avoided_pct": pa.float64(),
    "flush_events": pa.int64(),
    "cpus_flushed": pa.int64(),
    "alloc_flushes": pa.int64(),
    "stale_window_max_s": pa.float64(),
    "fidelity_explained_pct": pa.float64(),
    "events_lost": pa.int64(),
    "nr_cpus": pa.int64(),
    "duration_s": pa.float64(),
    "raw_events": pa.int64(),
    "error": pa.string(),
}


def to_table(rows: list[dict[str, Any]], option_names: list[str]) -> pa.Table:
    """The rows as one Arrow table; ``options`` is a struct column with one string field per swept option.

    With no option swept there is no ``options`` column (Parquet cannot store a struct without fields).
    """
    cols: dict[str, pa.Array] = {
        "trace": pa.array([r["trace"] for r in rows], pa.string()),
        "trace_path": pa.array([r["trace_path"] for r in rows], pa.string()),
    }
    if option_names:
        opt_type = pa.struct([(n, pa.string()) for n in option_names])
        cols["options"] = pa.array([{n: r["options"].get(n) for n in option_names} for r in rows], opt_type)
    for name, typ in COLUMNS.items():
        if name not in cols:
            cols[name] = pa.array([r.get(name) for r in rows], typ)
    return pa.table(cols)


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    option_names: list[str]
    tasks: int
    failed: int


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SweepError("sweep needs Ray: pip install 'lufreplay[fleet]'") from None
    return ray


def _local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _probe(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on an unreachable ``host:port``: ray.init retries such an address for minutes, logging each try."""
    if "://" in address or address == "auto" or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except ValueError:
        raise SweepError(f"--address {address}: expected HOST:PORT, auto or ray://HOST:PORT") from None
    except OSError as e:
        raise SweepError(f"cannot reach Ray at {address}: {e.strerror or e}") from None


def start_ray(address: str | None, num_cpus: int | None) -> Any:
    """Connect to ``address`` or start a quiet local instance limited to this machine's CPUs (no dashboard)."""
    ray = _ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report, no prompt about it
    kw: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.ERROR,
        "log_to_driver": False,
        "configure_logging": True,
    }
    if address:
        _probe(address)
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            # local workers inherit this environment: from a source checkout, make them import this lufreplay
            pkg_root = Path(__file__).resolve().parent.parent.parent
            if (pkg_root / "pyproject.toml").is_file():
                os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(pkg_root), os.environ.get("PYTHONPATH"))))
            # "local": a new instance even when RAY_ADDRESS or a `ray start` cluster on this host exists
            ray.init(address="local", num_cpus=num_cpus or _local_cpus(), **kw)
    except Exception as e:  # ray raises ConnectionError, RuntimeError, ValueError... for a bad address
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SweepError(f"cannot start Ray{' at ' + address if address else ''}: {msg}") from None
    return ray


def run_sweep(
    traces: list[str],
    grid: list[dict[str, str]],
    models: list[str] | None,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> SweepResult:
    """Run every (trace × combination) as a Ray task; ``progress(done, total, label)`` after each one."""
    ray = start_ray(address, num_cpus)
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_task)
        pending: dict[Any, tuple[str, dict[str, str]]] = {}
        for trace in traces:
            for combo in grid:
                pending[remote.remote(str(trace), combo, models)] = (str(trace), combo)
        total = len(pending)
        rows: list[dict[str, Any]] = []
        failed = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            trace, combo = pending.pop(ref)
            try:
                res = ray.get(ref)
            except Exception as e:  # the worker itself died (out of memory, killed): that task failed
                res = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
            if "error" in res:
                failed += 1
                rows.append(_error_row(trace, combo, res["error"]))
            else:
                rows.extend(rows_from_doc(trace, combo, res["doc"]))
            if progress is not None:
                progress(total - len(pending), total, _trace_name(trace))
    finally:
        ray.shutdown()
    order = {(str(t), json.dumps(c, sort_keys=True)): i for i, (t, c) in enumerate(itertools.product(traces, grid))}
    # task order (traces as given, then the grid); a task's models stay in the results document's order
    rows.sort(key=lambda r: order.get((r["trace_path"], json.dumps(r["options"], sort_keys=True)), 0))
    names = list(grid[0]) if grid else []
    return SweepResult(rows=rows, option_names=names, tasks=total, failed=failed)


def _error_row(trace: str, combo: dict[str, str], error: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update({"trace": _trace_name(trace), "trace_path": trace, "options": dict(combo), "error": error})
    return row


def write_results(result: SweepResult, out: Path) -> tuple[Path, Path]:
    """``out/results.parquet`` and ``out/index.html``; returns both paths."""
    from lufreplay.report.sweep_page import write_page

    out.mkdir(parents=True, exist_ok=True)
    table = to_table(result.rows, result.option_names)
    pq.write_table(table, out / "results.parquet", compression="zstd")
    page = write_page(result.rows, result.option_names, out / "index.html")
    return out / "results.parquet", page


def json_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as strict JSON (NaN/inf already turned into null)."""
    return json.dumps([{k: _finite(v) for k, v in r.items()} for r in rows], indent=1, allow_nan=False)


def run_sweep_cmd(
    traces: list[Path],
    settings: list[str],
    output: Path,
    models: list[str] | None,
    address: str | None,
    num_cpus: int | None,
    json_out: bool,
) -> int:
    """The CLI command; returns the exit code (1 when any task failed)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    try:
        grid = parse_grid(settings)
        if models:
            from lufreplay.model import MODELS

            bad = [m for m in models if m not in MODELS]
            if bad:
                raise SweepError(f"unknown model(s) {', '.join(bad)} (choose from {', '.join(MODELS)})")
        _ray()
        with Progress(
            TextColumn("sweep"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=err,
            disable=not err.is_terminal,
        ) as bar:
            tid = bar.add_task("starting Ray", total=len(traces) * len(grid))

            def tick(done: int, total: int, label: str) -> None:
                bar.update(tid, completed=done, description=label)
                if not err.is_terminal:  # rich draws no live bar into a log: one line per finished task instead
                    print(f"sweep: {done}/{total} {label}", file=sys.stderr, flush=True)

            result = run_sweep([str(t) for t in traces], grid, models, address, num_cpus, tick)
        table, page = write_results(result, output)
    except SweepError as e:
        error(str(e))
        return 2
    except OSError as e:
        error(f"{e.filename or output}: {e.strerror}")
        return 2
    for r in result.rows:
        if r["error"]:
            opts = ",".join(f"{k}={v}" for k, v in r["options"].items())
            print(f"lufreplay: task failed: {r['trace_path']} [{opts}]: {r['error']}", file=sys.stderr)
    print(
        f"lufreplay: {result.tasks - result.failed}/{result.tasks} tasks done"
        + (f", {result.failed} failed" if result.failed else "")
        + f"; wrote {table} and {page}",
        file=sys.stderr,
    )
    if json_out:
        sys.stdout.write(json_rows(result.rows) + "\n")
    return 1 if result.failed else 0
