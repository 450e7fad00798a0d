"""Any CPU count: the variable-width ``ipi.targets`` column (format 2, version-1 traces converted on read), the
recorder's decoding of cpumasks wider than 64 CPUs, and the replay's dense CPU relabelling (a trace of CPUs 0 and
100 of a 200-CPU host replays exactly like its 2-CPU original; a 4096-CPU host replays). More than 64 involved
CPUs: tests/test_wide_replay.py."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from scenarios import Scenario, random_scenario
from typer.testing import CliRunner

from lufreplay import schema
from lufreplay.capture import decode
from lufreplay.cli import app
from lufreplay.report.simulate_cmd import simulate
from lufreplay.trace.reader import open_trace
from lufreplay.trace.validate import TraceError
from lufreplay.trace.writer import TraceWriter

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
_WRITTEN = {"format", "format_version", "segments", "rows", "complete", "segment_manifests"}


def relabel(src: Path, dst: Path, cpu_of: dict[int, int], nr_cpus: int, idle: tuple[int, ...] = ()) -> Path:
    """A copy of trace ``src`` recorded on CPUs ``cpu_of[c]`` of an ``nr_cpus``-CPU host: every CPU column, the
    ipi target lists, host.nr_cpus, and the per-CPU counters (rows for every CPU of the host, as
    /proc/interrupts has; 0 for the CPUs the original host did not have). CPUs ``idle`` take part by idling:
    one idle-to-idle switch each at the first context switch of the trace (they load no mm and are never a
    target, so they change nothing the models do)."""
    tr = open_trace(src)
    lut = np.full(max(cpu_of) + 1, -1, np.int64)
    for a, b in cpu_of.items():
        lut[a] = b
    meta = {k: copy.deepcopy(v) for k, v in tr.meta.items() if k not in _WRITTEN}
    host = meta.setdefault("host", {})
    host.update(nr_cpus=nr_cpus, cpus_online=f"0-{nr_cpus - 1}", cpus_possible=f"0-{nr_cpus - 1}")
    if "nr_cpus" in meta:
        meta["nr_cpus"] = nr_cpus
    w = TraceWriter(dst, meta)

    def cpus(a: pa.ChunkedArray | pa.Array, typ: pa.DataType) -> pa.Array:
        v = np.asarray(a.to_numpy(zero_copy_only=False), np.int64)
        return pa.array(np.where(v >= 0, lut[np.maximum(v, 0)], v), typ)

    for i in range(tr.n_segments):
        for name in schema.TABLES:
            files = tr.files.get(name, [])
            if i >= len(files):
                continue
            t = tr.read_file(files[i])
            for c in ("cpu", "target_cpu"):
                if c in t.column_names:
                    t = t.set_column(
                        t.column_names.index(c), t.schema.field(c), cpus(t.column(c), t.schema.field(c).type)
                    )
            if name == "ipi":
                lists = t.column("targets").combine_chunks()
                new = pa.ListArray.from_arrays(lists.offsets, cpus(lists.values, pa.uint16()))
                t = t.set_column(t.column_names.index("targets"), t.schema.field("targets"), new)
            if name == "counters":
                t = _all_cpus(t, nr_cpus)
            if name == "sched" and i == 0 and idle:
                t = _with_idle(t, idle)
            w.add(name, t)
        if i < tr.n_segments - 1:
            w.rotate()
    w.close()
    return dst


def _with_idle(t: pa.Table, idle: tuple[int, ...]) -> pa.Table:
    """``t`` (a sched table) with an idle-to-idle switch on each CPU of ``idle`` at its first row's time."""
    first = t.slice(0, 1).to_pylist()[0]
    rows = [{**first, "cpu": c, "pid": 0, "tgid": 0, "next_pid": 0, "prev_kthread": False} for c in idle]
    extra = pa.Table.from_pylist(rows, schema=t.schema)
    return pa.concat_tables([extra, t])


def _all_cpus(t: pa.Table, nr_cpus: int) -> pa.Table:
    """Counter snapshots with a row for every CPU of the host in each per-CPU group (value 0 where missing)."""
    df = t.to_pandas()
    per = df[df["cpu"] >= 0]
    extra = []
    for _, g in per.groupby(["ts_ns", "phase", "source", "name"], sort=False):
        have = set(g["cpu"])
        for c in range(nr_cpus):
            if c not in have:
                r = g.iloc[0].copy()
                r["cpu"], r["value"] = c, 0
                extra.append(r)
    if extra:
        import pandas as pd

        df = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
    cols = {c.name: df[c.name].to_numpy() for c in schema.COUNTERS.columns}
    return schema.from_columns("counters", cols)


def _expected(doc: dict[str, Any], cpu_of: dict[int, int], nr_cpus: int) -> dict[str, Any]:
    """The results document of the original with every per-CPU output moved to the relabelled CPU ids."""
    d = copy.deepcopy(doc)

    def move(v: list[int]) -> list[int]:
        out = [0] * nr_cpus
        for c, x in enumerate(v):
            out[cpu_of[c]] = x
        return out

    d["vanilla"]["per_cpu"] = move(d["vanilla"]["per_cpu"])
    for m in d["models"].values():
        m["per_cpu"] = move(m["per_cpu"])
    for p in d["fidelity"]["per_cpu"]:
        p["cpu"] = cpu_of[p["cpu"]]
    d["trace"]["cpus_involved"] = [cpu_of[c] for c in d["trace"]["cpus_involved"]]
    return d


COMPARED = ("vanilla", "models", "fidelity", "eligibility", "realloc_delay", "timeline", "losses")


def _same_results(a: dict[str, Any], b: dict[str, Any]) -> None:
    for k in COMPARED:
        assert a[k] == b[k], k
    assert a["replay"]["raw_events"] == b["replay"]["raw_events"] > 0
    assert a["replay"]["model_ops"] == b["replay"]["model_ops"]


# ---- the format ----------------------------------------------------------------------------------------------


def test_version_1_target_mask_reads_as_target_lists() -> None:
    """A bundled (format 1) trace's uint64 target_mask comes back as the CPU-id lists of format 2."""
    tr = open_trace(REPO / "traces" / "mmap-stream")
    assert tr.version == 1 and schema.FORMAT_VERSION == 2
    t = tr.table("ipi")
    raw = pq.read_table(tr.files["ipi"][0], columns=["target_mask"]).column("target_mask").to_pylist()
    got = t.column("targets").to_pylist()
    assert len(got) == len(raw) > 1000
    assert got == [[c for c in range(64) if m >> c & 1] for m in raw]
    assert pc.sum(pc.list_value_length(t.column("targets"))).as_py() == pc.sum(t.column("nr_targets")).as_py()


def test_target_beyond_host_cpus_is_a_one_line_error(tmp_path: Path) -> None:
    s = Scenario(nr_cpus=200)
    s._task("ipi", 10, 0, 1, 1, kind=1, targets=[1, 150], nr_targets=2, callback="f")
    s._task("ipi", 20, 0, 1, 1, kind=1, targets=[3, 199], nr_targets=2, callback="f")
    good = s.write(tmp_path / "good")
    assert open_trace(good).table("ipi").column("targets").to_pylist() == [[1, 150], [3, 199]]
    s = Scenario(nr_cpus=150)
    s._task("ipi", 10, 0, 1, 1, kind=1, targets=[1, 150], nr_targets=2, callback="f")
    bad = s.write(tmp_path / "bad")
    with pytest.raises(TraceError) as e:
        open_trace(bad)
    msg = str(e.value)
    assert "\n" not in msg and "column targets row 0" in msg and "[1, 150]" in msg and "< 150" in msg


# ---- the recorder's decoding ---------------------------------------------------------------------------------


def _recs(kinds: list[str], ts: list[int], cpu: list[int], a: list[int], x: list[int]) -> np.ndarray:
    r = np.zeros(len(kinds), schema.RAW_RECORD)
    r["kind"] = [schema.RAW_KIND[k] for k in kinds]
    r["ts"], r["cpu"], r["a"], r["x"] = ts, cpu, a, x
    return r


def test_decode_joins_mask_words_of_a_wide_cpumask() -> None:
    """ipi_send_cpu carries the CPU id; ipi_send_cpumask carries CPUs 0-63 and the popcount, and its
    ipi_mask_words records (same cpu and ts, written before it) the higher words; a words record whose head is
    in the next ring drain waits for it."""
    words = _recs(["ipi_mask_words"] * 2, [20, 50], [3, 3], [1 << 36, 1 << 63], [1, 126])
    words["e"][0] = 1  # word 5: CPU 320
    words["b"][1] = 1  # word 127: CPU 8128
    r = _recs(
        ["ipi_send_cpu", "ipi_send_cpumask", "ipi_send_cpumask"],
        [10, 20, 30],
        [1, 3, 0],
        [4000, 0b101, 1 << 63],
        [1, 4, 1],
    )
    ctx = decode.DecodeContext()
    assert decode.decode(words[:1], ctx) == {} and len(ctx.ipi_words) == 1  # a drain of words only: they wait
    out = decode.decode(np.concatenate([r[:1], r[1:], words[1:]]), ctx)["ipi"]
    assert out.column("targets").to_pylist() == [[4000], [0, 2, 100, 320], [63]]
    assert out.column("nr_targets").to_pylist() == [1, 4, 1]
    assert out.column("kind_name").to_pylist() == ["send_cpu", "send_cpumask", "send_cpumask"]
    assert len(ctx.ipi_words) == 1  # ts 50 on CPU 3: its head has not come yet
    lost = _recs(["ipi_mask_words"], [40], [3], [1], [1])  # its head was lost (ring full): a later head of CPU 3
    nxt = decode.decode(np.concatenate([lost, _recs(["ipi_send_cpumask"], [50], [3], [0], [2])]), ctx)["ipi"]
    assert nxt.column("targets").to_pylist() == [[8127, 8128]] and len(ctx.ipi_words) == 0


# ---- the replay ----------------------------------------------------------------------------------------------


def test_bundled_trace_on_cpus_0_and_100_of_200_gives_the_same_results(tmp_path: Path) -> None:
    src = REPO / "traces" / "mmap-stream"
    cpu_of = {0: 0, 1: 100}
    dst = relabel(src, tmp_path / "wide", cpu_of, 200)
    tr = open_trace(dst)
    assert tr.version == 2 and tr.nr_cpus == 200
    assert set(pc.unique(tr.table("shootdown").column("target_cpu")).to_pylist()) == {0, 100}
    a, _ = simulate(src)
    b, res = simulate(dst)
    assert res.ncpu == 2 and list(res.cpus.real) == [0, 100]
    assert b["trace"]["nr_cpus"] == 200 and b["trace"]["cpus_involved"] == [0, 100]
    assert a["vanilla"]["remote_shootdowns"] > 1000 and a["models"]["luf-v12"]["per_cpu"][1] > 0
    _same_results(_expected(a, cpu_of, 200), b)
    assert b["fidelity"]["per_cpu"][1]["cpu"] == 100


def test_generated_4096_cpu_trace_replays_like_its_4_cpu_original(tmp_path: Path) -> None:
    s = random_scenario(random.Random(11), 120, 4)
    src = s.write(tmp_path / "four")
    cpu_of = {0: 7, 1: 1000, 2: 2048, 3: 4095}
    dst = relabel(src, tmp_path / "wide", cpu_of, 4096)
    a, _ = simulate(src)
    b, res = simulate(dst)
    assert res.ncpu == 4 and res.host_cpus == 4096
    assert a["vanilla"]["remote_shootdowns"] > 0
    _same_results(_expected(a, {c: cpu_of[c] for c in range(4)}, 4096), b)


def test_decisions_name_real_cpus(tmp_path: Path) -> None:
    s = random_scenario(random.Random(3), 80, 3)
    src = s.write(tmp_path / "three")
    cpu_of = {0: 0, 1: 64, 2: 300}
    dst = relabel(src, tmp_path / "wide", cpu_of, 301)
    out = {}
    for name, path in (("a", src), ("b", dst)):
        r = runner.invoke(app, ["simulate", str(path), "--out", str(tmp_path / f"dec-{name}"), "--json"])
        assert r.exit_code == 0, r.output
        out[name] = pq.read_table(tmp_path / f"dec-{name}" / "decisions.parquet").to_pydict()
    a, b = out["a"], out["b"]
    assert len(a["cpu"]) == len(b["cpu"]) > 0
    assert b["cpu"] == [cpu_of[c] if c >= 0 else c for c in a["cpu"]]
    assert b["targets"] == [[cpu_of[c] for c in t] for t in a["targets"]]
    assert any(300 in t for t in b["targets"])


def test_info_reconciles_a_wide_trace_per_real_cpu(tmp_path: Path) -> None:
    src = REPO / "traces" / "compact"
    dst = relabel(src, tmp_path / "wide", {0: 3, 1: 250}, 256)
    docs = []
    for path in (src, dst):
        r = runner.invoke(app, ["info", str(path), "--json"])
        assert r.exit_code == 0, r.output
        docs.append(json.loads(r.stdout)["reconciliation"]["tlb_shootdowns"])
    a, b = docs
    assert len(b["recorded"]) == len(b["proc_interrupts"]) == 256
    for k in ("recorded", "proc_interrupts"):
        assert [b[k][3], b[k][250]] == a[k] and sum(b[k]) == sum(a[k]) > 0
    assert b["max_rel_error"] == a["max_rel_error"]
