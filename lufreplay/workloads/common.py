"""Shared machinery of the built-in workloads: options, data files, the C helper, cgroups, output.

Every workload runs as one process tree: this Python process plus the ``lrwork`` helper processes it
starts (compiled from ``lrwork.c`` on first use). Helpers wait on a "gate" line on stdin, so they can
be moved into the memory cgroup before they charge a single page.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from lufreplay.capture import chelper

PAGE = 4096
DEFAULT_DIR = Path("/var/tmp/lufreplay-work")
HELPER_SOURCE = Path(__file__).with_name("lrwork.c")
#: Free space that must remain on the data file system after creating a workload's files.
MIN_FREE_BYTES = 2 << 30
COMPACT_MEMORY = Path("/proc/sys/vm/compact_memory")
#: memory.stat counters worth reporting (v1: pgpgin/pgpgout; v2: pgscan/pgsteal; both: faults)
MEMCG_KEYS = ("pgpgin", "pgpgout", "pgscan", "pgsteal", "pgfault", "pgmajfault", "workingset_refault_file")


class WorkloadError(Exception):
    """A one-line, user-facing reason why the workload cannot run."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises WorkloadError instead of printing usage and exiting 2."""

    def error(self, message: str) -> NoReturn:
        raise WorkloadError(f"{self.prog}: {message}")


def size(text: str) -> int:
    """argparse type for sizes like 3G, 512M, 4096 (delegates to the cgroup helper's parser)."""
    from lufreplay.capture.cgroup import parse_size

    try:
        value = int(parse_size(text))
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} ({e})") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (must be positive)")
    return value


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return v


def parser(name: str, doc: str, default_duration: float) -> argparse.ArgumentParser:
    """A parser with the options every workload has."""
    p = _Parser(
        prog=f"lufreplay workload {name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--duration", type=positive_float, default=default_duration, help=f"seconds (default {default_duration:g})"
    )
    p.add_argument(
        "--memory-limit",
        type=size,
        default=None,
        metavar="SIZE",
        help="run in a memory cgroup limited to SIZE (root; `lufreplay record --memory-limit` does this itself)",
    )
    p.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help=f"directory for data files and the helper (default {DEFAULT_DIR})"
    )
    p.add_argument("--json", action="store_true", help="print one line of JSON results on stdout")
    return p


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout stays one JSON line."""
    print(f"lufreplay workload: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------------------


def _size_tag(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def prepare_dir(d: Path) -> Path:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkloadError(f"cannot create {d}: {e.strerror}") from None
    if not os.access(d, os.W_OK):
        raise WorkloadError(f"{d} is not writable")
    return d


def data_file(d: Path, stem: str, nbytes: int, sparse: bool = False) -> Path:
    """A data file of exactly ``nbytes``: reused if present with that size, else created.

    Real files hold data blocks (written, not fallocated: unwritten extents read as zeroes without
    I/O); sparse files are one hole, so reading them is CPU-bound page-cache churn.
    """
    nbytes -= nbytes % PAGE
    path = d / f"{stem}-{_size_tag(nbytes)}.{'sparse' if sparse else 'bin'}"
    with contextlib.suppress(FileNotFoundError):
        st = path.stat()
        if st.st_size == nbytes and (sparse or st.st_blocks * 512 >= nbytes):
            return path
        path.unlink()
    if not sparse:
        free = shutil.disk_usage(d).free
        if free - nbytes < MIN_FREE_BYTES:
            raise WorkloadError(
                f"not enough free space in {d} for {path.name}: need {human_bytes(nbytes)} and"
                f" {human_bytes(MIN_FREE_BYTES)} to spare, {human_bytes(free)} free (use --dir or a smaller size)"
            )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if sparse:
                os.ftruncate(fd, nbytes)
            else:
                log(f"creating {path} ({human_bytes(nbytes)})")
                block = bytearray(os.urandom(1 << 20))
                written = 0
                while written < nbytes:
                    # a different first word per MiB, so no two blocks are identical
                    block[:8] = written.to_bytes(8, "little")
                    n = os.write(fd, block[: min(len(block), nbytes - written)])
                    written += n
                    if written % (32 << 20) == 0:
                        # write back and drop as we go: under a small memory cgroup (lufreplay record
                        # --memory-limit) a file of dirty pages larger than the limit is an OOM kill
                        os.fdatasync(fd)
                        os.posix_fadvise(fd, 0, written, os.POSIX_FADV_DONTNEED)
                os.fdatasync(fd)
                # keep the page cache clean of the new file: the workload should start cold
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WorkloadError(f"cannot create {path}: {e.strerror}") from None
    return path


def drop_file_cache(path: Path) -> None:
    """Drop a file's clean page-cache pages (this file only, unlike drop_caches) for a cold start."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# The C helper
# --------------------------------------------------------------------------------------------------


def helper_binary(d: Path) -> Path:
    """lrwork.c, compiled once per source version into DIR/.bin."""
    try:
        return chelper.compiled(HELPER_SOURCE, d / ".bin", "lrwork", "the workloads need")
    except chelper.HelperBuildError as e:
        raise WorkloadError(str(e)) from None


# --------------------------------------------------------------------------------------------------
# Running helper processes
# --------------------------------------------------------------------------------------------------


@dataclass
class Helper:
    """One running lrwork process."""

    label: str
    proc: subprocess.Popen[str]
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


class Session:
    """Starts helpers (inside the optional memory cgroup), reads their JSON, and always cleans up."""

    def __init__(self, opts: argparse.Namespace, name: str) -> None:
        self.opts = opts
        self.name = name
        self.dir = prepare_dir(opts.dir)
        self.binary = helper_binary(self.dir)
        self.helpers: list[Helper] = []
        self.cgroup: Any = None
        #: the memory cgroup's limit and reclaim counters, read just before it is removed
        self.memcg: dict[str, Any] | None = None
        self.t0 = 0.0
        self._tlb0: list[int] | None = None
        self._steal0: int | None = None

    def __enter__(self) -> Session:
        self._old_term = signal.signal(signal.SIGTERM, _on_sigterm)
        if self.opts.memory_limit is not None:
            self.cgroup = _make_cgroup(self.opts.memory_limit, self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.helpers:
            if h.proc.poll() is None:
                h.proc.kill()
        for h in self.helpers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                h.proc.wait(timeout=10)
            for f in (h.proc.stdin, h.proc.stdout):
                with contextlib.suppress(OSError):
                    if f is not None:
                        f.close()
        if self.cgroup is not None:
            cg, self.cgroup = self.cgroup, None
            with contextlib.suppress(OSError, ValueError):
                st = cg.stat()
                self.memcg = {"path": str(cg.path), "version": cg.version, "limit": cg.limit}
                self.memcg.update({k: st[k] for k in MEMCG_KEYS if k in st})
            try:
                cg.close()
            except ValueError as e:  # CgroupError: report, but do not hide the workload's own error
                if exc[0] is None:
                    raise WorkloadError(f"memory cgroup cleanup: {e}") from None
        signal.signal(signal.SIGTERM, self._old_term)
        if exc and exc[0] is _Terminated:
            raise SystemExit(143)

    def spawn(self, label: str, *args: object) -> Helper:
        """Start a helper; it waits at its gate until ``open_gates``."""
        proc = subprocess.Popen(
            [str(self.binary), *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        h = Helper(label, proc)
        self.helpers.append(h)
        if self.cgroup is not None:
            try:
                self.cgroup.add(proc.pid)
            except ValueError as e:  # CgroupError
                raise WorkloadError(f"--memory-limit: {e}") from None
        return h

    def open_gates(self) -> None:
        self._tlb0 = _tlb_row()
        self._steal0 = _pgsteal()
        self.t0 = time.monotonic()
        for h in self.helpers:
            self.send(h)

    @staticmethod
    def send(h: Helper) -> None:
        assert h.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            h.proc.stdin.write("go\n")
            h.proc.stdin.flush()

    @staticmethod
    def read_json(h: Helper) -> dict[str, Any]:
        """The next JSON line of a helper (blocks); a helper that dies instead is a WorkloadError."""
        assert h.proc.stdout is not None
        line = h.proc.stdout.readline()
        if not line:
            rc = h.proc.wait()
            raise WorkloadError(f"{h.label}: helper exited with status {rc} {_oom_hint(rc)}".rstrip())
        try:
            return json.loads(line)
        except ValueError:
            raise WorkloadError(f"{h.label}: unexpected helper output {line.strip()[:80]!r}") from None

    def finish(self, h: Helper, timeout: float) -> dict[str, Any]:
        """Wait for a helper's final JSON line and its exit."""
        h.result = self.read_json(h)
        try:
            rc = h.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise WorkloadError(f"{h.label}: helper did not exit within {timeout:.0f} s") from None
        if rc != 0:
            raise WorkloadError(f"{h.label}: helper exited with status {rc} {_oom_hint(rc)}".rstrip())
        return h.result

    def kernel_since_gates(self) -> dict[str, int | None]:
        """Remote TLB shootdowns received by all CPUs (/proc/interrupts TLB row) and pages reclaimed
        (/proc/vmstat pgsteal_anon + pgsteal_file) since ``open_gates``. Both are system-wide, so they are
        the workload's alone only on a host where nothing else reclaims or shoots down; a cgroup v1
        memory.stat has no page count of reclaim (its pgpgout counts folios)."""
        now, steal = _tlb_row(), _pgsteal()
        tlb = None
        if now is not None and self._tlb0 is not None and len(now) == len(self._tlb0):
            tlb = sum(now) - sum(self._tlb0)
        reclaimed = steal - self._steal0 if steal is not None and self._steal0 is not None else None
        return {"tlb_shootdowns": tlb, "pgsteal": reclaimed}

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def sleep_until(self, t: float) -> None:
        """Sleep until ``t`` seconds after the gates opened, failing early if a helper died."""
        while self.elapsed < t:
            for h in self.helpers:
                rc = h.proc.poll()
                if rc is not None and rc != 0:
                    raise WorkloadError(f"{h.label}: helper exited with status {rc} {_oom_hint(rc)}".rstrip())
            time.sleep(min(0.1, max(0.0, t - self.elapsed)))


def inherited_memory_limit() -> int | None:
    """The tightest memory limit of this process's memory cgroup and its ancestors, or None.

    Under ``lufreplay record --memory-limit`` the workload runs inside the recorder's cgroup: this is
    how it knows a limit applies without ``--memory-limit`` of its own.
    """
    from lufreplay.capture.cgroup import memory_hierarchy

    found = memory_hierarchy()
    if found is None:
        return None
    version, root = found
    rel: str | None = None
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            if (version == 2 and ctrls == "") or (version == 1 and "memory" in ctrls.split(",")):
                rel = path
    except (OSError, ValueError):
        return None
    if rel is None:
        return None
    best: int | None = None
    d = root / rel.lstrip("/")
    while True:
        f = d / ("memory.max" if version == 2 else "memory.limit_in_bytes")
        with contextlib.suppress(OSError, ValueError):
            raw = f.read_text().strip()
            # v1 reports "no limit" as a huge page-rounded number
            if raw != "max" and int(raw) < 1 << 60:
                best = int(raw) if best is None else min(best, int(raw))
        if d == root or root not in d.parents:
            return best
        d = d.parent


def _tlb_row() -> list[int] | None:
    from lufreplay.capture.procfs import read_interrupts

    try:
        return read_interrupts().get("TLB")
    except OSError:
        return None


def _pgsteal() -> int | None:
    from lufreplay.capture.procfs import read_vmstat

    try:
        vm = read_vmstat()
    except OSError:
        return None
    return vm.get("pgsteal_anon", 0) + vm.get("pgsteal_file", 0)


def _oom_hint(rc: int) -> str:
    if rc == -signal.SIGKILL:
        return "(killed: out of memory? raise --memory-limit or shrink the workload)"
    return ""


def _make_cgroup(limit: int, name: str) -> Any:
    from lufreplay.capture import cgroup as cg

    errors: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError)
    extra = getattr(cg, "CgroupError", None)
    if isinstance(extra, type) and issubclass(extra, BaseException):
        errors = (*errors, extra)
    try:
        return cg.MemoryCgroup.create(limit, name=f"lufreplay-{name}-{os.getpid()}")
    except errors as e:
        raise WorkloadError(f"--memory-limit: {e}") from None


# --------------------------------------------------------------------------------------------------
# Compaction and output
# --------------------------------------------------------------------------------------------------


def pagemap_pfns(pid: int, start: int, end: int) -> np.ndarray | None:
    """PFN of every page of [start, end) in process ``pid`` (-1: not present); None without PFN access.

    Reading PFNs from /proc/PID/pagemap needs CAP_SYS_ADMIN; without it the kernel reports them as 0.
    """
    n = (end - start) // PAGE
    try:
        with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), n * 8, (start // PAGE) * 8)
    except OSError:
        return None
    ent = np.frombuffer(raw, dtype="<u8")
    present = (ent >> np.uint64(63)) & np.uint64(1) == 1
    pfn = (ent & np.uint64((1 << 55) - 1)).astype(np.int64)
    if present.any() and not pfn[present].any():
        return None
    return np.where(present, pfn, -1)


def moved_pages(before: np.ndarray | None, after: np.ndarray | None) -> int | None:
    """Pages present in both snapshots whose PFN changed (i.e. migrated), or None if unknown."""
    if before is None or after is None or len(before) != len(after):
        return None
    both = (before >= 0) & (after >= 0)
    return int(np.count_nonzero(both & (before != after)))


def can_compact() -> bool:
    return os.access(COMPACT_MEMORY, os.W_OK)


def compact_memory() -> float:
    """Compact every zone now (root); returns how long it took."""
    t = time.monotonic()
    COMPACT_MEMORY.write_text("1\n")
    return time.monotonic() - t


def pre_compact(enabled: bool) -> dict[str, float] | None:
    """Compact once before the workload allocates anything (root); returns ``{"took_s": ...}`` or None.

    A full compaction leaves the zone's free pages low in the zone, where the migration scanner
    starts: the pages the workload allocates next land there, so the workload's own compactions
    have them to move. Without it, on a host whose other jobs left the low pageblocks full, the
    workload's pages sit above the scanners' meeting point and compaction moves next to nothing.
    """
    if not enabled:
        return None
    took = compact_memory()
    log(f"pre-compaction took {took:.2f} s")
    return {"took_s": round(took, 3)}


def result(
    name: str, runtime_s: float, pages: int, nbytes: int, processes: int, threads: int, **extra: Any
) -> dict[str, Any]:
    """The result document every workload prints (one JSON line with --json)."""
    doc: dict[str, Any] = {
        "workload": name,
        "runtime_s": round(runtime_s, 6),
        "pages_touched": int(pages),
        "pages_per_s": round(pages / runtime_s, 1) if runtime_s > 0 else 0.0,
        "bytes": int(nbytes),
        "bytes_touched": int(pages) * PAGE,
        "processes": processes,
        "threads": threads,
    }
    doc.update(extra)
    return doc


def emit(doc: dict[str, Any], json_out: bool, summary: Iterator[str] | list[str] = ()) -> None:
    if json_out:
        from lufreplay.jsonout import dumps

        print(dumps(doc, indent=None), flush=True)
        return
    print(
        f"{doc['workload']}: {doc['pages_touched']:,} pages touched in {doc['runtime_s']:.2f} s"
        f" ({doc['pages_per_s']:,.0f} pages/s) by {doc['processes']} process(es),"
        f" {doc['threads']} thread(s); {human_bytes(doc['bytes'])} mapped"
    )
    for line in summary:
        print(f"  {line}")
