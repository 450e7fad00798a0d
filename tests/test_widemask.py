"""W-word CPU masks (model/widemask.py): the mask algebra against Python integers, and real model functions,
compiled unchanged for W words, against their uint64 originals on the same work spread over 64·W CPUs."""

from __future__ import annotations

import random

import numba
import numpy as np
import pytest

from lufreplay.model import kernels as K
from lufreplay.model import luf_v12 as V
from lufreplay.model import rmap
from lufreplay.model import state as S
from lufreplay.model.widemask import MaskArray, module_with, primitives, specialise, words

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


@pytest.mark.parametrize("w", [2, 64])
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


@pytest.mark.parametrize("w", [2, 64])
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
