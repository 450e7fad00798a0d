"""The built-in workloads run, report their own throughput as JSON, and clean up after themselves."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lufreplay.workloads import WORKLOADS, common

PAGE = 4096


def run(name: str, *args: str, workdir: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lufreplay", "workload", name, "--dir", str(workdir), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def run_json(name: str, *args: str, workdir: Path) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    r = run(name, *args, "--json", workdir=workdir)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # stdout is exactly one JSON line; progress goes to stderr
    doc = json.loads(lines[0])
    assert doc["workload"] == name
    return doc, r


def check_common(doc: dict[str, Any], duration: float) -> None:
    assert doc["pages_touched"] > 0
    assert duration * 0.9 <= doc["runtime_s"] < duration + 30
    assert doc["pages_per_s"] == pytest.approx(doc["pages_touched"] / doc["runtime_s"], rel=1e-3)
    assert doc["bytes_touched"] == doc["pages_touched"] * PAGE
    for pid in doc["pids"]:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie_free(pid), f"helper {pid} still running"


def _is_zombie_free(pid: int) -> bool:
    # a recycled pid is fine as long as it is not one of our helpers
    try:
        return "lrwork" not in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return True


def check_cgroup_gone(doc: dict[str, Any], limit: int) -> None:
    """The workload made a memory cgroup with the limit, and removed it."""
    memcg = doc["memcg"]
    assert memcg is not None and memcg["limit"] == limit
    assert Path(memcg["path"]).name.startswith(f"lufreplay-{doc['workload']}-")
    assert not Path(memcg["path"]).exists()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "work"


def test_every_workload_is_documented() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "workloads.md").read_text()
    for name in WORKLOADS:
        assert f"## `{name}`" in docs
        r = subprocess.run(
            [sys.executable, "-m", "lufreplay", "workload", name, "--help"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 0 and "What LUF should do" in r.stdout, r.stderr


def test_mmap_stream_sparse(workdir: Path) -> None:
    doc, r = run_json(
        "mmap-stream", "--file-size", "32M", "--sparse", "--duration", "1.5", "--processes", "2", "--threads", "1",
        workdir=workdir,
    )  # fmt: skip
    check_common(doc, 1.5)
    assert doc["processes"] == 2 and doc["threads"] == 2
    assert doc["bytes"] == 2 * (32 << 20) and doc["sparse"] is True and doc["memcg"] is None
    # every process streamed its own file; each pass touches every page once
    assert len(set(doc["files"])) == 2
    for f in doc["files"]:
        st = Path(f).stat()
        assert st.st_size == 32 << 20 and st.st_blocks == 0  # a hole: no disk blocks
    assert doc["pages_touched"] >= 2 * (32 << 20) // PAGE
    assert "[mmap-stream p0]" in r.stderr  # progress on stderr
    for m in doc["mappings"]:
        assert m["end"] - m["start"] == 32 << 20 and m["perms"] == "r--s"


def test_mmap_stream_reuses_real_file(workdir: Path) -> None:
    doc1, r1 = run_json("mmap-stream", "--file-size", "8M", "--duration", "0.5", workdir=workdir)
    assert "creating" in r1.stderr
    f = Path(doc1["files"][0])
    st = f.stat()
    assert st.st_size == 8 << 20 and st.st_blocks * 512 >= 8 << 20  # real data blocks
    doc2, r2 = run_json("mmap-stream", "--file-size", "8M", "--duration", "0.5", workdir=workdir)
    assert "creating" not in r2.stderr and doc2["files"] == doc1["files"]
    assert f.stat().st_mtime_ns == st.st_mtime_ns


def test_human_summary_without_json(workdir: Path) -> None:
    r = run("mmap-stream", "--file-size", "4M", "--sparse", "--duration", "0.5", workdir=workdir)
    assert r.stdout.startswith("mmap-stream: ") and "pages/s" in r.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.stdout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such-workload"], "unknown workload 'no-such-workload'"),
        (["mmap-stream", "--file-size", "lots"], "invalid size 'lots'"),
        (["mmap-stream", "--threads", "0"], "must be >= 1"),
        (["mmap-stream", "--bogus"], "unrecognized arguments: --bogus"),
        (["mmap-stream", "--file-size", "64P"], "not enough free space"),
        (["anon-churn", "--anon-size", "8M", "--chunk", "16M"], "--chunk"),
        (["anon-churn", "--anon-size", "64M", "--memory-limit", "64M"], "OOM"),
    ],
)
def test_bad_input_is_one_line_error(workdir: Path, args: list[str], message: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "lufreplay", "workload", args[0], "--dir", str(workdir), *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lufreplay: error: "), r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr


def test_helper_compiles_once(tmp_path: Path) -> None:
    a = common.helper_binary(tmp_path)
    b = common.helper_binary(tmp_path)
    assert a == b and os.access(a, os.X_OK)
    r = subprocess.run([str(a)], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "bad arguments" in r.stderr


def test_moved_pages() -> None:
    import numpy as np

    before = np.array([10, 11, -1, 13])
    after = np.array([10, 99, 50, -1])
    assert common.moved_pages(before, after) == 1
    assert common.moved_pages(None, after) is None


@pytest.mark.bpf
def test_mmap_stream_under_memory_limit_reclaims(workdir: Path) -> None:
    limit = 32 << 20
    doc, _ = run_json(
        "mmap-stream", "--file-size", "128M", "--sparse", "--memory-limit", "32M", "--duration", "2",
        workdir=workdir,
    )  # fmt: skip
    check_common(doc, 2)
    check_cgroup_gone(doc, limit)
    # streaming 128 MiB through 32 MiB means at least 96 MiB was reclaimed (uncharged) per pass
    assert doc["memcg"]["pgpgout"] * PAGE >= (128 << 20) - limit


@pytest.mark.bpf
def test_anon_churn(workdir: Path) -> None:
    limit = 48 << 20
    doc, _ = run_json(
        "anon-churn", "--file-size", "64M", "--anon-size", "8M", "--chunk", "2M", "--memory-limit", "48M",
        "--duration", "2", workdir=workdir,
    )  # fmt: skip
    check_common(doc, 2)
    check_cgroup_gone(doc, limit)
    assert doc["file_pages_written"] > 0 and doc["anon_pages_written"] >= 4 * (8 << 20) // PAGE
    assert doc["file_pages_written"] + doc["anon_pages_written"] == doc["pages_touched"]
    assert doc["anon_maps"] >= 4


@pytest.mark.bpf
def test_cow_fork_migrates_shared_pages(workdir: Path) -> None:
    doc, _ = run_json("cow-fork", "--size", "32M", "--children", "1", "--duration", "2.5", workdir=workdir)
    check_common(doc, 2.5)
    assert doc["processes"] == 2 and len(doc["pids"]) == 2
    assert doc["compacted"] and len(doc["compactions"]) == 2
    # both processes map the same COW range
    assert len({(m["start"], m["end"]) for m in doc["mappings"]}) == 1
    # how much compaction moves depends on the zone's state (other jobs, lazily initialised memory),
    # so only its bounds are certain; pagemap must have been readable as root
    assert doc["migrated_pages"] is not None and 0 <= doc["migrated_pages"] <= (32 << 20) // PAGE
    assert all(c["took_s"] >= 0 for c in doc["compactions"])


@pytest.mark.bpf
def test_mixed_file(workdir: Path) -> None:
    limit = 32 << 20
    doc, _ = run_json(
        "mixed-file", "--file-size", "64M", "--memory-limit", "32M", "--write-rate", "100", "--duration", "2",
        workdir=workdir,
    )  # fmt: skip
    check_common(doc, 2)
    check_cgroup_gone(doc, limit)
    assert doc["processes"] == 2
    # paced at 100/s for 2 s; writes into reclaimed pages may be slower, never faster
    assert 0 < doc["mmap_writes"] <= 300 and 0 < doc["pwrites"] <= 300
    perms = sorted(m["perms"] for m in doc["mappings"])
    assert perms == ["r--s", "rw-s"]
    assert doc["memcg"]["pgpgout"] * PAGE >= (64 << 20) - limit


@pytest.mark.bpf
def test_compact_regions(workdir: Path) -> None:
    doc, r = run_json("compact", "--region-size", "8M", "--fragment", "128M", "--duration", "2", workdir=workdir)
    check_common(doc, 2)
    regions = doc["regions"]
    names = [g["name"] for g in regions]
    assert names == [
        "anon_rw", "anon_ro_excl", "anon_cow", "file_ro", "file_rw_dirty", "file_rw_clean", "file_priv_ro",
    ]  # fmt: skip
    spans = sorted((g["start"], g["end"]) for g in regions)
    for (_, e0), (s1, _) in itertools.pairwise(spans):
        assert e0 <= s1  # disjoint
    for g in regions:
        assert g["end"] - g["start"] == 8 << 20 and g["pages"] == 2048
        assert g["expected_mig_type"] in {"read", "read_exclusive", "write"}
    expect = {g["name"]: (g["perms"], g["expected_mig_type"]) for g in regions}
    assert expect["anon_ro_excl"] == ("r--p", "read_exclusive")
    assert expect["file_rw_dirty"] == ("rw-s", "write")
    assert expect["file_rw_clean"] == ("rw-s", "read")
    assert doc["compacted"]
    assert all(0 <= g["migrated_pages"] <= g["pages"] for g in regions)  # the kernel decides how many
    assert doc["child_pid"] != doc["pid"] and "compaction 1/1" in r.stderr
