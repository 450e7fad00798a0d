"""Scope: what the traced command's mms caused, apart from the rest of the host (issue 7 item 7).

A trace of one command also holds other processes' reclaim: their unmaps, the batched flushes those cause, their
own flushes. The *target* is the command's processes: the tgids the recorder traced (``meta.target.pids`` and
``targets_final``) and every process they forked (``proc`` fork rows). The target scope is the model-op stream
cut down to the target's own work, and every model is replayed over it beside the whole stream (the host):

* a PTE belongs to the mm it was cleared in (a migration PTE has no mm: to the task that migrated it); a folio
  keeps only its target PTEs and goes when it has none (its page is then freed clean), with its F11 keep;
* a batched flush stays when it carried a target PTE (its rebuilt targets are then the target's PTEs' CPUs
  alone), or, carrying no PTE the trace saw, when a target task sent it; a recorded flush stays when a target
  task sent it or it was of a target mm (another process's flush no longer credits the CPUs it reached: with
  ``credit_natural_flushes`` and in the oracle the target scope may send a few more than its share);
* local full flushes (a switch flushes the CPU whoever runs), the allocator, hooks and reclaim starts stay: the
  host's allocations are what pays the target's deferred flushes under LUF.

So the target figures answer "what would the host have sent for the target's unmaps alone"; the rest of the
host is host − target (a batch mixing both scopes counts its whole recorded IPIs for the target). For the LUF
models the split is not additive: one deferred flush may pay for both scopes' pages.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from lufreplay.model import ops as O
from lufreplay.replay.rawops import IdMap
from lufreplay.trace.reader import Trace

SCOPES = ("host", "target")


def target_tgids(trace: Trace) -> set[int] | None:
    """The target's processes: the recorder's target tgids and all they forked; None for a system-wide trace."""
    meta = trace.meta
    tgt = meta.get("target") if isinstance(meta.get("target"), dict) else {}
    seeds = {int(p) for p in (tgt.get("pids") or []) if int(p) > 0}
    seeds |= {int(p) for p in (meta.get("targets_final") or []) if int(p) > 0}
    if not seeds:
        return None
    if "proc" in trace.tables:
        t = trace.table("proc", columns=["ts_ns", "tgid", "event", "child_tgid"])
        if t.num_rows:
            ts = t.column("ts_ns").to_numpy()
            o = np.argsort(ts, kind="stable")
            ev = t.column("event").to_numpy()[o]
            par = t.column("tgid").to_numpy()[o]
            child = t.column("child_tgid").to_numpy()[o]
            for e, p, c in zip(ev, par, child, strict=True):
                if e == 0 and c > 0 and int(p) in seeds:
                    seeds.add(int(c))
    return seeds


def in_scope_procs(procs: IdMap, tgids: set[int]) -> np.ndarray:
    """Per dense process id: 1 when the process is a target."""
    out = np.zeros(len(procs) + 1, np.uint8)
    for tgid, i in procs.ids.items():
        if tgid in tgids:
            out[i] = 1
    return out


@numba.njit(cache=True)
def _proc_in(proc, in_scope):
    return proc >= 0 and proc < in_scope.shape[0] and in_scope[proc] != 0


@numba.njit(cache=True)
def _task_in(task, T, t_proc, in_scope):
    return task >= 0 and task < T.shape[0] and _proc_in(T[task, t_proc], in_scope)


@numba.njit(cache=True)
def _mm_in(mm, MM, in_scope):
    return mm >= 0 and mm < MM.shape[0] and _proc_in(MM[mm, 0], in_scope)


@numba.njit(cache=True, nogil=True)
def scope_filter(mops, n, in_scope, MM, T, t_proc, out, elig):
    """Copy the target-scope ops of ``mops[:n]`` into ``out`` (module docstring); returns their count.
    ``elig`` (folios then pages by rejection reason, ``reconstruct.RS_FOLIOS``/``RS_PAGES`` layout, then batches)
    counts the target's folios and batches: the eligibility the target's figures rest on, whoever else reclaimed
    at the same time."""
    nrej = (elig.shape[0] - 1) // 2
    m = 0
    folio_at = -1  # where the open folio starts in out
    folio_in = False
    dropped = False  # the last folio went (its F11 keep goes too)
    ptes = 0  # PTE ops since the last batch, and how many were the target's
    kept = 0
    for i in range(n):
        r = mops[i]
        op = r["op"]
        if op == O.M_FOLIO_BEGIN:
            folio_at = m
            folio_in = False
            out[m] = r
            m += 1
        elif op == O.M_PTE:
            ptes += 1
            mine = _mm_in(r["mm"], MM, in_scope) if r["mm"] >= 0 else _task_in(r["task"], T, t_proc, in_scope)
            if mine:
                kept += 1
                folio_in = True
                out[m] = r
                m += 1
        elif op == O.M_FOLIO_END:
            if folio_at >= 0 and not folio_in:
                m = folio_at
                dropped = True
            else:
                out[m] = r
                m += 1
                dropped = False
                if folio_at >= 0:
                    elig[r["sub"]] += 1
                    elig[nrej + r["sub"]] += np.int64(1) << r["order"]
            folio_at = -1
        elif op == O.M_KEEP:
            if not dropped:
                out[m] = r
                m += 1
        elif op == O.M_BATCH:
            if kept > 0 or (ptes == 0 and _task_in(r["task"], T, t_proc, in_scope)):
                out[m] = r
                m += 1
                elig[2 * nrej] += 1
            ptes = 0
            kept = 0
        elif op == O.M_RFLUSH:
            if _task_in(r["task"], T, t_proc, in_scope) or _mm_in(r["mm"], MM, in_scope):
                out[m] = r
                m += 1
        else:
            out[m] = r
            m += 1
    return m


def choose_scope(requested: str | None, tgids: set[int] | None) -> tuple[str, str]:
    """The scope the headline shows and why (the default is argued in docs/simulate.md, "Scope")."""
    if requested == "target" and tgids is None:
        raise ValueError("--scope target: the trace has no target (recorded system-wide)")
    if requested in SCOPES:
        return requested, "--scope " + requested
    if requested is not None:
        raise ValueError(f"--scope {requested!r}: expected one of {', '.join(SCOPES)}")
    if tgids is None:
        return "host", "default; the trace has no target (recorded system-wide)"
    return "host", (
        "default: LUF's state (keys, pcp lists, done stamps) is shared by every mm and the recorded kernel's count"
        " is host-wide, so the host replay is the one checked against it; --scope target shows the command's mms alone"
    )


def summary(doc_models: dict[str, Any], recorded: int) -> dict[str, Any]:
    """A scope's totals: recorded remote shootdowns and each model's, with its by-cause split."""
    return {
        "recorded": recorded,
        "models": {
            k: {"remote_shootdowns": v["remote_shootdowns"], "by_cause": v["by_cause"]} for k, v in doc_models.items()
        },
    }
