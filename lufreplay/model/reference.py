"""A straightforward pure-Python implementation of the luf-v12 model (luf-model.md §8), for cross-checking.

It reads the same model ops as the numba core (lufreplay.model.luf_v12) but is written independently in the
plainest style: CPU sets instead of bitmasks, dicts of page objects instead of parallel arrays, Python lists for
the per-CPU FIFOs of pending pcp pages (``alloc_order=luf``). The property test runs both on random traces and
requires identical counters; ``bench/simulate_speed`` times both.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lufreplay.model import ops as O

NONE, UNMAPPED, PCP_CLEAN, PCP_LUF, BUDDY_CLEAN, BUDDY_LUF, TAKEN = range(7)


def cpus(mask: int) -> set[int]:
    return {c for c in range(64) if mask >> c & 1}


@dataclass
class Page:
    state: int = NONE
    key: int = 0
    stamp: int = 0
    unmap_ts: int = 0
    unmap_task: int = 0
    owed: set[int] = field(default_factory=set)  # shadow: CPUs that still owe a flush
    owed_ugen: int = 0
    obl: Obligation | None = None  # alloc_order=luf: the pcp obligation this pfn labels


@dataclass(eq=False)
class Obligation:
    """A keyed page on a pcp list (alloc_order=luf): what is owed, not which pfn holds it."""

    key: int
    owed: set[int]
    owed_ugen: int
    task: int
    cpu: int
    pfn: int  # the pfn the trace still shows free for it; -1: none


class ReferenceLufV12:
    """luf-v12, one Python object per page."""

    name = "luf-v12-reference"

    def __init__(self, opts: dict[str, Any]) -> None:
        self.unexplained_flush = opts["unexplained_targets"] == "flush"
        self.max_strikes = int(opts["pcp_strikes"])
        self.lat_ns = int(float(opts["epoch_flush_latency_us"]) * 1000.0)
        self.credit_natural = bool(opts["credit_natural_flushes"])
        self.luf_order = opts["alloc_order"] == "luf"
        self.non_luf_ok = bool(opts["non_luf_ok"])
        self.large = opts["large_folios"] == "eligible"
        self.fifo: defaultdict[int, list[Obligation]] = defaultdict(list)  # per CPU, oldest first
        self.pool_owed: set[int] = set()  # shadow debt of the zone's pend pool (alloc_order=luf)
        self.pool_ugen = 0
        self.G = 2
        self.K = 0
        self.KEY: dict[int, tuple[set[int], int]] = {}
        self.done: defaultdict[int, int] = defaultdict(lambda: 1)
        self.MMB: dict[int, tuple[set[int], int]] = {}
        self.ASB: dict[int, tuple[set[int], int]] = {}
        self.ZB: set[int] = set()
        self.Z_lufugen = 0
        self.Z_open = 1
        self.Z_done = 0
        self.Z_done_ts = 0
        self.Z_prev_done = 0
        self.nr_luf = 0
        self.luf: set[int] = set()
        self.nonluf: set[int] = set()
        self.folio_ro: set[int] = set()
        self.covered: set[int] = set()  # LUF work already folded and flushed by F11 in this pass
        self.can_luf = False
        self.cur: tuple[int, int, int] = (-1, 0, 0)
        self.buffer: list[tuple[int, int, int]] = []
        self.pages: defaultdict[int, Page] = defaultdict(Page)
        self.task_key: dict[int, int] = {}
        self.task_anon_key: dict[int, int] = {}
        self.strikes: Counter[int] = Counter()
        self.ipis: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.local: Counter[str] = Counter()
        self.per_cpu: Counter[int] = Counter()
        self.misc: Counter[str] = Counter()
        self.hook_calls: Counter[str] = Counter()
        self.hook_noipi: Counter[str] = Counter()
        self.violations: list[tuple[int, int]] = []

    # ---- flush helpers ---------------------------------------------------------------------------------
    def _account(self, cpu: int, targets: set[int], cause: str) -> int:
        remote = targets - {cpu}
        self.ipis[cause] += len(remote)
        if remote:
            self.events[cause] += 1
        for c in remote:
            self.per_cpu[c] += 1
        if cpu in targets:
            self.local[cause] += 1
        return len(remote)

    def _diet(self, mask: set[int], ugen: int) -> set[int]:
        return {c for c in mask if self.done[c] < ugen}

    def _mark(self, mask: set[int], g: int) -> None:
        for c in mask:
            self.done[c] = max(self.done[c], g)

    def _luf_flush(self, cpu: int, mask: set[int], ugen: int, cause: str) -> int:
        target = self._diet(mask, ugen)
        if not target:
            if mask:
                self.misc["retired_by_done"] += len(mask - {cpu})
            return 0
        self.G += 1
        n = self._account(cpu, target, cause)
        self.misc["flushed_cpu_slots"] += n
        self.misc["retired_by_done"] += len(mask - target - {cpu})
        self._mark(target, self.G)
        return n

    def _new_key(self, mask: set[int]) -> int:
        self.K = (self.K + 1) & 0xFFFF or 1
        self.G += 1
        if self.K in self.KEY:
            old_mask, old_ugen = self.KEY[self.K]
            old = self._diet(old_mask, old_ugen)
            if old:
                self.misc["key_merges"] += 1
            self.KEY[self.K] = (old | mask, self.G)
        else:
            self.KEY[self.K] = (set(mask), self.G)
        return self.K

    def _key_buffer(self, k: int, d: set[int], task: int) -> None:
        u = self.KEY[k][1] if k else 0
        for pfn, order, ts in self.buffer:
            for p in range(pfn, pfn + (1 << order)):
                pg = self.pages[p]
                pg.state, pg.key, pg.unmap_ts, pg.unmap_task = UNMAPPED, k, ts, task
                if k:
                    pg.owed |= d
                    pg.owed_ugen = max(pg.owed_ugen, u)
        self.buffer = []

    def _to_buddy(self, pg: Page, k: int, owed: set[int], owed_ugen: int) -> None:
        mask, ugen = self.KEY[k]
        self.ZB |= mask
        self.Z_lufugen = max(self.Z_lufugen, ugen)
        pg.state, pg.stamp, pg.key = BUDDY_LUF, self.Z_open, 0
        self.nr_luf += 1
        self.misc["nr_luf_pages_max"] = max(self.misc["nr_luf_pages_max"], self.nr_luf)
        if self.luf_order:
            self.pool_owed |= owed
            self.pool_ugen = max(self.pool_ugen, owed_ugen)

    def _take_buddy(self, ts: int, cpu: int, task: int, pfn: int, order: int, can_sd: bool) -> bool:
        block = [self.pages[p] for p in range(pfn, pfn + (1 << order))]
        s = max((pg.stamp for pg in block if pg.state == BUDDY_LUF), default=0)

        def clean() -> None:
            for pg in block:
                if pg.state == BUDDY_LUF:
                    pg.state = BUDDY_CLEAN

        if s == 0:
            return True
        if s <= self.Z_done:
            if ts < self.Z_done_ts and s > self.Z_prev_done:
                self.misc["epoch_waits"] += 1
            self.misc["alloc_free_pass"] += 1
            clean()
            return True
        if self.luf_order:
            if self.non_luf_ok:  # free_list first: a clean block serves the caller
                self.misc["buddy_clean_first"] += 1
                clean()
                return True
            self.misc["pend_first"] += 1
        if not can_sd:
            self.misc["buddy_refusals"] += 1
            if self.luf_order:
                clean()
                return True
            return False
        mask, ugen = set(self.ZB), self.Z_lufugen
        n = self._luf_flush(cpu, mask, ugen, "alloc_buddy_epoch")
        self.misc["epoch_closes"] += 1
        if n > 0 or self._diet(mask, ugen) != mask:
            self.misc["alloc_with_flush"] += 1
            self.misc["paid_in_alloc_flushes"] += 1
        other = sum(1 for pg in block if pg.state == BUDDY_LUF and pg.unmap_task != task)
        clean()
        if other and n:
            self.misc["paid_by_other_pages"] += other
            self.misc["paid_by_other_flushes"] += 1
        if self.luf_order:  # the pend pool is spliced back to free_list
            self.misc["safety_checks"] += self.nr_luf
            if self._diet(self.pool_owed, self.pool_ugen):
                self.violations.append((pfn, ts))
            self.pool_owed, self.pool_ugen = set(), 0
        self.Z_prev_done, self.Z_done = self.Z_done, self.Z_open
        self.Z_done_ts = ts + self.lat_ns
        self.Z_open += 1
        self.ZB, self.Z_lufugen, self.nr_luf = set(), 0, 0
        return True

    # ---- pcp obligations (alloc_order=luf) ------------------------------------------------------------------
    def _unlink(self, ob: Obligation) -> None:
        self.fifo[ob.cpu].remove(ob)

    def _relabel(self, taken: Obligation, own: Obligation | None, pfn: int) -> None:
        """``taken`` leaves in place of ``pfn``: the pfn that labelled ``taken`` now labels ``own``."""
        if own is not None and taken is not own:
            own.pfn = taken.pfn
            if taken.pfn >= 0:
                self.pages[taken.pfn].obl = own
        self.pages[pfn].obl = None

    def _orphan(self, pg: Page) -> None:
        if pg.obl is not None:
            pg.obl.pfn = -1
            pg.obl = None

    def _settle(self, ts: int, cpu: int, task: int) -> None:
        """Pages keyed again while the model still holds them pending: a re-use the trace did not show."""
        for pfn, order, _ts in self.buffer:
            for p in range(pfn, pfn + (1 << order)):
                pg = self.pages[p]
                pend = pg.state in (PCP_LUF, BUDDY_LUF) or (pg.state == UNMAPPED and pg.key)
                if self.luf_order and pg.state == PCP_LUF:
                    self._orphan(pg)
                target: set[int] = set()
                if pg.owed:
                    target = self._diet(pg.owed, pg.owed_ugen)
                    if target:
                        cause = "alloc_buddy_epoch" if pg.state in (BUDDY_LUF, TAKEN) else "alloc_pcp"
                        self._luf_flush(cpu, pg.owed, pg.owed_ugen, cause)
                    pg.owed, pg.owed_ugen = set(), 0
                if pend or target:
                    self.misc["unseen_reuses"] += 1
                if pg.state in (PCP_LUF, BUDDY_LUF):
                    pg.state = NONE

    # ---- the op loop ---------------------------------------------------------------------------------------
    def run(self, mops: np.ndarray) -> None:
        for row in mops.tolist():
            self.step(dict(zip(O.MOP_DTYPE.names, row, strict=True)))

    def step(self, r: dict[str, Any]) -> None:
        op, ts, cpu, task = r["op"], r["ts"], r["cpu"], r["task"]
        if op == O.M_FOLIO_BEGIN:
            self.can_luf = r["sub"] == 0 or (self.large and r["sub"] == O.J_LARGE_FOLIO)
            self.folio_ro = set()
            self.cur = (r["pfn"], r["order"], ts)
        elif op == O.M_PTE:
            if r["flags"] & O.PTE_UNBATCHED:
                return
            m = cpus(r["mask"])
            if r["flags"] & O.PTE_WRITABLE:
                self.can_luf = False
            if self.can_luf:
                self.folio_ro |= m
                if r["mm"] >= 0:
                    self.G += 1
                    self.MMB[r["mm"]] = (self.MMB.get(r["mm"], (set(), 0))[0] | m, self.G)
                if r["mapping"] >= 0:
                    self.G += 1
                    self.ASB[r["mapping"]] = (self.ASB.get(r["mapping"], (set(), 0))[0] | m, self.G)
            else:
                self.nonluf |= m
        elif op == O.M_FOLIO_END:
            reason = r["aux"] if (self.large and r["sub"] == O.J_LARGE_FOLIO) else r["sub"]
            if self.can_luf and reason in (0, O.J_KEPT_NOT_FREED):
                self.luf |= self.folio_ro
                if reason == 0 and self.cur[0] >= 0:
                    self.buffer.append(self.cur)
            else:
                self.nonluf |= self.folio_ro
        elif op == O.M_KEEP:
            self._settle(ts, cpu, task)
            d = self.luf - self.nonluf
            if d:
                k = self._new_key(d)
                self._key_buffer(k, d, task)
                self._luf_flush(cpu, *self.KEY[k], "reclaim_keep")
            else:
                self._key_buffer(0, set(), task)
            self.covered |= self.luf
            self.luf = set()
        elif op == O.M_BATCH:
            R = cpus(r["mask"])
            if self.unexplained_flush:
                self.nonluf |= R - (self.luf | self.nonluf | self.covered)
            self._settle(ts, cpu, task)
            d = self.luf - self.nonluf
            k = 0
            if d:
                k = self._new_key(d)
                self.misc["deferred_cpu_slots"] += len(d - {cpu})
            if self.nonluf:
                self.G += 1
                self._account(cpu, self.nonluf, "batch_nonluf")
                self._mark(self.nonluf, self.G)
            self._key_buffer(k, d, task)
            if task >= 0:
                self.task_key[task] = k
                self.task_anon_key[task] = k if r["flags"] & O.B_ANON_UNKNOWN_PFN else 0
            if r["flags"] & O.B_MEMFAIL and k:
                self._luf_flush(cpu, *self.KEY[k], "memfail")
            self.luf, self.nonluf, self.covered = set(), set(), set()
        elif op == O.M_RFLUSH:
            cause = O.CAUSES[r["sub"]]
            tg = cpus(r["mask"]) | ({cpu} if r["flags"] & 1 else set())
            self._account(cpu, tg, cause)
            credit: set[int] = set()
            if cause == "batched_pending":
                credit = cpus(r["mask2"])
                self.misc["r6_credits_other_mm"] += len(cpus(r["pfn"]))
            elif self.credit_natural and r["flags"] & 2:
                credit = tg
            if credit:
                self.G += 1
                self._mark(credit, self.G)
        elif op == O.M_FREE:
            self._free(r)
        elif op == O.M_DRAIN:
            for p in range(r["pfn"], r["pfn"] + (1 << r["order"])):
                pg = self.pages[p]
                if pg.state == PCP_LUF and self.luf_order:
                    own = pg.obl
                    assert own is not None
                    newest = self.fifo[own.cpu][-1]  # free_pcppages_bulk takes from the tail
                    if newest is not own:
                        self.misc["fifo_reorders"] += 1
                    self._relabel(newest, own, p)
                    self._unlink(newest)
                    pg.unmap_task = newest.task
                    self._to_buddy(pg, newest.key, newest.owed, newest.owed_ugen)
                elif pg.state == PCP_LUF:
                    self._to_buddy(pg, pg.key, set(), 0)
                elif pg.state == PCP_CLEAN:
                    pg.state = BUDDY_CLEAN
        elif op == O.M_TAKE:
            if self._take_buddy(ts, cpu, task, r["pfn"], r["order"], bool(r["flags"] & O.A_CAN_SD)):
                for p in range(r["pfn"], r["pfn"] + (1 << r["order"])):
                    pg = self.pages[p]
                    if pg.state != PCP_LUF:
                        pg.state = PCP_CLEAN if r["flags"] & O.A_REFILL else TAKEN
        elif op == O.M_ALLOC:
            self._alloc(r)
        elif op == O.M_HOOK:
            self._hook(r)

    def _free(self, r: dict[str, Any]) -> None:
        ts, cpu, task, order = r["ts"], r["cpu"], r["task"], r["order"]
        for p in range(r["pfn"], r["pfn"] + (1 << order)):
            pg = self.pages[p]
            if self.luf_order and pg.state in (PCP_LUF, BUDDY_LUF):
                self.misc["unseen_reuses"] += 1
                self._orphan(pg)
                pg.state = NONE
            k = 0
            if pg.state == UNMAPPED:
                k = pg.key
            elif r["sub"] == 3 and self.task_anon_key.get(task, 0) and pg.state not in (PCP_LUF, BUDDY_LUF):
                k = self.task_anon_key[task]
                pg.owed |= self.KEY[k][0]
                pg.owed_ugen = max(pg.owed_ugen, self.KEY[k][1])
                pg.unmap_ts, pg.unmap_task = ts, task
            if k:
                self.misc["luf_pages_freed"] += 1
                if order == 0:
                    pg.state, pg.key = PCP_LUF, k
                    if self.luf_order:
                        ob = Obligation(k, pg.owed, pg.owed_ugen, pg.unmap_task, cpu, p)
                        self.fifo[cpu].append(ob)
                        pg.obl = ob
                        pg.owed, pg.owed_ugen = set(), 0
                else:
                    self._to_buddy(pg, k, pg.owed, pg.owed_ugen)
                    if self.luf_order:
                        pg.owed, pg.owed_ugen = set(), 0
            elif pg.state not in (PCP_LUF, BUDDY_LUF):
                pg.state = PCP_CLEAN if order == 0 else BUDDY_CLEAN

    def _check(self, owed: set[int], owed_ugen: int, p: int, ts: int) -> bool:
        self.misc["safety_checks"] += 1
        if owed and self._diet(owed, owed_ugen):
            self.violations.append((p, ts))
            return False
        return True

    def _alloc(self, r: dict[str, Any]) -> None:
        ts, cpu, task, pfn, order = r["ts"], r["cpu"], r["task"], r["pfn"], r["order"]
        can_sd = bool(r["flags"] & O.A_CAN_SD)
        block = [self.pages[p] for p in range(pfn, pfn + (1 << order))]
        mask: set[int] = set()
        ugen = 0
        pending_pcp = pending_buddy = False
        fifo = self.luf_order and order == 0 and block[0].state == PCP_LUF
        own = taken_ob = None
        if fifo:  # the oldest keyed page of this CPU's pcp list (keyed pages sit at the tail)
            own = block[0].obl
            taken_ob = self.fifo[cpu][0] if self.fifo[cpu] else own
            assert taken_ob is not None
            mask, ugen = set(self.KEY[taken_ob.key][0]), self.KEY[taken_ob.key][1]
            pending_pcp = True
        else:
            for pg in block:
                if pg.state == PCP_LUF or (pg.state == UNMAPPED and pg.key):
                    key = pg.obl.key if (self.luf_order and pg.state == PCP_LUF and pg.obl) else pg.key
                    km, ku = self.KEY[key]
                    mask |= km
                    ugen = max(ugen, ku)
                    pending_pcp = True
                elif pg.state == BUDDY_LUF:
                    pending_buddy = True
        if r["flags"] & O.A_ATOMIC and (pending_pcp or pending_buddy):
            self.misc["atomic_allocs_skipping_luf"] += 1
        taken = True
        if pending_pcp:
            if not self._diet(mask, ugen):
                self.misc["alloc_free_pass"] += 1
            elif can_sd:
                n = self._luf_flush(cpu, mask, ugen, "alloc_pcp")
                self.misc["alloc_with_flush"] += 1
                self.misc["paid_in_alloc_flushes"] += 1
                self.strikes[cpu] = 0
                if fifo:
                    assert taken_ob is not None
                    other = int(taken_ob.task != task)
                else:
                    other = 0
                    for pg in block:
                        if pg.state in (PCP_LUF, UNMAPPED):
                            t_un = pg.obl.task if (self.luf_order and pg.state == PCP_LUF and pg.obl) else pg.unmap_task
                            other += t_un != task
                if other and n:
                    self.misc["paid_by_other_pages"] += other
                    self.misc["paid_by_other_flushes"] += 1
            else:
                taken = False
                self.misc["pcp_skips"] += 1
                self.strikes[cpu] += 1
                if self.strikes[cpu] >= self.max_strikes:
                    self.misc["pcp_fallbacks"] += 1
                    self.strikes[cpu] = 0
        if taken and pending_buddy:
            taken = self._take_buddy(ts, cpu, task, pfn, order, can_sd)
        if not taken:
            if self.luf_order:
                for pg in block:
                    if pg.state == PCP_LUF:
                        self._orphan(pg)
                        pg.state, pg.key = NONE, 0
            return
        if not pending_pcp and not pending_buddy:
            self.misc["alloc_clean"] += 1
        if fifo:
            assert taken_ob is not None
            if taken_ob is not own:
                self.misc["fifo_reorders"] += 1
            self._relabel(taken_ob, own, pfn)
            self._unlink(taken_ob)
            if self._check(taken_ob.owed, taken_ob.owed_ugen, pfn, ts):
                block[0].state, block[0].key = NONE, 0
            return
        for p, pg in zip(range(pfn, pfn + (1 << order)), block, strict=True):
            if pg.state == BUDDY_LUF:
                pg.state = BUDDY_CLEAN
            if self.luf_order and pg.state == PCP_LUF and pg.obl is not None:
                ob = pg.obl
                self._relabel(ob, ob, p)
                self._unlink(ob)
                if not self._check(ob.owed, ob.owed_ugen, p, ts):
                    return
            else:
                ok = self._check(pg.owed, pg.owed_ugen, p, ts)
                pg.owed, pg.owed_ugen = set(), 0
                if not ok:
                    return
            pg.state, pg.key = NONE, 0

    def _hook(self, r: dict[str, Any]) -> None:
        h = r["sub"]
        name = O.HOOKS[h]
        self.hook_calls[name] += 1
        target: set[int] = set()
        ugen = 0
        if h == O.H_DIRTY_WB:
            k = self.task_key.get(r["task"], 0)
            if k:
                target = self._diet(*self.KEY[k])
                ugen = self.KEY[k][1]
        else:
            if h in (O.H_FAULT, O.H_ZAP, O.H_CTXSW) and r["mm"] >= 0 and r["mm"] in self.MMB:
                target |= self._diet(*self.MMB[r["mm"]])
                ugen = self.MMB[r["mm"]][1]
            elif h in (O.H_FAULT, O.H_ZAP, O.H_CTXSW) and r["mm"] >= 0:
                ugen = 0
            if r["mapping"] >= 0 and h != O.H_CTXSW and r["mapping"] in self.ASB:
                target |= self._diet(*self.ASB[r["mapping"]])
                ugen = max(ugen, self.ASB[r["mapping"]][1])
        if not target:
            self.hook_noipi[name] += 1
        else:
            self._luf_flush(r["cpu"], target, ugen + 1, O.CAUSES[O.HOOK_CAUSE[h]])

    # ---- the same shape as Model.counts() for comparison ----------------------------------------------------
    def counts(self, ncpu: int) -> dict[str, Any]:
        return {
            "remote_shootdowns": sum(self.ipis.values()),
            "flush_events": sum(self.events.values()),
            "local_flushes": sum(self.local.values()),
            "by_cause": {c: self.ipis[c] for c in O.CAUSES if self.ipis[c] or self.events[c] or self.local[c]},
            "flush_events_by_cause": {c: self.events[c] for c in O.CAUSES if self.events[c]},
            "per_cpu": [self.per_cpu[c] for c in range(ncpu)],
            "misc": {k: int(self.misc[k]) for k in O.MISC},
            "hooks": {h: {"calls": self.hook_calls[h], "no_ipi": self.hook_noipi[h]} for h in O.HOOKS},
        }
