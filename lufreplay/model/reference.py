"""luf-v12 written from the specification (luf-model.md §2–§5, §8, §9), for cross-checking the numba fast path.

Independent of ``lufreplay.model.luf_v12``: plain Python, CPU *sets* (any CPU count), one method per §8.2 event,
named after the kernel function it stands for. It consumes the model ops of the replay (``model/ops.py``), i.e.
what the trace shows, and logs every decision as ``Decision`` rows (the set of CPUs each flush went to, and the
CPUs each batch deferred), which the tests compare with the fast path's ``Model.decisions_array()``.

Each point where the posted v12 code and the cover letter disagree (§9) is an explicit option, ``SPEC_CHOICES``;
the first value of each is what the posted code does, the fast path's luf-v12 default (the fast path has each as
a model option of the same name; luf-v12-intended takes the second value of each):

- ``hooks``: ``posted`` (§9.1: the batches never get ``flush_required``, so F3–F7 and F10 send nothing; the
  caller's own tlb_ubc is empty at hook time) or ``intended`` (§8.2.9–13: they flush the mm/mapping batch).
- ``keep``: ``posted`` (§9.3 / §8.2.4: ``luf_flush(fold_unmap_luf())`` folds the new key's batch into tlb_ubc with
  no diet and runs ``try_to_unmap_flush()``, which also flushes the whole pending non-LUF work, even with key 0)
  or ``key_only`` (F11 flushes the new key only; the pending non-LUF work waits for the batch flush).
- ``dirty_writeback``: ``posted`` (§9.4: ``try_to_unmap_flush_dirty()`` flushes the *open* batch, LUF work
  included, only when a dirty PTE was cleared in it, and never already-keyed pages. The trace shows when it
  flushed: vanilla's own call is the recorded batch flush the pageout row closes, a BATCH op marked ``B_DIRTY``
  by the reconstructor; that batch's LUF part is flushed with it instead of keyed, and the pageout hook itself
  does nothing) or ``last_key`` (F13 flushes the key of the task's last batch: §8.2.5 "everything pending for
  the task").

The other §9 points are model options both implementations share: §9.5 pcp tail placement and tail drains
(``alloc_order=luf``), §9.6 clean free_list first (``non_luf_ok``: one switch, free-list lengths are not traced),
§9.7 lazy CPUs filtered at the flush (default: a key holds the whole mm_cpumask union and a flush skips the CPUs
lazy when it is sent, which ``flush`` reads from the op that sends it) or at the unmap (``clip_to_recorded``), §9.8 who may shoot down
(``atomic_no_shootdown``, decided by the reconstructor). Not modelled: §9.2 (a reclaim pass's two folio batches
filling independently): the model ops carry vanilla's flush points but not which folios the kernel freed into
which folio batch (docs/simulate.md says why and bounds it).

Replay conventions that are not LUF rules (docs/simulate.md): the unexplained-target rule at a batch, the
``alloc_order=luf`` pcp obligations (oldest keyed page of the CPU's list consumed first, newest drained first,
pfns as labels), anon folios whose pfn shows up only at their free, and pfns re-used without a recorded
allocation ("unseen re-use": what they still owe is paid before they are keyed again).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np

from lufreplay.model import ops as O

#: §9 choices the reference exposes; the first value of each is the posted code's (luf-v12's defaults), the second
#: the intended design's (luf-v12-intended). The fast path has each as a model option of the same name.
SPEC_CHOICES: dict[str, tuple[str, ...]] = {
    "hooks": ("posted", "intended"),
    "keep": ("posted", "key_only"),
    "dirty_writeback": ("posted", "last_key"),
}
FAST_PATH_CHOICES = {k: v[0] for k, v in SPEC_CHOICES.items()}
INTENDED_CHOICES = {k: v[1] for k, v in SPEC_CHOICES.items()}

LUF_UGEN_INIT = 2  # §2.1: the counter starts at 2; done[] starts at LUF_UGEN_INIT - 1


def cpuset(mask: int) -> frozenset[int]:
    """The CPUs of a model-op mask (the replay's masks are 64-bit; the reference itself uses sets)."""
    return frozenset(c for c in range(mask.bit_length()) if mask >> c & 1)


class Decision(NamedTuple):
    """One decision: a flush performed (``targets`` = the CPUs flushed, sender included if it flushed locally),
    or the CPUs a batch deferred (kind ``deferred``)."""

    ts: int
    kind: str  # "performed" | "deferred"
    cause: str
    cpu: int
    targets: frozenset[int]
    op: int


@dataclass
class LufBatch:
    """``struct luf_batch``: a CPU set and the ugen of its newest request (§2.3)."""

    cpus: set[int] = field(default_factory=set)
    ugen: int = 0


@dataclass(eq=False)
class Obligation:
    """alloc_order=luf: a keyed page on a pcp list, as what it owes rather than which pfn holds it."""

    key: int
    owed: set[int]
    owed_ugen: int
    cpu: int
    pfn: int  # the pfn the trace still shows free for it; -1: none (the trace re-used it)


@dataclass
class Page:
    """§8.1 per-page state: where the page is (None: mapped/allocated), its key or buddy stamp, shadow debt."""

    where: str | None = None  # "unmapped" (in a batch, keyed), "pcp", "buddy", "taken" (off buddy, not yet alloc'd)
    key: int = 0
    stamp: int = 0
    owed: set[int] = field(default_factory=set)  # shadow truth: CPUs that still owe a flush for this page
    owed_ugen: int = 0
    ob: Obligation | None = None

    @property
    def pending(self) -> bool:
        return (self.where == "pcp" and self.key != 0) or (self.where == "buddy" and self.stamp != 0)


@dataclass
class Zone:
    """§2.5 / §4.1: the zone batch of the open epoch and the epoch counters."""

    batch: set[int] = field(default_factory=set)  # zone_batch
    luf_ugen: int = 0
    open: int = 1  # zone_ugen
    done: int = 0  # zone_ugen_done
    pool_owed: set[int] = field(default_factory=set)  # alloc_order=luf: shadow debt of the pend lists
    pool_ugen: int = 0


@dataclass
class Pass:
    """§8.1 per-task reclaim/migration state for the open batch."""

    nonluf: set[int] = field(default_factory=set)  # tlb_ubc
    luf: set[int] = field(default_factory=set)  # tlb_ubc_luf
    folio_ro: set[int] = field(default_factory=set)  # tlb_ubc_ro
    can_luf: bool = False
    folio: tuple[int, int] = (-1, 0)
    eligible: list[tuple[int, int]] = field(default_factory=list)  # folios to free with the batch's key
    flushed_early: set[int] = field(default_factory=set)  # work already flushed by F11 in this batch


class ReferenceLufV12:
    """luf-v12 from the specification. ``run(model_ops)`` then read ``decisions`` (and ``violations``)."""

    name = "luf-v12-reference"

    def __init__(self, opts: dict[str, Any], **choices: str) -> None:
        # the §9 choices: the model options of the same name, unless given here
        self.choice = {k: opts.get(k, v) for k, v in FAST_PATH_CHOICES.items()}
        for k, v in {**self.choice, **choices}.items():
            if k not in SPEC_CHOICES or v not in SPEC_CHOICES[k]:
                raise ValueError(f"reference choice {k}={v!r}: expected one of {SPEC_CHOICES.get(k)}")
            self.choice[k] = v
        self.large_ok = opts["large_folios"] == "eligible"
        self.unexplained_flush = opts["unexplained_targets"] == "flush"
        self.credit_natural = bool(opts["credit_natural_flushes"])
        self.luf_order = opts["alloc_order"] == "luf"
        self.non_luf_ok = bool(opts["non_luf_ok"])
        self.max_strikes = int(opts["pcp_strikes"])
        self.lazy_at_flush = not opts["clip_to_recorded"]
        self.op: dict[str, Any] = {}  # the op being replayed: a flush it sends skips the CPUs lazy at it
        # §8.1 global and per-CPU state
        self.G = LUF_UGEN_INIT
        self.K = 0
        self.KEY: dict[int, LufBatch] = {}
        self.done: defaultdict[int, int] = defaultdict(lambda: LUF_UGEN_INIT - 1)
        self.MMB: defaultdict[int, LufBatch] = defaultdict(LufBatch)
        self.ASB: defaultdict[int, LufBatch] = defaultdict(LufBatch)
        self.zone = Zone()
        self.passes: defaultdict[int, Pass] = defaultdict(Pass)
        self.pages: defaultdict[int, Page] = defaultdict(Page)
        self.pcp: defaultdict[int, list[Obligation]] = defaultdict(list)  # keyed pages per CPU, oldest first
        self.strikes: defaultdict[int, int] = defaultdict(int)
        self.last_key: dict[int, int] = {}  # per task: the key of its last batch (F13)
        self.anon_key: dict[int, int] = {}  # per task: that key, if the batch had anon folios of unknown pfn
        self.decisions: list[Decision] = []
        self.violations: list[tuple[int, int]] = []

    # ---- §2.1–2.2: ugen, done, diet ----------------------------------------------------------------------
    def next_ugen(self) -> int:
        self.G += 1
        return self.G

    def diet(self, cpus: set[int] | frozenset[int], ugen: int) -> set[int]:
        """arch_tlbbatch_diet: drop the CPUs whose done stamp already reached ``ugen``."""
        return {c for c in cpus if self.done[c] < ugen}

    def mark_done(self, cpus: set[int] | frozenset[int], g: int) -> None:
        for c in cpus:
            self.done[c] = max(self.done[c], g)

    def interrupted(self, cpu: int, targets: set[int]) -> set[int]:
        """§9.7: the CPUs of ``targets`` a flush sent now reaches; arch_tlbbatch_flush skips lazy remote CPUs
        (should_flush_tlb). At a batch's own flush the trace says which: the recorded targets (``mask``) and the
        sender; at any other op the CPUs the reconstructor saw lazy there (``mask2``) are skipped. With
        clip_to_recorded the masks already left them out at the unmap."""
        r = self.op
        if not self.lazy_at_flush or not r:
            return targets
        if r["op"] == O.M_BATCH:
            return targets & (set(cpuset(r["mask"])) | {cpu})
        return targets - (set(cpuset(r["mask2"])) - {cpu})

    def flush(self, ts: int, cpu: int, targets: set[int], cause: str, op: int, g: int | None = None) -> None:
        """One LUF-aware flush (tlb_flush_start/end): take a ugen, interrupt ``targets`` but the lazy CPUs, mark
        all of ``targets`` done (a lazy CPU reloads its TLB when it switches back)."""
        g = self.next_ugen() if g is None else g
        self.decisions.append(Decision(ts, "performed", cause, cpu, frozenset(self.interrupted(cpu, targets)), op))
        self.mark_done(targets, g)

    def luf_flush(self, ts: int, cpu: int, cpus: set[int], ugen: int, cause: str, op: int) -> None:
        """§4: the pattern of every luf_flush_* helper: diet by ``ugen``, flush what is left."""
        target = self.diet(cpus, ugen)
        if target:
            self.flush(ts, cpu, target, cause, op)

    # ---- §2.3 / §3.3: keys -------------------------------------------------------------------------------
    def fold_unmap_luf(self, p: Pass) -> tuple[int, set[int]]:
        """§3.3: the batch's deferred CPUs D = LUF \\ NONLUF get a new key (0 if D is empty)."""
        d = p.luf - p.nonluf
        if not d:
            return 0, d
        self.K = (self.K + 1) % 65536 or 1  # key 0 is reserved
        ugen = self.next_ugen()
        slot = self.KEY.get(self.K)
        if slot is not None:  # __fold_luf_batch: the old request, dieted by its own ugen, is merged in
            self.KEY[self.K] = LufBatch(self.diet(slot.cpus, slot.ugen) | d, ugen)
        else:
            self.KEY[self.K] = LufBatch(set(d), ugen)
        return self.K, d

    def free_eligible(self, p: Pass, key: int, d: set[int]) -> None:
        """The batch's eligible folios leave the rmap walk carrying ``key`` (freed later by FREE ops)."""
        ugen = self.KEY[key].ugen if key else 0
        for pfn, order in p.eligible:
            for q in range(pfn, pfn + (1 << order)):
                pg = self.pages[q]
                pg.where, pg.key = "unmapped", key
                if key:
                    pg.owed |= d
                    pg.owed_ugen = max(pg.owed_ugen, ugen)
        p.eligible = []

    def settle_reused(self, ts: int, cpu: int, p: Pass, op: int) -> None:
        """Convention: a pfn the model still holds pending that the trace unmaps again was re-used without a
        recorded allocation; what it still owes is paid now (alloc_order=luf: a pcp obligation stays queued)."""
        for pfn, order in p.eligible:
            for q in range(pfn, pfn + (1 << order)):
                pg = self.pages[q]
                if self.luf_order and pg.where == "pcp" and pg.key:
                    self.unlabel(pg)
                if pg.owed:
                    cause = "alloc_buddy_epoch" if pg.where in ("buddy", "taken") else "alloc_pcp"
                    self.luf_flush(ts, cpu, pg.owed, pg.owed_ugen, cause, op)
                    pg.owed, pg.owed_ugen = set(), 0
                if pg.pending:
                    pg.where, pg.key, pg.stamp = None, 0, 0

    # ---- §8.2.1–2: the rmap walk ---------------------------------------------------------------------------
    def folio_begin(self, r: dict[str, Any]) -> None:
        """can_luf_init (§3.2): the static exclusions (large folios: option large_folios)."""
        p = self.passes[r["task"]]
        p.can_luf = r["sub"] == 0 or (self.large_ok and r["sub"] == O.J_LARGE_FOLIO)
        p.folio_ro = set()
        p.folio = (r["pfn"], r["order"])

    def unmap_pte(self, r: dict[str, Any]) -> None:
        """§8.2.1: a batched PTE clear; read-only PTEs of a still-eligible folio update MMB/ASB."""
        if r["flags"] & O.PTE_UNBATCHED:
            return  # ptep_clear_flush: the recorded immediate flush is its own op
        p = self.passes[r["task"]]
        cpus = set(cpuset(r["mask"]))
        if r["flags"] & O.PTE_WRITABLE:
            p.can_luf = False
        if not p.can_luf:
            p.nonluf |= cpus
            return
        p.folio_ro |= cpus
        for batches, ident in ((self.MMB, r["mm"]), (self.ASB, r["mapping"])):
            if ident >= 0:
                b = batches[ident]
                b.cpus |= cpus
                b.ugen = self.next_ugen()

    def end_folio_unmap(self, r: dict[str, Any]) -> None:
        """§8.2.2: the folio's read-only CPUs join LUF if it stayed eligible, else NONLUF."""
        p = self.passes[r["task"]]
        reason = r["aux"] if (self.large_ok and r["sub"] == O.J_LARGE_FOLIO) else r["sub"]
        if p.can_luf and reason in (0, O.J_KEPT_NOT_FREED):
            p.luf |= p.folio_ro
            if reason == 0 and p.folio[0] >= 0:
                p.eligible.append(p.folio)
        else:
            p.nonluf |= p.folio_ro

    # ---- §8.2.3–5: batch end, kept folio, dirty writeback ---------------------------------------------------
    def batch_flush(self, r: dict[str, Any]) -> None:
        """§8.2.3: fold_unmap_luf, then try_to_unmap_flush of the non-LUF part; eligible folios get the key."""
        ts, cpu, task, op = r["ts"], r["cpu"], r["task"], r["op"]
        p = self.passes[task]
        if self.unexplained_flush:  # convention: recorded targets no PTE explains are flushed, not deferred
            p.nonluf |= cpuset(r["mask"]) - (p.luf | p.nonluf | p.flushed_early)
        self.settle_reused(ts, cpu, p, op)
        if self.choice["dirty_writeback"] == "posted" and r["flags"] & O.B_DIRTY:
            # §9.4: this flush is try_to_unmap_flush_dirty(): tlb_ubc_luf is folded into tlb_ubc and flushed with
            # it (fold_unmap_luf does not run), so the batch's folios leave with no key. One flush in the kernel,
            # two here so that the LUF part counts under F13 (disjoint sets, nothing in between)
            key, d = 0, p.luf - p.nonluf
            if p.nonluf:
                self.flush(ts, cpu, p.nonluf, "batch_nonluf", op)
            if d:
                self.flush(ts, cpu, d, "dirty_writeback", op)
        else:
            key, d = self.fold_unmap_luf(p)
            if d:
                self.decisions.append(Decision(ts, "deferred", "batch", cpu, frozenset(d), op))
            if p.nonluf:
                self.flush(ts, cpu, p.nonluf, "batch_nonluf", op)
        self.free_eligible(p, key, d)
        if task >= 0:
            self.last_key[task] = key
            self.anon_key[task] = key if r["flags"] & O.B_ANON_UNKNOWN_PFN else 0
        if r["flags"] & O.B_MEMFAIL and key:  # F12: the key is flushed at once
            self.luf_flush(ts, cpu, self.KEY[key].cpus, self.KEY[key].ugen, "memfail", op)
        del self.passes[task]

    def reclaim_keep(self, r: dict[str, Any]) -> None:
        """§8.2.4 / F11: luf_flush(fold_unmap_luf()): everything LUF so far gets a key and is flushed at once."""
        ts, cpu, op = r["ts"], r["cpu"], r["op"]
        p = self.passes[r["task"]]
        self.settle_reused(ts, cpu, p, op)
        key, d = self.fold_unmap_luf(p)
        self.free_eligible(p, key, d)
        if self.choice["keep"] == "posted":
            # luf_flush(key): fold_batch(tlb_ubc, &luf_batch[key]) with no diet, then try_to_unmap_flush(): tlb_ubc
            # (the non-LUF work) goes too, key 0 or not
            target = set(self.KEY[key].cpus) if key else set()
            target |= p.nonluf
            p.flushed_early |= p.nonluf
            p.nonluf = set()
        else:  # the cover letter's luf_flush_* pattern: diet by the key's ugen (fresh: nothing is done yet)
            target = self.diet(self.KEY[key].cpus, self.KEY[key].ugen) if key else set()
        if target:
            self.flush(ts, cpu, target, "reclaim_keep", op)
        p.flushed_early |= p.luf
        p.luf = set()

    def dirty_writeback(self, r: dict[str, Any]) -> None:
        """§8.2.5 / F13 (choice ``dirty_writeback``)."""
        if self.choice["dirty_writeback"] == "posted":
            return  # §9.4: keyed pages are never touched; the open batch was flushed at its B_DIRTY BATCH
        key = self.last_key.get(r["task"], 0) if r["task"] >= 0 else 0
        if key:
            self.luf_flush(r["ts"], r["cpu"], self.KEY[key].cpus, self.KEY[key].ugen, "dirty_writeback", r["op"])

    # ---- §8.2.6–8: free, drain, allocation ------------------------------------------------------------------
    def free(self, r: dict[str, Any]) -> None:
        """§8.2.6: a page freed with its batch's key goes to the pcp tail (order 0) or straight to buddy."""
        cpu, task, order = r["cpu"], r["task"], r["order"]
        for q in range(r["pfn"], r["pfn"] + (1 << order)):
            pg = self.pages[q]
            if self.luf_order and pg.pending:  # freed again, never allocated in the model: unseen re-use
                self.unlabel(pg)
                pg.where, pg.key, pg.stamp = None, 0, 0
            key = 0
            if pg.where == "unmapped":
                key = pg.key
            elif r["sub"] == 3 and self.anon_key.get(task, 0) and not pg.pending:
                key = self.anon_key[task]  # convention: an anon folio of the task's last batch
                pg.owed |= self.KEY[key].cpus
                pg.owed_ugen = max(pg.owed_ugen, self.KEY[key].ugen)
            if key and order == 0:
                pg.where, pg.key = "pcp", key
                if self.luf_order:
                    ob = Obligation(key, pg.owed, pg.owed_ugen, cpu, q)
                    self.pcp[cpu].append(ob)
                    pg.ob, pg.owed, pg.owed_ugen = ob, set(), 0
            elif key:  # free_one_page: a keyed block pcp cannot hold
                self.to_buddy(pg, key, pg.owed, pg.owed_ugen)
                if self.luf_order:
                    pg.owed, pg.owed_ugen = set(), 0
            elif not pg.pending:
                pg.where, pg.key, pg.stamp = ("pcp" if order == 0 else "buddy"), 0, 0

    def to_buddy(self, pg: Page, key: int, owed: set[int], owed_ugen: int) -> None:
        """§4.1 / §8.2.7: the zone batch absorbs the key; the page is stamped with the open epoch."""
        kb = self.KEY[key]
        self.zone.batch |= kb.cpus
        self.zone.luf_ugen = max(self.zone.luf_ugen, kb.ugen)
        pg.where, pg.key, pg.stamp = "buddy", 0, self.zone.open
        if self.luf_order:
            self.zone.pool_owed |= owed
            self.zone.pool_ugen = max(self.zone.pool_ugen, owed_ugen)

    def pcp_drain(self, r: dict[str, Any]) -> None:
        """§8.2.7 / §9.5: free_pcppages_bulk takes from the list tail: the newest keyed page goes to buddy."""
        for q in range(r["pfn"], r["pfn"] + (1 << r["order"])):
            pg = self.pages[q]
            if pg.where == "pcp" and pg.key:
                if self.luf_order:
                    own = pg.ob
                    assert own is not None
                    newest = self.pcp[own.cpu][-1]
                    self.consume(newest, own, q)
                    self.to_buddy(pg, newest.key, newest.owed, newest.owed_ugen)
                else:
                    self.to_buddy(pg, pg.key, set(), 0)
            elif pg.where == "pcp":
                pg.where = "buddy"

    def take_buddy(self, ts: int, cpu: int, pfn: int, order: int, can_sd: bool, op: int) -> bool:
        """§4.1 / §8.2.8 buddy path: free pass, clean block first, refusal, or epoch close. True: handed out."""
        block = [self.pages[q] for q in range(pfn, pfn + (1 << order))]
        stamp = max((pg.stamp for pg in block if pg.where == "buddy"), default=0)
        z = self.zone

        def make_clean() -> None:
            for pg in block:
                if pg.where == "buddy":
                    pg.stamp = 0

        if stamp == 0 or stamp <= z.done:  # no pending work, or its epoch is already flushed
            make_clean()
            return True
        if self.luf_order and self.non_luf_ok:  # get_page_from_free_area: free_list first (§9.6)
            make_clean()
            return True
        if not can_sd:
            if self.luf_order:  # the pend_list block is unusable; a clean one serves the caller
                make_clean()
                return True
            return False
        # this task closes the open epoch: one flush of the whole zone batch, dieted by zone->luf_ugen
        self.luf_flush(ts, cpu, z.batch, z.luf_ugen, "alloc_buddy_epoch", op)
        make_clean()
        if self.luf_order:  # the pend lists are spliced back to free_list: nothing in them may be owed
            if self.diet(z.pool_owed, z.pool_ugen):
                self.violations.append((pfn, ts))
            z.pool_owed, z.pool_ugen = set(), 0
        z.done, z.open = z.open, z.open + 1
        z.batch, z.luf_ugen = set(), 0
        return True

    def take(self, r: dict[str, Any]) -> None:
        """A block removed from buddy (rmqueue_buddy / rmqueue_bulk refill)."""
        pfn, order = r["pfn"], r["order"]
        if self.take_buddy(r["ts"], r["cpu"], pfn, order, bool(r["flags"] & O.A_CAN_SD), r["op"]):
            for q in range(pfn, pfn + (1 << order)):
                pg = self.pages[q]
                if not (pg.where == "pcp" and pg.key):
                    pg.where, pg.stamp = ("pcp" if r["flags"] & O.A_REFILL else "taken"), 0

    def pcp_takeoff(self, ts: int, cpu: int, cpus: set[int], ugen: int, can_sd: bool, op: int) -> bool:
        """F1: a keyed pcp page: free if its key is done, flushed if the context can shoot down, else skipped
        (after ``pcp_strikes`` skips the buddy path is tried: the page is not taken either way)."""
        target = self.diet(cpus, ugen)
        if not target:
            return True
        if can_sd:
            self.flush(ts, cpu, target, "alloc_pcp", op)
            self.strikes[cpu] = 0
            return True
        self.strikes[cpu] += 1
        if self.strikes[cpu] >= self.max_strikes:
            self.strikes[cpu] = 0
        return False

    def alloc(self, r: dict[str, Any]) -> None:
        """§8.2.8: a recorded allocation; which pending work it meets depends on ``alloc_order``."""
        ts, cpu, pfn, order, op = r["ts"], r["cpu"], r["pfn"], r["order"], r["op"]
        can_sd = bool(r["flags"] & O.A_CAN_SD)
        block = [self.pages[q] for q in range(pfn, pfn + (1 << order))]
        if self.luf_order and order == 0 and block[0].where == "pcp" and block[0].key:
            # keyed pages sit at the tail behind clean ones: the CPU's oldest keyed page is what is reached
            own = block[0].ob
            assert own is not None
            ob = self.pcp[cpu][0] if self.pcp[cpu] else own
            kb = self.KEY[ob.key]
            if not self.pcp_takeoff(ts, cpu, kb.cpus, kb.ugen, can_sd, op):
                self.unlabel(block[0])
                block[0].where, block[0].key = None, 0
                return
            self.consume(ob, own, pfn)
            self.check(ob.owed, ob.owed_ugen, pfn, ts)
            block[0].where, block[0].key = None, 0
            return
        keyed = [pg for pg in block if (pg.where in ("pcp", "unmapped") and pg.key)]
        stamped = any(pg.where == "buddy" and pg.stamp for pg in block)
        if keyed:
            keys = [pg.ob.key if (self.luf_order and pg.ob is not None) else pg.key for pg in keyed]
            cpus = set().union(*(self.KEY[k].cpus for k in keys))
            ugen = max(self.KEY[k].ugen for k in keys)
            if not self.pcp_takeoff(ts, cpu, cpus, ugen, can_sd, op):
                if self.luf_order:
                    for pg in keyed:
                        if pg.where == "pcp":
                            self.unlabel(pg)
                            pg.where, pg.key = None, 0
                return
        if stamped and not self.take_buddy(ts, cpu, pfn, order, can_sd, op):
            return
        for q, pg in zip(range(pfn, pfn + (1 << order)), block, strict=True):
            if self.luf_order and pg.where == "pcp" and pg.key and pg.ob is not None:
                ob = pg.ob
                self.consume(ob, ob, q)
                if not self.check(ob.owed, ob.owed_ugen, q, ts):
                    return
            else:
                ok = self.check(pg.owed, pg.owed_ugen, q, ts)
                pg.owed, pg.owed_ugen = set(), 0
                if not ok:
                    return
            pg.where, pg.key, pg.stamp = None, 0, 0

    # ---- pcp obligations (alloc_order=luf) -----------------------------------------------------------------
    def consume(self, ob: Obligation, own: Obligation, pfn: int) -> None:
        """``ob`` leaves its pcp list in place of ``pfn`` (labelled ``own``): ``own`` takes over ``ob``'s label."""
        if ob is not own:
            own.pfn = ob.pfn
            if ob.pfn >= 0:
                self.pages[ob.pfn].ob = own
        self.pages[pfn].ob = None
        self.pcp[ob.cpu].remove(ob)

    def unlabel(self, pg: Page) -> None:
        if pg.ob is not None:
            pg.ob.pfn = -1
            pg.ob = None

    def check(self, owed: set[int], ugen: int, pfn: int, ts: int) -> bool:
        """The safety invariant: a page reaches a new owner only once no CPU owes a flush for it."""
        if owed and self.diet(owed, ugen):
            self.violations.append((pfn, ts))
            return False
        return True

    # ---- §8.2.9–14: hooks and recorded flushes -------------------------------------------------------------
    def hook(self, r: dict[str, Any]) -> None:
        """F3 fault, F4 write_begin, F5 truncate, F6 mkclean, F7 zap, F10 kthread→user, F13 dirty writeback."""
        h = r["sub"]
        if h == O.H_DIRTY_WB:
            self.dirty_writeback(r)
            return
        if self.choice["hooks"] == "posted":
            return  # §9.1: fold_batch() returns at once (!flush_required): no IPI
        batches = []
        if h in (O.H_FAULT, O.H_ZAP, O.H_CTXSW) and r["mm"] >= 0 and r["mm"] in self.MMB:
            batches.append(self.MMB[r["mm"]])
        if h != O.H_CTXSW and r["mapping"] >= 0 and r["mapping"] in self.ASB:
            batches.append(self.ASB[r["mapping"]])
        target: set[int] = set()
        for b in batches:
            target |= self.diet(b.cpus, b.ugen)
        if target:
            self.flush(r["ts"], r["cpu"], target, O.CAUSES[O.HOOK_CAUSE[h]], r["op"])

    def recorded_flush(self, r: dict[str, Any]) -> None:
        """A flush LUF leaves alone; F9 batched_pending (and, as an option, any natural flush) marks done."""
        cause = O.CAUSES[r["sub"]]
        targets = set(cpuset(r["mask"])) | ({r["cpu"]} if r["flags"] & 1 else set())
        self.decisions.append(Decision(r["ts"], "performed", cause, r["cpu"], frozenset(targets), r["op"]))
        credit: set[int] = set()
        if cause == "batched_pending":  # §3.5: marks ugen_done for mm_cpumask(mm) (risk R6)
            credit = set(cpuset(r["mask2"]))
        elif self.credit_natural and r["flags"] & 2:
            credit = targets
        if credit:
            self.mark_done(credit, self.next_ugen())

    # ---- the op loop ---------------------------------------------------------------------------------------
    def run(self, mops: np.ndarray) -> None:
        names = O.MOP_DTYPE.names
        for row in mops.tolist():
            r = dict(zip(names, row, strict=True))
            for f in ("mask", "mask2"):
                if not isinstance(r[f], int):  # W-word masks: one Python int, as the reference's sets need
                    r[f] = sum(int(x) << (64 * k) for k, x in enumerate(r[f]))
            self.step(r)

    def step(self, r: dict[str, Any]) -> None:
        self.op = r
        handler = self.HANDLERS.get(r["op"])
        if handler is not None:
            handler(self, r)

    HANDLERS: ClassVar[dict[int, Any]] = {
        O.M_FOLIO_BEGIN: folio_begin,
        O.M_PTE: unmap_pte,
        O.M_FOLIO_END: end_folio_unmap,
        O.M_KEEP: reclaim_keep,
        O.M_BATCH: batch_flush,
        O.M_RFLUSH: recorded_flush,
        O.M_FREE: free,
        O.M_DRAIN: pcp_drain,
        O.M_TAKE: take,
        O.M_ALLOC: alloc,
        O.M_HOOK: hook,
    }

    def ipis(self) -> int:
        """Remote IPIs of every performed flush (the sender's own CPU flushes locally)."""
        return sum(len(d.targets - {d.cpu}) for d in self.decisions if d.kind == "performed")


def fast_decisions(dec: np.ndarray) -> list[Decision]:
    """The fast path's decision log (``Model.decisions_array()``) as ``Decision`` rows (performed, deferred)."""
    out = []
    for row in dec.tolist():
        ts, kind, cause, cpu, _task, targets, _ipis, op, _pfn = row
        if not isinstance(targets, int):  # W words (model/widemask.py): word k holds CPUs 64k..64k+63
            targets = sum(int(x) << (64 * k) for k, x in enumerate(targets))
        if kind in (O.D_PERFORMED, O.D_DEFERRED):
            out.append(Decision(ts, O.DECISION_KIND[kind], O.CAUSES[cause], cpu, cpuset(targets), op))
    return out


__all__ = [
    "FAST_PATH_CHOICES",
    "INTENDED_CHOICES",
    "SPEC_CHOICES",
    "Decision",
    "LufBatch",
    "Pass",
    "ReferenceLufV12",
    "cpuset",
    "fast_decisions",
]
