"""TLB-miss counters per CPU (perf_event_open, system-wide) and CPU time and runtime per traced process.

The recorder samples both at the start, at each segment boundary and at the stop, into the ``usage`` table.
bcc 0.26 only opens perf events to feed a BPF perf array (``BPF.open_perf_event``), not to read counts, so
the counting events are opened here with one ``perf_event_open(2)`` per event and CPU. Nothing is faked:
an event the kernel refuses (no PMU in most VMs) is left out and ``meta.json`` ``counters`` says why.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lufreplay import schema

_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "riscv64": 241, "ppc64le": 319}
PERF_TYPE_HARDWARE, PERF_TYPE_SOFTWARE, PERF_TYPE_HW_CACHE = 0, 1, 3
PERF_FORMAT_TOTAL_TIME_ENABLED, PERF_FORMAT_TOTAL_TIME_RUNNING = 1, 2
PERF_FLAG_FD_CLOEXEC = 8
_CACHE_DTLB, _CACHE_ITLB = 3, 4
_OP_READ, _OP_WRITE = 0, 1
_RESULT_MISS = 1


def _cache(cache: int, op: int) -> int:
    return cache | (op << 8) | (_RESULT_MISS << 16)


#: Events by perf(1)'s name → (perf type, config). The hardware cache ones need a PMU.
EVENTS: dict[str, tuple[int, int]] = {
    "dTLB-load-misses": (PERF_TYPE_HW_CACHE, _cache(_CACHE_DTLB, _OP_READ)),
    "dTLB-store-misses": (PERF_TYPE_HW_CACHE, _cache(_CACHE_DTLB, _OP_WRITE)),
    "iTLB-load-misses": (PERF_TYPE_HW_CACHE, _cache(_CACHE_ITLB, _OP_READ)),
    "cycles": (PERF_TYPE_HARDWARE, 0),
    "instructions": (PERF_TYPE_HARDWARE, 1),
    "cpu-clock": (PERF_TYPE_SOFTWARE, 0),
    "task-clock": (PERF_TYPE_SOFTWARE, 1),
    "page-faults": (PERF_TYPE_SOFTWARE, 2),
    "context-switches": (PERF_TYPE_SOFTWARE, 3),
    "cpu-migrations": (PERF_TYPE_SOFTWARE, 4),
    "minor-faults": (PERF_TYPE_SOFTWARE, 5),
    "major-faults": (PERF_TYPE_SOFTWARE, 6),
}
#: What ``record`` counts unless told otherwise (``--counters``).
DEFAULT_EVENTS = ("dTLB-load-misses", "dTLB-store-misses", "iTLB-load-misses")
#: The event whose opening decides ``counters.pmu`` (the one LUF's author reports first).
PMU_PROBE_EVENT = "dTLB-load-misses"

_LIBC = ctypes.CDLL(None, use_errno=True)
_READ = struct.Struct("<3Q")  # value, time_enabled, time_running
_KIND = {v: k for k, v in schema.USAGE_KIND.items()}


class CounterError(Exception):
    """A bad ``--counters`` list (one line)."""


def parse_events(text: str) -> list[str]:
    """``--counters`` value → event names; ``default`` stands for the three TLB-miss events."""
    names: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        for n in DEFAULT_EVENTS if part == "default" else (part,):
            if n not in EVENTS:
                raise CounterError(f"--counters: unknown event {n!r} (choose from default, {', '.join(EVENTS)})")
            if n not in names:
                names.append(n)
    if not names:
        raise CounterError("--counters: no event given")
    return names


def online_cpus(path: str = "/sys/devices/system/cpu/online") -> list[int]:
    """CPU numbers in the kernel's online list (``0-3,6``); all ``os.cpu_count()`` CPUs if unreadable."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        cpus += range(int(a), int(b or a) + 1)
    return cpus


def _attr(ptype: int, config: int) -> ctypes.Array[ctypes.c_char]:
    """perf_event_attr, version 0 (64 bytes): a counting event, enabled, with enabled/running times."""
    buf = ctypes.create_string_buffer(64)
    struct.pack_into("<IIQ", buf, 0, ptype, 64, config)
    struct.pack_into("<Q", buf, 32, PERF_FORMAT_TOTAL_TIME_ENABLED | PERF_FORMAT_TOTAL_TIME_RUNNING)
    return buf


def open_event(name: str, cpu: int, pid: int = -1) -> int:
    """One counting fd for ``name`` on ``cpu`` (pid -1: every task); OSError with the kernel's errno."""
    nr = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise OSError(95, f"perf_event_open: unknown syscall number on {platform.machine()}")
    attr = _attr(*EVENTS[name])
    fd = _LIBC.syscall(nr, attr, pid, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(fd)


def errno_text(e: OSError) -> str:
    """``No such file or directory (errno 2)``: what the trace and doctor say about a refused event."""
    return f"{e.strerror or os.strerror(e.errno or 0)} (errno {e.errno})"


def probe_pmu() -> dict[str, Any]:
    """Whether this host counts TLB misses: open ``dTLB-load-misses`` on CPU 0 and close it."""
    try:
        fd = open_event(PMU_PROBE_EVENT, online_cpus()[0])
    except OSError as e:
        return {"pmu": "absent", "event": PMU_PROBE_EVENT, "error": errno_text(e)}
    os.close(fd)
    return {"pmu": "present", "event": PMU_PROBE_EVENT, "error": None}


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_times(pid: int) -> tuple[int, int] | None:
    """(CPU time, runtime) in ns of process ``pid`` from /proc/PID/stat; None once it is gone.

    CPU time is utime + stime + cutime + cstime (its threads and its waited-for children, as wait4's rusage
    counts them); runtime is CLOCK_BOOTTIME minus its start time. Both have clock-tick resolution."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        f = stat.rsplit(")", 1)[1].split()
        # After the comm: state is field 3, so field k of proc(5) is f[k - 3].
        ticks = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        start = int(f[19])
    except (OSError, IndexError, ValueError):
        return None
    tick_ns = 1_000_000_000 // _CLK_TCK
    return ticks * tick_ns, max(0, now - start * tick_ns)


class UsageSampler:
    """Open counting events on every online CPU once; ``sample`` reads them and the processes' times."""

    def __init__(self, events: Sequence[str]) -> None:
        self.requested = list(events)
        self.cpus = online_cpus()
        self.fds: dict[str, list[tuple[int, int]]] = {}
        self.failed: dict[str, str] = {}
        self.pmu = probe_pmu()
        for name in self.requested:
            opened: list[tuple[int, int]] = []
            try:
                for cpu in self.cpus:
                    opened.append((cpu, open_event(name, cpu)))
            except OSError as e:
                for _, fd in opened:
                    os.close(fd)
                self.failed[name] = errno_text(e)
                continue
            self.fds[name] = opened

    def meta(self) -> dict[str, Any]:
        """``meta.json`` ``counters``."""
        return {
            "pmu": self.pmu["pmu"],
            "pmu_error": self.pmu["error"],
            "requested": self.requested,
            "events": list(self.fds),
            "failed": self.failed,
            "cpus": self.cpus,
            "process_source": "/proc/PID/stat (utime+stime+cutime+cstime; runtime from starttime)",
        }

    def sample(self, phase: int, pids: Iterable[int], exited: dict[int, tuple[int, int]] | None = None) -> pa.Table:
        """``usage`` rows read now: every open event on every CPU, then each live process in ``pids``.
        ``exited`` gives (CPU ns, runtime ns) of processes already reaped (their /proc entry is gone)."""
        ts: list[int] = []
        kinds: list[int] = []
        names: list[str] = []
        cpus: list[int] = []
        pid_col: list[int] = []
        vals: list[int] = []
        enabled: list[int] = []
        running: list[int] = []

        def add(t: int, kind: str, name: str, cpu: int, pid: int, v: int, en: int, run: int) -> None:
            ts.append(t)
            kinds.append(_KIND[kind])
            names.append(name)
            cpus.append(cpu)
            pid_col.append(pid)
            vals.append(v)
            enabled.append(en)
            running.append(run)

        for name, opened in self.fds.items():
            for cpu, fd in opened:
                t = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                try:
                    v, en, run = _READ.unpack(os.read(fd, _READ.size))
                except (OSError, struct.error):
                    continue  # e.g. the CPU went offline: no row rather than a made-up value
                add(t, "perf", name, cpu, -1, v, en, run)
        done = dict(exited or {})
        for pid in sorted(set(pids) | set(done)):
            t = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            got = done.get(pid) or process_times(pid)
            if got is None:
                continue
            add(t, "process", "cpu_ns", -1, pid, got[0], 0, 0)
            add(t, "process", "runtime_ns", -1, pid, got[1], 0, 0)
        return schema.from_columns(
            "usage",
            {
                "ts_ns": np.asarray(ts, dtype=np.int64),
                "phase": np.full(len(ts), phase, dtype=np.uint8),
                "kind": np.asarray(kinds, dtype=np.uint8),
                "name": names,
                "cpu": np.asarray(cpus, dtype=np.int16),
                "pid": np.asarray(pid_col, dtype=np.int32),
                "value": np.asarray(vals, dtype=np.int64),
                "enabled_ns": np.asarray(enabled, dtype=np.int64),
                "running_ns": np.asarray(running, dtype=np.int64),
            },
        )

    def close(self) -> None:
        for opened in self.fds.values():
            for _, fd in opened:
                os.close(fd)
        self.fds = {}
