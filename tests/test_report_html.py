"""`lufreplay report`: the page renders in headless Chromium without errors and shows the headline numbers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lufreplay.report import html as report_html
from lufreplay.report import plots

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=5000",
]
#: Appended to a copy of the page: reports every image's load state into the DOM and the console.
IMAGE_PROBE = (
    "<script>window.addEventListener('load',()=>{const im=[...document.images];"
    "const ok=im.length>0&&im.every(i=>i.complete&&i.naturalWidth>0);"
    "document.body.setAttribute('data-images',im.length+':'+ok);console.log('IMAGEPROBE '+ok);});</script>"
)


def sample_doc(rng: np.random.Generator, wide: bool = False) -> dict[str, Any]:
    """A results document of the ``simulate --json`` shape, with random (not hard-coded) numbers."""
    t = np.linspace(0.0, 8.0, 33)
    vanilla = rng.poisson(200, t.size)
    edges = np.logspace(-6, 1, 15).tolist()
    doc: dict[str, Any] = {
        "trace": {"path": "/x/T", "run_id": f"run-{rng.integers(1e6)}", "duration_s": 8.0, "nr_cpus": 2,
                  "host": "h", "kernel": "6.18.44"},
        "options": {"credit_natural_flushes": False},
        "vanilla": {"remote_shootdowns": int(vanilla.sum()), "flush_events": int(vanilla.sum() // 2),
                    "per_cpu": [int(vanilla.sum() // 2), int(vanilla.sum() - vanilla.sum() // 2)],
                    "by_cause": {"batch": int(vanilla.sum() - 50), "immediate": 50}},
        "models": {},
        "fidelity": {"explained_pct": float(rng.uniform(95, 100)), "by_cause": {"batch": 99.0}},
        "eligibility": {"folios": 5000, "eligible": int(rng.integers(1000, 4000)), "rejected": {"large_folio": 900}},
        "realloc_delay": {"bin_edges_s": edges, "counts": rng.poisson(100, 14).tolist()},
        "timeline": {"t_s": t.tolist(), "vanilla": np.cumsum(vanilla).tolist()},
        "losses": {"total": 0, "bounded": False},
    }  # fmt: skip
    for name, lam in (("luf-v12", 10), ("luf-v11", 30), ("oracle", 3)):
        series = rng.poisson(lam, t.size)
        tot = int(series.sum())
        hi = tot + (int(vanilla.sum()) // 2 if wide and name == "luf-v12" else 1)
        doc["models"][name] = {
            "remote_shootdowns": tot,
            "remote_shootdowns_bounds": [tot, hi],
            "flush_events": tot,
            "cpus_flushed": tot,
            "avoided_pct": 100.0 * (1 - tot / vanilla.sum()),
            "by_cause": {"batch-nonLUF": tot // 2, "alloc-pcp": tot - tot // 2},
            "per_cpu": [tot // 2, tot - tot // 2],
            "stale_window": {"count": 100, "mean_s": 0.01, "p50_s": 0.001, "p99_s": 0.5, "max_s": 2.0,
                             "pending_at_end": 3,
                             "hist": {"bin_edges_s": edges, "counts": rng.poisson(20, 14).tolist()}},
        }  # fmt: skip
        doc["timeline"][name] = np.cumsum(series).tolist()
    return doc


class _ById(HTMLParser):
    """Text content of every element that has an id, and the attributes of <body>."""

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.attrs: dict[str, dict[str, str | None]] = {}
        self.body: dict[str, str | None] = {}
        self._stack: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag in ("img", "meta", "br", "link", "input"):
            return
        ident = a.get("id")
        if ident:
            self.text[ident] = ""
            self.attrs[ident] = a
        self._stack.append(ident)

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("img", "meta", "br", "link", "input") and self._stack:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        for ident in self._stack:
            if ident:
                self.text[ident] += data


def chromium(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp / 'chrome-profile'}", *extra, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def render(page: Path, tmp: Path) -> tuple[_ById, list[str]]:
    """Load a copy of ``page`` (plus the image probe) and return its DOM and its console messages."""
    probe = page.with_name("probe-" + page.name)
    probe.write_text(page.read_text().replace("</body>", IMAGE_PROBE + "</body>"))
    r = chromium(probe, tmp, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    dom = _ById()
    dom.feed(r.stdout)
    return dom, console


def page_errors(console: list[str]) -> list[str]:
    """Console lines other than the probe's own message: errors, warnings, uncaught exceptions."""
    return [line for line in console if "IMAGEPROBE" not in line]


def test_page_loads_and_shows_headline_numbers(tmp_path: Path) -> None:
    doc = sample_doc(np.random.default_rng(7))
    page = report_html.write_report(doc, tmp_path / "out")
    assert page == tmp_path / "out" / "report.html"
    dom, console = render(page, tmp_path)
    assert page_errors(console) == []
    assert any("IMAGEPROBE true" in line for line in console)
    n_images, ok = dom.body["data-images"].split(":")  # type: ignore[union-attr]
    assert ok == "true" and int(n_images) == len(plots.FIGURES)

    van = doc["vanilla"]["remote_shootdowns"]
    assert dom.text["shootdowns-vanilla"].strip() == f"{van:,}"
    assert "vanilla" in dom.text["headline-vanilla"]
    for m, sec in doc["models"].items():
        assert m in dom.text[f"headline-{m}"]
        assert dom.text[f"avoided-{m}"].strip() == f"{sec['avoided_pct']:.1f}%"
        assert float(dom.attrs[f"avoided-{m}"]["data-value"] or "nan") == pytest.approx(sec["avoided_pct"])
        assert dom.text[f"shootdowns-{m}"].strip() == f"{sec['remote_shootdowns']:,}"
    assert "bounds-warning" not in dom.text and "bounds-ok" in dom.text
    assert doc["trace"]["run_id"] in dom.text["trace-table"]
    # one PNG per figure next to the page, and the page needs nothing else
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == sorted(f"{name}.png" for name, *_ in plots.FIGURES)
    html = page.read_text()
    assert not re.search(r'(src|href)="(?!data:)', html)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == doc


def test_wide_bounds_show_a_visible_warning(tmp_path: Path) -> None:
    doc = sample_doc(np.random.default_rng(3), wide=True)
    doc["losses"] = {"total": 1234, "bounded": False}
    page = report_html.write_report(doc, tmp_path / "out")
    dom, console = render(page, tmp_path)
    assert page_errors(console) == []
    warning = dom.text["bounds-warning"]
    lo, hi = doc["models"]["luf-v12"]["remote_shootdowns_bounds"]
    assert f"{lo:,}" in warning and f"{hi:,}" in warning and "luf-v11" not in warning
    assert "1,234 events were lost" in warning


def test_checker_catches_a_broken_page(tmp_path: Path) -> None:
    """The console check is real: a script error and a broken image are reported."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="data:image/png;base64,AAAA"><script>undefinedFn();</script></body></html>')
    dom, console = render(bad, tmp_path)
    assert any("undefinedFn" in line for line in page_errors(console))
    assert dom.body["data-images"] == "1:false"


def test_screenshot_is_not_blank(tmp_path: Path) -> None:
    from matplotlib.image import imread

    page = report_html.write_report(sample_doc(np.random.default_rng(11)), tmp_path / "out")
    shot = tmp_path / "shot.png"
    r = chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,2400")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = imread(shot)
    assert img.shape[0] == 2400 and img.shape[1] == 1200
    # text and plots: many distinct colours, not a white page
    assert len(np.unique(img.reshape(-1, img.shape[2])[:, :3], axis=0)) > 50


def test_figures_skip_empty_sections() -> None:
    doc = sample_doc(np.random.default_rng(5))
    doc["realloc_delay"] = {"bin_edges_s": [], "counts": []}
    doc["eligibility"] = {"folios": 0, "eligible": 0, "rejected": {}}
    names = [p.name for p in plots.render_all(doc)]
    assert "realloc_delay" not in names and "eligibility" not in names and "timeline" in names


def test_report_errors_are_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "lufreplay", "report", str(tmp_path / "missing"), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lufreplay: error: ") and "missing" in lines[0], r.stderr


def synthetic_trace(path: Path) -> Path:
    """A small trace: one two-thread process whose read-only file folios are reclaimed in batches."""
    from scenarios import Scenario

    s = Scenario(nr_cpus=2)
    mm, pid, tid = 0xAA, 100, 101
    s.run_on(0, 0, pid, pid, mm)
    s.run_on(10, 1, tid, pid, mm)
    s.maps(20, pid, 0, 0x7F0000000000, 0x7F0000000000 + (64 << 12), "r--s")
    t = 1_000_000
    for i in range(40):
        s.reclaim(t, 0, pid, pid, 2)  # memcg_begin
        s.reclaim_folio(t + 10, 0, pid, pid, pfn=5000 + i, mm_ids=[mm], index=i)
        s.batch_flush(t + 100, 0, pid, pid, [1])
        s.free(t + 200, 0, pid, pid, pfn=5000 + i)
        s.reclaim(t + 300, 0, pid, pid, 3)  # memcg_end
        s.alloc(t + 400_000, 0, pid, pid, pfn=5000 + i)
        t += 1_000_000
    return s.write(path)


def test_report_command_matches_simulate_json(tmp_path: Path) -> None:
    trace = synthetic_trace(tmp_path / "T")
    sim = subprocess.run(
        [sys.executable, "-m", "lufreplay", "simulate", str(trace), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert sim.returncode == 0, sim.stderr
    doc = json.loads(sim.stdout)
    assert doc["vanilla"]["remote_shootdowns"] > 0
    r = subprocess.run(
        [sys.executable, "-m", "lufreplay", "report", str(trace), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    page = Path(r.stdout.strip())
    assert page == tmp_path / "out" / "report.html"
    dom, console = render(page, tmp_path)
    assert page_errors(console) == []
    assert dom.body["data-images"].endswith(":true")  # type: ignore[union-attr]
    assert dom.text["shootdowns-vanilla"].strip() == f"{doc['vanilla']['remote_shootdowns']:,}"
    ids = {m: report_html.slug(m) for m in doc["models"]}
    assert len(set(ids.values()) | {"vanilla"}) == len(ids) + 1  # the replayed vanilla has its own ids
    for m, sec in doc["models"].items():
        assert f"headline-{ids[m]}" in dom.text
        assert dom.text[f"avoided-{ids[m]}"].strip() == f"{sec['avoided_pct']:.1f}%"
        assert dom.text[f"shootdowns-{ids[m]}"].strip() == f"{sec['remote_shootdowns']:,}"
