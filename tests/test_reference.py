"""The spec reference on its own: rules no short trace reaches (key-slot reuse) and CPU ids past 64."""

from __future__ import annotations

from typing import Any

import pytest

from lufreplay.model import ops as O
from lufreplay.model.options import parse_settings
from lufreplay.model.reference import LufBatch, Pass, ReferenceLufV12


def test_key_slot_reuse_merges_the_dieted_old_request() -> None:
    """§2.3 __fold_luf_batch: 64K keys wrap (0 is reserved); a live slot's old mask is dieted by its own ugen,
    then ORed with the new one, and the slot takes the new ugen: over-flushing, never under-flushing."""
    ref = ReferenceLufV12(parse_settings([]))
    ref.K = 65535
    ref.KEY[1] = LufBatch({0, 1, 5}, ugen=10)
    ref.done[0] = 12  # CPU0 flushed after the old request
    ref.G = 20
    key, d = ref.fold_unmap_luf(Pass(luf={2, 7}, nonluf={7}))
    assert (key, d) == (1, {2})
    assert ref.KEY[1].cpus == {1, 2, 5}
    assert ref.KEY[1].ugen == ref.G == 21


def _op(op: int, **kw: Any) -> dict[str, Any]:
    return {**dict.fromkeys(O.MOP_DTYPE.names, 0), "task": 1, "mm": -1, "mapping": -1, "pfn": -1, "op": op, **kw}


def test_cpu_sets_have_no_64_cpu_limit() -> None:
    """CPU sets, not 64-bit masks: a read-only folio of an mm on CPUs 3 and 100, reclaimed on CPU3, is deferred;
    its re-allocation on CPU 130 flushes exactly {3, 100}."""
    ref = ReferenceLufV12(parse_settings([]))
    ref.step(_op(O.M_FOLIO_BEGIN, pfn=7))
    ref.step(_op(O.M_PTE, mm=0, mask=1 << 3 | 1 << 100))
    ref.step(_op(O.M_FOLIO_END, pfn=7))
    ref.step(_op(O.M_BATCH, cpu=3, mask=1 << 100))
    ref.step(_op(O.M_FREE, cpu=3, pfn=7, sub=1))
    ref.step(_op(O.M_ALLOC, cpu=130, pfn=7, flags=O.A_CAN_SD))
    assert [(d.kind, d.cause, d.cpu, set(d.targets)) for d in ref.decisions] == [
        ("deferred", "batch", 3, {3, 100}),
        ("performed", "alloc_pcp", 130, {3, 100}),
    ]
    assert ref.ipis() == 2 and ref.violations == []


def test_unknown_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="hooks"):
        ReferenceLufV12(parse_settings([]), hooks="sometimes")
