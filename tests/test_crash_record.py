"""SIGKILL of the real recorder (root + BPF): only whole segments are read, the interruption is reported, and no
workload process, cgroup or temporary file outlives it (watchdog, PR_SET_PDEATHSIG, stale-cgroup cleanup)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lufreplay import open_trace, schema
from lufreplay.capture.cgroup import clean_stale, memory_hierarchy

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
RECORD = [sys.executable, "-m", "lufreplay", "record"]
pytestmark = pytest.mark.bpf  # root + BPF: runs for real in CI (as root), never skipped


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _memroot() -> Path:
    found = memory_hierarchy()
    assert found is not None, "no memory cgroup hierarchy"
    return found[1]


def _record(out: Path, *cmd: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*RECORD, "-o", str(out), "--memory-limit", "128M", "--segment-seconds", "0.5", "--", *cmd],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _leftovers(out: Path, recorder_pid: int) -> None:
    """Nothing of the killed recorder remains: its cgroup (so every process that was in it), temporaries."""
    cg = _memroot() / f"lufreplay-rec-{recorder_pid}"
    _wait_for(lambda: not cg.exists(), 30, f"{cg} to be removed")
    _wait_for(lambda: not [*out.glob(".*.tmp"), *out.glob("*/.*.tmp")], 30, "temporary files to go")


def test_sigkill_mid_recording(tmp_path: Path) -> None:
    out = tmp_path / "t"
    marker = tmp_path / "grandchild.pid"
    # The command forks a grandchild; both must die with the recorder.
    script = f"sleep 300 & echo $! > {marker}; exec sleep 300"
    rec = _record(out, "sh", "-c", script)
    try:
        _wait_for(lambda: (out / schema.COMMIT_DIR / schema.commit_name(2)).exists(), 600, "3 committed segments")
    finally:
        os.kill(rec.pid, signal.SIGKILL)
        rec.wait()
    grandchild = int(marker.read_text())
    tr = open_trace(out)
    child = tr.meta["target"]["pids"][0]
    _leftovers(out, rec.pid)
    _wait_for(lambda: not _alive(child) and not _alive(grandchild), 30, "the workload to die")

    tr = open_trace(out)
    assert not tr.complete and tr.n_segments >= 3
    assert (tr.interruption_line() or "").startswith(f"recording interrupted: {tr.n_segments} whole segment(s)")
    r = subprocess.run(
        [sys.executable, "-m", "lufreplay", "info", str(out)], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0 and "recording interrupted" in " ".join(r.stdout.split()[:12]), r.stderr


def test_sigkill_during_probe_compile_and_stale_cgroup_cleanup(tmp_path: Path) -> None:
    # A stale cgroup of a recorder that is gone, with a process still in it.
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = _memroot() / f"lufreplay-rec-{gone.pid}"
    stale.mkdir()
    sleeper = subprocess.Popen(["sleep", "300"])
    (stale / "cgroup.procs").write_text(str(sleeper.pid))

    out = tmp_path / "t"
    rec = _record(out, "sleep", "300")
    try:
        # The output directory exists before the BPF program is compiled (seconds): kill in between.
        _wait_for(lambda: out.exists(), 120, "the output directory")
        time.sleep(0.3)
        assert not (out / schema.META_FILE).exists(), "the probes compiled faster than expected"
    finally:
        os.kill(rec.pid, signal.SIGKILL)
        rec.wait()
    _leftovers(out, rec.pid)
    # The recorder removed the stale cgroup at start, killing what ran in it.
    assert not stale.exists()
    sleeper.wait(timeout=10)
    assert sleeper.returncode == -signal.SIGKILL
    r = subprocess.run(
        [sys.executable, "-m", "lufreplay", "info", str(out)], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "meta.json: missing" in r.stderr


def test_clean_stale_keeps_cgroups_of_live_recorders() -> None:
    live = _memroot() / f"lufreplay-rec-{os.getpid()}"
    live.mkdir()
    try:
        assert live not in clean_stale()
        assert live.exists()
    finally:
        live.rmdir()


def test_workload_dies_with_the_recorder_without_cgroup_or_watchdog(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG alone: a recorder's direct child goes when the recorder is SIGKILLed."""
    code = textwrap.dedent(
        """
        import os, signal, sys
        from lufreplay.capture.recorder import Child
        c = Child(["sleep", "300"])
        c.release()
        print(c.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    pid = int(r.stdout)
    _wait_for(lambda: not _alive(pid), 30, f"sleep {pid} to die")
