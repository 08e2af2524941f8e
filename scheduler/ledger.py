"""The scheduler's books: what every instance reported, and what every routed request holds.

A ``Reservation`` is created when a request is routed and holds (a) ``num_pages`` decode pages
on its decode instance and (b) ``num_uncached_tokens`` of queued prefill work plus its block
hashes on its prefill instance (the decode instance itself for local prefill). (b) goes at
``prefill_done``; both go at ``release``. Removing an instance releases the reservations that
depended on it. Every counter here returns to zero when every request is released.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field

from scheduler.state import DecodeInstanceState, PrefillInstanceState, RequestSpec, Role

Timeline = tuple[list[tuple[float, int]], float]  # Ledger.decode_timeline: (ends, slot_free_s)


class UnknownInstanceError(KeyError):
    """A report or removal for an instance the scheduler does not know (add_instance first)."""


@dataclass
class InstanceBook:
    """One instance: its latest reports and the load routed to it that they may not show yet."""

    instance_id: str
    role: Role
    prefill: PrefillInstanceState | None = None
    decode: DecodeInstanceState | None = None
    num_reserved_pages: int = 0  # decode pages held by requests routed here
    num_assigned: int = 0  # requests decoding (or about to) here
    num_pending_tokens: int = 0  # prefill tokens routed here, not yet done
    pending_hashes: Counter[int] = field(default_factory=Counter)  # blocks being prefilled here
    # Blocks of prefills finished here (hash -> scheduler time), counted as cached until a
    # report surely taken after that time replaces them: reports arrive every few hundred ms,
    # and a request sharing the prefix may be routed in between.
    recent_hashes: dict[int, float] = field(default_factory=dict)

    @property
    def can_prefill(self) -> bool:
        return self.role in (Role.PREFILL, Role.MIXED)

    @property
    def can_decode(self) -> bool:
        return self.role in (Role.DECODE, Role.MIXED)

    @property
    def num_free_pages(self) -> int:
        """min(reported free, total - reserved here): each is a lower bound while the other is
        stale (a report that predates our routes / reservations the worker already freed)."""
        assert self.decode is not None, f"{self.instance_id} has not reported its KV pages"
        return min(
            self.decode.num_free_pages, self.decode.num_total_pages - self.num_reserved_pages
        )


@dataclass
class Reservation:
    """What one routed request holds."""

    spec: RequestSpec
    prefill_id: str  # instance doing the prefill (the decode instance when local)
    decode_id: str
    num_pages: int
    num_uncached_tokens: int
    decode_start_s: float  # scheduler clock: estimated, then actual, first-token time
    is_prefill_done: bool = False
    owner: str | None = None  # who routed it (an ingress replica); kept while its lease lives


@dataclass(frozen=True)
class Orphan:
    """A request the scheduler let go because its owner's lease lapsed (the ingress replica
    that routed it died): cancel it, and each of its ``num_choices`` choices, on
    ``instance_ids`` (none: it was still queued)."""

    request_id: str
    instance_ids: tuple[str, ...]
    num_choices: int = 1


class Ledger:
    """Instances and reservations, kept consistent (no leak, no double count)."""

    def __init__(self) -> None:
        self.instances: dict[str, InstanceBook] = {}
        self.reservations: dict[str, Reservation] = {}
        # decode_timeline's answers until a reservation changes (a drain of a long queue asks
        # the same question once per waiting request)
        self._version = 0
        self._timelines: dict[str, tuple[tuple[int, float, int], Timeline]] = {}

    def get(self, instance_id: str) -> InstanceBook:
        book = self.instances.get(instance_id)
        if book is None:
            raise UnknownInstanceError(f"unknown instance {instance_id!r}; call add_instance first")
        return book

    def add_instance(self, instance_id: str, role: Role) -> None:
        if instance_id in self.instances:
            raise ValueError(f"instance {instance_id!r} already added; remove_instance first")
        self.instances[instance_id] = InstanceBook(instance_id, role)

    def remove_instance(self, instance_id: str) -> list[Reservation]:
        """Drop the instance; release and return the reservations that lost their decode
        instance or their (unfinished) prefill instance."""
        self._timelines.pop(instance_id, None)
        if self.instances.pop(instance_id, None) is None:
            return []
        lost = [
            r
            for r in self.reservations.values()
            if r.decode_id == instance_id or (r.prefill_id == instance_id and not r.is_prefill_done)
        ]
        for r in lost:
            self.release(r.spec.request_id)
        return lost

    def reserve(self, r: Reservation) -> None:
        assert r.spec.request_id not in self.reservations, "request already holds a reservation"
        self.reservations[r.spec.request_id] = r
        self._version += 1
        d = self.instances[r.decode_id]
        d.num_reserved_pages += r.num_pages
        d.num_assigned += 1
        p = self.instances[r.prefill_id]
        p.num_pending_tokens += r.num_uncached_tokens
        p.pending_hashes.update(r.spec.block_hashes)

    def prefill_done(self, request_id: str, now: float) -> bool:
        r = self.reservations.get(request_id)
        if r is None or r.is_prefill_done:
            return False
        self._release_prefill(r)
        p = self.instances.get(r.prefill_id)
        if p is not None and p.can_prefill:  # decode-only instances keep no prefix cache
            p.recent_hashes.update(dict.fromkeys(r.spec.block_hashes, now))
        r.decode_start_s = now
        self._version += 1
        return True

    def forget_recent(self, instance_id: str, before: float) -> None:
        """A report taken after ``before`` arrived: it shows what is really cached by then."""
        book = self.get(instance_id)
        book.recent_hashes = {h: t for h, t in book.recent_hashes.items() if t >= before}

    def release(self, request_id: str) -> bool:
        r = self.reservations.pop(request_id, None)
        if r is None:
            return False
        self._version += 1
        if not r.is_prefill_done:
            self._release_prefill(r)
        d = self.instances.get(r.decode_id)
        if d is not None:
            d.num_reserved_pages -= r.num_pages
            d.num_assigned -= 1
            assert d.num_reserved_pages >= 0 and d.num_assigned >= 0, f"books of {d.instance_id}"
        return True

    def decode_timeline(self, decode_id: str, step_s: float, max_batch_size: int) -> Timeline:
        """``(ends, slot_free_s)`` of ``decode_id``, on the scheduler clock: when each request
        routed there finishes (with its pages), and when a batch slot is next free for one more.
        The requests' choices take the ``max_batch_size`` slots in the order they start
        decoding (first token: estimated, then actual), each for ``max_tokens`` steps of
        ``step_s``; a choice whose first token is out waits for a slot like any other (the
        decode stage's queue); a request's pages free with its last choice. An upper bound:
        requests usually stop (EOS) before max_tokens. ``slot_free_s`` is -inf while a slot
        is free."""
        key = (self._version, step_s, max_batch_size)
        cached = self._timelines.get(decode_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        slots: list[float] = []  # heap: when each busy slot frees
        ends = []
        requests = [r for r in self.reservations.values() if r.decode_id == decode_id]
        for r in sorted(requests, key=lambda r: r.decode_start_s):
            end = -math.inf
            for _ in range(r.spec.num_choices):
                start = r.decode_start_s
                if len(slots) >= max_batch_size:
                    start = max(start, heapq.heappop(slots))
                heapq.heappush(slots, start + r.spec.max_tokens * step_s)
                end = max(end, start + r.spec.max_tokens * step_s)
            ends.append((end, r.num_pages))
        timeline = (ends, slots[0] if len(slots) >= max_batch_size else -math.inf)
        self._timelines[decode_id] = (key, timeline)
        return timeline

    def _release_prefill(self, r: Reservation) -> None:
        r.is_prefill_done = True
        p = self.instances.get(r.prefill_id)
        if p is None:
            return
        p.num_pending_tokens -= r.num_uncached_tokens
        assert p.num_pending_tokens >= 0, f"negative pending prefill tokens on {p.instance_id}"
        for h in r.spec.block_hashes:
            p.pending_hashes[h] -= 1
            if p.pending_hashes[h] <= 0:
                del p.pending_hashes[h]
