"""compact: mappings with known PTE permissions while memory compaction migrates them.

One process builds seven ``--region-size`` regions (THP off on the anonymous ones):
``anon_rw`` (written, writable PTEs), ``anon_ro_excl`` (written, then ``mprotect(PROT_READ)``),
``anon_cow`` (written, then COW-shared with a forked child), ``file_ro`` (``MAP_SHARED PROT_READ``,
read), ``file_rw_dirty`` (``MAP_SHARED`` RW, written), ``file_rw_clean`` (``MAP_SHARED`` RW, only
read: clean read-only PTEs in a writable VMA) and ``file_priv_ro`` (``MAP_PRIVATE`` RW, only read).
Filler pages (``--fragment`` bytes) are allocated interleaved with the regions' pages and then
freed, so every pageblock holding region pages is partly free and compaction has pages to move
and holes to move them into (file regions are faulted one page at a time, ``MADV_RANDOM``, so their
folios are order-0 like the anonymous ones). The process then idles while
``/proc/sys/vm/compact_memory`` is written ``--compactions`` times (root). The JSON lists every
region's address range, permissions and the migration-entry type its PTEs should get, so tests can
match the trace's migrate rows to regions.

What LUF should do: folios whose every PTE is read-only (anon_ro_excl, anon_cow, file_ro,
file_rw_clean, file_priv_ro) are eligible when compaction migrates them in async (batched) mode;
anon_rw and file_rw_dirty have writable PTEs and are never eligible. Synchronous retries flush
immediately in both kernels.
"""

from __future__ import annotations

from lufreplay.workloads import common as c

NAME = "compact"


def main(args: list[str]) -> int:
    p = c.parser(NAME, __doc__ or "", default_duration=5.0)
    p.add_argument("--region-size", type=c.size, default=64 << 20, metavar="SIZE", help="each region (default 64M)")
    p.add_argument(
        "--fragment",
        type=c.size,
        default=1 << 30,
        metavar="SIZE",
        help="filler memory interleaved, then freed (default 1G)",
    )
    p.add_argument("--compactions", type=int, default=1, help="times to write compact_memory (default 1; 0: none)")
    p.add_argument(
        "--list-pfns",
        action="store_true",
        help="list each region's pfns before compaction in the JSON (`pfns_before`): matches migrate rows (old pfn)"
        " to regions without relying on addresses, which other processes may share",
    )
    o = p.parse_args(args)
    compact = o.compactions > 0 and c.can_compact()
    if o.compactions > 0 and not compact:
        c.log(f"{NAME}: cannot write {c.COMPACT_MEMORY} (not root): running without compaction")
    anon = 3 * o.region_size + o.fragment
    if o.memory_limit is not None and anon > o.memory_limit * 3 // 4:
        raise c.WorkloadError(
            f"3 anonymous regions plus --fragment exceed 3/4 of --memory-limit"
            f" {c.human_bytes(o.memory_limit)} (OOM kill without swap)"
        )
    with c.Session(o, NAME) as s:
        fro = c.data_file(s.dir, "compact-ro", 2 * o.region_size)
        frw = c.data_file(s.dir, "compact-rw", 2 * o.region_size)
        c.drop_file_cache(fro)
        c.drop_file_cache(frw)
        h = s.spawn(NAME, "regions", fro, frw, o.region_size, o.fragment)
        c.log(f"{NAME}: 7 regions of {c.human_bytes(o.region_size)}, compaction x{o.compactions if compact else 0}")
        pre = c.pre_compact(compact)
        s.open_gates()
        ready = s.read_json(h)
        before = {g["name"]: c.pagemap_pfns(ready["pid"], g["start"], g["end"]) for g in ready["regions"]}
        compactions: list[dict[str, float]] = []
        n = o.compactions if compact else 0
        t_ready = s.elapsed
        for i in range(n):
            s.sleep_until(t_ready + (o.duration - t_ready) * i / (n + 1) + 0.5)
            t = s.elapsed
            took = c.compact_memory()
            compactions.append({"t_s": round(t, 3), "took_s": round(took, 3)})
            c.log(f"{NAME}: compaction {i + 1}/{n} took {took:.2f} s")
        s.sleep_until(o.duration)
        for g in ready["regions"]:
            g["migrated_pages"] = c.moved_pages(before[g["name"]], c.pagemap_pfns(ready["pid"], g["start"], g["end"]))
            g["pages"] = (g["end"] - g["start"]) // c.PAGE
            if o.list_pfns and before[g["name"]] is not None:
                g["pfns_before"] = [int(x) for x in before[g["name"]] if x >= 0]
        s.send(h)
        r = s.finish(h, timeout=60)
        runtime = s.elapsed
    doc = c.result(
        NAME,
        runtime,
        r["pages"],
        7 * o.region_size,
        processes=2,
        threads=2,
        cpu_s=round(r["cpu_s"], 3),
        region_size=o.region_size,
        fragment=o.fragment,
        memory_limit=o.memory_limit,
        memcg=s.memcg,
        compacted=bool(compactions),
        pre_compaction=pre,
        compactions=compactions,
        pid=ready["pid"],
        child_pid=ready["child_pid"],
        pids=[ready["pid"], ready["child_pid"]],
        regions=ready["regions"],
        files=[str(fro), str(frw)],
    )
    c.emit(
        doc,
        o.json,
        [
            f"{g['name']:<14} {g['start']:#x}-{g['end']:#x} {g['perms']}  migrated {g['migrated_pages']}/{g['pages']}"
            for g in ready["regions"]
        ]
        + [f"compactions: {len(compactions)}"],
    )
    return 0
