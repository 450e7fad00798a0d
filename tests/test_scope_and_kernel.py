"""Issue 7 items 3 and 7: ``mm_cpumask`` follows the recorded kernel unless set, and ``simulate`` splits what the
traced command's mms caused from the rest of the host (``--scope``).

Hand-made 4-CPU traces: process A (the target, mm 0xA0) on CPUs 0-2, process B (not traced as target, mm 0xB0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from scenarios import Scenario
from typer.testing import CliRunner

from lufreplay.cli import app
from lufreplay.model.options import OptionError
from lufreplay.replay.cpustate import mask_mode_for_kernel
from lufreplay.report.simulate_cmd import simulate

MM_A, MM_B, MM_CHILD = 0xA0, 0xB0, 0xC0
A = [(100 + k, 100) for k in range(4)]
B = [(200 + k, 200) for k in range(4)]
CHILD = (150, 150)  # forked by A: part of the target


def user_on(s: Scenario, ts: int, cpu: int, task: tuple[int, int], mm_id: int, prev: tuple[int, int] = (0, 0)) -> None:
    s.mm(ts, cpu, *task, mm_id)
    s.sched(ts + 1, cpu, *prev, task[0])


def batch(s: Scenario, ts: int, sender: tuple[int, int], pfn: int, mm_ids: list[int], targets: list[int]) -> None:
    """``sender`` on CPU0 reclaims folio ``pfn`` (one PTE per mm) and sends the batched flush to ``targets``."""
    s.reclaim(ts, 0, *sender, 2)
    s.reclaim_folio(ts + 10, 0, *sender, pfn, mm_ids, index=pfn)
    s.batch_flush(ts + 100, 0, *sender, targets)
    s.free(ts + 200, 0, *sender, pfn)
    s.reclaim(ts + 300, 0, *sender, 3)


def write(s: Scenario, tmp: Path, kernel: str, target: bool = True) -> Path:
    meta: dict[str, Any] = {"kernel": kernel}
    if target:
        meta["target"] = {"mode": "command", "pids": [A[0][1]]}
    return s.write(tmp / f"t{len(list(tmp.iterdir()))}", meta)


# ---- mm_cpumask from the kernel -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("release", "mode"),
    [
        ("6.12.118+deb12-amd64", "switch"),
        ("5.15.0-91-generic", "switch"),
        ("6.13.0", "kept"),
        ("6.18.44-fc-v782", "kept"),
        ("7.0-rc1", "kept"),
    ],
)
def test_mask_mode_follows_the_release(release: str, mode: str) -> None:
    assert mask_mode_for_kernel(release, "kept")[0] == mode


@pytest.mark.parametrize("release", [None, "", "test", "linux"])
def test_an_unknown_release_keeps_the_default(release: str | None) -> None:
    got, why = mask_mode_for_kernel(release, "window")
    assert got == "window" and "unknown" in why


def left_the_mm(s: Scenario) -> None:
    """CPU3 ran A, then switched to B; A's batch reaches CPU1 and (on a kernel that keeps the bit) CPU3."""
    for c in range(4):
        user_on(s, 1000 + 10 * c, c, A[c], MM_A)
    user_on(s, 5000, 3, B[0], MM_B, prev=A[3])


def test_a_612_trace_replays_with_switch_unless_set(tmp_path: Path) -> None:
    s = Scenario(4)
    left_the_mm(s)
    batch(s, 10_000, A[0], 1000, [MM_A], [1, 2])  # 6.12 cleared CPU3's bit at the switch
    p = write(s, tmp_path, "6.12.118+deb12-amd64")
    doc = simulate(p, ["vanilla"]).doc
    assert doc["options"]["mm_cpumask"] == "switch"
    assert doc["options_auto"]["mm_cpumask"]["value"] == "switch"
    assert doc["models"]["vanilla"]["per_cpu"] == [0, 1, 1, 0]
    assert doc["fidelity"]["rebuilt_vs_recorded_pct"] == 0.0
    forced = simulate(p, ["vanilla"], ["mm_cpumask=kept"]).doc  # the user's choice wins, and is not "auto"
    assert forced["options"]["mm_cpumask"] == "kept" and "mm_cpumask" not in forced["options_auto"]
    assert forced["models"]["vanilla"]["per_cpu"] == [0, 1, 1, 1]
    assert forced["fidelity"]["rebuilt_vs_recorded_pct"] == 50.0


def test_a_newer_trace_keeps_the_bit(tmp_path: Path) -> None:
    s = Scenario(4)
    left_the_mm(s)
    batch(s, 10_000, A[0], 1000, [MM_A], [1, 2, 3])
    doc = simulate(write(s, tmp_path, "6.18.44-fc-v782"), ["vanilla"]).doc
    assert doc["options_auto"]["mm_cpumask"]["value"] == "kept"
    assert doc["models"]["vanilla"]["per_cpu"] == [0, 1, 1, 1]


def test_the_text_output_says_what_was_chosen(tmp_path: Path) -> None:
    s = Scenario(4)
    left_the_mm(s)
    batch(s, 10_000, A[0], 1000, [MM_A], [1, 2])
    r = CliRunner().invoke(
        app, ["simulate", str(write(s, tmp_path, "6.12.5")), "-m", "vanilla"], env={"COLUMNS": "200"}
    )
    assert r.exit_code == 0, r.output
    assert "mm_cpumask=switch chosen from the trace: kernel 6.12.5 ≤ 6.12" in r.output
    assert "Scope: host shown" in r.output


# ---- scope ------------------------------------------------------------------------------------------------------
def two_processes(s: Scenario) -> None:
    """A (target) on CPUs 0-2 plus a child it forked on CPU1 later; B on CPU3. Four batches:

    1. A reclaims its own folio: A's mm on CPUs 1, 2 → target, 2 IPIs;
    2. A reclaims B's folio (B on CPU3) → rest of the host, 1 IPI;
    3. A reclaims a folio mapped by A and B → recorded 3 IPIs (CPUs 1-3) for the target, which alone needs 1, 2;
    4. B's own flush of its mm (B is not traced: ``untraced``) → rest of the host, 1 IPI;
    5. the child (forked by A) reclaims its own folio on CPU1... sent from CPU0 to CPU1 → target, 1 IPI.
    """
    for c in range(3):
        user_on(s, 1000 + 10 * c, c, A[c], MM_A)
    user_on(s, 1100, 3, B[0], MM_B)
    batch(s, 10_000, A[0], 1000, [MM_A], [1, 2])
    batch(s, 20_000, A[0], 1001, [MM_B], [3])
    batch(s, 30_000, A[0], 1002, [MM_A, MM_B], [1, 2, 3])
    s.tlb(40_000, 3, *B[0], 4)
    s.sd(40_001, 3, *B[0], 2)
    s.tlb(40_002, 3, *B[0], 0)
    s._task("proc", 50_000, 0, *A[0], event=0, child_pid=CHILD[0], child_tgid=CHILD[1], comm="a")
    user_on(s, 50_100, 1, CHILD, MM_CHILD, prev=A[1])
    batch(s, 60_000, A[0], 1003, [MM_CHILD], [1])


def test_scope_splits_the_target_from_the_rest_of_the_host(tmp_path: Path) -> None:
    s = Scenario(4)
    two_processes(s)
    p = write(s, tmp_path, "6.18.1")
    doc = simulate(p).doc
    sc = doc["scope"]
    assert sc["shown"] == "host" and sc["target_processes"] == [100, 150]
    assert sc["host"]["recorded"] == doc["vanilla"]["remote_shootdowns"] == 2 + 1 + 3 + 1 + 1
    assert sc["target"]["recorded"] == 2 + 3 + 1  # batches 1, 3, 5
    assert sc["rest_of_host"]["recorded"] == 1 + 1  # batch 2 and B's own flush
    tv = sc["target"]["models"]["vanilla"]
    assert tv["remote_shootdowns"] == 2 + 2 + 1  # batch 3 rebuilt from A's PTE alone
    assert tv["by_cause"] == {"batch": 5}
    # the target's rebuild: every recorded target explained, 1 of 6 recorded IPIs (batch 3's CPU3, B's) not rebuilt
    assert sc["target"]["fidelity"]["recall_pct"] == round(100 * 5 / 6, 3)
    assert sc["target"]["fidelity"]["precision_pct"] == 100.0
    assert sc["host"]["models"]["vanilla"]["remote_shootdowns"] == 8
    assert sc["rest_of_host"]["models"]["vanilla"]["remote_shootdowns"] == 3
    for name, m in sc["host"]["models"].items():  # the other process's own flush is outside the target, everywhere
        assert m["by_cause"].get("untraced", 0) == 1 and "other" not in m["by_cause"], name
        assert sc["target"]["models"][name]["by_cause"].get("untraced", 0) == 0, name
    # eligibility per scope: B's folio (batch 2) is not the target's; folio 1002 (A and B) is
    host_el, tgt_el = doc["eligibility"], sc["target"]["eligibility"]
    assert host_el["folios"] == 4 and tgt_el["folios"] == 3, (host_el, tgt_el)
    assert tgt_el["pages"] == 3 and tgt_el["batches"] == 3 and host_el["batches"] == 4
    for reason, n in tgt_el["rejected"].items():
        assert n <= host_el["rejected"][reason], reason
    # --scope target: the headline tables are the target's; fidelity stays the host's
    t = simulate(p, scope="target").doc
    assert t["eligibility"] == tgt_el
    assert t["scope"]["shown"] == "target"
    assert t["vanilla"]["remote_shootdowns"] == 6 and t["models"]["vanilla"]["remote_shootdowns"] == 5
    assert t["fidelity"] == doc["fidelity"]
    for name in t["models"]:
        assert sum(t["models"][name]["by_cause"].values()) == t["models"][name]["remote_shootdowns"]


def test_a_system_wide_trace_has_no_target_scope(tmp_path: Path) -> None:
    s = Scenario(4)
    two_processes(s)
    p = write(s, tmp_path, "6.18.1", target=False)
    sc = simulate(p, ["vanilla"]).doc["scope"]
    assert sc["shown"] == "host" and sc["target"] is None and "system-wide" in sc["why"]
    with pytest.raises(OptionError, match="no target"):
        simulate(p, ["vanilla"], scope="target")
    r = CliRunner().invoke(app, ["simulate", str(p), "--scope", "target"])
    assert r.exit_code == 2 and "no target" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["simulate", str(p), "--scope", "mine"])
    assert r.exit_code == 2 and "--scope 'mine'" in r.output


def test_scope_in_strict_json(tmp_path: Path) -> None:
    s = Scenario(4)
    two_processes(s)
    r = CliRunner().invoke(app, ["simulate", str(write(s, tmp_path, "6.18.1")), "--json", "--scope", "target"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert doc["scope"]["shown"] == "target" and doc["scope"]["target"]["recorded"] == 6


def test_scope_on_a_bundled_trace() -> None:
    """compact: the target's recorded IPIs are those of its own flushes and of batches of its mms, the rest are
    other processes' (their own flushes, 167 of 301, are `untraced`: issue 7). Scoping changes nothing of the host
    replay."""
    root = Path(__file__).resolve().parents[1] / "traces" / "compact"
    host_only = simulate(root, ["vanilla", "luf-v12"]).doc
    sc = host_only["scope"]
    assert sc["host"]["recorded"] == 301
    assert 0 < sc["target"]["recorded"] < sc["host"]["recorded"]
    assert sc["target"]["recorded"] + sc["rest_of_host"]["recorded"] == sc["host"]["recorded"]
    # the target's recorded flushes are no more than what its processes sent plus what batches of its mms cost
    assert (
        sc["target"]["models"]["vanilla"]["remote_shootdowns"] <= sc["host"]["models"]["vanilla"]["remote_shootdowns"]
    )
    tv = sc["target"]["models"]["vanilla"]["by_cause"]
    hv = sc["host"]["models"]["vanilla"]["by_cause"]
    # none of the flushes of processes the trace does not follow is the target's; what stays `other` is
    assert tv.get("untraced", 0) == 0 < hv["untraced"]
    assert tv.get("other", 0) == hv["other"]


# ---- the lazy set of a batched flush is read when its IPIs go out --------------------------------------------
def test_a_cpu_going_lazy_after_the_send_was_still_flushed(tmp_path: Path) -> None:
    """A reclaimer on CPU0 (not in mm A's cpumask: no local flush row closes its flush) unmaps A's folio, A on
    CPUs 1-3; reason 4 and the IPIs to 1-3; then CPU3 idles, and only later the reclaimer's next row (its free)
    ends the recorded flush. should_flush_tlb ran at the send: CPU3 was not lazy then."""
    kswapd = (60, 60)
    s = Scenario(4)
    s.sched(100, 0, *kswapd, 0, prev_kthread=True)  # the reclaimer is a kernel thread
    for c in (1, 2, 3):
        user_on(s, 1000 + 10 * c, c, A[c], MM_A)
    s.sched(2000, 0, 0, 0, kswapd[0])
    s.reclaim(10_000, 0, *kswapd, 2)
    s.reclaim_folio(10_010, 0, *kswapd, 1000, [MM_A])
    s.tlb(10_100, 0, *kswapd, 4)
    for k, t in enumerate((1, 2, 3)):
        s.sd(10_101 + k, 0, *kswapd, t)
    s.sched(10_500, 3, *A[3], 0)  # CPU3 idles after the IPIs went out
    s.free(50_000, 0, *kswapd, 1000)
    s.reclaim(50_100, 0, *kswapd, 3)
    doc = simulate(write(s, tmp_path, "6.12.1"), ["vanilla"]).doc
    assert doc["models"]["vanilla"]["per_cpu"] == [0, 1, 1, 1]
    assert doc["fidelity"]["recall_pct"] == 100.0 and doc["fidelity"]["precision_pct"] == 100.0


def test_list_options_says_mm_cpumask_comes_from_the_trace() -> None:
    r = CliRunner().invoke(app, ["simulate", "--list-options", "--json"])
    assert r.exit_code == 0
    rows = {o["name"]: o for o in json.loads(r.stdout)}
    assert rows["mm_cpumask"]["auto"].startswith("from the trace's kernel: switch up to 6.12")
    assert "auto" not in rows["clip_to_recorded"]
