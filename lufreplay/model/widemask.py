"""W-word CPU masks for the numba model code: how the replay handles more than 64 involved CPUs (design (b)).

Today every CPU set in the models is one uint64. A replay once per 64-CPU slice is not exact for LUF
(``bench/cpu_partition``, docs/simulate.md "Any CPU count"), so more CPUs need wider masks in one replay. This
module makes the *unchanged* source of a model function run on W-word masks:

* a mask value is a ``UniTuple(uint64, W)`` (a register-passed value, no allocation), with ``|``, ``&``, ``^``,
  ``~`` and their in-place forms (LLVM code over the W words, no loop); ``==``/``!=`` are numba's own;
* an array of masks is a :class:`MaskArray` (an ``(n, W)`` uint64 array): ``a[i]`` loads a mask,
  ``a[i] = m`` and ``a[i] |= m`` store one, as for today's uint64 arrays;
* :func:`primitives` builds ``U0``, ``bit``, ``popcount``, ``notdone`` and ``mark_done`` for W words (unrolled:
  a tuple index that is not a constant costs O(W) per access);
* :func:`specialise` compiles a copy of an njit function with some of its globals replaced (``U0``, the
  primitives, or a module holding other specialised functions).

W = 1 keeps today's compiled code: the originals are used as they are, and only W > 1 compiles copies
(:func:`modules` for a whole core: every model's and the reconstructor's compile unchanged; they read an op's mask through
``kernels.opm`` and write a decision's targets through ``kernels.set_targets``, records get W-word fields with
:func:`wide_dtype`). The cost of the copies grows with W, not with the host's CPU count (``bench/wide_masks``).
The engine uses them for a trace of more than 64 involved CPUs (``core`` for the models, ``engine.recon_kernels``
for the reconstructor); docs/simulate.md "Any CPU count".
"""

from __future__ import annotations

import operator
import threading
import types as pytypes
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba.core import cgutils, types
from numba.core.registry import CPUDispatcher as Dispatcher
from numba.extending import (
    NativeValue,
    intrinsic,
    make_attribute_wrapper,
    models,
    overload,
    register_model,
    typeof_impl,
    unbox,
)

from lufreplay.model import kernels as K
from lufreplay.model.kernels import popcount as _popcount64

U64 = types.uint64
_ROWS = types.Array(U64, 2, "C")
_U1 = np.uint64(1)


def words(ncpu: int) -> int:
    """Words of a mask over ``ncpu`` CPUs (at least 1)."""
    return max(1, (int(ncpu) + 63) // 64)


def _is_mask(t: Any) -> bool:
    return isinstance(t, types.UniTuple) and t.dtype == U64


class MaskArray:
    """``n`` masks of ``W`` words: ``data`` is an ``(n, W)`` C-contiguous uint64 array (word k holds CPUs
    64k..64k+63)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = np.ascontiguousarray(data, np.uint64)
        if self.data.ndim != 2:
            raise ValueError("MaskArray needs an (n, W) array")

    @classmethod
    def zeros(cls, n: int, w: int) -> MaskArray:
        return cls(np.zeros((n, w), np.uint64))

    @property
    def width(self) -> int:
        return int(self.data.shape[1])

    def cpus(self, i: int) -> list[int]:
        """The CPU ids of mask ``i``."""
        return [64 * k + c for k, x in enumerate(self.data[i].tolist()) for c in range(64) if x >> c & 1]


class MaskArrayType(types.Type):
    def __init__(self, w: int) -> None:
        self.W = w
        super().__init__(name=f"MaskArray({w})")


@typeof_impl.register(MaskArray)
def _typeof(val: MaskArray, c: Any) -> MaskArrayType:
    return MaskArrayType(val.width)


@register_model(MaskArrayType)
class _MaskArrayModel(models.StructModel):
    def __init__(self, dmm: Any, fe_type: Any) -> None:
        super().__init__(dmm, fe_type, [("data", _ROWS)])


make_attribute_wrapper(MaskArrayType, "data", "data")


@unbox(MaskArrayType)
def _unbox(typ: MaskArrayType, obj: Any, c: Any) -> NativeValue:
    d = c.pyapi.object_getattr_string(obj, "data")
    arr = c.unbox(_ROWS, d)
    s = cgutils.create_struct_proxy(typ)(c.context, c.builder)
    s.data = arr.value
    c.pyapi.decref(d)
    return NativeValue(s._getvalue(), is_error=arr.is_error)


def _row_ptr(context: Any, builder: Any, mtype: MaskArrayType, ma: Any, i: Any) -> Any:
    """Pointer to row ``i`` as a ``[W x i64]`` (one load or store moves the whole mask)."""
    st = cgutils.create_struct_proxy(mtype)(context, builder, value=ma)
    arr = context.make_array(_ROWS)(context, builder, st.data)
    base = builder.mul(i, context.get_constant(types.intp, mtype.W))
    ptr = builder.gep(arr.data, [base])
    return builder.bitcast(ptr, context.get_value_type(types.UniTuple(U64, mtype.W)).as_pointer())


@intrinsic
def _load(typingctx: Any, ma: Any, i: Any) -> Any:
    if not isinstance(ma, MaskArrayType):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.load(_row_ptr(context, builder, sig.args[0], args[0], args[1]))

    return types.UniTuple(U64, ma.W)(ma, types.intp), codegen


@intrinsic
def _store(typingctx: Any, ma: Any, i: Any, v: Any) -> Any:
    if not (isinstance(ma, MaskArrayType) and _is_mask(v) and v.count == ma.W):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        builder.store(args[2], _row_ptr(context, builder, sig.args[0], args[0], args[1]))
        return context.get_dummy_value()

    return types.none(ma, types.intp, v), codegen


@overload(operator.getitem)
def _getitem(a, i):  # type: ignore[no-untyped-def]  # numba: no annotations on overloads
    if isinstance(a, MaskArrayType) and isinstance(i, types.Integer):
        return lambda a, i: _load(a, i)
    return None


@overload(operator.setitem)
def _setitem(a, i, v):  # type: ignore[no-untyped-def]
    if isinstance(a, MaskArrayType) and isinstance(i, types.Integer) and _is_mask(v):
        return lambda a, i, v: _store(a, i, v)
    return None


@overload(len)
def _len(a):  # type: ignore[no-untyped-def]
    if isinstance(a, MaskArrayType):
        return lambda a: a.data.shape[0]
    return None


def _word_op(emit: Callable[[Any, Any, Any], Any]) -> Any:
    @intrinsic
    def _op(typingctx: Any, a: Any, b: Any) -> Any:
        if not (_is_mask(a) and a == b):
            return None

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            x, y = args
            out = x
            for k in range(a.count):
                out = builder.insert_value(
                    out, emit(builder, builder.extract_value(x, k), builder.extract_value(y, k)), k
                )
            return out

        return a(a, b), codegen

    return _op


_OR = _word_op(lambda b, x, y: b.or_(x, y))
_AND = _word_op(lambda b, x, y: b.and_(x, y))
_XOR = _word_op(lambda b, x, y: b.xor(x, y))


@intrinsic
def _not(typingctx: Any, a: Any) -> Any:
    if not _is_mask(a):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        out = args[0]
        for k in range(a.count):
            out = builder.insert_value(out, builder.not_(builder.extract_value(args[0], k)), k)
        return out

    return a(a), codegen


def _register(op: Any, fn: Any) -> None:
    @overload(op)
    def _ov(a, b):  # type: ignore[no-untyped-def]
        if _is_mask(a) and _is_mask(b) and a.count == b.count:
            return lambda a, b: fn(a, b)
        return None


for _op, _fn in (
    (operator.or_, _OR),
    (operator.ior, _OR),
    (operator.and_, _AND),
    (operator.iand, _AND),
    (operator.xor, _XOR),
    (operator.ixor, _XOR),
):
    _register(_op, _fn)


@overload(operator.invert)
def _invert(a):  # type: ignore[no-untyped-def]
    if _is_mask(a):
        return lambda a: _not(a)
    return None


# ---- per-word helpers the unrolled primitives call ---------------------------------------------------------------
@numba.njit(cache=True)
def _notdone_word(x, base, ugen, done):
    o = np.uint64(0)
    c = 0
    while x != 0:
        if x & _U1:
            if done[base + c] < K.cpu_ugen(ugen, base + c):  # one ugen, or owing's one per CPU
                o |= _U1 << np.uint64(c)
        x >>= _U1
        c += 1
    return o


@numba.njit(cache=True)
def _mark_word(x, base, g, done):
    c = 0
    while x != 0:
        if x & _U1:
            if done[base + c] < g:
                done[base + c] = g
        x >>= _U1
        c += 1


@numba.njit(cache=True)
def _add_word(acc, off, x):
    c = 0
    while x != 0:
        if x & _U1:
            acc[off + c] += 1
        x >>= _U1
        c += 1


@numba.njit(cache=True)
def _bit_word(c, k):
    return _U1 << np.uint64(c & 63) if (c >> 6) == k else np.uint64(0)


_PRIMS: dict[int, dict[str, Any]] = {}
#: the kernels.py functions that look inside a mask, built per width by :func:`primitives`
PRIMITIVES = (
    "bit", "popcount", "notdone", "mark_done", "add_per_cpu", "opm", "set_targets", "set_mask", "set_mask2", "owing",
    "word", "rows_eq", "recent",
)  # fmt: skip


def _either_width(wide_popcount: Any) -> Any:
    """popcount of a W-word mask or of a plain uint64 (a count kept in an int field, e.g. R6's credited CPUs)."""

    def stub(m):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @overload(stub)
    def _ov(m):  # type: ignore[no-untyped-def]
        if isinstance(m, types.Integer):
            return lambda m: _popcount64(m)
        if _is_mask(m):
            return lambda m: wide_popcount(m)
        return None

    return numba.njit(lambda m: stub(m))


def primitives(w: int) -> dict[str, Any]:
    """``U0`` (the empty mask) and :data:`PRIMITIVES` over ``w`` words, with the meaning of their uint64
    namesakes in ``model/kernels.py`` (``done`` indexed by CPU id; ``opm`` reads a ``(w,)`` mask field of a
    record, ``set_targets`` writes a decision record's). Built once per ``w``."""
    if w in _PRIMS:
        return _PRIMS[w]

    def tup(f: Callable[[int], str]) -> str:
        return "(" + ", ".join(f(k) for k in range(w)) + ",)"

    src = (
        f"def bit(c):\n    return {tup(lambda k: f'_bit_word(c, {k})')}\n"
        f"def popcount(m):\n    return {' + '.join(f'_pc(m[{k}])' for k in range(w))}\n"
        f"def notdone(mask, ugen, done):\n    return {tup(lambda k: f'_notdone_word(mask[{k}], {64 * k}, ugen, done)')}\n"
        "def mark_done(mask, g, done):\n"
        + "".join(f"    _mark_word(mask[{k}], {64 * k}, g, done)\n" for k in range(w))
        + "def add_per_cpu(acc, off, m):\n"
        + "".join(f"    _add_word(acc, off + {64 * k}, m[{k}])\n" for k in range(w))
        + f"def opm(x):\n    return {tup(lambda k: f'x[{k}]')}\n"
        + "".join(
            f"def {fn}(r, v):\n    t = r['{field}']\n" + "".join(f"    t[{k}] = v[{k}]\n" for k in range(w))
            for fn, field in (("set_targets", "targets"), ("set_mask", "mask"), ("set_mask2", "mask2"))
        )
        + f"def owing(mask, done, owed):\n    return {tup(lambda k: f'_notdone_word(mask[{k}], {64 * k}, owed, done)')}\n"
        + "def word(m, k):\n    return m[k]\n"
        + f"def rows_eq(T, col, value, n):\n    return {tup(lambda k: f'_rows_eq_word(T, col, value, n, {k})')}\n"
        + f"def recent(last, row, t, window, n):\n    return {tup(lambda k: f'_recent_word(last, row, t, window, n, {k})')}\n"
    )
    ns: dict[str, Any] = {"_bit_word": _bit_word, "_pc": _popcount64, "_notdone_word": _notdone_word}
    ns["_mark_word"], ns["_add_word"] = _mark_word, _add_word
    ns["_rows_eq_word"], ns["_recent_word"] = K.rows_eq_word, K.recent_word
    exec(compile(src, f"<widemask W={w}>", "exec"), ns)  # unrolled: constant tuple indices only
    out = {"U0": (np.uint64(0),) * w, "WIDE": True, **{n: numba.njit(ns[n]) for n in PRIMITIVES}}
    out["popcount"] = _either_width(out["popcount"])
    _PRIMS[w] = out
    return out


def specialise(fn: Any, overrides: dict[str, Any]) -> Any:
    """A new njit function with ``fn``'s code and its globals updated by ``overrides`` (not cached on disk: the
    copy shares the original's code object, so the on-disk cache could not tell them apart)."""
    py = fn.py_func
    g = dict(py.__globals__)
    g.update(overrides)
    opts = {k: v for k, v in fn.targetoptions.items() if k not in ("cache", "nopython")}
    return numba.njit(**opts)(pytypes.FunctionType(py.__code__, g, py.__name__, py.__defaults__, py.__closure__))


_KERNELS: dict[int, pytypes.ModuleType] = {}


def kernels(w: int) -> pytypes.ModuleType:
    """``model/kernels.py`` for ``w``-word masks: the primitives, the accumulator layout for 64·w CPUs
    (``acc_layout``) and the flush accounting compiled against them."""
    if w in _KERNELS:
        return _KERNELS[w]
    g: dict[str, Any] = {**primitives(w), **K.acc_layout(64 * w)}
    g["log_decision"] = specialise(K.log_decision, g)
    for name in ("account_flush", "add_history", "add_request"):
        g[name] = specialise(getattr(K, name), g)
    _KERNELS[w] = module_with(K, **g)
    return _KERNELS[w]


_COPIES: dict[tuple[tuple[str, ...], int], dict[str, pytypes.ModuleType]] = {}
_COPIES_LOCK = threading.Lock()


def modules(mods: list[pytypes.ModuleType], w: int) -> dict[str, pytypes.ModuleType]:
    """Copies of ``mods`` (model modules, callees first or not: globals are bound before anything compiles) whose
    njit functions are compiled for ``w``-word masks: every function of theirs gets ``U0``, the primitives and the
    accumulator layout of 64·w CPUs, and sees the copies of the other modules and of the functions it imported
    from them. Keyed by module name; one set of copies per list of modules and width per process (numba compiles
    each function at its first call; not cached on disk)."""
    key = (tuple(m.__name__ for m in mods), w)
    with _COPIES_LOCK:  # models start on a thread pool: luf-v12 and luf-v12-intended share one copy
        if key not in _COPIES:
            _COPIES[key] = _copy_modules(mods, w)
    return _COPIES[key]


def _copy_modules(mods: list[pytypes.ModuleType], w: int) -> dict[str, pytypes.ModuleType]:
    base: dict[str, Any] = {**primitives(w), **K.acc_layout(64 * w)}
    names = {m.__name__ for m in mods}
    copies = {m.__name__: pytypes.ModuleType(m.__name__ + "_wide") for m in mods}
    gl: dict[str, dict[str, Any]] = {}
    wide: dict[int, Any] = {}
    for m in mods:
        g = gl[m.__name__] = dict(m.__dict__)
        for name, v in m.__dict__.items():
            if isinstance(v, Dispatcher) and v.py_func.__module__ == m.__name__:
                if name in base:
                    wide[id(v)] = base[name]
                else:
                    py = v.py_func
                    opts = {k: x for k, x in v.targetoptions.items() if k not in ("cache", "nopython")}
                    fn = pytypes.FunctionType(py.__code__, g, py.__name__, py.__defaults__, py.__closure__)
                    wide[id(v)] = numba.njit(**opts)(fn)
    for m in mods:
        g = gl[m.__name__]
        for name, v in list(g.items()):
            if isinstance(v, pytypes.ModuleType) and v.__name__ in names:
                g[name] = copies[v.__name__]
            elif isinstance(v, Dispatcher) and id(v) in wide:
                g[name] = wide[id(v)]
        g.update(base)
        copies[m.__name__].__dict__.update({k: x for k, x in g.items() if not k.startswith("__")})
    return copies


def core(fn: Any, w: int) -> Any:
    """The ``w``-word copy of a model's njit core ``fn`` (e.g. ``luf_v12.run_luf_v12``): its module compiled by
    :func:`modules` with the shared model modules (kernels, pcpfifo, rules, rmap). One copy per module and width
    per process (numba compiles it at its first call; not cached on disk)."""
    import sys

    from lufreplay.model import pcpfifo, rmap, rules

    mod = sys.modules[fn.__module__]
    return getattr(modules([K, pcpfifo, rules, rmap, mod], w)[mod.__name__], fn.__name__)


def wide_dtype(dtype: np.dtype, fields: tuple[str, ...], w: int) -> np.dtype:
    """``dtype`` with each of ``fields`` (uint64 masks) widened to ``w`` words."""
    return np.dtype([(n, (dtype[n], (w,)) if n in fields else dtype[n]) for n in dtype.names or ()])


def module_with(module: pytypes.ModuleType, **attrs: Any) -> pytypes.ModuleType:
    """A copy of ``module`` with some attributes replaced (numba resolves ``module.name`` at compile time, so a
    specialised function sees the replaced ones)."""
    m = pytypes.ModuleType(module.__name__ + "_wide")
    m.__dict__.update({k: v for k, v in module.__dict__.items() if not k.startswith("__")})
    m.__dict__.update(attrs)
    return m


__all__ = [
    "PRIMITIVES",
    "MaskArray",
    "core",
    "kernels",
    "module_with",
    "modules",
    "primitives",
    "specialise",
    "wide_dtype",
    "words",
]
