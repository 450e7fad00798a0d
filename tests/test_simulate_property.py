"""The numba fast path against the reference written from the specification, on random traces.

Compared on decisions (model/reference.py ``Decision``): for every event, the set of CPUs each flush went to
and the set of CPUs each batch deferred, in order, not on private counters. The reference runs with the §9
choices the options select (``hooks``, ``keep``, ``dirty_writeback``, each value drawn), and with the intended
ones against luf-v12-intended; the hand-worked scenarios (test_scenarios_4cpu.py) give the expected answers.
"""

from __future__ import annotations

import random
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scenarios import random_scenario

from lufreplay.model import ops as O
from lufreplay.model.options import parse_settings
from lufreplay.model.reference import INTENDED_CHOICES, ReferenceLufV12, fast_decisions
from lufreplay.replay.engine import replay
from lufreplay.report.simulate_cmd import simulate
from lufreplay.trace.reader import open_trace

SETTINGS = st.sampled_from(
    [
        [],
        ["unknown_rw=eligible", "credit_natural_flushes=true"],
        ["atomic_no_shootdown=false", "epoch_flush_latency_us=0"],
        ["clip_to_recorded=false", "unexplained_targets=defer", "pcp_strikes=1"],
        ["shared_writable_vma=readonly", "mm_cpumask=window"],
        ["non_luf_ok=false", "unknown_rw=eligible"],
    ]
)
# the §9 choices the fast path has as options (luf-model.md §9.1, §9.3, §9.4): each value, and all intended at once
SPEC = st.sampled_from(
    [
        [],
        ["keep=key_only"],
        ["dirty_writeback=last_key"],
        ["hooks=intended"],
        ["hooks=intended", "keep=key_only", "dirty_writeback=last_key"],
    ]
)
# the allocation policy and the large-folio exclusion change the most state: every combination is drawn
POLICY = st.tuples(st.sampled_from(["luf", "recorded"]), st.sampled_from(["reject", "eligible"]))

#: Recorded flushes every model passes through unchanged.
PASS_THROUGH = tuple(c for c in O.RECORDED_CAUSES if c != "batch")
DEFERRABLE = O.DEFERRABLE_CAUSES


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_steps=st.integers(5, 100),
    nr_cpus=st.integers(2, 6),
    sets=SETTINGS,
    policy=POLICY,
    kept=st.booleans(),
    dirty=st.booleans(),
    spec=SPEC,
)
def test_fast_path_decisions_match_reference(
    seed: int,
    n_steps: int,
    nr_cpus: int,
    sets: list[str],
    policy: tuple[str, str],
    kept: bool,
    dirty: bool,
    spec: list[str],
) -> None:
    s = random_scenario(random.Random(seed), n_steps, nr_cpus, kept=kept, dirty_flush=dirty)
    with tempfile.TemporaryDirectory() as d:
        path = s.write(Path(d) / "t")
        opts = parse_settings([*sets, *spec, f"alloc_order={policy[0]}", f"large_folios={policy[1]}"])
        res = replay(open_trace(path), ["luf-v12", "luf-v12-intended"], opts, keep_ops=True, decisions=True)
    ref = ReferenceLufV12(opts)  # the §9 choices from the options
    intended = ReferenceLufV12(opts, **INTENDED_CHOICES)
    for ops in res.ops:
        ref.run(ops)
        intended.run(ops)
    assert fast_decisions(res.models["luf-v12"].decisions_array()) == ref.decisions
    assert fast_decisions(res.models["luf-v12-intended"].decisions_array()) == intended.decisions
    assert ref.violations == []  # the reference's own shadow check agrees that the model is safe


def deferrable_flushes_per_cpu(dec: np.ndarray) -> Counter[int]:
    """For each CPU, how many flushes paying for deferred work reached it (an IPI, or the sender's own local
    flush): the CPU-flush slots of the DEFERRABLE causes."""
    n: Counter[int] = Counter()
    for d in fast_decisions(dec):
        if d.kind == "performed" and d.cause in DEFERRABLE:
            n.update(d.targets)
    return n


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    nr_cpus=st.integers(2, 6),
    sets=st.sampled_from(
        [[], ["alloc_order=recorded"], ["unknown_rw=eligible", "non_luf_ok=false"], ["large_folios=eligible"]]
    ),
)
def test_oracle_bounds_the_safe_models_per_cpu(seed: int, nr_cpus: int, sets: list[str]) -> None:
    """All models replay random traces without a safety violation (simulate raises one), pass the recorded
    flushes through unchanged, and on every CPU the oracle flushes no more often for deferred work than
    luf-v12-intended, luf-v11 or hold-before-free (counting the sender's own flushes too). The oracle bounds safe
    schemes: luf-v12 as posted skips the hooks' flushes, leaving stale entries the oracle pays for.

    Why it holds per CPU (docs/simulate.md, "The oracle"): a flush at time t retires every older debt of that
    CPU, the oracle pays each CPU only at its first due point (re-allocation by a context that can shoot down,
    F3 write, F4, F5, F7: all points where those models flush too) and takes for free what any scheme gets for
    free: the CPU's own flush where it runs a LUF point, a CPU lazy at a flush (or skipped by a batch's recorded
    flush), full flushes the kernel did anyway. Before those credits it failed here: luf-v12 paying early from
    the CPU holding the stale entry (F6/F10), an atomic allocation of a pending page (luf-v12 serves a clean page),
    a buddy takeoff of a pfn still queued on a pcp list, a hold release while a CPU was lazy."""
    s = random_scenario(random.Random(seed), 100, nr_cpus, kept=seed % 2 == 0)
    with tempfile.TemporaryDirectory() as d:
        doc, res = simulate(s.write(Path(d) / "t"), None, sets, decisions=True)
    models = doc["models"]
    assert set(models) == {"vanilla", "luf-v12", "luf-v12-intended", "luf-v11", "hold-before-free", "oracle"}
    passed = {n: [m["by_cause"].get(c, 0) for c in PASS_THROUGH] for n, m in models.items()}
    assert all(v == passed["vanilla"] for v in passed.values()), passed
    assert sum(models["vanilla"]["by_cause"].get(c, 0) for c in DEFERRABLE) == 0
    oracle = deferrable_flushes_per_cpu(res.models["oracle"].decisions_array())
    for name in ("luf-v12-intended", "luf-v11", "hold-before-free"):
        other = deferrable_flushes_per_cpu(res.models[name].decisions_array())
        assert all(oracle[c] <= other[c] for c in oracle), (name, dict(oracle), dict(other))


def test_segments_carry_state() -> None:
    """Cutting a trace into segments does not change any result (state is carried across segments)."""
    rng_seed = 7
    whole = random_scenario(random.Random(rng_seed), 80)
    cut = random_scenario(random.Random(rng_seed), 80)
    # cut the second copy after every table's first half (segments must line up in time: cut at a time)
    t_cut = sorted(r["ts_ns"] for r in cut.rows["page"])[len(cut.rows["page"]) // 2]
    for rows in cut.rows.values():
        rows.sort(key=lambda r: r.get("ts_ns", r.get("ts_start_ns", 0)))
    cut.segment_marks.append({k: sum(1 for r in v if r.get("ts_ns", 0) < t_cut) for k, v in cut.rows.items()})
    with tempfile.TemporaryDirectory() as d:
        a, _ = simulate(whole.write(Path(d) / "a"), None, [])
        b, _ = simulate(cut.write(Path(d) / "b"), None, [])
    assert b["replay"]["raw_events"] == a["replay"]["raw_events"]
    for name in a["models"]:  # float sums may differ in the last bit with another segmentation
        ma, mb = a["models"][name]["stale_window"], b["models"][name]["stale_window"]
        assert ma.pop("mean_s") == pytest.approx(mb.pop("mean_s"), rel=1e-9)
    for k in ("vanilla", "models", "fidelity", "eligibility", "realloc_delay", "timeline"):
        assert a[k] == b[k], k
