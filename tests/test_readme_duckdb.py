"""The README's DuckDB example runs as written (DuckDB alone, no lufreplay) and agrees with pyarrow."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent


def readme_sql() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("### The trace in DuckDB SQL", 1)[1]
    m = re.search(r"```sql\n(.*?)```", section, re.S)
    assert m, "no ```sql block under 'The trace in DuckDB SQL'"
    return m.group(1)


def test_readme_sql_counts_every_shootdown(monkeypatch: pytest.MonkeyPatch) -> None:
    sql = readme_sql()
    monkeypatch.chdir(REPO)  # the example's paths are relative to a clone
    con = duckdb.connect()
    rows = con.sql(sql).fetchall()
    cols = [d[0] for d in con.sql(sql).description]
    assert cols == ["target_cpu", "tgid", "ipis", "sends"]
    path = re.search(r"FROM '([^']+)/\*\.parquet'", sql).group(1)  # type: ignore[union-attr]
    t = pq.read_table(sorted((REPO / path).glob("*.parquet"))).to_pylist()
    assert len(t) > 0
    want = collections.Counter((r["target_cpu"], r["tgid"]) for r in t)
    sends = collections.defaultdict(set)
    for r in t:
        sends[(r["target_cpu"], r["tgid"])].add(r["ts_ns"])
    assert {(c, g): n for c, g, n, _ in rows} == dict(want)
    assert {(c, g): s for c, g, _, s in rows} == {k: len(v) for k, v in sends.items()}
    assert [n for *_, n, _ in rows] == sorted((n for *_, n, _ in rows), reverse=True)
