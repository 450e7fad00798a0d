"""The ring consumer maps the ring's data area once and copies a span that wraps in two parts: a real recording
through a 16 KiB ring (which wraps hundreds of times: 72-byte slots do not divide it, so records straddle the
end) decodes every record, with nothing unknown and nothing malformed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lufreplay import open_trace, schema

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.bpf  # root + BPF: runs for real in CI (as root), never skipped
#: forks, execs, page faults and syscalls: thousands of records a second
BUSY = ["sh", "-c", "for i in $(seq 300); do ls -R /usr/lib/python3 > /dev/null; done"]


def test_small_ring_wraps_and_every_record_decodes(tmp_path: Path) -> None:
    out = tmp_path / "t"
    ring = 16384
    r = subprocess.run(
        [sys.executable, "-m", "lufreplay", "record", "-o", str(out), "--buffer-size", str(ring), "--", *BUSY],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    tr = open_trace(out, validate=True)
    m = tr.meta
    assert m["complete"] and m["buffer_size"] == ring
    wraps = m["events"] * schema.RING_SLOT.itemsize / ring
    assert wraps > 20, f"the ring wrapped only {wraps:.1f} times"
    assert m["unknown_records"] == 0
    # Reading checks every value against the schema (known enum codes, CPU ids below the host's, ...): a record
    # copied from the wrong offset would not pass.
    rows = {n: tr.table(n).num_rows for n in schema.TABLES}
    assert rows["sched"] > 0 and rows["proc"] > 0 and rows["syscall"] > 0, rows
