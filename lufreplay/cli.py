"""The ``lufreplay`` command line: doctor, record, info, simulate, report, sweep, export, workload, schema.

It only parses arguments and calls down into the command functions of the library (errors, JSON and consoles are
``lufreplay.console``); no module under ``lufreplay/`` imports it. Heavy modules are imported inside each command
so ``lufreplay --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Record kernel memory-management events with eBPF and replay them through a model of LUF"
    " (Lazy Unmap Flush) to count the TLB shootdowns it would save.",
    rich_markup_mode="markdown",
)

#: The bundled sample trace that `simulate` and `report` use when no trace is given.
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = REPO_ROOT / "traces" / "mmap-stream"


@app.command()
def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Probe this host: what `record` can capture, at which fidelity, and how to fix what is missing.

    Every capability is found by trying it (load a program, attach a probe), never from version strings.
    """
    from lufreplay.capture.doctor import run_doctor

    raise typer.Exit(run_doctor(json_out=json_out))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def record(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("-o", "--output", help="trace directory to create")] = Path("lufreplay.data"),
    pid: Annotated[list[int] | None, typer.Option("-p", "--pid", help="attach to running process(es)")] = None,
    cgroup: Annotated[Path | None, typer.Option("--cgroup", help="trace the processes of this cgroup")] = None,
    all_cpus: Annotated[bool, typer.Option("-a", "--all", help="system-wide")] = False,
    duration: Annotated[float | None, typer.Option("-d", "--duration", help="stop after SECONDS")] = None,
    memory_limit: Annotated[
        str | None, typer.Option("--memory-limit", help="run CMD in a memory cgroup limited to SIZE (e.g. 1G)")
    ] = None,
    workload: Annotated[
        str | None, typer.Option("--workload", help="run a built-in workload (see `lufreplay workload --help`)")
    ] = None,
    buffer_size: Annotated[
        str, typer.Option("--buffer-size", help="BPF ring buffer size (power of two, e.g. 64M)")
    ] = "64M",
    segment_seconds: Annotated[
        float, typer.Option("--segment-seconds", help="rotate Parquet segments every N seconds")
    ] = 2.0,
    strict: Annotated[bool, typer.Option("--strict", help="exit non-zero if any event was lost")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing output directory")] = False,
    calibrate: Annotated[
        bool,
        typer.Option("--calibrate", help="first measure what a shootdown costs here and store it in the trace"),
    ] = False,
    counters: Annotated[
        str,
        typer.Option(
            "--counters",
            help="perf events counted per CPU into the usage table (default: dTLB-load/store-, iTLB-load-misses)",
        ),
    ] = "default",
    dump_bpf: Annotated[bool, typer.Option("--dump-bpf", hidden=True, help="print the BPF program and exit")] = False,
) -> None:
    """Record a workload's memory-management events into a trace directory (root).

    Examples:

        sudo lufreplay record -o T --memory-limit 1G -- ./my-inference-server --model m.gguf

        sudo lufreplay record -o T -p 1234 -d 30

        sudo lufreplay record -o T -a -d 10

        sudo lufreplay record -o T --memory-limit 1G --workload mmap-stream

        sudo lufreplay record -o T --calibrate --workload anon-churn   # simulate then reports CPU-seconds
    """
    from lufreplay.capture.recorder import RecordOptions, run_record
    from lufreplay.console import fail
    from lufreplay.workloads import WORKLOADS

    if workload is not None and workload not in WORKLOADS:  # checked here: capture sits below the workloads
        raise fail(f"unknown workload {workload!r} (choose from {', '.join(WORKLOADS)})", 2)
    opts = RecordOptions(
        output=output,
        command=list(ctx.args),
        pids=list(pid or []),
        cgroup=cgroup,
        system_wide=all_cpus,
        duration=duration,
        memory_limit=memory_limit,
        workload=workload,
        buffer_size=buffer_size,
        segment_seconds=segment_seconds,
        strict=strict,
        force=force,
        dump_bpf=dump_bpf,
        calibrate=calibrate,
        counters=counters,
    )
    raise typer.Exit(run_record(opts))


@app.command()
def calibrate(
    save: Annotated[
        Path | None,
        typer.Option("--save", help="profile file to write (default: shootdown-cost-HOST.json in the config dir)"),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", "-n", help="receiver threads, one per other CPU (default: up to 4)")
    ] = None,
    trials: Annotated[int | None, typer.Option("--trials", help="pairs of trials (default 8; --short: 3)")] = None,
    ops: Annotated[int | None, typer.Option("--ops", help="zaps per trial (default 20000; --short: 4000)")] = None,
    short: Annotated[bool, typer.Option("--short", help="a quick calibration (a few seconds)")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the profile as JSON")] = False,
) -> None:
    """Measure what a remote TLB shootdown costs on this host, for the sender and each receiver (root).

    Threads of one process zap a page with madvise(MADV_DONTNEED) while N threads spin on other CPUs (same mm:
    IPIs; another mm: none). Gives 10th-90th percentile intervals; `simulate --cost PROFILE` turns them into
    CPU-seconds. `record --calibrate` stores the profile in the trace.

    Examples:

        sudo lufreplay calibrate

        sudo lufreplay calibrate --threads 3 --trials 20 --save host.json
    """
    from lufreplay.capture.shootdown_cost import run_calibrate

    raise typer.Exit(run_calibrate(save, threads, trials, ops, short, json_out))


@app.command()
def info(
    trace: Annotated[Path, typer.Argument(help="trace directory")],
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show a trace's metadata, event counts, losses, and its reconciliation with the kernel's own counters."""
    from lufreplay.trace.info import run_info

    raise typer.Exit(run_info(trace, json_out=json_out))


@app.command()
def repair(
    trace: Annotated[Path, typer.Argument(help="trace directory")],
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Remove an interrupted recording's uncommitted files and finalise its meta.json from the committed segments."""
    from lufreplay.trace.repair import run_repair

    raise typer.Exit(run_repair(trace, json_out=json_out))


@app.command()
def simulate(
    trace: Annotated[Path, typer.Argument(help="trace directory (default: the bundled sample trace)")] = DEFAULT_TRACE,
    model: Annotated[list[str] | None, typer.Option("-m", "--model", help="model(s) to run; default: all")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="model option NAME=VALUE (see --list-options)")
    ] = None,
    list_options: Annotated[
        bool, typer.Option("--list-options", help="list every model option with its default and exit")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="write every flush decision as Parquet into DIR")] = None,
    cost: Annotated[
        Path | None,
        typer.Option("--cost", help="shootdown-cost profile (`lufreplay calibrate`): report CPU-seconds"),
    ] = None,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="progress bar on stderr (default: on a terminal, for replays longer than ~2 s)",
            show_default=False,
        ),
    ] = None,
    scope: Annotated[
        str | None,
        typer.Option(
            "--scope",
            help="what the headline counts: 'host' (default: every process, as the kernel counted) or 'target'"
            " (the traced command's mms alone); both totals are always printed",
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "-j",
            "--jobs",
            help="threads the models run on (default: the CPUs this process may use); results do not depend on it",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Replay a trace through vanilla, LUF v12, LUF v11, hold-before-free and oracle models; report shootdowns avoided.

    Examples:

        lufreplay simulate                         # the bundled sample trace

        lufreplay simulate T --json | jq .models

        lufreplay simulate T -m luf-v12 --set credit_natural_flushes=true --out decisions/

        lufreplay simulate T --cost ~/.config/lufreplay/shootdown-cost-HOST.json   # CPU-seconds (calibrate)
    """
    from lufreplay.report.simulate_cmd import run_simulate

    raise typer.Exit(
        run_simulate(
            trace,
            models=model,
            settings=set_ or [],
            list_options=list_options,
            json_out=json_out,
            out=out,
            cost=cost,
            progress=progress,
            scope=scope,
            jobs=jobs,
        )
    )


@app.command()
def report(
    trace: Annotated[Path, typer.Argument(help="trace directory (default: the bundled sample trace)")] = DEFAULT_TRACE,
    output: Annotated[Path, typer.Option("-o", "--output", help="directory for report.html and the PNGs")] = Path(
        "lufreplay-report"
    ),
    set_: Annotated[list[str] | None, typer.Option("--set", help="model option NAME=VALUE")] = None,
) -> None:
    """Write a self-contained HTML report (plus PNGs) of a simulation."""
    from lufreplay.report.html import run_report

    raise typer.Exit(run_report(trace, output, settings=set_ or []))


@app.command()
def sweep(
    traces: Annotated[list[Path], typer.Argument(help="trace directories")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="model option NAME=V1,V2,... (every combination is run)")
    ] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="directory for results.parquet and index.html")] = Path(
        "lufreplay-sweep"
    ),
    model: Annotated[list[str] | None, typer.Option("-m", "--model", help="model(s) to run; default: all")] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster to use (default: a local instance on this machine)")
    ] = None,
    num_cpus: Annotated[int | None, typer.Option("--num-cpus", help="CPUs of the local Ray instance")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="also print the result rows as JSON")] = False,
) -> None:
    """Replay every trace with every combination of model options as Ray tasks; one table and one page.

    Examples:

        lufreplay sweep traces/* --set clip_to_recorded=true,false --set alloc_order=luf,recorded -o sweep/

        lufreplay sweep /shared/traces/* --set large_folios=reject,eligible --address auto -o s/
    """
    from lufreplay.fleet.sweep import run_sweep_cmd

    raise typer.Exit(run_sweep_cmd(traces, set_ or [], output, model, address, num_cpus, json_out))


@app.command()
def export(
    trace: Annotated[Path, typer.Argument(help="trace directory")],
    chrome_trace: Annotated[
        Path | None,
        typer.Option("--chrome-trace", help="write Chrome trace-event JSON (Perfetto UI, chrome://tracing) to FILE"),
    ] = None,
    model: Annotated[list[str] | None, typer.Option("-m", "--model", help="model(s) to run; default: all")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="model option NAME=VALUE")] = None,
) -> None:
    """Export per-CPU tracks of recorded flushes, shootdown IPIs and each model's flush decisions.

    Example:

        lufreplay export traces/mmap-stream --chrome-trace mmap-stream.json   # then open it in ui.perfetto.dev
    """
    from lufreplay.report.export import run_export

    raise typer.Exit(run_export(trace, chrome_trace, model, set_ or []))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,  # `workload NAME --help` belongs to the workload's own parser
)
def workload(
    ctx: typer.Context,
    name: Annotated[
        str | None, typer.Argument(help="mmap-stream | anon-churn | cow-fork | mixed-file | compact")
    ] = None,
) -> None:
    """Run a built-in workload that reproduces a memory behaviour LUF cares about (`lufreplay workload NAME --help`)."""
    if name is None or name in ("-h", "--help"):
        typer.echo(ctx.get_help())
        raise typer.Exit(0 if name else 2)
    from lufreplay.workloads import run_workload

    raise typer.Exit(run_workload(name, list(ctx.args)))


@app.command()
def schema(markdown: Annotated[bool, typer.Option("--markdown", help="print docs/trace-format.md")] = False) -> None:
    """Print the trace format (table, column, type) or its Markdown documentation."""
    from lufreplay import schema as s

    if markdown:
        typer.echo(s.markdown())
        return
    for t in s.TABLES.values():
        typer.echo(f"{t.name}: " + ", ".join(f"{f.name}:{f.type}" for f in t.schema))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("lufreplay: interrupted", err=True)
        sys.exit(130)


__all__ = ["DEFAULT_TRACE", "REPO_ROOT", "Optional", "app", "main"]
