"""Trace files: writing, reading, validation, and the ``info`` summary.

``open_trace(path)`` opens a trace directory; ``summarize(trace)`` is what ``lufreplay info --json`` prints.
"""

from lufreplay.trace.reader import Trace, TraceError, open_trace
from lufreplay.trace.writer import TraceExistsError, TraceWriter, prepare_output


def summarize(trace: Trace) -> dict:
    """Metadata, counts per table and enum value, losses and reconciliation (see ``lufreplay.trace.info``)."""
    from lufreplay.trace.info import summarize as _summarize

    return _summarize(trace)


__all__ = ["Trace", "TraceError", "TraceExistsError", "TraceWriter", "open_trace", "prepare_output", "summarize"]
