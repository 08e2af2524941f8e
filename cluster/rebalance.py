"""One EPLB round for an expert-parallel instance, driven by the pool manager.

1. Every rank hands in the tokens it routed per (MoE layer, logical expert) since the last
   round and the placement it serves; the loads are summed over the instance.
2. ``scheduler.eplb.rebalance`` plans the next placement from that window, moving at most
   ``eplb_max_moved_fraction`` of each layer's slots.
3. Every rank stages the weights of its changed slots on an actor thread (from its own
   checkpoint files; from the peer ranks holding the experts when a file is not on its host),
   then the ranks swap the layers in one per lockstep tick: serving never stops. A rank that fails to stage makes every rank drop the new placement: the old one keeps
   serving.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scheduler.eplb import balancedness, moved_slots, rebalance


class LoadWindow:
    """A rank's tokens per (MoE layer, logical expert) over the last ``window_s`` seconds of
    serving (0: since the last ``take``). ``read()`` returns the engine's running totals
    (layer -> tensor [experts]); the report loop calls ``snapshot`` every report interval and
    keeps at most about 16 snapshots per window; ``reset`` starts over (a new role)."""

    def __init__(
        self, read: Callable[[], dict[int, Any]], window_s: float, clock=time.monotonic
    ) -> None:
        self._read, self._window_s, self._clock = read, window_s, clock
        self._every_s = window_s / 16
        self._snapshots: deque[tuple[float, dict[int, Any]]] = deque()
        self.reset()

    def reset(self) -> None:
        self._snapshots.clear()
        self._snapshots.append((self._clock(), self._copy()))

    def snapshot(self) -> None:
        if not self._window_s:
            return
        now = self._clock()
        if now - self._snapshots[-1][0] < self._every_s:
            return
        self._snapshots.append((now, self._copy()))
        while len(self._snapshots) > 1 and self._snapshots[1][0] <= now - self._window_s:
            self._snapshots.popleft()  # keep the newest snapshot at or before the window start

    def take(self) -> dict[int, list[int]]:
        now = self._copy()
        base = self._snapshots[0][1]
        window = {i: (c - base[i]).tolist() for i, c in now.items()}
        if not self._window_s:
            self._snapshots.clear()
            self._snapshots.append((self._clock(), now))
        return window

    def _copy(self) -> dict[int, Any]:
        return {i: c.clone() for i, c in self._read().items()}


@dataclass
class RebalanceResult:
    """What one round did (``GET``/``POST /admin/eplb/rebalance`` and the metrics)."""

    instance_id: str
    version: int
    num_moved_slots: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    balancedness_before: list[float] = field(default_factory=list)  # per MoE layer, on the window
    balancedness_after: list[float] = field(default_factory=list)
    num_steps: int = 0  # steps of the busiest rank from staging to the last swap
    longest_step_s: float = 0.0  # the longest of them over the ranks
    median_step_s: float | None = None  # the median rank step before the round
    step_ratio: float | None = None  # longest_step_s / median_step_s
    error: str | None = None


async def rebalance_instance(
    instance_id: str,
    ranks: list[Any],
    num_nodes: int,
    version: int,
    max_moved_fraction: float,
    timeout_s: float = 300.0,
) -> RebalanceResult:
    """Plan and apply a new placement on the ``ranks`` of one instance (see the module doc)."""
    start = time.monotonic()
    result = RebalanceResult(instance_id, version)
    # Step 1: the window's load, summed over the ranks, and the current placement
    answers = await asyncio.gather(*(r.expert_load.remote() for r in ranks))
    layers = sorted(answers[0][1])
    load = np.array([np.sum([a[0][i] for a in answers], axis=0) for i in layers], dtype=float)
    previous = np.array([answers[0][1][i] for i in layers], dtype=np.int64)
    num_slots, num_ranks = previous.shape[1], len(ranks)
    if num_ranks % num_nodes:
        num_nodes = 1
    result.balancedness_before = balancedness(load, previous, num_ranks).tolist()
    if load.sum() == 0:  # no traffic in the window: nothing to learn from
        result.balancedness_after = result.balancedness_before
        return result
    # Step 2: plan within the move budget
    max_moved = max(1, int(max_moved_fraction * num_slots))
    placement = rebalance(load, num_slots, num_nodes, num_ranks, previous, max_moved)
    result.balancedness_after = balancedness(load, placement, num_ranks).tolist()
    result.num_moved_slots = int(moved_slots(previous, placement).sum())
    if result.num_moved_slots == 0:
        return result
    new = {i: placement[k].tolist() for k, i in enumerate(layers)}
    # Step 3: stage everywhere, then wait for the swap at the common ticks
    try:
        read = await asyncio.wait_for(
            asyncio.gather(*(r.stage_placement.remote(version, new, ranks) for r in ranks)),
            timeout_s,
        )
    except Exception as e:  # noqa: BLE001 - any failure keeps the old placement serving
        await asyncio.gather(
            *(r.abort_placement.remote(version) for r in ranks), return_exceptions=True
        )
        await asyncio.gather(*(r.rebalance_steps.remote() for r in ranks), return_exceptions=True)
        result.error = f"{type(e).__name__}: {e}"
        result.balancedness_after = result.balancedness_before
        result.num_moved_slots = 0
        return result
    result.bytes_read = int(sum(read))
    deadline = time.monotonic() + timeout_s
    while any(await asyncio.gather(*(r.is_resharding.remote() for r in ranks))):
        if time.monotonic() > deadline:
            result.error = "the ranks did not swap the new placement in within the timeout"
            break
        await asyncio.sleep(0.05)
    result.seconds = time.monotonic() - start
    steps = await asyncio.gather(*(r.rebalance_steps.remote() for r in ranks))
    result.num_steps = max(s["num_steps"] for s in steps)
    result.longest_step_s = max(s["longest_s"] for s in steps)
    medians = [s["median_before_s"] for s in steps if s["median_before_s"] is not None]
    result.median_step_s = max(medians) if medians else None  # a step lasts its slowest rank's
    if result.median_step_s and result.longest_step_s:
        result.step_ratio = result.longest_step_s / result.median_step_s
    return result
