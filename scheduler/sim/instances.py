"""Simulated prefill and decode instances: the stages' queues and batches, with costs from a
profile instead of an engine.

``SimPrefill`` mirrors ``prefill.stage.PrefillStage``: each ``step`` spends a cost budget
(``token_budget`` tokens at an empty prefix, less deeper in a prompt) on the prompts with the least
left to compute, a chunk each (a long prompt spans steps, short ones share one, a starved one goes
first); a prompt takes the longest cached prefix when it starts (``BlockLRU``, the stage's own
class), enters the cache when it completes, and its KV (streamed while it is computed) is at
the decode instance once the transfer drains. ``SimDecode`` mirrors
``decode.stage.DecodeStage``: pages are reserved for prompt + max_tokens before the KV arrives,
a started sequence streams its first token at once and joins the continuous batch at the next
step (up to ``max_batch_size``), every step gives each running sequence one token, a finished
sequence frees its pages. Local prefill (decode-local or mixed) runs up to
``prefill_token_budget`` prompt tokens per step before the decode part of the step.

Both report ``PrefillInstanceState`` / ``DecodeInstanceState`` as the workers do, with the
stages' own meters (``common.meter``).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from common.meter import MeanMeter, RateMeter
from common.prefix import BlockLRU
from scheduler.sim.events import EventLoop
from scheduler.sim.profile import CostProfile
from scheduler.state import DecodeInstanceState, PrefillInstanceState


@dataclass
class SimSeq:
    """One routed attempt of a request, as the instances see it (times in simulated s)."""

    request_id: str
    prompt_len: int
    max_tokens: int
    block_hashes: tuple[int, ...]
    on_first_token: Callable[[SimSeq], None]
    on_finished: Callable[[SimSeq], None]
    num_cached: int = 0
    num_computed: int = 0
    is_started: bool = False  # prefill began: cached prefix matched
    num_skipped: int = 0  # prefill steps in a row whose budget ran out before this prompt
    prefill_start_s: float = 0.0
    first_token_s: float | None = None
    finish_s: float | None = None
    last_token_s: float = 0.0
    num_pages: int = 0


def _cacheable(seq: SimSeq, block_size: int) -> tuple[int, ...]:
    # The block holding the last prompt token is always computed (its logits).
    return seq.block_hashes[: (seq.prompt_len - 1) // block_size]


class PrefixCacheModel:
    """A bounded prefix cache (LRU over block hashes) whose reported snapshot is rebuilt only
    when its contents changed."""

    def __init__(self, capacity_tokens: int, block_size: int) -> None:
        self.block_size = block_size
        self.lru = BlockLRU(capacity_tokens // block_size)
        self._hashes: set[int] = set()  # the LRU's keys (a set copies 2x faster than its dict)
        self._snapshot: frozenset[int] = frozenset()
        self._is_stale = False

    def match(self, seq: SimSeq) -> int:
        """Cached prompt tokens of ``seq`` (touches them)."""
        return len(self.lru.match(_cacheable(seq, self.block_size))) * self.block_size

    def peek(self, seq: SimSeq) -> int:
        return self.lru.peek(_cacheable(seq, self.block_size)) * self.block_size

    def insert(self, seq: SimSeq) -> None:
        result = self.lru.insert(seq.block_hashes, seq.block_hashes)
        self._hashes.update(h for h, _ in result.added)
        self._hashes.difference_update(h for h, _ in result.evicted)
        self._is_stale |= bool(result.added or result.evicted)

    def hashes(self) -> frozenset[int]:
        if self._is_stale:
            self._snapshot, self._is_stale = frozenset(self._hashes), False
        return self._snapshot


class SimPrefill:
    """A prefill instance (see module doc)."""

    def __init__(
        self, instance_id: str, loop: EventLoop, profile: CostProfile, block_size: int
    ) -> None:
        self.instance_id = instance_id
        self.loop = loop
        self.cost = profile.prefill
        self.transfer = profile.transfer
        self.cache = PrefixCacheModel(self.cost.prefix_cache_tokens, block_size)
        self._queue: deque[tuple[SimSeq, Callable[[SimSeq], None]]] = deque()
        self._is_stepping = False
        self._num_sending = 0  # computed, KV still draining to decode
        self._throughput = RateMeter()
        self.busy_s = 0.0
        self.is_draining = False  # moving to another role: out of the scheduler
        self.host_peers: list[SimDecode] = []  # decode instances sharing this one's CPUs

    @property
    def is_computing(self) -> bool:
        return self._is_stepping

    def submit(self, seq: SimSeq, on_done: Callable[[SimSeq], None]) -> None:
        """Queue a prompt; ``on_done(seq)`` runs once its KV is at the decode instance."""
        self._queue.append((seq, on_done))
        if not self._is_stepping:
            self._is_stepping = True
            self.loop.after(0.0, self._step)

    def cancel(self, request_id: str) -> None:
        self._queue = deque(e for e in self._queue if e[0].request_id != request_id)

    def is_idle(self) -> bool:
        return not self._queue and not self._num_sending

    def state(self) -> PrefillInstanceState:
        queued = sum(
            s.prompt_len - (s.num_computed if s.is_started else self.cache.peek(s))
            for s, _ in self._queue
        )
        return PrefillInstanceState(
            self.instance_id, queued, self._throughput.rate, self.cache.hashes()
        )

    @property
    def tokens_per_s(self) -> float | None:
        return self._throughput.rate

    @property
    def load(self) -> int:
        return sum(seq.prompt_len - seq.num_computed for seq, _ in self._queue)

    def _step(self) -> None:
        """One ``PrefillStage.step``: the budget (in ``chunk_cost`` units) goes to the prompts
        with the least left to compute (one the budget skipped ``max_skipped_steps`` steps in a
        row first), a chunk each, sized to what is left of the budget."""
        cost = self.cost
        budget = float(cost.token_budget)
        duration, num_tokens = cost.step_overhead_s, 0
        patience = cost.max_skipped_steps
        slow = cost.contended_slowdown if any(d.num_running for d in self.host_peers) else 1.0

        def key(entry: tuple[SimSeq, Callable[[SimSeq], None]]) -> tuple[int, int]:
            seq = entry[0]
            starving = seq.num_skipped if seq.num_skipped >= patience else 0
            return -starving, seq.prompt_len - seq.num_computed

        order = sorted(self._queue, key=key)
        for i, (seq, on_done) in enumerate(order):
            if budget <= 0:
                for skipped, _ in order[i:]:
                    skipped.num_skipped += 1
                break
            if num_tokens and cost.chunk_cost(seq.num_computed, cost.min_chunk_tokens) > budget:
                seq.num_skipped += 1  # its smallest chunk would overrun the step
                continue
            if not seq.is_started:
                seq.is_started, seq.prefill_start_s = True, self.loop.now
                seq.num_cached = seq.num_computed = self.cache.match(seq)
            start = seq.num_computed
            end = min(seq.prompt_len, start + cost.chunk_tokens(start, budget))
            duration += cost.chunk_s(start, end) * slow
            budget -= cost.chunk_cost(start, end - start)
            num_tokens += end - start
            seq.num_computed, seq.num_skipped = end, 0
            if end == seq.prompt_len:  # done after its own chunk, not at the end of the step
                self._queue.remove((seq, on_done))
                self._num_sending += 1
                self.loop.after(duration, self._complete, seq, on_done)
        self._throughput.add(num_tokens, duration)
        self.busy_s += duration
        self.loop.after(duration, self._end_step)

    def _complete(self, seq: SimSeq, on_done: Callable[[SimSeq], None]) -> None:
        """Last chunk computed: into the prefix cache; the KV (streamed per layer while it was
        computed) is at the decode instance when its last bytes land."""
        self.cache.insert(seq)
        sent_s = max(self.loop.now, seq.prefill_start_s + self.transfer.seconds(seq.prompt_len))
        self.loop.at(sent_s + self.transfer.latency_s, self._sent, seq, on_done)

    def _end_step(self) -> None:
        if self._queue:
            self._step()
        else:
            self._is_stepping = False

    def _sent(self, seq: SimSeq, on_done: Callable[[SimSeq], None]) -> None:
        self._num_sending -= 1
        on_done(seq)


class SimDecode:
    """A decode instance (``is_mixed``: also prefills every prompt routed to it, and reports
    as a prefill instance too)."""

    def __init__(
        self,
        instance_id: str,
        loop: EventLoop,
        profile: CostProfile,
        block_size: int,
        is_mixed: bool = False,
    ) -> None:
        self.instance_id = instance_id
        self.loop = loop
        self.cost = profile.decode
        self.prefill_cost = profile.prefill
        self.page_size = profile.page_size
        self.is_mixed = is_mixed
        self.num_total_pages = profile.num_decode_pages
        self.num_free_pages = self.num_total_pages
        self.num_unfilled_pages = 0  # reserved, KV not arrived yet
        self._reserved: dict[str, int] = {}
        self._ready: deque[SimSeq] = deque()  # KV arrived, first token out, waiting for a slot
        self._local: deque[SimSeq] = deque()  # local prefill, oldest first
        self._num_running = 0
        self._context_tokens = 0  # KV tokens of the running batch
        self._finish_heap: list[tuple[int, int, SimSeq]] = []  # (finish step, tiebreak, seq)
        self._num_steps = 0
        self._is_stepping = False
        self._step_time = MeanMeter()
        self._prefill_rate = RateMeter()
        self.busy_s = 0.0
        self.num_generated = 0  # tokens, first tokens included
        self.is_draining = False
        # Inter-token gaps: (gap seconds, number of tokens that waited that long).
        self.token_gaps: list[tuple[float, int]] = []
        self._last_step_end = 0.0
        self._fresh: list[SimSeq] = []  # joined the batch this step: their gap is their own
        self.host_peers: list[SimPrefill] = []  # prefill instances sharing this one's CPUs

    # ---- the worker's API -------------------------------------------------------------------
    def reserve(self, request_id: str, num_tokens: int) -> bool:
        """Pages for an incoming transfer; False when they are not free (stale books)."""
        pages = -(-num_tokens // self.page_size)
        if pages > self.num_free_pages:
            return False
        self.num_free_pages -= pages
        self.num_unfilled_pages += pages
        self._reserved[request_id] = pages
        return True

    def start(self, seq: SimSeq) -> None:
        """KV arrived (``seq.num_cached`` ignored): first token now, batch slot next step."""
        seq.num_pages = self._reserved.pop(seq.request_id)
        self.num_unfilled_pages -= seq.num_pages
        seq.first_token_s = seq.last_token_s = self.loop.now
        seq.on_first_token(seq)
        self.num_generated += 1
        if seq.max_tokens <= 1:
            self._finish(seq)
            return
        self._ready.append(seq)
        self._wake()

    def start_local(self, seq: SimSeq) -> None:
        """Prefill here (decode-local or mixed), then decode; pages are taken at admission."""
        self._local.append(seq)
        self._wake()

    def cancel(self, request_id: str) -> None:
        pages = self._reserved.pop(request_id, 0)
        self.num_free_pages += pages
        self.num_unfilled_pages -= pages
        if self._local:
            self._wake()

    def is_idle(self) -> bool:
        return not (self._num_running or self._ready or self._local or self._reserved)

    @property
    def num_steps(self) -> int:
        return self._num_steps

    @property
    def decode_step_s(self) -> float | None:
        return self._step_time.value

    @property
    def load(self) -> int:
        return self._num_running + len(self._ready) + len(self._local)

    @property
    def num_running(self) -> int:
        return self._num_running

    @property
    def num_waiting(self) -> int:
        return len(self._ready) + len(self._local)

    def decode_state(self) -> DecodeInstanceState:
        return DecodeInstanceState(
            self.instance_id,
            num_free_pages=self.num_free_pages,
            num_total_pages=self.num_total_pages,
            num_running=self._num_running,
            max_batch_size=self.cost.max_batch_size,
            decode_step_s=self._step_time.value,
            num_reserved_unfilled_pages=self.num_unfilled_pages,
            prefill_tokens_per_s=self._prefill_rate.rate,
        )

    def prefill_state(self) -> PrefillInstanceState:
        queued = sum(s.prompt_len - s.num_computed for s in self._local)
        return PrefillInstanceState(self.instance_id, queued, self._prefill_rate.rate)

    # ---- the loop ---------------------------------------------------------------------------
    def _wake(self) -> None:
        if not self._is_stepping:
            self._is_stepping = True
            self.loop.after(0.0, self._step)

    def _step(self) -> None:
        """Admit, local prefill, one decode step for the batch; schedule its end."""
        self._admit()
        prefill_s, prefilled = self._prefill()
        batch = self._num_running
        decode_s = self.cost.step_s(batch, self._context_tokens) if batch else 0.0
        if any(p.is_computing for p in self.host_peers):
            decode_s *= self.cost.contended_slowdown
        if batch:
            self._step_time.add(decode_s)
        duration = prefill_s + decode_s
        if duration == 0.0:  # nothing can run (a local prompt waits for pages): sleep
            self._is_stepping = False
            return
        self.busy_s += duration
        self.loop.after(duration, self._end_step, prefilled, batch)

    def _admit(self) -> None:
        free_slots = self.cost.max_batch_size - self._num_running
        while self._ready and free_slots > 0:
            self._join(self._ready.popleft())
            free_slots -= 1

    def _join(self, seq: SimSeq) -> None:
        """Into the batch (first token already out): a token at the end of each of its next
        ``max_tokens - 1`` steps."""
        self._num_running += 1
        self._context_tokens += seq.prompt_len + 1
        finish_step = self._num_steps + seq.max_tokens - 1
        heapq.heappush(self._finish_heap, (finish_step, id(seq), seq))
        self._fresh.append(seq)

    def _prefill(self) -> tuple[float, list[SimSeq]]:
        """Local prefill of up to ``prefill_token_budget`` tokens; pages at the first chunk."""
        budget = self.cost.prefill_token_budget
        seconds, done = 0.0, []
        for seq in self._local:
            if budget <= 0 or self._num_running + len(done) >= self.cost.max_batch_size:
                break
            if not seq.is_started:
                pages = -(-(seq.prompt_len + seq.max_tokens) // self.page_size)
                if pages > self.num_free_pages:
                    break  # the oldest prompt waits for pages, and so does everyone behind it
                self.num_free_pages -= pages
                seq.num_pages, seq.is_started = pages, True
                seq.prefill_start_s = self.loop.now
            end = min(seq.prompt_len, seq.num_computed + budget)
            seconds += self.prefill_cost.chunk_s(seq.num_computed, end)
            budget -= end - seq.num_computed
            seq.num_computed = end
            if end == seq.prompt_len:
                done.append(seq)
        for seq in done:
            self._local.remove(seq)
        if seconds:
            self._prefill_rate.add(self.cost.prefill_token_budget - budget, seconds)
        return seconds, done

    def _end_step(self, prefilled: list[SimSeq], batch: int) -> None:
        now = self.loop.now
        # The batch got a token each; those that joined this step waited since their own last.
        fresh, self._fresh = self._fresh, []
        for seq in fresh:
            self.token_gaps.append((now - seq.last_token_s, 1))
        if batch > len(fresh):
            self.token_gaps.append((now - self._last_step_end, batch - len(fresh)))
        self._context_tokens += batch
        self.num_generated += batch + len(prefilled)
        if batch:
            self._num_steps += 1
        self._last_step_end = now
        heap = self._finish_heap
        while heap and heap[0][0] <= self._num_steps:
            _, _, seq = heapq.heappop(heap)
            self._num_running -= 1
            self._context_tokens -= seq.prompt_len + seq.max_tokens
            self._finish(seq)
        for seq in prefilled:  # first token from the local prefill's logits
            seq.first_token_s = seq.last_token_s = now
            seq.on_first_token(seq)
            if seq.max_tokens <= 1:
                self._finish(seq)
            else:
                self._join(seq)
        if self._num_running or self._ready or self._local:
            self._step()
        else:
            self._is_stepping = False

    def _finish(self, seq: SimSeq) -> None:
        seq.finish_s = self.loop.now
        self.num_free_pages += seq.num_pages
        seq.on_finished(seq)
        if self._local:
            self._wake()
