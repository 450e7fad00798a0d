"""``lufreplay doctor``: what ``record`` can capture on this host, at which fidelity, and how to fix the rest."""

from __future__ import annotations

import os
from typing import Any

from lufreplay.capture import features, probes

EXACT, INFERRED, MISSING = "exact", "inferred", "missing"

FIX_SETUP = "run scripts/setup.sh as root (installs python3-bpfcc and kernel headers bcc can use)"
FIX_TRACEFS = "mount -t tracefs nodev /sys/kernel/tracing"
FIX_HEADERS = "install linux-headers-$(uname -r) (or run scripts/setup.sh, which links the closest Debian headers)"
FIX_ROOT = "run as root: sudo lufreplay doctor"


def _check(name: str, ok: bool | None, detail: str, fix: str = "", required: bool = False) -> dict[str, Any]:
    """One line of the checks table; ``ok`` None means "not tried" or "unknown"."""
    status = "ok" if ok else ("fail" if required else "warn") if ok is False else "unknown"
    return {"check": name, "status": status, "ok": ok, "required": required, "detail": detail, "fix": fix}


def _pmu_detail(pmu: dict[str, Any]) -> str:
    """Which TLB-miss events open here (record counts them per CPU into the usage table)."""
    evs = pmu.get("events") or {pmu.get("event", "dTLB-load-misses"): "ok" if pmu.get("ok") else pmu.get("error", "")}
    ok = [k for k, v in evs.items() if v == "ok"]
    bad = {k: v for k, v in evs.items() if v != "ok"}
    parts = [f"{', '.join(ok)}: available"] if ok else []
    if bad:
        errs = set(bad.values())
        parts.append(f"{', '.join(bad)}: " + ("; ".join(errs) if len(errs) > 1 else errs.pop()))
    return "; ".join(parts)


def checks(det: dict[str, Any]) -> list[dict[str, Any]]:
    """The environment checks, in the order a user fixes them."""
    out: list[dict[str, Any]] = []
    caps = det.get("capabilities", {})
    bpf_caps = bool(caps.get("CAP_BPF") or caps.get("CAP_SYS_ADMIN"))
    out.append(
        _check(
            "root",
            det["root"] and bpf_caps,
            f"euid {det['euid']}; CapEff {caps.get('CapEff')}" + ("" if bpf_caps else " (no CAP_BPF/CAP_SYS_ADMIN)"),
            "" if det["root"] and bpf_caps else FIX_ROOT + " with full capabilities",
            required=True,
        )
    )
    tfs = det["tracefs"]
    out.append(_check("tracefs", tfs["ok"], tfs["path"] or tfs["error"] or "", "" if tfs["ok"] else FIX_TRACEFS, True))
    bcc = det["bcc"]
    if bcc.get("version"):
        out.append(_check("bcc import", True, f"bcc {bcc['version']} (import {bcc.get('import_s')} s)", required=True))
    elif bcc.get("import"):
        out.append(
            _check("bcc import", True, f"python3-bpfcc installed ({bcc.get('error', 'not imported')})", required=True)
        )
    else:
        out.append(
            _check("bcc import", False, bcc.get("error") or "python3-bpfcc not installed", FIX_SETUP, required=True)
        )
    out.append(probe_source_check())
    tp = det["attach"]["tracepoint"]
    if tp.get("ok"):
        detail = f"compile+load+attach {bcc.get('compile_load_attach_s')} s; fired {tp.get('fired')} times"
    else:
        detail = tp.get("error", "")
    denied = tp.get("ok") is None or "not permitted" in detail
    fix = "" if tp.get("ok") else (FIX_ROOT if denied else FIX_SETUP)
    out.append(_check("bcc trial TRACEPOINT_PROBE", tp.get("ok"), detail, fix, required=True))
    rb = det["ringbuf"]
    out.append(
        _check(
            "BPF ring buffer",
            rb.get("ok"),
            f"{rb.get('size', 0) // 1024} KiB map created" if rb.get("ok") else rb.get("error", ""),
            "" if rb.get("ok") else "needs Linux >= 5.8 and CAP_BPF",
            required=True,
        )
    )
    hdr = det["kernel_headers"]
    release = det.get("host", {}).get("uname", {}).get("release") or os.uname().release
    if hdr.get("target") is None:
        out.append(_check("kernel headers", False, f"none for {release}", FIX_HEADERS, required=True))
    elif hdr.get("matches"):
        out.append(_check("kernel headers", True, f"{hdr['target']} ({hdr.get('release')})"))
    else:
        out.append(
            _check(
                "kernel headers",
                False,
                f"{hdr.get('release') or '?'} headers on a {release} kernel: only tracepoint fields are safe"
                " (no struct dereference)",
                "install linux-headers-$(uname -r) for full-fidelity struct reads (not needed by record)",
            )
        )
    missing = det["tracepoints_missing"]
    n = len(det["tracepoints"])
    out.append(
        _check(
            "tracepoints",
            (not missing) if det["tracefs"]["ok"] else None,
            f"{n - len(missing)}/{n} needed present with format"
            + (f"; missing: {', '.join(missing[:6])}{'…' if len(missing) > 6 else ''}" if missing else ""),
            "" if not missing else "these families lose fidelity (see below); a newer kernel adds them",
        )
    )
    att = det["attach"]
    for kind, fix in (
        (
            "raw_tracepoint",
            "the flush/IPI and page allocator probes fall back to classic tracepoints (more recursion misses)",
        ),
        ("tp_btf", "not needed: classic tracepoints are used"),
        ("fentry", "not needed: the exact tier uses kprobes"),
        ("kprobe", "needs CONFIG_KPROBES=y; gives the exact tier (PTE RO/RW and migration mm from the rmap walk)"),
    ):
        a = att[kind]
        detail = a.get("error") or ("loaded and attached" + (f", fired {a['fired']} times" if "fired" in a else ""))
        out.append(_check(f"attach {kind}", a.get("ok"), detail, "" if a.get("ok") else fix))
    ex = det.get("exact_tier", {})
    ok = bool(ex.get("ok")) and att["kprobe"].get("ok") is not False
    out.append(
        _check(
            "exact tier",
            ok,
            "record compiles in kprobes on " + ", ".join(probes.EXACT_FUNCTIONS)
            if ok
            else f"tracepoint tier only: {ex.get('reason') or 'kprobes do not attach'}",
            "" if ok else "PTE RO/RW of reclaim is inferred from /proc/PID/maps and migration rows carry no mm",
        )
    )
    cal = det.get("page_pfn", {})
    out.append(
        _check(
            "struct page → pfn calibration",
            cal.get("ok"),
            (
                f"{cal.get('agreeing')}/{cal.get('pairs')} classic/raw mm_page_alloc pairs agree on one vmemmap base;"
                f" sizeof(struct page) = {cal.get('struct_page_size')}"
            )
            if cal.get("ok")
            else str(cal.get("error") or "not tried"),
            ""
            if cal.get("ok")
            else "page allocator probes use classic tracepoints: page frees in IRQ context may be lost",
        )
    )
    btf = det["btf"]
    out.append(_check("BTF", btf["vmlinux"], btf["path"] if btf["vmlinux"] else "no /sys/kernel/btf/vmlinux", ""))
    pmu = det["pmu_tlb"]
    out.append(
        _check(
            "PMU TLB events",
            pmu.get("ok"),
            _pmu_detail(pmu),
            ""
            if pmu.get("ok")
            else "record marks the trace counters.pmu absent with this errno; no TLB-miss counts"
            " (virtual machines often expose no PMU)",
        )
    )
    mc = det["memcg"]
    out.append(
        _check(
            "memory cgroup",
            mc["version"] is not None,
            f"v{mc['version']} at {mc['mount']}" if mc["version"] else "no memory controller mounted",
            "" if mc["version"] else "mount the memory controller (cgroup v2 or v1) to use --memory-limit",
        )
    )
    cfg = det["kernel_config"]
    flags = cfg["flags"]
    out.append(
        _check(
            "kernel config",
            None if cfg["source"] is None else flags.get("ARCH_WANT_BATCHED_UNMAP_TLB_FLUSH") == "y",
            (cfg["source"] or "no /proc/config.gz or /boot/config-$(uname -r)")
            + ": "
            + ", ".join(f"{k}={v}" for k, v in flags.items() if k in features.CONFIG_FLAGS[:6]),
            ""
            if flags.get("ARCH_WANT_BATCHED_UNMAP_TLB_FLUSH") == "y"
            else "without batched unmap flush the kernel has no reclaim batches for LUF to extend",
        )
    )
    luf = det["luf"]
    out.append(
        _check(
            "kernel is vanilla (no LUF)",
            None if luf["present"] is None else not luf["present"],
            ("LUF symbols found: " + ", ".join(luf["symbols"][:5])) if luf["present"] else "no luf_* symbols",
            "this kernel already defers flushes: a recording is not a vanilla baseline" if luf["present"] else "",
        )
    )
    fa = det.get("flush_tlb_func")
    out.append(
        _check(
            "flush_tlb_func address",
            fa is not None,
            fa or "not found in /proc/kallsyms (hidden: kernel.kptr_restrict, or not root)",
            "" if fa else "remote shootdowns cannot be told apart from other cross-CPU calls; " + FIX_ROOT,
        )
    )
    hv = det.get("host", {}).get("hypervisor", {})
    pv = hv.get("pv_tlb_flush")
    out.append(
        _check(
            "no hypervisor PV TLB flush",
            None if pv is None and hv.get("guest") else not pv,
            (f"{hv.get('vendor') or 'hypervisor'} guest; " if hv.get("guest") else "bare metal; ")
            + (
                "PV remote TLB flush active: flushes of preempted vCPUs are done by the host, invisible here"
                if pv
                else ("PV TLB flush not seen in dmesg" if pv is False else "dmesg unreadable")
            ),
            "counts are a lower bound of what a bare-metal host would send" if pv else "",
        )
    )
    return out


def _attach_types(raw_ok: bool, page_ok: bool) -> dict[str, str]:
    """Tracepoint → attach type the recorder will use (it prefers raw tracepoints where they work; the page
    allocator ones also need the struct page pointer → pfn calibration)."""
    try:
        from lufreplay.capture import probes

        return probes.attach_types(raw_ok, raw_ok and page_ok)
    except Exception:
        return {}


def _fid(ok: bool, partial: bool = False) -> str:
    return EXACT if ok else (INFERRED if partial else MISSING)


def families(det: dict[str, Any]) -> list[dict[str, Any]]:
    """Event families ``record`` captures, each with fidelity (exact / inferred / missing) and attach type."""
    tps = det["tracepoints"]
    can_trace = bool(det["attach"]["tracepoint"].get("ok")) or (
        det["attach"]["tracepoint"].get("ok") is None and det["tracefs"]["ok"]
    )

    def have(family: str) -> tuple[bool, bool, list[str]]:
        names = features.TRACEPOINTS[family]
        miss = [n for n in names if not tps[n]["format"]]
        return not miss and can_trace, len(miss) < len(names) and can_trace, miss

    out: list[dict[str, Any]] = []

    def add(name: str, fidelity: str, attach: str, source: str, note: str = "", fix: str = "") -> None:
        out.append({"family": name, "fidelity": fidelity, "attach": attach, "source": source, "note": note, "fix": fix})

    page_cal = det.get("page_pfn", {})
    attach_of = _attach_types(bool(det["attach"]["raw_tracepoint"].get("ok")), bool(page_cal.get("ok")))

    def attach(fam: str) -> str:
        return "+".join(sorted({attach_of.get(tp, "tracepoint") for tp in features.TRACEPOINTS.get(fam, ())}))

    def tp_family(fam: str, title: str, note: str = "", partial_note: str = "") -> None:
        full, part, miss = have(fam)
        fid = _fid(full, part)
        n = note if full else (partial_note or f"missing {', '.join(miss)}")
        fix = "" if full else ("" if can_trace else FIX_SETUP) or f"kernel lacks {', '.join(miss[:3])}"
        add(title, fid, attach(fam) if part or full else "-", ", ".join(features.TRACEPOINTS[fam]), n, fix)

    tp_family("tlb_flush", "TLB flushes (sender side: reason, pages)")
    full, _, _ = have("shootdown")
    fa = det.get("flush_tlb_func") is not None
    sk = det.get("shoot_probe", {})
    # the probes record would use, best first, that the trials did not see fail
    sk_probes = [p for p in sk.get("probes") or [] if det["attach"].get(p, {}).get("ok") is not False]
    if full and fa:
        add("remote shootdowns (targets)", EXACT, attach("shootdown"), "csd:csd_queue_cpu func == flush_tlb_func")
    elif sk.get("ok") and sk_probes:
        add(
            "remote shootdowns (targets)",
            EXACT if sk_probes[0] == "fentry" else INFERRED,
            sk_probes[0],
            f"{sk_probes[0]}:{sk.get('function')} on the receiving CPU + tlb:tlb_flush TLB_REMOTE_SEND_IPI",
            "kernel lacks csd:csd_queue_cpu: each remote call of the flush function, as /proc/interrupts counts it"
            + ("" if sk_probes[0] == "fentry" else "; a kprobe misses IPIs that land while another BPF program runs"),
            "" if sk_probes[0] == "fentry" else "fentry (kernel BTF) would count every one",
        )
    elif full or have("ipi")[1]:
        add(
            "remote shootdowns (targets)",
            INFERRED,
            "tracepoint",
            "ipi:ipi_send_cpu" if not full else "csd:csd_queue_cpu",
            "no way to tell the TLB flush function from other cross-CPU calls",
            FIX_ROOT if not fa else "kernel lacks csd:csd_queue_cpu",
        )
    else:
        add(
            "remote shootdowns (targets)",
            MISSING,
            "-",
            "csd:csd_queue_cpu",
            "",
            "kernel lacks csd/ipi tracepoints; fentry or kprobes and the running kernel's headers would count them "
            f"on the receiving CPU ({sk.get('reason') or 'not checked'})",
        )
    tp_family("ipi", "IPIs sent")
    tp_family("reclaim", "reclaim context (memcg, direct, node, kswapd, proactive/DAMON)")
    tp_family("unmap", "unmapped mm inside reclaim/migration", "mm from rss_stat decrements")
    full, _, _ = have("unmap")
    ex = det.get("exact_tier", {})
    # the exact tier needs kprobes that really attach (the trial) besides what exact_tier checks
    exact = bool(ex.get("ok")) and det["attach"]["kprobe"].get("ok") is not False
    fn = "kprobe:" + ", ".join(probes.EXACT_FUNCTIONS)
    if exact:
        add(
            "RO/RW of pages unmapped by reclaim",
            EXACT,
            "kprobe",
            fn,
            "exact tier: the write bit of each entry try_to_unmap_one clears (table pte)",
        )
        add("mm of migration entries", EXACT, "kprobe", fn, "exact tier: mm->owner of each try_to_migrate_one entry")
    else:
        why = ex.get("reason") or "kprobes do not attach here"
        add(
            "RO/RW of pages unmapped by reclaim",
            INFERRED if full else MISSING,
            "tracepoint" if full else "-",
            "/proc/PID/maps permissions + page_cache identity",
            "no tracepoint reports the PTE that try_to_unmap_one clears",
            f"the exact tier (kprobes on the rmap walk) would make it exact; not here: {why}",
        )
        add(
            "mm of migration entries",
            MISSING,
            "-",
            "migrate:set_migration_pte",
            "the tracepoint carries no mm: migration PTEs are replayed against the recorded flush targets",
            f"the exact tier would give it; not here: {why}",
        )
    tp_family("page_cache", "page-cache removals (pfn, dev, ino, index, order)")
    tp_family("migrate", "migration (old/new pfn, READ/READ_EXCLUSIVE/WRITE)", "decoded from migration entries")
    tp_family(
        "page",
        "page frees and re-allocation of tracked pfns",
        "linked in kernel, O(1) per event"
        + ("; pfn from the struct page pointer (calibrated at record start)" if page_cal.get("ok") else ""),
    )
    tp_family("fault", "user page faults (address, write)")
    tp_family("syscall", "mapping syscalls and file writes (with results)")
    tp_family(
        "file",
        "file writes/truncates below the syscall layer",
        "ext4 and writeback",
        "other filesystems: inferred from write/ftruncate syscalls",
    )
    tp_family("sched", "context switches (which tgid runs where)")
    tp_family("proc", "process fork/exec/exit")
    kp = det["attach"]["kprobe"].get("ok")
    add(
        "cpumask of batched flushes",
        INFERRED,
        "tracepoint",
        "csd:csd_queue_cpu targets + sched_switch",
        "no tracepoint reports the cpumask arch_tlbbatch_flush builds",
        "" if kp else "kprobe/fentry on arch_tlbbatch_flush would make it exact (not available here)",
    )
    pv = det.get("host", {}).get("hypervisor", {}).get("pv_tlb_flush")
    if pv:
        add(
            "flushes of preempted vCPUs (PV TLB flush)",
            MISSING,
            "-",
            "hypervisor",
            "done by the host on the next VM entry; no guest-visible event",
            "record on bare metal or with PV TLB flush disabled (guest kernel parameter nopv)",
        )
    irq_ok = "TLB" in det.get("interrupts_rows", [])
    add(
        "/proc/interrupts TLB, CAL; /proc/vmstat; /proc/meminfo",
        EXACT if irq_ok else INFERRED,
        "procfs",
        "start and end snapshots",
        "" if irq_ok else "no TLB row in /proc/interrupts: shootdowns cannot be reconciled",
    )
    add("/proc/PID/maps snapshots", EXACT if det["root"] else INFERRED, "procfs", "start, after mapping syscalls, end")
    pmu = det["pmu_tlb"].get("ok")
    add(
        "PMU TLB-miss counts",
        EXACT if pmu else MISSING,
        "perf_event" if pmu else "-",
        "dTLB-load/store and iTLB-load misses per CPU (usage table)",
        "" if pmu else "no hardware TLB events on this host",
    )
    return out


def probe_source_check() -> dict[str, Any]:
    """The recorder's BPF C source is installed (a wheel ships it as package data, a checkout has probes/)."""
    from lufreplay.capture.probes import PROBE_SOURCE

    ok = PROBE_SOURCE.is_file()
    fix = "" if ok else "reinstall lufreplay from a wheel or source tree that has probes/lufreplay.bpf.c"
    return _check("BPF program source", ok, str(PROBE_SOURCE) + ("" if ok else ": missing"), fix, required=True)


def can_record(det: dict[str, Any]) -> bool:
    """Every required check passed: record can load its probes and stream events."""
    return all(c["ok"] for c in checks(det) if c["required"])


def report(det: dict[str, Any]) -> dict[str, Any]:
    """The ``doctor --json`` document."""
    return {
        "can_record": can_record(det),
        "root": det["root"],
        "checks": checks(det),
        "families": families(det),
        "detect": det,
    }


def _print_human(doc: dict[str, Any]) -> None:
    from rich.table import Table

    from lufreplay.console import make_console

    con = make_console()
    det = doc["detect"]
    host = det.get("host", {})
    un = host.get("uname", {})
    con.print(
        f"[bold]lufreplay doctor[/bold] — {host.get('hostname')} {un.get('release')} {un.get('machine')},"
        f" {host.get('nr_cpus')} CPUs, {host.get('cpu_model')} (checked in {det['detect_s']} s)"
    )
    if not det["root"]:
        con.print("[yellow]not root: BPF trials were not run; results below are what could be checked[/yellow]")
    style = {"ok": "green", "warn": "yellow", "fail": "red", "unknown": "dim"}
    t = Table(title="host checks", show_lines=False)
    for col in ("check", "status", "detail", "fix"):
        t.add_column(col, overflow="fold")
    for c in doc["checks"]:
        st = c["status"]
        t.add_row(c["check"], f"[{style[st]}]{st}[/{style[st]}]", c["detail"], c["fix"])
    con.print(t)
    fstyle = {EXACT: "green", INFERRED: "yellow", MISSING: "red"}
    t = Table(title="what `record` will capture")
    for col in ("event family", "fidelity", "attach", "note / fix"):
        t.add_column(col, overflow="fold")
    for f in doc["families"]:
        s = fstyle[f["fidelity"]]
        note = "; ".join(x for x in (f["note"], f["fix"]) if x)
        t.add_row(f["family"], f"[{s}]{f['fidelity']}[/{s}]", f["attach"], note)
    con.print(t)
    if doc["can_record"]:
        con.print("[green]record can run on this host[/green]")
    else:
        failed = [c["check"] for c in doc["checks"] if c["required"] and not c["ok"]]
        con.print(f"[red]record cannot run here: {', '.join(failed)} (see the fix column)[/red]")


def run_doctor(json_out: bool) -> int:
    """Probe the host; print a table or JSON. Exit 0 if ``record`` can work, 1 otherwise."""
    from lufreplay.console import emit_json

    det = features.detect()
    doc = report(det)
    if json_out:
        emit_json(doc)
    else:
        _print_human(doc)
    return 0 if doc["can_record"] else 1
