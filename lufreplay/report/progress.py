"""The replay's progress bar on stderr: events and segments done, rate, time left.

Shown when a replay runs longer than ``DELAY_S`` and stderr is a terminal, or always when asked
(``simulate --progress``); never on stdout. On a terminal it is a live bar; on a pipe or a file (asked for)
it is a plain line at most every ``LINE_EVERY_S`` and at the end, so logs stay readable.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType

import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from lufreplay.replay.rawops import EVENT_TABLES
from lufreplay.trace.reader import Trace

#: a replay shorter than this shows nothing (unless --progress)
DELAY_S = 2.0
LINE_EVERY_S = 1.0


def trace_events(trace: Trace) -> int:
    """Rows of the tables the replay reads, from the Parquet footers (no data read)."""
    n = trace.n_segments
    return sum(pq.read_metadata(f).num_rows for name in EVENT_TABLES for f in trace.files.get(name, [])[:n])


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        # rich's own speed needs several updates; a replay of few segments has one or two
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed:
            speed = task.completed / task.elapsed if task.completed else None
        return Text("—" if speed is None else f"{speed / 1e6:.2f}M/s")


class ReplayProgress:
    """A context manager and the ``progress`` callback of ``replay``: ``force`` True shows it from the start
    (on any stderr), False never, None after ``DELAY_S`` on a terminal."""

    def __init__(
        self, trace: Trace, force: bool | None, delay_s: float = DELAY_S, console: Console | None = None
    ) -> None:
        self.force = force
        self.console = console
        self.delay_s = delay_s
        self.segments = trace.n_segments
        self.total = trace_events(trace) if force is not False else 0
        self.done_segments = 0
        self.lock = threading.Lock()
        self.started = False
        self.closed = False
        self.timer: threading.Timer | None = None
        self.bar: Progress | None = None
        self.task = None
        self.lines = False  # plain lines instead of a live bar
        self.done_events = 0
        self.t0 = self.last_line = 0.0
        self.printed_segments = -1

    def __enter__(self) -> ReplayProgress:
        if self.force is False:
            return self
        console = self.console or Console(stderr=True)
        if not console.is_terminal:
            self.lines = bool(self.force)
            self.t0 = self.last_line = time.monotonic()
            return self
        self.bar = Progress(
            TextColumn("replay"),
            BarColumn(),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} events"),
            TextColumn("segment {task.fields[seg]}/" + str(self.segments)),
            _Rate(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.bar.add_task("replay", total=max(self.total, 1), seg=0)
        if self.force:
            self._start()
        else:
            self.timer = threading.Timer(self.delay_s, self._start)
            self.timer.daemon = True
            self.timer.start()
        return self

    def _start(self) -> None:
        with self.lock:
            if self.bar is not None and not self.started and not self.closed:
                self.bar.start()
                self.started = True

    def line(self) -> str:
        """``replay: E/T events (P %), segment S/N, R M events/s, elapsed, left``."""
        el = time.monotonic() - self.t0
        rate = self.done_events / el if el > 0 else 0.0
        left = (self.total - self.done_events) / rate if rate > 0 else None
        pct = 100.0 * self.done_events / self.total if self.total else 100.0
        return (
            f"replay: {self.done_events:,}/{self.total:,} events ({pct:.0f} %), segment {self.done_segments}/"
            f"{self.segments}, {rate / 1e6:.2f} M events/s, {el:.1f} s elapsed, "
            + ("? left" if left is None else f"{max(left, 0):.1f} s left")
        )

    def __call__(self, events: int) -> None:
        with self.lock:
            self.done_segments += 1
            self.done_events += events
            if self.bar is not None:
                self.bar.update(self.task, advance=events, seg=self.done_segments)
            elif self.lines and time.monotonic() - self.last_line >= LINE_EVERY_S:
                self._print_line()

    def _print_line(self) -> None:
        self.last_line = time.monotonic()
        self.printed_segments = self.done_segments
        print(self.line(), file=sys.stderr, flush=True)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        with self.lock:
            self.closed = True
            if self.lines and et is None and self.printed_segments != self.done_segments:
                self._print_line()
            if self.bar is not None and self.started:
                if et is None:
                    self.bar.update(self.task, completed=max(self.total, 1), seg=self.segments)
                self.bar.stop()


__all__ = ["DELAY_S", "ReplayProgress", "trace_events"]
