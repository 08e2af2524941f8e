"""The routing and admission core: which prefill and decode instance serve a request, and
whether it is admitted at all. Plain Python (no torch, no Ray): the Ray actor (``actor.py``)
and the tests drive the same ``Scheduler`` (as a simulator will).

One request's life in the scheduler's books:
1. ``route(spec)`` -> ``RouteDecision`` (decode pages reserved, prefill tokens queued),
   ``Rejection`` (400/429/503) or ``Queued`` (waiting for decode pages; see ``drain_queue``).
2. ``on_prefill_done(id)``: its prefill tokens leave the prefill instance's estimated queue.
3. ``on_finished(id)`` / ``on_cancel(id)``: every reservation it held is released.
A request routed with an ``owner`` (the ingress replica driving it) lives while that owner
``renew``s its lease: ``expire_owners()`` lets go of the requests of owners silent for
``owner_lease_s`` and returns them (``Orphan``) so the caller cancels them on the workers.
``remove_instance(id)`` releases every request the instance was serving and returns their specs
so the caller re-routes them. The scheduler's reservations live only in its books; the decode
worker holds the real pages (``DecodeStage.reserve``) and reports them in ``DecodeInstanceState``.
Free pages are estimated as ``min(reported free, total - pages reserved here)``: each side is a
lower bound while the other is stale, so two routes in a row never double-book.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from scheduler.config import SchedulerConfig
from scheduler.estimate import (
    TTFTEstimate,
    cached_prefix_tokens,
    decode_score,
    estimate_ttft,
    page_wait_s,
    ttft_budget_s,
)
from scheduler.ledger import InstanceBook, Ledger, Orphan, Reservation, Timeline
from scheduler.state import (
    DecodeInstanceState,
    PrefillInstanceState,
    Queued,
    Rejection,
    RequestSpec,
    Role,
    RouteDecision,
    SchedulerStats,
)


@dataclass
class _Waiting:
    spec: RequestSpec
    enqueued_s: float
    deadline_s: float
    owner: str | None = None


@dataclass(frozen=True)
class _Option:
    prefill_id: str | None
    decode_id: str
    ttft: TTFTEstimate
    score: float


class Scheduler:
    """Routes requests across prefill, decode and mixed instances; never leaks a reservation.

    ``clock`` returns seconds (monotonic); tests pass their own. Not
    thread-safe: one caller at a time (the Ray actor runs every call on one event loop).
    """

    def __init__(
        self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.clock = clock
        self._books = Ledger()
        self._queue: deque[_Waiting] = deque()
        self._num_rejected: Counter[str] = Counter()
        self._num_routed = 0
        self._num_decode_local = 0
        self._num_prompt_tokens = 0
        self._num_hit_tokens = 0
        self._owners: dict[str, float] = {}  # owner -> when it last routed or renewed

    # ---- instances ------------------------------------------------------------------------
    def add_instance(self, instance_id: str, role: Role | str) -> None:
        """Register an instance. A decode/mixed instance takes requests once it has reported
        (``update_decode``); a prefill instance starts from config defaults."""
        self._books.add_instance(instance_id, Role(role))

    def remove_instance(self, instance_id: str) -> list[RequestSpec]:
        """Forget an instance (dead, drained, or changing role). Returns the requests that lost
        their prefill (not yet done) or decode instance; their reservations are released and the
        caller must ``route`` them again (or fail them). Unknown ids return []."""
        return [r.spec for r in self._books.remove_instance(instance_id)]

    def update_prefill(self, state: PrefillInstanceState) -> None:
        book = self._books.get(state.instance_id)
        if not book.can_prefill:
            raise ValueError(f"prefill report from {book.role.value} instance {book.instance_id}")
        book.prefill = state
        self._books.forget_recent(state.instance_id, self.clock() - self.config.report_lag_s)

    def update_decode(self, state: DecodeInstanceState) -> None:
        book = self._books.get(state.instance_id)
        if not book.can_decode:
            raise ValueError(f"decode report from {book.role.value} instance {book.instance_id}")
        book.decode = state
        self._books.forget_recent(state.instance_id, self.clock() - self.config.report_lag_s)

    # ---- requests ---------------------------------------------------------------------------
    def route(
        self, spec: RequestSpec, owner: str | None = None
    ) -> RouteDecision | Rejection | Queued:
        """Place a request now, queue it for decode pages, or reject it (see module doc).
        ``owner``: who drives it (see ``renew``); None: it never expires."""
        rid = spec.request_id
        if rid in self._books.reservations or any(w.spec.request_id == rid for w in self._queue):
            raise ValueError(f"request {rid!r} is already routed; ids must be unique")
        if owner is not None:
            self.renew(owner)
        if spec.prompt_len <= 0 or spec.max_tokens <= 0:
            return self._reject(
                spec, 400, "bad_request", f"prompt_len ({spec.prompt_len}) and max_tokens "
                f"({spec.max_tokens}) must both be positive"
            )  # fmt: skip
        if spec.num_tokens > self.config.max_model_len:
            return self._reject(
                spec, 400, "too_long",
                f"prompt ({spec.prompt_len} tokens) + max_tokens ({spec.max_tokens}) = "
                f"{spec.num_tokens} exceeds max_model_len {self.config.max_model_len}; "
                "shorten the prompt or lower max_tokens",
            )  # fmt: skip
        decoders = [i for i in self._books.instances.values() if i.can_decode]
        if not decoders:
            return self._reject(spec, 503, "no_instances", "no decode or mixed instance is up")
        num_pages = spec.num_pages(self.config.page_size)
        largest = max((i.decode.num_total_pages for i in decoders if i.decode), default=0)
        if largest < num_pages:
            return self._reject(
                spec, 503, "no_capacity",
                f"prompt ({spec.prompt_len} tokens) + max_tokens ({spec.max_tokens}) = "
                f"{spec.num_tokens} tokens need {num_pages} KV pages; the largest decode rank "
                f"holds {largest} pages ({largest * self.config.page_size} tokens): lower "
                "max_tokens, or raise decode_kv_tokens",
            )  # fmt: skip
        option = self._best_option(spec, num_pages, require_pages=True)
        if option is not None:
            budget = ttft_budget_s(option.ttft.no_queue_s, self.config)
            if option.ttft.total_s <= budget:
                return self._commit(spec, option, num_pages, owner)
            return self._reject(
                spec, 429, "slo",
                f"estimated TTFT {option.ttft.total_s:.2f}s exceeds {budget:.2f}s",
                retry_after_s=option.ttft.total_s - budget,
            )  # fmt: skip
        return self._enqueue(spec, num_pages, owner)

    def drain_queue(self) -> list[RouteDecision | Rejection]:
        """Place queued requests that now fit and reject those past their deadline (FIFO, but a
        request that fits may pass one that does not). Call after anything that frees pages
        and periodically; each returned answer is final for its request."""
        now = self.clock()
        out: list[RouteDecision | Rejection] = []
        waiting, self._queue = self._queue, deque()
        for w in waiting:
            num_pages = w.spec.num_pages(self.config.page_size)
            option = self._best_option(w.spec, num_pages, require_pages=True)
            if option is not None:
                out.append(self._commit(w.spec, option, num_pages, w.owner))
            elif now >= w.deadline_s:
                out.append(
                    self._reject(
                        w.spec,
                        429,
                        "queue_timeout",
                        f"no decode KV pages freed within {w.deadline_s - w.enqueued_s:.2f}s",
                        retry_after_s=self.config.min_retry_after_s,
                    )  # fmt: skip
                )
            else:
                self._queue.append(w)
        return out

    def on_prefill_done(self, request_id: str) -> bool:
        """The request's first token exists; its prefill load is gone. False if unknown."""
        return self._books.prefill_done(request_id, self.clock())

    def on_finished(self, request_id: str) -> bool:
        """Release everything the request held (a queue slot or its reservations). False if it
        held nothing: idempotent, so finish, cancel and disconnect paths may all call it."""
        for w in self._queue:
            if w.spec.request_id == request_id:
                self._queue.remove(w)
                return True
        return self._books.release(request_id)

    def on_cancel(self, request_id: str) -> bool:
        """Same books effect as ``on_finished`` (the actor answers a queued route with 499)."""
        return self.on_finished(request_id)

    def renew(self, owner: str) -> None:
        """``owner`` is alive: the requests it routed keep their places for ``owner_lease_s``."""
        self._owners[owner] = self.clock()

    def expire_owners(self) -> list[Orphan]:
        """Let go of every request (queued or placed) whose owner has not renewed for
        ``owner_lease_s``; the caller cancels them on the instances named."""
        before = self.clock() - self.config.owner_lease_s
        gone = {owner for owner, seen in self._owners.items() if seen < before}
        if not gone:
            return []
        for owner in gone:
            del self._owners[owner]
        orphans = [Orphan(w.spec.request_id, ()) for w in self._queue if w.owner in gone]
        self._queue = deque(w for w in self._queue if w.owner not in gone)
        for r in [r for r in self._books.reservations.values() if r.owner in gone]:
            self._books.release(r.spec.request_id)
            held = (r.decode_id,) if r.prefill_id == r.decode_id else (r.prefill_id, r.decode_id)
            orphans.append(Orphan(r.spec.request_id, held, r.spec.num_choices))
        return orphans

    # ---- queries ------------------------------------------------------------------------------
    def reserved_pages(self, instance_id: str) -> int:
        return self._books.get(instance_id).num_reserved_pages

    def pending_prefill_tokens(self, instance_id: str) -> int:
        return self._books.get(instance_id).num_pending_tokens

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    @property
    def num_active(self) -> int:
        return len(self._books.reservations)

    def stats(self) -> SchedulerStats:
        instances = self._books.instances.values()
        roles = Counter(i.role for i in instances)
        return SchedulerStats(
            num_queued=len(self._queue),
            num_active=len(self._books.reservations),
            num_routed=self._num_routed,
            num_decode_local=self._num_decode_local,
            num_rejected=dict(self._num_rejected),
            num_prompt_tokens=self._num_prompt_tokens,
            num_prefix_hit_tokens=self._num_hit_tokens,
            num_reserved_pages={
                i.instance_id: i.num_reserved_pages for i in instances if i.can_decode
            },
            num_prefill_instances=roles[Role.PREFILL],
            num_decode_instances=roles[Role.DECODE],
            num_mixed_instances=roles[Role.MIXED],
        )

    # ---- choosing -----------------------------------------------------------------------------
    def _best_option(
        self, spec: RequestSpec, num_pages: int, require_pages: bool
    ) -> _Option | None:
        """Lowest estimated TTFT over: (best prefill, best decode), decode-local on the best
        decode, and each mixed instance; ties go to the better decode score."""
        cfg = self.config
        options: list[_Option] = []
        decode = self._best_decode(num_pages, require_pages)
        prefills = [i for i in self._books.instances.values() if i.role is Role.PREFILL]
        if decode is not None:
            d_id, d_score = decode
            local = self._local_ttft(spec, d_id)
            is_short = spec.prompt_len - local.num_cached_tokens < cfg.decode_local_threshold
            if is_short or not prefills:
                options.append(_Option(None, d_id, local, d_score))
            if not is_short:
                slot_wait = self._slot_wait(self._books.instances[d_id])
                for p in prefills:
                    ttft = self._prefill_ttft(spec, p, slot_wait, with_transfer=True)
                    options.append(_Option(p.instance_id, d_id, ttft, d_score))
        for m in self._books.instances.values():
            if m.role is Role.MIXED and m.decode is not None:
                if m.num_free_pages >= num_pages or not require_pages:
                    ttft = self._prefill_ttft(spec, m, self._slot_wait(m), with_transfer=False)
                    options.append(
                        _Option(m.instance_id, m.instance_id, ttft, self._score(m, num_pages))
                    )
        if not options:
            return None
        return min(options, key=lambda o: (o.ttft.total_s, -o.score))

    def _best_decode(self, num_pages: int, require_pages: bool) -> tuple[str, float] | None:
        best: tuple[str, float] | None = None
        for d in self._books.instances.values():
            if d.role is not Role.DECODE or d.decode is None:
                continue
            if require_pages and d.num_free_pages < num_pages:
                continue
            score = self._score(d, num_pages)
            if best is None or score > best[1]:
                best = (d.instance_id, score)
        return best

    def _score(self, d: InstanceBook, num_pages: int) -> float:
        assert d.decode is not None
        return decode_score(
            d.num_free_pages, d.decode.num_total_pages, num_pages,
            max(d.decode.num_running, d.num_assigned), d.decode.max_batch_size,
        )  # fmt: skip

    def _prefill_ttft(
        self, spec: RequestSpec, p: InstanceBook, slot_wait_s: float, with_transfer: bool
    ) -> TTFTEstimate:
        """On prefill instance ``p`` (a mixed instance: ``with_transfer=False``, and its prefill
        waits for the slot), decoding where a batch slot frees in ``slot_wait_s``."""
        reported = p.prefill or PrefillInstanceState(p.instance_id)
        cached = cached_prefix_tokens(
            spec.block_hashes, spec.prompt_len, self.config.block_size,
            reported.cached_block_hashes, p.pending_hashes, p.recent_hashes,
        )  # fmt: skip
        return estimate_ttft(
            spec.prompt_len, cached,
            max(reported.num_queued_tokens, p.num_pending_tokens),
            reported.prefill_tokens_per_s or self.config.default_prefill_tokens_per_s,
            self.config, with_transfer=with_transfer,
            extra_queue_s=0.0 if with_transfer else slot_wait_s,
            slot_wait_s=slot_wait_s if with_transfer else 0.0,
        )  # fmt: skip

    def _local_ttft(self, spec: RequestSpec, d_id: str) -> TTFTEstimate:
        d = self._books.instances[d_id]
        assert d.decode is not None
        tps = d.decode.prefill_tokens_per_s or self.config.default_prefill_tokens_per_s
        step_s = d.decode.decode_step_s or self.config.default_decode_step_s
        cached = cached_prefix_tokens(
            spec.block_hashes, spec.prompt_len, self.config.block_size,
            d.decode.cached_block_hashes, d.pending_hashes, d.recent_hashes,
        )  # fmt: skip
        # Local prefill takes a batch slot, then interleaves with decode steps: one step of
        # delay before it starts.
        return estimate_ttft(
            spec.prompt_len, cached, d.num_pending_tokens, tps, self.config,
            with_transfer=False, extra_queue_s=self._slot_wait(d) + step_s,
        )  # fmt: skip

    def _slot_wait(self, d: InstanceBook) -> float:
        """Seconds until decode instance ``d`` has a batch slot for one more request."""
        _, slot_free_s = self._timeline(d)
        return max(slot_free_s - self.clock(), 0.0)

    def _timeline(self, d: InstanceBook) -> Timeline:
        assert d.decode is not None
        step_s = d.decode.decode_step_s or self.config.default_decode_step_s
        return self._books.decode_timeline(d.instance_id, step_s, d.decode.max_batch_size)

    # ---- queueing -----------------------------------------------------------------------------
    def _enqueue(self, spec: RequestSpec, num_pages: int, owner: str | None) -> Queued | Rejection:
        option = self._best_option(spec, num_pages, require_pages=False)
        assert option is not None, "a reported decode instance exists, so some option exists"
        wait = self._page_wait(num_pages)
        if len(self._queue) >= self.config.max_queue_len:
            return self._reject(
                spec, 429, "queue_full",
                f"{len(self._queue)} requests already wait for decode KV pages",
                retry_after_s=wait,
            )  # fmt: skip
        budget = ttft_budget_s(option.ttft.no_queue_s, self.config)
        if wait is None or wait + option.ttft.total_s > budget:
            return self._reject(
                spec, 429, "no_pages",
                f"no decode instance has {num_pages} free KV pages"
                + ("" if wait is None else f"; estimated {wait:.2f}s until enough free up"),
                retry_after_s=wait,
            )  # fmt: skip
        now = self.clock()
        deadline = now + budget - option.ttft.total_s
        self._queue.append(_Waiting(spec, now, deadline, owner))
        return Queued(spec.request_id, len(self._queue) - 1, wait, deadline)

    def _page_wait(self, num_pages: int) -> float | None:
        """Soonest any decode-capable instance frees enough pages, from its running requests."""
        now = self.clock()
        waits = []
        for d in self._books.instances.values():
            if d.decode is None or d.decode.num_total_pages < num_pages:
                continue
            ends, _ = self._timeline(d)
            releases = [(end - now, pages) for end, pages in ends]
            wait = page_wait_s(num_pages - d.num_free_pages, releases)
            if wait is not None:
                waits.append(wait)
        return min(waits) if waits else None

    # ---- books ----------------------------------------------------------------------------------
    def _commit(
        self, spec: RequestSpec, option: _Option, num_pages: int, owner: str | None
    ) -> RouteDecision:
        cached = option.ttft.num_cached_tokens
        self._books.reserve(
            Reservation(
                spec, option.prefill_id or option.decode_id, option.decode_id, num_pages,
                spec.prompt_len - cached, self.clock() + option.ttft.total_s, owner=owner,
            )
        )  # fmt: skip
        self._num_routed += 1
        self._num_decode_local += option.prefill_id is None
        self._num_prompt_tokens += spec.prompt_len
        self._num_hit_tokens += cached
        return RouteDecision(
            spec.request_id, option.prefill_id, option.decode_id, cached, num_pages,
            option.ttft.total_s,
        )  # fmt: skip

    def _reject(
        self, spec: RequestSpec, status: int, reason: str, message: str,
        retry_after_s: float | None = None,
    ) -> Rejection:  # fmt: skip
        self._num_rejected[reason] += 1
        if status == 429:  # a 429 always carries Retry-After
            retry_after_s = max(retry_after_s or 0.0, self.config.min_retry_after_s)
        return Rejection(spec.request_id, status, reason, message, retry_after_s)
