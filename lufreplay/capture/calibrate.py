"""Calibrate ``struct page *`` → pfn for raw tracepoint programs of the page allocator.

Raw tracepoints give the allocator probes a per-program recursion guard (no loss when a page is freed in
IRQ context while another BPF program runs), but they see ``struct page *page`` instead of the classic
tracepoint's ``pfn``. With SPARSEMEM_VMEMMAP, ``pfn = (page - vmemmap_base) / sizeof(struct page)``;
``vmemmap_base`` is KASLR-randomised and not in kallsyms, and the 6.1 headers bcc compiles against need
not give the running kernel's struct size. Both are measured here, by pointer arithmetic only: a short
program attaches the classic tracepoint (pfn) and the raw tracepoint (page pointer) to the same event and
pairs the two runs of one event on one CPU. The classic program is attached first, so on every hit it
runs first (same-priority probes run in registration order) and leaves its fields in a per-CPU slot;
the raw run that follows takes them. A nested event in between, or a skipped run, yields a wrong or no
pair; those are rare, and the mode over thousands of pairs must dominate or the calibration fails.

Run as a script it prints the calibration as JSON without the base address (``doctor`` uses this).
"""

from __future__ import annotations

import ctypes as ct
import json
import mmap
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Allocator tracepoints with a ``struct page *`` first argument: (second, third) compared field of the
#: classic format and the raw argument index holding it (the order is always raw argument 1).
PAGE_TRACEPOINTS: dict[str, tuple[tuple[str, int] | None, tuple[str, int] | None]] = {
    "mm_page_alloc": (("gfp_flags", 2), ("migratetype", 3)),
    "mm_page_free": (None, None),
    "mm_page_pcpu_drain": (("migratetype", 2), None),
    "mm_page_alloc_zone_locked": (("migratetype", 2), ("percpu_refill", 3)),
}
#: Pair slots per CPU and tracepoint (fewer per CPU on big hosts: the churn runs on one CPU anyway).
PAIR_SLOTS = 8192
MIN_PAIRS = 256
MIN_AGREEMENT = 0.95
#: Pairs that must confirm the base on each other tracepoint checked.
MIN_TP_PAIRS = 50
MIN_SIZE_SUPPORT = 0.9
#: A pair whose raw half ran this long after its classic half is counted as stale (nested or skipped run).
STALE_NS = 50_000

_TEXT = r"""
struct slot_t {
    u64 ts;
    u64 pfn;
    u32 order, x1, x2, full;
};
struct pair_t {
    u64 ptr, pfn, dt;
    u32 cpu, ro, co, rx1, cx1, rx2, cx2, pad;
};
BPF_PERCPU_ARRAY(slot, struct slot_t, NTP);
BPF_ARRAY(pairs, struct pair_t, NTP * NCPU * PER_CPU);  /* [tp][cpu][k] */
BPF_PERCPU_ARRAY(npairs, u32, NTP);
BPF_PERCPU_ARRAY(seen, u64, 2 * NTP);   /* 2*tp: classic runs, 2*tp+1: raw runs */

static __always_inline void bump(int i)
{
    u64 *v = seen.lookup(&i);
    if (v)
        (*v)++;
}

static __always_inline void cls_side(int tp, u64 pfn, u32 order, u32 x1, u32 x2)
{
    bump(2 * tp);
    struct slot_t *s = slot.lookup(&tp);
    if (!s)
        return;
    s->full = pfn != (u64)-1;
    s->ts = bpf_ktime_get_ns();
    s->pfn = pfn;
    s->order = order;
    s->x1 = x1;
    s->x2 = x2;
}

static __always_inline void raw_side(int tp, u64 ptr, u32 order, u32 x1, u32 x2)
{
    bump(2 * tp + 1);
    struct slot_t *s = slot.lookup(&tp);
    if (!s || !s->full || !ptr)
        return;
    s->full = 0;
    u32 *n = npairs.lookup(&tp);
    if (!n)
        return;
    u32 k = *n;
    u32 cpu = bpf_get_smp_processor_id();
    if (k >= PER_CPU || cpu >= NCPU)
        return;
    *n = k + 1; /* per-CPU: no atomic needed (old BPF targets cannot return an XADD result) */
    u32 i = (tp * NCPU + cpu) * PER_CPU + k;
    struct pair_t p = {};
    p.ptr = ptr;
    p.pfn = s->pfn;
    p.dt = bpf_ktime_get_ns() - s->ts;
    p.cpu = cpu;
    p.ro = order;
    p.co = s->order;
    p.rx1 = x1;
    p.cx1 = s->x1;
    p.rx2 = x2;
    p.cx2 = s->x2;
    pairs.update(&i, &p);
}
"""


def _program(tps: list[str]) -> str:
    parts = [_TEXT]
    for i, tp in enumerate(tps):
        x1, x2 = PAGE_TRACEPOINTS[tp]
        c1 = f"(u32)args->{x1[0]}" if x1 else "0"
        c2 = f"(u32)args->{x2[0]}" if x2 else "0"
        r1 = f"(u32)ctx->args[{x1[1]}]" if x1 else "0"
        r2 = f"(u32)ctx->args[{x2[1]}]" if x2 else "0"
        parts.append(
            f"TRACEPOINT_PROBE(kmem, {tp}) {{ cls_side({i}, (u64)args->pfn, (u32)args->order, {c1}, {c2});"
            " return 0; }\n"
            f"int cal_raw_{tp}(struct bpf_raw_tracepoint_args *ctx) {{"
            f" raw_side({i}, ctx->args[0], (u32)ctx->args[1], {r1}, {r2}); return 0; }}\n"
        )
    return "\n".join(parts)


class CalibrationError(Exception):
    """The calibration program could not be built, loaded or attached; one-line message."""


@dataclass
class Calibration:
    """The result: ``ok`` with ``base``/``size`` usable, plus the figures that back it (``summary``)."""

    ok: bool
    base: int = 0
    size: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    per_tracepoint: dict[str, dict[str, Any]] = field(default_factory=dict)


def _mode(a: np.ndarray) -> tuple[int, int]:
    """Most frequent value and its count (0, 0 for an empty array)."""
    if len(a) == 0:
        return 0, 0
    vals, counts = np.unique(a, return_counts=True)
    i = int(np.argmax(counts))
    return int(vals[i]), int(counts[i])


def analyse(ptr: np.ndarray, pfn: np.ndarray, consistent: np.ndarray) -> dict[str, Any]:
    """Struct size and base from (page pointer, pfn) pairs of one event.

    The size is the mode of Δptr/Δpfn between consecutive distinct pfns (exact quotients only); the
    base is the mode of ``ptr - pfn * size`` (uint64, wrapping). ``consistent`` marks pairs whose other
    fields agree (order, gfp, migratetype): only those vote; agreement is over all pairs.
    """
    ptr = np.asarray(ptr, dtype=np.uint64)
    pfn = np.asarray(pfn, dtype=np.uint64)
    n = len(ptr)
    out: dict[str, Any] = {"pairs": n, "consistent": int(np.count_nonzero(consistent))}
    p, f = ptr[consistent], pfn[consistent]
    uf, first = np.unique(f, return_index=True)
    up = p[first]
    d_pfn = np.diff(uf)
    d_ptr = np.diff(up).view(np.int64)
    exact = (d_pfn > 0) & (d_ptr > 0) & (d_ptr % np.maximum(d_pfn, 1).astype(np.int64) == 0)
    ratios = d_ptr[exact] // d_pfn[exact].astype(np.int64)
    size, size_votes = _mode(ratios)
    out["size"] = size
    out["size_votes"] = size_votes
    out["size_diffs"] = len(d_pfn)
    out["size_support"] = size_votes / len(d_pfn) if len(d_pfn) else 0.0
    if size <= 0:
        out.update(base=0, base_votes=0, agreeing=0, agreement=0.0)
        return out
    with np.errstate(over="ignore"):
        bases = p - f * np.uint64(size)
        base, base_votes = _mode(bases)
        agree = ptr == np.uint64(base) + pfn * np.uint64(size)
    out["base"] = base
    out["base_votes"] = base_votes
    out["agreeing"] = int(np.count_nonzero(agree))
    out["agreement"] = float(np.mean(agree)) if n else 0.0
    return out


#: setxattr() copies its value into a kvmalloc() buffer before the file system is asked: 64 KiB is an
#: order-4 kmalloc, above PAGE_ALLOC_COSTLY_ORDER, so it bypasses the per-CPU lists and is taken from the
#: buddy lists under the zone lock (mm_page_alloc_zone_locked, percpu_refill=0) and freed on return.
XATTR_VALUE = 64 << 10


def _buddy_allocs(path: str, n: int = 64) -> None:
    """Make the kernel take ``n`` order-4 blocks from the buddy lists under the zone lock.

    The order-0 churn alone may never get there: on a quiet host the per-CPU lists (auto-tuned, up to
    thousands of pages) serve every allocation and mm_page_alloc_zone_locked does not fire at all.
    XATTR_REPLACE of an attribute that does not exist stores nothing (ENODATA) once the value is copied.
    """
    value = bytes(XATTR_VALUE)
    for _ in range(n):
        try:
            os.setxattr(path, "user.lufreplay-calibration", value, os.XATTR_REPLACE)
        except OSError:
            pass  # ENODATA (or ENOTSUP): the kernel has copied the value by then


def _provoke(path: str) -> None:
    """One round of every allocator event the calibration pairs: page faults and frees of anonymous
    memory (alloc, free, pcpu_drain) and order-4 kernel buffers interleaved with them (zone_locked), so
    the buddy lists and thus the blocks handed out differ from round to round."""
    # 128 MiB freed by one munmap: more pages than any per-CPU list holds (pcp high is auto-tuned up to a share of
    # the zone's low watermark), so free_pcppages_bulk drains to buddy (mm_page_pcpu_drain) on an idle host too
    m = mmap.mmap(-1, 128 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        a = np.frombuffer(m, dtype=np.uint8)
        step = 8 << 20
        for off in range(0, len(a), step):
            a[off : off + step : mmap.PAGESIZE] = 1
            _buddy_allocs(path, 4)
        del a
    finally:
        m.close()
    _buddy_allocs(path, 16)


def calibrate(
    tracepoints: tuple[str, ...] = ("mm_page_alloc",),
    want_pairs: int = 2048,
    timeout_s: float = 3.0,
    base_from: str = "mm_page_alloc",
) -> Calibration:
    """Measure vmemmap base and struct page size (needs root). Raises CalibrationError if the program
    cannot load; returns ``ok=False`` with the figures if the pairs do not agree."""
    from lufreplay.capture.probes import ProbeError, import_bcc

    tps = list(tracepoints)
    if base_from not in tps:
        tps.insert(0, base_from)
    t0 = time.monotonic()
    try:
        bcc = import_bcc()
    except ProbeError as e:
        raise CalibrationError(str(e)) from None
    try:
        # The classic programs are attached by the constructor, before the raw ones below: that fixes
        # which of the two probes runs first on every hit.
        ncpu = os.cpu_count() or 1
        per_cpu = max(512, PAIR_SLOTS // ncpu)
        flags = [f"-DNTP={len(tps)}", f"-DNCPU={ncpu}", f"-DPER_CPU={per_cpu}"]
        b = bcc.BPF(text=_program(tps).encode(), cflags=flags)
    except Exception as e:  # bcc raises bare Exception
        raise CalibrationError(f"cannot load the calibration program: {str(e).splitlines()[0]}") from None
    try:
        try:
            for tp in tps:
                b.attach_raw_tracepoint(tp=tp.encode(), fn_name=f"cal_raw_{tp}".encode())
        except Exception as e:
            raise CalibrationError(f"cannot attach raw tracepoints: {str(e).splitlines()[0]}") from None
        load_s = time.monotonic() - t0
        npairs = b[b"npairs"]
        deadline = time.monotonic() + timeout_s
        fd, scratch = tempfile.mkstemp(prefix=".lufreplay-calibration-")
        os.close(fd)
        try:
            while True:
                _provoke(scratch)
                counts = [[min(int(c), per_cpu) for c in npairs[ct.c_int(i)]][:ncpu] for i in range(len(tps))]
                if min(sum(c) for c in counts) >= want_pairs or time.monotonic() >= deadline:
                    break
        finally:
            os.unlink(scratch)
        seen = b[b"seen"]
        runs = [[int(sum(seen[ct.c_int(2 * i + s)])) for s in (0, 1)] for i in range(len(tps))]
        raw = b[b"pairs"]
        rows = []
        for i in range(len(tps)):
            for cpu, n in enumerate(counts[i]):
                for k in range(n):
                    v = raw[ct.c_int((i * ncpu + cpu) * per_cpu + k)]
                    rows.append((i, v.ptr, v.pfn, v.dt, v.ro, v.co, v.rx1, v.cx1, v.rx2, v.cx2))
    finally:
        b.cleanup()
    arr = np.array(rows, dtype=np.uint64).reshape(-1, 10)
    cal = evaluate(arr, tps, runs, base_from)
    cal.summary.update(elapsed_s=round(time.monotonic() - t0, 3), load_s=round(load_s, 3))
    return cal


def evaluate(arr: np.ndarray, tps: list[str], runs: list[list[int]], base_from: str) -> Calibration:
    """The verdict from the pairs: rows of (tracepoint index, ptr, pfn, dt, raw/classic order, x1, x2 pairs)
    and each tracepoint's (classic, raw) run counts. Base and size come from ``base_from``; every other
    tracepoint is checked against them and, if it has too few pairs, named in ``summary.uncalibrated``."""
    per: dict[str, dict[str, Any]] = {}
    base_res: dict[str, Any] = {}
    for i, tp in enumerate(tps):
        r = arr[arr[:, 0] == i]
        consistent = (r[:, 4] == r[:, 5]) & (r[:, 6] == r[:, 7]) & (r[:, 8] == r[:, 9])
        stale = r[:, 3] > STALE_NS
        res = analyse(r[:, 1], r[:, 2], consistent & ~stale)
        res["fields_match"] = float(np.mean(consistent)) if len(r) else 0.0
        res["stale"] = int(np.count_nonzero(stale))
        res["classic_runs"], res["raw_runs"] = runs[i]
        per[tp] = res
        if tp == base_from:
            base_res = res
    base, size = int(base_res.get("base", 0)), int(base_res.get("size", 0))
    with np.errstate(over="ignore"):
        for tp, res in per.items():  # every tracepoint checked against the base of `base_from`
            r = arr[arr[:, 0] == tps.index(tp)]
            hit = r[:, 1] == np.uint64(base) + r[:, 2] * np.uint64(size)
            res["agreement_with_base"] = float(np.mean(hit)) if len(r) else 0.0
            res["agreeing_pfns"] = int(np.unique(r[hit, 2]).size)
            res.pop("base", None)
            res["error"] = _tp_verdict(res, size)
            res["ok"] = res["error"] is None
    why = _verdict(base_res, base, size)
    summary = {
        "method": f"classic vs raw kmem:{base_from} paired per CPU",
        "ok": why is None,
        "pairs": base_res.get("pairs", 0),
        "agreeing": base_res.get("agreeing", 0),
        "agreement": round(float(base_res.get("agreement", 0.0)), 6),
        "struct_page_size": size,
        "size_support": round(float(base_res.get("size_support", 0.0)), 6),
        "fields_match": round(float(base_res.get("fields_match", 0.0)), 6),
        "stale_pairs": base_res.get("stale", 0),
        "classic_runs": base_res.get("classic_runs", 0),
        "raw_runs": base_res.get("raw_runs", 0),
        "base": "hidden",
        "base_aligned_1g": bool(size and base % (1 << 30) == 0),
    }
    if why:
        summary["error"] = why
    # Said, not hidden: an event the window could not provoke has no verified pfn conversion.
    summary["uncalibrated"] = {tp: res["error"] for tp, res in per.items() if not res["ok"]}
    return Calibration(ok=why is None, base=base if why is None else 0, size=size, summary=summary, per_tracepoint=per)


def _tp_verdict(res: dict[str, Any], size: int) -> str | None:
    """None if one tracepoint's pairs confirm the base and size, else why not (one line)."""
    if res.get("pairs", 0) < MIN_TP_PAIRS:
        return f"only {res.get('pairs', 0)} pairs (need {MIN_TP_PAIRS}; the event fired {res.get('classic_runs', 0)} times)"
    if res.get("agreement_with_base", 0.0) < MIN_AGREEMENT:
        return f"only {res['agreement_with_base']:.1%} of pairs agree with the base"
    # pairs at two or more pfns that all fit base + pfn * size confirm the size as well; an event that reuses a few
    # pfns (zone_locked: one order-4 buffer freed and taken again) gives too few distinct pfns to measure it alone
    if res.get("size") != size and not (res.get("size") == 0 and res.get("agreeing_pfns", 0) >= 2):
        return f"struct page size {res.get('size')} differs from {size}"
    return None


def _verdict(res: dict[str, Any], base: int, size: int) -> str | None:
    """None if the figures are convincing, else why not (one line)."""
    if res.get("pairs", 0) < MIN_PAIRS:
        return f"only {res.get('pairs', 0)} pairs (need {MIN_PAIRS})"
    if not (32 <= size <= 256 and size % 8 == 0):
        return f"implausible struct page size {size}"
    if res.get("size_support", 0.0) < MIN_SIZE_SUPPORT:
        return f"struct page size {size} backed by only {res['size_support']:.1%} of pair differences"
    if res.get("agreement", 0.0) < MIN_AGREEMENT:
        return f"only {res['agreement']:.1%} of pairs agree on one vmemmap base"
    if base % 4096 or base < (1 << 63):
        return "the vmemmap base is not a page-aligned kernel address"
    return None


def main() -> int:
    """Print the calibration (without the base address) as one JSON document."""
    try:
        c = calibrate()
    except CalibrationError as e:
        sys.stdout.write(json.dumps({"ok": False, "error": str(e)}) + "\n")
        return 0
    sys.stdout.write(json.dumps(c.summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
