"""Runs over many traces and option combinations (``lufreplay sweep``), on Ray."""
