"""The fast replay front end: raw ops built in bulk equal a row-by-row construction; ids; prefetch; buffers."""

from __future__ import annotations

import copy
import random
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scenarios import Scenario, random_scenario

from lufreplay import schema
from lufreplay.model import MODELS
from lufreplay.model import ops as O
from lufreplay.model.options import parse_settings
from lufreplay.replay.engine import ReplayResult, replay
from lufreplay.replay.rawops import EVENT_TABLES, KIND, IdMap, Ids, PfnMap, RawBuilder, read_segments
from lufreplay.report.simulate_cmd import simulate, write_decisions
from lufreplay.trace.reader import TraceError, open_trace

U64 = 1 << 64


def _random_table(name: str, rng: np.random.Generator, n: int, t0: int) -> pa.Table:
    """Random rows of every column of ``name``; timestamps from a small range so tables tie often."""
    cols: dict[str, np.ndarray | list] = {}
    for c in schema.TABLES[name].columns:
        t = c.type
        if c.name == "ts_ns":
            cols[c.name] = np.sort(rng.integers(t0, t0 + 40, n))
        elif c.name == "cpu":
            cols[c.name] = rng.integers(0, 70, n)  # beyond 63: clipped to MAX_CPUS - 1
        elif c.name in ("pid", "tgid", "next_pid"):
            cols[c.name] = rng.choice([0, 7, 9, 1 << 22, 2_000_000_000], n)
        elif pa.types.is_boolean(t):
            cols[c.name] = rng.random(n) < 0.5
        elif pa.types.is_string(t) or pa.types.is_dictionary(t):
            cols[c.name] = ["x"] * n
        elif pa.types.is_integer(t):
            bits = t.bit_width
            if pa.types.is_signed_integer(t):
                cols[c.name] = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), n, dtype=np.int64)
            else:
                hi = (1 << bits) - 1
                cols[c.name] = rng.integers(0, min(hi, (1 << 63) - 1), n, dtype=np.uint64)
                cols[c.name][: n // 4] = hi  # the top of the range: uint64 → int64 must keep the bits
        else:
            cols[c.name] = np.zeros(n)
    if name in ("page_cache", "file"):
        cols["dev"] = rng.integers(0, 3, n, dtype=np.uint64)
        cols["ino"] = rng.choice([5, 6, (1 << 40) + 5], n).astype(np.uint64)  # ino beyond 40 bits folds
    if name in ("unmap", "mm"):
        cols["mm_id"] = rng.choice([3, 0xFFFF_FFFF, 12345], n).astype(np.uint64)
    return schema.from_columns(name, cols)


def _s64(v: int) -> int:
    v %= U64
    return v - U64 if v >= 1 << 63 else v


def _expected(name: str, r: dict, ids: Ids) -> dict[str, int]:
    """One row's raw op written out by hand, field by field (independent of the vectorised builder)."""

    def task(pid: int) -> int:
        return ids.task.ids[pid] if pid > 0 else -1

    def fkey(dev: int, ino: int) -> int:
        return ids.mapping.ids[(dev << 40) | (ino & ((1 << 40) - 1))]

    e = {"ts": r["ts_ns"], "kind": KIND[name], "cpu": min(r["cpu"], O.MAX_CPUS - 1), "task": task(r["pid"])}
    e["proc"] = ids.proc.ids[r["tgid"]] if r["tgid"] > 0 else -1
    e |= dict.fromkeys(("sub", "a", "b", "c", "d", "e"), 0)
    if name == "tlb_flush":
        e |= {"sub": r["reason"], "a": r["pages"]}
    elif name == "shootdown":
        e |= {"a": r["target_cpu"]}
    elif name == "reclaim":
        e |= {"sub": r["event"], "a": r["pfn"]}
    elif name == "unmap":
        e |= {"a": ids.mm.ids[r["mm_id"]], "sub": r["member"], "b": r["delta"], "c": r["ctx"]}
    elif name == "pte":
        own = r["owner_tgid"]
        e |= {"sub": r["op"] | r["level"] << 4, "a": ids.proc.ids[own] if own > 0 else -1, "d": _s64(r["addr"])}
        e["b"] = int(r["writable"]) | int(r["dirty"]) << 1
    elif name == "page_cache":
        e |= {"a": r["pfn"], "b": r["order"], "c": fkey(r["dev"], r["ino"]), "d": _s64(r["index"]), "sub": r["ctx"]}
    elif name == "migrate":
        c = r["mig_type"] | r["writable"] << 4 | r["dirty"] << 5 | (r["mode"] & 0xF) << 8 | (r["reason"] & 0xF) << 12
        e |= {"sub": r["event"], "a": r["pfn"], "b": r["order"], "c": c, "d": _s64(r["addr"])}
    elif name == "page":
        e |= {"sub": r["event"], "a": r["pfn"], "b": r["order"], "c": r["source"] | r["percpu_refill"] << 8}
        e["d"] = _s64(r["gfp_flags"])
    elif name == "fault":
        e |= {"a": _s64(r["address"]), "sub": int(r["write"])}
    elif name == "syscall":
        dur = max(r["duration_ns"], 0)
        e |= {"sub": r["nr"], "e": dur if r["ret"] >= 0 else -dur - 1}
        e |= {k: _s64(r[f"arg{i}"]) for i, k in enumerate("abcd")}
    elif name == "file":
        e |= {"sub": r["event"], "a": fkey(r["dev"], r["ino"])}
    elif name == "sched":
        e |= {"a": task(r["next_pid"]), "sub": int(r["prev_kthread"])}
    elif name == "proc":
        e |= {"sub": r["event"], "a": int(r["pid"] == r["tgid"])}
    elif name == "mm":
        e |= {"a": ids.mm.ids[r["mm_id"]]}
    e["sub"] &= 0xFF
    return e


def test_raw_ops_equal_a_row_by_row_construction() -> None:
    """Every field of every table, uint64 bit patterns, CPU clipping, and the time order with ties broken by
    table order then row order, over two segments sharing the id maps."""
    rng = np.random.default_rng(3)
    ids = Ids()
    builder = RawBuilder(ids)
    for s in range(2):
        seg = {name: _random_table(name, rng, int(rng.integers(0, 60)), 1000 * s) for name in EVENT_TABLES}
        raw = builder.build(seg).copy()
        rows = []
        for ti, name in enumerate(EVENT_TABLES):
            for ri, r in enumerate(seg[name].to_pylist()):
                rows.append((r["ts_ns"], ti, ri, _expected(name, r, ids)))
        rows.sort(key=lambda x: x[:3])
        assert raw.shape[0] == len(rows) > 100
        for field in ("ts", "kind", "sub", "cpu", "task", "proc", "a", "b", "c", "d", "e"):
            assert raw[field].tolist() == [x[3][field] for x in rows], field


def test_idmap_hands_out_ids_in_key_order_per_call() -> None:
    m = IdMap()
    first = m.get(np.array([9, 3, 9, 1 << 40, 7], np.int64))  # large key: hashed path
    assert first.tolist() == [2, 0, 2, 3, 1]
    second = m.get(np.array([3, 12, 1, 9], np.int64))  # small keys: lookup-table path
    assert second.tolist() == [0, 5, 4, 2]
    third = m.get(np.array([-1, 12, 1 << 40], np.int64))  # negative key: hashed path, old ids kept
    assert third.tolist() == [6, 5, 3]
    assert m.ids == {3: 0, 7: 1, 9: 2, 1 << 40: 3, 1: 4, 12: 5, -1: 6}
    assert m.get(np.zeros(0, np.int64)).size == 0


def _results(path: Path, prefetch: bool, jobs: int = 1, scope: set[int] | None = None) -> dict:
    res = replay(
        open_trace(path), list(MODELS), parse_settings([]), decisions=True, prefetch=prefetch, jobs=jobs,
        scope_tgids=scope,
    )  # fmt: skip
    out: dict = {}
    for label, ms in (("", res.models), ("scope:", res.scoped)):
        for name, m in ms.items():
            c = m.counts()
            keep = ("by_cause", "misc", "hooks", "per_cpu", "stale_window", "timeline_bins")
            out[label + name] = {k: (v.tolist() if k == "timeline_bins" else v) for k, v in c.items() if k in keep}
            out[label + name]["decisions"] = m.decisions_array().tobytes()
    out["recon"] = res.recon_stats.tolist()
    out["sizes"] = (res.raw_events, res.model_ops)
    return out


def _four_segments(seed: int) -> Scenario:
    s = random_scenario(random.Random(seed), 150, 3)
    for rows in s.rows.values():
        rows.sort(key=lambda r: r.get("ts_ns", 0))
    page_ts = sorted(r["ts_ns"] for r in s.rows["page"])
    for q in (1, 2, 3):  # four segments, cut at times (segments line up across tables)
        cut = page_ts[q * len(page_ts) // 4]
        s.segment_marks.append({k: sum(1 for r in v if r.get("ts_ns", 0) < cut) for k, v in s.rows.items()})
    return s


def test_prefetch_gives_the_same_results_as_one_thread() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = _four_segments(11).write(Path(d) / "t")
        assert open_trace(path).n_segments == 4
        a, b = _results(path, True), _results(path, False)
    assert a["sizes"][0] > 0
    assert a == b


@pytest.mark.parametrize("seed", [11, 23])
def test_models_on_threads_give_the_same_results_as_one_job(seed: int) -> None:
    """jobs > 1 runs the models (host and scoped) on a thread pool while the next segment is reconstructed into
    the other buffer: every count, decision and timeline equals the one-thread replay's."""
    with tempfile.TemporaryDirectory() as d:
        path = _four_segments(seed).write(Path(d) / "t")
        procs = sorted({int(r["tgid"]) for r in _four_segments(seed).rows["unmap"] if "tgid" in r})
        scope = set(procs[: max(1, len(procs) // 2)])
        one = _results(path, False, jobs=1, scope=scope)
        for jobs in (2, 4):
            assert _results(path, True, jobs=jobs, scope=scope) == one
    assert set(one) >= {"luf-v12", "scope:luf-v12"}
    assert one["sizes"][1] > 0
    assert sum(one["vanilla"]["by_cause"].values()) > 0
    assert one["scope:vanilla"]["by_cause"] != one["vanilla"]["by_cause"]  # the scope really cut something


def test_prefetch_error_surfaces_and_stops_the_worker() -> None:
    s = random_scenario(random.Random(5), 60, 2)
    with tempfile.TemporaryDirectory() as d:
        path = s.write(Path(d) / "t")
        tr = open_trace(path)

        def segments() -> Iterator[dict[str, pa.Table]]:
            yield from read_segments(tr)
            raise TraceError("part-000001.parquet: unreadable Parquet segment (boom)")

        before = threading.active_count()
        with pytest.raises(TraceError, match="boom"):
            replay(tr, ["vanilla", "luf-v12"], parse_settings([]), segments=segments(), prefetch=True)
        assert threading.active_count() == before


def test_a_model_error_on_a_thread_surfaces_and_stops_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    from lufreplay.model.base import SafetyViolation

    real = MODELS["luf-v11"].run
    calls = []

    def failing(self: object, *a: object) -> None:
        calls.append(1)
        if len(calls) == 2:  # the second segment
            raise SafetyViolation("luf-v11: pfn 7 re-allocated (injected)")
        real(self, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(MODELS["luf-v11"], "run", failing)
    with tempfile.TemporaryDirectory() as d:
        path = _four_segments(5).write(Path(d) / "t")
        before = threading.active_count()
        with pytest.raises(SafetyViolation, match="injected"):
            replay(open_trace(path), list(MODELS), parse_settings([]), jobs=2)
        assert threading.active_count() == before
    assert len(calls) == 2  # the replay stopped at the failing segment


def _repeat(seg: dict[str, pa.Table], times: int, span: int) -> Iterator[dict[str, pa.Table]]:
    """The same segment ``times`` times, shifted in time, with pfns moved so each copy frees fresh pages."""
    for k in range(times):
        out = {}
        for name, t in seg.items():
            ts = t.column("ts_ns").to_numpy() + k * span
            out[name] = t.set_column(t.schema.get_field_index("ts_ns"), "ts_ns", pa.array(ts, pa.int64()))
        yield out


def test_per_segment_buffers_do_not_grow_with_the_number_of_segments() -> None:
    s = random_scenario(random.Random(2), 120, 2)
    with tempfile.TemporaryDirectory() as d:
        tr = open_trace(s.write(Path(d) / "t"))
        seg = next(read_segments(tr))
        span = int(max(t.column("ts_ns").to_numpy().max() for t in seg.values() if t.num_rows)) + 1
        got = {}
        for times in (2, 8):
            res = replay(tr, list(MODELS), parse_settings([]), segments=_repeat(seg, times, span))
            got[times] = (res.raw_events, res.stages["raw_buffer_bytes"], res.stages["reconstruct_bytes"])
    assert got[8][0] == 4 * got[2][0] > 0
    assert got[8][1:] == got[2][1:]


# ---- compact pfn ids ------------------------------------------------------------------------------------------
PFN_COLUMN_TABLES = ("reclaim", "migrate", "page_cache", "page")


def _relabel(s: Scenario, f: Callable[[int], int]) -> Scenario:
    """The same scenario with every pfn p ≥ 0 written as f(p)."""
    out = copy.deepcopy(s)
    for name in PFN_COLUMN_TABLES:
        for r in out.rows.get(name, []):
            if r.get("pfn", -1) >= 0:
                r["pfn"] = f(r["pfn"])
    return out


def _simulate(path: Path) -> tuple[dict, pa.Table, ReplayResult]:
    with tempfile.TemporaryDirectory() as d:
        doc, res = simulate(path, None, [], decisions=True)
        dec = pq.read_table(write_decisions(res, Path(d)))
    del doc["trace"]["path"], doc["replay"]["seconds"], doc["replay"]["events_per_s"]
    return doc, dec, res


def _scatter(p: int) -> int:
    """Each aligned group of 4 pfns (the scenarios' largest block) to its own 1024-pfn chunk, 2^22 chunks apart:
    the pfns span 2^37 pfns (512 TiB); dense per-pfn arrays would need tens of TB."""
    return ((p >> 2) << 32) | ((p & 3) + 512)


@pytest.mark.parametrize(
    "relabel", [lambda p: p + (1 << 30), _scatter], ids=["shifted_by_2^30", "scattered_over_512TiB"]
)
def test_relabelled_pfns_give_identical_results(relabel: Callable[[int], int]) -> None:
    """pfns are only labels: a trace and the same trace with every pfn shifted by a multiple of 1024 (or every
    block moved to a chunk of its own, far apart) give the same results document; the --out decisions carry the
    relabelled real pfns. The models' per-page arrays stay sized by the pages touched, not by the pfn range."""
    s = random_scenario(random.Random(9), 150, 3)
    with tempfile.TemporaryDirectory() as d:
        doc_a, dec_a, res_a = _simulate(s.write(Path(d) / "a"))
        doc_b, dec_b, res_b = _simulate(_relabel(s, relabel).write(Path(d) / "b"))
    assert doc_a == doc_b
    assert doc_a["models"]["luf-v12"]["remote_shootdowns"] + doc_a["vanilla"]["remote_shootdowns"] > 0
    pfn_a = dec_a.column("pfn").to_numpy()
    pfn_b = dec_b.column("pfn").to_numpy()
    real = pfn_a >= 0
    assert real.sum() >= 10  # decisions that name a pfn
    assert pfn_b[real].tolist() == [relabel(int(p)) for p in pfn_a[real]]
    assert (pfn_b[~real] == pfn_a[~real]).all()
    assert dec_a.drop(["pfn"]).equals(dec_b.drop(["pfn"]))
    # every page the scenario's blocks name gets one compact id, whatever the pfn range
    touched: set[int] = set()
    for name in PFN_COLUMN_TABLES:
        for r in s.rows.get(name, []):
            if r.get("pfn", -1) >= 0:
                n = 512 if name == "migrate" and r["event"] in (2, 3) else 1 << r.get("order", 0)
                touched.update(range(r["pfn"], r["pfn"] + n))
    for res in (res_a, res_b):
        assert res.pfns.n_slots == len(touched)
        assert max(m.pages.n for m in res.models.values()) == res.pfns.limit


def test_chunked_pfn_ids_give_the_same_results_as_the_scan() -> None:
    """Without the pfn scan, ids are handed out by aligned 1024-pfn chunks as the segments arrive: same results."""
    s = _relabel(random_scenario(random.Random(8), 150, 3), _scatter)
    page_ts = sorted(r["ts_ns"] for r in s.rows["page"])
    for rows in s.rows.values():
        rows.sort(key=lambda r: r.get("ts_ns", 0))
    for q in (1, 2):  # three segments: chunks first seen in a later segment grow the map and the page arrays
        cut = page_ts[q * len(page_ts) // 3]
        s.segment_marks.append({k: sum(1 for r in v if r.get("ts_ns", 0) < cut) for k, v in s.rows.items()})
    got = {}
    with tempfile.TemporaryDirectory() as d:
        path = s.write(Path(d) / "t")
        for scan in (True, False):
            res = replay(open_trace(path), list(MODELS), parse_settings([]), decisions=True, pfn_scan=scan)
            out: dict = {"recon": res.recon_stats.tolist(), "sizes": (res.raw_events, res.model_ops)}
            for name, m in res.models.items():
                c = m.counts()
                out[name] = {k: c[k] for k in ("by_cause", "misc", "hooks", "per_cpu", "stale_window")}
                dec = m.decisions_array().copy()
                dec["pfn"] = res.pfns.real(dec["pfn"])  # the compact ids differ, the real pfns may not
                out[name]["decisions"] = dec.tobytes()
            got[scan] = (out, res.pfns.n_slots)
    assert got[True][0] == got[False][0]
    assert got[True][0]["sizes"][0] > 0
    n_blocks = len({r["pfn"] >> 10 for t in PFN_COLUMN_TABLES for r in s.rows.get(t, []) if r.get("pfn", -1) >= 0})
    assert got[False][1] == 1024 * n_blocks > 10 * got[True][1]  # one chunk per block: the scan is denser


def _block_ids(m: PfnMap, pfn: int, order: int) -> list[int]:
    return m.compact(np.arange(pfn, pfn + (1 << order), dtype=np.int64), np.full(1 << order, order)).tolist()


@settings(max_examples=40, deadline=None)
@given(
    blocks=st.lists(
        st.tuples(st.integers(0, (1 << 30) - 1), st.integers(0, 10)).map(lambda b: ((b[0] >> b[1]) << b[1], b[1])),
        min_size=1,
        max_size=40,
    ),
    scan=st.booleans(),
)
def test_pfn_map_keeps_blocks_contiguous_and_maps_back(blocks: list[tuple[int, int]], scan: bool) -> None:
    """Scanned or handed out by chunks: every aligned block gets contiguous ids, distinct pages distinct ids, and
    ``real`` inverts ``compact``. Scanned: ids are exactly the pages touched, in pfn order."""
    start = np.array([p for p, _ in blocks], np.int64)
    order = np.array([o for _, o in blocks], np.int64)
    m = PfnMap.from_blocks(start, start + (1 << order)) if scan else PfnMap()
    pages: dict[int, int] = {}
    for p, o in blocks:
        ids = _block_ids(m, p, o)
        assert ids == list(range(ids[0], ids[0] + (1 << o)))
        assert 0 <= ids[0] and ids[-1] < m.n_slots
        for k, c in enumerate(ids):
            assert pages.setdefault(p + k, c) == c
    assert len(set(pages.values())) == len(pages)
    real = m.real(np.array(list(pages.values()), np.int64))
    assert real.tolist() == list(pages)
    assert m.compact(np.array([-1, -1]), np.zeros(2)).tolist() == [-1, -1]
    if scan:
        assert m.n_slots == len(pages)
        by_pfn = [pages[p] for p in sorted(pages)]
        assert by_pfn == sorted(by_pfn)


def test_pfn_map_fills_partly_scanned_chunks() -> None:
    """A pfn the scan did not see gets the uncovered rest of its 1024-pfn chunk, after the scanned ids."""
    m = PfnMap.from_blocks(np.array([5, 4096], np.int64), np.array([6, 4096 + 512], np.int64))
    assert m.n_slots == 513
    assert m.compact(np.array([4096 + 511, 5]), np.zeros(2)).tolist() == [512, 0]
    got = m.compact(np.array([7, 8192 + 3, 4]), np.zeros(3))
    # chunk 0: ids for [0, 5) then [6, 1024) after the scanned 513; chunk 8: all of [8192, 9216) after that
    assert got.tolist() == [513 + 5 + 1, 513 + 1023 + 3, 513 + 4]
    assert m.n_slots == 513 + 1023 + 1024  # chunk 4 ([4096, 5120)) is not completed: no new pfn lies in it
    assert m.real(np.array([519, 513 + 1023 + 3, 10**9])).tolist() == [7, 8192 + 3, -1]


def test_pfn_scan_merges_runs_across_segments() -> None:
    """Contiguous pages freed over three segments (some twice, some as order-3 blocks) make one run of ids."""
    s = Scenario()
    t = 1000
    for k in range(3):
        for p in range(k * 1500, k * 1500 + 1600, 8):  # overlaps the previous segment's pages
            s.free(t, 0, 50, 50, p, 3 if p % 16 == 0 else 0)
            for q in range(p + 1, p + 8):
                s.free(t + q - p, 0, 50, 50, q)
            t += 100
        s.segment_marks.append({"page": len(s.rows["page"])})
    s.segment_marks.pop()
    with tempfile.TemporaryDirectory() as d:
        tr = open_trace(s.write(Path(d) / "t"))
        assert tr.n_segments == 3
        m = PfnMap.scan(tr)
    assert m.n_slots == 2 * 1500 + 1600 and m.start.tolist() == [0]
    pfns = np.arange(m.n_slots, dtype=np.int64)
    assert m.compact(pfns, np.zeros(pfns.size)).tolist() == pfns.tolist()


def test_bad_block_order_or_pfn_is_a_trace_error() -> None:
    # The trace boundary refuses them (schema bounds) before the replay's own check would.
    for pfn, order, msg in ((1000, 11, r"column order row 0: value 11 is invalid"), (1 << 52, 0, r"column pfn row 0")):
        s = Scenario()
        s.free(1000, 0, 50, 50, pfn, order)
        with tempfile.TemporaryDirectory() as d, pytest.raises(TraceError, match=msg):
            replay(open_trace(s.write(Path(d) / "t")), ["vanilla"], parse_settings([]))
