"""``lufreplay record``: load the probes, run or attach to the workload, stream the ring into Parquet.

Threads: the main thread drains the ring buffer on a timer (one bulk copy per poll, no callback per
event), reads loss counters every second and takes maps snapshots; a writer thread cuts the raw stream
into time segments, decodes each segment in bulk and writes it through TraceWriter.

The consumer wakes rarely on purpose: every wake-up of the recorder on an otherwise idle CPU takes that
CPU out of lazy-TLB idle, so it receives shootdowns it would have skipped, inflating the very count being
recorded. It sleeps POLL_MAX_S between drains, or less when the measured event rate would fill more
than POLL_FILL of the ring in that time; a CPU that fills its share of half the ring between two drains
wakes it early (BPF_RB_FORCE_WAKEUP, once per drain), so a burst is never lost to the timer.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import resource
import select
import shutil
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import lufreplay
from lufreplay import schema
from lufreplay.capture import decode, probes
from lufreplay.capture.ringbuf import RingConsumer

#: Longest and shortest sleep between two drains of the ring.
POLL_MAX_S = 0.25
POLL_MIN_S = 0.01
#: Fraction of the ring the timer lets fill at the measured event rate before it drains.
POLL_FILL = 0.25
LOSS_READ_S = 1.0
MAPS_MIN_INTERVAL_S = 0.1
#: Events newer than (segment end - margin) wait for the next segment: per-CPU ring reservations race
#: by microseconds, so a segment is cut only once the ring has been drained past its end plus this.
HOLD_BACK_NS = 50_000_000
PF_KTHREAD = 0x00200000
MAPPING_SYSCALLS = (0, 1, 2, 3, 4)  # mmap, munmap, mprotect, madvise, mremap
#: The program whose recursion misses lose no recorded row (see probes/lufreplay.bpf.c).
IGNORED_MISS_SUFFIX = "tlb_flush"
IGNORED_WHY = (
    "a skipped (nested) tlb_flush run is an IPI-context receiving-side flush (reasons 1/5), which is not"
    " recorded; a skipped lr_nested_* run is an event its first program handled (or, nested twice, one"
    " counted in that program's losses); no recorded row is missing"
)


class RecordError(Exception):
    """A one-line, user-facing reason why recording cannot start or finish."""

    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code


@dataclass
class RecordOptions:
    """What ``lufreplay record`` was asked to do (built by cli.record)."""

    output: Path = Path("lufreplay.data")
    command: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    cgroup: Path | None = None
    system_wide: bool = False
    duration: float | None = None
    memory_limit: str | None = None
    workload: str | None = None
    buffer_size: str = "64M"
    segment_seconds: float = 2.0
    strict: bool = False
    force: bool = False
    dump_bpf: bool = False
    calibrate: bool = False  # measure the shootdown cost first and store it in meta.json
    counters: str = "default"  # perf events for the usage table (perfcount.parse_events)


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def parse_buffer_size(text: str) -> int:
    """--buffer-size → bytes; a power of two of at least one page."""
    from lufreplay.capture.cgroup import parse_size

    try:
        n = parse_size(text)
    except ValueError as e:
        raise RecordError(f"--buffer-size: {e}") from None
    page = os.sysconf("SC_PAGE_SIZE")
    if n < page or n & (n - 1):
        raise RecordError(f"--buffer-size must be a power of two of at least {page} bytes, not {text!r}")
    return n


class KthreadCache:
    """pid → "is a kernel thread" (PF_KTHREAD in /proc/PID/stat), cached; pid 0 (idle) counts as one."""

    def __init__(self) -> None:
        self._known: dict[int, bool] = {0: True}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                self.lookup(int(d.name))

    def lookup(self, pid: int) -> bool:
        v = self._known.get(pid)
        if v is None:
            v = False
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                # Field 9 (flags) follows the parenthesised comm, which may itself hold spaces.
                v = bool(int(stat.rsplit(")", 1)[1].split()[6]) & PF_KTHREAD)
            except (OSError, IndexError, ValueError):
                pass  # exited before we looked: a user task is by far the likelier case
            self._known[pid] = v
        return v

    def __call__(self, pids: np.ndarray) -> np.ndarray:
        uniq, inv = np.unique(pids, return_inverse=True)
        vals = np.array([self.lookup(int(p)) for p in uniq.tolist()], dtype=bool)
        return vals[inv.reshape(-1)]


#: glibc mallopt parameters (malloc.h) and the largest mmap threshold glibc accepts on 64-bit.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD_MAX = 32 << 20
_MADV_DONTNEED = 4
#: The compiler bcc embeds: its code is paged in by the compile and not run again while recording.
COMPILER_LIBS = ("libLLVM", "libclang")


def release_compiler_pages(smaps: str = "/proc/self/smaps") -> int:
    """Drop this process's pages of the compiler's code (r-xp mappings of COMPILER_LIBS holding no anonymous
    page); returns the bytes of RSS released. The pages stay in the page cache: a later call into the compiler
    faults them back in. Only executable, never-written mappings: a read-only one may hold relocated (COW)
    data, which MADV_DONTNEED would throw away."""
    maps: list[list[int]] = []  # [start, end, rss kB, anonymous kB]
    cur: list[int] | None = None
    with open(smaps) as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                path = head[5].strip() if len(head) > 5 else ""
                want = head[1] == "r-xp" and any(lib in path for lib in COMPILER_LIBS)
                cur = None
                if want:
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    cur = [lo, hi, 0, 0]
                    maps.append(cur)
            elif cur is not None and head[0] in ("Rss:", "Anonymous:"):
                cur[2 if head[0] == "Rss:" else 3] = int(head[1])
    released = 0
    for lo, hi, rss, anon in maps:
        if anon == 0 and rss and _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0:
            released += rss << 10
    return released


def one_arena() -> None:
    """One glibc malloc arena for every thread created from now on (each arena keeps its own high-water
    mark once trims are off: the main thread drains, the writer thread frees). Called before anything
    starts threads, and again by keep_freed_memory."""
    _LIBC.mallopt(_M_ARENA_MAX, 1)


def keep_freed_memory() -> int:
    """Make the recorder keep the memory it frees instead of unmapping it; returns the compiler's code bytes
    released first (release_compiler_pages).

    Returning memory (munmap, madvise DONTNEED, heap trims) flushes the TLB of every CPU where one of the
    recorder's threads is or was lately running: those remote shootdowns land in the very count being
    recorded. So everything is returned now, before the window opens: what compiling the probes used
    (hundreds of MB of LLVM heap and code). From then on glibc keeps blocks up to 32 MiB in its heaps and
    never trims them, in one arena for all threads (an arena per thread would each keep their own high-water
    mark); Arrow allocates through glibc too instead of its own pool (mimalloc/jemalloc purge freed pages
    on a timer).
    """
    released = release_compiler_pages()
    _LIBC.malloc_trim(0)
    one_arena()
    _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    pa.set_memory_pool(pa.system_memory_pool())
    return released


def rss_kb(field: str = "VmRSS") -> int:
    """This process's resident set now (VmRSS) or its high-water mark (VmHWM) from /proc/self/status, kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_rss_peak() -> bool:
    """Restart VmHWM from the current RSS (clear_refs 5), so that it measures the recording alone, not the
    compile before it. getrusage's ru_maxrss keeps the whole run's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _bpf_stats_enabled() -> bool:
    try:
        return Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() == "1"
    except OSError:
        return False


def _recorder_usage() -> dict[str, int]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"recorder_cpu_ns": int((ru.ru_utime + ru.ru_stime) * 1e9), "recorder_max_rss_kb": int(ru.ru_maxrss)}


def recorder_counter_rows(phase: int, ts_ns: int, values: dict[str, int]) -> pa.Table:
    """``counters`` rows with source=recorder."""
    n = len(values)
    return schema.from_columns(
        "counters",
        {
            "ts_ns": np.full(n, ts_ns, dtype=np.int64),
            "phase": np.full(n, phase, dtype=np.uint8),
            "source": np.full(n, 3, dtype=np.uint8),
            "name": list(values),
            "cpu": np.full(n, -1, dtype=np.int16),
            "value": np.asarray(list(values.values()), dtype=np.int64),
        },
    )


def loss_rows(rows: list[tuple[int, int, int, str, int, int]]) -> pa.Table:
    """(ts_start, ts_end, cpu, probe, source, lost) tuples → ``losses`` table."""
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 6
    return schema.from_columns(
        "losses",
        {
            "ts_start_ns": np.asarray(cols[0], dtype=np.int64),
            "ts_end_ns": np.asarray(cols[1], dtype=np.int64),
            "cpu": np.asarray(cols[2], dtype=np.int16),
            "probe": list(cols[3]),
            "source": np.asarray(cols[4], dtype=np.uint8),
            "lost": np.asarray(cols[5], dtype=np.int64),
        },
    )


# --------------------------------------------------------------------------------------------------
# The spawned command
# --------------------------------------------------------------------------------------------------


_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


class Child:
    """A command forked now but held before exec until the probes are attached and it is in its cgroup."""

    def __init__(self, argv: list[str], ignore_sigint: bool = False) -> None:
        """``ignore_sigint``: the command (and what it forks) ignores Ctrl-C; the recorder stops it in order."""
        self.argv = argv
        go_r, self._go_w = os.pipe()
        self._err_r, err_w = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - child
            try:
                # Die with the recorder, even by SIGKILL (it survives exec); if the recorder is already gone, go.
                _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
                if os.getppid() != parent:
                    os._exit(1)
                os.close(self._go_w)
                os.close(self._err_r)
                signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else signal.SIG_DFL)
                os.read(go_r, 1)
                os.close(go_r)
                os.execvp(argv[0], argv)
            except BaseException as e:
                try:
                    os.write(err_w, f"{argv[0]}: {getattr(e, 'strerror', None) or e}".encode())
                finally:
                    os._exit(127)
        os.close(go_r)
        os.close(err_w)
        self.started_ns = 0
        self.status: int | None = None
        self.ended_ns = 0
        self.cpu_ns: int | None = None  # from wait4's rusage once reaped (its /proc entry is then gone)

    def release(self) -> None:
        """Let the child exec; raise RecordError if exec fails."""
        self.started_ns = _monotonic_ns()
        os.write(self._go_w, b"x")
        os.close(self._go_w)
        msg = b""
        while chunk := os.read(self._err_r, 4096):  # EOF at exec (CLOEXEC) or after the error text
            msg += chunk
        os.close(self._err_r)
        if msg:
            self.wait(block=True)
            raise RecordError(f"cannot start command: {msg.decode(errors='replace')}", code=127)

    def poll(self) -> bool:
        """True once the child has exited."""
        return self.wait(block=False)

    def wait(self, block: bool) -> bool:
        if self.status is not None:
            return True
        try:
            pid, st, ru = os.wait4(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            self.status, self.ended_ns = -1, _monotonic_ns()
            return True
        if pid == 0:
            return False
        self.ended_ns = _monotonic_ns()
        self.cpu_ns = int((ru.ru_utime + ru.ru_stime) * 1e9)
        self.status = os.waitstatus_to_exitcode(st)
        return True

    def terminate(self, grace_s: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; reaps the child."""
        if self.poll():
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                if self.poll():
                    return
                time.sleep(0.02)
        self.wait(block=True)


# --------------------------------------------------------------------------------------------------
# The writer thread
# --------------------------------------------------------------------------------------------------


class SegmentWriter(threading.Thread):
    """Receives raw record arrays and user tables; cuts, decodes and writes one segment per time window."""

    def __init__(
        self, writer: Any, ctx: decode.DecodeContext, start_ns: int, segment_ns: int, max_queued: int = 64 << 20
    ) -> None:
        """``max_queued``: bytes of raw records waiting for this thread beyond which ``put_raw`` blocks."""
        super().__init__(name="lufreplay-writer", daemon=True)
        self.writer = writer
        self.ctx = ctx
        self.seg_end = start_ns + segment_ns
        self.segment_ns = segment_ns
        self.q: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.pending: list[np.ndarray] = []
        self.error: BaseException | None = None
        self.events = 0
        self.unknown = 0
        #: CPU time of this thread decoding records and encoding/writing Parquet segments.
        self.decode_ns = 0
        self.encode_ns = 0
        self.max_queued = max_queued
        self.queued = 0
        self.blocked_s = 0.0
        self._cv = threading.Condition()

    def put_raw(self, recs: np.ndarray, drained_ns: int) -> None:
        """Queue drained records; wait while ``max_queued`` bytes already wait. A writer that falls behind (a
        busy host) then holds back the poller, the ring fills and the kernel counts what it drops as losses,
        instead of the recorder's memory growing with the backlog."""
        with self._cv:
            if self.queued and self.queued + recs.nbytes > self.max_queued:
                t0 = time.monotonic()
                while self.queued and self.queued + recs.nbytes > self.max_queued:
                    if self.error is not None or not self.is_alive():
                        break
                    self._cv.wait(0.1)
                self.blocked_s += time.monotonic() - t0
            self.queued += recs.nbytes
        self.q.put(("raw", recs, drained_ns))

    def put_table(self, name: str, table: pa.Table) -> None:
        self.q.put(("table", name, table))

    def finish(self) -> None:
        self.q.put(("finish",))

    def _emit(self, recs: np.ndarray, rows: np.ndarray | None = None) -> None:
        t = time.thread_time_ns()
        self.unknown += decode.unknown_kinds(recs if rows is None else recs["kind"][rows])
        for name, table in decode.decode(recs, self.ctx, rows).items():
            self.writer.add(name, table)
        self.events += len(recs) if rows is None else len(rows)
        self.decode_ns += time.thread_time_ns() - t

    def _cut(self, cut_ns: int | None) -> None:
        # One copy of the segment's records at a time: the parts go once joined, the segment's rows are
        # decoded where they are (a segment of 0.4 M records is 25 MB, and freed memory is kept).
        allr = decode.concat(self.pending) if self.pending else None
        self.pending = []
        if allr is None or len(allr) == 0:
            return
        if cut_ns is None:
            self._emit(allr)
            return
        mask = allr["ts"] < np.uint64(cut_ns)
        rest = decode.select(allr, ~mask)
        self._emit(allr, np.flatnonzero(mask))
        self.pending = [rest] if len(rest) else []

    def run(self) -> None:
        try:
            while True:
                msg = self.q.get()
                if msg[0] == "raw":
                    _, recs, drained = msg
                    with self._cv:
                        self.queued -= recs.nbytes
                        self._cv.notify_all()
                    if len(recs):
                        self.pending.append(recs)
                    while drained >= self.seg_end + HOLD_BACK_NS:
                        self._cut(self.seg_end)
                        t = time.thread_time_ns()
                        self.writer.rotate()
                        self.encode_ns += time.thread_time_ns() - t
                        self.seg_end += self.segment_ns
                elif msg[0] == "table":
                    self.writer.add(msg[1], msg[2])
                else:
                    self._cut(None)
                    return
        except BaseException as e:  # ENOSPC and friends: the main thread stops and reports
            self.error = e


# --------------------------------------------------------------------------------------------------
# Progress line
# --------------------------------------------------------------------------------------------------


class Progress:
    """One transient status line on stderr (only on a TTY)."""

    def __init__(self) -> None:
        self.live = None
        if sys.stderr.isatty():
            from rich.live import Live

            from lufreplay.console import make_console

            self.live = Live("", console=make_console(stderr=True), transient=True, refresh_per_second=4)
            self.live.start()
        self._last_t = time.monotonic()
        self._last_n = 0
        self.rate = 0.0

    def update(self, elapsed: float, events: int, mb: float, lost: int) -> None:
        now = time.monotonic()
        if now - self._last_t >= 1.0:
            self.rate = (events - self._last_n) / (now - self._last_t)
            self._last_t, self._last_n = now, events
        if self.live is not None:
            self.live.update(
                f"recording {elapsed:6.1f} s  {self.rate / 1000:8.1f} k events/s  {events:>11,} events"
                f"  {mb:8.1f} MB written  {lost:,} lost"
            )

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


# --------------------------------------------------------------------------------------------------
# run_record
# --------------------------------------------------------------------------------------------------


def run_record(opts: RecordOptions) -> int:
    """Entry point of ``lufreplay record``; returns the exit code."""
    from lufreplay.console import fail

    try:
        return Recorder(opts).run()
    except RecordError as e:
        raise fail(str(e), e.code) from None


class Recorder:
    """One recording session."""

    def __init__(self, opts: RecordOptions) -> None:
        self.opts = opts
        self.stop_event = threading.Event()
        self.stop_reason = ""
        self.sigints = 0
        self.child: Child | None = None
        self.cgroup: Any = None
        self.prog: probes.LoadedProgram | None = None
        self.writer: Any = None
        self.seg: SegmentWriter | None = None
        self.loss_rows: list[tuple[int, int, int, str, int, int]] = []
        self.watchdog: Any = None  # lufreplay.capture.watchdog.Watchdog once the output exists
        self.maps_snapshot = 0
        self.maps_last: dict[int, float] = {}
        self.maps_dirty: set[int] = set()
        self.t_run0 = time.monotonic()
        self._syms: Any = None
        self.startup_s: float | None = None
        #: Consumer activity: drains, early wake-ups by the watermark, main-thread CPU spent draining.
        self.polls = 0
        self.watermark_wakeups = 0
        self.drain_ns = 0
        self.shootdown_cost: dict[str, Any] | None = None
        #: probes.exact_tier() of this kernel: whether the exact tier is compiled in, and why not
        self.exact_check: dict[str, Any] | None = None
        #: probes.shoot_probe_check(): remote shootdowns from the flush function (no csd:csd_queue_cpu)
        self.shoot_check: dict[str, Any] | None = None
        self.shoot_fallback: tuple[str, ...] = ()
        self.usage: Any = None  # lufreplay.capture.perfcount.UsageSampler
        self.counter_events: list[str] = []
        self.usage_pids: list[int] = []
        self.next_usage_ns = 0
        self.compiler_released = 0
        self.window_rss_kb = [0, 0]
        self.hwm_reset = False
        self.startup_peak_kb = 0

    # ---- validation -------------------------------------------------------------------------------

    def _command(self) -> list[str]:
        o = self.opts
        if o.workload:
            return [sys.executable, "-m", "lufreplay", "workload", o.workload, *o.command]
        return list(o.command)

    def _mode(self) -> str:
        o = self.opts
        cmd = bool(o.command or o.workload)
        chosen = [m for m, on in (("command", cmd), ("pid", bool(o.pids)), ("cgroup", o.cgroup is not None)) if on]
        if o.system_wide:
            chosen.append("system")
        if len(chosen) > 1:
            raise RecordError("give only one of: -- CMD / --workload, -p PID, --cgroup PATH, -a")
        if not chosen:
            raise RecordError("nothing to record: give -- CMD, --workload NAME, -p PID, --cgroup PATH or -a")
        if o.memory_limit and chosen[0] != "command":
            raise RecordError("--memory-limit needs a command to run (-- CMD or --workload)")
        from lufreplay.inputs import positive_seconds

        for bad in (
            positive_seconds("-d/--duration", o.duration),
            positive_seconds("--segment-seconds", o.segment_seconds),
        ):
            if bad:
                raise RecordError(bad)
        return chosen[0]

    def _calibrate(self) -> None:
        """Before the probes and the workload: the calibration's own shootdowns stay out of the trace."""
        from lufreplay.capture import shootdown_cost as sc

        sys.stderr.write("lufreplay: measuring the cost of a remote TLB shootdown on this host (--calibrate)\n")
        try:
            self.shootdown_cost = sc.calibrate(sc.CalibrateOptions())
        except sc.CalibrationError as e:
            raise RecordError(f"--calibrate: {e}") from None

    def _symbols(self) -> Any:
        """/proc/kallsyms, parsed once per recording (it takes seconds on a busy host)."""
        from lufreplay.capture.procfs import Symbols

        if self._syms is None:
            self._syms = Symbols()
        return self._syms

    def _flush_func(self) -> int:
        name = probes.flush_func_name()
        try:
            return self._symbols().address(name)
        except (KeyError, OSError) as e:
            raise RecordError(f"cannot find the TLB flush function: {e}") from None

    # ---- main -----------------------------------------------------------------------------------

    def run(self) -> int:
        o = self.opts
        one_arena()
        rb_bytes = parse_buffer_size(o.buffer_size)
        if o.dump_bpf:
            build = probes.BuildOptions(rb_bytes=rb_bytes, filter_tgid=not o.system_wide)
            try:
                build.flush_tlb_func = self._flush_func()
            except RecordError:
                build.flush_tlb_func = 0  # not root: the address is hidden; the rest of the program is the same
            sys.stdout.write(probes.program_text(build))
            return 0
        mode = self._mode()
        from lufreplay.capture import perfcount

        try:
            self.counter_events = perfcount.parse_events(o.counters)
        except perfcount.CounterError as e:
            raise RecordError(str(e)) from None
        build = probes.BuildOptions(rb_bytes=rb_bytes, filter_tgid=(mode != "system"))
        if os.geteuid() != 0:
            raise RecordError("recording needs root (BPF and tracefs); run with sudo")
        if o.calibrate:
            self._calibrate()
        from lufreplay.capture import features

        if features.tracefs_path() is None:
            raise RecordError("tracefs is not mounted and could not be mounted at /sys/kernel/tracing")
        build.absent = probes.absent_tracepoints()
        self.exact_check = probes.exact_tier()
        build.exact = bool(self.exact_check["ok"])
        self.shoot_check = probes.shoot_probe_check(build.absent)
        shoot_chain = tuple(self.shoot_check["probes"]) if self.shoot_check["ok"] else ()
        build.shoot_probe = shoot_chain[0] if shoot_chain else ""
        self.shoot_fallback = shoot_chain[1:]
        if build.absent:
            sys.stderr.write(
                f"lufreplay: warning: this kernel lacks {len(build.absent)} tracepoint(s), recorded without them: "
                f"{', '.join(build.absent)}\n"
            )
        try:
            probes.import_bcc()
        except probes.ProbeError as e:
            raise RecordError(str(e)) from None
        argv = self._command()
        target_pids: list[int] = []
        cgroup_path: Path | None = None
        if mode == "command":
            if not argv:
                raise RecordError("empty command")
            if shutil.which(argv[0]) is None:
                raise RecordError(f"cannot start command: {argv[0]}: command not found", code=127)
        elif mode == "pid":
            for p in o.pids:
                if p <= 0 or not Path(f"/proc/{p}").is_dir():
                    raise RecordError(f"-p {p}: no such process")
            target_pids = sorted(set(o.pids))
        elif mode == "cgroup":
            from lufreplay.capture.cgroup import CgroupError, cgroup_pids, resolve_cgroup

            try:
                cgroup_path = resolve_cgroup(o.cgroup)  # type: ignore[arg-type]
                target_pids = cgroup_pids(cgroup_path)
            except CgroupError as e:
                raise RecordError(str(e)) from None
        limit = None
        if o.memory_limit:
            from lufreplay.capture.cgroup import parse_size

            try:
                limit = parse_size(o.memory_limit)
            except ValueError as e:
                raise RecordError(f"--memory-limit: {e}") from None

        from lufreplay.trace.writer import TraceExistsError, prepare_output

        try:
            prepare_output(o.output, o.force)
        except TraceExistsError as e:
            raise RecordError(str(e)) from None
        except OSError as e:
            raise RecordError(f"{o.output}: cannot create ({e.strerror})") from None
        self._start_watchdog(limit is not None)

        build.flush_tlb_func = self._flush_func()
        old_int = signal.signal(signal.SIGINT, self._on_sigint)
        old_term = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._record(mode, argv, target_pids, cgroup_path, limit, build)
        except KeyboardInterrupt:
            self._abort()
            sys.stderr.write("lufreplay: aborted; completed segments are kept\n")
            return 130
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
            if self.watchdog is not None:
                self.watchdog.done()

    def _start_watchdog(self, uses_cgroup: bool) -> None:
        """Clean what a killed recorder left behind, then start the watchdog that cleans up after this one."""
        from lufreplay.capture.cgroup import clean_stale
        from lufreplay.capture.watchdog import Watchdog

        if uses_cgroup:
            for d in clean_stale():
                sys.stderr.write(f"lufreplay: removed the stale cgroup {d} of a recorder that is gone\n")
        self.watchdog = Watchdog()
        self.watchdog.tell("out", self.opts.output.resolve())

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.sigints += 1
        if self.sigints >= 2:
            raise KeyboardInterrupt
        self.stop_reason = self.stop_reason or "interrupted"
        self.stop_event.set()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stop_reason = self.stop_reason or "terminated"
        self.stop_event.set()

    def _abort(self) -> None:
        if self.prog is not None:
            try:
                self.prog.set_state(2)
            except Exception:
                pass
        self._stop_workload(grace_s=0.5)
        if self.cgroup is not None:
            try:
                self.cgroup.close()
            except Exception:
                pass

    def _record(
        self,
        mode: str,
        argv: list[str],
        target_pids: list[int],
        cgroup_path: Path | None,
        limit: int | None,
        build: probes.BuildOptions,
    ) -> int:
        from lufreplay.capture import features, procfs
        from lufreplay.capture.cgroup import CgroupError, MemoryCgroup
        from lufreplay.trace.writer import TraceWriter

        o = self.opts
        t_cal = time.monotonic()
        page_pfn = self._calibrate_page_pfn(build)
        page_pfn["calibrate_s"] = round(time.monotonic() - t_cal, 3)
        t_load = time.monotonic()
        try:
            self.prog = probes.load(build, self.shoot_fallback)
        except probes.ProbeError as e:
            raise RecordError(str(e)) from None
        load_s = time.monotonic() - t_load
        prog = self.prog
        if page_pfn.get("ok") and not build.raw_page:
            page_pfn["attach"] = "tracepoint"
            page_pfn["fallback"] = f"raw page probes did not load: {prog.load_errors[0] if prog.load_errors else '?'}"
            sys.stderr.write(
                f"lufreplay: warning: {page_pfn['fallback']}; page allocator probes use classic tracepoints\n"
            )
        try:
            if mode == "command":
                from lufreplay.capture.watchdog import start_time

                # A built-in workload is Python: a Ctrl-C reaching it while it imports prints a traceback. It
                # ignores SIGINT (so do its helpers) and the recorder stops it with SIGTERM, which it handles.
                self.child = Child(argv, ignore_sigint=o.workload is not None)
                target_pids = [self.child.pid]
                if self.watchdog is not None:
                    self.watchdog.tell("pid", f"{self.child.pid} {start_time(self.child.pid)}")
                if limit is not None:
                    try:
                        self.cgroup = MemoryCgroup.create(limit, name=f"lufreplay-rec-{os.getpid()}")
                        if self.watchdog is not None:
                            self.watchdog.tell("cgroup", self.cgroup.path)
                        self.cgroup.add(self.child.pid)
                    except CgroupError as e:
                        raise RecordError(str(e)) from None
            if mode != "system":
                prog.add_targets(target_pids)

            cal = build.calibration
            sym = self._symbols()
            ctx = decode.DecodeContext(resolve=sym.resolve, calibration=cal, is_kthread=KthreadCache())
            formats = {tp: features.tracepoint_format(tp) for tp in probes.TRACEPOINTS}
            meta: dict[str, Any] = {
                "tool": "lufreplay",
                "tool_version": lufreplay.__version__,
                "run_id": str(uuid.uuid4()),
                "created": datetime.now(timezone.utc).isoformat(),
                "host": procfs.host_facts(),
                "clock": procfs.clock_anchor(),
                "command_line": list(sys.argv),
                "target": {
                    "mode": mode,
                    "command": argv if mode == "command" else None,
                    "workload": o.workload,
                    "pids": target_pids,
                    "cgroup": str(cgroup_path or (self.cgroup.path if self.cgroup else "")) or None,
                    "memory_limit": limit,
                    "memory_cgroup_version": self.cgroup.version if self.cgroup else None,
                },
                "probes": probes.probes_meta(
                    build.raw_ipi, build.raw_page, build.absent, build.exact, build.shoot_probe
                ),
                "shootdown_source": probes.shootdown_source(build, self.shoot_check),
                "exact": probes.exact_meta(build, self.exact_check, prog.exact_error),
                "probes_absent": list(build.absent),
                "page_pfn": page_pfn,
                "tracepoint_formats": formats,
                "enums": {
                    "tlb_flush_reason": schema.TLB_FLUSH_REASON,
                    **{f"{t.name}.{c.name}": c.enum for t in schema.TABLES.values() for c in t.enum_columns},
                },
                "raw_kinds": schema.RAW_KIND,
                "migration_decode": cal,
                "flush_function": {"name": probes.FLUSH_FUNC.get(os.uname().machine), "compiled_in": True},
                "buffer_size": build.rb_bytes,
                "segment_seconds": o.segment_seconds,
                "bpf_load_s": round(load_s, 3),
                "complete": False,
            }
            if self.shootdown_cost is not None:
                meta["shootdown_cost"] = self.shootdown_cost
            from lufreplay.capture.perfcount import UsageSampler

            self.usage = UsageSampler(self.counter_events)
            meta["counters"] = self.usage.meta()
            self.usage_pids = target_pids if mode != "system" else []
            self.writer = TraceWriter(o.output, meta)
            consumer = RingConsumer(prog.ring_fd(), build.rb_bytes)
            self.writer.rehearse(decode.rehearsal(cal))
            self.compiler_released = keep_freed_memory()
            # at the window's start; highest while recording (VmHWM from here, else the polls' samples)
            self.window_rss_kb = [rss_kb(), 0]
            self.startup_peak_kb = rss_kb("VmHWM")  # the compile's peak, before the reset forgets it
            self.hwm_reset = reset_rss_peak()

            # Open the window: probes on, then the start snapshot right away (the end reads, then stops).
            prog.set_state(1)
            start_ns = _monotonic_ns()
            # The page totals are read right after vmstat, here and at the end: info compares the deltas.
            start_counters = procfs.counter_rows(0, start_ns, with_vmstat=prog.totals)
            misses0 = prog.recursion_misses()
            rescued0 = prog.rescued()
            # The writer may fall one ring's worth behind before the poller waits for it.
            self.seg = SegmentWriter(self.writer, ctx, start_ns, int(o.segment_seconds * 1e9), build.rb_bytes)
            self.seg.start()
            self.seg.put_table("counters", start_counters)
            self.seg.put_table("counters", recorder_counter_rows(0, start_ns, self._usage()))
            self._sample_usage(0, start_ns)
            for pid in target_pids:
                self._snapshot_maps(pid)
            if self.child is not None:
                self.child.release()
            self.startup_s = time.monotonic() - self.t_run0

            self._loop(consumer, start_ns, target_pids, mode)

            # Close the window: the counters, then the stop flag. Events between a counter file's read and
            # the flag are recorded after that read, and info leaves them out (it compares what was recorded
            # between the two reads of each file); counted but unrecorded events would be lost for good.
            end_ns = _monotonic_ns()
            end_counters = procfs.counter_rows(1, end_ns, with_vmstat=prog.totals)
            extra = self._usage()
            prog.set_state(2)
            misses1 = prog.recursion_misses()
            rescued1 = prog.rescued()
            self.seg.put_table("counters", end_counters)
            self.seg.put_table("counters", recorder_counter_rows(1, end_ns, extra))
            self._sample_usage(2, end_ns)
            time.sleep(0.01)  # let programs that passed the state check before the flip commit their records
            self.seg.put_raw(consumer.drain(), end_ns)
            self_run = prog.self_run()
            bpf_run = prog.run_stats() if _bpf_stats_enabled() else {}
            self._read_losses(end_ns)
            ignored: dict[str, int] = {}
            rescued = {k: v - rescued0.get(k, 0) for k, v in rescued1.items()}
            for name, m in misses1.items():
                # A raw page probe's skipped runs that its second program handled are not lost.
                d = m - misses0.get(name, 0) - rescued.get(name, 0)
                if d <= 0:
                    continue
                if name.endswith(IGNORED_MISS_SUFFIX) or name.startswith(probes.NESTED_PREFIX):
                    ignored[name] = d  # see IGNORED_WHY
                else:
                    self.loss_rows.append((start_ns, end_ns, -1, name, 1, d))
            if self.loss_rows:
                self.seg.put_table("losses", loss_rows(self.loss_rows))
            for pid in sorted(set(target_pids) | set(prog.targets() if mode != "system" else [])):
                self._snapshot_maps(pid, force=True)
            self._stop_workload()
            self.seg.finish()
            self.seg.join()
            consumer.close()

            by_probe: dict[str, int] = {}
            for r in self.loss_rows:
                by_probe[r[3]] = by_probe.get(r[3], 0) + r[5]
            total_lost = sum(by_probe.values())
            usage = self._usage()
            peak = rss_kb("VmHWM") if self.hwm_reset else max(self.window_rss_kb[1], rss_kb())
            final = {
                "window": {"start_ns": start_ns, "end_ns": end_ns},
                "stop_reason": self.stop_reason or "unknown",
                "losses": {
                    "total": total_lost,
                    "by_probe": by_probe,
                    "ignored_recursion_misses": ignored,
                    "ignored_why": IGNORED_WHY,
                    "nested_rescued": {k: v for k, v in rescued.items() if v},
                },
                "events": self.seg.events,
                "unknown_records": self.seg.unknown,
                "recorder": {
                    "tgid": os.getpid(),  # LR_SELF_TGID: never traced, so replay calls its flushes `untraced`
                    "cpu_ns": usage["recorder_cpu_ns"],
                    "max_rss_kb": usage["recorder_max_rss_kb"],
                    "window_start_rss_kb": self.window_rss_kb[0],
                    "window_max_rss_kb": max(self.window_rss_kb[0], peak),
                    "compiler_pages_released_kb": self.compiler_released >> 10,
                    "startup_s": round(self.startup_s, 3) if self.startup_s is not None else None,
                    "polls": self.polls,
                    "watermark_wakeups": self.watermark_wakeups,
                    "wake_records_per_cpu": probes.wake_records(build.rb_bytes),
                    **self_run,
                    "stage_cpu_ns": {
                        "drain": self.drain_ns,
                        "decode": self.seg.decode_ns,
                        "encode": self.seg.encode_ns,
                    },
                    "bpf_run": bpf_run,
                    "waited_for_writer_s": round(self.seg.blocked_s, 3),
                },
                "pages": prog.totals(),
                "workload": self._workload_meta(),
                "targets_final": prog.targets() if mode != "system" else None,
            }
            if self.seg.error is not None:
                return self._writer_failed(final)
            try:
                self.writer.close(final)
            except OSError as e:
                self.seg.error = e
                return self._writer_failed(final)
            return self._report(total_lost, by_probe)
        finally:
            self._stop_workload(grace_s=0.5)
            if self.cgroup is not None:
                try:
                    self.cgroup.close()
                except Exception as e:
                    sys.stderr.write(f"lufreplay: warning: {e}\n")
            if self.usage is not None:
                self.usage.close()
            if self.prog is not None:
                try:
                    self.prog.close()
                except Exception:
                    pass

    def _usage(self) -> dict[str, int]:
        """The recorder's CPU time and whole-run peak RSS (ru_maxrss follows VmHWM, which the window's start
        restarted: the compile's peak is kept apart)."""
        u = _recorder_usage()
        u["recorder_max_rss_kb"] = max(u["recorder_max_rss_kb"], self.startup_peak_kb)
        return u

    def _stop_workload(self, grace_s: float = 2.0) -> None:
        """Stop a command that still runs (SIGTERM, then SIGKILL) and, when the recorder stopped it, every
        process it left in the recorder's cgroup (a background job ignores Ctrl-C); a command that exited
        by itself keeps its leftovers, which the cgroup's close moves out."""
        if self.child is None:
            return
        running = not self.child.poll()
        if running:
            self.child.terminate(grace_s=grace_s)
        if self.cgroup is not None and (running or self.stop_reason in ("interrupted", "terminated")):
            from lufreplay.capture.watchdog import kill_cgroup

            kill_cgroup(self.cgroup.path)

    def _calibrate_page_pfn(self, build: probes.BuildOptions) -> dict[str, Any]:
        """Measure vmemmap base and struct page size so the page allocator probes can be raw tracepoints;
        on failure keep them classic and say so. Returns ``meta.page_pfn`` (the base itself is not kept)."""
        from lufreplay.capture import calibrate

        try:
            cal = calibrate.calibrate()
        except calibrate.CalibrationError as e:
            summary: dict[str, Any] = {"ok": False, "error": str(e)}
        except Exception as e:  # classic page probes always work: never let calibration stop a recording
            summary = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        else:
            summary = dict(cal.summary)
            if cal.ok:
                build.page_pfn = (cal.base, cal.size)
        summary["attach"] = "raw_tracepoint" if build.raw_page else "tracepoint"
        if not build.raw_page:
            sys.stderr.write(
                f"lufreplay: warning: page-pointer calibration failed ({summary.get('error', '?')}); page"
                " allocator probes use classic tracepoints (frees in IRQ context may be lost)\n"
            )
        return summary

    def _workload_meta(self) -> dict[str, Any] | None:
        c = self.child
        if c is None:
            return None
        return {
            "pid": c.pid,
            "exit_status": c.status,
            "runtime_s": round((c.ended_ns - c.started_ns) / 1e9, 3) if c.ended_ns else None,
        }

    def _writer_failed(self, final: dict[str, Any]) -> int:
        from lufreplay.console import fail

        e = self.seg.error if self.seg else None
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        final["stop_reason"] = "no space left on device" if full else f"writing the trace failed ({e})"
        try:
            self.writer.meta.update(final)
            self.writer.meta["complete"] = False
            from lufreplay.trace.writer import write_meta

            # The failed segment's files are gone, which usually leaves room for this; if not, the meta.json
            # written at the start stays, and the readers still find the committed segments.
            write_meta(self.writer.path, self.writer._full_meta())
        except Exception:
            pass
        kept = f"{self.writer.segment} committed segment(s) kept and readable"
        if full:
            msg = f"{self.opts.output}: no space left on device; recording stopped, {kept}"
        else:
            msg = f"{self.opts.output}: writing the trace failed ({e}); recording stopped, {kept}"
        fail(msg)
        return 1

    def _report(self, total_lost: int, by_probe: dict[str, int]) -> int:
        if total_lost:
            worst = ", ".join(f"{k} {v}" for k, v in sorted(by_probe.items(), key=lambda kv: -kv[1])[:4])
            sys.stderr.write(f"lufreplay: warning: {total_lost} events lost ({worst}); see the losses table\n")
        ev = self.seg.events if self.seg else 0
        how = "recorded"
        if self.stop_reason in ("interrupted", "terminated"):
            stopped = " the command was stopped;" if self.child else ""
            how = f"{self.stop_reason}:{stopped} recorded"
        sys.stderr.write(
            f"lufreplay: {how} {ev:,} events into {self.opts.output} ({self.writer.bytes_written / 1e6:.1f} MB,"
            f" {self.writer.segment} segments)\n"
        )
        if self.child is not None and self.child.status not in (0, None) and self.stop_reason == "command exited":
            sys.stderr.write(f"lufreplay: note: the command exited with status {self.child.status}\n")
        if total_lost and self.opts.strict:
            return 2
        return 0

    def _loop(self, consumer: RingConsumer, start_ns: int, target_pids: list[int], mode: str) -> tuple[int, int]:
        o = self.opts
        assert self.seg is not None and self.prog is not None
        self._loss_prev = self.prog.lost_per_cpu()
        self._loss_prev_ns = start_ns
        next_loss = time.monotonic() + LOSS_READ_S
        t0 = time.monotonic()
        progress = Progress()
        total = 0
        lost = 0
        # Edge-triggered: epoll reports only the programs' forced wake-ups, not "the ring holds data".
        ep = select.epoll()
        ep.register(consumer_fd := self.prog.ring_fd(), select.EPOLLIN | select.EPOLLET)
        ep.poll(0)  # consume the readiness reported at registration
        capacity = consumer.size / consumer.slot
        interval = POLL_MAX_S
        last_drain = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if ep.poll(interval):
                    self.watermark_wakeups += 1
                now_ns = _monotonic_ns()
                t = time.thread_time_ns()
                recs = consumer.drain()
                self.prog.drained()
                self.drain_ns += time.thread_time_ns() - t
                self.polls += 1
                if not self.hwm_reset:
                    self.window_rss_kb[1] = max(self.window_rss_kb[1], rss_kb())
                now = time.monotonic()
                rate = len(recs) / max(now - last_drain, 1e-3)
                last_drain = now
                interval = min(POLL_MAX_S, max(POLL_MIN_S, POLL_FILL * capacity / max(rate, 1.0)))
                total += len(recs)
                self.seg.put_raw(recs, now_ns)
                if len(recs):
                    self._note_mapping_syscalls(recs)
                self._flush_maps()
                if time.monotonic() >= next_loss:
                    lost = self._read_losses(now_ns)
                    next_loss += LOSS_READ_S
                progress.update(time.monotonic() - t0, total, self.writer.bytes_written / 1e6, lost)
                self._sample_usage(1, now_ns)
                if self.seg.error is not None:
                    self.stop_reason = self.stop_reason or "writer error"
                    break
                if self.child is not None and self.child.poll():
                    self.stop_reason = self.stop_reason or "command exited"
                    break
                if o.duration is not None and time.monotonic() - t0 >= o.duration:
                    self.stop_reason = self.stop_reason or "duration"
                    break
                if mode == "pid" and not any(Path(f"/proc/{p}").is_dir() for p in target_pids):
                    self.stop_reason = self.stop_reason or "processes exited"
                    break
        finally:
            progress.stop()
            ep.unregister(consumer_fd)
            ep.close()
        return _monotonic_ns(), lost

    def _sample_usage(self, phase: int, now_ns: int) -> None:
        """The usage table's perf counts and process times: at start (0), at each segment boundary (1), at
        the stop (2). Processes are the targets and every process the probes followed (forks)."""
        if self.usage is None or self.seg is None or self.prog is None:
            return
        seg_ns = int(self.opts.segment_seconds * 1e9)
        if phase == 1 and now_ns < self.next_usage_ns:
            return
        self.next_usage_ns = self.next_usage_ns or now_ns
        while self.next_usage_ns <= now_ns:  # stay on the start's grid, one sample per late boundary
            self.next_usage_ns += seg_ns
        pids = set(self.usage_pids)
        if self.usage_pids:
            pids.update(self.prog.targets())
        c = self.child
        exited = {c.pid: (c.cpu_ns, c.ended_ns - c.started_ns)} if c is not None and c.cpu_ns is not None else {}
        self.seg.put_table("usage", self.usage.sample(phase, pids, exited))

    def _read_losses(self, now_ns: int) -> int:
        """Ring reserve failures since the last read, per CPU and kind, as loss rows; returns the total so far."""
        assert self.prog is not None
        cur = self.prog.lost_per_cpu()
        names = {v: k for k, v in schema.RAW_KIND.items()}
        for kid, per_cpu in cur.items():
            prev = self._loss_prev.get(kid, [0] * len(per_cpu))
            for cpu, (a, b) in enumerate(zip(per_cpu, prev, strict=False)):
                if a > b:
                    self.loss_rows.append((self._loss_prev_ns, now_ns, cpu, names[kid], 0, a - b))
        self._loss_prev, self._loss_prev_ns = cur, now_ns
        return sum(r[5] for r in self.loss_rows if r[4] == 0)

    def _note_mapping_syscalls(self, recs: np.ndarray) -> None:
        m = (recs["kind"] == schema.RAW_KIND["syscall"]) & np.isin(recs["x"] & 0xFF, MAPPING_SYSCALLS)
        if m.any():
            self.maps_dirty.update(int(t) for t in np.unique(recs["tgid"][m]))

    def _flush_maps(self) -> None:
        if not self.maps_dirty:
            return
        now = time.monotonic()
        limit = MAPS_MIN_INTERVAL_S if not self.opts.system_wide else 1.0
        for tgid in list(self.maps_dirty):
            if now - self.maps_last.get(tgid, 0.0) >= limit:
                self.maps_dirty.discard(tgid)
                self._snapshot_maps(tgid)

    def _snapshot_maps(self, tgid: int, force: bool = False) -> None:
        from lufreplay.capture.procfs import read_maps

        assert self.seg is not None
        t = read_maps(tgid, _monotonic_ns(), self.maps_snapshot)
        self.maps_last[tgid] = time.monotonic()
        if t.num_rows:
            self.maps_snapshot += 1
            self.seg.put_table("maps", t)
