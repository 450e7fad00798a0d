"""What this host offers ``lufreplay record``, found by trying (never from version strings).

``detect()`` runs every check with a time bound and catches every failure, so it always returns a
report. BPF trials run in child processes (``_trials.py``) so a hang or a crash in bcc or libbpf is
contained. Nothing is cached: a capability can change with a mount, a sysctl or a reboot.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lufreplay.capture import cgroup, procfs

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
TRIALS = Path(__file__).with_name("_trials.py")
BCC_PATH = "/usr/lib/python3/dist-packages"  # Debian python3-bpfcc; other interpreters need it on sys.path
BCC_TIMEOUT_S = 90.0  # a compile under CPU contention has taken 20 s
BPF_TIMEOUT_S = 20.0


def _recorder_tracepoints() -> dict[str, tuple[str, ...]]:
    """The tracepoints the recorder really attaches (``capture.probes``), grouped by the table they feed."""
    from lufreplay.capture import probes

    out: dict[str, list[str]] = {}
    for tp, kind in probes.TRACEPOINTS.items():
        out.setdefault(probes.KIND_TABLE.get(kind, kind), []).append(tp)
    return {fam: tuple(tps) for fam, tps in out.items()}


#: Every tracepoint ``record`` uses, by event family.
TRACEPOINTS: dict[str, tuple[str, ...]] = _recorder_tracepoints()
NEEDED_TRACEPOINTS: tuple[str, ...] = tuple(tp for tps in TRACEPOINTS.values() for tp in tps)

#: Kernel config flags ``doctor`` reports.
CONFIG_FLAGS = (
    "ARCH_WANT_BATCHED_UNMAP_TLB_FLUSH",
    "DEBUG_TLBFLUSH",
    "KPROBES",
    "FPROBE",
    "NUMA",
    "TRANSPARENT_HUGEPAGE",
    "BPF_SYSCALL",
    "DEBUG_INFO_BTF",
    "FTRACE_SYSCALLS",
    "MEMCG",
    "IKHEADERS",
)

#: Capability bits (include/uapi/linux/capability.h) that matter to a recorder.
CAPS = {"CAP_DAC_OVERRIDE": 1, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38}
CAPS["CAP_BPF"] = 39

#: Symbols only a kernel carrying the LUF patches has.
LUF_SYMBOL_RE = r"(^|_)luf(_|$)"


# --------------------------------------------------------------------------------------------------
# tracefs
# --------------------------------------------------------------------------------------------------


def _has_events(p: Path) -> bool:
    try:
        return (p / "events").is_dir()
    except OSError:
        return False


def tracefs_path(mount: bool = True) -> Path | None:
    """The tracefs directory (/sys/kernel/tracing, else the debugfs one); mounts it when root and absent."""
    for p in TRACEFS_CANDIDATES:
        if _has_events(p):
            return p
    if mount and os.geteuid() == 0 and TRACEFS_CANDIDATES[0].is_dir():
        try:
            subprocess.run(
                ["mount", "-t", "tracefs", "nodev", str(TRACEFS_CANDIDATES[0])],
                capture_output=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        if _has_events(TRACEFS_CANDIDATES[0]):
            return TRACEFS_CANDIDATES[0]
    return None


def available_tracepoints() -> set[str]:
    """Every tracepoint the kernel offers, as "group:name" (empty if tracefs is unreadable)."""
    tfs = tracefs_path(mount=False)
    if tfs is None:
        return set()
    try:
        return {line.strip() for line in (tfs / "available_events").read_text().splitlines() if ":" in line}
    except OSError:
        pass
    try:
        return {
            f"{g.name}:{e.name}"
            for g in (tfs / "events").iterdir()
            if g.is_dir()
            for e in g.iterdir()
            if (e / "format").is_file()
        }
    except OSError:
        return set()


def tracepoint_format(name: str) -> str | None:
    """The format file of "group:name", or None if absent or unreadable."""
    group, _, event = name.partition(":")
    tfs = tracefs_path(mount=False)
    if tfs is None or not group or not event:
        return None
    try:
        return (tfs / "events" / group / event / "format").read_text()
    except OSError:
        return None


def _tracepoint_id(fmt: str) -> int | None:
    m = re.search(r"^ID:\s*(\d+)", fmt, re.M)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------------
# Small readers
# --------------------------------------------------------------------------------------------------


def _read(path: Path | str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def capabilities() -> dict[str, Any]:
    """Effective capabilities of this process (CapEff of /proc/self/status)."""
    status = _read("/proc/self/status") or ""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)", status, re.M)
    eff = int(m.group(1), 16) if m else 0
    return {"CapEff": hex(eff), **{name: bool(eff >> bit & 1) for name, bit in CAPS.items()}}


def sysctls() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("kernel/kptr_restrict", "kernel/perf_event_paranoid", "kernel/unprivileged_bpf_disabled"):
        v = _read(f"/proc/sys/{name}")
        out[name.split("/")[-1]] = int(v) if v and v.strip().lstrip("-").isdigit() else None
    lock = _read("/sys/kernel/security/lockdown")
    m = re.search(r"\[(\w+)\]", lock or "")
    out["lockdown"] = m.group(1) if m else None
    return out


def kernel_config(flags: tuple[str, ...] = CONFIG_FLAGS) -> dict[str, Any]:
    """Selected kernel config flags from /proc/config.gz or /boot/config-RELEASE; "unknown" without either."""
    release = os.uname().release
    text: str | None = None
    source: str | None = None
    try:
        text = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode(errors="replace")
        source = "/proc/config.gz"
    except OSError:
        boot = Path(f"/boot/config-{release}")
        text = _read(boot)
        source = str(boot) if text is not None else None
    if text is None:
        return {"source": None, "flags": dict.fromkeys(flags, "unknown")}
    values: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^CONFIG_(\w+)=(.*)$", line)
        if m:
            values[m.group(1)] = m.group(2).strip('"')
    return {"source": source, "flags": {f: values.get(f, "n") for f in flags}}


def kernel_headers() -> dict[str, Any]:
    """Do the headers bcc compiles against belong to the running kernel?"""
    release = os.uname().release
    build = Path(f"/lib/modules/{release}/build")
    out: dict[str, Any] = {"path": str(build), "target": None, "release": None, "matches": None}
    if (build / "include").is_dir():
        out["target"] = str(build.resolve())
        uts = _read(build / "include/generated/utsrelease.h") or ""
        m = re.search(r'UTS_RELEASE\s+"([^"]+)"', uts)
        rel = m.group(1) if m else (_read(build / "include/config/kernel.release") or "").strip() or None
        out["release"] = rel
        out["matches"] = rel == release if rel else None
    elif Path("/sys/kernel/kheaders.tar.xz").exists():
        out.update(path="/sys/kernel/kheaders.tar.xz", target="/sys/kernel/kheaders.tar.xz", release=release)
        out["matches"] = True
    return out


def _run_trial(which: str, timeout: float, argv: list[str] | None = None) -> dict[str, Any]:
    """Run one ``_trials.py`` group (or ``argv``) in a child process with a deadline."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(
            argv or [sys.executable, str(TRIALS), which], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "elapsed_s": round(time.monotonic() - t0, 3)}
    except OSError as e:
        return {"error": f"cannot run the trial ({e.strerror})"}
    lines = p.stdout.strip().splitlines()
    try:
        res = json.loads(lines[-1]) if lines else {}
    except ValueError:
        res = {}
    if not res:
        tail = [x for x in p.stderr.strip().splitlines() if x.strip()][-1:]
        res = {"error": f"trial exited with status {p.returncode}" + (f": {tail[0]}" if tail else "")}
    # bcc prints the real reason (EPERM on a map, a verifier message) on stderr, not in its exception.
    tail = [x.strip() for x in p.stderr.splitlines() if x.strip() and "modprobe" not in x]
    if tail:
        res["stderr_tail"] = tail[-3:]
        for key in ("tracepoint", "raw_tracepoint", "kprobe"):
            if isinstance(res.get(key), dict) and res[key].get("ok") is False:
                res[key]["error"] = f"{res[key]['error']} ({tail[-1]})"
    res["elapsed_s"] = round(time.monotonic() - t0, 3)
    return res


def _not_root(what: str) -> dict[str, Any]:
    return {"ok": None, "error": f"not tried: {what} needs root"}


# --------------------------------------------------------------------------------------------------
# detect
# --------------------------------------------------------------------------------------------------


def detect(trials: bool = True) -> dict[str, Any]:
    """Everything ``doctor`` reports. With ``trials=False`` no BPF program is loaded (fast, for tests)."""
    t0 = time.monotonic()
    root = os.geteuid() == 0
    det: dict[str, Any] = {"root": root, "euid": os.geteuid()}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=3)
    futures: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}
    if trials and root:
        # The bcc compile takes seconds: start both trials first and read files meanwhile.
        futures["bcc"] = pool.submit(_run_trial, "bcc", BCC_TIMEOUT_S)
        futures["bpf"] = pool.submit(_run_trial, "bpf", BPF_TIMEOUT_S)
        # The struct page → pfn calibration `record` runs before loading: it decides raw vs classic page probes.
        calib = [sys.executable, "-m", "lufreplay.capture.calibrate"]
        futures["page_pfn"] = pool.submit(_run_trial, "page_pfn", BCC_TIMEOUT_S, calib)
    try:
        det["capabilities"] = capabilities()
        det["sysctl"] = sysctls()
        det["host"] = _safe(procfs.host_facts, {})
        tfs = tracefs_path(mount=True)
        det["tracefs"] = {
            "path": str(tfs) if tfs else None,
            "ok": tfs is not None,
            "error": None if tfs else ("not mounted" if root else "not readable (needs root)"),
        }
        avail = available_tracepoints()
        det["tracepoints_total"] = len(avail)
        tps: dict[str, Any] = {}
        for tp in NEEDED_TRACEPOINTS:
            fmt = tracepoint_format(tp) if tp in avail else None
            tps[tp] = {"present": tp in avail, "format": fmt is not None, "id": _tracepoint_id(fmt) if fmt else None}
        det["tracepoints"] = tps
        det["tracepoints_missing"] = [tp for tp, v in tps.items() if not v["format"]]
        det["btf"] = {"vmlinux": Path("/sys/kernel/btf/vmlinux").is_file(), "path": "/sys/kernel/btf/vmlinux"}
        mh = cgroup.memory_hierarchy()
        det["memcg"] = {"version": mh[0] if mh else None, "mount": str(mh[1]) if mh else None}
        det["kernel_config"] = _safe(kernel_config, {"source": None, "flags": dict.fromkeys(CONFIG_FLAGS, "unknown")})
        det["kernel_headers"] = _safe(kernel_headers, {"matches": None})
        det.update(_symbols_facts())
        det["interrupts_rows"] = sorted(k for k in _safe(procfs.read_interrupts, {}) if not k.isdigit())
        det["exact_tier"] = _safe(_exact_tier, {"ok": False, "reason": "could not be checked"})
        det["shoot_probe"] = _safe(lambda: _shoot_probe(tps), {"ok": False, "reason": "could not be checked"})
        if futures:
            bcc = futures["bcc"].result()
            bpf = futures["bpf"].result()
            page_pfn = futures["page_pfn"].result()
        else:
            bcc = {
                "import": _bcc_importable(),
                "error": "not tried: " + ("needs root" if trials else "trials disabled"),
            }
            bpf = {}
            page_pfn = {}
    finally:
        pool.shutdown(wait=True)

    def skipped(what: str, trial: dict[str, Any]) -> dict[str, Any]:
        if not trials:
            return {"ok": None, "error": "not tried (trials disabled)"}
        if not root:
            return {"ok": None, "error": f"not tried: {what} needs root"}
        # The trial ran but did not get this far (bcc import or compile failed, or a timeout).
        return {"ok": False, "error": trial.get("error") or "trial failed"}

    det["bcc"] = {k: v for k, v in bcc.items() if k not in ("tracepoint", "raw_tracepoint", "kprobe")}
    det["attach"] = {
        "tracepoint": bcc.get("tracepoint") or skipped("loading a BPF program", bcc),
        "raw_tracepoint": bcc.get("raw_tracepoint") or skipped("loading a BPF program", bcc),
        "tp_btf": bpf.get("tp_btf") or skipped("loading a BPF program", bpf),
        "fentry": bpf.get("fentry") or skipped("loading a BPF program", bpf),
        "kprobe": bcc.get("kprobe") or skipped("loading a BPF program", bcc),
    }
    det["ringbuf"] = bpf.get("ringbuf") or skipped("creating a BPF map", bpf)
    det["page_pfn"] = page_pfn if "ok" in page_pfn else {**skipped("loading a BPF program", page_pfn)}
    det["pmu_tlb"] = bpf.get("pmu_tlb") or skipped("perf_event_open of a hardware event", bpf)
    det["libbpf"] = bpf.get("libbpf")
    det["detect_s"] = round(time.monotonic() - t0, 3)
    return det


def _exact_tier() -> dict[str, Any]:
    """Whether ``record`` compiles in the exact tier here (``probes.exact_tier``: kprobes, symbols, headers)."""
    from lufreplay.capture import probes

    return probes.exact_tier()


def _shoot_probe(tps: dict[str, Any]) -> dict[str, Any]:
    """Whether ``record`` counts remote shootdowns in the flush function (fentry/kprobe; no csd:csd_queue_cpu),
    from the tracepoint formats ``detect`` already read."""
    from lufreplay.capture import probes

    return probes.shoot_probe_check(tuple(tp for tp, v in tps.items() if not v["format"]))


def _safe(fn: Any, default: Any) -> Any:
    try:
        return fn()
    except Exception:
        return default


def _bcc_importable() -> bool:
    """bcc's Python package is where Debian's python3-bpfcc puts it (importing it is left to the trial)."""
    return (Path(BCC_PATH) / "bcc" / "__init__.py").is_file()


def _symbols_facts() -> dict[str, Any]:
    """LUF symbols and the TLB flush function's address, from /proc/kallsyms."""
    try:
        syms = procfs.Symbols()
    except OSError as e:
        return {"kallsyms": {"ok": False, "error": e.strerror}, "luf": {"present": None, "symbols": []}}
    luf = syms.matching(LUF_SYMBOL_RE)
    addr = syms.get("flush_tlb_func")
    return {
        "kallsyms": {"ok": True, "symbols": len(syms), "hidden": syms.hidden},
        "luf": {"present": bool(luf), "symbols": luf[:20]},
        "flush_tlb_func": hex(addr) if addr else None,
    }
