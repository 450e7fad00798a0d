"""anon-churn: writable memory under pressure, the case where LUF should save little.

One thread keeps writing every page of a ``MAP_SHARED PROT_READ|PROT_WRITE`` file mapping
(``--file-size``), starting writeback every 16 MiB so dirty pages stay bounded; another thread
churns private anonymous memory: it maps ``--chunk`` bytes, writes every page, and unmaps the
oldest chunk once ``--anon-size`` is live.

What LUF should do: save little. This host has no swap, so anonymous pages can never be reclaimed: they only add memory pressure
(and munmap flushes, which LUF does not touch). Reclaim therefore takes the shared file pages,
whose PTEs are writable and dirty while the writer is on them (writeback write-protects them
again, so some are read-only by the time reclaim comes): those unmaps are not LUF-eligible
(``can_luf`` is cleared by a writable PTE) and their shootdowns stay. On a host with swap, the
anonymous pages would be reclaimed too, and they are writable as well. Expect a small avoidable
share, from pages that writeback had cleaned and write-protected before reclaim reached them.
Keep ``--anon-size`` well under ``--memory-limit``: with no swap, anon beyond the limit is an OOM kill.
"""

from __future__ import annotations

from lufreplay.workloads import common as c

NAME = "anon-churn"


def main(args: list[str]) -> int:
    p = c.parser(NAME, __doc__ or "", default_duration=10.0)
    p.add_argument("--file-size", type=c.size, default=1 << 30, metavar="SIZE", help="shared RW file (default 1G)")
    p.add_argument(
        "--anon-size", type=c.size, default=256 << 20, metavar="SIZE", help="live anonymous memory (default 256M)"
    )
    p.add_argument("--chunk", type=c.size, default=16 << 20, metavar="SIZE", help="anon map/unmap unit (default 16M)")
    o = p.parse_args(args)
    if o.chunk > o.anon_size:
        raise c.WorkloadError(f"--chunk ({c.human_bytes(o.chunk)}) is larger than --anon-size")
    if o.memory_limit is not None and o.anon_size > o.memory_limit // 2:
        raise c.WorkloadError(
            f"--anon-size {c.human_bytes(o.anon_size)} is over half of --memory-limit"
            f" {c.human_bytes(o.memory_limit)}: without swap that ends in an OOM kill"
        )
    with c.Session(o, NAME) as s:
        f = c.data_file(s.dir, "churn", o.file_size)
        c.drop_file_cache(f)
        h = s.spawn(NAME, "churn", f, o.duration, o.anon_size, o.chunk, 0)
        c.log(
            f"{NAME}: writing a {c.human_bytes(o.file_size)} shared file mapping and churning"
            f" {c.human_bytes(o.anon_size)} of anonymous memory for {o.duration:g} s"
        )
        s.open_gates()
        r = s.finish(h, timeout=o.duration + 120)
        runtime = s.elapsed
    doc = c.result(
        NAME,
        runtime,
        r["pages"],
        o.file_size + o.anon_size,
        processes=1,
        threads=2,
        cpu_s=round(r["cpu_s"], 3),
        file_pages_written=r["file_pages_written"],
        anon_pages_written=r["anon_pages_written"],
        anon_maps=r["anon_maps"],
        file_size=o.file_size,
        anon_size=o.anon_size,
        memory_limit=o.memory_limit,
        memcg=s.memcg,
        files=[str(f)],
        pids=[r["pid"]],
    )
    c.emit(
        doc,
        o.json,
        [
            f"file pages written: {r['file_pages_written']:,}; anon pages written: {r['anon_pages_written']:,}"
            f" in {r['anon_maps']:,} mappings"
        ],
    )
    return 0
