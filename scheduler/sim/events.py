"""The discrete-event core: a simulated clock and a heap of timed callbacks."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


class EventLoop:
    """Runs callbacks in time order; equal times run in the order they were scheduled.

    ``now`` is the simulated clock (seconds); pass ``loop.clock`` to ``Scheduler(clock=...)``.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = 0
        self.num_events = 0

    def clock(self) -> float:
        return self.now

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> None:
        assert t >= self.now - 1e-9, f"event at {t} is in the past (now {self.now})"
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def after(self, dt: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + dt, fn, *args)

    def run(self, is_done: Callable[[], bool]) -> None:
        """Run events until ``is_done()`` or nothing is left."""
        heap = self._heap
        while heap and not is_done():
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            self.num_events += 1
            fn(*args)
