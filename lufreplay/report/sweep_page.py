"""The page of ``lufreplay sweep``: per-option effect and per-trace spread of the avoided shootdowns.

Self-contained like ``lufreplay report`` (same CSS, formatting and figure style; PNGs as data URIs, no script).
Stable ids: ``sweep-summary``, ``failures``, ``effect-<option>`` (cells ``avoided-<option>-<model>-<value>`` and
``change-<option>-<model>-<value>``, mean in ``data-mean``), ``fig-effect-<option>``, ``spread-table``,
``fig-spread``, ``results-table``.
"""

from __future__ import annotations

import base64
import io
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lufreplay.report import plots
from lufreplay.report.html import CSS, _e, fmt_int, fmt_pct, slug


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("error") and r.get("avoided_pct") is not None]


def _models(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in _ok(rows)))


def _colors(models: list[str]) -> dict[str, str]:
    return {m: plots.PALETTE[i % len(plots.PALETTE)] for i, m in enumerate(models)}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _img(p: plots.Plot) -> str:
    return (
        f'<figure id="fig-{_e(p.name)}"><img alt="{_e(p.title)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.png).decode()}"><figcaption>{_e(p.caption)}</figcaption></figure>'
    )


def option_effect(rows: list[dict[str, Any]], option: str) -> dict[str, dict[str, list[float]]]:
    """{value: {model: [avoided % of every trace and every combination of the other options]}}."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in _ok(rows):
        out[str(r["options"].get(option))][r["model"]].append(float(r["avoided_pct"]))
    return out


def trace_spread(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """{trace: {model: [avoided % of every option combination]}}."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in _ok(rows):
        out[r["trace"]][r["model"]].append(float(r["avoided_pct"]))
    return out


def paired_change(rows: list[dict[str, Any]], option: str) -> dict[str, dict[str, list[float]]]:
    """{value: {model: [avoided % minus that of the first value, same trace and same other options]}}.

    Pairing removes the trace-to-trace spread, which otherwise hides an option's effect.
    """
    ok = _ok(rows)
    values = list(dict.fromkeys(str(r["options"].get(option)) for r in ok))
    base: dict[tuple[Any, ...], float] = {}

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        others = tuple(sorted((k, v) for k, v in r["options"].items() if k != option))
        return (r["trace_path"], r["model"], others)

    for r in ok:
        if values and str(r["options"].get(option)) == values[0]:
            base[key(r)] = float(r["avoided_pct"])
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        b = base.get(key(r))
        if b is not None:
            out[str(r["options"].get(option))][r["model"]].append(float(r["avoided_pct"]) - b)
    return out


def plot_effect(rows: list[dict[str, Any]], option: str) -> Figure | None:
    """Grouped bars: mean avoided % per value of ``option`` and model; whiskers span min–max."""
    eff = option_effect(rows, option)
    models = _models(rows)
    if not eff or not models:
        return None
    col = _colors(models)
    values = list(eff)
    fig, ax = plots._fig(7.0, 3.6)
    w = 0.8 / len(models)
    x = np.arange(len(values))
    for i, m in enumerate(models):
        data = [eff[v].get(m) or [np.nan] for v in values]
        mean = np.array([np.mean(d) for d in data])
        lo = mean - np.array([np.min(d) for d in data])
        hi = np.array([np.max(d) for d in data]) - mean
        ax.bar(
            x + (i - (len(models) - 1) / 2) * w, mean, w, yerr=[lo, hi], capsize=2, color=col[m], label=plots.label(m)
        )
    ax.set_xticks(x, [f"{option}={v}" for v in values])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("shootdowns avoided (%)")
    ax.axhline(0, color="#888", lw=0.8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(models), 5), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    return fig


def plot_spread(rows: list[dict[str, Any]]) -> Figure | None:
    """Per trace and model: every combination's avoided % as a dot, the min–max range as a line."""
    sp = trace_spread(rows)
    models = _models(rows)
    if not sp or not models:
        return None
    col = _colors(models)
    traces = list(sp)
    fig, ax = plots._fig(7.5, 1.0 + 0.45 * len(traces) * max(1, len(models)) ** 0.5)
    h = 0.8 / len(models)
    for i, m in enumerate(models):
        for j, t in enumerate(traces):
            vals = sp[t].get(m)
            if not vals:
                continue
            y = j + (i - (len(models) - 1) / 2) * h
            ax.plot([min(vals), max(vals)], [y, y], color=col[m], lw=2, label=plots.label(m) if j == 0 else None)
            ax.scatter(vals, [y] * len(vals), color=col[m], s=14, zorder=3)
    ax.set_yticks(np.arange(len(traces)), traces)
    ax.invert_yaxis()
    ax.set_xlabel("shootdowns avoided (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(models), 5), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return fig


def _pp(v: float) -> str:
    return f"{v:+.1f} pp"


def _cell(kind: str, option: str, model: str, value: str) -> str:
    """Id of one effect cell: ``avoided-<option>-<model>-<value>`` or ``change-…`` (mean in ``data-mean``)."""
    return _e(f"{kind}-{slug(option)}-{slug(model)}-{slug(value)}")


def _effect_table(rows: list[dict[str, Any]], option: str) -> str:
    """One row per model: avoided % for each value, then each value's paired change against the first."""
    eff = option_effect(rows, option)
    change = paired_change(rows, option)
    values = list(eff)
    head = (
        '<tr><th class="l">model</th>'
        + "".join(f"<th>{_e(option)}={_e(v)}: avoided, mean (min–max)</th>" for v in values)
        + "".join(f"<th>{_e(v)} vs {_e(values[0])}: change, mean (min to max)</th>" for v in values[1:])
        + "</tr>"
    )
    body = []
    for m in _models(rows):
        cells = []
        for v in values:
            d = eff[v].get(m)
            cells.append(
                f'<td id="{_cell("avoided", option, m, v)}" data-mean="{statistics.fmean(d)!r}">'
                f"{fmt_pct(statistics.fmean(d))}"
                f' <span class="small">({fmt_pct(min(d))}–{fmt_pct(max(d))}, n={len(d)})</span></td>'
                if d
                else "<td></td>"
            )
        for v in values[1:]:
            d = change.get(v, {}).get(m)
            cells.append(
                f'<td id="{_cell("change", option, m, v)}" data-mean="{statistics.fmean(d)!r}">'
                f"{_pp(statistics.fmean(d))}"
                f' <span class="small">({_pp(min(d))} to {_pp(max(d))})</span></td>'
                if d
                else "<td></td>"
            )
        body.append(f'<tr><td class="l">{_e(plots.label(m))}</td>{"".join(cells)}</tr>')
    return f'<table id="effect-{slug(option)}">{head}{"".join(body)}</table>'


def _spread_table(rows: list[dict[str, Any]]) -> str:
    head = (
        '<tr><th class="l">trace</th><th class="l">model</th><th>recorded shootdowns</th><th>avoided min</th>'
        "<th>median</th><th>max</th><th>model shootdowns min–max</th><th>fidelity</th></tr>"
    )
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in _ok(rows):
        groups[(r["trace"], r["model"])].append(r)
    body = []
    for (t, m), rs in groups.items():
        a = [float(r["avoided_pct"]) for r in rs]
        s = [r["remote_shootdowns"] for r in rs]
        body.append(
            f'<tr><td class="l">{_e(t)}</td><td class="l">{_e(plots.label(m))}</td>'
            f"<td>{fmt_int(rs[0]['recorded_shootdowns'])}</td><td>{fmt_pct(min(a))}</td>"
            f"<td>{fmt_pct(statistics.median(a))}</td><td>{fmt_pct(max(a))}</td>"
            f"<td>{fmt_int(min(s))}–{fmt_int(max(s))}</td><td>{fmt_pct(rs[0]['fidelity_explained_pct'])}</td></tr>"
        )
    return f'<table id="spread-table">{head}{"".join(body)}</table>'


def _results_table(rows: list[dict[str, Any]], option_names: list[str]) -> str:
    head = (
        '<tr><th class="l">trace</th>'
        + "".join(f'<th class="l">{_e(n)}</th>' for n in option_names)
        + '<th class="l">model</th><th>recorded</th><th>model shootdowns</th><th>bounds</th><th>avoided</th>'
        "<th>fidelity</th></tr>"
    )
    body = []
    for r in _ok(rows):
        body.append(
            f'<tr><td class="l">{_e(r["trace"])}</td>'
            + "".join(f'<td class="l">{_e(r["options"].get(n))}</td>' for n in option_names)
            + f'<td class="l">{_e(plots.label(r["model"]))}</td><td>{fmt_int(r["recorded_shootdowns"])}</td>'
            f"<td>{fmt_int(r['remote_shootdowns'])}</td>"
            f"<td>{fmt_int(r['remote_shootdowns_lo'])}–{fmt_int(r['remote_shootdowns_hi'])}</td>"
            f"<td>{fmt_pct(r['avoided_pct'])}</td><td>{fmt_pct(r['fidelity_explained_pct'])}</td></tr>"
        )
    return f'<table id="results-table">{head}{"".join(body)}</table>'


def _failures(rows: list[dict[str, Any]]) -> str:
    bad = [r for r in rows if r.get("error")]
    if not bad:
        return ""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in bad:
        groups[(r["trace_path"], r["error"])].append(r)
    items = []
    for (path, error), rs in groups.items():
        combos = "; ".join(", ".join(f"{k}={v}" for k, v in r["options"].items()) for r in rs)
        items.append(
            f'<li><code>{_e(path)}</code>: {_e(error)} <span class="small">({len(rs)} combination(s): '
            f"{_e(combos)})</span></li>"
        )
    return f'<div class="warn" id="failures"><strong>{len(bad)} task(s) failed.</strong><ul>{"".join(items)}</ul></div>'


def render_page(rows: list[dict[str, Any]], option_names: list[str]) -> str:
    """The whole page as one string."""
    traces = list(dict.fromkeys(r["trace"] for r in rows))
    combos = list(dict.fromkeys(tuple(sorted(r["options"].items())) for r in rows))
    n_failed = sum(1 for r in rows if r.get("error"))
    n_tasks = len({(r["trace_path"], tuple(sorted(r["options"].items()))) for r in rows})
    summary = (
        f'<p id="sweep-summary" data-tasks="{n_tasks}" data-failed="{n_failed}">{len(traces)} trace(s) × '
        f"{len(combos)} option combination(s) = {n_tasks} replays; {n_tasks - n_failed} done, {n_failed} failed. "
        f"Models: {_e(', '.join(plots.label(m) for m in _models(rows)))}.</p>"
    )
    parts = [summary, _failures(rows)]
    for opt in option_names:
        fig = plot_effect(rows, opt)
        parts.append(f"<h2>Effect of <code>{_e(opt)}</code></h2>{_effect_table(rows, opt)}")
        if fig is not None:
            cap = (
                f"Shootdowns avoided for each value of {opt}: mean over every trace and every value of the other"
                " options; whiskers span the minimum and maximum. The table's change columns compare each trace"
                " with itself (percentage points)."
            )
            parts.append(_img(plots.Plot(f"effect-{slug(opt)}", f"Effect of {opt}", _png(fig), cap)))
    fig = plot_spread(rows)
    parts.append(f"<h2>Spread per trace</h2>{_spread_table(rows)}")
    if fig is not None:
        cap = "Each dot is one option combination; the line spans its minimum and maximum for that trace and model."
        parts.append(_img(plots.Plot("spread", "Spread per trace", _png(fig), cap)))
    parts.append(f"<h2>All results</h2>{_results_table(rows, option_names)}")
    title = "lufreplay sweep"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
        f"<title>{title}</title><style>{CSS}</style></head><body><h1>{title}</h1>"
        '<p class="sub">Remote TLB shootdowns each model of LUF (Lazy Unmap Flush) would have sent, over several'
        " recorded traces and model options.</p>"
        + "".join(parts)
        + '<p class="sub">Generated by <code>lufreplay sweep</code>; the same rows are in'
        " <code>results.parquet</code>.</p></body></html>\n"
    )


def write_page(rows: list[dict[str, Any]], option_names: list[str], page: Path) -> Path:
    page.write_text(render_page(rows, option_names), encoding="utf-8")
    return page
