"""The prefill stage: chunked prefill with a prefix cache, streaming each layer's KV to decode.

One request:
1. ``submit(job)`` queues it (any thread) and returns a future.
2. A ``step()`` (the worker's loop thread) reaches it: pages are allocated, sharing the pages of
   the longest cached prefix; a KV sink opens to the job's decode receiver and the cached
   prefix's KV is sent first (decode needs the full KV).
3. Steps compute the uncached suffix in chunks whose cost (tokens, plus their attention over
   the prefix) fits one step's budget; jobs with the least left go first, so a long prompt
   interleaves with short ones instead of blocking them; after each layer of each chunk the
   new KV is sent at once.
4. The last chunk's logits give the first token (of every choice: a job with
   ``fork_sampling`` draws each further choice's from the same logits); the prompt's full blocks enter the prefix
   cache and the sequence's own page references are freed; the transfer drains on a closer
   thread (the step thread moves on to the next prompt) and the future resolves with a
   ``PrefillResult`` once the receiver confirms the complete, verified KV.
A send failure, an engine error or ``cancel`` resolves the future with ``error`` set and frees
the pages; the ingress re-routes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from common.meter import RateMeter
from common.prefix_cache import PrefixCache, allocate_sequence
from common.sampling import TokenLogprob
from common.stage import StageState
from kvtransfer import KVOutbox, OutboundKV, TransferConfig, TransferError
from model.sampling import sample_with_logprob
from prefill.jobs import PrefillConfig, PrefillJob, PrefillResult, PrefillStats

__all__ = ["PrefillConfig", "PrefillJob", "PrefillResult", "PrefillStage", "PrefillStats"]


class _Cancelled(Exception):
    """Raised inside ``on_layer`` to stop the engine mid-prefill for a cancelled job."""


@dataclass
class _Task:
    """A job and how far it got."""

    job: PrefillJob
    future: Future[PrefillResult] = field(default_factory=Future)
    is_started: bool = False  # pages allocated, sink open
    num_cached: int = 0  # prompt tokens taken from the prefix cache
    num_computed: int = 0  # prompt tokens whose KV is written (cached prefix included)
    sink: OutboundKV | None = None  # the transfer to the job's decode receiver
    is_cancelled: bool = False
    is_released: bool = False  # sink closed or aborted, pages freed, future resolved
    block_hashes: list[int] = field(default_factory=list)  # of the prompt's full blocks
    num_skipped: int = 0  # steps in a row whose budget ran out before this job
    t_submit: float = field(default_factory=time.monotonic)
    t_start: float = 0.0  # pages allocated, first chunk next
    t_computed: float = 0.0  # last chunk computed (first token sampled)
    first_logprob: TokenLogprob | None = None  # when the job's sampling asks for logprobs
    forks_first: list[tuple[int, TokenLogprob | None]] = field(default_factory=list)

    @property
    def num_prompt(self) -> int:
        return len(self.job.prompt_ids)


class PrefillStage:
    """Chunked prefill for one instance. ``submit``/``cancel``/``stats`` are thread-safe;
    ``step`` runs on one loop thread."""

    def __init__(
        self,
        engine,
        config: PrefillConfig = PrefillConfig(),
        transfer: TransferConfig = TransferConfig(),
    ) -> None:
        self.engine = engine
        self.config = config
        self.cache = engine.cache
        self.allocator = self.cache.allocator
        self._outbox = KVOutbox(engine.config, engine.cache, transfer)
        self._closer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prefill-close")
        self._lock = threading.Lock()  # queue and task state
        self._has_work = threading.Condition(self._lock)
        self._cache_lock = threading.Lock()  # allocator + prefix cache
        self._queue: deque[_Task] = deque()
        self._tasks: dict[str, _Task] = {}
        self._running: _Task | None = None  # the task inside an engine call right now
        self.prefix_cache = PrefixCache(self.allocator) if config.enable_prefix_cache else None
        self._throughput = RateMeter(config.throughput_halflife_s)
        self._num_prompt_tokens = 0
        self._num_cached_tokens = 0
        self._num_completed = 0
        self._num_failed = 0
        self._num_sent_bytes = 0  # KV bytes receivers confirmed
        self._transfer_s = 0.0  # seconds those transfers took (open -> verified close)

    # ---- API (any thread) -------------------------------------------------------------------
    def submit(self, job: PrefillJob) -> Future[PrefillResult]:
        """Queue a job; a job that cannot run resolves at once with ``error`` set."""
        task = _Task(job)
        if self.prefix_cache is not None:  # hashed here, on the caller's thread, once
            task.block_hashes = self.prefix_cache.hashes_of(job.prompt_ids)
        max_tokens = self.allocator.num_pages * self.allocator.page_size
        if len(job.prompt_ids) > max_tokens:
            self._resolve(
                task,
                error=f"prompt of {len(job.prompt_ids)} tokens exceeds this instance's "
                f"{max_tokens}-token KV cache; raise num_pages or route elsewhere",
            )
            return task.future
        with self._lock:
            if job.request_id in self._tasks:
                raise ValueError(f"request {job.request_id!r} is already queued for prefill")
            self._tasks[job.request_id] = task
            self._queue.append(task)
            self._has_work.notify_all()
        return task.future

    def cancel(self, request_id: str) -> None:
        """Drop a queued or running job and free its pages (idempotent)."""
        with self._lock:
            task = self._tasks.get(request_id)
            if task is None or task.is_cancelled:
                return
            task.is_cancelled = True
            if task is self._running:
                return  # the step thread stops it at the next layer boundary and cleans up
            if task in self._queue:
                self._queue.remove(task)
            del self._tasks[request_id]
        self._release(task, error="cancelled")  # a draining transfer is aborted

    def stats(self) -> PrefillStats:
        with self._lock:
            tasks = list(self._queue)
            num_sending = len(self._tasks) - len(tasks)
        with self._cache_lock:
            queued_tokens = sum(
                t.num_prompt
                - (
                    t.num_computed
                    if t.is_started or self.prefix_cache is None
                    else self.prefix_cache.peek(t.block_hashes, t.num_prompt)
                )
                for t in tasks
            )
            hashes = self.prefix_cache.block_hashes() if self.prefix_cache else frozenset()
            num_free, num_used = self.allocator.num_free_pages, self.allocator.num_used_pages
        return PrefillStats(
            num_queued=len(tasks),
            num_sending=num_sending,
            num_queued_tokens=queued_tokens,
            num_cached_blocks=len(hashes),
            cached_block_hashes=tuple(hashes),
            num_free_pages=num_free,
            num_used_pages=num_used,
            num_prompt_tokens=self._num_prompt_tokens,
            num_cached_tokens=self._num_cached_tokens,
            num_completed=self._num_completed,
            num_failed=self._num_failed,
            tokens_per_s=self._throughput.rate,
        )

    def state(self) -> StageState:
        """``stats()`` in the cluster's vocabulary (the ``Stage`` protocol)."""
        s = self.stats()
        return StageState(
            num_free_pages=s.num_free_pages,
            num_used_pages=s.num_used_pages,
            num_queued=s.num_queued + s.num_sending,
            num_queued_tokens=s.num_queued_tokens,
            num_cached_blocks=s.num_cached_blocks,
            num_prompt_tokens=s.num_prompt_tokens,
            num_cached_tokens=s.num_cached_tokens,
            prefill_tokens_per_s=s.tokens_per_s or None,
            num_transfer_bytes=self._num_sent_bytes,
            transfer_s=self._transfer_s,
            cached_block_hashes=s.cached_block_hashes,
        )

    def is_idle(self) -> bool:
        """No job queued, computing, or draining its transfer."""
        with self._lock:
            return not self._tasks

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block until a job is queued (or ``timeout_s`` passes); for the loop thread after
        ``step()`` returned False. True if there is work."""
        with self._has_work:
            if not self._queue:
                self._has_work.wait(timeout_s)
            return bool(self._queue)

    def close(self) -> None:
        """Fail every queued job, abort draining transfers, drop the prefix cache, close the
        transfer channels. Call it after the loop thread stopped stepping."""
        with self._lock:
            request_ids = list(self._tasks)
        for rid in request_ids:
            self.cancel(rid)
        self._closer.shutdown(wait=True)
        if self.prefix_cache is not None:
            with self._cache_lock:
                self.prefix_cache.clear()
        self._outbox.close()

    # ---- the loop (one thread) --------------------------------------------------------------
    def step(self) -> bool:
        """Spend one step's cost budget (``PrefillConfig.chunk_cost``) on the queued jobs in
        ``_order``. True if any work.

        A long prompt takes a chunk per step, sized so that its attention over the cached
        prefix fits the budget; the jobs with the least left to compute go first, so a short
        prompt that arrives while a 256K one is being prefilled waits about one step; a job the
        budget skipped ``max_skipped_steps`` steps in a row goes first, so none starves.
        """
        budget = float(self.config.token_budget)
        num_tokens = 0
        t0 = time.perf_counter()
        order = self._order()
        for i, task in enumerate(order):
            if budget <= 0:
                for skipped in order[i:]:
                    skipped.num_skipped += 1
                break
            if num_tokens and self._min_cost(task) > budget:
                task.num_skipped += 1  # its smallest chunk would overrun the step
                continue
            if not self._claim(task):
                continue
            try:
                if not task.is_started and not self._start(task):
                    break  # no pages yet: this job waits, and so does everyone after it
                n, cost = self._advance(task, budget)
                num_tokens += n
                budget -= cost
                task.num_skipped = 0
            finally:
                self._settle(task)
        if num_tokens:
            self._throughput.add(num_tokens, time.perf_counter() - t0)
        return num_tokens > 0

    def _order(self) -> list[_Task]:
        """Queued jobs in service order: those the budget skipped ``max_skipped_steps`` steps in
        a row first (most skipped first), then least left to compute (an unstarted job counts
        its whole prompt), then arrival."""
        with self._lock:
            tasks = list(self._queue)
        patience = self.config.max_skipped_steps

        def key(t: _Task) -> tuple[int, int]:
            starving = t.num_skipped if t.num_skipped >= patience else 0
            return -starving, t.num_prompt - t.num_computed

        return sorted(tasks, key=key)

    def _min_cost(self, task: _Task) -> float:
        """Cost of the smallest chunk ``task`` may take next."""
        return self.config.chunk_cost(task.num_computed, self.config.min_chunk_tokens)

    def _claim(self, task: _Task) -> bool:
        """Mark ``task`` as the one inside an engine call; False if it left the queue."""
        with self._lock:
            if task not in self._queue or task.is_cancelled:
                return False
            self._running = task
            return True

    def _settle(self, task: _Task) -> None:
        """After the step thread let go of a task: finish it if it was cancelled meanwhile."""
        with self._lock:
            self._running = None
            is_cancelled = task.is_cancelled and not task.future.done()
        if is_cancelled:
            self._finish(task, error="cancelled")

    def _start(self, task: _Task) -> bool:
        """Allocate pages (sharing the cached prefix), open the sink, send the cached prefix."""
        job = task.job
        try:
            with self._cache_lock:
                num_cached = allocate_sequence(
                    self.allocator,
                    self.prefix_cache,
                    job.request_id,
                    task.num_prompt,
                    task.num_prompt,
                    task.block_hashes,
                )
        except Exception as e:  # e.g. the id already holds pages here: fail it, free nothing
            self._finish(task, error=f"cannot allocate KV pages: {type(e).__name__}: {e}")
            return True
        if num_cached is None:
            return False
        task.is_started = True
        task.t_start = time.monotonic()
        task.num_cached = task.num_computed = num_cached
        try:
            if job.kv_address is not None:
                task.sink = self._outbox.open(
                    job.request_id, job.request_id, job.kv_address, task.num_prompt, job.kv_format
                )
            if task.sink is not None and num_cached > 0:
                task.sink.send_prefix(num_cached)  # in bounded pieces, layer by layer
        except Exception as e:  # a transfer failure is an answer, not a crash
            self._finish(task, error=f"KV transfer to {job.kv_address} failed: {e}")
        return True

    def _advance(self, task: _Task, budget: float) -> tuple[int, float]:
        """Compute the next chunk of a started task, as many tokens as ``budget`` pays for at
        its prefix (at least ``PrefillConfig.min_chunk_tokens``); (tokens, cost)."""
        if task.future.done():  # failed in _start
            return 0, 0.0
        job = task.job
        start = task.num_computed
        end = min(task.num_prompt, start + self.config.chunk_tokens(start, budget))

        def on_layer(layer: int, lo: int, hi: int) -> None:
            if task.is_cancelled:
                raise _Cancelled
            if task.sink is not None:
                task.sink.send_layer(layer, lo, hi)

        try:
            logits = self.engine.prefill(
                job.request_id, job.prompt_ids[start:end], start_pos=start, on_layer=on_layer
            )
            task.num_computed = end
            if end == task.num_prompt:
                self._complete(task, logits)
        except _Cancelled:
            self._finish(task, error="cancelled")
        except TransferError as e:  # the ingress re-routes on any error
            self._finish(task, error=f"KV transfer to {job.kv_address} failed: {e}")
        except Exception as e:
            self._finish(task, error=f"prefill failed: {type(e).__name__}: {e}")
        return end - start, self.config.chunk_cost(start, end - start)

    def _complete(self, task: _Task, logits: torch.Tensor) -> None:
        """Cache the prompt's blocks (valid even if the transfer fails: a re-routed request may
        come back here), sample the first token, free the pages, hand the transfer's end to a
        closer thread."""
        if self.prefix_cache is not None:
            with self._cache_lock:
                table = self.allocator.block_table(task.job.request_id)
                self.prefix_cache.insert(task.block_hashes, table)
        first_token_id, task.first_logprob = sample_with_logprob(logits, task.job.sampling, 0)
        task.forks_first = [sample_with_logprob(logits, s, 0) for s in task.job.fork_sampling]
        task.t_computed = time.monotonic()
        self._num_prompt_tokens += task.num_prompt
        self._num_cached_tokens += task.num_cached
        if task.sink is None:
            self._finish(task, first_token_id=first_token_id)
            return
        # The sender holds every record it was given, so the pages can go now; the transfer
        # drains on a closer thread while this thread starts the next prompt.
        with self._lock:
            self._queue.remove(task)
        with self._cache_lock:
            self.allocator.free(task.job.request_id)
        task.is_started = False
        self._closer.submit(self._drain, task, first_token_id)

    def _drain(self, task: _Task, first_token_id: int) -> None:
        """Closer thread: wait for the receiver to hold the verified KV, then resolve."""
        sink = task.sink
        try:
            if sink is not None:
                sent = sink.close()  # raises if the transfer failed (or was aborted by a cancel)
                with self._lock:
                    self._num_sent_bytes += sent.wire_bytes
                    self._transfer_s += sent.seconds
            error = None
        except Exception as e:
            error = f"KV transfer to {task.job.kv_address} failed: {e}"
        if task.is_cancelled:
            error = "cancelled"
        task.sink = None if error is None else task.sink
        self._finish(task, first_token_id, error)

    def _finish(self, task: _Task, first_token_id: int = -1, error: str | None = None) -> None:
        with self._lock:
            if self._tasks.get(task.job.request_id) is task:
                del self._tasks[task.job.request_id]
            if task in self._queue:
                self._queue.remove(task)
        self._release(task, first_token_id, error)

    def _release(self, task: _Task, first_token_id: int = -1, error: str | None = None) -> None:
        """Abort the sink on error, free the sequence's pages, resolve the future (once)."""
        with self._lock:
            if task.is_released:
                return
            task.is_released = True
        if task.sink is not None:
            try:
                task.sink.abort(error or "aborted")
            except Exception:  # the sink is already broken; nothing more to tell the peer
                pass
            task.sink = None
        if task.is_started:
            with self._cache_lock:
                self.allocator.free(task.job.request_id)
        if error is not None:
            self._num_failed += 1
        else:
            self._num_completed += 1
        self._resolve(task, first_token_id, error)

    def _resolve(self, task: _Task, first_token_id: int = -1, error: str | None = None) -> None:
        if task.future.done():
            return
        now = time.monotonic()
        t_start = task.t_start or now
        t_computed = task.t_computed or now
        ok = error is None
        task.future.set_result(
            PrefillResult(
                request_id=task.job.request_id,
                first_token_id=first_token_id if error is None else -1,
                first_logprob=task.first_logprob if error is None else None,
                fork_first_token_ids=tuple(t for t, _ in task.forks_first) if ok else (),
                fork_first_logprobs=tuple(lp for _, lp in task.forks_first) if ok else (),
                num_prompt_tokens=task.num_prompt,
                num_cached_tokens=task.num_cached,
                error=error,
                queue_s=t_start - task.t_submit,
                compute_s=t_computed - t_start,
                transfer_tail_s=now - t_computed,
            )
        )
