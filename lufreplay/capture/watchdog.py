"""The recorder's watchdog: cleans up after a recorder that died without cleaning up (SIGKILL, OOM kill).

Run as a script (``python watchdog.py``, no package import: it starts in milliseconds), in its own session so
a Ctrl-C to the recorder's process group does not reach it. The recorder writes lines on its stdin:

    cgroup PATH   a memory cgroup the recorder created (every process in it is the workload's)
    pid N         the command the recorder started
    out DIR       the trace directory being written
    done          the recorder cleaned up itself; exit without doing anything

At EOF without ``done`` (the recorder is gone: its end of the pipe closed), the watchdog kills the command
and every process in the cgroup, removes the cgroup, and deletes the writer's temporary files. BPF programs
need nothing: they are attached through the recorder's file descriptors and go when it does.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path


def _pids(cg: Path) -> list[int]:
    try:
        return [int(x) for x in (cg / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def kill_cgroup(cg: Path, timeout_s: float = 10.0) -> bool:
    """SIGKILL every process of cgroup ``cg`` and remove it; True when it is gone."""
    deadline = time.monotonic() + timeout_s
    while cg.is_dir():
        kill = cg / "cgroup.kill"  # cgroup v2: the kernel kills every member, forks included
        if kill.exists():
            try:
                kill.write_text("1")
            except OSError:
                pass
        for pid in _pids(cg):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            cg.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
        time.sleep(0.05)
    return True


def remove_temporaries(out: Path) -> list[Path]:
    """The hidden ``.*.tmp`` files the trace writer renames into place (never a committed file)."""
    gone = []
    for f in [*out.glob(".*.tmp"), *out.glob("*/.*.tmp")]:
        try:
            f.unlink()
            gone.append(f)
        except OSError:
            pass
    return gone


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a process from a later one with its pid."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class Watchdog:
    """The recorder's side: start the watchdog process and tell it what to clean up."""

    def __init__(self) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, "-S", str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )

    def tell(self, what: str, arg: object) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(f"{what} {arg}\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the watchdog is gone: nothing to tell

    def done(self) -> None:
        """The recorder cleaned up itself: the watchdog exits without touching anything."""
        self.tell("done", "")
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except Exception:
            self.proc.kill()


def main() -> int:
    cgroups: list[Path] = []
    pids: list[tuple[int, int | None]] = []
    outs: list[Path] = []
    for line in sys.stdin:
        what, _, arg = line.strip().partition(" ")
        if what == "done":
            return 0
        if what == "cgroup":
            cgroups.append(Path(arg))
        elif what == "pid":
            pid, _, started = arg.partition(" ")
            pids.append((int(pid), int(started) if started.isdigit() else None))
        elif what == "out":
            outs.append(Path(arg))
    for pid, started in pids:
        if started is None or start_time(pid) != started:
            continue  # exited, and the pid may belong to someone else now
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for cg in cgroups:
        kill_cgroup(cg)
    for out in outs:
        remove_temporaries(out)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(main())
