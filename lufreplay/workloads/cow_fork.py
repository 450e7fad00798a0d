"""cow-fork: anonymous pages made read-only by fork (COW-shared), then migrated by compaction.

The parent writes ``--size`` of private anonymous memory (order-0 folios: THP is disabled on the
range) and forks ``--children`` children. Every page is now mapped read-only in two or more mms;
the parent and each child (pinned to different CPUs) keep reading the region, so its
translations are cached on every CPU. Filler pages (``--fragment`` bytes) are allocated
interleaved with the region's pages and then freed, so the region's pageblocks are partly free and
compaction has pages to move and holes to move them into; then
``/proc/sys/vm/compact_memory`` is written ``--compactions`` times (root only).

What LUF should do: compaction's first pass migrates in MIGRATE_ASYNC mode with a batched flush;
the COW-shared anon PTEs are read-only, so the folios are LUF-eligible and those shootdowns are
deferred (paid when the old pages are reallocated). Compaction's later synchronous passes flush
per PTE and are not eligible. Reclaim cannot take these pages on a host without swap (this one):
only migration moves them here.
"""

from __future__ import annotations

import os

from lufreplay.workloads import common as c

NAME = "cow-fork"


def main(args: list[str]) -> int:
    p = c.parser(NAME, __doc__ or "", default_duration=6.0)
    p.add_argument("--size", type=c.size, default=512 << 20, metavar="SIZE", help="COW region (default 512M)")
    p.add_argument("--children", type=c.positive_int, default=1, help="forked children (default 1, max 64)")
    p.add_argument(
        "--fragment",
        type=c.size,
        default=None,
        metavar="SIZE",
        help="filler memory interleaved, then freed (default: 2 x --size)",
    )
    p.add_argument("--compactions", type=int, default=2, help="times to write compact_memory (default 2; 0: none)")
    o = p.parse_args(args)
    if o.children > 64:
        raise c.WorkloadError("--children: at most 64")
    frag = 2 * o.size if o.fragment is None else o.fragment
    if o.memory_limit is not None and o.size + frag > o.memory_limit * 3 // 4:
        raise c.WorkloadError(
            f"--size plus --fragment exceeds 3/4 of --memory-limit {c.human_bytes(o.memory_limit)}:"
            " anonymous memory cannot be reclaimed without swap (OOM kill)"
        )
    compact = o.compactions > 0 and c.can_compact()
    if o.compactions > 0 and not compact:
        c.log(f"{NAME}: cannot write {c.COMPACT_MEMORY} (not root): running without compaction")
    with c.Session(o, NAME) as s:
        h = s.spawn(NAME, "cowfork", o.size, frag, o.children)
        c.log(f"{NAME}: {c.human_bytes(o.size)} COW-shared by {o.children + 1} processes for {o.duration:g} s")
        pre = c.pre_compact(compact)
        s.open_gates()
        ready = s.read_json(h)
        before = c.pagemap_pfns(ready["pid"], ready["region_start"], ready["region_end"])
        compactions: list[dict[str, float]] = []
        n = o.compactions if compact else 0
        t_ready = s.elapsed
        for i in range(n):
            # spread the compactions over the run, leaving idle time after the last one
            s.sleep_until(t_ready + (o.duration - t_ready) * (i + 1) / (n + 1))
            t = s.elapsed
            took = c.compact_memory()
            compactions.append({"t_s": round(t, 3), "took_s": round(took, 3)})
            c.log(f"{NAME}: compaction {i + 1}/{n} took {took:.2f} s")
        s.sleep_until(o.duration)
        migrated = c.moved_pages(before, c.pagemap_pfns(ready["pid"], ready["region_start"], ready["region_end"]))
        s.send(h)
        r = s.finish(h, timeout=60)
        runtime = s.elapsed
    doc = c.result(
        NAME,
        runtime,
        r["pages"],
        o.size,
        processes=r["processes"],
        threads=r["processes"],
        cpu_s=round(r["cpu_s"], 3),
        size=o.size,
        fragment=frag,
        memory_limit=o.memory_limit,
        memcg=s.memcg,
        compacted=bool(compactions),
        pre_compaction=pre,
        migrated_pages=migrated,
        compactions=compactions,
        ncpu=os.cpu_count(),
        pids=[ready["pid"], *ready["children"]],
        mappings=[
            {"pid": pid, "start": ready["region_start"], "end": ready["region_end"], "perms": "rw-p", "cow": True}
            for pid in [ready["pid"], *ready["children"]]
        ],
    )
    c.emit(
        doc,
        o.json,
        [
            f"compactions: {len(compactions)}, region pages migrated: {migrated}",
            f"region: {ready['region_start']:#x}-{ready['region_end']:#x}",
        ],
    )
    return 0
