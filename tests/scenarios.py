"""A small builder of hand-made traces (written with the real TraceWriter) for the simulate tests."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from lufreplay import schema
from lufreplay.trace.writer import TraceWriter

GFP_KERNEL = 0xCC0  # has __GFP_DIRECT_RECLAIM (0x400)
GFP_ATOMIC = 0x820  # no direct reclaim: cannot shoot down
US = 1000


class Scenario:
    """Collect rows per table, then ``write(path)``. Times are ns; helpers take a task as (pid, tgid)."""

    def __init__(self, nr_cpus: int = 2) -> None:
        self.nr_cpus = nr_cpus
        self.rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.segment_marks: list[dict[str, int]] = []

    # ---- raw rows -----------------------------------------------------------------------------------------
    def _task(self, table: str, ts: int, cpu: int, pid: int, tgid: int, **kw: Any) -> None:
        self.rows[table].append({"ts_ns": ts, "cpu": cpu, "pid": pid, "tgid": tgid, **kw})

    def mm(self, ts: int, cpu: int, pid: int, tgid: int, mm_id: int) -> None:
        self._task("mm", ts, cpu, pid, tgid, mm_id=mm_id)

    def sched(self, ts: int, cpu: int, pid: int, tgid: int, next_pid: int, prev_kthread: bool = False) -> None:
        self._task(
            "sched", ts, cpu, pid, tgid, next_pid=next_pid, prev_state=0, prev_kthread=prev_kthread, prev_comm="t"
        )

    def tlb(self, ts: int, cpu: int, pid: int, tgid: int, reason: int, pages: int = -1) -> None:
        self._task("tlb_flush", ts, cpu, pid, tgid, reason=reason, pages=pages)

    def sd(self, ts: int, cpu: int, pid: int, tgid: int, target: int) -> None:
        self._task("shootdown", ts, cpu, pid, tgid, target_cpu=target, callsite="x")

    def unmap(
        self, ts: int, cpu: int, pid: int, tgid: int, mm_id: int, member: int = 0, delta: int = -4096, ctx: int = 2
    ) -> None:
        self._task("unmap", ts, cpu, pid, tgid, mm_id=mm_id, member=member, delta=delta, ctx=ctx)

    def pcdel(
        self,
        ts: int,
        cpu: int,
        pid: int,
        tgid: int,
        pfn: int,
        order: int = 0,
        dev: int = 1,
        ino: int = 100,
        index: int = 0,
        ctx: int = 2,
    ) -> None:
        self._task("page_cache", ts, cpu, pid, tgid, pfn=pfn, order=order, dev=dev, ino=ino, index=index, ctx=ctx)

    def reclaim(self, ts: int, cpu: int, pid: int, tgid: int, event: int, pfn: int = -1) -> None:
        self._task(
            "reclaim", ts, cpu, pid, tgid, event=event, nid=0, order=0, gfp_flags=0, nr_scanned=0, nr_reclaimed=0,
            nr_unmap_fail=0, nr_ref_keep=0, nr_dirty=0, reclaim_flags=0, pfn=pfn,
        )  # fmt: skip

    def page(
        self,
        ts: int,
        cpu: int,
        pid: int,
        tgid: int,
        event: int,
        pfn: int,
        order: int = 0,
        source: int = 0,
        gfp: int = GFP_KERNEL,
        refill: bool = False,
    ) -> None:
        self._task(
            "page", ts, cpu, pid, tgid, event=event, pfn=pfn, order=order, source=source, gfp_flags=gfp,
            migratetype=0, percpu_refill=refill, tracked_pages=1 << order,
        )  # fmt: skip

    def free(self, ts: int, cpu: int, pid: int, tgid: int, pfn: int, order: int = 0, source: int = 1) -> None:
        self.page(ts, cpu, pid, tgid, 0, pfn, order, source)

    def alloc(self, ts: int, cpu: int, pid: int, tgid: int, pfn: int, order: int = 0, gfp: int = GFP_KERNEL) -> None:
        self.page(ts, cpu, pid, tgid, 1, pfn, order, 0, gfp)

    def mig(
        self,
        ts: int,
        cpu: int,
        pid: int,
        tgid: int,
        event: int,
        pfn: int = -1,
        order: int = 0,
        mig_type: int = 0,
        writable: bool = False,
        mode: int = -1,
        reason: int = -1,
        addr: int = 0,
    ) -> None:
        self._task(
            "migrate", ts, cpu, pid, tgid, event=event, addr=addr, pte=0, pfn=pfn, order=order, mig_type=mig_type,
            writable=writable, dirty=False, mode=mode, reason=reason, succeeded=0, failed=0,
        )  # fmt: skip

    def pte(
        self,
        ts: int,
        cpu: int,
        pid: int,
        tgid: int,
        op: int,
        addr: int,
        writable: bool,
        owner: int,
        pfn: int = 1000,
        level: int = 0,
    ) -> None:
        """An exact-tier row: the entry an rmap walk (op 1 unmap, 2 migrate) of ``tgid``'s task is about to clear,
        in the mm of process ``owner``."""
        val = (pfn << 12) | 0x1 | (0x2 if writable else 0)
        self._task(
            "pte", ts, cpu, pid, tgid, op=op, level=level, addr=addr, pte=val, pfn=pfn, folio_pfn=pfn,
            writable=writable, dirty=False, vm_flags=0x1, owner_tgid=owner,
        )  # fmt: skip

    def fault(self, ts: int, cpu: int, pid: int, tgid: int, address: int, write: bool = False) -> None:
        self._task("fault", ts, cpu, pid, tgid, address=address, error_code=2 if write else 0, write=write)

    def syscall(
        self,
        ts: int,
        cpu: int,
        pid: int,
        tgid: int,
        nr: int,
        arg0: int = 0,
        arg1: int = 0,
        arg2: int = 0,
        arg3: int = 0,
        ret: int = 0,
        duration_ns: int = 10 * US,
    ) -> None:
        self._task(
            "syscall",
            ts,
            cpu,
            pid,
            tgid,
            nr=nr,
            arg0=arg0,
            arg1=arg1,
            arg2=arg2,
            arg3=arg3,
            ret=ret,
            duration_ns=duration_ns,
        )

    def file(self, ts: int, cpu: int, pid: int, tgid: int, event: int, dev: int = 1, ino: int = 100) -> None:
        self._task("file", ts, cpu, pid, tgid, event=event, dev=dev, ino=ino, pos=0, len=4096)

    def proc(self, ts: int, cpu: int, pid: int, tgid: int, event: int) -> None:
        self._task("proc", ts, cpu, pid, tgid, event=event, child_pid=-1, child_tgid=-1, comm="t")

    def maps(
        self,
        ts: int,
        tgid: int,
        snapshot: int,
        start: int,
        end: int,
        perms: str,
        offset: int = 0,
        dev: int = 1,
        ino: int = 100,
    ) -> None:
        self.rows["maps"].append(
            {
                "ts_ns": ts,
                "tgid": tgid,
                "snapshot": snapshot,
                "start": start,
                "end": end,
                "perms": perms,
                "offset": offset,
                "dev": dev,
                "ino": ino,
                "path": "/f",
            }
        )

    def loss(self, t0: int, t1: int, probe: str, lost: int) -> None:
        self.rows["losses"].append(
            {"ts_start_ns": t0, "ts_end_ns": t1, "cpu": -1, "probe": probe, "source": 0, "lost": lost}
        )

    # ---- higher-level helpers -----------------------------------------------------------------------------
    def batch_flush(self, ts: int, cpu: int, pid: int, tgid: int, targets: list[int], local_reason: int = 2) -> None:
        """The sender side of a batched (arch_tlbbatch_flush) flush: reason 4, one csd per target, local reason 2."""
        if targets:
            self.tlb(ts, cpu, pid, tgid, 4)
        for k, t in enumerate(targets):
            self.sd(ts + 1 + k, cpu, pid, tgid, t)
        self.tlb(ts + 1 + len(targets), cpu, pid, tgid, local_reason)

    def run_on(self, ts: int, cpu: int, pid: int, tgid: int, mm_id: int) -> None:
        """Make ``tgid`` (with ``mm_id``) known and running on ``cpu`` at ``ts``."""
        self.mm(ts, cpu, pid, tgid, mm_id)
        self.sched(ts + 1, cpu, 0, 0, pid)

    def reclaim_folio(
        self,
        ts: int,
        cpu: int,
        pid: int,
        tgid: int,
        pfn: int,
        mm_ids: list[int],
        index: int = 0,
        ino: int = 100,
        order: int = 0,
    ) -> None:
        for k, m in enumerate(mm_ids):
            self.unmap(ts + k, cpu, pid, tgid, m)
        self.pcdel(ts + len(mm_ids), cpu, pid, tgid, pfn, order=order, ino=ino, index=index)

    def new_segment(self) -> None:
        """End the current segment here: rows added later go to the next segment."""
        self.segment_marks.append({k: len(v) for k, v in self.rows.items()})

    def write(self, path: Path, meta: dict[str, Any] | None = None) -> Path:
        m = {
            "run_id": "test",
            "nr_cpus": self.nr_cpus,
            "host": {"hostname": "test", "nr_cpus": self.nr_cpus},
            "kernel": "test",
        }
        m.update(meta or {})
        w = TraceWriter(Path(path), m)
        marks = [*self.segment_marks, {k: len(v) for k, v in self.rows.items()}]
        prev: dict[str, int] = {}
        for i, mark in enumerate(marks):
            for name, rows in self.rows.items():
                lo, hi = prev.get(name, 0), mark.get(name, 0)
                part = rows[lo:hi]
                if part:
                    cols = {c.name: [r[c.name] for r in part] for c in schema.TABLES[name].columns}
                    w.add(name, schema.from_columns(name, cols))
            prev = mark
            if i < len(marks) - 1:
                w.rotate()
        w.close({"duration_s": 1.0})
        return Path(path)


def random_scenario(
    rng: Any, n_steps: int = 60, nr_cpus: int = 3, kept: bool = False, dirty_flush: bool = False
) -> Scenario:
    """A random but well-formed trace: processes on CPUs, reclaim and migration batches, frees, pcp drains, buddy
    takes, allocations (some atomic), faults, file writes/truncates, zaps, mprotects, writebacks, kthread switches.
    ``kept``: some reclaim batches end with a file folio unmapped but not deleted (F11); ``dirty_flush``: some
    batch flushes are followed at once by the pageout of a dirty folio (try_to_unmap_flush_dirty, §9.4). Both off
    by default so the traces of existing seeds do not change."""
    s = Scenario(nr_cpus)
    procs = [(100 + 10 * k, 0xA0 + k) for k in range(3)]  # (tgid, mm_id)
    inos = [100, 101]
    for k, (tgid, _mm) in enumerate(procs):
        s.maps(0, tgid, k + 1, 0x10000000, 0x10100000, "r--s", 0, 1, inos[0])
        s.maps(0, tgid, k + 1, 0x20000000, 0x20100000, rng.choice(["rw-s", "r--p", "r--s"]), 0, 1, inos[1])
        s.maps(0, tgid, k + 1, 0x30000000, 0x30100000, "rw-p", 0, 0, 0)
    t = 1000
    for c in range(nr_cpus):
        tgid, mm = procs[c % len(procs)]
        s.run_on(t, c, tgid, tgid, mm)
        t += 10
    pfn_next = 1000
    freed: list[tuple[int, int]] = []  # (pfn, order) free in the trace
    pcp: list[int] = []
    for _ in range(n_steps):
        t += rng.randint(1, 3) * 1000
        c = rng.randrange(nr_cpus)
        tgid, mm = rng.choice(procs)
        pid = tgid + rng.randrange(2)
        what = rng.random()
        if what < 0.3:  # a reclaim batch
            s.reclaim(t, c, pid, tgid, 2)
            folios = []
            for _f in range(rng.randint(1, 4)):
                t += 10
                order = 0 if rng.random() < 0.85 else 2
                pfn = pfn_next
                pfn_next += 4
                lost = [k for k, (_p, o) in enumerate(freed) if o == 0]
                if order == 0 and lost and rng.random() < 0.05:  # re-used with its allocation event lost
                    pfn = freed.pop(lost[rng.randrange(len(lost))])[0]
                    if pfn in pcp:
                        pcp.remove(pfn)
                ino = rng.choice(inos)
                mms = rng.sample([m for _, m in procs], rng.randint(1, 2))
                if rng.random() < 0.15:  # an immediate per-PTE flush
                    s.tlb(t, c, pid, tgid, 3, 1)
                    t += 1
                if rng.random() < 0.1:  # anon, no page-cache delete
                    s.unmap(t, c, pid, tgid, mms[0], member=1)
                    continue
                s.reclaim_folio(t, c, pid, tgid, pfn, mms, index=rng.randrange(200), ino=ino, order=order)
                t += 5
                folios.append((pfn, order))
            if kept and rng.random() < 0.3:  # a file folio reclaim could not free: unmapped, never deleted
                s.unmap(t + 10, c, pid, tgid, rng.choice(procs)[1])
                t += 10
            t += 20
            if rng.random() < 0.15:
                s.reclaim(t, c, pid, tgid, 12, folios[0][0] if folios else -1)
                t += 5
            targets = sorted(rng.sample([x for x in range(nr_cpus) if x != c], rng.randint(0, nr_cpus - 1)))
            s.batch_flush(t, c, pid, tgid, targets)
            t += 20
            if dirty_flush and rng.random() < 0.3:  # the flush was try_to_unmap_flush_dirty before this pageout
                s.reclaim(t, c, pid, tgid, 12, folios[-1][0] if folios else -1)
                t += 5
            for pfn, order in folios:
                s.free(t, c, pid, tgid, pfn, order, source=1)
                freed.append((pfn, order))
                if order == 0:
                    pcp.append(pfn)
                t += 2
            if rng.random() < 0.2:
                s.free(t, c, pid, tgid, pfn_next, 0, source=3)
                freed.append((pfn_next, 0))
                pfn_next += 4
            s.reclaim(t + 5, c, pid, tgid, 3)
        elif what < 0.38:  # a migration batch
            mode = rng.choice([0, 0, 2])
            s.mig(t, c, pid, tgid, 4, mode=mode, reason=rng.choice([0, 0, 1]))
            olds = []
            for _f in range(rng.randint(1, 3)):
                t += 10
                pfn = pfn_next
                pfn_next += 4
                for _m in range(rng.randint(1, 2)):
                    mt = rng.choice([1, 2, 3, 0])
                    s.mig(t, c, pid, tgid, 0, pfn=pfn, mig_type=mt, writable=mt == 3)
                    t += 1
                olds.append(pfn)
            targets = sorted(rng.sample([x for x in range(nr_cpus) if x != c], rng.randint(0, nr_cpus - 1)))
            s.batch_flush(t + 5, c, pid, tgid, targets)
            t += 20
            for pfn in olds:
                s.mig(t, c, pid, tgid, 1, pfn=pfn + 1)
                s.free(t + 1, c, pid, tgid, pfn, 0, source=2)
                freed.append((pfn, 0))
                pcp.append(pfn)
                t += 3
            s.mig(t, c, pid, tgid, 5)
        elif what < 0.55 and freed:  # an allocation of a freed pfn
            pfn, order = freed.pop(rng.randrange(len(freed)))
            gfp = GFP_ATOMIC if rng.random() < 0.25 else GFP_KERNEL
            if order > 0 or rng.random() < 0.3:
                s.page(t, c, pid, tgid, 3, pfn, order, refill=False)
            s.alloc(t + 1, c, pid, tgid, pfn, order, gfp)
            if pfn in pcp:
                pcp.remove(pfn)
        elif what < 0.62 and pcp:  # pcp drain
            pfn = pcp.pop(rng.randrange(len(pcp)))
            s.page(t, c, pid, tgid, 2, pfn, 0)
        elif what < 0.72:
            s.fault(
                t,
                c,
                pid,
                tgid,
                rng.choice([0x10000000, 0x20000000, 0x30000000, 0x50000000]) + 4096 * rng.randrange(10),
                rng.random() < 0.4,
            )
        elif what < 0.78:
            s.file(t, c, pid, tgid, rng.choice([0, 1, 2]), ino=rng.choice(inos))
        elif what < 0.84:  # munmap / mprotect with a recorded flush inside
            nr = rng.choice([1, 2, 3])
            s.syscall(t, c, pid, tgid, nr, 0x20000000, 4096, 4 if nr == 3 else 1)
            if rng.random() < 0.7:
                s.tlb(t + 2, c, pid, tgid, 4)
                s.sd(t + 3, c, pid, tgid, (c + 1) % nr_cpus)
                s.tlb(t + 4, c, pid, tgid, 3)
        elif what < 0.9:  # a kthread switched out for a user task
            s.sched(t, c, 5, 0, pid, prev_kthread=True)
        elif what < 0.93:
            s.pcdel(t, c, pid, tgid, pfn_next, 0, ino=rng.choice(inos), ctx=0)
            pfn_next += 4
        elif what < 0.96:
            s.sched(t, c, pid, tgid, rng.choice(procs)[0])
        else:
            s.tlb(t, c, pid, tgid, 0, -1)
    return s


# ---- the common setup of the hand-made scenarios ------------------------------------------------------------
A = (100, 100)  # reader thread 100 of process 100 (mm 0xA0), on CPU0; its reclaimer too
A1 = (101, 100)  # second thread of process 100, on CPU1
B = (200, 200)  # an unrelated process allocating pages
MM_A = 0xA0
RO_FILE = 0x10000000
ANON = 0x30000000
T_BATCH = 10_000  # the reclaim batch
T_EVENT = 100_000  # the event under test
T_ALLOC = 200_000  # the re-allocation


def ro_setup(
    s: Scenario, perms: str = "r--s", folios: tuple[int, ...] = (1000,), flush: bool = True, free: bool = True
) -> None:
    """Process A maps file ino 100 read-only (shared) and runs on CPU0 and CPU1, so mm_cpumask(A) = {0, 1}.
    Its thread on CPU0 reclaims ``folios`` (order 0, one PTE each) in one memcg-reclaim batch whose batched
    flush targets CPU1 (1 recorded remote shootdown), then frees them."""
    s.maps(0, 100, 1, RO_FILE, RO_FILE + 0x100000, perms, 0, 1, 100)
    s.maps(0, 100, 1, ANON, ANON + 0x100000, "rw-p", 0, 0, 0)
    s.run_on(1000, 0, *A, MM_A)
    s.run_on(2000, 1, *A1, MM_A)
    t = T_BATCH
    s.reclaim(t, 0, *A, 2)
    for k, pfn in enumerate(folios):
        s.reclaim_folio(t + 10 + 10 * k, 0, *A, pfn, [MM_A], index=k)
    t += 10 + 10 * len(folios) + 10
    if flush:
        s.batch_flush(t, 0, *A, [1])
    if free:
        for k, pfn in enumerate(folios):
            s.free(t + 10 + k, 0, *A, pfn)
        s.reclaim(t + 50, 0, *A, 3)


def run(s: Scenario, tmp: Path, settings: list[str] | None = None, models: list[str] | None = None) -> dict[str, Any]:
    """Write the scenario and simulate it; returns the results document."""
    from lufreplay.report.simulate_cmd import simulate

    path = s.write(Path(tmp) / f"trace{len(list(Path(tmp).glob('trace*')))}")
    doc, _ = simulate(path, models, settings or [])
    return doc


# ---- the common setup of the 4-CPU scenarios (tests/test_scenarios_4cpu.py) ---------------------------------
A2 = (102, 100)  # third thread of process A, on CPU2
C = (300, 300)  # process C (mm 0xC0) on CPU3: maps the same file read-only
E = (400, 400)  # process E (mm 0xE0) ran on CPU1 and CPU3: maps the same file shared writable (rw-s)
MM_C, MM_E = 0xC0, 0xE0


def quad_setup(s: Scenario) -> None:
    """4 CPUs. mm_cpumask(A) = {0, 1, 2} (threads A, A1, A2), mm_cpumask(C) = {3}, mm_cpumask(E) = {1, 3}
    (E ran on CPU1 and CPU3 before A1 and C came back). File ino 100 is mapped at RO_FILE by A and C read-only
    (``r--s``: read-only PTEs) and by E shared writable (``rw-s``: writable PTEs); A also has a private anon VMA."""
    s.maps(0, 100, 1, RO_FILE, RO_FILE + 0x100000, "r--s", 0, 1, 100)
    s.maps(0, 100, 1, ANON, ANON + 0x100000, "rw-p", 0, 0, 0)
    s.maps(0, 300, 2, RO_FILE, RO_FILE + 0x100000, "r--s", 0, 1, 100)
    s.maps(0, 400, 3, RO_FILE, RO_FILE + 0x100000, "rw-s", 0, 1, 100)
    s.run_on(1000, 0, *A, MM_A)
    s.run_on(1100, 2, *A2, MM_A)
    s.run_on(1200, 1, *E, MM_E)
    s.run_on(1300, 3, *E, MM_E)
    s.run_on(2000, 1, *A1, MM_A)
    s.run_on(2100, 3, *C, MM_C)


def reclaim_batch(
    s: Scenario,
    t: int,
    folios: list[tuple[int, list[int]]],
    targets: list[int],
    free: bool = True,
    kept_mm: int | None = None,
    who: tuple[int, int] = A,
    cpu: int = 0,
) -> int:
    """One reclaim batch of ``who`` on ``cpu``: each folio (pfn, mms mapping it) of file ino 100 (index = pfn %
    256) is unmapped and deleted; ``kept_mm``: a last folio unmapped from that mm and never deleted (F11); then
    the recorded batched flush to ``targets`` and the frees. Returns the time after the batch."""
    s.reclaim(t, cpu, *who, 2)
    t += 10
    for pfn, mms in folios:
        s.reclaim_folio(t, cpu, *who, pfn, mms, index=pfn % 256)
        t += 10
    if kept_mm is not None:
        s.unmap(t, cpu, *who, kept_mm)
        t += 10
    s.batch_flush(t, cpu, *who, targets)
    t += 20
    if free:
        for pfn, _ in folios:
            s.free(t, cpu, *who, pfn)
            t += 2
        s.reclaim(t, cpu, *who, 3)
    return t + 10
