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
from lufreplay.jsonout import loads_strict

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


#: A Python workload with a C helper in a memory cgroup, running until stopped (sparse file: no disk I/O).
STREAM = ["--memory-limit", "64M", "--segment-seconds", "0.5", "--workload", "mmap-stream", "--", "--duration", "600"]
STREAM += ["--file-size", "128M", "--sparse"]


def _record_stream(out: Path, tmp_path: Path, start_new_session: bool = False) -> subprocess.Popen[bytes]:
    """`record` of a long mmap-stream workload (data files in ``tmp_path``) into ``out``."""
    return subprocess.Popen(
        [*RECORD, "-o", str(out), *STREAM, "--dir", str(tmp_path)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=start_new_session,
    )


def _last_word(err: str) -> str:
    """The recorder's last line, checked to be the last of stderr: the workload's own progress lines share it, the
    recorder's other lines (those it prefixes) may only be warnings (e.g. counted losses), and no process may
    print a traceback."""
    lines = [x for x in err.splitlines() if x.startswith("lufreplay: ")]
    assert "Traceback" not in err and all(x.startswith("lufreplay: warning: ") for x in lines[:-1]), err
    assert lines and err.splitlines()[-1] == lines[-1], err
    return lines[-1]


def _members(cg: Path) -> list[int]:
    f = cg / "cgroup.procs"
    return [int(x) for x in f.read_text().split()] if f.exists() else []


def test_ctrl_c_to_the_process_group_stops_and_finalises(tmp_path: Path) -> None:
    """kill -INT -PGID, as a terminal's Ctrl-C: the Python workload and its helpers stop without a traceback, the
    recorder finalises every segment and says so in one line, and nothing is left behind."""
    out = tmp_path / "t"
    rec = _record_stream(out, tmp_path, start_new_session=True)  # its own process group, as a shell job
    cg = _memroot() / f"lufreplay-rec-{rec.pid}"
    members: list[int] = []
    try:
        _wait_for(lambda: len(_members(cg)) >= 2, 600, "the workload's helper to start")
        members = _members(cg)
        _wait_for(lambda: (out / schema.COMMIT_DIR / schema.commit_name(2)).exists(), 600, "3 committed segments")
    finally:
        os.killpg(rec.pid, signal.SIGINT)
        _, err_b = rec.communicate(timeout=600)
    err = err_b.decode()
    assert rec.returncode == 0, err
    assert _last_word(err).startswith("lufreplay: interrupted: the command was stopped; recorded "), err
    _leftovers(out, rec.pid)
    for pid in members:
        _wait_for(lambda pid=pid: not _alive(pid), 30, f"workload process {pid} to die")
    tr = open_trace(out)
    assert tr.complete and tr.remains == [] and tr.n_segments >= 3
    assert tr.meta["stop_reason"] == "interrupted" and tr.meta["events"] > 0
    assert tr.interruption_line() is None


def test_disk_full_stops_cleanly_and_keeps_committed_segments(tmp_path: Path) -> None:
    """A trace directory on a 2 MiB tmpfs that fills up: the command is stopped, one line says why, every
    committed segment stays, no partial file is left, and info and simulate read the result as interrupted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / "t"
        rec = _record_stream(out, tmp_path)
        _, err_b = rec.communicate(timeout=900)
        err = err_b.decode()
        assert rec.returncode == 1, err
        assert _last_word(err).startswith("lufreplay: error: "), err
        assert "no space left on device; recording stopped" in err
        committed = len(list((out / schema.COMMIT_DIR).glob(schema.COMMIT_GLOB)))
        assert committed >= 1 and f"{committed} committed segment(s) kept" in err
        _leftovers(out, rec.pid)
        # No partial file: every file is meta.json, a manifest or a table file a manifest names.
        tr = open_trace(out)
        named = {m_["tables"][t]["file"] for m_ in tr.manifests for t in m_["tables"]}
        files = {str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()}
        manifests = {f"{schema.COMMIT_DIR}/{schema.commit_name(i)}" for i in range(committed)}
        assert files - named - manifests <= {schema.META_FILE}, files - named - manifests
        assert tr.remains == [] and tr.n_segments == committed and not tr.complete
        for cmd in (["info", str(out)], ["simulate", str(out)]):
            s = subprocess.run(
                [sys.executable, "-m", "lufreplay", *cmd], env=ENV, capture_output=True, text=True, timeout=900
            )
            assert s.returncode == 0, s.stderr
            head = " ".join(" ".join(s.stdout.splitlines()[:6]).split())
            assert (
                "recording interrupted (no space left on device)" in head
                and f"{committed} whole segment(s) kept" in head
            ), s.stdout
        info = subprocess.run(
            [sys.executable, "-m", "lufreplay", "info", str(out), "--json"], env=ENV, capture_output=True, text=True
        )
        losses = loads_strict(info.stdout)["losses"]
        assert losses["complete"] is False and losses["total"] is None
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
