"""``lufreplay repair``: remove an interrupted recording's uncommitted remains and finalise meta.json.

The committed segments are left byte for byte as they are, so ``simulate`` gives the same answer before and
after. meta.json keeps ``complete: false`` (the recording did not finish and its later losses stay unknown)
and gains ``segments``, ``rows`` from the commit manifests and a ``repaired`` record of what was removed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lufreplay import schema
from lufreplay.trace.reader import TraceError, open_trace
from lufreplay.trace.writer import write_meta


def repair(path: Path) -> dict[str, Any]:
    """Repair the trace at ``path``; returns what was done. Raises TraceError when it cannot be read."""
    tr = open_trace(path)
    removed = [str(f.relative_to(tr.path)) for f in tr.remains]
    for f in tr.remains:
        f.unlink(missing_ok=True)
    changed = bool(removed) or not (tr.path / schema.META_FILE).is_file()
    if tr.manifests:
        rows = {name: 0 for name in schema.TABLES}
        for m in tr.manifests:
            for name, e in m["tables"].items():
                rows[name] += e["rows"]
        changed |= tr.meta.get("segments") != tr.n_segments or tr.meta.get("rows") != rows
    else:
        import pyarrow.parquet as pq

        rows = {name: sum(pq.read_metadata(f).num_rows for f in tr.files.get(name, [])) for name in schema.TABLES}
    interrupted = tr.interruption()
    if changed or (interrupted and "interrupted" not in tr.meta):
        meta = dict(tr.meta)
        meta["segments"] = tr.n_segments
        meta["rows"] = rows
        if interrupted is not None:
            meta["complete"] = False
            meta["interrupted"] = {k: v for k, v in interrupted.items() if k not in ("remains", "repaired")}
            meta["repaired"] = {"at": time.time(), "removed": removed}
        write_meta(tr.path, meta)
    return {
        "trace": str(tr.path),
        "complete": tr.complete,
        "segments": tr.n_segments,
        "removed": removed,
        "meta_rewritten": bool(changed or (interrupted and "interrupted" not in tr.meta)),
    }


def run_repair(path: Path, json_out: bool) -> int:
    """The CLI command: exit 0 when the trace is readable afterwards, 2 when it cannot be read."""
    from lufreplay.console import emit_json, fail

    try:
        out = repair(path)
    except TraceError as e:
        raise fail(str(e), 2) from None
    except OSError as e:
        raise fail(f"{e.filename or path}: {e.strerror or e}", 2) from None
    if json_out:
        emit_json(out)
    else:
        state = "complete recording" if out["complete"] else "interrupted recording"
        print(
            f"lufreplay: {out['trace']}: {state}, {out['segments']} committed segment(s) kept;"
            f" {len(out['removed'])} uncommitted file(s) removed"
        )
    return 0
