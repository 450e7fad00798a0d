"""Every LUF core's loop ends each op at the shared loop head (``rmap.next_op``): a ``continue`` in the loop would
skip it, and the replay would spin on one op forever. Read from the source with ``ast``."""

from __future__ import annotations

import ast
import inspect

import pytest

from lufreplay.model import hold_before_free, luf_v11, luf_v12, oracle

CORES = [
    (luf_v12, "run_luf_v12"),
    (luf_v11, "run_luf_v11"),
    (hold_before_free, "run_hbf"),
    (oracle, "run_oracle"),
]


def _function(module: object, name: str) -> ast.FunctionDef:
    tree = ast.parse(inspect.getsource(module))
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def _loop_continues(node: ast.AST) -> list[int]:
    """Lines of the ``continue`` statements that belong to ``node``'s loop (not to a loop nested in it)."""
    out = []
    for ch in ast.iter_child_nodes(node):
        if isinstance(ch, ast.Continue):
            out.append(ch.lineno)
        elif not isinstance(ch, ast.For | ast.While | ast.FunctionDef):
            out += _loop_continues(ch)
    return out


def _calls(node: ast.AST) -> set[str]:
    return {
        c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "")
        for c in ast.walk(node)
        if isinstance(c, ast.Call)
    }


@pytest.mark.parametrize(("module", "name"), CORES, ids=[n for _, n in CORES])
def test_core_loop_ends_every_op_at_next_op(module: object, name: str) -> None:
    (loop,) = [n for n in _function(module, name).body if isinstance(n, ast.While)]
    assert _loop_continues(loop) == [], f"{name}: a continue skips rmap.next_op"
    last = loop.body[-1]
    assert isinstance(last, ast.Assign) and last.targets[0].id == "i"  # type: ignore[attr-defined]
    called = _calls(last)
    # hold-before-free's _walk is next_op plus its held-pages timeline
    assert "next_op" in called or ("_walk" in called and "next_op" in _calls(_function(module, "_walk"))), ast.dump(
        last
    )


def test_the_check_finds_a_continue() -> None:
    src = "while i < n:\n    if x:\n        continue\n    for k in r:\n        continue\n    i = f(i)\n"
    assert _loop_continues(ast.parse(src).body[0]) == [3]
