#!/usr/bin/env python3
"""Provenance notes for a bundled test-bed trace, written from the trace and the run's files (not by hand).

Usage:
  bundle_notes.py section TRACE [--run CASEDIR] [--describe TEXT] [--cache DIR]
      one traces/README.md section: host, command, events, size, window, losses, reconciliation with the
      guest's /proc/interrupts (the recorded window from `lufreplay info`, and the whole run from the
      snapshots guest-record.sh left in CASEDIR), recorded causes, eligibility, the model table with
      luf-v12 as posted (the default) beside luf-v12-intended, and the rebuilt vanilla's fidelity.
  bundle_notes.py table TRACE...  [--cache DIR]
      the README's results table of many-CPU traces: every model, luf-v12 as posted and as intended, with precision.

It runs `python -m lufreplay info|simulate ... --json` (with the lufreplay on PYTHONPATH) and keeps the JSON
in --cache (default /tmp/lufreplay-notes) keyed by trace name, so a section and the table share one replay.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from summarize import tlb_row  # testbed/summarize.py: the same snapshot format

MODELS = ("vanilla", "luf-v12", "luf-v12-intended", "luf-v11", "hold-before-free", "oracle")


def lr_json(cache: Path, trace: Path, tag: str, *args: str) -> dict[str, Any]:
    """`lufreplay ARGS --json` on TRACE, cached as CACHE/NAME.TAG.json."""
    f = cache / f"{trace.name}.{tag}.json"
    if not f.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            [sys.executable, "-m", "lufreplay", args[0], str(trace), *args[1:], "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            sys.exit(f"bundle_notes: lufreplay {' '.join(args)} {trace} failed: {r.stderr.strip()[-300:]}")
        f.write_text(r.stdout)
    return json.loads(f.read_text())


def docs(cache: Path, trace: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`info` and the default `simulate` (luf-v12 as posted and luf-v12-intended side by side)."""
    return lr_json(cache, trace, "info", "info"), lr_json(cache, trace, "default", "simulate")


def switch_doc(cache: Path, trace: Path) -> dict[str, Any]:
    """The replay with 6.18's mm_cpumask rule (`kept`: a CPU stays in the mask until a flush reaches it), for
    contrast: `simulate` picks x86's rule up to 6.12 (`switch`) for the kernels the test bed boots."""
    return lr_json(cache, trace, "kept", "simulate", "--set", "mm_cpumask=kept")


def switch_line(sw: dict[str, Any]) -> str:
    f, m = sw["fidelity"], sw["models"]
    return (
        f"`simulate` chose `mm_cpumask=switch` from the trace's kernel (x86's rule up to 6.12); with 6.18's rule "
        f"(`--set mm_cpumask=kept`, a CPU stays in the mask until a flush reaches it): "
        f"rebuilt {f.get('rebuilt', 0):,}, `rebuilt_vs_recorded_pct` {pct(f.get('rebuilt_vs_recorded_pct'), True)}, "
        f"`recall_pct` {pct(f.get('recall_pct'))}, `precision_pct` {pct(f.get('precision_pct'))}; "
        + ", ".join(f"{k} {m[k]['remote_shootdowns']:,}" for k in MODELS[1:] if k in m)
        + "."
    )


def vmstat(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (ln.split() for ln in path.read_text().splitlines() if ln.strip())}


def n(x: float | None) -> str:
    return "–" if x is None else f"{x:,}"


def pct(x: float | None, sign: bool = False) -> str:
    return "–" if x is None else (f"{x:+.1f} %" if sign else f"{x:.1f} %")


def causes(d: dict[str, int], k: int = 6) -> str:
    top = sorted(((v, c) for c, v in d.items() if v), reverse=True)[:k]
    return ", ".join(f"{c} {v:,}" for v, c in top)


def stale(m: dict[str, Any]) -> str:
    """Pages whose stale TLB entries a deferral left, and for how long."""
    w = m.get("stale_window") or {}
    if not w.get("count"):
        return "none"
    return f"{w['count']:,} pages, p50 {w['p50_s']:.3g} s, p99 {w['p99_s']:.3g} s, max {w['max_s']:.3g} s"


def model_table(sim: dict[str, Any]) -> list[str]:
    rec = sim["vanilla"]["remote_shootdowns"]
    out = ["| model | remote shootdowns | avoided | main causes |", "|---|---:|---:|---|"]
    for m in MODELS:
        d = sim["models"].get(m)
        if d is None:
            continue
        name = "vanilla (rebuilt)" if m == "vanilla" else m
        avoided = "–" if m == "vanilla" else pct(d["avoided_pct"])
        out.append(f"| {name} | {d['remote_shootdowns']:,} | {avoided} | {causes(d['by_cause'])} |")
    out.append(f"| recorded (kernel) | {rec:,} | | {causes(sim['vanilla']['by_cause'])} |")
    return out


def fidelity_line(sim: dict[str, Any]) -> str:
    f = sim["fidelity"]
    per_cpu = ", ".join(
        f"{c['cpu']}: {c['rebuilt']:,}/{c['recorded']:,} ({pct(c['rebuilt_vs_recorded_pct'], True)})"
        for c in f.get("per_cpu", [])
    )
    b = (f.get("precision_by_cause") or {}).get("batch") or {}
    return (
        f"Fidelity (rebuilt vanilla vs recorded): rebuilt {f.get('rebuilt', 0):,} vs "
        f"{sim['vanilla']['remote_shootdowns']:,} recorded, `rebuilt_vs_recorded_pct` "
        f"{pct(f.get('rebuilt_vs_recorded_pct'), True)}; `recall_pct` {pct(f.get('recall_pct'))}, "
        f"`precision_pct` {pct(f.get('precision_pct'))} (batch: recall {pct(b.get('recall_pct'))}, precision "
        f"{pct(b.get('precision_pct'))}); batch targets rebuilt but not sent "
        f"{f.get('batch_not_recorded', {}).get('total', 0):,}. Per CPU rebuilt/recorded: {per_cpu}."
    )


def section(trace: Path, run: Path | None, describe: str, cache: Path) -> str:
    info, sim = docs(cache, trace)
    meta = info["meta"]
    host = meta["host"]
    rec = info["reconciliation"]
    tlb = rec["tlb_shootdowns"]
    size = sum(f.stat().st_size for f in trace.rglob("*") if f.is_file())
    win = (meta["window"]["end_ns"] - meta["window"]["start_ns"]) / 1e9
    cl = meta["command_line"]
    cmd = (
        " ".join(["lufreplay", *cl[1:-1], repr(cl[-1])])
        if meta["target"]["command"][:2] == ["sh", "-c"]
        else " ".join(cl)
    )
    lines = [f"## `{trace.name}`", "", describe, ""]
    lines.append(
        f"- host: qemu TCG guest (`{host['cpu_model']}`, no KVM, no PV TLB flush) on the project's 2-vCPU host, "
        f"{host['nr_cpus']} vCPUs, {host['mem_total_kb'] // 1024:,} MiB; kernel `{host['uname']['release']}` "
        f"(Debian's, booted by virtme-ng); recorded {meta['created'][:19]}Z"
    )
    guest = {}
    if run is not None and (run / "guest.txt").is_file():
        guest = dict(ln.split("=", 1) for ln in (run / "guest.txt").read_text().splitlines() if "=" in ln)
    lines.append(
        f"- command (inside the guest, as root, by `testbed/guest-record.sh {guest.get('case', '?')}` from "
        f"`testbed/run-guest.sh`; then `cp -r` to `traces/{trace.name}`): `{cmd}`"
    )
    lost = info["losses"]["total"]
    by_probe = info["losses"].get("by_probe") or {}
    lines.append(
        f"- {meta['events']:,} events, {size / 1e6:.1f} MB, window {win:.1f} s, losses {lost}"
        + (f" ({', '.join(f'{k} {v}' for k, v in by_probe.items())})" if lost else "")
        + f"; probes absent on this kernel: {', '.join(meta.get('probes_absent') or []) or 'none'}"
    )
    whole = ""
    if run is not None and (run / "interrupts.before").is_file():
        d = [a - b for a, b in zip(tlb_row(run / "interrupts.after"), tlb_row(run / "interrupts.before"), strict=False)]
        whole = f"; whole `record` run (guest snapshots before/after) {sum(d):,} = {d}"
    pages = rec["pages"]
    lines.append(
        f"- reconciliation (`lufreplay info`): remote shootdowns per CPU {tlb['recorded']} vs /proc/interrupts TLB "
        f"{tlb['proc_interrupts']} (max error {100 * tlb['max_rel_error']:.2f} %){whole}; reclaimed pages "
        f"{n(rec['reclaim']['recorded'])} vs pgsteal {n(rec['reclaim']['vmstat'])}; pages allocated "
        f"{pages['allocated']['recorded']:,} vs vmstat {pages['allocated']['vmstat']:,}; freed "
        f"{pages['freed']['recorded']:,} vs {pages['freed']['vmstat']:,}"
    )
    el = sim["eligibility"]
    lines.append(
        f"- recorded remote shootdowns {sim['vanilla']['remote_shootdowns']:,} (by cause "
        f"{sim['vanilla']['by_cause']}); unmapped/migrated folios {el['folios']:,}, eligible {el['eligible']:,}, "
        f"rejected {el['rejected']}"
    )
    lines += ["", "Default options (luf-v12 as posted, luf-v12-intended beside it):", "", *model_table(sim), ""]
    p12, i12 = sim["models"]["luf-v12"], sim["models"]["luf-v12-intended"]
    lines += [
        f"luf-v12 as posted (the default, `hooks=posted`: the F3–F8/F10 hooks inert): {p12['remote_shootdowns']:,} "
        f"({pct(p12['avoided_pct'])} avoided; as intended {i12['remote_shootdowns']:,}, {pct(i12['avoided_pct'])}); "
        f"main causes {causes(p12['by_cause'])}. Stale-entry exposure (`stale_window`): as posted "
        f"{stale(p12)}; as intended {stale(i12)}. Safety violations: "
        f"{sum(d['safety']['violations'] for d in sim['models'].values())}.",
        "",
        fidelity_line(sim),
        "",
        switch_line(switch_doc(cache, trace)),
        "",
    ]
    return "\n".join(lines)


def switch_cell(sw: dict[str, Any]) -> str:
    f = sw["fidelity"]
    return (
        f"{f.get('rebuilt', 0):,} ({pct(f.get('rebuilt_vs_recorded_pct'), True)}), {pct(f.get('recall_pct'))}, "
        f"{pct(f.get('precision_pct'))}"
    )


def table(traces: list[Path], cache: Path) -> str:
    head = (
        "| trace | vCPUs | recorded | rebuilt vanilla (vs recorded) | recall | precision | luf-v12 (as posted) | "
        "luf-v12-intended | luf-v11 | hold-before-free | oracle | rebuilt, recall, precision with 6.18's mm_cpumask=kept |"
    )
    out = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in traces:
        info, sim = docs(cache, t)
        f, m = sim["fidelity"], sim["models"]

        def cell(d: dict[str, Any]) -> str:
            return f"{d['remote_shootdowns']:,} ({pct(d['avoided_pct'])})"

        out.append(
            f"| `{t.name}` | {info['meta']['host']['nr_cpus']} | {sim['vanilla']['remote_shootdowns']:,} | "
            f"{m['vanilla']['remote_shootdowns']:,} ({pct(f.get('rebuilt_vs_recorded_pct'), True)}) | "
            f"{pct(f.get('recall_pct'))} | {pct(f.get('precision_pct'))} | {cell(m['luf-v12'])} | "
            f"{cell(m['luf-v12-intended'])} | {cell(m['luf-v11'])} | {cell(m['hold-before-free'])} | "
            f"{cell(m['oracle'])} | {switch_cell(switch_doc(cache, t))} |"
        )
    return "\n".join(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("section", "table"))
    p.add_argument("traces", nargs="+", type=Path)
    p.add_argument("--run", type=Path, help="the test-bed case directory (OUTDIR/CASE) the trace came from")
    p.add_argument("--describe", default="", help="one paragraph saying what the trace shows")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "lufreplay-notes")
    o = p.parse_args(argv)
    for t in o.traces:
        if not (t / "meta.json").is_file():
            p.error(f"{t}: not a trace (no meta.json)")
    if o.what == "section":
        print(section(o.traces[0], o.run, o.describe, o.cache))
    else:
        print(table(o.traces, o.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
