"""Memory cgroups for ``record --memory-limit`` and ``--cgroup``, on cgroup v1 or v2.

The memory controller may be bound to the v1 hierarchy (as on Firecracker guests: /sys/fs/cgroup/memory)
or to v2 (the unified hierarchy): mount points are found in /proc/self/mounts, never assumed.
"""

from __future__ import annotations

import errno
import os
import re
import time
import uuid
from pathlib import Path
from types import TracebackType

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


class CgroupError(ValueError):
    """A cgroup operation failed; the message says which cgroup and why, in one line."""


def parse_size(s: str) -> int:
    """``"1G"``, ``"512M"``, ``"64k"``, ``"1.5GiB"`` or plain bytes → bytes (binary units)."""
    m = _SIZE_RE.match(str(s))
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise ValueError(f"invalid size {s!r}: expected bytes or a number with a K/M/G/T suffix, e.g. 1G or 512M")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise ValueError(f"invalid size {s!r}: must be at least 1 byte")
    return int(value)


def memory_hierarchy() -> tuple[int, Path] | None:
    """(version, mount point) of the hierarchy holding the memory controller, or None.

    v2 wins when its root offers ``memory``; otherwise the v1 hierarchy mounted with the ``memory`` option.
    """
    v1: Path | None = None
    v2: list[Path] = []
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        parts = line.split()
        if len(parts) < 4:
            continue
        mnt = Path(parts[1].replace("\\040", " "))
        if parts[2] == "cgroup2":
            v2.append(mnt)
        elif parts[2] == "cgroup" and "memory" in parts[3].split(","):
            v1 = mnt
    for mnt in v2:
        try:
            if "memory" in (mnt / "cgroup.controllers").read_text().split():
                return 2, mnt
        except OSError:
            continue
    if v1 is not None:
        return 1, v1
    return None


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class MemoryCgroup:
    """A memory cgroup created by lufreplay; removed by ``close()`` (tasks left in it go to the parent)."""

    def __init__(self, path: Path, version: int, owned: bool = True) -> None:
        self.path = path
        self.version = version
        self.owned = owned
        self._closed = False

    @classmethod
    def create(cls, limit_bytes: int, name: str | None = None) -> MemoryCgroup:
        """Create a memory cgroup limited to ``limit_bytes`` under the memory hierarchy's root."""
        if limit_bytes < 1:
            raise CgroupError(f"memory limit must be positive, not {limit_bytes}")
        found = memory_hierarchy()
        if found is None:
            raise CgroupError(
                "no memory cgroup controller is mounted (neither cgroup v2 with 'memory' nor a v1 memory hierarchy)"
            )
        version, root = found
        name = name or f"lufreplay-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if "/" in name or name in (".", ".."):
            raise CgroupError(f"invalid cgroup name {name!r}")
        path = root / name
        if version == 2:
            cls._enable_v2_memory(root)
        try:
            path.mkdir()
        except FileExistsError:
            raise CgroupError(f"{path}: cgroup already exists (pick another name)") from None
        except OSError as e:
            raise CgroupError(f"{path}: cannot create cgroup ({e.strerror})") from None
        cg = cls(path, version)
        try:
            _write(path / ("memory.max" if version == 2 else "memory.limit_in_bytes"), str(int(limit_bytes)))
        except OSError as e:
            cg.close()
            raise CgroupError(f"{path}: cannot set the memory limit ({e.strerror})") from None
        return cg

    @staticmethod
    def _enable_v2_memory(root: Path) -> None:
        ctl = root / "cgroup.subtree_control"
        try:
            if "memory" not in ctl.read_text().split():
                _write(ctl, "+memory")
        except OSError as e:
            raise CgroupError(f"{ctl}: cannot enable the memory controller ({e.strerror})") from None

    @property
    def limit(self) -> int | None:
        """The limit as the kernel stored it (v1 rounds to pages); None for "max"."""
        f = self.path / ("memory.max" if self.version == 2 else "memory.limit_in_bytes")
        raw = f.read_text().strip()
        return None if raw == "max" else int(raw)

    def usage(self) -> int:
        """Current memory charged to the cgroup, in bytes."""
        f = self.path / ("memory.current" if self.version == 2 else "memory.usage_in_bytes")
        return int(f.read_text())

    def stat(self) -> dict[str, int]:
        """memory.stat as name → value."""
        out: dict[str, int] = {}
        for line in (self.path / "memory.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
        return out

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the cgroup."""
        try:
            _write(self.path / "cgroup.procs", str(int(pid)))
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise CgroupError(f"no such process {pid}") from None
            raise CgroupError(f"{self.path}: cannot add process {pid} ({e.strerror})") from None

    def pids(self) -> list[int]:
        """Processes in the cgroup."""
        return cgroup_pids(self.path)

    def close(self) -> None:
        """Move leftover tasks to the parent and remove the cgroup (idempotent)."""
        if self._closed or not self.owned:
            self._closed = True
            return
        parent = self.path.parent / "cgroup.procs"
        deadline = time.monotonic() + 5.0
        while True:
            for pid in _read_ids(self.path / "cgroup.procs"):
                try:
                    _write(parent, str(pid))
                except OSError:
                    pass  # exited meanwhile, or a kernel thread that cannot move
            try:
                self.path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                # EBUSY while exiting tasks are still charged; retry briefly, then report.
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    self._closed = True
                    raise CgroupError(f"{self.path}: cannot remove cgroup ({e.strerror})") from None
                time.sleep(0.05)
        self._closed = True

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryCgroup({str(self.path)!r}, v{self.version})"


def _read_ids(f: Path) -> list[int]:
    try:
        return [int(x) for x in f.read_text().split()]
    except FileNotFoundError:
        return []


def resolve_cgroup(path: Path) -> Path:
    """A cgroup directory from a path that is absolute or relative to a cgroup mount (e.g. ``/mygroup``)."""
    p = Path(path)
    if (p / "cgroup.procs").is_file() or (p / "tasks").is_file():
        return p
    found = memory_hierarchy()
    if found is not None and not p.exists():
        cand = found[1] / str(p).lstrip("/")
        if (cand / "cgroup.procs").is_file():
            return cand
    if not p.exists():
        raise CgroupError(f"{p}: no such cgroup")
    raise CgroupError(f"{p}: not a cgroup directory (no cgroup.procs or tasks file)")


def cgroup_pids(path: Path) -> list[int]:
    """Process ids in a cgroup: ``cgroup.procs`` (v1 and v2), else the thread list ``tasks`` (v1) mapped to tgids."""
    p = resolve_cgroup(path)
    procs = p / "cgroup.procs"
    try:
        if procs.is_file():
            return sorted(set(_read_ids(procs)))
        tids = _read_ids(p / "tasks")
    except OSError as e:
        raise CgroupError(f"{p}: cannot read its processes ({e.strerror})") from None
    tgids: set[int] = set()
    for tid in tids:
        try:
            for line in Path(f"/proc/{tid}/status").read_text().splitlines():
                if line.startswith("Tgid:"):
                    tgids.add(int(line.split()[1]))
                    break
        except OSError:
            continue
    return sorted(tgids)


def clean_stale(prefix: str = "lufreplay-rec-") -> list[Path]:
    """Remove memory cgroups ``<prefix><pid>`` whose recorder (pid) is dead, killing what still runs in them
    (a recorder killed before its watchdog could act). Returns the cgroups removed."""
    from lufreplay.capture.watchdog import kill_cgroup

    found = memory_hierarchy()
    if found is None:
        return []
    gone = []
    for d in found[1].glob(f"{prefix}*"):
        owner = d.name[len(prefix) :]
        if not owner.isdigit() or Path(f"/proc/{owner}").exists():
            continue
        if kill_cgroup(d):
            gone.append(d)
    return gone
