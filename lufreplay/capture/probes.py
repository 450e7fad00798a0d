"""Build, load and attach the recorder's BPF program (probes/lufreplay.bpf.c) with bcc.

The C source is compiled with its filters and constants as ``-D`` flags (bcc style): kind ids from
``schema.RAW_KIND``, the address of the TLB flush function, the traced-tgid filter, the ring size and the
migration-entry decoding constants of this kernel.
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

REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE_SOURCE = REPO_ROOT / "probes" / "lufreplay.bpf.c"
BCC_PATH = "/usr/lib/python3/dist-packages"

#: The TLB flush function whose csd_queue_cpu events are remote shootdowns, per architecture.
FLUSH_FUNC = {"x86_64": "flush_tlb_func"}

#: Every tracepoint the program attaches to, with the raw kind its records carry. The first four may be
#: attached as raw tracepoints (per-program recursion guard: an IPI-context run is not skipped just
#: because another BPF program was running on that CPU).
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
#: Which ``schema`` table each raw kind feeds (rss_stat feeds ``unmap``, also ``mm`` via its own kind).
KIND_TABLE = {
    "tlb_flush": "tlb_flush",
    "csd_queue_cpu": "shootdown",
    "ipi_send_cpu": "ipi",
    "ipi_send_cpumask": "ipi",
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
    ]
    if opts.filter_tgid:
        flags.append("-DLR_FILTER=1")
    if opts.raw_ipi:
        flags.append("-DLR_RAW_IPI=1")
    return flags


def program_text(opts: BuildOptions) -> str:
    """The C program with its compiled-in flags written out as #defines (what --dump-bpf prints)."""
    defines = []
    for f in cflags(opts):
        name, _, value = f[2:].partition("=")
        defines.append(f"#define {name} {value}")
    head = "/* lufreplay: compiled-in flags */\n" + "\n".join(defines) + "\n\n"
    return head + PROBE_SOURCE.read_text()


def attach_types(raw_ipi: bool) -> dict[str, str]:
    """tracepoint ("group:name") → attach type used."""
    return {tp: ("raw_tracepoint" if raw_ipi and tp in RAW_CAPABLE else "tracepoint") for tp in TRACEPOINTS}


def probes_meta(raw_ipi: bool) -> dict[str, dict[str, Any]]:
    """``meta.probes``: per raw kind, its tracepoints and the attach type used."""
    at = attach_types(raw_ipi)
    out: dict[str, dict[str, Any]] = {}
    for tp, kind in TRACEPOINTS.items():
        d = out.setdefault(kind, {"tracepoint": tp, "tracepoints": [], "attach": at[tp], "table": KIND_TABLE[kind]})
        d["tracepoints"].append(tp)
    out["mm"] = {"tracepoint": "kmem:rss_stat", "tracepoints": ["kmem:rss_stat"], "attach": "tracepoint", "table": "mm"}
    return out


class LoadedProgram:
    """A loaded and attached program: the bcc object plus what was compiled in."""

    def __init__(self, bpf: Any, opts: BuildOptions) -> None:
        self.bpf = bpf
        self.opts = opts

    @property
    def attach(self) -> dict[str, str]:
        return attach_types(self.opts.raw_ipi)

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


def load(opts: BuildOptions) -> LoadedProgram:
    """Compile, load and attach. Raw tracepoints are tried first for the IPI-side probes; on failure the
    program is rebuilt with classic tracepoints (found by trying, never from version strings)."""
    bcc = import_bcc()
    errors: list[str] = []
    for raw in [True, False] if opts.raw_ipi else [False]:
        opts.raw_ipi = raw
        try:
            bpf = bcc.BPF(src_file=str(PROBE_SOURCE).encode(), cflags=cflags(opts))
            return LoadedProgram(bpf, opts)
        except Exception as e:  # bcc raises bare Exception for compile, load and attach failures
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    raise ProbeError(f"cannot load the BPF program: {errors[-1]}")


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
