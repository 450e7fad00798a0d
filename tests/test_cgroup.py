"""parse_size, and real memory cgroups (create, limit, add, teardown) as root."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from lufreplay.capture import cgroup
from lufreplay.capture.cgroup import CgroupError, MemoryCgroup, cgroup_pids, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [("1G", 1 << 30), ("512M", 512 << 20), ("64k", 64 << 10), ("4096", 4096), ("1.5GiB", 3 << 29), ("2gb", 2 << 30)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1X", "-1G", "0", "1ib", "G", "1 G B"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def _name() -> str:
    return f"lufreplay-test-{uuid.uuid4().hex[:8]}"


@pytest.mark.bpf
def test_memory_cgroup_lifecycle() -> None:
    version, root = cgroup.memory_hierarchy() or (None, None)
    assert version in (1, 2) and root is not None
    name = _name()
    with MemoryCgroup.create(parse_size("64M"), name=name) as cg:
        assert cg.path == root / name and cg.path.is_dir()
        assert cg.version == version
        assert cg.limit == 64 << 20
        p = subprocess.Popen(["sleep", "30"])
        cg.add(p.pid)
        assert cg.pids() == [p.pid]
        assert cgroup_pids(cg.path) == [p.pid]
        assert cgroup_pids(Path("/" + name)) == [p.pid]  # relative to the memory hierarchy
        assert f"/{name}" in Path(f"/proc/{p.pid}/cgroup").read_text()
        with pytest.raises(CgroupError, match="no such process"):
            cg.add(2**22 + 1)
    # close() ran with the task still inside: it went back to the parent and the cgroup is gone.
    assert not (root / name).exists()
    assert f"/{name}" not in Path(f"/proc/{p.pid}/cgroup").read_text()
    p.kill()
    p.wait()
    cg.close()  # idempotent


@pytest.mark.bpf
def test_memory_limit_is_enforced() -> None:
    """A process allocating beyond the limit is reclaimed/killed inside the cgroup, not outside it."""
    with MemoryCgroup.create(parse_size("32M"), name=_name()) as cg:
        p = subprocess.Popen(
            ["python3", "-c", "import sys; sys.stdin.read(); b = bytearray(128 << 20); print('survived')"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        cg.add(p.pid)
        out, _ = p.communicate("go\n", timeout=60)
        # No swap here: 128 MiB of anon memory cannot fit in 32 MiB, so the memcg OOM killer fires.
        assert p.returncode != 0 and "survived" not in out
        assert cg.limit == 32 << 20
        assert cg.usage() <= 32 << 20


@pytest.mark.bpf
def test_create_refuses_existing_and_bad_names() -> None:
    name = _name()
    with MemoryCgroup.create(1 << 26, name=name), pytest.raises(CgroupError, match="already exists"):
        MemoryCgroup.create(1 << 26, name=name)
    with pytest.raises(CgroupError, match="invalid cgroup name"):
        MemoryCgroup.create(1 << 26, name="a/b")
    with pytest.raises(CgroupError, match="positive"):
        MemoryCgroup.create(0)


def test_cgroup_pids_errors(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="not a cgroup"):
        cgroup_pids(tmp_path)
    with pytest.raises(CgroupError, match="no such cgroup"):
        cgroup_pids(tmp_path / "missing")


def test_cgroup_pids_v1_tasks_fallback(tmp_path: Path) -> None:
    """A v1 directory with only `tasks` (thread ids) yields process ids."""
    ev = threading.Event()
    t = threading.Thread(target=ev.wait)
    t.start()
    try:
        (tmp_path / "tasks").write_text(f"{os.getpid()}\n{t.native_id}\n")
        assert cgroup_pids(tmp_path) == [os.getpid()]
    finally:
        ev.set()
        t.join()
