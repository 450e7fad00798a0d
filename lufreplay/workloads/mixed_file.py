"""mixed-file: one file read through a read-only mapping while another process writes it.

``--readers`` processes map the file ``MAP_SHARED PROT_READ`` and stream it (one word per page,
``--threads`` threads each); a writer process maps the same file ``MAP_SHARED PROT_READ|PROT_WRITE``
and, ``--write-rate`` times a second, writes one word through that mapping and one word with
``pwrite()``, on scattered pages. With ``--memory-limit`` below the file size, reclaim evicts
the readers' pages.

What LUF should do: this is the case Dave Hansen raised against LUF: a page reclaimed with its flush deferred, then
the file changes (a new page-cache page is written) while a reader's CPU may still hold the old
translation. The readers' PTEs are read-only, so their unmaps are LUF-eligible and most reclaim
shootdowns can be deferred, but a correct model must pay the deferred flush at the write hooks:
``write_begin`` for ``pwrite()`` (F4) and the write fault on the writer's shared mapping (F3).
Expect fewer avoided shootdowns than mmap-stream, and flushes attributed to fault/write_begin.
"""

from __future__ import annotations

import os

from lufreplay.workloads import common as c
from lufreplay.workloads.mmap_stream import ADVICE

NAME = "mixed-file"


def main(args: list[str]) -> int:
    p = c.parser(NAME, __doc__ or "", default_duration=10.0)
    p.add_argument("--file-size", type=c.size, default=1 << 30, metavar="SIZE", help="the shared file (default 1G)")
    p.add_argument("--readers", type=c.positive_int, default=1, help="reader processes (default 1)")
    p.add_argument("--threads", type=c.positive_int, default=1, help="threads per reader (default 1)")
    p.add_argument(
        "--write-rate", type=c.positive_float, default=200.0, help="writes/s through each path (default 200)"
    )
    p.add_argument(
        "--advice",
        choices=sorted(ADVICE),
        default="random",
        help="madvise() on the readers' mapping, as for mmap-stream (default random: order-0 folios)",
    )
    o = p.parse_args(args)
    if o.readers * o.threads > 256:
        raise c.WorkloadError("at most 256 reader threads in all")
    with c.Session(o, NAME) as s:
        f = c.data_file(s.dir, "mixed", o.file_size)
        c.drop_file_cache(f)
        readers = [
            s.spawn(
                f"{NAME} reader{i}",
                "stream",
                f,
                o.duration,
                o.threads,
                i * o.threads,
                0,
                f"{NAME} r{i}",
                ADVICE[o.advice],
            )
            for i in range(o.readers)
        ]
        writer = s.spawn(f"{NAME} writer", "writer", f, o.duration, o.write_rate)
        c.log(f"{NAME}: {o.readers} reader(s) and 1 writer on {c.human_bytes(o.file_size)} for {o.duration:g} s")
        s.open_gates()
        rr = [s.finish(h, timeout=o.duration + 120) for h in readers]
        w = s.finish(writer, timeout=o.duration + 60)
        runtime = s.elapsed
    doc = c.result(
        NAME,
        runtime,
        sum(r["pages"] for r in rr) + w["pages"],
        o.file_size,
        processes=o.readers + 1,
        threads=o.readers * o.threads + 1,
        cpu_s=round(sum(r["cpu_s"] for r in rr) + w["cpu_s"], 3),
        reader_pages=sum(r["pages"] for r in rr),
        mmap_writes=w["mmap_writes"],
        pwrites=w["pwrites"],
        file_size=o.file_size,
        advice=o.advice,
        memory_limit=o.memory_limit,
        memcg=s.memcg,
        ncpu=os.cpu_count(),
        files=[str(f)],
        pids=[*(r["pid"] for r in rr), w["pid"]],
        mappings=[
            *({"pid": r["pid"], "start": r["map_start"], "end": r["map_end"], "perms": "r--s"} for r in rr),
            {"pid": w["pid"], "start": w["map_start"], "end": w["map_end"], "perms": "rw-s"},
        ],
    )
    c.emit(doc, o.json, [f"writer: {w['mmap_writes']:,} mmap writes, {w['pwrites']:,} pwrite() calls"])
    return 0
