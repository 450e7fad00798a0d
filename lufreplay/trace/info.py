"""``lufreplay info``: a trace's metadata, event counts, losses, and its reconciliation with kernel counters.

Reconciliation compares what the probes recorded with counters the kernel keeps anyway, over the same
window (the ``counters`` table holds start and end snapshots):

* ``tlb_shootdowns``: ``shootdown`` rows per target CPU vs the per-CPU delta of the ``TLB`` row of
  /proc/interrupts;
* ``pages``: the recorder's ``pages_allocated`` / ``pages_freed`` (end phase) vs vmstat ``pgalloc_*`` / ``pgfree``;
* ``reclaim``: ``nr_reclaimed`` of ``shrink_inactive`` rows (LRU reclaim) vs vmstat ``pgsteal_*``. The
  kernel counts pgsteal only there: ``reclaim_pages`` rows (reclaim of a given folio list: DAMON's
  proactive reclaim in kdamond, MADV_PAGEOUT) bump no vmstat counter, so they are reported
  beside the comparison (``reclaim.reclaim_pages``), never inside it.

Window edges: the recorder reads the start counters just after switching the probes on and the end
counters just before switching them off, and each file's rows carry the time it was read. Only events
recorded between the two reads of the file they are compared with count (``outside_window`` says how
many were left out); the page totals are read right after vmstat at both ends and compared as deltas.
Traces from before that have one time per snapshot, taken just before the reads; they compare as they did.

Every ``rel_error`` is ``(recorded - reference) / max(|reference|, 1)`` (signed; finite even when the
reference is 0); ``max_rel_error`` is the largest absolute value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lufreplay import schema
from lufreplay.trace.perturb import recorder_induced, recorder_induced_line
from lufreplay.trace.reader import Trace, TraceError, open_trace

#: Loss fraction above which ``info`` shouts (perf warns at the same level).
LOSS_LOUD = 0.05

_SRC = {v: k for k, v in schema.COUNTER_SOURCE.items()}
_PHASE = {v: k for k, v in schema.COUNTER_PHASE.items()}
_RECLAIM = {v: k for k, v in schema.RECLAIM_EVENT.items()}
#: pgsteal_anon + pgsteal_file cover every reclaim (memcg-limit reclaim counts in neither _direct nor _kswapd).
PGSTEAL_COMPLETE = ("pgsteal_anon", "pgsteal_file")
PGSTEAL_BY_RECLAIMER = ("pgsteal_kswapd", "pgsteal_direct", "pgsteal_khugepaged", "pgsteal_proactive")


RECLAIM_PAGES_WHY = (
    "reclaim_pages (DAMON proactive reclaim, MADV_PAGEOUT) reclaims a given folio list and counts"
    " in no vmstat pgsteal counter: shown beside the comparison"
)


def rel_error(recorded: float, reference: float) -> float:
    """Signed relative error of ``recorded`` against ``reference`` (denominator at least 1)."""
    return float((recorded - reference) / max(abs(reference), 1))


# --------------------------------------------------------------------------------------------------
# Counts and losses
# --------------------------------------------------------------------------------------------------


def _rows(trace: Trace, name: str) -> int:
    n = 0
    for f in trace.files.get(name, []):
        try:
            n += pq.ParquetFile(f).metadata.num_rows
        except Exception as e:
            raise TraceError(f"{f}: unreadable Parquet segment ({str(e).splitlines()[0]})") from None
    return n


def counts(trace: Trace) -> dict[str, Any]:
    """Rows per table and, for every enum column, rows per enum value (by name)."""
    out: dict[str, Any] = {}
    for name, t in schema.TABLES.items():
        n = _rows(trace, name)
        entry: dict[str, Any] = {"rows": n}
        if n:
            for c in t.enum_columns:
                vc = pc.value_counts(trace.table(name, [c.name]).column(c.name))
                by = {
                    c.enum.get(int(v), str(v)): int(k)
                    for v, k in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)
                }
                entry[f"by_{c.name}"] = dict(sorted(by.items(), key=lambda kv: -kv[1]))
        out[name] = entry
    return out


def losses(trace: Trace, recorded_events: int) -> dict[str, Any]:
    """Total losses, by probe, CPU and source, and the fraction of kernel events lost."""
    t = trace.table("losses", ["cpu", "probe", "source", "lost"])
    lost = t.column("lost").to_numpy().astype(np.int64) if t.num_rows else np.zeros(0, np.int64)
    total = int(lost.sum())

    def by(col: str, names: dict[int, str] | None = None) -> dict[str, int]:
        if not t.num_rows:
            return {}
        keys = t.column(col).to_pylist()
        acc: dict[str, int] = {}
        for k, v in zip(keys, lost.tolist(), strict=True):
            key = names.get(k, str(k)) if names else str(k)
            acc[key] = acc.get(key, 0) + int(v)
        return {k: v for k, v in sorted(acc.items(), key=lambda kv: -kv[1]) if v}

    fraction = total / (total + recorded_events) if total + recorded_events else 0.0
    warning = None
    if not trace.complete:
        # The recorder died: losses it had not yet written, and everything after the last committed
        # segment, are unknown. ``total`` is then null, never a 0 that would read as "nothing lost".
        return {
            "total": None,
            "counted": total,
            "complete": False,
            "bounded": False,
            "fraction": None,
            "by_probe": by("probe"),
            "by_cpu": by("cpu"),
            "by_source": by("source", schema.LOSS_SOURCE),
            "warning": "recording interrupted: losses after the last committed segment are unknown"
            + (f" ({total} counted before it)" if total else ""),
        }
    if total:
        pct = f"{fraction:.2%}" if fraction >= 1e-4 else "< 0.01%"
        warning = f"{total} events lost ({pct} of kernel events)"
        if fraction > LOSS_LOUD:
            warning = f"HEAVY LOSS: {warning}; counts and the replay are not trustworthy (raise --buffer-size)"
    return {
        "total": total,
        "counted": total,
        "complete": True,
        "bounded": True,
        "fraction": fraction,
        "by_probe": by("probe"),
        "by_cpu": by("cpu"),
        "by_source": by("source", schema.LOSS_SOURCE),
        "warning": warning,
    }


# --------------------------------------------------------------------------------------------------
# Reconciliation
# --------------------------------------------------------------------------------------------------


class _Counters:
    """Start/end snapshots of the ``counters`` table."""

    def __init__(self, t: pa.Table) -> None:
        self.t = t
        self.phase = t.column("phase").to_numpy() if t.num_rows else np.zeros(0, np.uint8)
        self.source = t.column("source").to_numpy() if t.num_rows else np.zeros(0, np.uint8)
        self.name = np.asarray(t.column("name").to_pylist(), dtype=object)
        self.cpu = t.column("cpu").to_numpy() if t.num_rows else np.zeros(0, np.int16)
        self.value = t.column("value").to_numpy() if t.num_rows else np.zeros(0, np.int64)
        self.ts = t.column("ts_ns").to_numpy() if t.num_rows else np.zeros(0, np.int64)

    def has_phase(self, phase: str) -> bool:
        return bool(np.any(self.phase == _PHASE[phase]))

    def _sel(self, phase: str, source: str, name: str) -> np.ndarray:
        return (self.phase == _PHASE[phase]) & (self.source == _SRC[source]) & (self.name == name)

    def value_of(self, phase: str, source: str, name: str) -> int | None:
        """A cpu -1 counter (the last one if snapshotted twice)."""
        m = self._sel(phase, source, name) & (self.cpu == -1)
        return int(self.value[m][-1]) if m.any() else None

    def per_cpu(self, phase: str, source: str, name: str, ncpu: int) -> np.ndarray | None:
        m = self._sel(phase, source, name) & (self.cpu >= 0)
        if not m.any():
            return None
        out = np.zeros(max(ncpu, int(self.cpu[m].max()) + 1), dtype=np.int64)
        out[self.cpu[m].astype(np.int64)] = self.value[m]
        return out

    def delta(self, source: str, name: str) -> int | None:
        a, b = self.value_of("start", source, name), self.value_of("end", source, name)
        return None if a is None or b is None else b - a

    def names(self, source: str, prefix: str) -> list[str]:
        m = self.source == _SRC[source]
        return sorted({n for n in self.name[m] if n.startswith(prefix)})

    def read_ts(self, phase: str, source: str) -> int | None:
        """When the counters of ``source`` were read in ``phase`` (None if absent)."""
        m = (self.phase == _PHASE[phase]) & (self.source == _SRC[source])
        return int(self.ts[m].max()) if m.any() else None

    def in_window(self, source: str, ts: np.ndarray) -> np.ndarray:
        """Events recorded between the start and end reads of ``source`` (all of them if one is missing)."""
        lo, hi = self.read_ts("start", source), self.read_ts("end", source)
        if lo is None or hi is None:
            return np.ones(len(ts), dtype=bool)
        return (ts > lo) & (ts <= hi)

    def window_ns(self) -> int | None:
        if not (self.has_phase("start") and self.has_phase("end")):
            return None
        return int(self.ts[self.phase == _PHASE["end"]].max() - self.ts[self.phase == _PHASE["start"]].min())


def _pair(recorded: int | None, reference: int | None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"recorded": recorded, "vmstat": reference}
    out["rel_error"] = rel_error(recorded, reference) if recorded is not None and reference is not None else None
    out.update(extra)
    return out


def _read_edges(ctr: _Counters, ts: np.ndarray, cpu: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Shootdowns recorded while /proc/interrupts was being read, at either end of the window.

    The TLB row is read at some instant of the read (which takes ~0.1 ms, tens of ms on a busy host), so the
    kernel's delta counts every shootdown between the end of the start read and the start of the end read,
    and any of those recorded during the reads: it lies in ``[recorded_min, recorded_max]`` per CPU.
    ``unexplained`` is how far it falls outside (0 when the reads explain the whole difference)."""
    b0 = ctr.value_of("start", "recorder", schema.COUNTER_READ_BEGIN_IRQ)
    b1 = ctr.value_of("end", "recorder", schema.COUNTER_READ_BEGIN_IRQ)
    lo, hi = ctr.read_ts("start", "interrupts"), ctr.read_ts("end", "interrupts")
    if None in (b0, b1, lo, hi):
        return {}  # a trace from before the read times were kept
    n = len(ref)
    rmin = np.bincount(cpu[(ts > lo) & (ts <= b1)], minlength=n)[:n]
    rmax = np.bincount(cpu[(ts > b0) & (ts <= hi)], minlength=n)[:n]
    unexplained = np.where(ref < rmin, ref - rmin, np.where(ref > rmax, ref - rmax, 0))
    return {
        "read_edges": {
            "read_ms": [round((lo - b0) / 1e6, 3), round((hi - b1) / 1e6, 3)],  # type: ignore[operator]
            "recorded_min": rmin.tolist(),
            "recorded_max": rmax.tolist(),
            "unexplained": unexplained.tolist(),
        }
    }


def reconcile(trace: Trace) -> dict[str, Any]:
    """Recorded counts vs /proc/interrupts and /proc/vmstat deltas over the recording window."""
    ctr = _Counters(trace.table("counters"))
    complete = ctr.has_phase("start") and ctr.has_phase("end")
    note = None if complete else "no start and end counter snapshots (recording did not finish)"

    # Remote shootdowns per target CPU.
    st = trace.table("shootdown", ["ts_ns", "target_cpu"])
    sd = st.column("target_cpu").to_numpy().astype(np.int64)
    ncpu = int((trace.meta.get("host") or {}).get("nr_cpus") or 0)
    ncpu = max(ncpu, int(sd.max()) + 1 if len(sd) else 0)
    irq_start = ctr.per_cpu("start", "interrupts", "TLB", ncpu)
    irq_end = ctr.per_cpu("end", "interrupts", "TLB", ncpu)
    tlb: dict[str, Any]
    if irq_start is not None and irq_end is not None:
        n = max(ncpu, len(irq_start), len(irq_end))
        ref = np.zeros(n, np.int64)
        ref[: len(irq_end)] += irq_end
        ref[: len(irq_start)] -= irq_start
        inside = ctr.in_window("interrupts", st.column("ts_ns").to_numpy())
        rec = np.bincount(sd[inside], minlength=n)
        errs = [rel_error(int(a), int(b)) for a, b in zip(rec, ref, strict=True)]
        tlb = {
            "recorded": rec.tolist(),
            "proc_interrupts": ref.tolist(),
            "rel_error": errs,
            "max_rel_error": max((abs(e) for e in errs), default=0.0),
            "outside_window": int(np.count_nonzero(~inside)),
        }
        tlb.update(_read_edges(ctr, st.column("ts_ns").to_numpy(), sd, ref))
    else:
        tlb = {
            "recorded": np.bincount(sd, minlength=ncpu).tolist(),
            "proc_interrupts": None,
            "rel_error": None,
            "max_rel_error": None,
            "note": note or "no TLB row in /proc/interrupts on this host",
        }

    # Pages allocated / freed.
    pgalloc_names = ctr.names("vmstat", "pgalloc_")
    alloc_ref = None
    if complete and pgalloc_names:
        parts = [ctr.delta("vmstat", n) for n in pgalloc_names]
        alloc_ref = sum(p for p in parts if p is not None)

    def total(name: str) -> int | None:
        # A delta where the start was read too (newer traces), else the end value (counted from the flip).
        d = ctr.delta("recorder", name)
        return d if d is not None else ctr.value_of("end", "recorder", name)

    pages = {
        "allocated": _pair(total("pages_allocated"), alloc_ref, vmstat_counters=pgalloc_names),
        "freed": _pair(total("pages_freed"), ctr.delta("vmstat", "pgfree")),
    }

    # Reclaimed pages.
    rt = trace.table("reclaim", ["ts_ns", "event", "nr_reclaimed"])
    ev = rt.column("event").to_numpy() if rt.num_rows else np.zeros(0, np.uint8)
    nr = rt.column("nr_reclaimed").to_numpy() if rt.num_rows else np.zeros(0, np.int64)
    lru = ev == _RECLAIM["shrink_inactive"]
    inside = ctr.in_window("vmstat", rt.column("ts_ns").to_numpy() if rt.num_rows else np.zeros(0, np.int64))
    recl = int(nr[lru & inside].sum())
    targeted = int(nr[ev == _RECLAIM["reclaim_pages"]].sum())
    steal_names = [n for n in PGSTEAL_COMPLETE if n in set(ctr.names("vmstat", "pgsteal_"))]
    if len(steal_names) < len(PGSTEAL_COMPLETE):
        steal_names = [n for n in PGSTEAL_BY_RECLAIMER if n in set(ctr.names("vmstat", "pgsteal_"))]
    steal = None
    if complete and steal_names:
        steal = sum(d for d in (ctr.delta("vmstat", n) for n in steal_names) if d is not None)
    reclaim = _pair(
        recl,
        steal,
        vmstat_counters=steal_names,
        recorded_events=["shrink_inactive"],
        outside_window=int(nr[lru & ~inside].sum()),
        reclaim_pages={"recorded": targeted, "vmstat": None, "why": RECLAIM_PAGES_WHY},
    )

    out: dict[str, Any] = {"window_ns": ctr.window_ns(), "tlb_shootdowns": tlb, "pages": pages, "reclaim": reclaim}
    if note:
        out["note"] = note
    return out


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def summarize(trace: Trace) -> dict[str, Any]:
    """The ``info --json`` document: meta, counts, losses, reconciliation."""
    c = counts(trace)
    events = sum(c[n]["rows"] for n in schema.KERNEL_TABLES)
    rec = reconcile(trace)
    w = rec["window_ns"]
    c["_total"] = {"kernel_events": events, "events_per_s": events / (w / 1e9) if w else None}
    return {
        "recording": recording(trace),
        "recorder": recorder_usage(trace.meta),
        "recorder_induced": recorder_induced(trace),
        "shootdown_source": trace.shootdown_source(),
        "meta": trace.meta,
        "counts": c,
        "losses": losses(trace, events),
        "reconciliation": rec,
        "warnings": trace.warnings.as_list(),
    }


def recorder_usage(meta: dict[str, Any]) -> dict[str, Any] | None:
    """What recording cost: the recorder's CPU time in all and, inside the window, per CPU (measured by the
    probes at each context switch), its consumer's polls and wake-ups, the shootdowns it sent itself."""
    rec = meta.get("recorder")
    if not isinstance(rec, dict) or "cpu_ns" not in rec:
        return None
    win = meta.get("window") or {}
    window_s = (win["end_ns"] - win["start_ns"]) / 1e9 if win.get("end_ns") and win.get("start_ns") else None
    per_cpu = rec.get("cpu_ns_per_cpu")
    out: dict[str, Any] = {
        "cpu_s": rec["cpu_ns"] / 1e9,
        "max_rss_mb": rec["max_rss_kb"] / 1024 if rec.get("max_rss_kb") else None,
        "window_max_rss_mb": rec["window_max_rss_kb"] / 1024 if rec.get("window_max_rss_kb") else None,
        "window_s": window_s,
        "cpu_s_per_cpu": [ns / 1e9 for ns in per_cpu] if per_cpu is not None else None,
        "cpu_share_per_cpu": [ns / 1e9 / window_s for ns in per_cpu] if per_cpu is not None and window_s else None,
        "polls": rec.get("polls"),
        "watermark_wakeups": rec.get("watermark_wakeups"),
        "slices": sum(rec["slices_per_cpu"]) if rec.get("slices_per_cpu") is not None else None,
        "shootdowns_sent": sum(rec["shootdowns_sent_per_cpu"]) if rec.get("shootdowns_sent_per_cpu") else None,
        "startup_s": rec.get("startup_s"),
        "stage_cpu_s": {k: v / 1e9 for k, v in (rec.get("stage_cpu_ns") or {}).items()},
    }
    for k in ("polls", "watermark_wakeups", "slices"):
        out[f"{k}_per_s"] = out[k] / window_s if out[k] is not None and window_s else None
    return out


def _recorder_line(r: dict[str, Any]) -> str:
    parts = [f"{r['cpu_s']:.2f} CPU-s in all"]
    if r["cpu_s_per_cpu"] is not None:
        shares = r["cpu_share_per_cpu"] or [None] * len(r["cpu_s_per_cpu"])
        parts.append(
            "in the window "
            + ", ".join(
                f"CPU{i} {s:.2f} s" + (f" ({sh:.1%})" if sh is not None else "")
                for i, (s, sh) in enumerate(zip(r["cpu_s_per_cpu"], shares, strict=True))
            )
        )
    if r["polls"] is not None:
        rate = f" ({r['polls_per_s']:.1f}/s)" if r["polls_per_s"] is not None else ""
        parts.append(f"{r['polls']:,} polls{rate}, {r['watermark_wakeups']:,} watermark wake-ups")
    if r["slices"] is not None:
        parts.append(f"{r['slices']:,} time slices")
    if r["shootdowns_sent"] is not None:
        parts.append(f"{r['shootdowns_sent']:,} shootdowns sent itself")
    if r["max_rss_mb"]:
        win = r.get("window_max_rss_mb")
        parts.append(f"peak RSS {r['max_rss_mb']:,.0f} MB" + (f" ({win:,.0f} MB while recording)" if win else ""))
    return "recorder: " + "; ".join(parts)


def recording(trace: Trace) -> dict[str, Any]:
    """Whether the recording finished; if not, what was kept and what was left uncommitted."""
    return {
        "complete": trace.complete,
        "segments": trace.n_segments,
        "interrupted": trace.interruption(),
        "message": trace.interruption_line(),
        "uncommitted_files": [str(f.relative_to(trace.path)) for f in trace.remains],
    }


_META_SHOWN = (
    "run_id",
    "tool_version",
    "format_version",
    "command",
    "complete",
    "segments",
    "buffer_size",
    "started_at",
    "duration_s",
)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _print_human(doc: dict[str, Any], path: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    from lufreplay.console import make_console

    con = make_console()
    rec_ = doc["recording"]
    if rec_["message"]:
        con.print(f"[bold red]warning: {escape(rec_['message'])}[/bold red]")
    elif rec_["uncommitted_files"]:
        n = len(rec_["uncommitted_files"])
        con.print(f"[yellow]note: {n} uncommitted file(s) ignored (`lufreplay repair` removes them)[/yellow]")
    for w in doc["warnings"]:
        con.print(
            f"[yellow]warning: {escape(w['file'])}: {w['rows_skipped']} row(s) skipped ({w['column']} {w['why']})[/]"
        )
    meta = doc["meta"]
    host = meta.get("host") or {}
    t = Table(title=f"trace {path}", show_header=False)
    t.add_column("key")
    t.add_column("value", overflow="fold")
    for k in _META_SHOWN:
        if k in meta:
            t.add_row(k, _fmt(meta[k]))
    for k, v in meta.items():
        if k not in _META_SHOWN and isinstance(v, str | int | float | bool) and k not in ("format",):
            t.add_row(k, _fmt(v))
    if host:
        un = host.get("uname") or {}
        t.add_row("host", f"{host.get('hostname')} {un.get('release', '')} {host.get('nr_cpus')} CPUs")
    for k, v in meta.items():
        if isinstance(v, dict | list) and k not in ("host", "rows"):
            is_argv = isinstance(v, list) and all(isinstance(x, str) for x in v)
            text = " ".join(v) if is_argv else json.dumps(v, default=str)
            t.add_row(k, text if len(text) <= 120 else f"({len(v)} entries)")
    con.print(t)

    if doc.get("recorder"):
        con.print(escape(_recorder_line(doc["recorder"])))
    if doc.get("recorder_induced"):
        con.print(escape(recorder_induced_line(doc["recorder_induced"])))
    src = doc.get("shootdown_source") or {}
    if src.get("source") != "csd:csd_queue_cpu":  # say it where the kernel's tracepoint was missing
        style = "bold red" if src.get("source") is None else ("green" if src.get("exact") else "yellow")
        con.print(f"[{style}]remote shootdowns from {src.get('source')}: {escape(str(src.get('note')))}[/{style}]")

    counts_ = doc["counts"]
    t = Table(title="events per table")
    t.add_column("table")
    t.add_column("rows", justify="right")
    t.add_column("by kind", overflow="fold")
    for name in schema.TABLES:
        e = counts_[name]
        by = "; ".join(
            f"{k[3:]}: " + ", ".join(f"{n} {v}" for n, v in d.items()) for k, d in e.items() if k.startswith("by_")
        )
        t.add_row(name, f"{e['rows']:,}", by)
    tot = counts_["_total"]
    rate = f" ({tot['events_per_s']:,.0f}/s)" if tot["events_per_s"] else ""
    t.add_row("[bold]kernel events[/bold]", f"{tot['kernel_events']:,}", rate)
    con.print(t)

    lo = doc["losses"]
    if not lo["complete"]:
        con.print(f"[bold red]warning: {escape(lo['warning'])}[/bold red]")
    elif lo["total"] == 0:
        con.print("[green]losses: none[/green]")
    else:
        style = "bold red" if lo["fraction"] > LOSS_LOUD else "yellow"
        con.print(f"[{style}]warning: {lo['warning']}[/{style}]")
        con.print(f"  by probe: {lo['by_probe']}; by CPU: {lo['by_cpu']}; by source: {lo['by_source']}")

    rec = doc["reconciliation"]
    t = Table(title="reconciliation with kernel counters")
    for col in ("what", "recorded", "kernel", "rel. error"):
        t.add_column(col, justify="right" if col != "what" else "left")
    tlb = rec["tlb_shootdowns"]
    if tlb["proc_interrupts"] is not None:
        for cpu, (a, b, e) in enumerate(zip(tlb["recorded"], tlb["proc_interrupts"], tlb["rel_error"], strict=True)):
            t.add_row(f"remote shootdowns CPU{cpu} (TLB row)", f"{a:,}", f"{b:,}", f"{e:+.2%}")
        edges = tlb.get("read_edges")
        if edges:
            during = sum(edges["recorded_max"]) - sum(edges["recorded_min"])
            off = sum(abs(u) for u in edges["unexplained"])
            t.add_row("  of them recorded while /proc/interrupts was read", f"±{during:,}", "", f"{off:,} unexplained")
    else:
        t.add_row("remote shootdowns (TLB row)", _fmt(tlb["recorded"]), "n/a", tlb.get("note", ""))
    for label, p in (
        ("pages allocated (pgalloc_*)", rec["pages"]["allocated"]),
        ("pages freed (pgfree)", rec["pages"]["freed"]),
        ("pages reclaimed by LRU scans (pgsteal)", rec["reclaim"]),
    ):
        e = p["rel_error"]
        t.add_row(
            label,
            "n/a" if p["recorded"] is None else f"{p['recorded']:,}",
            "n/a" if p["vmstat"] is None else f"{p['vmstat']:,}",
            "" if e is None else f"{e:+.2%}",
        )
    rp = rec["reclaim"].get("reclaim_pages")
    if rp:
        t.add_row("pages reclaimed by reclaim_pages (DAMON, MADV_PAGEOUT)", f"{rp['recorded']:,}", "no counter", "")
    con.print(t)
    if rec.get("note"):
        con.print(f"[yellow]{rec['note']}[/yellow]")


def run_info(trace: Path, json_out: bool) -> int:
    """Print a trace summary (table or JSON). Exit 2 on a trace that cannot be read."""
    from lufreplay.console import emit_json, fail

    try:
        tr = open_trace(trace)
        doc = summarize(tr)
    except TraceError as e:
        fail(str(e), 2)
        return 2
    except OSError as e:
        fail(f"{trace}: {e.strerror or e}", 2)
        return 2
    if json_out:
        emit_json(doc)
    else:
        _print_human(doc, trace)
    return 0
