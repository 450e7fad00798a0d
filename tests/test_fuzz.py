"""Fuzz the trace boundary: hostile mutants of a real recording must give exit 0 with a correct result or a
clean one-line error from ``info --json`` and ``simulate --json``; never a traceback, a hang or a crash.

A seeded generator rather than hypothesis: the mutants are file-level edits whose oracle is the same for
every input, so shrinking buys little, while a fixed seed gives the same ≥ 300 mutants on every run (no
example database, no run-to-run variation in CI time). Each mutant is (base, mutator, seed): a failing
one is reproduced from those three and kept in ``tests/fuzz_corpus/cases.json``, which runs first. The
corpus holds the mutants that failed on lufreplay before issue 10 (a traceback, NaN/Infinity in --json)
and the hand-written inputs issue 10 lists (target_cpu 65535, meta.json ``[]``, ``host: "x"``, ...);
no mutant has failed on the current code yet.

Mutants run in-process through the real Typer app (CliRunner: the same exception handling as the CLI);
a few run through ``python -m lufreplay`` as well. ``faulthandler`` kills the run on a hang.
"""

from __future__ import annotations

import faulthandler
import functools
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer.testing
from typer.testing import CliRunner

from lufreplay import open_trace, schema
from lufreplay.cli import app
from lufreplay.jsonout import loads_strict
from lufreplay.trace import writer as W

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "traces" / "mmap-stream"
WINDOW = (4_233_900_000_000, 4_234_000_000_000)  # 0.1 s of reclaim, unmaps and 608 remote shootdowns
SEED = 20261203
N_MUTANTS = int(os.environ.get("LUFREPLAY_FUZZ_MUTANTS", "300"))
HANG_S = 300  # per command; far above the ~1 s a mutant takes on a busy 2-vCPU box
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus" / "cases.json"
MODELS = ["-m", "vanilla", "-m", "luf-v12"]


# --------------------------------------------------------------------------------------------------
# Base traces: a short window of a bundled recording, in the current format and in the format written
# before commit manifests existed (meta.json ``segments`` as the commit record).
# --------------------------------------------------------------------------------------------------


def _make_base(out: Path, legacy: bool) -> Path:
    tr = open_trace(SOURCE)
    keep = ("run_id", "host", "clock", "tool_version", "enums", "raw_kinds", "window", "losses", "stop_reason")
    w = W.TraceWriter(out, {k: v for k, v in tr.meta.items() if k in keep})
    edges = np.linspace(*WINDOW, 3).astype(np.int64)
    for i in range(2):
        for n in schema.TABLES:
            t = tr.table(n)
            if n in schema.USER_TABLES:
                if i == 0:
                    w.add(n, t)
                continue
            ts = t.column("ts_ns").to_numpy()
            w.add(n, t.filter(pa.array((ts >= edges[i]) & (ts < edges[i + 1]))))
        if i == 0:
            w.rotate()
    w.close({})
    if legacy:
        shutil.rmtree(out / schema.COMMIT_DIR)
        meta = json.loads((out / schema.META_FILE).read_text())
        del meta["segment_manifests"]
        (out / schema.META_FILE).write_text(json.dumps(meta))
    return out


# --------------------------------------------------------------------------------------------------
# Mutators: (rng, trace dir) -> True when the mutant must give the base's results exactly
# --------------------------------------------------------------------------------------------------

Mutator = Callable[[np.random.Generator, Path], bool]
MUTATORS: dict[str, Mutator] = {}


def mutator(fn: Mutator) -> Mutator:
    MUTATORS[fn.__name__] = fn
    return fn


def _parts(d: Path) -> list[Path]:
    return sorted(f for n in schema.TABLES for f in (d / n).glob(schema.SEGMENT_GLOB))


def _pick(rng: np.random.Generator, seq: list[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _nonempty(rng: np.random.Generator, d: Path, kernel_only: bool = False) -> tuple[Path, pa.Table]:
    fs = [
        f
        for f in _parts(d)
        if pq.read_metadata(f).num_rows and (not kernel_only or f.parent.name in schema.KERNEL_TABLES)
    ]
    f = _pick(rng, fs)
    return f, pq.read_table(f)


def _rewrite(d: Path, f: Path, t: pa.Table) -> None:
    """Replace a segment file and re-commit it (manifest rows and bytes), so only deeper checks can catch it."""
    pq.write_table(t, f, compression="zstd")
    m = d / schema.COMMIT_DIR / schema.commit_name(int(f.stem.split("-")[1]))
    if m.is_file():
        doc = json.loads(m.read_text())
        doc["tables"][f.parent.name].update(rows=t.num_rows, bytes=f.stat().st_size)
        m.write_text(json.dumps(doc))


def _set(t: pa.Table, col: str, rows: np.ndarray, value: int) -> pa.Table:
    i = t.schema.get_field_index(col)
    field = t.schema.field(i)
    v = t.column(col).to_numpy().copy()
    info = np.iinfo(v.dtype)
    v[rows] = min(max(value, info.min), info.max)
    return t.set_column(i, field, pa.array(v, field.type))


def _int_columns(t: pa.Table) -> list[str]:
    return [f.name for f in t.schema if pa.types.is_integer(f.type)]


@mutator
def bit_flips(rng: np.random.Generator, d: Path) -> bool:
    f = _pick(rng, _parts(d))
    b = bytearray(f.read_bytes())
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(len(b)))
        b[i] ^= 1 << int(rng.integers(8))
    f.write_bytes(bytes(b))
    return False


@mutator
def truncate(rng: np.random.Generator, d: Path) -> bool:
    f = _pick(rng, _parts(d))
    b = f.read_bytes()
    f.write_bytes(b[: int(rng.integers(len(b)))])
    if rng.random() < 0.5:  # re-commit the short file: the Parquet reader must catch it
        m = d / schema.COMMIT_DIR / schema.commit_name(int(f.stem.split("-")[1]))
        if m.is_file():
            doc = json.loads(m.read_text())
            doc["tables"][f.parent.name]["bytes"] = f.stat().st_size
            m.write_text(json.dumps(doc))
    return False


@mutator
def shuffle_rows(rng: np.random.Generator, d: Path) -> bool:
    f, t = _nonempty(rng, d)
    _rewrite(d, f, t.take(pa.array(rng.permutation(t.num_rows))))
    return False


@mutator
def duplicate_rows(rng: np.random.Generator, d: Path) -> bool:
    f, t = _nonempty(rng, d)
    extra = t.take(pa.array(rng.integers(0, t.num_rows, int(rng.integers(1, t.num_rows + 1)))))
    both = pa.concat_tables([t, extra])
    _rewrite(d, f, both.sort_by(schema.TABLES[f.parent.name].sort_by) if rng.random() < 0.7 else both)
    return False


@mutator
def out_of_range_value(rng: np.random.Generator, d: Path) -> bool:
    f, t = _nonempty(rng, d)
    col = _pick(rng, _int_columns(t))
    rows = rng.integers(0, t.num_rows, int(rng.integers(1, 4)))
    value = int(_pick(rng, [2**63 - 1, 2**31, 2**16 - 1, 2**15, 255, 1 << 40, 1 << 52, -(2**63), -2, -1]))
    _rewrite(d, f, _set(t, col, rows, value))
    return False


@mutator
def negative_value(rng: np.random.Generator, d: Path) -> bool:
    f, t = _nonempty(rng, d)
    cols = [c for c in _int_columns(t) if pa.types.is_signed_integer(t.schema.field(c).type)]
    col = _pick(rng, cols)
    _rewrite(d, f, _set(t, col, rng.integers(0, t.num_rows, 1), -int(rng.integers(1, 1 << 20))))
    return False


@mutator
def unknown_enum_code(rng: np.random.Generator, d: Path) -> bool:
    fs = [f for f in _parts(d) if pq.read_metadata(f).num_rows and schema.TABLES[f.parent.name].enum_columns]
    f = _pick(rng, fs)
    t = pq.read_table(f)
    c = _pick(rng, schema.TABLES[f.parent.name].enum_columns)
    _rewrite(d, f, _set(t, c.name, rng.integers(0, t.num_rows, 1), max(c.enum) + int(rng.integers(1, 200))))
    return False


@mutator
def cpu_past_host(rng: np.random.Generator, d: Path) -> bool:
    fs = [f for f in _parts(d) if pq.read_metadata(f).num_rows and f.parent.name in schema.KERNEL_TABLES]
    f = _pick(rng, fs)
    t = pq.read_table(f)
    col = "target_cpu" if "target_cpu" in t.column_names and rng.random() < 0.5 else "cpu"
    _rewrite(d, f, _set(t, col, rng.integers(0, t.num_rows, 1), int(rng.integers(2, 65536))))
    return False


@mutator
def broken_meta(rng: np.random.Generator, d: Path) -> bool:
    mf = d / schema.META_FILE
    b = mf.read_bytes()
    choice = int(rng.integers(4))
    if choice == 0:
        mf.write_bytes(b[: int(rng.integers(len(b)))])
    elif choice == 1:
        mf.write_bytes(rng.bytes(int(rng.integers(1, 200))))
    elif choice == 2:
        mf.write_bytes(b"")
    else:
        mf.unlink()
        mf.mkdir()  # a directory where the file should be
    return False


WRONG = [[], {}, "x", "1", 1.5, -1, 0, None, True, 2**70, [1, 2], {"a": 1}]


@mutator
def wrongly_typed_meta(rng: np.random.Generator, d: Path) -> bool:
    mf = d / schema.META_FILE
    meta = json.loads(mf.read_text())
    if rng.random() < 0.15:
        meta = _pick(rng, [[], "x", 1, None, [meta]])
    else:
        key = _pick(rng, [k for k in schema.META_FIELDS if k.split(".")[0] in meta])
        parent = meta
        *path, last = key.split(".")
        for p in path:
            parent = parent[p] if isinstance(parent.get(p), dict) else {}
        parent[last] = _pick(rng, WRONG)
    mf.write_text(json.dumps(meta))
    return False


@mutator
def meta_nr_cpus(rng: np.random.Generator, d: Path) -> bool:
    mf = d / schema.META_FILE
    meta = json.loads(mf.read_text())
    meta["host"]["nr_cpus"] = _pick(rng, [0, -1, 1, 3, 64, 65, 100_000, 2**40, 1.5, "2", None])
    mf.write_text(json.dumps(meta))
    return False


@mutator
def meta_drop_field(rng: np.random.Generator, d: Path) -> bool:
    mf = d / schema.META_FILE
    meta = json.loads(mf.read_text())
    del meta[_pick(rng, sorted(meta))]
    mf.write_text(json.dumps(meta))
    return False


@mutator
def meta_extra_field(rng: np.random.Generator, d: Path) -> bool:
    mf = d / schema.META_FILE
    meta = json.loads(mf.read_text())
    meta[f"x_unknown_{int(rng.integers(1000))}"] = _pick(rng, WRONG)
    mf.write_text(json.dumps(meta, indent=int(rng.integers(0, 3))))
    return True


@mutator
def missing_column(rng: np.random.Generator, d: Path) -> bool:
    f = _pick(rng, _parts(d))
    t = pq.read_table(f)
    _rewrite(d, f, t.drop_columns([_pick(rng, t.column_names)]))
    return False


@mutator
def extra_column(rng: np.random.Generator, d: Path) -> bool:
    f = _pick(rng, _parts(d))
    t = pq.read_table(f)
    _rewrite(d, f, t.append_column("x_extra", pa.array(rng.integers(0, 9, t.num_rows))))
    return False


@mutator
def retyped_column(rng: np.random.Generator, d: Path) -> bool:
    f = _pick(rng, _parts(d))
    t = pq.read_table(f)
    col = _pick(rng, _int_columns(t))
    i = t.schema.get_field_index(col)
    new = _pick(rng, [pa.int32(), pa.int64(), pa.float64(), pa.string(), pa.uint64()])
    _rewrite(d, f, t.set_column(i, pa.field(col, new), t.column(col).cast(new, safe=False)))
    return False


@mutator
def nulls_in_column(rng: np.random.Generator, d: Path) -> bool:
    f, t = _nonempty(rng, d)
    col = _pick(rng, _int_columns(t))
    i = t.schema.get_field_index(col)
    mask = np.zeros(t.num_rows, bool)
    mask[int(rng.integers(t.num_rows))] = True
    arr = pa.array(t.column(col).to_numpy(), t.schema.field(i).type, mask=mask)
    _rewrite(d, f, t.set_column(i, pa.field(col, arr.type, nullable=True), arr))
    return False


@mutator
def missing_table(rng: np.random.Generator, d: Path) -> bool:
    shutil.rmtree(d / _pick(rng, list(schema.TABLES)))
    return False


@mutator
def missing_segment_file(rng: np.random.Generator, d: Path) -> bool:
    _pick(rng, _parts(d)).unlink()
    return False


@mutator
def swapped_tables(rng: np.random.Generator, d: Path) -> bool:
    a, b = rng.choice(_parts(d), 2, replace=False)
    ta, tb = Path(a).read_bytes(), Path(b).read_bytes()
    Path(a).write_bytes(tb)
    Path(b).write_bytes(ta)
    return False


@mutator
def segment_copied_over_next(rng: np.random.Generator, d: Path) -> bool:
    n = _pick(rng, list(schema.KERNEL_TABLES))
    f0, f1 = d / n / schema.segment_name(0), d / n / schema.segment_name(1)
    _rewrite(d, f1, pq.read_table(f0))
    return False


@mutator
def extra_files(rng: np.random.Generator, d: Path) -> bool:
    """Junk the reader must ignore: an unknown table, a stray file, an uncommitted segment."""
    choice = int(rng.integers(3))
    if choice == 0:
        (d / "x_unknown_table").mkdir()
        shutil.copy(_pick(rng, _parts(d)), d / "x_unknown_table" / schema.segment_name(0))
    elif choice == 1:
        (d / _pick(rng, list(schema.TABLES)) / "notes.txt").write_bytes(rng.bytes(64))
    else:
        n = _pick(rng, list(schema.TABLES))
        shutil.copy(d / n / schema.segment_name(0), d / n / schema.segment_name(7))
    return True


@mutator
def broken_manifest(rng: np.random.Generator, d: Path) -> bool:
    ms = sorted((d / schema.COMMIT_DIR).glob(schema.COMMIT_GLOB)) if (d / schema.COMMIT_DIR).is_dir() else []
    if not ms:  # legacy base: damage its commit record instead
        mf = d / schema.META_FILE
        meta = json.loads(mf.read_text())
        meta["segments"] = int(rng.integers(-1, 5))
        mf.write_text(json.dumps(meta))
        return False
    m = _pick(rng, ms)
    choice = int(rng.integers(4))
    if choice == 0:
        m.write_bytes(m.read_bytes()[: int(rng.integers(m.stat().st_size))])
    elif choice == 1:
        m.unlink()
    else:
        doc = json.loads(m.read_text())
        t = _pick(rng, sorted(doc["tables"]))
        key = _pick(rng, ["rows", "bytes", "file"])
        doc["tables"][t][key] = _pick(rng, [*WRONG, doc["tables"][t].get(key, 0)])
        m.write_text(json.dumps(doc))
    return False


# --------------------------------------------------------------------------------------------------
# Running a mutant and judging the outcome
# --------------------------------------------------------------------------------------------------

runner = CliRunner()
# The app does not change between mutants: build its click command once (~0.1 s a call on a busy box,
# 2 calls per mutant) instead of on every invoke.
typer.testing._get_command = functools.lru_cache(maxsize=None)(typer.testing._get_command)  # type: ignore[attr-defined]


def _invoke(args: list[str]) -> tuple[str, Any]:
    """('ok', strict JSON document) or ('error', message); raises AssertionError on a traceback."""
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    try:
        r = runner.invoke(app, args)
    finally:
        faulthandler.cancel_dump_traceback_later()
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(r.exception))
        raise AssertionError(f"{' '.join(args)}: traceback\n{tb}")
    if r.exit_code == 0:
        return "ok", loads_strict(r.stdout)
    err = r.stderr.strip().splitlines()
    assert r.exit_code in (1, 2), (args, r.exit_code, r.stderr)
    assert len(err) == 1 and err[0].startswith("lufreplay: error: "), (args, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == "", (args, r.stdout[:300])
    return "error", err[0]


def _results(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc[k] for k in ("vanilla", "models", "fidelity") if k in doc}


def apply_edit(d: Path, edit: dict[str, Any]) -> bool:
    """A hand-written corpus case: one cell of a table, or meta.json (whole, or one field)."""
    mf = d / schema.META_FILE
    if "table" in edit:
        f = d / edit["table"] / schema.segment_name(0)
        t = pq.read_table(f)
        _rewrite(d, f, _set(t, edit["column"], np.array([edit["row"]]), edit["value"]))
    elif "meta" in edit:
        mf.write_text(json.dumps(edit["meta"]))
    else:
        meta = json.loads(mf.read_text())
        meta[edit["meta_field"]] = edit["value"]
        mf.write_text(json.dumps(meta))
    return False


def run_mutant(
    base: Path, base_sim: dict[str, Any], name: str, seed: int, work: Path, edit: dict[str, Any] | None = None
) -> str:
    d = work / f"{name}-{seed}"
    shutil.copytree(base, d)
    neutral = apply_edit(d, edit) if edit is not None else MUTATORS[name](np.random.default_rng(seed), d)
    outcomes = []
    for cmd in (["info", str(d), "--json"], ["simulate", str(d), "--json", *MODELS]):
        kind, doc = _invoke(cmd)
        outcomes.append(kind)
        if kind == "ok" and cmd[0] == "simulate":
            van = doc["vanilla"]
            assert sum(van["by_cause"].values()) == van["remote_shootdowns"], (name, seed)
            for m in doc["models"].values():
                assert sum(m["by_cause"].values()) == m["remote_shootdowns"], (name, seed)
            if neutral:
                assert _results(doc) == base_sim, (name, seed)
        if kind == "ok" and cmd[0] == "info":
            assert doc["recording"]["complete"] is (doc["losses"]["total"] is not None), (name, seed)
    if neutral:
        assert outcomes == ["ok", "ok"], (name, seed, outcomes)
    shutil.rmtree(d)
    return "+".join(outcomes)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("fuzz-bases")
    out = {}
    for legacy in (False, True):
        b = _make_base(root / ("legacy" if legacy else "current"), legacy)
        kind, doc = _invoke(["simulate", str(b), "--json", *MODELS])
        assert kind == "ok"
        out["legacy" if legacy else "current"] = (b, _results(doc))
    assert out["legacy"][1] == out["current"][1]
    assert out["current"][1]["vanilla"]["remote_shootdowns"] > 500
    return out


def _mutants(n: int) -> list[tuple[str, str, int]]:
    """n (base, mutator, seed) triples: every mutator on both bases in turn, seeds from one generator."""
    rng = np.random.default_rng(SEED)
    names = sorted(MUTATORS)
    return [
        ("current" if i % 2 == 0 else "legacy", names[(i // 2) % len(names)], int(rng.integers(2**31)))
        for i in range(n)
    ]


def test_corpus_of_cases_that_once_failed(bases: dict[str, Any], tmp_path: Path) -> None:
    cases = json.loads(CORPUS.read_text())
    assert cases, "the corpus keeps every mutant that ever failed"
    outcomes = []
    for i, c in enumerate(cases):
        base, sim = bases[c["base"]]
        if "edit" in c:
            outcomes.append(run_mutant(base, sim, "edit", i, tmp_path, edit=c["edit"]))
        else:
            outcomes.append(run_mutant(base, sim, c["mutator"], c["seed"], tmp_path))
    # Every hand-written case is hostile input: a clean error from both commands now.
    assert all(o == "error+error" for o, c in zip(outcomes, cases, strict=True) if "edit" in c), outcomes


def test_fuzz_mutants(bases: dict[str, Any], tmp_path: Path) -> None:
    counts: Counter[str] = Counter()
    by_mutator: dict[str, Counter[str]] = {}
    for base_name, name, seed in _mutants(N_MUTANTS):
        base, sim = bases[base_name]
        try:
            outcome = run_mutant(base, sim, name, seed, tmp_path)
        except AssertionError as e:
            raise AssertionError(
                f"mutant base={base_name} mutator={name} seed={seed} failed (add it to {CORPUS.name}): {e}"
            ) from None
        counts[outcome] += 1
        by_mutator.setdefault(name, Counter())[outcome] += 1
    print(f"\nfuzz: {N_MUTANTS} mutants: {dict(counts)}")
    for name, c in sorted(by_mutator.items()):
        print(f"  {name}: {dict(c)}")
    assert sum(counts.values()) == N_MUTANTS >= 300 or N_MUTANTS < 300
    # The generator must exercise both outcomes: hostile input rejected, harmless input accepted.
    assert counts["error+error"] > N_MUTANTS // 4 and counts["ok+ok"] > N_MUTANTS // 20


@pytest.mark.parametrize("i", range(2))
def test_fuzz_mutants_through_the_real_cli(bases: dict[str, Any], tmp_path: Path, i: int) -> None:
    base_name, name, seed = _mutants(N_MUTANTS)[i * 37 % N_MUTANTS]
    d = tmp_path / "m"
    shutil.copytree(bases[base_name][0], d)
    MUTATORS[name](np.random.default_rng(seed), d)
    for cmd in (["info", str(d), "--json"], ["simulate", str(d), "--json", *MODELS]):
        r = subprocess.run(
            [sys.executable, "-m", "lufreplay", *cmd],
            capture_output=True,
            text=True,
            timeout=HANG_S,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        assert r.returncode in (0, 1, 2) and "Traceback" not in r.stderr, (name, seed, r.stderr[-2000:])
        if r.returncode == 0:
            loads_strict(r.stdout)
        else:
            assert len(r.stderr.strip().splitlines()) == 1, (name, seed, r.stderr)
