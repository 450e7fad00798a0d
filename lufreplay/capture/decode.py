"""Raw ring records (``schema.RAW_RECORD``) → per-table Arrow tables, vectorised with numpy.

The per-kind layout of ``x`` and ``a``..``e`` is fixed by probes/lufreplay.bpf.c; this module is its
only reader. Kernel addresses (call sites, callbacks) are resolved to symbol names here and never stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from lufreplay import schema

K = schema.RAW_KIND
PRESENT_PFN_MASK = np.uint64(0x000FFFFFFFFFF000)

#: Which table each kind decodes into.
KIND_TABLE = {
    K["tlb_flush"]: "tlb_flush",
    K["csd_queue_cpu"]: "shootdown",
    K["ipi_send_cpu"]: "ipi",
    K["ipi_send_cpumask"]: "ipi",
    K["ipi_mask_words"]: "ipi",
    K["reclaim"]: "reclaim",
    K["rss_stat"]: "unmap",
    K["filemap_delete"]: "page_cache",
    K["migrate"]: "migrate",
    K["page"]: "page",
    K["fault"]: "fault",
    K["syscall"]: "syscall",
    K["file"]: "file",
    K["sched_switch"]: "sched",
    K["proc"]: "proc",
    K["mm"]: "mm",
    K["pte_exact"]: "pte",
}
#: x86-64 PTE/PMD bits read by the exact tier.
PTE_PRESENT, PTE_RW, PTE_DIRTY = np.uint64(1), np.uint64(2), np.uint64(0x40)


@dataclass
class DecodeContext:
    """What decoding needs besides the records: symbol resolution, migration constants, kthread lookup."""

    resolve: Callable[[int], str] = hex
    calibration: dict[str, Any] = field(default_factory=dict)
    is_kthread: Callable[[np.ndarray], np.ndarray] | None = None
    #: ipi_mask_words records whose head record is not decoded yet (it comes in a later ring drain)
    ipi_words: np.ndarray = field(default_factory=lambda: np.zeros(0, schema.RAW_RECORD))
    _sym_cache: dict[int, str] = field(default_factory=dict)

    def symbols(self, addrs: np.ndarray) -> pa.Array:
        """Addresses → string array of "symbol+0xoff" (each distinct address resolved once)."""
        if len(addrs) == 0:
            return pa.array([], pa.string())
        uniq, inv = np.unique(addrs, return_inverse=True)
        names = []
        for a in uniq.tolist():
            s = self._sym_cache.get(a)
            if s is None:
                s = self._sym_cache[a] = self.resolve(int(a))
            names.append(s)
        return pa.array(names, pa.string()).take(pa.array(inv.reshape(-1).astype(np.int64)))


def take(recs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``recs[idx]`` for records: numpy's fancy indexing of a structured array copies field by field (15x
    slower than ``np.take`` on 64-byte records, the largest part of decoding)."""
    return np.take(recs, idx)


def select(recs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``recs[mask]`` for records (see take)."""
    return np.take(recs, np.flatnonzero(mask))


def concat(parts: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate`` of record arrays, copied as plain 64-bit words (not field by field)."""
    if len(parts) == 1:
        return parts[0]
    dt = parts[0].dtype
    return np.concatenate([np.ascontiguousarray(p).view(np.uint64) for p in parts]).view(dt)


def _i64(a: np.ndarray) -> np.ndarray:
    return a.view(np.int64)


def _comms(c: np.ndarray, d: np.ndarray) -> pa.Array:
    """Two u64 columns holding a 16-byte comm → string array (cut at the first NUL)."""
    if len(c) == 0:
        return pa.array([], pa.string())
    raw = np.column_stack([c, d]).view("S16").reshape(-1)
    uniq, inv = np.unique(raw, return_inverse=True)
    names = [u.split(b"\0", 1)[0].decode("utf-8", "replace") for u in uniq.tolist()]
    return pa.array(names, pa.string()).take(pa.array(inv.reshape(-1).astype(np.int64)))


def _task(r: np.ndarray) -> dict[str, Any]:
    return {
        "ts_ns": _i64(r["ts"]),
        "cpu": r["cpu"],
        "pid": r["pid"].view(np.int32),
        "tgid": r["tgid"].view(np.int32),
    }


def _tlb_flush(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    return schema.from_columns("tlb_flush", {**_task(r), "reason": r["a"].astype(np.uint8), "pages": _i64(r["b"])})


def _shootdown(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    return schema.from_columns(
        "shootdown", {**_task(r), "target_cpu": r["a"].astype(np.uint16), "callsite": ctx.symbols(r["b"])}
    )


def _bits(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, bit) of every set bit of a (rows, words) uint64 array, bits numbered across the words."""
    w = np.ascontiguousarray(words, np.uint64)
    bits = np.unpackbits(w.view(np.uint8).reshape(len(w), 8 * w.shape[1]), axis=1, bitorder="little")
    return np.nonzero(bits)


def _ipi(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    """Head records (ipi_send_cpu: the CPU in ``a``; ipi_send_cpumask: CPUs 0-63 in ``a``, the mask's popcount
    in ``x``) joined with the ipi_mask_words records of the same (cpu, ts) that carry the mask's higher words."""
    words = r["kind"] == K["ipi_mask_words"]
    cont = concat([ctx.ipi_words, select(r, words)])
    r = select(r, ~words)
    one = r["kind"] == K["ipi_send_cpu"]
    rows, cpus = _bits(r["a"][:, None])
    keep = ~one[rows]
    rows, cpus = rows[keep], cpus[keep]
    rows = np.concatenate([rows, np.flatnonzero(one)])
    cpus = np.concatenate([cpus, r["a"][one].astype(np.int64)])
    if len(cont):  # only on hosts of more than 64 CPUs: a dict per drain is cheap there
        head = {(int(t), int(c)): i for i, (t, c) in enumerate(zip(r["ts"], r["cpu"], strict=True)) if not one[i]}
        at = np.array([head.get((int(t), int(c)), -1) for t, c in zip(cont["ts"], cont["cpu"], strict=True)])
        found = at >= 0
        # a words record with no head yet waits for the next drain, unless a later head of its CPU came already
        # (its head was lost: a full ring)
        last: dict[int, int] = {}
        for c, t in zip(r["cpu"].tolist(), r["ts"].tolist(), strict=True):
            last[c] = max(last.get(c, -1), t)
        wait = ~found & np.array([last.get(int(c), -1) < int(t) for t, c in zip(cont["ts"], cont["cpu"], strict=True)])
        ctx.ipi_words = cont[wait]
        got = cont[found]
        crow, cbit = _bits(np.stack([got[k] for k in "abcde"], 1))
        rows = np.concatenate([rows, at[found][crow]])
        cpus = np.concatenate([cpus, 64 * got["x"][crow].astype(np.int64) + cbit])
    o = np.lexsort((cpus, rows))
    rows, cpus = rows[o], cpus[o]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(r)))]).astype(np.int32)
    targets = pa.ListArray.from_arrays(pa.array(offsets), pa.array(cpus.astype(np.uint16)))
    n = np.diff(offsets)
    return schema.from_columns(
        "ipi",
        {
            **_task(r),
            "kind": np.where(one, 0, 1).astype(np.uint8),
            "targets": targets,
            "nr_targets": np.where(one, 1, np.maximum(r["x"], n)).astype(np.uint16),
            "callback": ctx.symbols(r["b"]),
        },
    )


def _reclaim(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    x = r["x"]
    ev = (x & 0xFF).astype(np.uint8)
    flags = ((x >> 8) & 0xFF).astype(np.uint32)
    nid = (((x >> 16) & 0xFFFF).astype(np.int32) - 1).astype(np.int16)
    begin = np.isin(ev, (0, 2, 4, 6))
    end = np.isin(ev, (1, 3, 5, 7))
    has_order = begin | (ev == 8)
    summary = np.isin(ev, (10, 11))
    write = ev == 12
    a, b, c, d, e = (_i64(r[k]) for k in "abcde")
    return schema.from_columns(
        "reclaim",
        {
            **_task(r),
            "event": ev,
            "nid": nid,
            "order": np.where(has_order, a, -1).astype(np.int16),
            "gfp_flags": np.where(begin, r["b"], np.uint64(0)),
            "nr_scanned": np.where(summary, c, 0),
            "nr_reclaimed": np.where(summary | end, d, 0),
            "nr_unmap_fail": np.where(summary, a, 0),
            "nr_ref_keep": np.where(summary, b, 0),
            "nr_dirty": np.where(summary, e, 0),
            "reclaim_flags": flags,
            "pfn": np.where(write, a, -1),
        },
    )


def _unmap(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    return schema.from_columns(
        "unmap",
        {
            **_task(r),
            "mm_id": r["a"].astype(np.uint32),
            "member": r["b"].astype(np.uint8),
            "delta": _i64(r["c"]),
            "ctx": (r["x"] & 0xFF).astype(np.uint8),
        },
    )


def _pte(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    """Exact tier: the entry an rmap walk is about to clear (probes/lufreplay.bpf.c, K_PTE_EXACT)."""
    val = r["b"]
    present = (val & PTE_PRESENT) != 0
    return schema.from_columns(
        "pte",
        {
            **_task(r),
            "op": (r["x"] & 0xF).astype(np.uint8),
            "level": ((r["x"] >> 4) & 0xF).astype(np.uint8),
            "addr": r["a"],
            "pte": val,
            "pfn": np.where(present, ((val & PRESENT_PFN_MASK) >> np.uint64(12)).astype(np.int64), -1),
            "folio_pfn": _i64(r["c"]),
            "writable": present & ((val & PTE_RW) != 0),
            "dirty": present & ((val & PTE_DIRTY) != 0),
            "vm_flags": ((r["x"] >> 8) & 0xFF).astype(np.uint8),
            "owner_tgid": r["d"].astype(np.uint32).view(np.int32),
        },
    )


def _page_cache(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    return schema.from_columns(
        "page_cache",
        {
            **_task(r),
            "pfn": _i64(r["a"]),
            "order": (r["x"] & 0xFF).astype(np.uint8),
            "dev": r["d"].astype(np.uint32),
            "ino": r["b"],
            "index": r["c"],
            "ctx": ((r["x"] >> 8) & 0xFF).astype(np.uint8),
        },
    )


def migration_entry(pte: np.ndarray, cal: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode x86-64 migration entries: (mig_type id of schema.MIG_TYPE, pfn, dirty)."""
    pte = pte.astype(np.uint64)
    typ = (pte >> np.uint64(cal["type_shift"])).astype(np.int64)
    mig = typ - int(cal["mig_read"]) + 1
    mig = np.where((mig >= 1) & (mig <= 3), mig, 0).astype(np.uint8)
    off = (~pte << np.uint64(5)) >> np.uint64(14)
    bits = int(cal["swp_pfn_bits"])
    pfn = (off & np.uint64((1 << bits) - 1)).astype(np.int64)
    dirty = ((off >> np.uint64(bits + 1)) & np.uint64(1)).astype(bool)
    return mig, pfn, dirty


def _migrate(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    ev = (r["x"] & 0xFF).astype(np.uint8)
    is_set = (ev == 0) | (ev == 2)
    is_rm = (ev == 1) | (ev == 3)
    entry = is_set | is_rm
    start, end, comp = ev == 4, ev == 5, ev == 6
    pte = r["b"]
    mig, old_pfn, mdirty = migration_entry(pte, ctx.calibration)
    new_pfn = ((pte & PRESENT_PFN_MASK) >> np.uint64(12)).astype(np.int64)
    a, b = _i64(r["a"]), _i64(r["b"])
    return schema.from_columns(
        "migrate",
        {
            **_task(r),
            "event": ev,
            "addr": np.where(entry, r["a"], np.uint64(0)),
            "pte": np.where(entry, pte, np.uint64(0)),
            "pfn": np.where(is_set, old_pfn, np.where(is_rm, new_pfn, -1)),
            "order": np.where(entry, _i64(r["c"]), -1).astype(np.int16),
            "mig_type": np.where(is_set, mig, 0).astype(np.uint8),
            "writable": np.where(is_set, mig == 3, is_rm & ((pte & np.uint64(2)) != 0)),
            # set_*: the dirty bit carried by the entry; remove_*: _PAGE_DIRTY (bit 6) of the new PTE.
            "dirty": np.where(is_set, mdirty, is_rm & ((pte & np.uint64(1 << 6)) != 0)),
            "mode": np.where(start, a, -1).astype(np.int8),
            "reason": np.where(start, b, np.where(end, _i64(r["d"]), -1)).astype(np.int8),
            "succeeded": np.where(end | comp, a, 0),
            "failed": np.where(end | comp, b, 0),
        },
    )


def _page(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    x = r["x"]
    return schema.from_columns(
        "page",
        {
            **_task(r),
            "event": (x & 0xFF).astype(np.uint8),
            "pfn": _i64(r["a"]),
            "order": ((x >> 16) & 0xFF).astype(np.uint8),
            "source": ((x >> 8) & 0xFF).astype(np.uint8),
            "gfp_flags": r["b"],
            "migratetype": _i64(r["c"]).astype(np.int8),
            "percpu_refill": r["d"] != 0,
            "tracked_pages": r["e"].astype(np.uint32),
        },
    )


def _fault(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    return schema.from_columns(
        "fault",
        {
            **_task(r),
            "address": r["a"],
            "error_code": r["b"].astype(np.uint32),
            "write": (r["b"] & np.uint64(2)) != 0,
        },
    )


def _syscall(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    x = r["x"].astype(np.uint64)
    e = r["e"]
    arg3 = ((x >> np.uint64(8)) & np.uint64(0xFFFFFF)) | (((e >> np.uint64(40)) & np.uint64(0xFF)) << np.uint64(24))
    return schema.from_columns(
        "syscall",
        {
            **_task(r),
            "nr": (x & np.uint64(0xFF)).astype(np.uint8),
            "arg0": r["a"],
            "arg1": r["b"],
            "arg2": r["c"],
            "arg3": arg3,
            "ret": _i64(r["d"]),
            "duration_ns": (e & np.uint64((1 << 40) - 1)).astype(np.int64),
        },
    )


def _file(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    return schema.from_columns(
        "file",
        {
            **_task(r),
            "event": (r["x"] & 0xFF).astype(np.uint8),
            "dev": r["a"].astype(np.uint32),
            "ino": r["b"],
            "pos": _i64(r["c"]),
            "len": _i64(r["d"]),
        },
    )


def _sched(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    pid = r["pid"].view(np.int32)
    kth = ctx.is_kthread(pid) if ctx.is_kthread is not None else (r["tgid"] == 0)
    return schema.from_columns(
        "sched",
        {
            **_task(r),
            "next_pid": r["a"].astype(np.uint32).view(np.int32),
            "prev_state": _i64(r["b"]),
            "prev_kthread": np.asarray(kth, dtype=bool),
            "prev_comm": _comms(r["c"], r["d"]),
        },
    )


def _proc(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    return schema.from_columns(
        "proc",
        {
            **_task(r),
            "event": (r["x"] & 0xFF).astype(np.uint8),
            "child_pid": r["a"].astype(np.uint32).view(np.int32),
            "child_tgid": r["b"].astype(np.uint32).view(np.int32),
            "comm": _comms(r["c"], r["d"]),
        },
    )


def _mm(r: np.ndarray, ctx: DecodeContext) -> pa.Table:
    return schema.from_columns("mm", {**_task(r), "mm_id": r["a"].astype(np.uint32)})


_DECODERS: dict[str, Callable[[np.ndarray, DecodeContext], pa.Table]] = {
    "tlb_flush": _tlb_flush,
    "shootdown": _shootdown,
    "ipi": _ipi,
    "reclaim": _reclaim,
    "unmap": _unmap,
    "pte": _pte,
    "page_cache": _page_cache,
    "migrate": _migrate,
    "page": _page,
    "fault": _fault,
    "syscall": _syscall,
    "file": _file,
    "sched": _sched,
    "proc": _proc,
    "mm": _mm,
}


def decode(recs: np.ndarray, ctx: DecodeContext, rows: np.ndarray | None = None) -> dict[str, pa.Table]:
    """Split records by kind and decode each group into its table (tables with no rows are left out).
    ``rows``: decode only these rows of ``recs`` (ascending), without copying them out first."""
    out: dict[str, pa.Table] = {}
    n = len(recs) if rows is None else len(rows)
    if n == 0:
        return out
    table_of = np.zeros(max(KIND_TABLE) + 1, dtype=np.int16) - 1
    names = list(_DECODERS)
    for kid, t in KIND_TABLE.items():
        table_of[kid] = names.index(t)
    kinds = recs["kind"] if rows is None else recs["kind"][rows]
    ts = recs["ts"] if rows is None else recs["ts"][rows]
    valid = kinds < len(table_of)
    tid = np.where(valid, table_of[np.where(valid, kinds, 0)], -1)
    # Grouped by table and in time order within each (ties keep ring order): the writer then has nothing
    # left to sort, and each group is gathered in one copy.
    order = np.lexsort((ts, tid))
    sorted_tid = tid[order]
    if rows is not None:
        order = rows[order]
    bounds = np.searchsorted(sorted_tid, np.arange(-1, len(names) + 1))
    for i, name in enumerate(names):
        lo, hi = bounds[i + 1], bounds[i + 2]
        if hi > lo:
            t = _DECODERS[name](take(recs, order[lo:hi]), ctx)
            if t.num_rows:  # an ipi group of words records only: their heads come in the next drain
                out[name] = t
    return out


def rehearsal(calibration: dict[str, Any]) -> dict[str, pa.Table]:
    """Decode one zeroed record of every kind (with its own context, so nothing is cached for the real
    ones): the first decode costs ~0.25 s of one-time work (lazy imports and initialisation), which the
    recorder pays this way before its window opens instead of inside it."""
    kinds = sorted(KIND_TABLE)
    r = np.zeros(len(kinds), dtype=schema.RAW_RECORD)
    r["kind"] = kinds
    r["ts"] = np.arange(1, len(kinds) + 1)
    ctx = DecodeContext(calibration=calibration, is_kthread=lambda pids: np.zeros(len(pids), bool))
    return decode(r, ctx)


def unknown_kinds(recs: np.ndarray) -> int:
    """Records (or their ``kind`` column) whose kind no decoder knows (a program/decoder mismatch; counted,
    never expected)."""
    kinds = recs["kind"] if recs.dtype.names else recs
    return int((~np.isin(kinds, list(KIND_TABLE))).sum())
