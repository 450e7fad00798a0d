"""What every model shares: options, accumulators, per-page state, logs, stale-window resolution, results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from lufreplay.model import kernels as K
from lufreplay.model import ops as O
from lufreplay.model import widemask
from lufreplay.model.kernels import L_DEC, L_HIST, L_REQ, RD_BINS, fold_stale, resolve_stale, resolve_stale_wide
from lufreplay.model.state import Logs, ModelState, PageState, dec_dtype, new_acc
from lufreplay.model.widemask import MaskArray

# stale-window histogram: 10 bins per decade from 100 ns to 1000 s
SW_EDGES = np.logspace(-7, 3, 101)


class SafetyViolation(RuntimeError):
    """A model handed a pfn to a new owner while a CPU still owed a flush for it: a model bug."""


class StaleWindow:
    """R1: time from a LUF'd folio's unmap to the flush that covers it on every owing CPU.

    Requests (unmap ts, ugen, mask, pages) are resolved against the history of done raises (g, ts, mask) at
    each segment end; unresolved ones carry over, so memory stays bounded by what is still pending.
    """

    def __init__(self) -> None:
        self.req = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.int64))
        self.hist = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint64))
        self.hist_counts = np.zeros(len(SW_EDGES) + 1, np.int64)
        self.count = 0
        self.sum_s = 0.0
        self.max_s = 0.0

    def feed(self, logs: Logs, ncpu: int) -> None:
        nr, nh = int(logs.nlog[L_REQ]), int(logs.nlog[L_HIST])
        rm, hm = (m.data if isinstance(m, MaskArray) else m for m in (logs.req_mask, logs.hist_mask))
        if logs.w > 1 and self.req[2].ndim == 1:  # W-word masks: (n, W) rows
            self.req = (*self.req[:2], np.zeros((0, logs.w), np.uint64), self.req[3])
            self.hist = (*self.hist[:2], np.zeros((0, logs.w), np.uint64))
        new = (logs.req_ts[:nr], logs.req_ugen[:nr], rm[:nr], logs.req_pages[:nr])
        if self.req[0].size == 0:  # nothing carried over: views of the logs (_resolve keeps only copies)
            self.req = new
        else:
            self.req = tuple(np.concatenate([a, b]) for a, b in zip(self.req, new, strict=True))  # type: ignore[assignment]
        self.hist = tuple(
            np.concatenate([a, b[:nh]]) for a, b in zip(self.hist, (logs.hist_g, logs.hist_ts, hm), strict=True)
        )  # type: ignore[assignment]
        self._resolve(ncpu)

    def _resolve(self, ncpu: int) -> None:
        rts, rug, rmask, rpages = self.req
        if rts.size == 0:
            self.req = tuple(a[:0].copy() for a in self.req)  # type: ignore[assignment]
            return
        hg, hts, hmask = self.hist
        resolve = resolve_stale if rmask.ndim == 1 else resolve_stale_wide  # W-word masks: more than 64 CPUs
        cover = resolve(rug, rmask, hg, hts, hmask, ncpu)
        # one numba pass (histogram, max); the float sum stays numpy's, so the mean is bit-for-bit the same as
        # summing the covered requests' w * pages with numpy
        prod = np.empty(rts.size, np.float64)
        unresolved = np.empty(rts.size, np.bool_)
        n, pages, mx = fold_stale(rts, rpages, cover, SW_EDGES, self.hist_counts, prod, unresolved)
        if n:
            self.count += int(pages)
            self.sum_s += float(prod[:n].sum())
            self.max_s = max(self.max_s, float(mx))
        if n == rts.size:  # the usual case: every request is covered
            self.req = tuple(a[:0].copy() for a in self.req)  # type: ignore[assignment]
        else:
            self.req = tuple(a[unresolved] for a in self.req)  # type: ignore[assignment]
        if self.req[0].size:
            keep = hg >= self.req[1].min()
            self.hist = tuple(a[keep] for a in self.hist)  # type: ignore[assignment]
        else:
            self.hist = tuple(a[:0] for a in self.hist)  # type: ignore[assignment]

    def _pct(self, q: float) -> float:
        total = self.hist_counts.sum()
        if total == 0:
            return 0.0
        i = int(np.searchsorted(np.cumsum(self.hist_counts), q * total, side="left"))
        if i == 0:
            return float(SW_EDGES[0])
        return float(SW_EDGES[min(i, len(SW_EDGES) - 1)]) if i < len(SW_EDGES) else self.max_s

    def summary(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean_s": self.sum_s / self.count if self.count else 0.0,
            "p50_s": min(self._pct(0.5), self.max_s),
            "p99_s": min(self._pct(0.99), self.max_s),
            "max_s": self.max_s,
            "pending_at_end": int(self.req[3].sum()),
            "percentiles": "upper edge of 10-per-decade log bins, capped at max",
        }


class Model:
    """Base class: subclasses set ``name`` and ``uses`` (the parts of ``ModelState`` they need) and implement
    ``_run`` (and ``init_state`` when their state does not start at zero)."""

    name = "model"
    uses = 0

    def __init__(self, opts: dict[str, Any], Y: np.ndarray, tl: np.ndarray, ncpu: int, decisions: bool) -> None:
        self.opts = opts
        self.Y = Y
        self.tl = tl
        self.ncpu = ncpu
        self.decisions = decisions
        #: words of the CPU masks (model/widemask.py): 1 (uint64, the original cores) up to 64 involved CPUs
        self.w = widemask.words(ncpu)
        #: the accumulator layout of ``acc`` (``kernels.acc_layout`` for 64·w CPUs)
        self.L = K.acc_layout(64 * self.w)
        self.acc = new_acc(self.L["ACC_SIZE"])
        self.pages = PageState(self.w)
        self.logs = Logs(1024, decisions, self.w)
        self.stale = StaleWindow()
        self.decision_chunks: list[np.ndarray] = []
        #: the real pfn of one of the model's pfns (the engine replays compact ids: ``PfnMap.real_one``)
        self.pfn_of: Callable[[int], int] = int
        self.st = ModelState(self.uses, self.w)
        self.init_state()

    def __getattr__(self, name: str) -> Any:
        # the state's fields read as the model's own (m.SC, m.KEY_mask, m.obl): tests and reports use them
        st = self.__dict__.get("st")
        if st is not None and hasattr(st, name):
            return getattr(st, name)
        raise AttributeError(name)

    def init_state(self) -> None:
        pass

    def core(self, fn: Any) -> Any:
        """The numba core ``fn`` for this model's mask width: ``fn`` itself at one word, else its W-word copy
        (``widemask.core``: compiled on first use, once per process and width)."""
        return fn if self.w == 1 else widemask.core(fn, self.w)

    def ensure(self, n_task: int, n_mm: int, n_map: int, n_ops: int) -> None:
        self.st.ensure(n_task, n_mm, n_map, n_ops, self.pages.n)

    def _run(self, mops: np.ndarray, n: int) -> int:
        raise NotImplementedError

    def run(self, mops: np.ndarray, n: int, max_pfn: int, sizes: tuple[int, int, int]) -> None:
        """Replay ``n`` model ops; carries state to the next call."""
        self.pages.ensure(max_pfn + 1)
        self.ensure(sizes[0], sizes[1], sizes[2], n)
        self.logs.ensure(n + 16, self.decisions)
        stop = self._run(mops, n)
        v = self.L["O_VIOL"]
        if stop >= 0 or self.acc[v] > 0:
            raise SafetyViolation(
                f"{self.name}: pfn {self.pfn_of(int(self.acc[v + 1]))} re-allocated at ts {int(self.acc[v + 2])} ns while a CPU"
                " still owed a flush for it (model bug)"
            )
        self.stale.feed(self.logs, self.ncpu)
        if self.decisions:
            self.decision_chunks.append(self.logs.dec[: int(self.logs.nlog[L_DEC])].copy())

    # ---- results --------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, Any]:
        a, L = self.acc, self.L
        O_IPIS, O_EVENTS, O_LOCAL, O_PERCPU = L["O_IPIS"], L["O_EVENTS"], L["O_LOCAL"], L["O_PERCPU"]
        O_MISC = L["O_MISC"]
        O_HOOK_CALLS, O_HOOK_NOIPI, O_TL, O_HELD_TL = L["O_HOOK_CALLS"], L["O_HOOK_NOIPI"], L["O_TL"], L["O_HELD_TL"]
        O_FID_REC, O_FID_EXPL, O_FID_PRED, O_RD = L["O_FID_REC"], L["O_FID_EXPL"], L["O_FID_PRED"], L["O_RD"]
        by_cause = {
            c: int(a[O_IPIS + i]) for i, c in enumerate(O.CAUSES) if a[O_IPIS + i] or a[O_EVENTS + i] or a[O_LOCAL + i]
        }
        ev_by_cause = {c: int(a[O_EVENTS + i]) for i, c in enumerate(O.CAUSES) if a[O_EVENTS + i]}
        misc = {k: int(a[O_MISC + i]) for i, k in enumerate(O.MISC)}
        hooks = {
            h: {"calls": int(a[O_HOOK_CALLS + i]), "no_ipi": int(a[O_HOOK_NOIPI + i])} for i, h in enumerate(O.HOOKS)
        }
        return {
            "remote_shootdowns": int(a[O_IPIS : O_IPIS + O.NCAUSE].sum()),
            "flush_events": int(a[O_EVENTS : O_EVENTS + O.NCAUSE].sum()),
            "local_flushes": int(a[O_LOCAL : O_LOCAL + O.NCAUSE].sum()),
            "cpus_flushed": int(np.count_nonzero(a[O_PERCPU : O_PERCPU + self.ncpu])),
            "by_cause": by_cause,
            "flush_events_by_cause": ev_by_cause,
            "per_cpu": [int(x) for x in a[O_PERCPU : O_PERCPU + self.ncpu]],
            "misc": misc,
            "hooks": hooks,
            "timeline_bins": a[O_TL : O_TL + O.TIMELINE_BINS].copy(),
            "held_timeline": a[O_HELD_TL : O_HELD_TL + O.TIMELINE_BINS].copy(),
            "fidelity": {
                "recorded": a[O_FID_REC : O_FID_REC + O.NCAUSE].copy(),
                "explained": a[O_FID_EXPL : O_FID_EXPL + O.NCAUSE].copy(),
                "predicted": a[O_FID_PRED : O_FID_PRED + O.NCAUSE].copy(),
            },
            "realloc_hist": a[O_RD : O_RD + RD_BINS].copy(),
            "stale_window": self.stale.summary(),
        }

    def extras(self) -> dict[str, Any]:
        return {}

    def decisions_array(self) -> np.ndarray:
        if not self.decision_chunks:
            return np.zeros(0, dec_dtype(self.w))
        return np.concatenate(self.decision_chunks)
