"""Decayed rate and latency estimates for the stats the scheduler routes by."""

from __future__ import annotations


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
