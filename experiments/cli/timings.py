"""``--timings``: wall-clock time per phase of a command, from the process's start to its last line; and the garbage
collector kept out of the way of a one-shot command."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from typing import Callable, Iterator


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``: its start tick against the uptime), or None elsewhere."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(open("/proc/uptime").read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def collections_paused() -> Iterator[None]:
    """No garbage collection inside the block (restored on exit, raise or not): importing torch, transformers and
    TransformerLens and loading a model allocate millions of long-lived objects, and the collector would scan the
    growing heap again and again (0.8 s of the main job's start-up and loading)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class PhaseClock:
    """Marks phases in order; a phase lasts until the next one starts. ``progress(wrapped)`` turns a progress
    callback's stage names into phases. ``rows()``: ``(phase, seconds)``, the time before the first mark (Python and
    the command-line's own imports) first."""

    def __init__(self) -> None:
        age = process_age_s()
        self.origin = time.perf_counter() - (age or 0.0)
        self.marks: list[tuple[str, float]] = [("start-up (python, imports)" if age is not None else "start-up", self.origin)]

    def mark(self, phase: str) -> None:
        if phase != self.marks[-1][0]:
            self.marks.append((phase, time.perf_counter()))

    def progress(self, wrapped: Callable[[str, int, int], None]) -> Callable[[str, int, int], None]:
        def report(stage: str, done: int, total: int) -> None:
            self.mark(stage)
            wrapped(stage, done, total)

        return report

    def rows(self) -> list[tuple[str, float]]:
        ends = [t for _, t in self.marks[1:]] + [time.perf_counter()]
        totals: dict[str, float] = {}
        for (phase, start), end in zip(self.marks, ends):
            totals[phase] = totals.get(phase, 0.0) + end - start
        return list(totals.items())

    def lines(self) -> list[str]:
        rows = self.rows()
        width = max(len(phase) for phase, _ in rows)
        total = sum(seconds for _, seconds in rows)
        return ["Timings (wall clock):"] + [f"  {phase:<{width}}  {seconds:6.2f} s" for phase, seconds in rows] + \
               [f"  {'total':<{width}}  {total:6.2f} s"]  # fmt: skip
