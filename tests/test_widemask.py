"""W-word CPU masks (model/widemask.py): the mask algebra against Python integers, and real model functions,
compiled unchanged for W words, against their uint64 originals on the same work spread over 64·W CPUs."""

from __future__ import annotations

import random
from pathlib import Path

import numba
import numpy as np
import pytest
from scenarios import random_scenario

from lufreplay.model import kernels as K
from lufreplay.model import luf_v12 as V
from lufreplay.model import ops as O
from lufreplay.model import rmap, vanilla, widemask
from lufreplay.model import state as S
from lufreplay.model.luf_v12 import LufV12
from lufreplay.model.options import parse_settings
from lufreplay.model.reference import Decision, ReferenceLufV12, fast_decisions
from lufreplay.model.widemask import MaskArray, module_with, primitives, specialise, words
from lufreplay.replay.engine import replay
from lufreplay.trace.reader import open_trace

MASK64 = (1 << 64) - 1


def to_tuple(x: int, w: int) -> tuple[np.uint64, ...]:
    return tuple(np.uint64(x >> (64 * k) & MASK64) for k in range(w))


def to_int(t: tuple[int, ...] | np.ndarray) -> int:
    return sum(int(v) << (64 * k) for k, v in enumerate(t))


@numba.njit
def _algebra(a, b, M, i):
    M[i] = a
    M[i + 1] = b
    M[i + 1] |= a & ~b
    c = M[i]
    c ^= b
    return a | b, a & b, a ^ b, ~a & b, c, a != b, a == M[i], len(M)


@pytest.mark.parametrize("w", [3])
def test_mask_algebra_is_integer_algebra(w: int) -> None:
    rng = random.Random(w)
    width = 64 * w
    p = primitives(w)
    for _ in range(20):
        a, b = rng.getrandbits(width), rng.getrandbits(width) & rng.getrandbits(width)
        M = MaskArray.zeros(4, w)
        got = _algebra(to_tuple(a, w), to_tuple(b, w), M, 1)
        full = (1 << width) - 1
        assert [to_int(x) for x in got[:5]] == [a | b, a & b, a ^ b, (~a & full) & b, a ^ b]
        assert got[5:] == (a != b, True, 4)
        assert to_int(M.data[2]) == b | (a & ~b) and to_int(M.data[1]) == a and M.data[0].sum() == 0
        assert p["popcount"](to_tuple(a, w)) == bin(a).count("1")
        done = np.array([rng.randrange(5) for _ in range(width)], np.int64)
        owed = p["notdone"](to_tuple(a, w), 3, done)
        assert to_int(owed) == sum(1 << c for c in range(width) if a >> c & 1 and done[c] < 3)
        p["mark_done"](to_tuple(b, w), 4, done)
        assert all(done[c] == 4 for c in range(width) if b >> c & 1)
    for c in (0, 63, 64, width - 1):
        assert to_int(p["bit"](c)) == 1 << c
    assert MaskArray(np.array([[1 << 5, 0, 1]], np.uint64)).cpus(0) == [5, 128] and words(65) == 2 == words(128)


@numba.njit
def _drive(D, N, SC, SU, KEY_mask, KEY_ugen, done, acc, sh_mask, sh_ugen):
    """Batches of the LUF rmap end (batch_split, a key, the pages' debts) and, every third batch, a takeoff
    paying a key made five batches earlier: every mask moves through the model's own functions."""
    sent = 0
    n = len(D)
    for i in range(n):
        SU[S.LUF_MASK] |= D[i]
        SU[S.NONLUF_MASK] |= N[i]
        d, _ = rmap.batch_split(D[i], False, SU)
        k = V._new_key(d, SC, KEY_mask, KEY_ugen, done, acc)
        rmap.owe(i % 64, d, KEY_ugen[k], sh_mask, sh_ugen)
        rmap.batch_done(SU)
        if i % 3 == 0:
            k2 = (k + 65531) & 0xFFFF
            t = K.notdone(KEY_mask[k2], KEY_ugen[k2], done)
            sent += K.popcount(t)
            SC[S.G] += 1
            K.mark_done(t, SC[S.G], done)
    return sent


def _wide_drive(w: int) -> object:
    p = primitives(w)
    kern = module_with(K, **{n: p[n] for n in ("popcount", "notdone", "mark_done")})
    u0 = {"U0": p["U0"]}
    rm = module_with(rmap, **{n: specialise(getattr(rmap, n), u0) for n in ("batch_split", "owe", "batch_done")})
    v12 = module_with(V, _new_key=specialise(V._new_key, {**u0, "notdone": p["notdone"]}))
    return specialise(_drive, {"K": kern, "rmap": rm, "V": v12})


def _state(masks: list[object], n_cpu: int) -> list[object]:
    SC = np.zeros(S.NSC, np.int64)
    SC[S.G] = 2
    if isinstance(masks[0], np.ndarray) and masks[0].ndim == 1:
        z = [np.zeros(S.NSU, np.uint64), np.zeros(65536, np.uint64), np.zeros(64, np.uint64)]
    else:
        w = masks[0].width  # type: ignore[attr-defined]
        z = [MaskArray.zeros(S.NSU, w), MaskArray.zeros(65536, w), MaskArray.zeros(64, w)]
    ones = np.ones(n_cpu, np.int64)
    return [
        *masks,
        SC,
        z[0],
        z[1],
        np.zeros(65536, np.int64),
        ones,
        np.zeros(K.ACC_SIZE, np.int64),
        z[2],
        np.zeros(64, np.int64),
    ]


def _spread(m: np.ndarray, lut: list[int], w: int) -> np.ndarray:
    out = np.zeros((m.shape[0], w), np.uint64)
    for c in range(64):
        on = (m >> np.uint64(c)) & np.uint64(1) == 1
        out[on, lut[c] >> 6] |= np.uint64(1) << np.uint64(lut[c] & 63)
    return out


@pytest.mark.parametrize("w", [8, 64])
def test_model_functions_compiled_for_wide_masks_match_uint64(w: int) -> None:
    """The same 3,000 batches on 64 CPUs, and moved to CPU 65c + ... of a 64·W-CPU host (every word used): the
    copies of _new_key, batch_split, owe and batch_done for W words leave the state of the uint64 originals,
    moved the same way, and send as many IPIs."""
    rng = np.random.default_rng(w)
    n = 3000
    d = np.zeros(n, np.uint64)
    for i in range(n):
        for c in rng.choice(64, 4, replace=False):
            d[i] |= np.uint64(1) << np.uint64(c)
    nonluf = np.roll(d, 7) & np.uint64(0x00FF00FF00FF00FF)
    base = _state([d, nonluf], 64)
    sent = _drive(*base)
    lut = [c * w + c % w for c in range(64)]
    wide = _state([MaskArray(_spread(d, lut, w)), MaskArray(_spread(nonluf, lut, w))], 64 * w)
    assert _wide_drive(w)(*wide) == sent > 1000
    for j in (4, 8):  # KEY_mask, sh_mask
        assert np.array_equal(wide[j].data, _spread(base[j], lut, w))  # type: ignore[union-attr]
    assert np.array_equal(wide[6][lut], base[6])  # done[] of every CPU that took part
    assert np.array_equal(wide[2], base[2]) and np.array_equal(wide[5], base[5])  # SC, KEY_ugen
    assert np.array_equal(wide[7], base[7]) and np.array_equal(wide[9], base[9])  # acc (key merges), sh_ugen
    assert base[7][K.O_MISC + V.O.K_KEY_MERGES] == 0  # 3,000 keys: no slot re-use on either side


def _run_vanilla(core: object, ops: np.ndarray, w: int, n_pfn: int, tl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    acc = np.zeros(K.acc_layout(64 * w)["ACC_SIZE"], np.int64)
    su = np.zeros(S.NSU, np.uint64) if w == 1 else MaskArray.zeros(S.NSU, w)
    dt = O.DEC_DTYPE if w == 1 else widemask.wide_dtype(O.DEC_DTYPE, ("targets",), w)
    dec, nlog = np.zeros(4 * len(ops) + 16, dt), np.zeros(4, np.int64)
    core(ops, len(ops), su, np.zeros(n_pfn, np.int64), acc, tl, dec, nlog)  # type: ignore[operator]
    return acc, dec[: nlog[K.L_DEC]]


@pytest.mark.parametrize("w", [64])
def test_vanilla_core_compiled_for_wide_masks_matches_uint64(tmp_path: Path, w: int) -> None:
    """The model ops of a random 6-CPU trace, and the same ops with every CPU moved to c·w + c mod w of a
    64·w-CPU host (op and decision records with w-word mask fields): vanilla's core compiled for w words counts
    the same flushes per cause, the same per CPU (moved), and logs the same decisions (moved)."""
    s = random_scenario(random.Random(7), 100, 6, kept=True)
    res = replay(open_trace(s.write(tmp_path / "t")), ["vanilla"], parse_settings([]), keep_ops=True)
    ops = np.concatenate(res.ops)
    base, dec1 = _run_vanilla(vanilla.run_vanilla, ops, 1, res.pfns.limit, res.tl)
    assert np.array_equal(base, res.models["vanilla"].acc)  # the core as the replay runs it
    lut = np.array([c * w + c % w for c in range(64)], np.int64)
    wide = np.zeros(len(ops), widemask.wide_dtype(O.MOP_DTYPE, ("mask", "mask2"), w))
    for n in O.MOP_DTYPE.names or ():
        wide[n] = _spread(ops[n], list(lut), w) if n in ("mask", "mask2") else ops[n]
    wide["cpu"] = np.where(ops["cpu"] >= 0, lut[np.maximum(ops["cpu"], 0)], ops["cpu"])
    # the replay's own copy (widemask.core: shared with tests/test_wide_replay.py's 4096-CPU run, compiled once)
    got, decw = _run_vanilla(widemask.core(vanilla.run_vanilla, w), wide, w, res.pfns.limit, res.tl)
    a, b = K.acc_layout(64), K.acc_layout(64 * w)
    per_cpu = ("O_PERCPU", "O_REC_PERCPU", "O_FID_EXPL_CPU", "O_FID_MATCH_CPU")
    ends = sorted(a.values())
    for name, off in a.items():
        if name == "ACC_SIZE":
            continue
        size = ends[ends.index(off) + 1] - off
        if name in per_cpu:
            moved = np.zeros(64 * w, np.int64)
            moved[lut] = base[off : off + 64]
            assert np.array_equal(got[b[name] : b[name] + 64 * w], moved), name
        else:
            assert np.array_equal(got[b[name] : b[name] + size], base[off : off + size]), name
    assert base[K.O_IPIS : K.O_IPIS + O.NCAUSE].sum() > 20 and base[K.O_FID_EXPL_CPU : K.O_FID_EXPL_CPU + 6].sum() > 0
    assert len(decw) == len(dec1) > 20
    assert np.array_equal(decw["targets"], _spread(dec1["targets"], list(lut), w))
    assert np.array_equal(decw["cpu"], np.where(dec1["cpu"] >= 0, lut[np.maximum(dec1["cpu"], 0)], dec1["cpu"]))
    for n in ("ts", "kind", "cause", "ipis", "op"):
        assert np.array_equal(decw[n], dec1[n]), n


#: run_luf_v12's array arguments that hold masks, and those indexed by CPU
_MASKS = {"SU", "MMB_mask", "ASB_mask", "KEY_mask", "sh_mask", "hist_mask", "req_mask", "OBM"}
_PER_CPU = {"done", "strikes", "FH"}


def _luf_args(m: LufV12, ops: np.ndarray, w: int) -> tuple[object, ...]:
    """run_luf_v12's arguments, as ``LufV12._run`` passes them, for ``w``-word masks (w = 1: the model's own)."""
    st, pg = m.st, m.pages
    names = ["SC", "SU", "done", "MMB_mask", "MMB_ugen", "ASB_mask", "ASB_ugen", "KEY_mask", "KEY_ugen"]
    names += ["task_key", "task_anon_key", "strikes", "buf", "state", "key", "stamp", "unmap_ts", "unmap_task"]
    names += ["sh_mask", "sh_ugen", "acc", "tl", "dec", "nlog", "hist_g", "hist_ts", "hist_mask", "req_ts"]
    names += ["req_ugen", "req_mask", "req_pages", "OB", "OBM", "obfree", "FH", "OBS", "pobl"]
    arrays = [*st.head(), st.KEY_mask, st.KEY_ugen, st.task_key, st.task_anon_key, st.strikes, st.buf]
    arrays += [pg.state, pg.key, pg.stamp, pg.unmap_ts, pg.unmap_task, pg.sh_mask, pg.sh_ugen, m.acc, m.tl]
    arrays += [*m.logs.args(), *st.obl.args()]
    if w == 1:
        return (ops, len(ops), m.Y, *arrays)
    out: list[object] = []
    for name, a in zip(names, arrays, strict=True):
        if name in _MASKS:
            out.append(MaskArray.zeros(len(a), w))
        elif name in _PER_CPU:
            b = np.repeat(a[:1], 64 * w, axis=0)  # every CPU starts as CPU 0 does
            out.append(b)
        elif name == "acc":
            out.append(np.zeros(K.acc_layout(64 * w)["ACC_SIZE"], np.int64))
        elif name == "dec":
            out.append(np.zeros(len(a), widemask.wide_dtype(O.DEC_DTYPE, ("targets",), w)))
        else:
            out.append(a.copy())
    return (ops, len(ops), m.Y, *out)


def _wide_cpuset(words_: np.ndarray) -> frozenset[int]:
    return frozenset(64 * k + c for k, x in enumerate(words_.tolist()) for c in range(64) if x >> c & 1)


@pytest.mark.parametrize("seed", [3])
def test_luf_v12_core_on_cpu_ids_up_to_300_matches_the_reference(tmp_path: Path, seed: int) -> None:
    """A random 12-CPU trace's model ops with CPU c moved to 25c + 3 (ids up to 278: 5-word masks): luf-v12's core,
    compiled from its own source for 5 words, makes the decisions of the reference (CPU sets) on the moved ops,
    and the uint64 core's decisions on the original ops, moved."""
    w = 5
    s = random_scenario(random.Random(seed), 100, 12, kept=True)
    opts = parse_settings([])
    res = replay(open_trace(s.write(tmp_path / "t")), ["luf-v12"], opts, keep_ops=True, decisions=True)
    ops = np.concatenate(res.ops)
    lut = np.array([25 * c + 3 if c < 12 else c for c in range(64)], np.int64)  # CPUs 12-63 never appear
    wide = np.zeros(len(ops), widemask.wide_dtype(O.MOP_DTYPE, ("mask", "mask2"), w))
    for n in O.MOP_DTYPE.names or ():
        wide[n] = _spread(ops[n], list(lut), w) if n in ("mask", "mask2") else ops[n]
    wide["cpu"] = np.where(ops["cpu"] >= 0, lut[np.maximum(ops["cpu"], 0)], ops["cpu"])
    m = LufV12(opts, res.models["luf-v12"].Y, res.tl, res.ncpu, True)
    m.pages.ensure(res.pfns.limit, exact=True)
    m.ensure(len(res.ids.task) + 1, len(res.ids.mm) + 1, len(res.ids.mapping) + 1, len(ops))
    m.logs.ensure(len(ops) + 16, True)
    args = _luf_args(m, wide, w)
    core = widemask.core(V.run_luf_v12, w)  # the replay's copy (shared with tests/test_wide_replay.py)
    assert core(*args) == -1 and args[3 + 20][K.O_VIOL] == 0  # type: ignore[index]  # no safety violation
    dec, nlog = args[3 + 22], args[3 + 23]
    got = [
        Decision(
            int(r["ts"]),
            O.DECISION_KIND[r["kind"]],
            O.CAUSES[r["cause"]],
            int(r["cpu"]),
            _wide_cpuset(r["targets"]),
            int(r["op"]),
        )
        for r in dec[: nlog[K.L_DEC]]  # type: ignore[index]
        if r["kind"] in (O.D_PERFORMED, O.D_DEFERRED)
    ]
    ref = ReferenceLufV12(opts)
    names = O.MOP_DTYPE.names or ()
    for row in wide.tolist():
        r = dict(zip(names, row, strict=True))
        r["mask"], r["mask2"] = (sum(int(x) << (64 * k) for k, x in enumerate(r[f])) for f in ("mask", "mask2"))
        ref.step(r)
    assert got == ref.decisions and len(got) > 30 and max(max(d.targets, default=0) for d in got) > 200
    moved = [
        d._replace(cpu=int(lut[d.cpu]) if d.cpu >= 0 else d.cpu, targets=frozenset(int(lut[c]) for c in d.targets))
        for d in fast_decisions(res.models["luf-v12"].decisions_array())
    ]
    assert got == moved
