"""mmap-stream: threads stream a read-only ``MAP_SHARED`` file mapping, like an LLM runtime reading its weights.

Each of ``--processes`` processes maps its own file (``--file-size``) ``PROT_READ`` and its
``--threads`` threads (pinned round-robin to CPUs) read one word per 4 KiB page, over and over.
With a memory limit below the file size (``--memory-limit``, or ``lufreplay record --memory-limit``),
memcg reclaim evicts the clean page-cache folios behind the readers, and because every thread of
the process may hold the PTE in its TLB, the unmap needs a remote shootdown.

What LUF should do: every PTE is read-only and every folio is clean page cache, so the reclaim
unmaps are LUF-eligible and most batched reclaim shootdowns become avoidable; the remaining
flushes are paid later when the freed pages are reallocated. This is the talk's case.
LUF v12 only defers order-0 folios, and on kernels >= 6.16 ext4 reads a mapped file into large
folios through readahead: the default ``--advice random`` (MADV_RANDOM, no readahead) gives the
order-0 folios of the kernels LUF was written for; ``--advice normal`` shows what this kernel does
by default (most pages in large folios, rejected as ``large_folio``). Two readers per CPU by
default: with one, a CPU idles while its reader waits for the disk, and every switch back from
idle is a v12 flush point (F10) that pays the deferred flushes early.
``--sparse`` uses a hole file: no disk I/O, so reclaim is CPU-bound and the event rate is highest.
"""

from __future__ import annotations

import os

from lufreplay.workloads import common as c

NAME = "mmap-stream"
#: madvise advice numbers (asm-generic/mman-common.h); -1 = leave the mapping alone
ADVICE = {"normal": -1, "random": 1, "sequential": 2, "nohugepage": 15}
#: two readers per CPU: a CPU whose reader waits for the disk runs the other one instead of going idle
#: (each switch back from idle is a v12 flush point, F10, which would eat the saving on a slow disk)
DEFAULT_THREADS = min(2 * (os.cpu_count() or 1), 256)


def main(args: list[str]) -> int:
    p = c.parser(NAME, __doc__ or "", default_duration=10.0)
    p.add_argument(
        "--threads",
        type=c.positive_int,
        default=DEFAULT_THREADS,
        help=f"reader threads per process (default 2 per CPU: {DEFAULT_THREADS})",
    )
    p.add_argument("--processes", type=c.positive_int, default=1, help="processes, each with its own file (default 1)")
    p.add_argument("--file-size", type=c.size, default=3 << 30, metavar="SIZE", help="size of each file (default 3G)")
    p.add_argument("--sparse", action="store_true", help="use hole files (CPU-bound, no disk I/O)")
    p.add_argument(
        "--advice",
        choices=sorted(ADVICE),
        default="random",
        help="madvise() on the mapping (default random: no readahead, order-0 folios, the case LUF v12 handles);"
        " normal: the kernel default (large folios on ext4 here, which v12 rejects), sequential, nohugepage",
    )
    p.add_argument("--keep-cache", action="store_true", help="do not drop the files' page cache before starting")
    o = p.parse_args(args)
    if o.threads * o.processes > 256:
        raise c.WorkloadError("at most 256 threads in all")
    with c.Session(o, NAME) as s:
        files = [c.data_file(s.dir, f"stream{i}", o.file_size, sparse=o.sparse) for i in range(o.processes)]
        limit = o.memory_limit if o.memory_limit is not None else c.inherited_memory_limit()
        if limit is None or limit >= o.file_size * o.processes:
            c.log(
                f"{NAME}: warning: no memory limit below the {c.human_bytes(o.file_size * o.processes)} of files:"
                " nothing will be reclaimed (use --memory-limit, or lufreplay record --memory-limit)"
            )
        if not o.keep_cache:
            for f in files:
                c.drop_file_cache(f)
        helpers = [
            s.spawn(
                f"{NAME} p{i}", "stream", f, o.duration, o.threads, i * o.threads, 0, f"{NAME} p{i}", ADVICE[o.advice]
            )
            for i, f in enumerate(files)
        ]
        c.log(
            f"{NAME}: {o.processes} process(es) x {o.threads} thread(s) streaming"
            f" {c.human_bytes(o.file_size)} {'sparse ' if o.sparse else ''}file(s) for {o.duration:g} s"
            + (f" under a {c.human_bytes(o.memory_limit)} memory cgroup" if o.memory_limit else "")
        )
        s.open_gates()
        res = [s.finish(h, timeout=o.duration + 120) for h in helpers]
        runtime = s.elapsed
        kernel = s.kernel_since_gates()
    doc = c.result(
        NAME,
        runtime,
        sum(r["pages"] for r in res),
        o.file_size * o.processes,
        processes=o.processes,
        threads=o.threads * o.processes,
        cpu_s=round(sum(r["cpu_s"] for r in res), 3),
        file_size=o.file_size,
        sparse=o.sparse,
        advice=o.advice,
        memory_limit=o.memory_limit,
        memcg=s.memcg,
        kernel=kernel,
        ncpu=os.cpu_count(),
        files=[str(f) for f in files],
        pids=[r["pid"] for r in res],
        mappings=[{"pid": r["pid"], "start": r["map_start"], "end": r["map_end"], "perms": "r--s"} for r in res],
    )
    c.emit(doc, o.json, [f"files: {', '.join(map(str, files))}", f"cpu: {doc['cpu_s']:.2f} s"])
    return 0
