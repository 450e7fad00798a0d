"""Trace files: writing, reading, validation."""
