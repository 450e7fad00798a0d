"""Every built-in workload recorded for real under `lufreplay record`, and simulated: the results differ
the way docs/workloads.md says they should (issue #4, "Done when").

Each workload is recorded once per session (short runs, small files) and simulated once; the tests
compare the documented qualitative claims with margins, never exact figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lufreplay import open_trace

pytestmark = pytest.mark.bpf

#: workload -> (memory limit for `record --memory-limit`, or None; the workload's own arguments).
#: Reclaim workloads get a limit of a quarter of their file, so most of every pass is reclaimed.
RUNS: dict[str, tuple[str | None, list[str]]] = {
    "mmap-stream": ("96M", ["--file-size", "384M", "--duration", "3"]),
    "anon-churn": ("160M", ["--file-size", "384M", "--anon-size", "48M", "--duration", "3"]),
    "mixed-file": ("96M", ["--file-size", "384M", "--threads", "2", "--write-rate", "1000", "--duration", "3"]),
    "cow-fork": (None, ["--size", "64M", "--fragment", "128M", "--duration", "3"]),
    "compact": (None, ["--region-size", "16M", "--fragment", "256M", "--duration", "3", "--list-pfns"]),
}


@dataclass
class Recorded:
    """One recorded workload: its trace directory, the workload's JSON summary and `simulate --json`."""

    name: str
    trace: Path
    workload: dict[str, Any]
    sim: dict[str, Any]

    def model(self, name: str) -> dict[str, Any]:
        return self.sim["models"][name]

    def eligible_share(self) -> float:
        """Eligible share of the pages the workload's own unmaps touched (``--scope target``)."""
        e = self.sim["eligibility"]
        return e["eligible_pages"] / max(e["pages"], 1)


#: Hang guard for one record or simulate run, never a speed check (a loaded 2-vCPU host compiles slowly).
HANG_S = 900

#: Whether compact_memory moves a given region depends on the zone's state at that moment (docs/workloads.md):
#: the migration workloads are re-recorded, at most this many times, until it moved some of their pages.
MIGRATION_ATTEMPTS = 3


def _moved_pages(name: str, wl: dict[str, Any]) -> int | None:
    """Pages of the workload's own regions that compaction moved (None: not a migration workload)."""
    if name == "cow-fork":
        return wl["migrated_pages"] or 0
    if name == "compact":
        return sum(g["migrated_pages"] or 0 for g in wl["regions"])
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lufreplay", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Recorded]]:
    """Records (then simulates) a workload the first time a test asks for it."""
    # data files on a disk file system (page cache, not tmpfs); removed at the end of the session
    data = Path("/var/tmp") / f"lufreplay-test-wtraces-{os.getpid()}"
    out = tmp_path_factory.mktemp("wtraces")
    cache: dict[str, Recorded] = {}

    def get(name: str) -> Recorded:
        if name not in cache:
            limit, args = RUNS[name]
            t = out / name
            cmd = ["record", "-o", str(t), "--force", *(["--memory-limit", limit] if limit else []), "--workload", name]
            for _ in range(MIGRATION_ATTEMPTS):
                r = _run([*cmd, "--", "--dir", str(data), "--json", *args], timeout=HANG_S)
                assert r.returncode == 0, r.stderr
                wl = json.loads(r.stdout.strip().splitlines()[-1])
                assert wl["workload"] == name
                if _moved_pages(name, wl) != 0:
                    break
            # the workload's own scope: on a busy host other jobs reclaim too, and their folios are not the workload's
            s = _run(["simulate", str(t), "--json", "--scope", "target"], timeout=HANG_S)
            assert s.returncode == 0, s.stderr
            cache[name] = Recorded(name, t, wl, json.loads(s.stdout))
        return cache[name]

    yield get
    shutil.rmtree(data, ignore_errors=True)


def _no_violation(rec: Recorded) -> None:
    for m, v in rec.sim["models"].items():
        assert v["safety"]["violations"] == 0, (rec.name, m)


def _hook_flushes(rec: Recorded, model: str) -> int:
    """Remote shootdowns a model paid at the file-write hooks: write_begin (F4) and write faults (F3)."""
    by = rec.model(model)["by_cause"]
    return int(by.get("write_begin", 0) + by.get("fault", 0))


def _region_rows(rec: Recorded, pid: int, start: int, end: int) -> Any:
    """set_pte migration rows inside [start, end) once the region has its final permissions: from the first
    maps snapshot where the VMA holding ``start`` has the perms it keeps to the end (an mprotect'ed region's
    pages moved while it was still writable, e.g. by kcompactd on a busy host, carry WRITE entries)."""
    t = open_trace(rec.trace)
    maps = t.pandas("maps")
    own = maps[(maps["tgid"] == pid) & (maps["start"] <= start) & (maps["end"] > start)].sort_values("ts_ns")
    born = maps.loc[maps["tgid"] == pid, "ts_ns"].min()
    if len(own):
        final = own["perms"].iloc[-1]
        changed = own[own["perms"] != final]
        later = own[own["ts_ns"] > changed["ts_ns"].max()] if len(changed) else own
        born = max(born, later["ts_ns"].min())
    mig = t.pandas("migrate")
    rows = mig[(mig["event_name"] == "set_pte") & (mig["addr"] >= start) & (mig["addr"] < end)]
    return rows[rows["ts_ns"] >= born]


# ---- mmap-stream: the talk's case ------------------------------------------------------------------


def test_mmap_stream_defaults_make_most_shootdowns_avoidable(recorded) -> None:
    rec = recorded("mmap-stream")
    t = open_trace(rec.trace, validate=True)
    assert t.meta["complete"] is True and t.meta["workload"]["exit_status"] == 0
    # the defaults are the talk's case: order-0 page cache (MADV_RANDOM) of a file larger than the limit
    assert rec.workload["advice"] == "random"
    assert rec.workload["file_size"] > t.meta["target"]["memory_limit"]
    van = rec.sim["vanilla"]
    assert van["remote_shootdowns"] > 500, van  # reclaim really shot down remote TLBs
    # remote shootdowns come from reclaim's batched flush, and almost every unmapped folio is eligible
    assert van["by_cause"].get("batch", 0) >= 0.8 * van["remote_shootdowns"], van
    assert rec.eligible_share() >= 0.9, rec.sim["eligibility"]
    assert rec.sim["eligibility"]["rejected_pages"].get("large_folio", 0) <= 0.05 * rec.sim["eligibility"]["pages"]
    # "most batched reclaim shootdowns become avoidable": luf-v12 defers the reclaim batches themselves (what stays
    # in batch_nonluf is the rare writable/kept folio), and the bound on what any lazy scheme can save is high.
    # How much of the deferred work is paid back later depends on the host, not the workload: on an idle host the
    # readers' CPUs switch back from idle all the time (F10, as intended) and freed pages are reused within
    # milliseconds (alloc_pcp); luf-v12's net avoided % was 25.8 on an idle CI box and 89 on a busy one.
    v12 = rec.model("luf-v12")
    assert v12["by_cause"].get("batch_nonluf", 0) <= 0.05 * van["remote_shootdowns"], v12["by_cause"]
    assert v12["deferred"]["deferred_cpu_slots"] > 0.5 * van["remote_shootdowns"], v12["deferred"]
    assert v12["avoided_pct"] > 0, v12["by_cause"]
    assert rec.model("oracle")["avoided_pct"] >= 50
    # the rebuild against the workload's own recorded flushes (host-wide, other jobs' flushes of unknown cause count)
    assert rec.sim["scope"]["target"]["fidelity"]["recall_pct"] >= 90, rec.sim["scope"]["target"]["fidelity"]
    _no_violation(rec)


# ---- anon-churn: writable memory, little to save ------------------------------------------------------


def test_anon_churn_saves_little(recorded) -> None:
    churn = recorded("anon-churn")
    stream = recorded("mmap-stream")
    assert churn.workload["file_pages_written"] > 0 and churn.workload["anon_maps"] > 0
    assert churn.sim["vanilla"]["remote_shootdowns"] > 100  # pressure and reclaim happened
    e = churn.sim["eligibility"]
    # reclaim takes the written shared file pages: writable PTEs, not eligible
    assert e["rejected_pages"].get("writable_pte", 0) > 0, e
    assert churn.eligible_share() <= 0.15, e
    v12 = churn.model("luf-v12")["avoided_pct"]
    assert v12 <= 15, churn.model("luf-v12")["by_cause"]
    # and far less than the read-only stream could (the bound: the host's reuse pattern cancels out)
    assert stream.model("oracle")["avoided_pct"] - churn.model("oracle")["avoided_pct"] >= 35
    _no_violation(churn)


# ---- mixed-file: Dave Hansen's case, flushes at the write hooks --------------------------------------


def test_mixed_file_pays_at_write_hooks_and_stays_safe(recorded) -> None:
    rec = recorded("mixed-file")
    wl = rec.workload
    assert wl["pwrites"] > 0 and wl["mmap_writes"] > 0 and wl["reader_pages"] > 0
    # the readers' unmaps are read-only and eligible, and luf-v12 really deferred their flushes
    assert rec.sim["eligibility"]["eligible_pages"] > 0
    assert rec.model("luf-v12")["deferred"]["deferred_cpu_slots"] > 0, rec.model("luf-v12")["deferred"]
    # No sign is asserted for the net saving: whether a deferred flush is saved or paid at the next
    # allocation or write depends on how soon the pages are reused, i.e. on the host (-4.6 % on an idle
    # host, +43 % beside a kernel build): the claim here is where the deferred flushes are paid.
    for m in ("luf-v12-intended", "oracle"):
        hooks = rec.model(m)["hooks"]
        assert hooks["write_begin"]["calls"] > 0 and hooks["fault"]["calls"] > 0
        # some deferred flushes are paid at the writes: write_begin (F4) or the shared write fault (F3)
        assert _hook_flushes(rec, m) > 0, rec.model(m)["by_cause"]
    # as posted (§9.1) the same hooks run and send nothing: the stale entries wait for the pages' reuse
    assert rec.model("luf-v12")["hooks"]["write_begin"]["calls"] > 0
    assert _hook_flushes(rec, "luf-v12") == 0, rec.model("luf-v12")["by_cause"]
    # the writes never hand out a page a CPU may still translate: the safety invariant holds
    _no_violation(rec)


# ---- cow-fork / compact: migration with known PTE permissions ---------------------------------------


def test_cow_fork_migrates_read_only_cow_pages(recorded) -> None:
    rec = recorded("cow-fork")
    wl = rec.workload
    assert wl["compacted"] is True
    assert wl["migrated_pages"] is not None and wl["migrated_pages"] > 0, (
        "compaction moved none of the region (zone state: see docs/workloads.md cow-fork)"
    )
    region = wl["mappings"][0]
    rows = _region_rows(rec, wl["pids"][0], region["start"], region["end"])
    assert len(rows) > 0
    # COW-shared after fork: every migration entry is read-only (READ, not exclusive)
    assert (rows["mig_type_name"] == "read").mean() >= 0.95, rows["mig_type_name"].value_counts()
    assert not rows["writable"].any()
    e = rec.sim["eligibility"]
    assert e["pte_provenance"]["exact"] > 0
    # compact_memory's first pass (migrate_pages_sync -> migrate_pages_batch in MIGRATE_ASYNC) batches
    # its flush: the read-only COW folios it moves are LUF-eligible
    assert e["eligible"] > 0, f"no eligible migrated folio: {e['rejected']}"
    _no_violation(rec)


def test_compact_migration_types_match_regions_and_eligibility(recorded) -> None:
    rec = recorded("compact")
    wl = rec.workload
    assert wl["compacted"] is True
    moved = {g["name"]: g["migrated_pages"] for g in wl["regions"]}
    assert sum(moved.values()) > 0, f"compaction moved nothing (zone state: see docs/workloads.md): {moved}"
    seen = 0
    for g in wl["regions"]:
        rows = _region_rows(rec, wl["pid"], g["start"], g["end"])
        # the region's own pages (their pfns before compaction), not whatever shares its addresses: migrate rows
        # carry no mm, and on a busy host other processes' pages moved at the same addresses too
        rows = rows[rows["pfn"].isin(g["pfns_before"])]
        if g["migrated_pages"] == 0:
            continue
        assert len(rows) > 0, g["name"]
        seen += 1
        share = (rows["mig_type_name"] == g["expected_mig_type"]).mean()
        # a dirty shared page cleaned by writeback meanwhile is read-only again: allow a few
        assert share >= 0.8, (g["name"], rows["mig_type_name"].value_counts().to_dict())
        if g["expected_mig_type"] == "write":
            assert rows["writable"].mean() >= 0.8, g["name"]
        else:
            assert not rows["writable"].any(), g["name"]
    assert seen >= 5  # most regions had pages moved and traced
    e = rec.sim["eligibility"]
    # writable regions (anon_rw, file_rw_dirty) are rejected for their PTEs; the five read-only ones
    # are eligible when moved by the batched first pass
    assert e["rejected_pages"].get("writable_pte", 0) > 0, e
    assert e["eligible_pages"] > 0, f"no eligible migrated folio: {e['rejected']}"
    # No ratio between the two: compaction also moves other processes' pages (system-wide rows), so the
    # split depends on the host's state, not on the workload.
    _no_violation(rec)
