"""`lufreplay sweep` on a real local Ray instance: every bundled trace × two options with two values each.

One sweep (with a bad trace path among the good ones) runs once for the module; the tests read its table,
its JSON and its page. The page is checked in headless Chromium like the report's.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_report_html import chromium, page_errors, render

from lufreplay.fleet.sweep import parse_grid, run_one

REPO = Path(__file__).resolve().parent.parent
TRACES = sorted(p for p in (REPO / "traces").iterdir() if (p / "meta.json").is_file())
#: two options of the model with two values each (`simulate --list-options`)
GRID = {"clip_to_recorded": ["true", "false"], "alloc_order": ["luf", "recorded"]}
MODEL = "luf-v12"


def _strict(s: str) -> Any:
    def bad(c: str) -> None:
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(s, parse_constant=bad)


def lufreplay(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "-m", "lufreplay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    out = tmp_path_factory.mktemp("sweep")
    bad = out / "no-such-trace"
    sets = [a for name, vals in GRID.items() for a in ("--set", f"{name}={','.join(vals)}")]
    r = lufreplay("sweep", *map(str, TRACES), str(bad), *sets, "-m", MODEL, "-o", str(out / "o"), "--json")
    return r, out / "o", bad


def test_bundled_traces_exist() -> None:
    assert len(TRACES) >= 2


def test_every_task_has_its_rows_and_a_bad_trace_fails_alone(sweep: Any) -> None:
    r, out, bad = sweep
    assert r.returncode == 1, r.stderr[-3000:]  # some task failed
    table = pq.read_table(out / "results.parquet")
    rows = table.to_pylist()
    combos = [dict(zip(GRID, c, strict=True)) for c in itertools.product(*GRID.values())]
    ok = [x for x in rows if x["error"] is None]
    failed = [x for x in rows if x["error"] is not None]
    # every good (trace × combination) once, for the requested model
    got = sorted((x["trace_path"], json.dumps(x["options"], sort_keys=True), x["model"]) for x in ok)
    want = sorted((str(t), json.dumps(c, sort_keys=True), MODEL) for t in TRACES for c in combos)
    assert got == want
    # the bad path: one error row per combination, reported on stderr one line each, nothing else failed
    assert sorted(json.dumps(x["options"], sort_keys=True) for x in failed) == sorted(
        json.dumps(c, sort_keys=True) for c in combos
    )
    assert all(x["trace_path"] == str(bad) and "no such trace" in x["error"] for x in failed)
    fail_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("lufreplay: task failed:")]
    assert len(fail_lines) == len(combos) and all(str(bad) in ln for ln in fail_lines)
    assert f"{len(ok)}/{len(ok) + len(failed)} tasks done, {len(failed)} failed" in r.stderr
    assert "Traceback" not in r.stderr
    n = len(ok) + len(failed)  # progress: stderr is no terminal here, so one line per finished task
    assert [ln.split()[1] for ln in r.stderr.splitlines() if ln.startswith("sweep: ")] == [
        f"{i}/{n}" for i in range(1, n + 1)
    ]
    for x in ok:
        assert x["remote_shootdowns_lo"] <= x["remote_shootdowns"] <= x["remote_shootdowns_hi"]
        assert x["recorded_shootdowns"] > 0
        want_pct = 100.0 * (1 - x["remote_shootdowns"] / x["recorded_shootdowns"])
        assert x["avoided_pct"] == pytest.approx(want_pct, abs=1e-3)
        assert 0.0 <= x["fidelity_explained_pct"] <= 100.0


def test_a_row_is_what_simulate_says(sweep: Any) -> None:
    """The sweep's numbers are those of the simulate library path for the same trace and options."""
    _, out, _ = sweep
    trace = min(TRACES, key=lambda t: sum(f.stat().st_size for f in t.rglob("*.parquet")))
    combo = {"clip_to_recorded": "false", "alloc_order": "recorded"}
    doc = run_one(str(trace), combo, [MODEL])
    rows = [
        x
        for x in pq.read_table(out / "results.parquet").to_pylist()
        if x["trace_path"] == str(trace) and x["options"] == combo
    ]
    assert len(rows) == 1
    m = doc["models"][MODEL]
    assert rows[0]["remote_shootdowns"] == m["remote_shootdowns"]
    assert [rows[0]["remote_shootdowns_lo"], rows[0]["remote_shootdowns_hi"]] == m["remote_shootdowns_bounds"]
    assert rows[0]["avoided_pct"] == m["avoided_pct"]
    assert rows[0]["recorded_shootdowns"] == doc["vanilla"]["remote_shootdowns"]
    assert rows[0]["fidelity_explained_pct"] == doc["fidelity"]["explained_pct"]


def test_json_is_strict_and_the_same_rows(sweep: Any) -> None:
    r, out, _ = sweep
    rows = _strict(r.stdout)
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert len(rows) == len(table)
    key = lambda x: (x["trace_path"], json.dumps(x["options"], sort_keys=True), x["model"] or "")  # noqa: E731
    for a, b in zip(sorted(rows, key=key), sorted(table, key=key), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float) or isinstance(b[k], float):
                assert a[k] == pytest.approx(b[k]), k
            else:
                assert a[k] == b[k], k


def test_page_renders_effect_spread_and_failures(sweep: Any, tmp_path: Path) -> None:
    _, out, bad = sweep
    page = out / "index.html"
    dom, console = render(page, tmp_path)
    assert page_errors(console) == []
    n_images, loaded = dom.body["data-images"].split(":")  # type: ignore[union-attr]
    assert loaded == "true" and int(n_images) == len(GRID) + 1  # one effect figure per option, one spread figure
    combos = int(np.prod([len(v) for v in GRID.values()]))
    assert dom.attrs["sweep-summary"]["data-tasks"] == str((len(TRACES) + 1) * combos)
    assert dom.attrs["sweep-summary"]["data-failed"] == str(combos)
    assert str(bad) in dom.text["failures"]
    for name, vals in GRID.items():
        txt = dom.text[f"effect-{name}"]
        assert all(v in txt for v in vals) and MODEL in txt
    # the effect cells are the table's numbers: mean avoided % per value, and the change paired per trace
    rows = [x for x in pq.read_table(out / "results.parquet").to_pylist() if x["error"] is None]
    for name, vals in GRID.items():
        for v in vals:
            mine = [x for x in rows if x["options"][name] == v]
            got = float(dom.attrs[f"avoided-{name}-{MODEL}-{v}"]["data-mean"] or "nan")
            assert got == pytest.approx(np.mean([x["avoided_pct"] for x in mine]))

        def others(x: dict[str, Any], name: str = name) -> tuple[str, str]:
            return x["trace_path"], json.dumps({k: w for k, w in x["options"].items() if k != name}, sort_keys=True)

        base = {others(x): x["avoided_pct"] for x in rows if x["options"][name] == vals[0]}
        diffs = [x["avoided_pct"] - base[others(x)] for x in rows if x["options"][name] == vals[1]]
        assert len(diffs) == len(rows) // len(vals)
        got = float(dom.attrs[f"change-{name}-{MODEL}-{vals[1]}"]["data-mean"] or "nan")
        assert got == pytest.approx(np.mean(diffs))
    for t in TRACES:
        assert t.name in dom.text["spread-table"]
    assert dom.text["results-table"].count(MODEL) == len(TRACES) * combos
    html = page.read_text()
    assert 'src="data:image/png;base64,' in html and "<script" not in html


def test_page_screenshot_is_not_blank(sweep: Any, tmp_path: Path) -> None:
    from matplotlib.image import imread

    _, out, _ = sweep
    shot = tmp_path / "shot.png"
    r = chromium(out / "index.html", tmp_path, f"--screenshot={shot}", "--window-size=1200,2400")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = imread(shot)
    assert img.shape[:2] == (2400, 1200)
    assert len(np.unique(img.reshape(-1, img.shape[2])[:, :3], axis=0)) > 50


def test_grid_is_the_product_of_the_values() -> None:
    g = parse_grid(["clip_to_recorded=true,false", "alloc_order=luf,recorded", "pcp_strikes=1,2,3"])
    assert len(g) == 12 and len({json.dumps(c, sort_keys=True) for c in g}) == 12
    assert {c["pcp_strikes"] for c in g} == {"1", "2", "3"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "no_such_option=1,2"], "no_such_option"),
        (["--set", "alloc_order=luf,sideways"], "sideways"),
        (["--set", "alloc_order=luf", "--set", "alloc_order=recorded"], "given twice"),
        (["-m", "luf-v99"], "luf-v99"),
        (["--set", "alloc_order=luf,recorded", "--address", "127.0.0.1:1"], "cannot reach Ray at 127.0.0.1:1"),
    ],
)
def test_bad_input_is_a_one_line_error_before_any_replay(args: list[str], needle: str, tmp_path: Path) -> None:
    r = lufreplay("sweep", str(TRACES[0]), *args, "-o", str(tmp_path / "o"), timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("lufreplay: error: "), r.stderr
    assert needle in lines[0]
    assert not (tmp_path / "o").exists()


def test_missing_ray_is_a_one_line_error(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"  # what `import ray` sees when the extra is not installed
        "from lufreplay.cli import main\n"
        f"sys.argv = ['lufreplay', 'sweep', {str(TRACES[0])!r}, '--set', 'alloc_order=luf,recorded', '-o', "
        f"{str(tmp_path / 'o')!r}]\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "lufreplay[fleet]" in lines[0] and "Ray" in lines[0]


def test_a_sweep_of_traces_only_has_no_options_column(tmp_path: Path) -> None:
    """No --set: one combination (the defaults) per trace; Parquet cannot hold a struct without fields."""
    from lufreplay.fleet.sweep import SweepResult, write_results

    assert parse_grid([]) == [{}]
    rows = [
        {"trace": "T", "trace_path": "/x/T", "options": {}, "model": MODEL, "remote_shootdowns": 3, "error": None},
        {"trace": "U", "trace_path": "/x/U", "options": {}, "model": None, "error": "TraceError: /x/U: no such trace"},
    ]
    table, page = write_results(SweepResult(rows=rows, option_names=[], tasks=2, failed=1), tmp_path)
    t = pq.read_table(table)
    assert "options" not in t.column_names and t.column("remote_shootdowns").to_pylist() == [3, None]
    assert "/x/U" in page.read_text()
