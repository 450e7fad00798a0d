"""``lufreplay report``: a self-contained HTML page (plus PNGs) of the results ``simulate --json`` prints.

The page has no external resource and no script: figures are embedded as base64 PNG data URIs.
Headline numbers are HTML text with stable ids (``headline-<model>``, ``shootdowns-<model>``,
``avoided-<model>``, ``headline-vanilla``, ``bounds-warning``) so tests and scrapers can find them.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from lufreplay.jsonout import dumps
from lufreplay.report import plots

#: Bounds wider than this share of the vanilla count make the page show a warning.
WIDE_BOUNDS = 0.10
#: A fidelity below this (% of recorded shootdowns the replay explains) also warns.
LOW_FIDELITY_PCT = 90.0

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:1.2em 2em;
color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.1em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub{color:#666;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.card{border:1px solid #ccc;border-radius:8px;padding:.7em 1em;min-width:11em;background:#fafafa}
.card h3{margin:0 0 .3em 0;font-size:1em}
.card .big{font-size:1.7em;font-weight:600}
.card .small{color:#555;font-size:.85em}
.card.vanilla{background:#f0f0f0}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.warn{border:2px solid #d62728;background:#fff1f0;color:#8a1010;border-radius:6px;padding:.6em 1em;margin:1em 0}
.ok{border:1px solid #2ca02c;background:#f0fff0;border-radius:6px;padding:.5em 1em;margin:1em 0}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
code{background:#f4f4f4;padding:0 .2em}
"""


class ReportError(Exception):
    """The results document cannot be turned into a report (one-line message)."""


def slug(name: str) -> str:
    """A model name as an HTML id fragment (ids stay stable for plain names like ``luf-v12``).

    The replayed ``vanilla`` model becomes ``vanilla-model``: ``*-vanilla`` ids are the recorded counts.
    """
    if name == "vanilla":
        return "vanilla-model"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))


def fmt_int(v: Any) -> str:
    if v is None:
        return "n/a"
    try:
        return f"{round(float(v)):,}"
    except (TypeError, ValueError):
        return html.escape(str(v))


def fmt_pct(v: Any) -> str:
    if v is None:
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return html.escape(str(v))
    return "n/a" if math.isnan(f) else f"{f:.1f}%"


def fmt_s(v: Any) -> str:
    """Seconds with a readable unit."""
    if v is None:
        return "n/a"
    f = float(v)
    if f == 0:
        return "0 s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(f) >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f * 1e9:.3g} ns"


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def bounds_warnings(doc: dict[str, Any]) -> list[str]:
    """Reasons the numbers are less certain than they look (empty when none)."""
    out: list[str] = []
    if (doc.get("trace") or {}).get("interrupted_message"):
        out.append(doc["trace"]["interrupted_message"])
    for w in doc.get("input_warnings") or []:
        out.append(f"{w['file']}: {w['rows_skipped']} row(s) skipped ({w['column']} {w['why']})")
    vanilla = float((doc.get("vanilla") or {}).get("remote_shootdowns") or 0)
    for m, sec in [("vanilla", doc.get("vanilla")), *(doc.get("models") or {}).items()]:
        b = (sec or {}).get("remote_shootdowns_bounds")
        if not b or len(b) != 2:
            continue
        lo, hi = float(b[0]), float(b[1])
        if hi - lo > WIDE_BOUNDS * max(vanilla, 1.0):
            out.append(
                f"{m}: remote shootdowns lie between {fmt_int(lo)} and {fmt_int(hi)}"
                f" (a range of {100 * (hi - lo) / max(vanilla, 1.0):.0f}% of the recorded {fmt_int(vanilla)})"
            )
    losses = doc.get("losses") or {}
    total = losses.get("total") or 0
    if total and not losses.get("bounded", False):
        out.append(f"{fmt_int(total)} events were lost and their effect could not be bounded")
    fid = (doc.get("fidelity") or {}).get("explained_pct")
    if fid is not None and float(fid) < LOW_FIDELITY_PCT:
        out.append(f"the replay explains only {fmt_pct(fid)} of the recorded shootdowns")
    return out


def _headline(doc: dict[str, Any]) -> str:
    van = doc.get("vanilla") or {}
    cards = [
        f'<div class="card vanilla" id="headline-vanilla"><h3>vanilla (recorded)</h3>'
        f'<div class="big" id="shootdowns-vanilla" data-value="{_e(van.get("remote_shootdowns"))}">'
        f"{fmt_int(van.get('remote_shootdowns'))}</div>"
        f'<div class="small">remote shootdowns; {fmt_int(van.get("flush_events"))} flush events</div></div>'
    ]
    for m, sec in (doc.get("models") or {}).items():
        sec = sec or {}
        s = slug(m)
        b = sec.get("remote_shootdowns_bounds")
        bounds = f" (bounds {fmt_int(b[0])}–{fmt_int(b[1])})" if b and len(b) == 2 else ""
        cards.append(
            f'<div class="card" id="headline-{s}"><h3>{_e(plots.label(m))}</h3>'
            f'<div class="big"><span id="avoided-{s}" data-value="{_e(sec.get("avoided_pct"))}">'
            f"{fmt_pct(sec.get('avoided_pct'))}</span> avoided</div>"
            f'<div class="small"><span id="shootdowns-{s}" data-value="{_e(sec.get("remote_shootdowns"))}">'
            f"{fmt_int(sec.get('remote_shootdowns'))}</span> remote shootdowns{_e(bounds)}; "
            f"{fmt_int(sec.get('flush_events'))} flush events</div></div>"
        )
    return '<div class="cards" id="headline">' + "".join(cards) + "</div>"


def _text(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return "" if v is None else str(v)


def _kv_table(rows: list[tuple[str, Any]], table_id: str) -> str:
    body = "".join(f'<tr><th class="l">{_e(k)}</th><td class="l">{_e(_text(v))}</td></tr>' for k, v in rows)
    return f'<table id="{table_id}">{body}</table>'


def _models_table(doc: dict[str, Any]) -> str:
    head = (
        '<tr><th class="l">kernel</th><th>remote shootdowns</th><th>bounds</th><th>avoided</th><th>flush events</th>'
        "<th>CPUs flushed</th><th>stale p50</th><th>stale p99</th><th>stale max</th><th>pending at end</th></tr>"
    )
    van = doc.get("vanilla") or {}
    rows = [
        f'<tr><td class="l">vanilla (recorded)</td><td>{fmt_int(van.get("remote_shootdowns"))}</td><td></td><td></td>'
        f"<td>{fmt_int(van.get('flush_events'))}</td><td></td><td></td><td></td><td></td><td></td></tr>"
    ]
    for m, sec in (doc.get("models") or {}).items():
        sec = sec or {}
        sw = sec.get("stale_window") or {}
        b = sec.get("remote_shootdowns_bounds") or []
        rows.append(
            f'<tr><td class="l">{_e(plots.label(m))}</td><td>{fmt_int(sec.get("remote_shootdowns"))}</td>'
            f"<td>{fmt_int(b[0]) + '–' + fmt_int(b[1]) if len(b) == 2 else ''}</td>"
            f"<td>{fmt_pct(sec.get('avoided_pct'))}</td><td>{fmt_int(sec.get('flush_events'))}</td>"
            f"<td>{fmt_int(sec.get('cpus_flushed'))}</td><td>{fmt_s(sw.get('p50_s'))}</td>"
            f"<td>{fmt_s(sw.get('p99_s'))}</td><td>{fmt_s(sw.get('max_s'))}</td>"
            f"<td>{fmt_int(sw.get('pending_at_end'))}</td></tr>"
        )
    return f'<table id="models-table">{head}{"".join(rows)}</table>'


def _iv(x: Any, scale: float = 1.0, fmt: str = "{:.3g}") -> str:
    """An interval [p10, p50, p90] as ``p10–p90``."""
    if not isinstance(x, list) or len(x) != 3:
        return ""
    lo, hi = sorted((x[0] * scale, x[2] * scale))
    return f"{fmt.format(lo)}–{fmt.format(hi)}"


def _cost(doc: dict[str, Any]) -> str:
    """CPU time on shootdowns (a calibrated trace, or ``simulate --cost``): one row per kernel, intervals."""
    c = doc["cost"]
    p = c.get("profile") or {}
    head = (
        '<tr><th class="l">kernel</th><th>CPU ms</th><th>% of workload CPU</th><th>saved CPU ms</th>'
        "<th>est. runtime change %</th><th>flushes paid later ms</th></tr>"
    )
    r = c.get("recorded") or {}
    rows = [
        f'<tr><td class="l">vanilla (recorded)</td><td>{_iv(r.get("total_s"), 1e3)}</td>'
        f"<td>{_iv(r.get('share_of_workload_cpu_pct'), fmt='{:.2f}')}</td><td></td><td></td><td></td></tr>"
    ]
    for m, e in (c.get("models") or {}).items():
        x = e.get("luf_extra") or {}
        rebuilt = m == "vanilla"
        rows.append(
            f'<tr><td class="l">{_e(plots.label(m))}</td><td>{_iv(e.get("total_s"), 1e3)}</td>'
            f"<td>{_iv(e.get('share_of_workload_cpu_pct'), fmt='{:.2f}')}</td>"
            f"<td>{'' if rebuilt else _iv(e.get('saved_s'), 1e3)}</td>"
            f"<td>{'' if rebuilt else _iv(e.get('runtime_change_pct'), fmt='{:+.2f}')}</td>"
            f"<td>{'' if rebuilt else _iv(x.get('late_flushes_s'), 1e3)}</td></tr>"
        )
    send, recv = p.get("sender_ns") or {}, p.get("receiver_ns") or {}
    return (
        f"<p>Shootdown cost ({_e('from the trace' if c.get('source') == 'trace' else c.get('source'))}):"
        f" sender {_e(send.get('p10'))}–{_e(send.get('p90'))} ns per flush, receiver {_e(recv.get('p10'))}–"
        f"{_e(recv.get('p90'))} ns per IPI (10th–90th percentile); workload CPU time"
        f" {_e(c.get('workload_cpu_s'))} s from the sched table.</p>"
        f'<table id="cost-table">{head}{"".join(rows)}</table>'
        f'<p class="sub">Leaves out: {_e("; ".join(c.get("leaves_out") or []))}.</p>'
    )


def _usage(doc: dict[str, Any]) -> str:
    """TLB-miss (perf) counts and the traced processes' CPU time over the window, or why there are none."""
    u = doc["usage"]
    rows: list[tuple[str, Any]] = []
    if u.get("pmu") != "present":
        rows.append(("TLB-miss counters", f"not recorded (no PMU: {u.get('pmu_error')})"))
    for name, e in (u.get("events") or {}).items():
        per = e.get("per_remote_shootdown")
        rows.append(
            (
                name,
                f"{fmt_int(e.get('count'))} in the window"
                + (f" (scaled {fmt_int(e.get('count_scaled'))}: multiplexed)" if e.get("multiplexed") else "")
                + (f"; {per:,} per recorded remote shootdown" if per is not None else ""),
            )
        )
    for pid, p in (u.get("processes") or {}).items():
        rows.append(
            (
                f"process {pid}",
                f"{p.get('cpu_s', 0):.3f} CPU-s in the window; running for {p.get('runtime_total_s', 0):.3f} s",
            )
        )
    return _kv_table(rows, "usage-table")


def _fidelity(doc: dict[str, Any]) -> str:
    fid = doc.get("fidelity") or {}
    losses = doc.get("losses") or {}
    parts = [
        _kv_table(
            [
                ("recorded shootdowns explained by the replay", fmt_pct(fid.get("explained_pct"))),
                ("events lost while recording", fmt_int(losses.get("total", 0))),
                (
                    "bounds include the losses",
                    "yes" if losses.get("bounded") else "no losses" if not losses.get("total") else "no",
                ),
            ],
            "fidelity-table",
        )
    ]
    by_cause = fid.get("by_cause") or {}
    if by_cause:
        rows = "".join(
            f'<tr><td class="l">{_e(k)}</td><td>{fmt_int(v.get("recorded"))}</td><td>{fmt_int(v.get("explained"))}</td>'
            f"<td>{fmt_pct(v.get('pct'))}</td></tr>"
            if isinstance(v, dict)
            else f'<tr><td class="l">{_e(k)}</td><td></td><td></td><td>{fmt_pct(v)}</td></tr>'
            for k, v in by_cause.items()
        )
        parts.append(
            '<table id="fidelity-by-cause"><tr><th class="l">cause</th><th>recorded</th><th>explained</th>'
            f"<th>explained %</th></tr>{rows}</table>"
        )
    warns = bounds_warnings(doc)
    if warns:
        items = "".join(f"<li>{_e(w)}</li>" for w in warns)
        parts.insert(
            0,
            f'<div class="warn" id="bounds-warning"><strong>Warning: these results are uncertain.</strong><ul>{items}</ul>'
            "Treat the headline numbers as estimates within the bounds shown.</div>",
        )
    else:
        lost = losses.get("total") or 0
        note = f"{fmt_int(lost)} events were lost; the bounds stay narrow." if lost else "No events were lost."
        parts.insert(0, f'<div class="ok" id="bounds-ok">{note} The replay explains the recording.</div>')
    return "".join(parts)


def render_html(doc: dict[str, Any], figures: list[plots.Plot]) -> str:
    """The whole page as one string."""
    tr = doc.get("trace") or {}
    title = f"lufreplay report: {tr.get('run_id') or Path(str(tr.get('path', 'trace'))).name}"
    info = _kv_table(
        [
            ("trace", tr.get("path", "")),
            ("run id", tr.get("run_id", "")),
            ("duration", fmt_s(tr.get("duration_s"))),
            ("CPUs", tr.get("nr_cpus", "")),
            ("host", tr.get("host", "")),
            ("kernel", tr.get("kernel", "")),
        ],
        "trace-table",
    )
    el = doc.get("eligibility") or {}
    elig = _kv_table(
        [("folios unmapped", fmt_int(el.get("folios"))), ("LUF-eligible", fmt_int(el.get("eligible")))]
        + [(f"rejected: {k}", fmt_int(v)) for k, v in (el.get("rejected") or {}).items()],
        "eligibility-table",
    )
    figs = "".join(
        f'<figure id="fig-{p.name}"><h2>{_e(p.title)}</h2>'
        f'<img alt="{_e(p.title)}" src="data:image/png;base64,{base64.b64encode(p.png).decode()}">'
        f"<figcaption>{_e(p.caption)} (also <code>{p.name}.png</code>)</figcaption></figure>"
        for p in figures
    )
    options = doc.get("options") or {}
    opts = (
        _kv_table([(k, json.dumps(v)) for k, v in options.items()], "options-table") if options else "<p>defaults</p>"
    )
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1>"
        '<p class="sub">Remote TLB shootdowns recorded on a real kernel, and what each model of LUF'
        " (Lazy Unmap Flush) would have sent for the same events.</p>"
        f"<h2>Headline</h2>{_headline(doc)}"
        f"<h2>Fidelity and losses</h2>{_fidelity(doc)}"
        f"<h2>Models</h2>{_models_table(doc)}"
        + (f"<h2>CPU time on shootdowns</h2>{_cost(doc)}" if doc.get("cost") else "")
        + (f"<h2>TLB misses and CPU time</h2>{_usage(doc)}" if doc.get("usage") else "")
        + f"<h2>Trace</h2>{info}"
        f"<h2>Eligibility</h2>{elig}"
        f"{figs}"
        f"<h2>Model options</h2>{opts}"
        '<p class="sub">Generated by <code>lufreplay report</code>.</p>'
        "</body></html>\n"
    )


def write_report(doc: dict[str, Any], output: Path) -> Path:
    """Write ``output/report.html`` and ``output/<figure>.png``; returns the HTML path."""
    if not isinstance(doc, dict) or "vanilla" not in doc or "models" not in doc:
        raise ReportError("results document has no 'vanilla'/'models' sections")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create {output}: {e.strerror}") from None
    if not output.is_dir():
        raise ReportError(f"{output} is not a directory")
    figures = plots.render_all(doc, output)
    page = output / "report.html"
    page.write_text(render_html(doc, figures), encoding="utf-8")
    (output / "results.json").write_text(dumps(doc), encoding="utf-8")
    return page


def run_report(trace: Path, output: Path, settings: list[str]) -> int:
    """The ``report`` command: simulate every default model, then write the page from the results document."""
    from lufreplay.console import fail
    from lufreplay.model import SafetyViolation
    from lufreplay.model.options import OptionError
    from lufreplay.report.simulate_cmd import simulate
    from lufreplay.trace.reader import TraceError

    try:
        doc = simulate(trace, None, settings).doc
        if doc["trace"].get("interrupted_message"):
            print(f"lufreplay: warning: {doc['trace']['interrupted_message']}", file=sys.stderr)
        page = write_report(doc, output)
    except (TraceError, OptionError, ReportError) as e:
        raise fail(str(e), 2) from None
    except SafetyViolation as e:
        raise fail(f"safety invariant violated: {e}", 3) from None
    except OSError as e:
        raise fail(f"{e.filename or output}: {e.strerror}") from None
    print(page)
    return 0
