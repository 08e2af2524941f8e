"""Decayed rate and latency estimates for the stats the scheduler routes by, and the step
durations around a rebalance."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from statistics import median


class RateMeter:
    """Work units per busy second, with older samples decaying by half every ``halflife_s``
    seconds of busy time."""

    def __init__(self, halflife_s: float = 10.0) -> None:
        self._halflife_s = halflife_s
        self._units = 0.0
        self._seconds = 0.0

    def add(self, num_units: float, seconds: float) -> None:
        keep = 0.5 ** (seconds / self._halflife_s)
        self._units = self._units * keep + num_units
        self._seconds = self._seconds * keep + seconds

    @property
    def rate(self) -> float | None:
        """Units per second; None before the first sample."""
        return self._units / self._seconds if self._seconds > 0 else None


class MeanMeter:
    """Exponential moving average of a latency (seconds per step)."""

    def __init__(self, weight: float = 0.1) -> None:
        self._weight = weight
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self._weight * (x - self.value)


class StepWindow:
    """Step durations around an event that must not stall the loop (an EPLB rebalance): the
    recent steps before it, as the reference, and the steps while it lasts. ``add`` runs on the
    step thread; ``open``/``close`` on another (appends are atomic under the GIL)."""

    def __init__(self, num_recent: int = 256) -> None:
        self._recent: deque[float] = deque(maxlen=num_recent)
        self._during: list[float] | None = None

    def add(self, seconds: float) -> None:
        during = self._during
        (during if during is not None else self._recent).append(seconds)

    def open(self) -> None:
        self._during = []

    def close(self) -> StepWindowStats:
        """End the event: its steps against the median of the steps before it."""
        during, self._during = self._during or [], None
        recent = list(self._recent)
        return StepWindowStats(
            num_steps=len(during),
            longest_s=max(during, default=0.0),
            median_before_s=median(recent) if recent else None,
        )


@dataclass(frozen=True)
class StepWindowStats:
    num_steps: int  # steps while the event lasted
    longest_s: float  # the longest of them (0.0 if none)
    median_before_s: float | None  # median of the recent steps before it (None: no steps yet)
