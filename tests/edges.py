"""The check both real-recording reconciliation tests make of ``info``'s ``read_edges`` (shared, not a test)."""

from __future__ import annotations

from typing import Any

#: Per CPU, how far the kernel's TLB count may lie above the interval the read edges explain.
#: Measured on this 2-vCPU host (2026-12-03): 0-3 above in every recording (0-1 on a quiet host, 1-2 with a
#: CPU + memory hog, 3 twice in a CI run beside three other jobs), never below. `perf record` of
#: csd:csd_queue_cpu and csd:csd_function_entry beside `lufreplay record` saw as many flushes queued and run
#: between the reads as the recorder recorded: the kernel counted a remote flush that neither event showed.
#: Unidentified, so allowed with a margin rather than explained; a recorder that lost shootdowns would fall
#: far outside it.
ABOVE = 6
#: Below the interval would mean recorded shootdowns the kernel never ran: not seen, so barely allowed.
BELOW = 2


def assert_edges_explained(edges: dict[str, Any]) -> None:
    """The kernel's per-CPU TLB delta lies within the read-edge interval, up to the slack above."""
    assert all(-BELOW <= u <= ABOVE for u in edges["unexplained"]), edges
