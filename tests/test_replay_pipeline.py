"""The fast replay front end: raw ops built in bulk equal a row-by-row construction; ids; prefetch; buffers."""

from __future__ import annotations

import random
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from scenarios import random_scenario

from lufreplay import schema
from lufreplay.model import MODELS
from lufreplay.model import ops as O
from lufreplay.model.options import parse_settings
from lufreplay.replay.engine import replay
from lufreplay.replay.rawops import EVENT_TABLES, KIND, IdMap, Ids, RawBuilder, read_segments
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


def _results(path: Path, prefetch: bool) -> dict:
    res = replay(open_trace(path), list(MODELS), parse_settings([]), decisions=True, prefetch=prefetch)
    out = {}
    for name, m in res.models.items():
        c = m.counts()
        out[name] = {k: v for k, v in c.items() if k in ("by_cause", "misc", "hooks", "per_cpu", "stale_window")}
        out[name]["decisions"] = m.decisions_array().tobytes()
    out["recon"] = res.recon_stats.tolist()
    out["sizes"] = (res.raw_events, res.model_ops)
    return out


def test_prefetch_gives_the_same_results_as_one_thread() -> None:
    s = random_scenario(random.Random(11), 150, 3)
    for rows in s.rows.values():
        rows.sort(key=lambda r: r.get("ts_ns", 0))
    page_ts = sorted(r["ts_ns"] for r in s.rows["page"])
    for q in (1, 2, 3):  # four segments, cut at times (segments line up across tables)
        cut = page_ts[q * len(page_ts) // 4]
        s.segment_marks.append({k: sum(1 for r in v if r.get("ts_ns", 0) < cut) for k, v in s.rows.items()})
    with tempfile.TemporaryDirectory() as d:
        path = s.write(Path(d) / "t")
        assert open_trace(path).n_segments == 4
        a, b = _results(path, True), _results(path, False)
    assert a["sizes"][0] > 0
    assert a == b


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
