"""Text rendering of the results document with rich tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lufreplay.model import ops as O
from lufreplay.trace.perturb import recorder_induced_line


def _label(name: str) -> str:
    return "vanilla (rebuilt)" if name == "vanilla" else name


def _b(v: int, bounds: list[int], bounded: bool) -> str:
    return f"{v:,} [{bounds[0]:,}, {bounds[1]:,}]" if bounded else f"{v:,}"


ALLOC_ORDER_TEXT = {
    "luf": "luf (v12 tail placement: keyed pcp pages reused oldest first, buddy clean blocks first)",
    "recorded": "recorded (the pfns the traced kernel re-used: pessimistic bound)",
}


def policy_line(opts: dict[str, Any]) -> str:
    """The allocation policy and the large-folio exclusion the models ran with (they move results most)."""
    order = opts.get("alloc_order", "luf")
    large = opts.get("large_folios", "reject")
    return f"allocation order: {ALLOC_ORDER_TEXT.get(order, order)}; large folios: " + (
        "rejected (v12)" if large == "reject" else "eligible (what-if)"
    )


def render(doc: dict[str, Any], console: Console) -> None:
    """Headline, per-cause, per-CPU, eligibility, stale window, cost shift, risk flags, options."""
    tr = doc["trace"]
    bounded = doc["losses"]["bounded"]
    van = doc["vanilla"]
    models = doc["models"]
    console.print(
        f"[bold]lufreplay simulate[/] {tr['path']}  run={tr.get('run_id')}  {tr['nr_cpus']} CPUs"
        + (f" ({len(tr['cpus_involved'])} involved)" if len(tr.get("cpus_involved") or ()) < tr["nr_cpus"] else "")
        + f"  {tr.get('duration_s')} s  kernel={tr.get('kernel')}"
    )
    if tr.get("interrupted_message"):
        console.print(f"[bold red]warning: {escape(tr['interrupted_message'])}[/]")
    src = tr.get("shootdown_source") or {}
    if src.get("source") is None and src:
        console.print(f"[bold red]warning: {escape(src['note'])}; the recorded count and avoided % mean nothing[/]")
    elif src and not src.get("exact"):
        console.print(f"[yellow]note: remote shootdowns from {src['source']}: {escape(src['note'])}[/]")
    for w in doc.get("input_warnings") or []:
        console.print(
            f"[yellow]warning: {escape(w['file'])}: {w['rows_skipped']} row(s) skipped ({w['column']} {w['why']})[/]"
        )
    console.print(policy_line(doc.get("options", {})))
    if bounded:
        console.print(
            f"[yellow]the trace lost {doc['losses']['total']:,} events: counts are shown as value \\[lower, upper][/]"
        )

    t = Table(title="Remote TLB shootdowns (IPIs): recorded kernel vs models")
    for col in ("", "remote shootdown IPIs", "flush events", "CPUs flushed", "avoided %"):
        t.add_column(col, justify="right" if col else "left", overflow="fold")
    t.add_row(
        "vanilla (recorded)",
        _b(van["remote_shootdowns"], van["remote_shootdowns_bounds"], bounded),
        f"{van['flush_events']:,}",
        str(sum(1 for x in van["per_cpu"] if x)),
        "—",
    )
    for name, m in models.items():
        t.add_row(
            _label(name),
            _b(m["remote_shootdowns"], m["remote_shootdowns_bounds"], bounded),
            f"{m['flush_events']:,}",
            str(m["cpus_flushed"]),
            # the rebuild checks the replay against the recording; it avoids nothing (its error is in "fidelity")
            "—" if name == "vanilla" else f"{m['avoided_pct']:.1f}",
        )
    console.print(t)
    if van.get("recorder_induced"):
        console.print(escape(recorder_induced_line(van["recorder_induced"])))
    if doc.get("usage"):
        render_usage(doc["usage"], console)

    sc = doc.get("scope")
    if sc:
        _scope_table(sc, console)

    causes = [c for c in O.CAUSES if c in van["by_cause"] or any(c in m["by_cause"] for m in models.values())]
    t = Table(title="Remote shootdown IPIs by cause (columns sum to the totals above)")
    # whole names even in 80 columns or a pipe: batch_nonluf and batch_unseen must stay distinguishable
    t.add_column("cause", no_wrap=True, min_width=max(len(c) for c in causes))
    t.add_column("recorded", justify="right", overflow="fold")
    for name in models:
        t.add_column(_label(name), justify="right", overflow="fold")
    for c in causes:
        t.add_row(c, f"{van['by_cause'].get(c, 0):,}", *[f"{m['by_cause'].get(c, 0):,}" for m in models.values()])
    t.add_row(
        "[bold]total[/]", f"{van['remote_shootdowns']:,}", *[f"{m['remote_shootdowns']:,}" for m in models.values()]
    )
    console.print(t)

    t = Table(title="Per CPU, like the TLB row of /proc/interrupts (shootdowns received)")
    t.add_column("", overflow="fold")
    cpus = tr.get("cpus_involved") or list(range(tr["nr_cpus"]))  # per_cpu is indexed by real CPU id
    for cpu in cpus:
        t.add_column(f"CPU{cpu}", justify="right", overflow="fold")
    t.add_row("TLB recorded", *[f"{van['per_cpu'][c]:,}" for c in cpus])
    for name, m in models.items():
        t.add_row(f"TLB {_label(name)}", *[f"{m['per_cpu'][c]:,}" for c in cpus])
    console.print(t)

    el = doc["eligibility"]
    sc = doc.get("scope") or {}
    whose = "the traced command's" if sc.get("shown") == "target" else "all"
    t = Table(title=f"LUF eligibility of {whose} unmapped folios ({el['folios']:,} folios, {el['pages']:,} pages)")
    t.add_column("", overflow="fold")
    t.add_column("folios", justify="right", overflow="fold")
    t.add_column("pages", justify="right", overflow="fold")
    t.add_row("eligible", f"{el['eligible']:,}", f"{el['eligible_pages']:,}")
    for k, v in el["rejected"].items():
        t.add_row(f"rejected: {k}", f"{v:,}", f"{el['rejected_pages'].get(k, 0):,}")
    pv = el["pte_provenance"]
    t.caption = f"PTE RO/RW provenance: exact {pv['exact']:,}, inferred {pv['inferred']:,}, unknown {pv['unknown']:,}"
    tel = (sc.get("target") or {}).get("eligibility")
    if sc.get("shown") == "host" and tel:
        t.caption += (
            f"; the traced command's own: {tel['eligible_pages']:,} of {tel['pages']:,} pages eligible"
            f" ({_fmt_pct(100.0 * tel['eligible_pages'] / tel['pages'] if tel['pages'] else None)})"
        )
    console.print(t)

    fid = doc["fidelity"]
    console.print(
        f"Fidelity: the reconstruction explains [bold]{fid['explained_pct']:.1f} %[/] of the recorded remote"
        " shootdowns ("
        + ", ".join(f"{c} {v['pct']:.0f} %" for c, v in fid["by_cause"].items())
        + f"); {fid['predicted_not_recorded']:,} predicted targets were not recorded (lazy/PV skips)."
    )
    if "precision_pct" in fid:
        console.print(_precision_line(fid))
    if fid.get("pv_flush", {}).get("skip_candidates"):
        console.print(_pv_flush_line(fid))

    luf_models = {k: v for k, v in models.items() if k != "vanilla"}
    t = Table(title="Stale window (unmap → covering flush), cost shift and risk flags")
    t.add_column("", overflow="fold")
    for name in luf_models:
        t.add_column(name, justify="right", overflow="fold")

    def row(label: str, fn: Any) -> None:
        t.add_row(label, *[fn(m) for m in luf_models.values()])

    row("LUF'd pages (covered)", lambda m: f"{m['stale_window']['count']:,}")
    row(
        "stale mean / p50 / p99 (s)",
        lambda m: "{:.3g} / {:.3g} / {:.3g}".format(
            m["stale_window"]["mean_s"], m["stale_window"]["p50_s"], m["stale_window"]["p99_s"]
        ),
    )
    row("stale max (s)", lambda m: f"{m['stale_window']['max_s']:.3g}")
    row("pages pending at end", lambda m: f"{m['stale_window']['pending_at_end']:,}")
    row("alloc-time flushes (R2)", lambda m: f"{m['risks']['R2_alloc_flushes']:,}")
    row("paid by another task (R2)", lambda m: f"{m['paid_by_other_task']:,}")
    row("epoch waits (R2)", lambda m: f"{m['risks']['R2_epoch_waits']:,}")
    row("atomic allocs on LUF pages (R3)", lambda m: f"{m['risks']['R3_atomic_allocs_hitting_luf_pages']:,}")
    row("pcp skips / fallbacks (R3)", lambda m: f"{m['risks']['R3_pcp_skips']:,} / {m['risks']['R3_pcp_fallbacks']:,}")
    row("buddy refusals (R3)", lambda m: f"{m['risks']['R3_buddy_refusals']:,}")
    row("hook calls without IPI (R5)", lambda m: f"{m['risks']['R5_hook_calls_without_ipi']:,}")
    row("credits to other-mm CPUs (R6)", lambda m: f"{m['risks']['R6_credits_to_cpus_running_other_mm']:,}")
    row("key-slot merges (R8)", lambda m: f"{m['risks']['R8_key_slot_merges']:,}")
    if "hold-before-free" in luf_models:
        row("held pages max", lambda m: f"{m.get('held_pages', {}).get('max', 0):,}" if "held_pages" in m else "—")
    if luf_models:
        console.print(t)
    _posted_flag(doc, console)

    if doc.get("cost"):
        render_cost(doc, console)

    auto = doc.get("options_auto") or {}
    changed = {k: v for k, v in doc["options"].items() if doc["option_defaults"].get(k) != v and k not in auto}
    console.print(
        "Options: "
        + ", ".join(f"{k}={v}" + (" (auto)" if k in auto else "") for k, v in doc["options"].items())
        + (f"  [bold](changed: {', '.join(changed)})[/]" if changed else "  (all defaults)")
    )
    for k, a in auto.items():
        console.print(f"{k}={a['value']} chosen from the trace: {escape(a['why'])} (--set {k}=... to override)")
    rp = doc["replay"]
    console.print(f"[dim]replayed {rp['raw_events']:,} events in {rp['seconds']} s[/]")


def render_usage(u: dict[str, Any], console: Console) -> None:
    """TLB-miss counts and the processes' CPU time over the window, or why the trace has no TLB-miss counts."""
    if u.get("pmu") != "present":
        console.print(f"TLB-miss counters: not recorded (no PMU: {escape(str(u.get('pmu_error')))})")
    for name, e in u.get("events", {}).items():
        per = e["per_remote_shootdown"]
        console.print(
            f"{escape(name)}: {e['count']:,} in the window"
            + (f" (scaled {e['count_scaled']:,}: the PMU was multiplexed)" if e["multiplexed"] else "")
            + (f", {per:,} per recorded remote shootdown" if per is not None else "")
        )
    for pid, p in u.get("processes", {}).items():
        console.print(
            f"process {pid}: {p.get('cpu_s', 0):.3f} CPU-s in the window, running for {p.get('runtime_total_s', 0):.3f} s"
        )


def _iv(x: list[float] | None, scale: float = 1.0, fmt: str = "{:.3g}") -> str:
    """An interval [p10, p50, p90] as ``p10..p90`` (the median is in the JSON)."""
    if x is None:
        return "—"
    lo, hi = sorted((x[0] * scale, x[2] * scale))
    return f"{fmt.format(lo)}..{fmt.format(hi)}"


def render_cost(doc: dict[str, Any], console: Console) -> None:
    """CPU-seconds on shootdowns (recorded kernel and each model), share of the workload's CPU, runtime change."""
    c = doc["cost"]
    p = c["profile"]
    host = (p.get("host") or {}).get("hostname")
    console.print(
        f"Shootdown cost ({'from the trace' if c['source'] == 'trace' else escape(c['source'])}; host {host},"
        f" {p.get('nr_threads')} receiver thread(s)): sender {_iv(_q(p['sender_ns']), 1e-3)} us per flush,"
        f" receiver {_iv(_q(p['receiver_ns']), 1e-3)} us per IPI; workload CPU time"
        f" {c['workload_cpu_s']:.3f} s (sched table)."
    )
    t = Table(
        title="CPU time on TLB shootdowns: sender + receivers, share of the workload's CPU time, estimated"
        " runtime change (10th..90th percentile)"
    )
    t.add_column("", no_wrap=True)
    for col in ("CPU ms", "% of CPU", "saved ms", "runtime %"):
        t.add_column(col, justify="right", overflow="fold")
    r = c["recorded"]
    t.add_row("vanilla (recorded)", _iv(r["total_s"], 1e3), _iv(r["share_of_workload_cpu_pct"], fmt="{:.2f}"), "—", "—")
    for name, m in c["models"].items():
        rebuilt = name == "vanilla"  # the rebuild checks the replay; it saves nothing
        t.add_row(
            _label(name),
            _iv(m["total_s"], 1e3),
            _iv(m["share_of_workload_cpu_pct"], fmt="{:.2f}"),
            "—" if rebuilt else _iv(m["saved_s"], 1e3),
            "—" if rebuilt else _iv(m["runtime_change_pct"], fmt="{:+.2f}"),
        )
    lines = []
    for n, m in c["models"].items():
        x = m["luf_extra"]
        if n == "vanilla" or x["late_flushes_s"][2] + x["epoch_waits"] == 0:
            continue
        line = f"{_label(n)} {_iv(x['late_flushes_s'], 1e3)} ms"
        if x["alloc_time_flushes_s"][2]:
            line += f" (at allocation {_iv(x['alloc_time_flushes_s'], 1e3)} ms)"
        if x["epoch_waits"]:
            line += f", {x['epoch_waits']:,} epoch waits 0..{x['epoch_waits_s'][2] * 1e3:.3g} ms (not in the total)"
        lines.append(line)
    console.print(t)
    if lines:
        console.print("Flushes the models pay later, in their totals: " + "; ".join(lines) + ".")
    console.print("[dim]Leaves out: " + "; ".join(c["leaves_out"]) + ".[/]")


def _q(x: dict[str, float]) -> list[float]:
    return [x["p10"], x["p50"], x["p90"]]


def _posted_flag(doc: dict[str, Any], console: Console) -> None:
    """luf-v12 as posted leaves stale TLB entries behind writes, munmap and truncation (§9.1): say how many, how
    long, beside the intended design's."""
    m = doc["models"]
    if doc["options"].get("hooks") != "posted" or "luf-v12" not in m:
        return
    w = m["luf-v12"]["stale_window"]
    line = (
        f"[bold]luf-v12 follows the posted v12 code[/] (hooks=posted): its F3–F8/F10 hooks send no IPI, so stale"
        f" TLB entries survive writes, munmap and truncation until the page is reused; its {w['count']:,} LUF'd"
        f" pages stayed stale p50 {w['p50_s']:.3g} s, max {w['max_s']:.3g} s"
    )
    if "luf-v12-intended" in m:
        i = m["luf-v12-intended"]["stale_window"]
        line += f" (luf-v12-intended: p50 {i['p50_s']:.3g} s, max {i['max_s']:.3g} s)"
    console.print(line + ".")


def _scope_table(sc: dict[str, Any], console: Console) -> None:
    """Target (the traced command's mms), the rest of the host and the host, side by side."""
    if sc.get("target"):
        t = Table(title="Remote shootdown IPIs by scope: the traced command's mms vs the rest of the host")
        t.add_column("", overflow="fold")
        for col in ("target", "rest of host", "host"):
            t.add_column(col, justify="right", overflow="fold")
        parts = (sc["target"], sc["rest_of_host"], sc["host"])
        t.add_row("recorded", *[f"{p['recorded']:,}" for p in parts])
        for name in sc["host"]["models"]:
            t.add_row(_label(name), *[f"{p['models'][name]['remote_shootdowns']:,}" for p in parts])
        procs = sc.get("target_processes") or []
        more = ", ..." if len(procs) > 8 else ""
        t.caption = f"target: {len(procs)} process(es): {', '.join(map(str, procs[:8]))}{more}"
        console.print(t)
        f = sc["target"].get("fidelity") or {}
        if f.get("recall_pct") is not None:
            console.print(
                f"Rebuilt vanilla on the target alone: recall {_fmt_pct(f['recall_pct'])}, precision"
                f" {_fmt_pct(f['precision_pct'])}, {_fmt_pct(f['rebuilt_vs_recorded_pct'], True)} vs recorded."
            )
    console.print(f"Scope: {sc['shown']} shown ({escape(sc['why'])}).")


def _fmt_pct(v: float | None, sign: bool = False) -> str:
    return "—" if v is None else (f"{v:+.1f} %" if sign else f"{v:.1f} %")


def _pv_flush_line(fid: dict[str, Any]) -> str:
    """The rebuilt IPIs that only a PV-flush skip (or a lazy state the trace did not show) explains: an estimate."""
    pv = fid["pv_flush"]
    why = {
        True: "consistent with kvm_flush_tlb_multi skipping preempted vCPUs (the host had KVM PV TLB flush)",
        False: "the host had no PV TLB flush, so lazy states the trace did not show",
    }.get(pv["host_pv_tlb_flush"], "a PV-flush skip of a preempted vCPU or a lazy state the trace did not show")
    return (
        f"PV flush: {pv['skip_candidates']:,} rebuilt IPIs went to CPUs that a recorded flush (send traced) skipped"
        f" while they ran a task, not lazy: {why}; kept in the rebuild, which would be"
        f" {_fmt_pct(pv['rebuilt_vs_recorded_pct_without_them'], True)} vs recorded without them."
    )


def _precision_line(fid: dict[str, Any]) -> str:
    """The rebuilt vanilla against the kernel: recall, precision, rebuilt/recorded, per batch cause and per CPU."""
    b = fid["precision_by_cause"].get("batch")
    cpus = ", ".join(
        f"cpu{p['cpu']} {p['rebuilt']:,}/{p['recorded']:,} ({_fmt_pct(p['rebuilt_vs_recorded_pct'], True)})"
        for p in fid["per_cpu"]
        if p["recorded"] or p["rebuilt"]
    )
    return (
        f"Rebuilt vanilla: [bold]{fid['rebuilt']:,}[/] remote shootdowns, "
        f"{_fmt_pct(fid['rebuilt_vs_recorded_pct'], True)} vs recorded; recall {_fmt_pct(fid['recall_pct'])}, "
        f"precision {_fmt_pct(fid['precision_pct'])}"
        + (
            f" (batch: recall {_fmt_pct(b['recall_pct'])}, precision {_fmt_pct(b['precision_pct'])},"
            f" {_fmt_pct(b['rebuilt_vs_recorded_pct'], True)})"
            if b
            else ""
        )
        + (f"; per CPU rebuilt/recorded: {cpus}" if cpus else "")
        + "."
    )
