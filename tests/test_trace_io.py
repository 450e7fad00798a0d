"""Trace writer/reader round trip and validation of malformed traces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lufreplay import open_trace, schema
from lufreplay.trace.reader import TraceError
from lufreplay.trace.writer import TraceExistsError, TraceWriter, prepare_output


def _tlb(ts: list[int], cpu: list[int]) -> dict[str, list[int]]:
    n = len(ts)
    return dict(ts_ns=ts, cpu=cpu, pid=[7] * n, tgid=[7] * n, reason=[4] * n, pages=[-1] * n)


def _write(path: Path, segments: list[dict[str, list[int]]]) -> Path:
    prepare_output(path, force=False)
    w = TraceWriter(path, {"run_id": "test"})
    for i, cols in enumerate(segments):
        w.add("tlb_flush", schema.from_columns("tlb_flush", cols))
        if i < len(segments) - 1:
            w.rotate()
    w.close({"window": {"start_ns": 0, "end_ns": 100}})
    return path


def test_round_trip(tmp_path: Path) -> None:
    p = _write(tmp_path / "t", [_tlb([30, 10, 20], [0, 1, 0]), _tlb([40, 50], [1, 0])])
    tr = open_trace(p)
    assert tr.meta["complete"] is True and tr.meta["format_version"] == schema.FORMAT_VERSION
    assert tr.n_segments == 2
    df = tr.pandas("tlb_flush")
    assert df["ts_ns"].tolist() == [10, 20, 30, 40, 50]  # sorted within segments
    assert set(df["reason_name"].astype(str)) == {"remote_send_ipi"}
    assert tr.table("shootdown").num_rows == 0  # empty tables still carry their schema
    segs = list(tr.segments(["tlb_flush"]))
    assert [s["tlb_flush"].num_rows for s in segs] == [3, 2]
    mode = os.stat(p / "tlb_flush" / schema.segment_name(0)).st_mode & 0o777
    assert mode == 0o600


def test_pandas_reads_without_lufreplay(tmp_path: Path) -> None:
    p = _write(tmp_path / "t", [_tlb([1, 2], [0, 1])])
    code = (
        "import sys, pandas as pd\n"
        f"df = pd.read_parquet({str(p / 'tlb_flush')!r})\n"
        "assert 'lufreplay' not in sys.modules\n"
        "print(len(df), list(df['reason_name'].astype(str)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "2 ['remote_send_ipi', 'remote_send_ipi']"


def test_refuses_to_clobber(tmp_path: Path) -> None:
    p = _write(tmp_path / "t", [_tlb([1], [0])])
    with pytest.raises(TraceExistsError):
        prepare_output(p, force=False)
    prepare_output(p, force=True)
    assert not list((p / "tlb_flush").glob("*.parquet"))


def test_missing_meta(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(TraceError, match=r"meta\.json: missing"):
        open_trace(tmp_path / "x")


def test_wrong_version(tmp_path: Path) -> None:
    p = _write(tmp_path / "t", [_tlb([1], [0])])
    meta = json.loads((p / "meta.json").read_text())
    meta["format_version"] = 999
    (p / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TraceError, match="format version 999 is not supported"):
        open_trace(p)


def test_missing_table(tmp_path: Path) -> None:
    p = _write(tmp_path / "t", [_tlb([1], [0])])
    for f in (p / "shootdown").glob("*.parquet"):
        f.unlink()
    with pytest.raises(TraceError, match=r"shootdown/part-000000\.parquet: missing, but committed"):
        open_trace(p)


def test_truncated_segment(tmp_path: Path) -> None:
    p = _write(tmp_path / "t", [_tlb(list(range(1000)), [0] * 1000)])
    f = p / "tlb_flush" / schema.segment_name(0)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(TraceError, match=r"part-000000\.parquet: \d+ bytes, but committed with \d+"):
        open_trace(p)


def test_time_going_backwards_across_segments(tmp_path: Path) -> None:
    p = _write(tmp_path / "t", [_tlb([100, 200], [0, 0]), _tlb([150], [0])])
    with pytest.raises(TraceError, match="timestamps go backwards on CPU 0 across segments"):
        open_trace(p)


def test_meta_recovered_from_footer(tmp_path: Path) -> None:
    """A recorder killed before its last meta.json write still leaves a readable trace."""
    p = _write(tmp_path / "t", [_tlb([1, 2], [0, 1])])
    (p / "meta.json").unlink()
    tr = open_trace(p)
    assert tr.meta["run_id"] == "test"
    assert tr.table("tlb_flush").num_rows == 2


def test_enum_names_unknown_id_is_null() -> None:
    t = schema.from_columns("tlb_flush", _tlb([1, 2], [0, 0]) | {"reason": [4, 77]})
    names = t.column("reason_name").to_pylist()
    assert names == ["remote_send_ipi", None]


def test_raw_record_layout() -> None:
    assert schema.RING_SLOT.itemsize == 72
    rec = np.zeros(1, schema.RAW_RECORD)
    assert rec.dtype.fields["kind"][1] == 18 and rec.dtype.fields["a"][1] == 24
