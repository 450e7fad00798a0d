"""docs/trace-format.md must be exactly what `lufreplay schema --markdown` prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lufreplay import schema

DOC = Path(__file__).resolve().parent.parent / "docs" / "trace-format.md"


def test_trace_format_doc_is_up_to_date() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lufreplay", "schema", "--markdown"], capture_output=True, text=True, check=True
    ).stdout
    assert DOC.read_text() == out, (
        "docs/trace-format.md is stale: run `lufreplay schema --markdown > docs/trace-format.md`"
    )


def test_trace_format_doc_covers_every_column() -> None:
    text = DOC.read_text()
    for t in schema.TABLES.values():
        assert f"## `{t.name}`" in text
        for c in t.columns:
            assert f"| `{c.name}` |" in text, f"{t.name}.{c.name} undocumented"
