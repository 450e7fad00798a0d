"""Terminal output shared by every command: one-line errors with exit codes, JSON documents, rich consoles.

It sits below every command module (capture, trace, report, workloads) so none of them needs ``lufreplay.cli``,
which only parses arguments and calls down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from rich.console import Console


def error(msg: str) -> None:
    """Print the one-line error every command gives on stderr."""
    typer.echo(f"lufreplay: error: {msg}", err=True)


def fail(msg: str, code: int = 1) -> typer.Exit:
    """Print a one-line error on stderr and return the Exit to raise (its code is the process exit status)."""
    error(msg)
    return typer.Exit(code)


def emit_json(doc: object) -> None:
    """Print a machine-readable document on stdout as strict JSON (no NaN/Infinity; see lufreplay.jsonout)."""
    from lufreplay.jsonout import dumps

    typer.echo(dumps(doc))


def make_console(stderr: bool = False) -> Console:
    """The rich console a command prints its tables to (stderr for live progress that must not mix with output)."""
    from rich.console import Console  # rich is slow to import; workloads and --json never need it

    return Console(stderr=stderr)


__all__ = ["emit_json", "error", "fail", "make_console"]
