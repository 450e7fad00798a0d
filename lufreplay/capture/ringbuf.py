"""Bulk consumer of a BPF ring buffer: mmap the map fd and decode whole spans with numpy.

Layout (kernel/bpf/ringbuf.c): page 0 holds consumer_pos (RW for userspace); page 1 holds producer_pos;
the data area follows (the kernel maps it twice back to back so a wrapping record is contiguous; this
consumer maps it once and copies a wrapping span in two parts: the second mapping would count the whole
ring a second time in the recorder's RSS, as the kernel populates it at mmap). Each
record has an 8-byte header whose ``rb_len`` carries BUSY (bit 31: still being written) and DISCARD
(bit 30). All records here have the same size, so a span is one ``numpy.frombuffer`` of ``RING_SLOT``.
"""

from __future__ import annotations

import mmap

import numpy as np

from lufreplay import schema

BUSY_BIT = np.uint32(1 << 31)
DISCARD_BIT = np.uint32(1 << 30)
LEN_MASK = np.uint32((1 << 30) - 1)


class RingBufferError(Exception):
    """The ring holds something other than lufreplay records."""


class RingConsumer:
    """Consume fixed-size records from a BPF_MAP_TYPE_RINGBUF map fd without a callback per event."""

    def __init__(self, map_fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring size must be a power of two, not {size}")
        self.size = size
        self.page = mmap.PAGESIZE
        self.slot = schema.RING_SLOT.itemsize
        self._cons_map = mmap.mmap(map_fd, self.page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod_map = mmap.mmap(map_fd, self.page + size, mmap.MAP_SHARED, mmap.PROT_READ, offset=self.page)
        self._cons = np.frombuffer(self._cons_map, dtype=np.uint64, count=1)
        self._prod = np.frombuffer(self._prod_map, dtype=np.uint64, count=1)
        self._data = np.frombuffer(self._prod_map, dtype=np.uint8, offset=self.page)
        self.records = 0
        self.discarded = 0

    def pending_bytes(self) -> int:
        return int(self._prod[0]) - int(self._cons[0])

    def drain(self) -> np.ndarray:
        """Copy every committed record out of the ring, advance the consumer, return them (``RAW_RECORD``)."""
        cons = int(self._cons[0])
        prod = int(self._prod[0])
        n = (prod - cons) // self.slot
        if n <= 0:
            return np.empty(0, dtype=schema.RAW_RECORD)
        off = cons & (self.size - 1)
        # Copy first: once consumer_pos moves the kernel may overwrite the span.
        end = off + n * self.slot
        span = self._data[off:end].tobytes()
        if end > self.size:
            span += self._data[: end - self.size].tobytes()
        raw = np.frombuffer(span, dtype=schema.RING_SLOT)
        hdr = raw["rb_len"]
        busy = (hdr & BUSY_BIT) != 0
        if busy.any():
            n = int(np.argmax(busy))
            raw = raw[:n]
            hdr = hdr[:n]
        if n == 0:
            return np.empty(0, dtype=schema.RAW_RECORD)
        lens = hdr & LEN_MASK
        if np.any(lens != schema.RAW_RECORD.itemsize):
            bad = int(lens[lens != schema.RAW_RECORD.itemsize][0])
            raise RingBufferError(f"ring record of {bad} bytes (expected {schema.RAW_RECORD.itemsize})")
        keep = (hdr & DISCARD_BIT) == 0
        self._cons[0] = np.uint64(cons + n * self.slot)
        # Strip the 8-byte headers in one strided copy.
        body = raw.view(np.uint8).reshape(n, self.slot)[:, self.slot - schema.RAW_RECORD.itemsize :]
        out = np.ascontiguousarray(body).view(schema.RAW_RECORD).reshape(n)
        if not keep.all():
            self.discarded += int((~keep).sum())
            out = out[keep]
        self.records += len(out)
        return out

    def close(self) -> None:
        self._cons = self._prod = self._data = None  # type: ignore[assignment]
        for m in (self._cons_map, self._prod_map):
            try:
                m.close()
            except BufferError:
                pass  # a numpy view still alive; the mapping goes with the process
