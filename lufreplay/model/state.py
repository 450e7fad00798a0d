"""Model state containers shared by the model cores: per-page arrays, options vector, accumulators, logs.

Per tracked page a model keeps (``PageState``): state (1 B), key (4 B), zone stamp (8 B), unmap time (8 B),
unmapping task (4 B), and the shadow debt used by the safety check: CPUs owed (8 B) and the request ugen (8 B)
— 41 bytes per page id. The engine replays compact pfn ids (``replay.rawops.PfnMap``: one id per page the trace
touches), so the arrays follow the pages touched, not the host's pfn range. With W-word masks (more than 64
involved CPUs, model/widemask.py) every mask is 8·W bytes: the CPUs owed per page, and the mask arrays
(``masks``: ``MaskArray``s), whose per-CPU companions (``done``, ``strikes``) have 64·W entries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lufreplay.model import ops as O
from lufreplay.model.kernels import ACC_SIZE
from lufreplay.model.pcpfifo import Obligations
from lufreplay.model.widemask import MaskArray, wide_dtype

#: a CPU-mask array: uint64 at one word, else a ``MaskArray`` (model/widemask.py)
Masks = np.ndarray | MaskArray


def masks(n: int, w: int) -> Masks:
    """``n`` empty CPU masks of ``w`` words."""
    return np.zeros(n, np.uint64) if w == 1 else MaskArray.zeros(n, w)


def dec_dtype(w: int) -> np.dtype:
    """The decision record of a ``w``-word model."""
    return O.DEC_DTYPE if w == 1 else wide_dtype(O.DEC_DTYPE, ("targets",), w)


# page states (luf-model.md §8.1)
P_NONE, P_UNMAPPED, P_PCP_CLEAN, P_PCP_LUF, P_BUDDY_CLEAN, P_BUDDY_LUF, P_TAKEN, P_HELD = range(8)
PAGE_STATE_NAMES = (
    "none",
    "unmapped_pending_free",
    "pcp_clean",
    "pcp_luf",
    "buddy_clean",
    "buddy_luf",
    "taken",
    "held",
)

# model options vector (float64)
(
    Y_UNEXPLAINED_FLUSH,
    Y_PCP_STRIKES,
    Y_EPOCH_LAT_NS,
    Y_CREDIT_NATURAL,
    Y_HBF_MAX,
    Y_HBF_RECLAIM,
    Y_V11_ATOMIC,
    Y_NCPU,
    Y_ALLOC_LUF,
    Y_NON_LUF_OK,
    Y_LARGE_ELIG,
    Y_HOOKS_POSTED,
    Y_LAZY_AT_FLUSH,
    Y_ORACLE_LOCAL,
    Y_KEEP_POSTED,
    Y_DIRTY_POSTED,
) = range(16)
NY = 16

BYTES_PER_PAGE = 1 + 4 + 8 + 8 + 4 + 8 + 8


def model_options(opts: dict[str, Any], ncpu: int) -> np.ndarray:
    y = np.zeros(NY, dtype=np.float64)
    y[Y_UNEXPLAINED_FLUSH] = 1.0 if opts["unexplained_targets"] == "flush" else 0.0
    y[Y_PCP_STRIKES] = float(opts["pcp_strikes"])
    y[Y_EPOCH_LAT_NS] = float(opts["epoch_flush_latency_us"]) * 1000.0
    y[Y_CREDIT_NATURAL] = 1.0 if opts["credit_natural_flushes"] else 0.0
    y[Y_HBF_MAX] = float(opts["hbf_max_held_pages"])
    y[Y_HBF_RECLAIM] = 1.0 if opts["hbf_flush_on_reclaim"] else 0.0
    y[Y_V11_ATOMIC] = 1.0 if opts["v11_atomic_flush"] else 0.0
    y[Y_NCPU] = float(ncpu)
    y[Y_ALLOC_LUF] = 1.0 if opts["alloc_order"] == "luf" else 0.0
    y[Y_NON_LUF_OK] = 1.0 if opts["non_luf_ok"] else 0.0
    y[Y_LARGE_ELIG] = 1.0 if opts["large_folios"] == "eligible" else 0.0
    y[Y_HOOKS_POSTED] = 1.0 if opts.get("hooks") == "posted" else 0.0
    y[Y_LAZY_AT_FLUSH] = 0.0 if opts["clip_to_recorded"] else 1.0
    y[Y_ORACLE_LOCAL] = 1.0 if opts["oracle_local_flushes"] else 0.0
    y[Y_KEEP_POSTED] = 1.0 if opts.get("keep") == "posted" else 0.0
    y[Y_DIRTY_POSTED] = 1.0 if opts.get("dirty_writeback") == "posted" else 0.0
    return y


class PageState:
    """Per-page arrays indexed by (compact) pfn, grown on demand to cover the largest id seen."""

    def __init__(self, w: int = 1) -> None:
        self.n = 0
        self.state = np.zeros(0, np.uint8)
        self.key = np.zeros(0, np.int32)
        self.stamp = np.zeros(0, np.int64)
        self.unmap_ts = np.zeros(0, np.int64)
        self.unmap_task = np.zeros(0, np.int32)
        self.sh_mask = masks(0, w)
        self.sh_ugen = np.zeros(0, np.int64)

    def ensure(self, n: int, exact: bool = False) -> None:
        if n <= self.n:
            return
        if not exact:
            n = max(n, int(self.n * 1.5), 1024)
        for name in ("state", "key", "stamp", "unmap_ts", "unmap_task", "sh_mask", "sh_ugen"):
            setattr(self, name, grow(getattr(self, name), n, exact=True))
        self.n = n

    @property
    def nbytes(self) -> int:
        return sum(
            _nbytes(getattr(self, k)) for k in ("state", "key", "stamp", "unmap_ts", "unmap_task", "sh_mask", "sh_ugen")
        )


def _nbytes(a: Masks) -> int:
    return int(a.data.nbytes if isinstance(a, MaskArray) else a.nbytes)


def grow(a: Any, n: int, fill: int = 0, exact: bool = False) -> Any:
    """``a`` (an array or a ``MaskArray``) extended to at least ``n`` rows (first axis), new rows = ``fill``;
    ``exact``: to ``n`` rows, no headroom."""
    if isinstance(a, MaskArray):
        return a if len(a.data) >= n else MaskArray(grow(a.data, n, fill, exact))
    if a.shape[0] >= n:
        return a
    if not exact:
        n = max(n, int(a.shape[0] * 1.5), 16)
    # zeros: calloc'd pages cost nothing until touched (the op buffers are sized for the worst case)
    new = np.zeros((n, *a.shape[1:]), a.dtype) if fill == 0 else np.full((n, *a.shape[1:]), fill, dtype=a.dtype)
    new[: a.shape[0]] = a
    return new


class Logs:
    """Per-run buffers: decisions (only with --out), stale-window requests and done history."""

    def __init__(self, capacity: int, decisions: bool, w: int = 1) -> None:
        # only the first nlog[...] entries are ever read, so the buffers need no zeroing
        self.w = w
        self.dec = np.empty(3 * capacity if decisions else 0, dec_dtype(w))
        self.req_ts = np.empty(capacity, np.int64)
        self.req_ugen = np.empty(capacity, np.int64)
        self.req_mask = np.empty(capacity, np.uint64) if w == 1 else MaskArray(np.empty((capacity, w), np.uint64))
        self.req_pages = np.empty(capacity, np.int64)
        self.hist_g = np.empty(2 * capacity, np.int64)
        self.hist_ts = np.empty(2 * capacity, np.int64)
        self.hist_mask = (
            np.empty(2 * capacity, np.uint64) if w == 1 else MaskArray(np.empty((2 * capacity, w), np.uint64))
        )
        self.nlog = np.zeros(4, np.int64)

    def args(self) -> tuple[np.ndarray, ...]:
        """The log arguments of a core, in its order: decisions, counts, done history, stale-window requests."""
        return (self.dec, self.nlog, self.hist_g, self.hist_ts, self.hist_mask, self.req_ts, self.req_ugen,
                self.req_mask, self.req_pages)  # fmt: skip

    def ensure(self, capacity: int, decisions: bool) -> None:
        """Room for ``capacity`` ops: requests ≤ 1 per op, history ≤ 2 per op, decisions ≤ 3 per op."""
        if self.req_ts.shape[0] < capacity:
            self.__init__(max(capacity, 2 * self.req_ts.shape[0]), decisions, self.w)  # type: ignore[misc]
        elif decisions and self.dec.shape[0] < 3 * capacity:
            self.dec = np.empty(3 * capacity, dec_dtype(self.w))
        self.nlog[:] = 0


def new_acc(size: int = ACC_SIZE) -> np.ndarray:
    return np.zeros(size, np.int64)


class LufBatches:
    """``mm->luf_batch`` and ``address_space->luf_batch`` (luf-model §2.3): {mask, ugen} per dense mm / mapping id."""

    def __init__(self, w: int = 1) -> None:
        self.MMB_mask = masks(0, w)
        self.MMB_ugen = np.zeros(0, np.int64)
        self.ASB_mask = masks(0, w)
        self.ASB_ugen = np.zeros(0, np.int64)

    def ensure(self, n_mm: int, n_map: int) -> None:
        self.MMB_mask = grow(self.MMB_mask, n_mm)
        self.MMB_ugen = grow(self.MMB_ugen, n_mm)
        self.ASB_mask = grow(self.ASB_mask, n_map)
        self.ASB_ugen = grow(self.ASB_ugen, n_map)


# ---- the one state layout of every model core ------------------------------------------------------------
# int64 scalars (``SC``). Shared: G (the ugen / generation counter), the folio being walked (CAN_LUF, CUR_*) and
# the number of buffered eligible folios (NBUF). luf-v12: the key counter and the zone (§8.1); luf-v11 and
# hold-before-free: GEN_DONE (the generation the last full flush reached) and HELD (pages held).
(G, CAN_LUF, CUR_PFN, CUR_ORDER, CUR_TS, NBUF, KCTR, Z_OPEN, Z_DONE, Z_LUFUGEN, NR_LUF, Z_DONE_TS, Z_PREV_DONE,
 POOL_UGEN, GEN_DONE, HELD) = range(16)  # fmt: skip
NSC = 16
# uint64 scalars (``SU``): the open batch (LUF_MASK, NONLUF_MASK, FOLIO_RO: the ro PTEs of the folio being
# walked; COVERED: LUF work F11 already flushed this batch), luf-v12's zone batch and pend pool debt, the pending
# mask of luf-v11 / hold-before-free (PMASK), vanilla's union of the batch's PTE targets (BATCH_ALL) and the
# remote CPUs a flush sent by the current op skips (LAZY_MASK: rmap.lazy_now, §9.7; a mask, so that it can be W
# words wide like the others, model/widemask.py).
LUF_MASK, NONLUF_MASK, FOLIO_RO, COVERED, ZB_MASK, POOL_MASK, PMASK, BATCH_ALL, LAZY_MASK = range(9)
NSU = 9
NKEYS = 65536
#: the parts of the state a model uses (a part it does not use stays zero-size)
USE_KEYS, USE_BATCHES, USE_TASKS, USE_FIFO, USE_BUF = 1, 2, 4, 8, 16


class ModelState:
    """Every array and scalar vector any model core uses, as one struct of arrays; a core gets the fields unpacked
    (numba passes each array as its own argument, which keeps calls cheap)."""

    def __init__(self, uses: int, w: int = 1) -> None:
        self.uses = uses
        self.SC = np.zeros(NSC, np.int64)
        self.SU = masks(NSU, w)
        self.done = np.zeros(64 * w, np.int64)  # per CPU: as many as the masks hold
        self.strikes = np.zeros(64 * w, np.int64)
        nk = NKEYS if uses & USE_KEYS else 0
        self.KEY_mask = masks(nk, w)  # luf-v12: KEY[k] = {mask, ugen}
        self.KEY_ugen = np.zeros(nk, np.int64)
        self.batches = LufBatches(w)
        self.task_key = np.zeros(0, np.int64)  # luf-v12: the key of each task's last batch (F13)
        self.task_anon_key = np.zeros(0, np.int64)  # key (v12) or generation (v11) of anon folios with no pfn
        self.buf = np.zeros((0, 3), np.int64)  # eligible folios of the open batch: pfn, order, unmap ts
        self.obl = Obligations(w)

    def head(self) -> tuple[np.ndarray, ...]:
        """The first state arguments of every LUF core: SC, SU, done and the mm / mapping batches."""
        b = self.batches
        return (self.SC, self.SU, self.done, b.MMB_mask, b.MMB_ugen, b.ASB_mask, b.ASB_ugen)

    def ensure(self, n_task: int, n_mm: int, n_map: int, n_ops: int, n_pages: int) -> None:
        if self.uses & USE_BATCHES:
            self.batches.ensure(n_mm, n_map)
        if self.uses & USE_TASKS:
            self.task_key = grow(self.task_key, n_task)
            self.task_anon_key = grow(self.task_anon_key, n_task)
        if self.uses & USE_BUF:
            self.buf = grow(self.buf, n_ops + 1)
        if self.uses & USE_FIFO:
            self.obl.ensure(n_pages, n_ops)
