"""Built-in workloads: small programs that reproduce the memory behaviour LUF is about (or not).

``lufreplay workload NAME [options]``; ``lufreplay record --workload NAME`` runs the same command as
the traced process tree. Each workload documents what LUF should do on it (see docs/workloads.md).
"""

from __future__ import annotations

import importlib

#: workload name -> module implementing ``main(args: list[str]) -> int``
WORKLOADS = {
    "mmap-stream": "lufreplay.workloads.mmap_stream",
    "anon-churn": "lufreplay.workloads.anon_churn",
    "cow-fork": "lufreplay.workloads.cow_fork",
    "mixed-file": "lufreplay.workloads.mixed_file",
    "compact": "lufreplay.workloads.compact",
}


def run_workload(name: str, args: list[str]) -> int:
    """Run workload ``name`` with its own command-line ``args``; returns the exit status."""
    from lufreplay.console import fail
    from lufreplay.workloads.common import WorkloadError

    if name not in WORKLOADS:
        raise fail(f"unknown workload {name!r} (choose from {', '.join(WORKLOADS)})")
    module = importlib.import_module(WORKLOADS[name])
    try:
        return int(module.main(list(args)))
    except WorkloadError as e:
        raise fail(str(e)) from None
    except SystemExit as e:  # argparse --help
        return e.code if isinstance(e.code, int) else 0


__all__ = ["WORKLOADS", "run_workload"]
