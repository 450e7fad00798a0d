"""The results document of ``lufreplay simulate`` (``--json``); ``lufreplay report`` renders it.

Every count in ``by_cause`` comes from one accumulator slot per cause that every IPI is added to exactly once,
so ``sum(by_cause.values()) == remote_shootdowns`` for vanilla and for every model.

The models run on dense CPU ids (the CPUs the trace involves); every per-CPU output here is in real CPU ids:
``per_cpu`` lists are indexed by the real id (``trace.nr_cpus`` long, 0 for CPUs the trace never names) and
``fidelity.per_cpu`` rows carry the real id; ``trace.cpus_involved`` lists the CPUs the models ran on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lufreplay.model import ops as O
from lufreplay.model.kernels import layout_of
from lufreplay.model.options import DEFAULTS
from lufreplay.model.vanilla import realloc_bin_edges
from lufreplay.model.widemask import words
from lufreplay.replay import reconstruct as RC
from lufreplay.replay.engine import ReplayResult
from lufreplay.trace.reader import Trace

RISK_NOTES = {
    "R4": "content changes no hook sees (NFS/FUSE/block device, uprobes) are not observable with tracepoints; only hooked changes (F4-F6) are in the trace",
    "R7": "luf_flush_mm's diet of the caller's whole tlb_ubc: the caller's batch is empty at fault time in this model",
    "R9": "arm64 has no IPI to save: with arch=arm64 every folio is rejected (arch_noop)",
}


def _losses(trace: Trace) -> dict[str, Any]:
    """Counted losses. ``bounded``: the bounds below include every loss (losses > 0 on a finished recording);
    an interrupted recording's losses are unknown: ``total`` null, ``complete`` and ``bounded`` false."""
    t = trace.table("losses")
    by_probe: dict[str, int] = {}
    counted = 0
    if t.num_rows:
        df = t.to_pandas()
        by_probe = {str(k): int(v) for k, v in df.groupby("probe")["lost"].sum().items()}
        counted = int(df["lost"].sum())
    if not trace.complete:
        return {"total": None, "counted": counted, "complete": False, "bounded": False, "by_probe": by_probe}
    return {"total": counted, "counted": counted, "complete": True, "bounded": counted > 0, "by_probe": by_probe}


def _duration(meta: dict[str, Any], res: ReplayResult) -> float:
    """The recorded window (meta.json), else the span of the events."""
    w = meta.get("window")
    if isinstance(w, dict) and "duration_s" in w:
        return float(w["duration_s"])
    if isinstance(w, dict) and "start_ns" in w and "end_ns" in w:
        return round((int(w["end_ns"]) - int(w["start_ns"])) / 1e9, 6)
    if "duration_s" in meta:
        return float(meta["duration_s"])
    return round((res.t1 - res.t0) / 1e9, 6)


def _cumulative(bins: np.ndarray, npts: int) -> list[int]:
    return [int(x) for x in np.cumsum(bins)[:npts]]


def trace_kernel(meta: dict[str, Any]) -> str | None:
    """The recorded kernel's release (meta.json)."""
    host = meta.get("host") if isinstance(meta.get("host"), dict) else {}
    return meta.get("kernel") or (host.get("uname") or {}).get("release")


def build(
    trace: Trace, res: ReplayResult, opts: dict[str, Any], requested: list[str], elapsed_s: float
) -> dict[str, Any]:
    """Assemble the results document from a finished replay."""
    ncpu = res.ncpu
    van = res.models["vanilla"]
    va = van.acc
    lay = layout_of(va)  # the models' mask width sets where the per-CPU blocks end
    O_REC_EVENTS, O_REC_PERCPU, O_REC_TL = lay["O_REC_EVENTS"], lay["O_REC_PERCPU"], lay["O_REC_TL"]
    vc = van.counts()
    fid = vc["fidelity"]
    rec_by_cause = {c: int(fid["recorded"][i]) for i, c in enumerate(O.CAUSES) if fid["recorded"][i]}
    recorded = int(fid["recorded"].sum())
    losses = _losses(trace)
    L = losses["counted"]
    meta = trace.meta
    host = meta.get("host") if isinstance(meta.get("host"), dict) else {"hostname": meta.get("host")}
    doc: dict[str, Any] = {
        "trace": {
            "path": str(trace.path),
            "run_id": meta.get("run_id"),
            "duration_s": _duration(meta, res),
            "nr_cpus": res.host_cpus,
            "cpus_involved": [int(c) for c in res.real_cpus()],
            "host": host,
            "kernel": trace_kernel(meta),
            "complete": trace.complete,
            "interrupted": trace.interruption(),
            "interrupted_message": trace.interruption_line(),
            "shootdown_source": trace.shootdown_source(),
        },
        "input_warnings": trace.warnings.as_list(),
        "options": dict(opts),
        "policy": {"alloc_order": opts["alloc_order"], "large_folios": opts["large_folios"]},
        "option_defaults": dict(DEFAULTS),
        "vanilla": {
            "remote_shootdowns": recorded,
            "remote_shootdowns_bounds": [recorded, recorded + L],
            "flush_events": int(va[O_REC_EVENTS : O_REC_EVENTS + O.NCAUSE].sum()),
            "per_cpu": res.per_cpu(va[O_REC_PERCPU : O_REC_PERCPU + ncpu]),
            "by_cause": rec_by_cause,
            "flush_events_by_cause": {
                c: int(va[O_REC_EVENTS + i]) for i, c in enumerate(O.CAUSES) if va[O_REC_EVENTS + i]
            },
        },
        "models": {},
    }
    for name in requested:
        m = res.models[name]
        c = m.counts()
        v = c["remote_shootdowns"]
        spread = L * max(ncpu - 1, 1)
        misc = c["misc"]
        entry = {
            "remote_shootdowns": v,
            "remote_shootdowns_bounds": [max(0, v - spread), v + spread],
            "flush_events": c["flush_events"],
            "cpus_flushed": c["cpus_flushed"],
            "local_flushes": c["local_flushes"],
            "avoided_pct": round(100.0 * (1.0 - v / recorded), 3) if recorded else 0.0,
            "by_cause": c["by_cause"],
            "flush_events_by_cause": c["flush_events_by_cause"],
            "per_cpu": res.per_cpu(c["per_cpu"]),
            "allocations": {k: misc[k] for k in O.ALLOC_COUNTERS},
            "hooks": c["hooks"],
            "deferred": {k: misc[k] for k in ("deferred_cpu_slots", "retired_by_done", "flushed_cpu_slots")},
            "stale_window": c["stale_window"],
            "paid_by_other_task": misc["paid_by_other_flushes"],
            "risks": {
                "R1_stale_window_max_s": c["stale_window"]["max_s"],
                "R1_pending_at_end_pages": c["stale_window"]["pending_at_end"],
                "R2_alloc_flushes": misc["paid_in_alloc_flushes"],
                "R2_paid_by_other_task_flushes": misc["paid_by_other_flushes"],
                "R2_paid_by_other_task_pages": misc["paid_by_other_pages"],
                "R2_epoch_waits": misc["epoch_waits"],
                "R3_atomic_allocs_hitting_luf_pages": misc["atomic_allocs_skipping_luf"],
                "R3_pcp_skips": misc["pcp_skips"],
                "R3_pcp_fallbacks": misc["pcp_fallbacks"],
                "R3_buddy_refusals": misc["buddy_refusals"],
                "R3_pend_first": misc["pend_first"],
                "R3_alloc_failures": misc["alloc_failures"],
                "R4_potential_stale_reads": misc["potential_stale_reads"],
                "R5_hook_calls_without_ipi": sum(h["no_ipi"] for h in c["hooks"].values()),
                "R6_credits_to_cpus_running_other_mm": misc["r6_credits_other_mm"],
                "R8_key_slot_merges": misc["key_merges"],
                "notes": RISK_NOTES,
            },
            "safety": {"checks": misc["safety_checks"], "violations": 0},
        }
        if name == "hold-before-free":
            entry["held_pages"] = {
                "max": misc["held_pages_max"],
                "at_end": misc["held_pages_now"],
                "max_bytes": misc["held_pages_max"] * 4096,
                "timeline_max_per_bin": [int(x) for x in c["held_timeline"]],
            }
        entry.update(m.extras())
        doc["models"][name] = entry
    expl = fid["explained"]
    doc["fidelity"] = {
        "explained_pct": round(100.0 * float(expl.sum()) / recorded, 3) if recorded else 100.0,
        "predicted_not_recorded": int(fid["predicted"].sum() - expl.sum()),
        "by_cause": {
            c: {
                "recorded": int(fid["recorded"][i]),
                "explained": int(expl[i]),
                "pct": round(100.0 * expl[i] / fid["recorded"][i], 3),
            }
            for i, c in enumerate(O.CAUSES)
            if fid["recorded"][i]
        },
    }
    doc["fidelity"].update(precision(fid, va, ncpu, res.real_cpus()))
    doc["fidelity"]["pv_flush"] = pv_flush_estimate(doc["fidelity"]["rebuilt"], recorded, va, meta)
    rs = res.recon_stats
    doc["fidelity"]["cpu_state"] = {
        "switches_of_unknown_kind": int(rs[RC.RS_SWITCH_GUESSED]),
        "batched_ptes_of_unnamed_mm": int(rs[RC.RS_PTE_NO_OWNER]),
    }
    folios = {r: int(rs[RC.RS_FOLIOS + i]) for i, r in enumerate(O.REJECT)}
    pages = {r: int(rs[RC.RS_PAGES + i]) for i, r in enumerate(O.REJECT)}
    doc["eligibility"] = {
        "folios": sum(folios.values()),
        "eligible": folios["eligible"],
        "rejected": {k: v for k, v in folios.items() if k != "eligible" and v},
        "pages": sum(pages.values()),
        "eligible_pages": pages["eligible"],
        "rejected_pages": {k: v for k, v in pages.items() if k != "eligible" and v},
        "pte_provenance": {
            "exact": int(rs[RC.RS_PROV]),
            "inferred": int(rs[RC.RS_PROV + 1]),
            "unknown": int(rs[RC.RS_PROV + 2]),
        },
        "batches": int(rs[RC.RS_BATCHES]),
    }
    if rs[RC.RS_EX_ROWS]:  # the exact tier recorded this trace (meta.exact): what its rows gave the replay
        doc["eligibility"]["exact_tier"] = {
            "pte_rows": int(rs[RC.RS_EX_ROWS]),
            "reclaim_ptes_inferred_agrees": int(rs[RC.RS_EX_AGREE]),
            "reclaim_ptes_inferred_disagrees": int(rs[RC.RS_EX_DISAGREE]),
            "reclaim_ptes_inferred_unknown": int(rs[RC.RS_EX_NO_INFERENCE]),
            "migration_ptes_with_mm": int(rs[RC.RS_EX_MIG_MM]),
            "migration_ptes_mm_unnamed": int(rs[RC.RS_EX_MIG_NO_MM]),
        }
    edges = realloc_bin_edges()
    # The last bin is open-ended: its upper edge (infinity) is null in strict JSON.
    doc["realloc_delay"] = {
        "bin_edges_s": [e if np.isfinite(e) else None for e in edges],
        "counts": [int(x) for x in vc["realloc_hist"]],
        "weight": "pages",
    }
    dt = int(res.tl[1])
    n_bins = O.TIMELINE_BINS
    doc["timeline"] = {
        "t_s": [round((k + 1) * dt / 1e9, 6) for k in range(n_bins)],
        "vanilla": _cumulative(va[O_REC_TL : O_REC_TL + n_bins], n_bins),
    }
    for name in requested:  # "vanilla" is the recorded kernel; the rebuilt vanilla model gets its own key
        key = "vanilla_rebuilt" if name == "vanilla" else name
        doc["timeline"][key] = _cumulative(res.models[name].counts()["timeline_bins"], n_bins)
    doc["losses"] = losses
    doc["replay"] = {
        "raw_events": res.raw_events,
        "model_ops": res.model_ops,
        "seconds": round(elapsed_s, 3),
        "events_per_s": round(res.raw_events / elapsed_s) if elapsed_s > 0 else None,
        "max_cpus": 64 * words(res.ncpu),  # the CPUs the models' masks hold: 64 per word
    }
    return doc


def _pct(num: float, den: float) -> float | None:
    return round(100.0 * num / den, 3) if den else None


def _scores(recorded: float, explained: float, rebuilt: float, matched: float) -> dict[str, Any]:
    return {
        "recall_pct": _pct(explained, recorded),
        "precision_pct": _pct(matched, rebuilt),
        "rebuilt_vs_recorded_pct": _pct(rebuilt - recorded, recorded),
    }


def precision(fid: dict[str, np.ndarray], va: np.ndarray, ncpu: int, real: np.ndarray | None = None) -> dict[str, Any]:
    """Recall (recorded shootdowns the rebuilt vanilla explains), precision (rebuilt shootdowns that the kernel
    really sent: a batch target it predicted and the kernel reached, or a recorded flush passed through) and
    rebuilt / recorded − 1, overall, per cause and per target CPU (``real[c]``: real id of model CPU c)."""
    rec, expl, pred = fid["recorded"], fid["explained"], fid["predicted"]
    matched = pred.astype(np.int64).copy()  # recorded flushes pass through as sent
    matched[O.C_BATCH] = expl[O.C_BATCH]  # a batch's targets are predicted: only those really reached match
    out = _scores(float(rec.sum()), float(expl.sum()), float(pred.sum()), float(matched.sum()))
    out["rebuilt"] = int(pred.sum())
    lay = layout_of(va)
    O_FID_SKIPPED, O_REC_PERCPU, O_FID_EXPL_CPU = lay["O_FID_SKIPPED"], lay["O_REC_PERCPU"], lay["O_FID_EXPL_CPU"]
    O_PERCPU, O_FID_MATCH_CPU = lay["O_PERCPU"], lay["O_FID_MATCH_CPU"]
    # the rebuilt batch targets the kernel did not reach, where the trace says why
    out["batch_not_recorded"] = {
        "total": int(pred[O.C_BATCH] - expl[O.C_BATCH]),
        "flush_sent_to_none": int(va[O_FID_SKIPPED]),  # reason 4 traced, no IPI: lazy unseen or KVM PV skip
        "flush_without_remote_cpu": int(va[O_FID_SKIPPED + 1]),  # no reason 4: the kernel's mask was local only
    }
    out["precision_by_cause"] = {
        c: {"rebuilt": int(pred[i]), **_scores(float(rec[i]), float(expl[i]), float(pred[i]), float(matched[i]))}
        for i, c in enumerate(O.CAUSES)
        if rec[i] or pred[i]
    }
    out["per_cpu"] = []
    for c in range(ncpu):
        r, e, b, m = (float(va[o + c]) for o in (O_REC_PERCPU, O_FID_EXPL_CPU, O_PERCPU, O_FID_MATCH_CPU))
        cpu = int(real[c]) if real is not None else c
        out["per_cpu"].append({"cpu": cpu, "recorded": int(r), "rebuilt": int(b), **_scores(r, e, b, m)})
    return out


def pv_flush_estimate(rebuilt: int, recorded: int, va: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """The rebuilt batch targets that a flush with a traced send did not reach while the model had them running a
    task (vanilla.pv_skip_candidates): what KVM's PV flush skips when the vCPU is preempted, if the recorded host
    had it (meta host.hypervisor.pv_tlb_flush). Reported beside the rebuild, never taken out of it."""
    n = int(va[layout_of(va)["O_FID_PV"]])
    host = meta.get("host")
    hv = host.get("hypervisor") if isinstance(host, dict) else None
    hv = hv if isinstance(hv, dict) else {}
    return {
        "host_pv_tlb_flush": hv.get("pv_tlb_flush"),
        "skip_candidates": n,
        "rebuilt_vs_recorded_pct_without_them": _pct(rebuilt - n - recorded, recorded),
    }


def check_sums(doc: dict[str, Any]) -> None:
    """by_cause must sum exactly to the totals (vanilla and every model); raises AssertionError otherwise."""
    assert sum(doc["vanilla"]["by_cause"].values()) == doc["vanilla"]["remote_shootdowns"]
    assert sum(doc["vanilla"]["per_cpu"]) == doc["vanilla"]["remote_shootdowns"]
    for name, m in doc["models"].items():
        assert sum(m["by_cause"].values()) == m["remote_shootdowns"], name
        assert sum(m["per_cpu"]) == m["remote_shootdowns"], name
