"""Userspace side of a recording: /proc counters, /proc/PID/maps, kallsyms, clocks and host facts.

Everything here is plain file parsing with no BPF, so it runs (and is tested) without root.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lufreplay import schema

PROC = Path("/proc")
SYS = Path("/sys")

_SOURCE_ID = {v: k for k, v in schema.COUNTER_SOURCE.items()}


# --------------------------------------------------------------------------------------------------
# Counters
# --------------------------------------------------------------------------------------------------


def parse_interrupts(text: str) -> dict[str, list[int]]:
    """Parse the text of /proc/interrupts: row name → counts (one per CPU; ERR/MIS rows have one value)."""
    lines = text.splitlines()
    if not lines:
        return {}
    ncpu = len(lines[0].split())
    out: dict[str, list[int]] = {}
    for line in lines[1:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        counts: list[int] = []
        for tok in rest.split()[:ncpu]:
            if not tok.isdigit():
                break  # the description ("TLB shootdowns") starts here
            counts.append(int(tok))
        if counts:
            out[name.strip()] = counts
    return out


def read_interrupts() -> dict[str, list[int]]:
    """/proc/interrupts as row name → per-CPU counts (e.g. ``{"TLB": [2722, 2088], ...}``)."""
    return parse_interrupts((PROC / "interrupts").read_text())


def parse_vmstat(text: str) -> dict[str, int]:
    """Parse /proc/vmstat ("name value" lines)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def read_vmstat() -> dict[str, int]:
    """/proc/vmstat as name → value (pages or events, as the kernel prints them)."""
    return parse_vmstat((PROC / "vmstat").read_text())


def parse_meminfo(text: str) -> dict[str, int]:
    """Parse /proc/meminfo ("Name:   value [kB]"); values are kept as printed (kB for sizes)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and parts:
            try:
                out[name.strip()] = int(parts[0])
            except ValueError:
                continue
    return out


def read_meminfo() -> dict[str, int]:
    """/proc/meminfo as name → value (kB for sizes, as printed; HugePages_* are counts)."""
    return parse_meminfo((PROC / "meminfo").read_text())


READ_BEGIN_IRQ = schema.COUNTER_READ_BEGIN_IRQ


def counter_rows(
    phase: int,
    ts_ns: int,
    extra: dict[str, int] | None = None,
    with_vmstat: Callable[[], dict[str, int]] | None = None,
) -> pa.Table:
    """Rows of the ``counters`` table for one snapshot taken now.

    Interrupt rows with a name (TLB, CAL, LOC, ...; numbered device IRQs are left out) become one row per
    CPU; rows with a single total (ERR, MIS) get cpu -1. vmstat and meminfo are taken whole. ``extra``
    (the recorder's own figures, e.g. pages_allocated, cpu time) is stored with source ``recorder`` at
    ``ts_ns``. Each file's rows carry the time that file was read: on a busy host the reads can be
    milliseconds apart, and ``info`` compares only the events recorded between two reads of a file.
    ``with_vmstat`` (e.g. the probes' page totals) is called right after vmstat is read, before anything
    slower, so that its values and vmstat's cover the same window; they are ``recorder`` rows.
    """
    if phase not in schema.COUNTER_PHASE:
        raise ValueError(f"counter phase must be one of {sorted(schema.COUNTER_PHASE)}, not {phase}")
    # Read the three files back to back, interrupts first: it is the one reconciled per CPU.
    # The TLB row is read at some instant between these two times: info counts the shootdowns recorded in
    # between as possibly on either side of the snapshot (a read takes ~0.1 ms, tens of ms on a busy host).
    t_irq0 = monotonic_ns()
    irq = read_interrupts()
    t_irq = monotonic_ns()
    vm = read_vmstat()
    t_vm = monotonic_ns()
    beside = with_vmstat() if with_vmstat is not None else {}
    t_beside = monotonic_ns()
    mem = read_meminfo()
    t_mem = monotonic_ns()
    stamps: list[int] = []
    names: list[str] = []
    cpus: list[int] = []
    values: list[int] = []
    sources: list[int] = []
    for name, counts in irq.items():
        if name.isdigit():
            continue
        if len(counts) == 1:
            names.append(name)
            cpus.append(-1)
            values.append(counts[0])
        else:
            names += [name] * len(counts)
            cpus += range(len(counts))
            values += counts
    sources += [_SOURCE_ID["interrupts"]] * len(names)
    stamps += [t_irq] * len(names)
    for src, d, t in (
        ("vmstat", vm, t_vm),
        ("meminfo", mem, t_mem),
        ("recorder", beside, t_beside),
        ("recorder", extra or {}, ts_ns),
        ("recorder", {READ_BEGIN_IRQ: t_irq0}, t_irq0),
    ):
        names += d.keys()
        cpus += [-1] * len(d)
        values += (int(v) for v in d.values())
        sources += [_SOURCE_ID[src]] * len(d)
        stamps += [t] * len(d)
    n = len(names)
    return schema.from_columns(
        "counters",
        {
            "ts_ns": np.asarray(stamps, dtype=np.int64),
            "phase": np.full(n, phase, dtype=np.uint8),
            "source": np.asarray(sources, dtype=np.uint8),
            "name": names,
            "cpu": np.asarray(cpus, dtype=np.int16),
            "value": np.asarray(values, dtype=np.int64),
        },
    )


# --------------------------------------------------------------------------------------------------
# /proc/PID/maps
# --------------------------------------------------------------------------------------------------


def dev_from_maps(field: str) -> int:
    """``"fe:01"`` (hex major:minor as maps prints it) → kernel encoding ``major << 20 | minor``."""
    major, _, minor = field.partition(":")
    return (int(major, 16) << 20) | int(minor, 16)


def parse_maps(text: str, tgid: int, ts_ns: int, snapshot: int) -> pa.Table:
    """Parse the text of /proc/PID/maps into rows of the ``maps`` table."""
    cols: dict[str, list[Any]] = {c.name: [] for c in schema.MAPS.columns}
    for line in text.splitlines():
        # The path may contain spaces: split the five fixed fields off and keep the rest whole.
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        start, _, end = parts[0].partition("-")
        cols["start"].append(int(start, 16))
        cols["end"].append(int(end, 16))
        cols["perms"].append(parts[1])
        cols["offset"].append(int(parts[2], 16))
        cols["dev"].append(dev_from_maps(parts[3]))
        cols["ino"].append(int(parts[4]))
        cols["path"].append(parts[5].strip() if len(parts) > 5 and parts[5].strip() else "[anon]")
    n = len(cols["start"])
    cols["ts_ns"] = [ts_ns] * n
    cols["tgid"] = [tgid] * n
    cols["snapshot"] = [snapshot] * n
    return schema.from_columns("maps", cols)


def read_maps(tgid: int, ts_ns: int, snapshot: int) -> pa.Table:
    """/proc/TGID/maps as rows of ``maps``; an empty table if the process is gone or unreadable."""
    try:
        text = (PROC / str(tgid) / "maps").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return schema.empty_table("maps")
    return parse_maps(text, tgid, ts_ns, snapshot)


# --------------------------------------------------------------------------------------------------
# Kernel symbols
# --------------------------------------------------------------------------------------------------


class Symbols:
    """Kernel symbols from /proc/kallsyms, read once. Addresses are all 0 when kptr_restrict hides them."""

    def __init__(self, path: Path = PROC / "kallsyms") -> None:
        addrs: list[int] = []
        names: list[str] = []
        types: list[str] = []
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    addrs.append(int(parts[0], 16))
                    types.append(parts[1])
                    names.append(parts[2])
        addr = np.asarray(addrs, dtype=np.uint64)
        order = np.argsort(addr, kind="stable")
        self._addr = addr[order]
        self._names = [names[i] for i in order]
        self._by_name: dict[str, int] = {}
        text_names: set[str] = set()
        # Static functions can share a name with data or other statics: keep the first text symbol.
        for a, t, n in zip(addrs, types, names, strict=True):
            is_text = t in "tTwW"
            if n not in self._by_name or (is_text and n not in text_names):
                self._by_name[n] = a
                if is_text:
                    text_names.add(n)
        self.hidden = bool(len(addr)) and not bool(addr.any())

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def get(self, name: str) -> int | None:
        """Address of ``name``, or None if absent or hidden (kptr_restrict)."""
        a = self._by_name.get(name)
        return a or None

    def address(self, name: str) -> int:
        """Address of ``name``; KeyError if the symbol is absent or its address is hidden."""
        a = self._by_name.get(name)
        if a is None:
            raise KeyError(f"kernel symbol {name} not found in /proc/kallsyms")
        if a == 0:
            raise KeyError(f"kernel symbol {name} has a hidden address (kernel.kptr_restrict; run as root)")
        return a

    def resolve(self, addr: int) -> str:
        """``addr`` as "symbol+0xoff" (nearest symbol at or below it), or hex if none is known."""
        if addr == 0 or self.hidden or not len(self._addr):
            return hex(addr)
        i = int(np.searchsorted(self._addr, np.uint64(addr), side="right")) - 1
        if i < 0:
            return hex(addr)
        return f"{self._names[i]}+{hex(addr - int(self._addr[i]))}"

    def matching(self, pattern: str) -> list[str]:
        """Names matching a regular expression (e.g. ``"^luf_"``)."""
        rx = re.compile(pattern)
        return sorted(n for n in self._by_name if rx.search(n))


# --------------------------------------------------------------------------------------------------
# Clocks and host facts
# --------------------------------------------------------------------------------------------------


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in ns: the clock of ``bpf_ktime_get_ns`` and of every trace timestamp."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def clock_anchor(samples: int = 7) -> dict[str, Any]:
    """Offset from CLOCK_MONOTONIC to wall-clock time, from the tightest of a few bracketed readings."""
    best: tuple[int, int] | None = None
    for _ in range(samples):
        m0 = monotonic_ns()
        rt = time.clock_gettime_ns(time.CLOCK_REALTIME)
        m1 = monotonic_ns()
        if best is None or m1 - m0 < best[1]:
            best = (rt - (m0 + m1) // 2, m1 - m0)
    assert best is not None
    return {"clock": "CLOCK_MONOTONIC", "realtime_minus_monotonic_ns": best[0], "uncertainty_ns": best[1]}


def parse_cpulist(text: str) -> list[int]:
    """Kernel cpu/node list syntax ("0-3,8,10-11") → sorted ids."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text()
    except OSError:
        return default


def _cpuinfo() -> dict[str, str]:
    """First processor block of /proc/cpuinfo."""
    out: dict[str, str] = {}
    for line in _read(PROC / "cpuinfo").splitlines():
        if not line.strip():
            if out:
                break
            continue
        k, _, v = line.partition(":")
        out.setdefault(k.strip(), v.strip())
    return out


def hypervisor_hint() -> dict[str, Any]:
    """Are we a guest, of what, and does the hypervisor flush remote TLBs for us (PV TLB flush)?"""
    flags = _cpuinfo().get("flags", "").split()
    hint: dict[str, Any] = {"guest": "hypervisor" in flags, "vendor": None, "pv_tlb_flush": None}
    vendor = _read(SYS / "hypervisor" / "type").strip()
    if vendor:
        hint["vendor"] = vendor
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=3).stdout
    except (OSError, subprocess.SubprocessError):
        log = ""
    if log:
        m = re.search(r"Hypervisor detected: (\S+)", log)
        if m:
            hint["vendor"] = m.group(1)
        hint["pv_tlb_flush"] = "pv remote TLB flush" in log
    return hint


def host_facts() -> dict[str, Any]:
    """Facts about this host for the trace metadata and ``doctor``."""
    u = os.uname()
    cpu = _cpuinfo()
    mem = parse_meminfo(_read(PROC / "meminfo"))
    online = _read(SYS / "devices/system/cpu/online")
    possible = _read(SYS / "devices/system/cpu/possible")
    nodes = _read(SYS / "devices/system/node/online")
    return {
        "hostname": socket.gethostname(),
        "uname": {
            "sysname": u.sysname,
            "release": u.release,
            "version": u.version,
            "machine": u.machine,
        },
        "boot_id": _read(PROC / "sys/kernel/random/boot_id").strip(),
        "arch": platform.machine(),
        "nr_cpus": len(parse_cpulist(online)) if online else (os.cpu_count() or 1),
        "cpus_online": online.strip(),
        "cpus_possible": possible.strip(),
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "mem_total_kb": mem.get("MemTotal"),
        "numa_nodes": parse_cpulist(nodes) if nodes else [0],
        "cpu_model": cpu.get("model name") or cpu.get("Model") or cpu.get("cpu model") or platform.processor(),
        "hypervisor": hypervisor_hint(),
    }
