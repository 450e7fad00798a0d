"""The report's figures, drawn with matplotlib (Agg) from a results document (``simulate --json`` shape).

Each ``plot_*`` function returns a Figure, or None when the document has nothing to draw for it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: the report is written by a CLI, often over ssh

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

VANILLA_COLOR = "#444444"
PALETTE = ("#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#d62728", "#8c564b", "#e377c2", "#17becf")


@dataclass
class Plot:
    """One rendered figure."""

    name: str  # file stem, e.g. "timeline"
    title: str
    png: bytes
    caption: str = ""


def label(model: str) -> str:
    """Display name of a model; the replayed vanilla is told apart from the recorded one."""
    return "vanilla (replayed)" if model == "vanilla" else model


def model_names(doc: dict[str, Any]) -> list[str]:
    return list((doc.get("models") or {}).keys())


def colors(doc: dict[str, Any]) -> dict[str, str]:
    """A stable color per series: vanilla grey, models in document order."""
    out = {"vanilla (recorded)": VANILLA_COLOR}
    for i, m in enumerate(model_names(doc)):
        out[label(m)] = PALETTE[i % len(PALETTE)]
    return out


def _fig(width: float = 8.0, height: float = 4.0) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _series(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, section) for vanilla and every model."""
    out: list[tuple[str, dict[str, Any]]] = [("vanilla (recorded)", doc.get("vanilla") or {})]
    out += [(label(m), sec or {}) for m, sec in (doc.get("models") or {}).items()]
    return out


def plot_timeline(doc: dict[str, Any]) -> Figure | None:
    """Cumulative remote shootdowns over time: vanilla as recorded vs each model."""
    tl = doc.get("timeline") or {}
    t = np.asarray(tl.get("t_s") or [], dtype=float)
    if t.size == 0:
        return None
    # `simulate --json` stores running totals at the end of each bin; per-bin counts are accepted too
    cumulative = bool(tl.get("cumulative", True))
    col = colors(doc)
    fig, ax = _fig()
    # the timeline's "vanilla" series is the recorded one; a replayed vanilla model has no series of its own
    for key, name in [("vanilla", "vanilla (recorded)"), *((m, m) for m in model_names(doc) if m != "vanilla")]:
        y = np.asarray(tl.get(key) or [], dtype=float)
        if y.size != t.size:
            continue
        y = y if cumulative else np.cumsum(y)
        ax.step(t, y, where="pre", label=name, color=col.get(name), lw=2.2 if key == "vanilla" else 1.6)
    ax.set_xlabel("time since start of trace (s)")
    ax.set_ylabel("remote TLB shootdowns (cumulative)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_per_cpu(doc: dict[str, Any]) -> Figure | None:
    """Shootdowns received per CPU, like the TLB row of /proc/interrupts."""
    series = [(n, np.asarray(s.get("per_cpu") or [], dtype=float)) for n, s in _series(doc)]
    series = [(n, v) for n, v in series if v.size]
    if not series:
        return None
    ncpu = max(v.size for _, v in series)
    # per_cpu is indexed by real CPU id; only the CPUs the trace involves get a bar
    cpus = np.asarray(doc.get("trace", {}).get("cpus_involved") or range(ncpu), dtype=np.int64)
    cpus = cpus[cpus < ncpu]
    col = colors(doc)
    fig, ax = _fig(max(6.0, min(16.0, 1.2 + 0.5 * cpus.size * len(series) / 2)), 3.8)
    width = 0.8 / len(series)
    x = np.arange(cpus.size)
    for i, (name, v) in enumerate(series):
        v = np.pad(v, (0, ncpu - v.size))[cpus]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, v, width, label=name, color=col.get(name))
    ax.set_xticks(x, [f"CPU{c}" for c in cpus])
    ax.set_ylabel("TLB shootdown interrupts")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(len(series), 4), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return fig


def plot_by_cause(doc: dict[str, Any]) -> Figure | None:
    """Remote shootdowns split by cause, one stacked bar per kernel (vanilla and each model)."""
    series = [(n, {k: float(v) for k, v in (s.get("by_cause") or {}).items()}) for n, s in _series(doc)]
    causes: list[str] = []
    for _, bc in series:
        causes += [k for k in bc if k not in causes]
    if not causes or not any(sum(bc.values()) for _, bc in series):
        return None
    fig, ax = _fig(8.5, 0.9 + 0.45 * len(series) + 0.18 * len(causes))
    y = np.arange(len(series))
    left = np.zeros(len(series))
    cmap = plt.get_cmap("tab20")
    for j, cause in enumerate(causes):
        v = np.array([bc.get(cause, 0.0) for _, bc in series])
        ax.barh(y, v, left=left, label=cause, color=cmap(j % 20))
        left += v
    ax.set_yticks(y, [n for n, _ in series])
    ax.invert_yaxis()
    ax.set_xlabel("remote TLB shootdowns")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def _hist(ax: Any, edges: Sequence[float], counts: Sequence[float], **kw: Any) -> bool:
    e = np.asarray([np.inf if x is None else x for x in edges], dtype=float)  # null: an open-ended last bin
    n = np.asarray(counts, dtype=float)
    if n.size == 0 or e.size != n.size + 1 or not n.sum():
        return False
    ax.stairs(n, e, **kw)
    if e[0] > 0 and e[-1] / e[0] > 100:
        ax.set_xscale("log")
    return True


def plot_realloc_delay(doc: dict[str, Any]) -> Figure | None:
    """Delay between a folio's unmap-and-free and the reallocation of its pages."""
    rd = doc.get("realloc_delay") or {}
    fig, ax = _fig(7.0, 3.6)
    if not _hist(ax, rd.get("bin_edges_s") or [], rd.get("counts") or [], fill=True, color=PALETTE[0], alpha=0.8):
        return None
    ax.set_xlabel("unmap → re-allocation delay (s)")
    ax.set_ylabel("pages")
    ax.grid(alpha=0.3)
    return fig


def plot_stale_window(doc: dict[str, Any]) -> Figure | None:
    """Per model: how long a stale translation could live (PTE clear → covering flush)."""
    col = colors(doc)
    fig, ax = _fig(7.0, 3.6)
    drawn = False
    for m, sec in (doc.get("models") or {}).items():
        sw = (sec or {}).get("stale_window") or {}
        h = sw.get("hist") or {}
        drawn |= _hist(
            ax, h.get("bin_edges_s") or [], h.get("counts") or [], label=label(m), color=col.get(label(m)), lw=1.6
        )
    if not drawn:
        return None
    ax.set_xlabel("stale window (s)")
    ax.set_ylabel("deferred CPU-slots")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_eligibility(doc: dict[str, Any]) -> Figure | None:
    """Unmapped folios: LUF-eligible vs rejected, by reason."""
    el = doc.get("eligibility") or {}
    rejected = {k: float(v) for k, v in (el.get("rejected") or {}).items()}
    bars = [("eligible", float(el.get("eligible") or 0)), *sorted(rejected.items(), key=lambda kv: -kv[1])]
    if not any(v for _, v in bars):
        return None
    fig, ax = _fig(7.5, 0.9 + 0.35 * len(bars))
    y = np.arange(len(bars))
    ax.barh(y, [v for _, v in bars], color=[PALETTE[1]] + [PALETTE[4]] * (len(bars) - 1))
    ax.set_yticks(y, [k if k == "eligible" else f"rejected: {k}" for k, _ in bars])
    ax.invert_yaxis()
    ax.set_xlabel("folios")
    ax.grid(axis="x", alpha=0.3)
    return fig


FIGURES: tuple[tuple[str, str, Callable[[dict[str, Any]], Figure | None], str], ...] = (
    (
        "timeline",
        "Shootdowns over time",
        plot_timeline,
        "Cumulative remote TLB shootdowns, vanilla as recorded vs each model.",
    ),
    (
        "per_cpu",
        "Shootdowns per CPU",
        plot_per_cpu,
        "Remote shootdowns received per CPU (the TLB row of /proc/interrupts).",
    ),
    ("by_cause", "Shootdowns by cause", plot_by_cause, "What triggered each remote shootdown, per kernel."),
    (
        "realloc_delay",
        "Unmap → re-allocation delay",
        plot_realloc_delay,
        "How long freed pages stayed free before the allocator handed them out again: the time LUF has to absorb a deferred flush.",
    ),
    (
        "stale_window",
        "Stale-window distribution",
        plot_stale_window,
        "Time from a deferred PTE clear to the flush that covers it, per model (risk R1).",
    ),
    (
        "eligibility",
        "LUF eligibility",
        plot_eligibility,
        "Folios unmapped by reclaim or migration: eligible for a deferred flush, or rejected and why.",
    ),
)


def render_all(doc: dict[str, Any], outdir: Path | None = None) -> list[Plot]:
    """Every figure that has data, as PNG bytes (also written to ``outdir/<name>.png`` when given)."""
    out: list[Plot] = []
    for name, title, fn, caption in FIGURES:
        fig = fn(doc)
        if fig is None:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        png = buf.getvalue()
        if outdir is not None:
            (outdir / f"{name}.png").write_bytes(png)
        out.append(Plot(name, title, png, caption))
    return out
