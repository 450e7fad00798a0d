"""The package's import graph has no arrows back up: nothing imports the CLI, and each layer imports only below it.

The graph is read from the source with ``ast`` (every import statement, also inside functions, and every string
that names a lufreplay module, as ``importlib.import_module`` takes), so a lazy import cannot hide an arrow.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lufreplay

PKG = Path(lufreplay.__file__).resolve().parent
#: the entry points: they sit above everything and may import anything
ENTRY = {"cli", "__main__"}
#: layer -> the layers its modules may import. Data flows capture → trace → replay → model → report; the command
#: helpers (console) and the trace format (schema) sit below every layer, the CLI above all of them.
#: helpers below every layer: strict JSON, command-line value checks, numba cache upkeep
BASE = {"jsonout", "inputs", "jitcache"}
ALLOWED = {
    "__init__": {"trace"},  # ``lufreplay.open_trace``
    "jsonout": set(),
    "inputs": set(),
    "jitcache": set(),
    "console": {"jsonout"},
    "schema": set(),
    "trace": BASE | {"schema", "console"},
    "capture": BASE | {"schema", "console", "trace"},
    "workloads": BASE | {"console", "capture"},
    "model": BASE | {"schema"},
    "replay": BASE | {"schema", "trace", "model"},
    "report": BASE | {"schema", "console", "trace", "model", "replay"},
    # sweeps run the simulate library once per (trace, options) task: above report, below the CLI
    "fleet": BASE | {"schema", "console", "trace", "model", "replay", "report"},
}
MODULE_NAME = re.compile(r"lufreplay(\.[A-Za-z_][A-Za-z0-9_]*)+")


def _module(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(dotted: str, root: Path) -> bool:
    f = root.parent.joinpath(*dotted.split("."))
    return f.with_suffix(".py").is_file() or (f / "__init__.py").is_file()


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every lufreplay module ``path`` imports or names as a string."""
    module = _module(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # ``from lufreplay import cli`` imports the module lufreplay.cli
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.fullmatch(node.value):
            if _is_module(node.value, root):  # not a file name such as "lufreplay.bpf.c"
                out.append((node.lineno, node.value))
    return [(ln, m) for ln, m in out if m == root.name or m.startswith(root.name + ".")]


def _layer(dotted: str, root_name: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == root_name else "__init__"


def violations(root: Path) -> list[str]:
    """Every import of the CLI from inside the package, and every import of a layer not below the importer."""
    out: dict[tuple[str, str], str] = {}  # one per (line, layer imported)
    for path in sorted(root.rglob("*.py")):
        me = _module(path, root)
        layer = _layer(me, root.name)
        if layer in ENTRY:
            continue
        for line, target in imports_of(path, root):
            where = f"{path.relative_to(root.parent)}:{line}"
            tl = _layer(target, root.name)
            if tl in ENTRY:
                out.setdefault((where, tl), f"{where} imports {target} (the CLI calls down; nothing calls up into it)")
            elif tl != layer and tl != "__init__" and tl not in ALLOWED.get(layer, set()):
                out.setdefault((where, tl), f"{where}: layer {layer} imports {target} ({tl} is not below {layer})")
    return list(out.values())


def test_no_module_imports_the_cli_and_layers_import_only_down() -> None:
    assert violations(PKG) == []


def test_every_layer_is_known() -> None:
    """A new top-level module or package must be placed in ALLOWED (or the check would not see its arrows)."""
    names = {
        p.stem if p.is_file() else p.name for p in PKG.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert names - ENTRY - set(ALLOWED) == set()


def _write(root: Path, rel: str, text: str) -> None:
    f = root / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)


def test_the_check_finds_arrows_back_up(tmp_path: Path) -> None:
    """The same check on a package with one arrow of each hidden kind reports every one of them."""
    root = tmp_path / "lufreplay"
    _write(root, "__init__.py", "")
    _write(root, "cli.py", "from lufreplay.report import html\n")  # allowed: the CLI calls down
    _write(root, "console.py", "")
    _write(root, "trace/__init__.py", "")
    _write(root, "trace/info.py", "def run():\n    from lufreplay.cli import fail\n")
    _write(root, "trace/reader.py", "from .. import cli\n")
    _write(root, "capture/__init__.py", "")
    _write(root, "capture/doctor.py", "import importlib\nimportlib.import_module('lufreplay.cli')\n")
    _write(root, "capture/recorder.py", "from lufreplay.trace.writer import x\nfrom lufreplay.console import fail\n")
    _write(root, "report/__init__.py", "")
    _write(root, "report/html.py", "import lufreplay.cli as c\nfrom lufreplay.replay import engine\n")
    _write(root, "model/__init__.py", "")
    _write(root, "model/base.py", "from lufreplay.replay.engine import replay\n")
    found = violations(root)
    assert len(found) == 5, found
    for where in ("trace/info.py:2", "trace/reader.py:1", "capture/doctor.py:2", "report/html.py:1"):
        assert any(v.startswith(f"lufreplay/{where} imports lufreplay.cli") for v in found), (where, found)
    assert any(v.startswith("lufreplay/model/base.py:1: layer model imports lufreplay.replay.engine") for v in found)


def test_an_edited_jitted_source_drops_the_numba_cache(tmp_path: Path, monkeypatch) -> None:
    """numba re-checks only a function's own file: an edit to a helper module must drop every cached core."""
    from lufreplay import jitcache

    pkg = tmp_path / "lufreplay"
    for sub in jitcache.JIT_PACKAGES:
        (pkg / sub / "__pycache__").mkdir(parents=True)
        (pkg / sub / "rules.py").write_text("X = 1\n")
        (pkg / sub / "__pycache__" / "core.run-10.py311.1.nbc").write_bytes(b"old")
        (pkg / sub / "__pycache__" / "core.run-10.py311.nbi").write_bytes(b"old")
    monkeypatch.setattr(jitcache, "_ROOT", pkg)
    monkeypatch.setattr(jitcache, "_STAMP", pkg / "__pycache__" / "numba-sources.sha1")
    cached = lambda: sorted(p.name for p in pkg.rglob("*.nb[ic]"))  # noqa: E731
    jitcache.check()  # no stamp yet: whatever is cached may be stale
    assert cached() == []
    (pkg / "model" / "__pycache__" / "core.run-10.py311.1.nbc").write_bytes(b"new")
    jitcache.check()  # same sources: the cache stays
    assert cached() == ["core.run-10.py311.1.nbc"]
    (pkg / "replay" / "rules.py").write_text("X = 2\n")
    jitcache.check()  # one helper edited: every cached function goes
    assert cached() == []
