"""``lufreplay calibrate``: what one remote TLB shootdown costs on this host, for the sender and for a receiver.

No PMU and no kprobes are needed: a C helper (``shootcost.c``) zaps one page of its own mm with
``madvise(MADV_DONTNEED)`` in a loop while N spinning threads sit on other CPUs, either in the same mm (every
zap flushes their TLBs by IPI) or in a forked child (same CPU load, no IPI). Trials of the two kinds alternate.

- **Receiver**: a spinner reads the clock in a loop and logs every gap of 0.3-200 µs (time lost to an
  interrupt). The sender waits until every receiver has run the flush, so the IPI's gap overlaps the zap
  that sent it: a gap overlapping a zap is one received IPI, and its length its cost. The other-mm trials
  count the gaps that overlap a zap by chance (``chance_matches``), and ``/proc/interrupts`` the IPIs.
- **Sender**: the zaps overlapped by a receiver's gap sent an IPI (a KVM guest skips the IPI to a vCPU its
  host has preempted, so only some zaps send one); their latency beyond the median zap of the other-mm
  trial is the sender's wait for the flush.

Each cost is an interval (10th, 50th, 90th percentile of the per-IPI values of all trials), not a point. It
leaves out the TLB refills after the flush (no PMU here) and the cache misses of the handler's data.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lufreplay import schema
from lufreplay.capture import chelper, procfs

SOURCE = Path(__file__).with_name("shootcost.c")
FORMAT = schema.SHOOTDOWN_COST_FORMAT
VERSION = 1
PERCENTILES = (10, 50, 90)
METHOD = (
    "madvise(MADV_DONTNEED) of one touched page with N spinning threads on other CPUs, in the same mm (TLB IPIs)"
    " vs in another mm (none), trials alternated; receiver: a spinner's 0.3-200 us gap that overlaps a zap;"
    " sender: latency of those zaps beyond the median zap without IPIs"
)
LEAVES_OUT = "TLB refills after each flush and the handler's cache misses (no PMU on the calibrating host)"


class CalibrationError(Exception):
    """Calibration cannot run or gave no usable figure; the message is one line."""


@dataclass
class CalibrateOptions:
    threads: int | None = None  # receiver threads (CPUs); default: every other online CPU, at most 4
    trials: int = 8  # pairs of (same-mm, other-mm) trials
    ops: int = 20000  # zaps per trial
    sender_cpu: int = 0


SHORT = CalibrateOptions(trials=3, ops=4000)


def cache_dir() -> Path:
    """Where compiled helpers go (``$XDG_CACHE_HOME/lufreplay``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lufreplay"


def default_profile_path() -> Path:
    """The host profile ``calibrate`` writes by default: one file per host name under the user's config dir."""
    import typer

    return Path(typer.get_app_dir("lufreplay")) / f"shootdown-cost-{socket.gethostname()}.json"


def helper_binary() -> Path:
    """shootcost.c, compiled once per source version."""
    try:
        return chelper.compiled(SOURCE, cache_dir() / "bin", "shootcost", "calibrate needs")
    except chelper.HelperBuildError as e:
        raise CalibrationError(str(e)) from None


def _tlb_row() -> list[int]:
    row = procfs.read_interrupts().get("TLB")
    if row is None:
        raise CalibrationError("/proc/interrupts has no TLB row (not x86?): remote shootdowns cannot be counted")
    return row


@dataclass
class Trial:
    same: bool
    send_t0: np.ndarray
    send_ns: np.ndarray
    recv: list[dict[str, Any]]
    tlb: list[int]  # TLB IPIs each receiver CPU got during the trial (/proc/interrupts)


def run_trial(binary: Path, same: bool, ops: int, sender: int, receivers: list[int]) -> Trial:
    before = _tlb_row()
    argv = [str(binary), "same" if same else "other", str(ops), str(sender), *map(str, receivers)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    after = _tlb_row()
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise CalibrationError(f"shootcost failed: {last}")
    d = json.loads(r.stdout)
    recv = [
        {**x, "gap_t": np.asarray(x["gap_t"], np.int64), "gap_ns": np.asarray(x["gap_ns"], np.int64)} for x in d["recv"]
    ]
    t0, ns = np.asarray(d["send_t0"], np.int64), np.asarray(d["send_ns"], np.int64)
    return Trial(same, t0, ns, recv, [after[c] - before[c] for c in receivers])


def match(t: Trial) -> tuple[np.ndarray, np.ndarray, int]:
    """Zaps overlapped by a receiver's gap, and those gaps: (zap indexes, gap costs in ns, gaps matched).

    A gap is charged to the zap whose [start, end] it overlaps; its cost is its length beyond one ordinary
    turn of the spinner's loop."""
    end = t.send_t0 + t.send_ns
    zaps: list[np.ndarray] = []
    costs: list[np.ndarray] = []
    for r in t.recv:
        gs, gl = r["gap_t"], r["gap_ns"]
        i = np.searchsorted(t.send_t0, gs + gl, side="right") - 1
        ok = (i >= 0) & (gs <= end[np.maximum(i, 0)])
        zaps.append(i[ok])
        costs.append(gl[ok] - int(r["min_ns"]))
    c = np.concatenate(costs) if costs else np.zeros(0, np.int64)
    return np.unique(np.concatenate(zaps)) if zaps else np.zeros(0, np.int64), c, int(c.size)


def interval(values: np.ndarray) -> dict[str, float]:
    """The 10th / 50th / 90th percentiles, in ns."""
    p = np.percentile(values, PERCENTILES)
    return {f"p{q}": round(float(v), 1) for q, v in zip(PERCENTILES, p, strict=True)}


def estimate(pairs: list[tuple[Trial, Trial]]) -> dict[str, Any]:
    """Per-IPI sender and receiver costs from (same-mm, other-mm) trial pairs."""
    send: list[np.ndarray] = []
    recv: list[np.ndarray] = []
    ipis = matched = chance = zaps = 0
    for same, other in pairs:
        base = float(np.median(other.send_ns))
        z, c, m = match(same)
        send.append(same.send_ns[z] - base)
        recv.append(c)
        matched += m
        chance += match(other)[2]  # gaps that overlap a zap with no IPI to cause them
        ipis += sum(same.tlb)
        zaps += same.send_ns.size
    s_all, r_all = np.concatenate(send), np.concatenate(recv)
    if r_all.size < 10:
        raise CalibrationError(
            f"only {r_all.size} TLB IPI(s) seen during the trials ({ipis} counted in /proc/interrupts):"
            " nothing to measure; retry with more --ops"
        )
    s, r = interval(s_all), interval(r_all)
    if s["p10"] <= 0 or r["p10"] <= 0:
        raise CalibrationError(
            f"the measured costs are not positive (sender {s}, receiver {r}): the host is too noisy; retry with"
            " more --trials/--ops"
        )
    return {
        "sender_ns": s,
        "receiver_ns": r,
        "ipis_received": ipis,
        "ipis_matched": matched,
        "chance_matches": chance,
        "zaps": zaps,
    }


def calibrate(opts: CalibrateOptions, progress: Any = None) -> dict[str, Any]:
    """Run the trials and return the shootdown-cost profile (a JSON object)."""
    if os.geteuid() != 0:
        raise CalibrationError("calibrate needs root (it pins threads and reads every CPU's interrupt counts)")
    cpus = sorted(os.sched_getaffinity(0))
    if opts.sender_cpu not in cpus:
        raise CalibrationError(f"sender CPU {opts.sender_cpu} is not available (CPUs: {cpus})")
    others = [c for c in cpus if c != opts.sender_cpu]
    n = min(len(others), 4) if opts.threads is None else opts.threads
    if n < 1 or n > len(others):
        raise CalibrationError(
            f"--threads {n}: needs 1..{len(others)} other CPUs (this host has {len(cpus)} usable CPU(s))"
        )
    if opts.trials < 1 or opts.ops < 100:
        raise CalibrationError("--trials must be >= 1 and --ops >= 100")
    receivers = others[:n]
    binary = helper_binary()
    pairs = []
    for i in range(opts.trials):
        pair = (
            run_trial(binary, True, opts.ops, opts.sender_cpu, receivers),
            run_trial(binary, False, opts.ops, opts.sender_cpu, receivers),
        )
        pairs.append(pair)
        if progress is not None:
            progress(i + 1, opts.trials)
    est = estimate(pairs)
    host = procfs.host_facts()
    return {
        "format": FORMAT,
        "version": VERSION,
        "method": METHOD,
        "leaves_out": LEAVES_OUT,
        "sender_ns": est["sender_ns"],
        "receiver_ns": est["receiver_ns"],
        "percentiles": list(PERCENTILES),
        "nr_threads": n,
        "sender_cpu": opts.sender_cpu,
        "receiver_cpus": receivers,
        "trials": opts.trials,
        "ops_per_trial": opts.ops,
        "ipis_received": est["ipis_received"],
        "ipis_matched": est["ipis_matched"],
        "chance_matches": est["chance_matches"],
        "ipis_per_zap": round(est["ipis_received"] / max(est["zaps"] * n, 1), 4),
        "host": {
            "hostname": host["hostname"],
            "kernel": host["uname"]["release"],
            "cpu_model": host["cpu_model"],
            "nr_cpus": host["nr_cpus"],
            "hypervisor": host["hypervisor"],
        },
        "created": datetime.now(timezone.utc).isoformat(),
    }


def save_profile(profile: dict[str, Any], path: Path) -> None:
    from lufreplay.jsonout import dumps

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(dumps(profile) + "\n")
    os.replace(tmp, path)


def run_calibrate(
    save: Path | None, threads: int | None, trials: int | None, ops: int | None, short: bool, json_out: bool
) -> int:
    """The ``calibrate`` command; returns the exit code (raises the Exit of a one-line error)."""
    import sys

    from lufreplay.console import emit_json, fail

    base = SHORT if short else CalibrateOptions()
    opts = CalibrateOptions(threads, trials or base.trials, ops or base.ops)
    path = save or default_profile_path()

    def tick(i: int, n: int) -> None:
        print(f"lufreplay: calibrate: trial pair {i}/{n} done", file=sys.stderr)

    try:
        profile = calibrate(opts, tick)
        bad = schema.shootdown_cost_problem(profile)
        if bad:  # estimate() refuses non-positive costs; this guards the file's other readers
            raise CalibrationError(bad)
        save_profile(profile, path)
    except CalibrationError as e:
        raise fail(str(e), 2) from None
    except OSError as e:
        raise fail(f"--save {e.filename or path}: {e.strerror or e}", 2) from None
    if json_out:
        emit_json(profile)
        return 0
    s, r = profile["sender_ns"], profile["receiver_ns"]
    print(
        f"remote TLB shootdown on {profile['host']['hostname']} ({profile['nr_threads']} receiver thread(s),"
        f" {profile['trials']} x {profile['ops_per_trial']} zaps, {profile['ipis_received']:,} IPIs received):"
    )
    print(f"  sender waits   {s['p10'] / 1e3:.2f} .. {s['p90'] / 1e3:.2f} us per flush (median {s['p50'] / 1e3:.2f})")
    print(f"  each receiver  {r['p10'] / 1e3:.2f} .. {r['p90'] / 1e3:.2f} us per IPI (median {r['p50'] / 1e3:.2f})")
    print(f"  leaves out: {LEAVES_OUT}")
    print(f"saved to {path}  (use: lufreplay simulate TRACE --cost {path})")
    return 0
