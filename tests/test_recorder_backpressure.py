"""The recorder's writer thread holds at most ``max_queued`` bytes of raw records waiting: when it falls behind
(a busy host), ``put_raw`` waits, so the backlog stays in the kernel's ring (which counts what it drops as
losses) instead of growing the recorder's memory (issue 10 item 8)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from lufreplay import schema
from lufreplay.capture import decode
from lufreplay.capture.recorder import SegmentWriter
from lufreplay.trace.writer import TraceWriter


def test_put_raw_waits_while_the_writer_is_behind(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "t", {"run_id": "backpressure"})
    gate = threading.Event()
    real_rotate = w.rotate

    def gated_rotate() -> None:  # the writer is stuck writing a segment until the gate opens
        gate.wait()
        real_rotate()

    w.rotate = gated_rotate  # type: ignore[method-assign]
    recs = np.zeros(100, dtype=schema.RAW_RECORD)
    recs["kind"] = 255  # no decoder: counted as unknown, so the test needs no table contents
    n = recs.nbytes
    seg = SegmentWriter(w, decode.DecodeContext(), start_ns=0, segment_ns=10**9, max_queued=2 * n)
    seg.start()
    seg.put_raw(recs, 2 * 10**9)  # past the first segment's end: the writer takes it and blocks in rotate

    def poller() -> None:
        for _ in range(3):
            seg.put_raw(recs.copy(), 2 * 10**9)

    t = threading.Thread(target=poller)
    t.start()
    t.join(timeout=1.0)
    # The writer cannot take anything while the gate is shut, so the third put cannot have returned.
    assert t.is_alive() and seg.queued == 2 * n
    gate.set()
    t.join(timeout=120)
    assert not t.is_alive()
    seg.finish()
    seg.join(timeout=120)
    assert seg.error is None and seg.queued == 0
    assert seg.events == 400 and seg.unknown == 400 and seg.blocked_s > 0
