"""Build, load and attach the recorder's BPF program (probes/lufreplay.bpf.c) with bcc.

The C source is compiled with its filters and constants as ``-D`` flags (bcc style): kind ids from
``schema.RAW_KIND``, the address of the TLB flush function, the traced-tgid filter, the ring size, the
migration-entry decoding constants of this kernel, and ``LR_NO_<group>__<name>`` for each tracepoint this
kernel lacks (its probe is left out: bcc cannot compile a probe without the tracepoint's format).
"""

from __future__ import annotations

import ctypes as ct
import gzip
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lufreplay import schema
from lufreplay.capture.procfs import parse_cpulist

REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE_NAME = "lufreplay.bpf.c"


def find_probe_source() -> Path:
    """The BPF C source: the copy a wheel ships as package data (``lufreplay/probes/``, put there by the build
    hook in setup.py), else the checkout's ``probes/`` where it is written (source tree, editable install)."""
    from importlib.resources import files

    shipped = files("lufreplay") / "probes" / PROBE_NAME
    if shipped.is_file():
        return Path(str(shipped))
    return REPO_ROOT / "probes" / PROBE_NAME


PROBE_SOURCE = find_probe_source()
BCC_PATH = "/usr/lib/python3/dist-packages"

#: The TLB flush function whose csd_queue_cpu events are remote shootdowns, per architecture.
FLUSH_FUNC = {"x86_64": "flush_tlb_func"}


def flush_func_name() -> str:
    """This machine's TLB flush function (x86's name where the architecture is not in ``FLUSH_FUNC``)."""
    return FLUSH_FUNC.get(os.uname().machine, "flush_tlb_func")


#: Every tracepoint the program attaches to, with the raw kind its records carry. The IPI-side ones and
#: the page allocator ones may be attached as raw tracepoints (per-program recursion guard: an IRQ-context
#: run is not skipped just because another BPF program was running on that CPU).
TRACEPOINTS: dict[str, str] = {
    "tlb:tlb_flush": "tlb_flush",
    "csd:csd_queue_cpu": "csd_queue_cpu",
    "ipi:ipi_send_cpu": "ipi_send_cpu",
    "ipi:ipi_send_cpumask": "ipi_send_cpumask",
    "vmscan:mm_vmscan_direct_reclaim_begin": "reclaim",
    "vmscan:mm_vmscan_direct_reclaim_end": "reclaim",
    "vmscan:mm_vmscan_memcg_reclaim_begin": "reclaim",
    "vmscan:mm_vmscan_memcg_reclaim_end": "reclaim",
    "vmscan:mm_vmscan_memcg_softlimit_reclaim_begin": "reclaim",
    "vmscan:mm_vmscan_memcg_softlimit_reclaim_end": "reclaim",
    "vmscan:mm_vmscan_node_reclaim_begin": "reclaim",
    "vmscan:mm_vmscan_node_reclaim_end": "reclaim",
    "vmscan:mm_vmscan_kswapd_wake": "reclaim",
    "vmscan:mm_vmscan_kswapd_sleep": "reclaim",
    "vmscan:mm_vmscan_lru_shrink_inactive": "reclaim",
    "vmscan:mm_vmscan_reclaim_pages": "reclaim",
    "vmscan:mm_vmscan_write_folio": "reclaim",
    "kmem:rss_stat": "rss_stat",
    "filemap:mm_filemap_delete_from_page_cache": "filemap_delete",
    "migrate:set_migration_pte": "migrate",
    "migrate:remove_migration_pte": "migrate",
    "thp:set_migration_pmd": "migrate",
    "thp:remove_migration_pmd": "migrate",
    "migrate:mm_migrate_pages_start": "migrate",
    "migrate:mm_migrate_pages": "migrate",
    "compaction:mm_compaction_migratepages": "migrate",
    "kmem:mm_page_free": "page",
    "kmem:mm_page_alloc": "page",
    "kmem:mm_page_pcpu_drain": "page",
    "kmem:mm_page_alloc_zone_locked": "page",
    "exceptions:page_fault_user": "fault",
    **{
        f"syscalls:sys_{d}_{n}": "syscall"
        for n in ("mmap", "munmap", "mprotect", "madvise", "mremap", "write", "pwrite64", "ftruncate", "fallocate")
        for d in ("enter", "exit")
    },
    "ext4:ext4_write_begin": "file",
    "ext4:ext4_da_write_begin": "file",
    "ext4:ext4_truncate_enter": "file",
    "writeback:writeback_dirty_folio": "file",
    "sched:sched_switch": "sched_switch",
    "task:task_newtask": "proc",
    "sched:sched_process_exec": "proc",
    "sched:sched_process_exit": "proc",
}
RAW_CAPABLE = ("tlb:tlb_flush", "csd:csd_queue_cpu", "ipi:ipi_send_cpu", "ipi:ipi_send_cpumask")
#: Page allocator tracepoints: raw only with a vmemmap calibration (they carry ``struct page *``, not pfn).
#: Order = index of the ``rescued`` map in probes/lufreplay.bpf.c (PG_FREE ...).
RAW_PAGE = ("kmem:mm_page_free", "kmem:mm_page_alloc", "kmem:mm_page_pcpu_drain", "kmem:mm_page_alloc_zone_locked")
#: Name prefix of the second program of each raw page probe, which only runs the nested events the first
#: program was skipped for; its own recursion misses lose nothing (see probes/lufreplay.bpf.c).
NESTED_PREFIX = "lr_nested_"
#: Which ``schema`` table each raw kind feeds (rss_stat feeds ``unmap``, also ``mm`` via its own kind).
KIND_TABLE = {
    "tlb_flush": "tlb_flush",
    "csd_queue_cpu": "shootdown",
    "ipi_send_cpu": "ipi",
    "ipi_send_cpumask": "ipi",
    "ipi_mask_words": "ipi",
    "reclaim": "reclaim",
    "rss_stat": "unmap",
    "filemap_delete": "page_cache",
    "migrate": "migrate",
    "page": "page",
    "fault": "fault",
    "syscall": "syscall",
    "file": "file",
    "sched_switch": "sched",
    "proc": "proc",
    "mm": "mm",
}


#: The exact tier (probes/lufreplay.bpf.c, LR_EXACT): (kernel function, probe type, program). The entry and
#: return probes of try_to_unmap_one / try_to_migrate_one bracket the rmap walk; the return probe of
#: page_vma_mapped_walk reads each entry that walk found, before it is cleared.
EXACT_PROBES = (
    ("try_to_unmap_one", "kprobe", "lr_ex_unmap_one"),
    ("try_to_unmap_one", "kretprobe", "lr_ex_one_ret"),
    ("try_to_migrate_one", "kprobe", "lr_ex_migrate_one"),
    ("try_to_migrate_one", "kretprobe", "lr_ex_one_ret"),
    ("page_vma_mapped_walk", "kprobe", "lr_ex_walk"),
    ("page_vma_mapped_walk", "kretprobe", "lr_ex_walk_ret"),
)
EXACT_FUNCTIONS = tuple(dict.fromkeys(f for f, _, _ in EXACT_PROBES))
#: Where the kernel offers kprobes to perf_event_open (bcc's attach_kprobe) or to tracefs.
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe/type")


class ProbeError(Exception):
    """The BPF program cannot be built, loaded or attached; one-line message."""


def import_bcc() -> Any:
    """Import bcc (Debian's python3-bpfcc lives outside pyenv's site-packages)."""
    if BCC_PATH not in sys.path:
        sys.path.append(BCC_PATH)
    try:
        import bcc  # type: ignore[import-not-found]
    except ImportError as e:
        raise ProbeError(f"bcc is not importable ({e}); install python3-bpfcc (scripts/setup.sh)") from None
    return bcc


# --------------------------------------------------------------------------------------------------
# Migration-entry decoding constants (host-probing §4.5)
# --------------------------------------------------------------------------------------------------


def kernel_config() -> dict[str, str]:
    """The running kernel's config (/proc/config.gz or /boot/config-$(uname -r)); {} if unavailable."""
    text = ""
    try:
        text = gzip.open("/proc/config.gz", "rt").read()
    except OSError:
        try:
            text = Path(f"/boot/config-{os.uname().release}").read_text()
        except OSError:
            return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def migration_calibration() -> dict[str, Any]:
    """Swap-entry layout of this kernel: migration types and SWP_PFN_BITS (x86-64).

    MAX_SWAPFILES = 32 - DEVICE(0/2/4) - MIGRATION(3) - HWPOISON(0/1) - PTE_MARKER(1), and
    SWP_MIGRATION_READ = MAX_SWAPFILES + HWPOISON, so the hwpoison term cancels out.
    """
    cfg = kernel_config()
    source = "kconfig" if cfg else "default"
    device = 0
    if cfg.get("CONFIG_DEVICE_PRIVATE") == "y":
        device = 4
    marker = 1  # PTE markers are unconditional in recent kernels (and CONFIG_PTE_MARKER=y before)
    read = 32 - device - 3 - marker
    cpuflags = ""
    try:
        cpuflags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    except OSError:
        pass
    cmdline = Path("/proc/cmdline").read_text() if Path("/proc/cmdline").exists() else ""
    la57 = (
        " la57" in cpuflags
        and (cfg.get("CONFIG_X86_5LEVEL") == "y" or int(cfg.get("CONFIG_PGTABLE_LEVELS", "4")) >= 5)
        and "no5lvl" not in cmdline
    )
    max_physmem_bits = 52 if la57 else 46
    return {
        "source": source,
        "type_shift": 59,
        "mig_read": read,
        "mig_read_exclusive": read + 1,
        "mig_write": read + 2,
        "la57": la57,
        "swp_pfn_bits": max_physmem_bits - 12,
        "offset": "(~pte << 5) >> 14 (offset bits stored inverted from bit 9)",
        "young_bit": max_physmem_bits - 12,
        "dirty_bit": max_physmem_bits - 11,
        "present_pfn_mask": "0x000ffffffffff000",
    }


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------


@dataclass
class BuildOptions:
    """Compiled-in settings of one program."""

    rb_bytes: int = 64 << 20
    flush_tlb_func: int = 0
    filter_tgid: bool = True
    self_tgid: int = field(default_factory=os.getpid)
    raw_ipi: bool = True
    calibration: dict[str, Any] = field(default_factory=migration_calibration)
    #: (vmemmap base, sizeof(struct page)) from ``calibrate``; None keeps the page probes classic.
    page_pfn: tuple[int, int] | None = None
    #: Tracepoints ("group:name") this kernel lacks; their probes are not compiled in.
    absent: tuple[str, ...] = ()
    #: nr_cpu_ids of this host: how many CPUs an IPI cpumask can name (the probes read that many bits)
    nr_cpu_ids: int = field(default_factory=lambda: nr_cpu_ids())
    #: Compile in and attach the exact tier's kprobes (``exact_tier`` said this kernel allows them).
    exact: bool = False
    #: Where the kernel has no csd:csd_queue_cpu, remote shootdowns from the flush function on the receiving
    #: CPU (``shoot_probe_check``): "fentry" or "kprobe"; "" = not compiled in.
    shoot_probe: str = ""

    @property
    def raw_page(self) -> bool:
        return self.page_pfn is not None


def cflags(opts: BuildOptions) -> list[str]:
    """The -D flags of one build."""
    flags = [f"-DK_{name.upper()}={kid}" for name, kid in schema.RAW_KIND.items()]
    flags += [
        f"-DLR_NKINDS={max(schema.RAW_KIND.values()) + 1}",
        f"-DLR_RB_PAGES={opts.rb_bytes // os.sysconf('SC_PAGE_SIZE')}",
        f"-DLR_FLUSH_TLB_FUNC={opts.flush_tlb_func:#x}ULL",
        f"-DLR_SELF_TGID={opts.self_tgid}",
        f"-DLR_SWP_PFN_BITS={opts.calibration['swp_pfn_bits']}",
        f"-DLR_MIG_READ={opts.calibration['mig_read']}",
        f"-DLR_WAKE_RECORDS={wake_records(opts.rb_bytes)}ULL",
        f"-DLR_MASK_WORDS={(min(max(opts.nr_cpu_ids, 1), schema.MAX_NR_CPUS) + 63) // 64}",
        f"-DLR_NR_CPU_IDS={min(max(opts.nr_cpu_ids, 1), schema.MAX_NR_CPUS)}",
    ]
    if opts.filter_tgid:
        flags.append("-DLR_FILTER=1")
    if opts.raw_ipi:
        flags.append("-DLR_RAW_IPI=1")
    if opts.page_pfn is not None:
        base, size = opts.page_pfn
        flags += ["-DLR_RAW_PAGE=1", f"-DLR_VMEMMAP_BASE={base:#x}ULL", f"-DLR_STRUCT_PAGE_SIZE={size}ULL"]
    flags += [f"-D{absent_flag(tp)}=1" for tp in opts.absent]
    if opts.exact:
        flags.append("-DLR_EXACT=1")
    if opts.shoot_probe:
        flags.append("-DLR_SHOOT=1")
    if opts.shoot_probe == "fentry":
        flags.append("-DLR_SHOOT_FENTRY=1")
    return flags


def wake_records(rb_bytes: int) -> int:
    """Records one CPU may add between two drains before it wakes the consumer: its share of half the
    ring, so a wake-up comes while the ring still has room for the time the consumer takes to run."""
    ncpu = max(1, len(possible_cpus()))
    return max(1, rb_bytes // schema.RING_SLOT.itemsize // 2 // ncpu)


def possible_cpus() -> list[int]:
    """/sys/devices/system/cpu/possible as a list (per-CPU maps have one slot per possible CPU)."""
    try:
        return parse_cpulist(Path("/sys/devices/system/cpu/possible").read_text())
    except OSError:
        return list(range(os.cpu_count() or 1))


def nr_cpu_ids() -> int:
    """The kernel's nr_cpu_ids: highest possible CPU + 1 (CPU ids can exceed the online count)."""
    try:
        cpus = parse_cpulist(Path("/sys/devices/system/cpu/possible").read_text())
    except (OSError, ValueError):
        cpus = []
    return max(cpus) + 1 if cpus else (os.cpu_count() or 1)


def absent_flag(tp: str) -> str:
    """The C macro that leaves out the probe of tracepoint "group:name"."""
    group, _, name = tp.partition(":")
    return f"LR_NO_{group}__{name}"


def absent_tracepoints() -> tuple[str, ...]:
    """The recorder's tracepoints this kernel has no format file for (tracefs must be mounted)."""
    from lufreplay.capture import features  # features imports this module at load time

    return tuple(tp for tp in TRACEPOINTS if features.tracepoint_format(tp) is None)


def kprobes_offered() -> bool:
    """Whether this kernel offers kprobes: the kprobe PMU (bcc's attach_kprobe) or tracefs kprobe_events."""
    from lufreplay.capture import features  # features imports this module at load time

    tfs = features.tracefs_path(mount=False)
    return KPROBE_PMU.exists() or (tfs is not None and (tfs / "kprobe_events").exists())


def exact_tier(symbols: Any = None) -> dict[str, Any]:
    """Can this kernel give the exact tier? Kprobes (the kprobe PMU or tracefs kprobe_events), each probed
    function as a symbol (not inlined), and kernel headers of the running kernel (the probes read structs).
    ``ok`` says whether ``record`` compiles the tier in; it still falls back if loading or attaching fails."""
    from lufreplay.capture import features, procfs

    kprobes = kprobes_offered()
    out: dict[str, Any] = {"ok": False, "kprobes": kprobes, "functions": {}, "headers_match": None, "reason": None}
    if not kprobes:
        out["reason"] = "this kernel offers no kprobes (CONFIG_KPROBES=n)"
        return out
    try:
        syms = symbols if symbols is not None else procfs.Symbols()
        out["functions"] = {f: f in syms for f in EXACT_FUNCTIONS}
    except OSError as e:
        out["reason"] = f"cannot read /proc/kallsyms ({e.strerror})"
        return out
    missing = [f for f, ok in out["functions"].items() if not ok]
    headers = features.kernel_headers()
    out["headers_match"] = headers.get("matches")
    if missing:
        out["reason"] = f"no symbol for {', '.join(missing)} (inlined or renamed in this kernel)"
    elif headers.get("matches") is not True:
        out["reason"] = "the kernel headers bcc compiles against are not the running kernel's (struct offsets)"
    else:
        out["ok"] = True
    return out


#: The kprobe program that counts remote shootdowns on kernels without csd:csd_queue_cpu (probes/lufreplay.bpf.c;
#: its fentry twin, kfunc__flush_tlb_func, is attached by bcc as it loads): fentry first (a trampoline skips a run only if the same program is running on that CPU), else a kprobe
#: (skipped, uncounted before 6.7, whenever any kprobe or classic-tracepoint BPF program is running on that CPU).
SHOOT_KPROBE_PROG = "lr_shoot_recv"
SHOOT_TRACEPOINT = "csd:csd_queue_cpu"
#: Where the kernel's BTF lives: fentry needs it.
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")


def shoot_probe_check(absent: tuple[str, ...], symbols: Any = None) -> dict[str, Any]:
    """Where the kernel has no csd:csd_queue_cpu (before 6.7), can remote shootdowns come from the flush
    function on the receiving CPU? Needs fentry (BTF) or kprobes, the function as a symbol and the running
    kernel's headers (the probe reads ``flush_tlb_info.initiating_cpu``). ``probes`` lists what to try, best
    first; ``record`` falls back along it, then to the tracepoint-only program, if one does not load or attach."""
    from lufreplay.capture import features, procfs

    func = flush_func_name()
    out: dict[str, Any] = {
        "ok": False,
        "needed": SHOOT_TRACEPOINT in absent,
        "function": func,
        "probes": [],
        "reason": None,
    }
    if not out["needed"]:
        out["reason"] = f"not needed: the kernel has {SHOOT_TRACEPOINT}"
        return out
    if func == "flush_tlb_func" and VMLINUX_BTF.exists():
        out["probes"].append("fentry")
    if kprobes_offered():
        out["probes"].append("kprobe")
    if not out["probes"]:
        out["reason"] = "this kernel offers no kprobes (CONFIG_KPROBES=n) and no BTF for fentry"
        return out
    try:
        syms = symbols if symbols is not None else procfs.Symbols()
        if func not in syms:
            out["reason"] = f"no symbol for {func}"
            return out
    except OSError as e:
        out["reason"] = f"cannot read /proc/kallsyms ({e.strerror})"
        return out
    if features.kernel_headers().get("matches") is not True:
        out["reason"] = "the kernel headers bcc compiles against are not the running kernel's (struct offsets)"
        return out
    out["ok"] = True
    return out


def shootdown_source(opts: BuildOptions, check: dict[str, Any] | None) -> dict[str, Any]:
    """``meta.shootdown_source``: where the shootdown table's rows came from and how exact they are."""
    func = flush_func_name()
    if SHOOT_TRACEPOINT not in opts.absent:
        return {"source": SHOOT_TRACEPOINT, "exact": True, "note": f"one row per call queued with func == {func}"}
    if opts.shoot_probe:
        return {
            "source": f"{opts.shoot_probe}:{func}",
            "exact": opts.shoot_probe == "fentry",
            "note": "one row per call another CPU initiated (flush_tlb_info.initiating_cpu), as the receiving CPU "
            "counts it in /proc/interrupts; written as the sender's row, 1 ns after its TLB_REMOTE_SEND_IPI "
            "tlb_flush row; no call site"
            + (
                ""
                if opts.shoot_probe == "fentry"
                else "; a kprobe run is skipped, uncounted, when the IPI lands while another kprobe or "
                "classic-tracepoint BPF program runs on that CPU (8 % fewer than /proc/interrupts in a 6.1 guest)"
            ),
        }
    why = (check or {}).get("reason") or "the probe did not load"
    return {"source": None, "exact": False, "note": f"no remote shootdowns recorded: {SHOOT_TRACEPOINT} absent, {why}"}


def exact_meta(opts: BuildOptions, check: dict[str, Any] | None, error: str | None = None) -> dict[str, Any]:
    """``meta.exact``: which tier recorded reclaim/migration PTE identity, with what, and why not the other."""
    if opts.exact:
        return {
            "tier": "exact",
            "probes": [{"function": f, "attach": kind} for f, kind, _ in EXACT_PROBES],
            "table": "pte",
            "pte_provenance": "exact (the cleared entry's write bit)",
            "migration_mm": "mm->owner of each migration entry",
        }
    reason = error or (check or {}).get("reason") or "not tried"
    return {
        "tier": "tracepoint",
        "probes": [],
        "table": None,
        "pte_provenance": "inferred from /proc/PID/maps snapshots",
        "migration_mm": None,
        "reason": reason,
    }


def program_text(opts: BuildOptions) -> str:
    """The C program with its compiled-in flags written out as #defines (what --dump-bpf prints)."""
    defines = []
    for f in cflags(opts):
        name, _, value = f[2:].partition("=")
        defines.append(f"#define {name} {value}")
    note = ""
    if opts.page_pfn is None:
        note = "/* record adds LR_RAW_PAGE, LR_VMEMMAP_BASE and LR_STRUCT_PAGE_SIZE once calibrated at start */\n"
    head = "/* lufreplay: compiled-in flags */\n" + note + "\n".join(defines) + "\n\n"
    return head + PROBE_SOURCE.read_text()


def attach_types(raw_ipi: bool, raw_page: bool = False) -> dict[str, str]:
    """tracepoint ("group:name") → attach type used, given which raw groups load (``raw_page`` also
    needs a successful vmemmap calibration)."""

    def raw(tp: str) -> bool:
        return (raw_ipi and tp in RAW_CAPABLE) or (raw_page and tp in RAW_PAGE)

    return {tp: ("raw_tracepoint" if raw(tp) else "tracepoint") for tp in TRACEPOINTS}


def probes_meta(
    raw_ipi: bool, raw_page: bool = False, absent: tuple[str, ...] = (), exact: bool = False, shoot_probe: str = ""
) -> dict[str, dict[str, Any]]:
    """``meta.probes``: per raw kind, its tracepoints, the attach type used and the ones left out
    (``absent``: this kernel lacks them); ``pte_exact`` (kprobes) when the exact tier was loaded; with
    ``shoot_probe`` the shootdown kind says it came from the flush function's fentry or kprobe instead."""
    at = attach_types(raw_ipi, raw_page)
    out: dict[str, dict[str, Any]] = {}
    for tp, kind in TRACEPOINTS.items():
        d = out.setdefault(
            kind, {"tracepoint": tp, "tracepoints": [], "attach": at[tp], "table": KIND_TABLE[kind], "absent": []}
        )
        d["tracepoints"].append(tp)
        if tp in absent:
            d["absent"].append(tp)
    out["mm"] = {
        "tracepoint": "kmem:rss_stat",
        "tracepoints": ["kmem:rss_stat"],
        "attach": "tracepoint",
        "table": "mm",
        "absent": [tp for tp in ("kmem:rss_stat",) if tp in absent],
    }
    if shoot_probe:
        func = flush_func_name()
        out["csd_queue_cpu"] |= {
            "attach": shoot_probe,
            "via": f"{shoot_probe}:{func} (receiving CPU, flush_tlb_info.initiating_cpu) + tlb:tlb_flush "
            "TLB_REMOTE_SEND_IPI",
            "exactness": "each remote call of the flush function: what the kernel's TLB interrupt count counts",
        }
    if exact:
        out["pte_exact"] = {
            "tracepoint": "page_vma_mapped_walk",
            "tracepoints": list(EXACT_FUNCTIONS),
            "attach": "kprobe",
            "table": "pte",
            "absent": [],
        }
    return out


class LoadedProgram:
    """A loaded and attached program: the bcc object plus what was compiled in."""

    def __init__(
        self, bpf: Any, opts: BuildOptions, load_errors: list[str] | None = None, exact_error: str | None = None
    ) -> None:
        self.bpf = bpf
        self.opts = opts
        #: Why the builds tried before this one failed (raw tracepoints refused, say).
        self.load_errors = load_errors or []
        #: Why the exact tier, asked for, did not load (None: not asked for, or loaded).
        self.exact_error = exact_error

    @property
    def attach(self) -> dict[str, str]:
        out = {
            tp: a for tp, a in attach_types(self.opts.raw_ipi, self.opts.raw_page).items() if tp not in self.opts.absent
        }
        if self.opts.exact:
            out |= {f: "kprobe" for f in EXACT_FUNCTIONS}
        return out

    def set_state(self, state: int) -> None:
        """0 not started, 1 recording, 2 stopped (every program checks this first)."""
        self.bpf["ctl"][ct.c_int(0)] = ct.c_ulonglong(state)

    def add_targets(self, tgids: list[int]) -> None:
        t = self.bpf["targets"]
        for tgid in tgids:
            t[ct.c_uint(tgid)] = ct.c_ubyte(1)

    def targets(self) -> list[int]:
        return sorted(int(k.value) for k in self.bpf["targets"].keys())

    def lost_per_cpu(self) -> dict[int, list[int]]:
        """kind id → per-CPU count of failed ring outputs."""
        arr = self.bpf["lost"]
        return {kid: [int(v) for v in arr[ct.c_int(kid)]] for kid in schema.RAW_KIND.values()}

    def totals(self) -> dict[str, int]:
        arr = self.bpf["totals"]
        return {"pages_allocated": int(sum(arr[ct.c_int(0)])), "pages_freed": int(sum(arr[ct.c_int(1)]))}

    def rescued(self) -> dict[str, int]:
        """Raw page probe program name → nested events its second program handled (0s when classic)."""
        if not self.opts.raw_page:
            return {}
        arr = self.bpf[b"rescued"]
        return {
            f"raw_tracepoint__{tp.split(':', 1)[1]}": int(sum(arr[ct.c_int(i)]))
            for i, tp in enumerate(RAW_PAGE)
            if tp not in self.opts.absent
        }

    def drained(self) -> None:
        """Tell the programs the ring was just drained (zero every CPU's since-drain count)."""
        self.bpf["since_drain"].clearitem(ct.c_int(0))

    def self_run(self) -> dict[str, list[int]]:
        """Per CPU, while recording: ns the recorder's own threads ran, their time slices, and the remote
        shootdowns they sent."""
        vals = self.bpf["self_run"].getvalue(ct.c_int(0))
        sent = [int(v.shootdowns) for v in vals]
        if self.opts.shoot_probe:  # counted by the receiving side, per sending CPU
            for cpu, n in self.bpf["self_sent"].items():
                if cpu.value < len(sent):
                    sent[cpu.value] += int(n.value)
        return {
            "cpu_ns_per_cpu": [int(v.ns) for v in vals],
            "slices_per_cpu": [int(v.slices) for v in vals],
            "shootdowns_sent_per_cpu": sent,
        }

    def run_stats(self) -> dict[str, dict[str, int]]:
        """Program name → run_cnt and run_time_ns (counted only while kernel.bpf_stats_enabled is 1)."""
        out = {}
        for name, fd in self.prog_fds().items():
            info = prog_info(fd)
            if info is not None and info.run_cnt:
                out[name] = {"run_cnt": int(info.run_cnt), "run_time_ns": int(info.run_time_ns)}
        return out

    def ring_fd(self) -> int:
        return int(self.bpf["events"].map_fd)

    def prog_fds(self) -> dict[str, int]:
        """Program name → fd of every loaded program."""
        return {
            (name.decode() if isinstance(name, bytes) else str(name)): int(fn.fd) for name, fn in self.bpf.funcs.items()
        }

    def recursion_misses(self) -> dict[str, int]:
        """Program name → bpf_prog_info.recursion_misses (runs the kernel skipped)."""
        out = {}
        for name, fd in self.prog_fds().items():
            info = prog_info(fd)
            if info is not None:
                out[name] = int(info.recursion_misses)
        return out

    def close(self) -> None:
        self.bpf.cleanup()


def load(opts: BuildOptions, shoot_fallback: tuple[str, ...] = ()) -> LoadedProgram:
    """Compile, load and attach. Raw tracepoints are tried first (IPI side, and the page allocator if
    calibrated); on failure the program is rebuilt with classic tracepoints (found by trying, never from
    version strings). The shootdown probe of a kernel without csd:csd_queue_cpu is tried as ``opts.shoot_probe``,
    then down ``shoot_fallback`` (e.g. fentry, then kprobe). ``opts`` is left describing what was loaded."""
    bcc = import_bcc()
    errors: list[str] = []
    page_pfn = opts.page_pfn
    # the exact tier, then the shootdown probe (down ``shoot_fallback``), are dropped first: the tracepoint tier
    # is what every kernel runs
    shoots = list(dict.fromkeys((opts.shoot_probe, *shoot_fallback, "")))
    exacts = (True, False) if opts.exact else (False,)
    tries = [(opts.raw_ipi, page_pfn, ex, sh) for sh in shoots for ex in exacts]
    if page_pfn is not None:
        tries.append((opts.raw_ipi, None, False, ""))
    if opts.raw_ipi:
        tries.append((False, None, False, ""))
    exact_error = None
    for raw, pfn, exact, shoot in tries:
        opts.raw_ipi, opts.page_pfn, opts.exact, opts.shoot_probe = raw, pfn, exact, shoot
        bpf = None
        try:
            bpf = bcc.BPF(src_file=str(PROBE_SOURCE).encode(), cflags=cflags(opts))
            if opts.raw_page:
                _attach_nested(bcc, bpf, opts.absent)
            if opts.exact:
                _attach_exact(bpf)
            if opts.shoot_probe == "kprobe":  # fentry's program (kfunc__*) is attached by bcc when it loads
                bpf.attach_kprobe(
                    event=flush_func_name().encode(),
                    fn_name=SHOOT_KPROBE_PROG.encode(),
                )
            return LoadedProgram(bpf, opts, errors, exact_error)
        except Exception as e:  # bcc raises bare Exception for compile, load and attach failures
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if exact:
                exact_error = msg
            else:
                errors.append(f"{msg} (with the shootdown {shoot})" if shoot else msg)
            if bpf is not None:
                bpf.cleanup()
    raise ProbeError(f"cannot load the BPF program: {(errors or [exact_error])[-1]}")


def _attach_exact(bpf: Any) -> None:
    """Attach the exact tier's kprobes and kretprobes (bcc raises on failure: the caller falls back)."""
    for fn, kind, prog in EXACT_PROBES:
        if kind == "kprobe":
            bpf.attach_kprobe(event=fn, fn_name=prog)
        else:
            bpf.attach_kretprobe(event=fn, fn_name=prog)


def _attach_nested(bcc: Any, bpf: Any, absent: tuple[str, ...] = ()) -> None:
    """Attach the second program of each raw page probe, after the first (so it runs second on a hit).

    bcc keeps one raw tracepoint per name, so the link goes in under its own key; ``cleanup`` closes it.
    """
    for tp in RAW_PAGE:
        if tp in absent:
            continue
        name = tp.split(":", 1)[1]
        fn = bpf.load_func(f"{NESTED_PREFIX}{name}".encode(), bcc.BPF.RAW_TRACEPOINT)
        fd = bcc.libbcc.lib.bpf_attach_raw_tracepoint(fn.fd, name.encode())
        if fd < 0:
            raise ProbeError(f"cannot attach the second raw tracepoint program of {tp}")
        bpf.raw_tracepoint_fds[f"{name}/nested".encode()] = fd


# --------------------------------------------------------------------------------------------------
# bpf(2) BPF_OBJ_GET_INFO_BY_FD, for recursion_misses
# --------------------------------------------------------------------------------------------------


class BpfProgInfo(ct.Structure):
    """struct bpf_prog_info (uapi/linux/bpf.h) up to attach_btf_id."""

    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32),
        ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64),
        ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64),
        ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64),
        ("name", ct.c_char * 16),
        ("ifindex", ct.c_uint32),
        ("gpl_compatible", ct.c_uint32),
        ("netns_dev", ct.c_uint64),
        ("netns_ino", ct.c_uint64),
        ("nr_jited_ksyms", ct.c_uint32),
        ("nr_jited_func_lens", ct.c_uint32),
        ("jited_ksyms", ct.c_uint64),
        ("jited_func_lens", ct.c_uint64),
        ("btf_id", ct.c_uint32),
        ("func_info_rec_size", ct.c_uint32),
        ("func_info", ct.c_uint64),
        ("nr_func_info", ct.c_uint32),
        ("nr_line_info", ct.c_uint32),
        ("line_info", ct.c_uint64),
        ("jited_line_info", ct.c_uint64),
        ("nr_jited_line_info", ct.c_uint32),
        ("line_info_rec_size", ct.c_uint32),
        ("jited_line_info_rec_size", ct.c_uint32),
        ("nr_prog_tags", ct.c_uint32),
        ("prog_tags", ct.c_uint64),
        ("run_time_ns", ct.c_uint64),
        ("run_cnt", ct.c_uint64),
        ("recursion_misses", ct.c_uint64),
        ("verified_insns", ct.c_uint32),
        ("attach_btf_obj_id", ct.c_uint32),
        ("attach_btf_id", ct.c_uint32),
    ]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_OBJ_GET_INFO_BY_FD = 15
_libc = ct.CDLL(None, use_errno=True)


def prog_info(fd: int) -> BpfProgInfo | None:
    """bpf_prog_info of a program fd, or None if the syscall fails."""
    nr = _SYS_BPF.get(os.uname().machine)
    if nr is None:
        return None
    info = BpfProgInfo()
    attr = _InfoAttr(fd, ct.sizeof(info), ct.addressof(info))
    if _libc.syscall(nr, _BPF_OBJ_GET_INFO_BY_FD, ct.byref(attr), ct.sizeof(attr)) != 0:
        return None
    return info
