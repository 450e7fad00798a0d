"""A writer killed (SIGKILL) at any file operation leaves a prefix of whole segments that readers use, report
as interrupted, and that ``lufreplay repair`` cleans up without changing a single committed row."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from lufreplay import open_trace, schema
from lufreplay.jsonout import loads_strict
from lufreplay.trace.reader import TraceError
from lufreplay.trace.repair import repair

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "traces" / "compact"
NSEG = 3
sys.path.insert(0, str(Path(__file__).resolve().parent))
import crash_writer  # noqa: E402

# (kill point, manifests committed when the kill came). Operation numbers are os.replace calls of the
# writer: 1 the first meta.json, then per segment one file per table of the schema and the manifest (with 18
# tables: 20, 39, 58), then the final meta.json. "before" leaves the operation's hidden temporary file behind.
PER_SEG = len(schema.TABLES) + 1


def _manifest_op(k: int) -> int:
    """Operation number of segment ``k``'s manifest."""
    return 1 + (k + 1) * PER_SEG


FINAL_META = _manifest_op(NSEG - 1) + 1
KILLS = [
    ("1before", None),  # before the first meta.json: nothing to read
    (f"{_manifest_op(0)}before", 0),  # every table of segment 0 written, its manifest not yet renamed
    (f"{_manifest_op(0)}after", 1),  # segment 0 committed
    (f"{_manifest_op(0) + PER_SEG // 2}after", 1),  # in the middle of segment 1
    (f"{_manifest_op(NSEG - 1)}before", 2),  # during the last segment's commit (finalisation)
    (f"{FINAL_META}before", 3),  # every segment committed, the final meta.json not written
]


def _run(out: Path, kill: str) -> list[str]:
    r = subprocess.run(
        [sys.executable, str(Path(crash_writer.__file__)), str(SOURCE), str(out), str(NSEG), kill],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == (-9 if kill != "-1" else 0), r.stderr
    return Path(str(out) + ".ops").read_text().split("\n")


@pytest.fixture(scope="module")
def expected() -> list[dict[str, pa.Table]]:
    _, segs = crash_writer.split(SOURCE, NSEG)
    return segs


def _same_rows(got: pa.Table, want: pa.Table) -> None:
    """The same rows (the writer sorts each segment by time; ties may come in another order)."""
    key = [(c, "ascending") for c in want.column_names if not c.endswith("_name")]
    cols = [c for c, _ in key]
    assert got.select(cols).sort_by(key).equals(want.select(cols).sort_by(key))


def test_operation_numbers_match_the_writer(tmp_path: Path) -> None:
    ops = _run(tmp_path / "t", "-1")
    manifests = [line.split()[0] for line in ops if "commits/" in line]
    assert manifests == [str(_manifest_op(k)) for k in range(NSEG)]
    assert ops[0] == "1 meta.json" and ops[FINAL_META - 1] == f"{FINAL_META} meta.json"
    assert open_trace(tmp_path / "t").complete


@pytest.mark.parametrize(("kill", "committed"), KILLS)
def test_kill_leaves_whole_segments(
    tmp_path: Path, kill: str, committed: int | None, expected: list[dict[str, pa.Table]]
) -> None:
    out = tmp_path / "t"
    ops = _run(out, kill)
    if committed is None:
        with pytest.raises(TraceError, match=r"meta\.json: missing"):
            open_trace(out)
        return
    tr = open_trace(out)
    assert not tr.complete
    assert tr.n_segments == committed
    for name in ("tlb_flush", "shootdown", "migrate", "page", "counters"):
        for i in range(committed):
            _same_rows(tr.read_file(tr.files[name][i]), expected[i][name])
    # What the kill interrupted is reported, never read.
    killed_target = ops[-2].split()[1] if ops[-1] == "" else ops[-1].split()[1]
    remains = {str(f.relative_to(out)) for f in tr.remains}
    if kill.endswith("before") and killed_target != "meta.json":
        tmp = str(Path(killed_target).with_name(f".{Path(killed_target).name}.tmp"))
        assert tmp in remains
    uncommitted_parts = {
        str(f.relative_to(out))
        for name in schema.TABLES
        for f in (out / name).glob(schema.SEGMENT_GLOB)
        if int(f.stem.split("-")[1]) >= committed
    }
    assert uncommitted_parts <= remains
    info = tr.interruption()
    assert info is not None and info["segments_committed"] == committed
    assert "recording interrupted" in (tr.interruption_line() or "")

    # repair: the remains go, the committed rows stay byte for byte, the trace still says interrupted.
    before = {f: f.read_bytes() for fs in tr.files.values() for f in fs}
    done = repair(out)
    assert sorted(done["removed"]) == sorted(remains)
    tr2 = open_trace(out)
    assert tr2.remains == [] and tr2.n_segments == committed and not tr2.complete
    assert {f: f.read_bytes() for fs in tr2.files.values() for f in fs} == before
    assert tr2.meta["segments"] == committed and tr2.meta["repaired"]["removed"] == done["removed"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lufreplay", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )


def test_killed_trace_simulates_like_its_repaired_copy(tmp_path: Path) -> None:
    out = tmp_path / "t"
    _run(out, "46before")  # segment 1 committed, segment 2 half written
    first = _cli("info", str(out))
    assert first.returncode == 0, first.stderr
    assert "recording interrupted: 2 whole segment(s) kept" in first.stdout.splitlines()[0]
    info = loads_strict(_cli("info", str(out), "--json").stdout)
    assert info["losses"]["complete"] is False and info["losses"]["bounded"] is False
    assert info["losses"]["total"] is None  # unknown, not 0
    assert info["recording"]["interrupted"]["segments_committed"] == 2
    assert info["recording"]["uncommitted_files"]

    killed = _cli("simulate", str(out), "-m", "luf-v12", "--json")
    assert killed.returncode == 0, killed.stderr
    fixed = tmp_path / "fixed"
    shutil.copytree(out, fixed)
    assert _cli("repair", str(fixed)).returncode == 0
    repaired = _cli("simulate", str(fixed), "-m", "luf-v12", "--json")
    a, b = loads_strict(killed.stdout), loads_strict(repaired.stdout)
    assert a["trace"]["interrupted"]["segments_committed"] == 2
    assert a["losses"]["total"] is None and a["losses"]["complete"] is False
    for k in ("vanilla", "models"):
        assert a[k] == b[k]
    assert a["vanilla"]["remote_shootdowns"] > 0
    text = _cli("simulate", str(out), "-m", "luf-v12")
    assert "recording interrupted" in "\n".join(text.stdout.splitlines()[:3])
