#!/usr/bin/env python3
"""Summarise one test-bed run from the files in its OUTDIR (the guest's counter snapshots and the JSON that
`lufreplay info --json` / `lufreplay simulate --json` printed on the host) and check it.

Usage: summarize.py OUTDIR [--check]. With --check the exit status is 1 when the run is not a good
recording: record failed, the trace's kernel is not the guest's, a tracepoint that kernel series lacks is not
listed as absent, the shootdowns do not come from an exact source or do not reconcile with the guest's
/proc/interrupts within 1 %, or too little reclaim happened to mean anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: Per kernel series, tracepoints it lacks (the thp:*_migration_pmd ones exist only with THP migration
#: configured); 6.1 has no csd:csd_queue_cpu, so its shootdowns come from the flush function (fentry/kprobe).
MISSING = {
    "6.12": {"vmscan:mm_vmscan_reclaim_pages"},
    "6.1": {"vmscan:mm_vmscan_reclaim_pages", "csd:csd_queue_cpu", "ipi:ipi_send_cpu", "ipi:ipi_send_cpumask"},
}


def tlb_row(path: Path) -> list[int]:
    """Per-CPU counts of the TLB row of a /proc/interrupts snapshot."""
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "TLB:":
            return [int(x) for x in parts[1:] if x.isdigit()]
    return []


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    check = "--check" in argv[1:]
    guest = dict(ln.split("=", 1) for ln in (out / "guest.txt").read_text().splitlines() if "=" in ln)
    info = json.loads((out / "info.json").read_text())
    sim = json.loads((out / "simulate.json").read_text())
    meta = info["meta"]
    rec = info["reconciliation"]
    tlb = rec["tlb_shootdowns"]
    before, after = tlb_row(out / "interrupts.before"), tlb_row(out / "interrupts.after")
    irq_run = [a - b for a, b in zip(after, before, strict=False)]
    recorded = sum(tlb["recorded"])
    models = sim.get("models") or {}
    line = {
        "case": guest.get("case"),
        "kernel": guest.get("kernel"),
        "cpus": int(guest.get("cpus", 0)),
        "record_wall_s": float(guest.get("record_wall_s", "nan")),
        "events": meta.get("events"),
        "probes_absent": meta.get("probes_absent"),
        "shootdown_source": (meta.get("shootdown_source") or {}).get("source"),
        "recorded_shootdowns": recorded,
        "recorded_per_cpu": tlb["recorded"],
        "proc_interrupts_window_per_cpu": tlb["proc_interrupts"],
        "reconcile_max_rel_error": tlb["max_rel_error"],
        "proc_interrupts_whole_run": sum(irq_run),
        "reclaimed_pages": rec["reclaim"]["recorded"],
        "pgsteal": rec["reclaim"]["vmstat"],
        "rebuilt_vanilla": (models.get("vanilla") or {}).get("remote_shootdowns"),
        "explained_pct": (sim.get("fidelity") or {}).get("explained_pct"),
        **{
            f"{m}_shootdowns": (models.get(m) or {}).get("remote_shootdowns")
            for m in ("luf-v12", "luf-v11", "hold-before-free", "oracle")
        },
        "luf_v12_avoided_pct": (models.get("luf-v12") or {}).get("avoided_pct"),
    }
    print(json.dumps(line))
    if not check:
        return 0
    bad = []
    if guest.get("record_rc") != "0" or not meta.get("complete"):
        bad.append(f"record failed (rc {guest.get('record_rc')})")
    kernel = str(guest.get("kernel", ""))
    release = ((meta.get("host") or {}).get("uname") or {}).get("release")
    if release != kernel:
        bad.append(f"the trace's kernel {release} is not the guest's {kernel}")
    series = ".".join(kernel.split(".")[:2])
    if series not in MISSING:
        bad.append(f"kernel {kernel}: not a test-bed series ({', '.join(MISSING)})")
    elif not MISSING[series] <= set(meta.get("probes_absent") or []):
        bad.append(f"probes_absent {meta.get('probes_absent')} does not list what {series} lacks")
    if not (meta.get("shootdown_source") or {}).get("exact"):
        bad.append(f"shootdowns not from an exact source: {meta.get('shootdown_source')}")
    if tlb["max_rel_error"] is None or tlb["max_rel_error"] > 0.01:
        bad.append(f"shootdowns do not reconcile with /proc/interrupts: {tlb['recorded']} vs {tlb['proc_interrupts']}")
    if recorded < 100 or not line["reclaimed_pages"]:
        bad.append(f"too little to measure: {recorded} shootdowns, {line['reclaimed_pages']} pages reclaimed")
    for b in bad:
        print(f"testbed: {out.name}: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
