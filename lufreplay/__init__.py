"""lufreplay: how many TLB shootdowns would LUF (Lazy Unmap Flush) save on a recorded workload?

``open_trace(path)`` opens a trace directory made by ``lufreplay record``.
"""

from lufreplay.trace.reader import Trace, TraceError, open_trace

__version__ = "0.1.0"
__all__ = ["Trace", "TraceError", "__version__", "open_trace"]
