"""The numba fast path and the pure-Python reference of luf-v12 agree exactly on random traces."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scenarios import random_scenario

from lufreplay.model.options import parse_settings
from lufreplay.model.reference import ReferenceLufV12
from lufreplay.replay.engine import replay
from lufreplay.report.results import check_sums
from lufreplay.report.simulate_cmd import simulate
from lufreplay.trace.reader import open_trace

KEYS = (
    "remote_shootdowns",
    "flush_events",
    "local_flushes",
    "by_cause",
    "flush_events_by_cause",
    "per_cpu",
    "misc",
    "hooks",
)
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
# the allocation policy and the large-folio exclusion change the most state: every combination is drawn
POLICY = st.tuples(st.sampled_from(["luf", "recorded"]), st.sampled_from(["reject", "eligible"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_steps=st.integers(5, 120),
    nr_cpus=st.integers(2, 4),
    sets=SETTINGS,
    policy=POLICY,
)
def test_fast_path_matches_reference(
    seed: int, n_steps: int, nr_cpus: int, sets: list[str], policy: tuple[str, str]
) -> None:
    s = random_scenario(random.Random(seed), n_steps, nr_cpus)
    with tempfile.TemporaryDirectory() as d:
        path = s.write(Path(d) / "t")
        opts = parse_settings([*sets, f"alloc_order={policy[0]}", f"large_folios={policy[1]}"])
        res = replay(open_trace(path), ["vanilla", "luf-v12"], opts, keep_ops=True)
    ref = ReferenceLufV12(opts)
    for ops in res.ops:
        ref.run(ops)
    fast = res.models["luf-v12"].counts()
    slow = ref.counts(res.ncpu)
    assert {k: fast[k] for k in KEYS} == {k: slow[k] for k in KEYS}
    assert ref.violations == []  # the reference's own shadow check agrees that the model is safe


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), nr_cpus=st.integers(2, 4))
def test_every_model_is_safe_and_sums_exactly(seed: int, nr_cpus: int) -> None:
    """All five models replay random traces without a safety violation; by_cause sums to the totals."""
    s = random_scenario(random.Random(seed), 100, nr_cpus)
    with tempfile.TemporaryDirectory() as d:
        doc, _ = simulate(s.write(Path(d) / "t"), None, [])
    check_sums(doc)
    assert set(doc["models"]) == {"vanilla", "luf-v12", "luf-v11", "hold-before-free", "oracle"}
    # the oracle is a lower bound for the LUF models on what they defer
    assert (
        doc["models"]["oracle"]["remote_shootdowns"]
        <= doc["vanilla"]["remote_shootdowns"] + doc["models"]["luf-v12"]["remote_shootdowns"]
    )


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
