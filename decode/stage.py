"""The decode stage: continuous batching over the paged latent cache, with token streaming.

One request (disaggregated):
1. ``reserve(request_id, num_tokens, lease_s)`` reserves pages in the KV receiver for prompt +
   max_tokens and returns its address; the prefill instance streams the prompt's KV there.
2. ``start(job)`` with the first token the prefill sampled: once the transfer is complete and
   verified (normally already so) the first token is streamed and the sequence joins the batch;
   a failed or expired transfer ends it with an error and no token.
3. Every ``step()`` runs one ``engine.decode`` over the batch and samples each sequence's next
   token; stop conditions end sequences, whose pages are freed at once.
4. ``poll(request_id, cursor, timeout_s)`` hands the reader every token since its cursor.
A job with ``first_token_id=None`` is prefilled here first (decode-local prefill): pages are
allocated locally and the prompt is computed in chunks interleaved with decode steps.

Threads: ``reserve/start/poll/cancel/stats`` come from actor threads, ``step`` from one loop
thread, and the KV receiver writes into the cache from gRPC threads. ``_lock`` guards the
stage's bookkeeping and is never held across an engine call; allocator changes take the
receiver's ``cache_lock`` (always after ``_lock``). A sequence inside an engine call is *busy*:
``cancel`` marks it and the step thread frees its pages when the call returns, so pages are
never reused while the engine still writes to them.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

from common.meter import MeanMeter
from common.pages import pages_for_choices
from common.prefix_cache import PrefixCache
from common.sampling import TokenLogprob
from common.stage import StageState
from decode.batch import DecodeSeq, SeqState, select_batch, stop_ids_for
from decode.jobs import DecodeConfig, DecodeJob, DecodeStats, TokenBatch
from decode.local_prefill import LocalPrefill
from decode.reservations import Reservations
from decode.streams import TokenStreams
from model.sampling import sample_token, sample_with_logprob, token_logprob

__all__ = ["DecodeConfig", "DecodeJob", "DecodeStage", "DecodeStats", "TokenBatch"]

_MAINTENANCE_INTERVAL_S = 0.5  # expiring reservations, dropping old streams: not every step


def eos_token_ids(engine) -> tuple[int, ...]:
    """EOS ids from the model config and the tokenizer (either may list them)."""
    ids = set(getattr(engine.config, "eos_token_ids", ()) or ())
    ids.update(getattr(getattr(engine, "tokenizer", None), "eos_token_ids", ()) or ())
    return tuple(sorted(ids))


class DecodeStage:
    """Continuous batching for one decode instance (``receiver`` is its ``KVReceiver``; None
    for an instance that only prefills locally)."""

    def __init__(self, engine, config: DecodeConfig = DecodeConfig(), receiver=None) -> None:
        self.engine = engine
        self.config = config
        self.receiver = receiver
        assert receiver is None or receiver.cache is engine.cache, (
            "the KV receiver must write into this engine's cache"
        )
        self.allocator = engine.cache.allocator
        self.cache_lock = receiver.cache_lock if receiver is not None else threading.RLock()
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._streams = TokenStreams(config.finished_ttl_s)
        self._seqs: dict[str, DecodeSeq] = {}  # every unfinished sequence
        self._waiting: deque[DecodeSeq] = deque()  # WAITING_KV / WAITING_PAGES / READY
        self._prefilling: deque[DecodeSeq] = deque()
        self._running: list[DecodeSeq] = []
        self._busy: set[str] = set()
        self._reservations = (
            Reservations(receiver, self.allocator, config.reserve_grace_s, self._notify)
            if receiver is not None
            else None
        )
        prefix = PrefixCache(self.allocator) if config.enable_prefix_cache else None
        self._local = LocalPrefill(engine, self.cache_lock, prefix)
        self._eos_token_ids = eos_token_ids(engine)
        self._batch_size = 0
        self._num_steps = 0
        self._num_generated = 0
        self._num_finished = 0
        self._next_maintenance = 0.0
        self._step_time = MeanMeter()
        self._abandoned: list[str] = []  # ended here for want of a reader (see take_abandoned)

    # ---- API (any thread) -------------------------------------------------------------------
    def reserve(
        self,
        request_id: str,
        num_tokens: int,
        lease_s: float,
        num_choices: int = 1,
        prompt_len: int = 0,
    ) -> str:
        """Reserve KV pages for an incoming transfer; returns the receiver's "host:port".
        ``num_choices`` > 1 also reserves the further choices' pages (sharing the full pages of
        the ``prompt_len``-token prompt). Raises ``OutOfPagesError`` when the pages are not free
        (the scheduler picks another)."""
        if self._reservations is None:
            raise RuntimeError(
                "this stage has no KV receiver; start() the job with first_token_id=None to "
                "prefill it here"
            )
        with self._lock:
            if request_id in self._seqs:
                raise ValueError(f"request {request_id!r} is already running here")
        page_size = self.allocator.page_size
        self._local.make_room(pages_for_choices(prompt_len, num_tokens, num_choices, page_size))
        return self._reservations.add(request_id, num_tokens, lease_s, num_choices, prompt_len)

    def start(self, job: DecodeJob) -> None:
        """Add a request. With ``first_token_id`` its KV must come from a ``reserve``d transfer;
        without, the prompt is prefilled here. Problems end the request with an error that
        ``poll`` reports; only a duplicate request id raises.

        A job with ``forks`` adds every choice (``job.choice_ids``): choice 0 receives or
        prefills the prompt's KV, and the moment it is complete the others fork from it
        (``_settle_forks``). Choice 0 ending before then (cancelled, transfer failed) ends them
        too: they have no KV of their own to go on with."""
        rid = job.request_id
        stop_ids = stop_ids_for(job, self._eos_token_ids)
        seq = DecodeSeq(job, stop_ids, SeqState.WAITING_PAGES)
        forks = [
            DecodeSeq(job.fork_job(i), stop_ids, SeqState.FORKING)
            for i in range(1, job.num_choices)
        ]
        error, ended = None, []
        with self._lock:
            taken = [i for i in job.choice_ids if i in self._seqs]
            if taken:
                raise ValueError(f"request {taken[0]!r} is already running here")
            for choice in job.choice_ids:
                self._streams.open(choice)
            reserved = self._reservations.take(rid) if self._reservations else None
            reservation, fork_ids = reserved if reserved is not None else (None, [])
            if job.first_token_id is None:
                if not self._local.can_ever_fit(seq, len(forks)):
                    error = (
                        f"request needs {job.num_tokens} tokens of KV for each of its "
                        f"{job.num_choices} choices, more than this instance's "
                        f"{self.allocator.num_pages * self.allocator.page_size}"
                    )
            elif reservation is None:
                error = "no KV reservation for this request here: reserve() before start()"
            elif reservation.num_tokens < job.num_tokens:
                error = (
                    f"the reservation holds {reservation.num_tokens} tokens but prompt + "
                    f"max_tokens is {job.num_tokens}: reserve prompt_len + max_tokens"
                )
            elif len(fork_ids) != len(forks):
                error = (
                    f"the reservation holds pages for {len(fork_ids) + 1} choices, the job has "
                    f"{job.num_choices}: reserve with num_choices={job.num_choices}"
                )
            else:
                seq.state, seq.reservation = SeqState.WAITING_KV, reservation
            if error is None:
                self._seqs[rid] = seq
                self._waiting.append(seq)
                seq.forks = forks
                for fork in forks:
                    self._seqs[fork.request_id] = fork
                if seq.state is SeqState.WAITING_KV:
                    ended = self._check_transfer(seq)
                self._has_work.notify_all()
        if reserved is not None and (job.first_token_id is None or error is not None):
            self._reservations.release(rid, fork_ids)  # prefilled here after all, or unusable
        if error is not None:
            for choice in job.choice_ids:
                self._streams.finish(choice, "abort", error)
        for s in ended:
            self._free(s)

    def poll(self, request_id: str, cursor: int, timeout_s: float) -> TokenBatch:
        """Every token past ``cursor`` (blocks up to ``timeout_s`` for the first one)."""
        return self._streams.poll(request_id, cursor, timeout_s)

    def cancel(self, request_id: str, error: str | None = None) -> None:
        """Stop a request and free its pages and batch slot; idempotent. ``error`` is what a
        late poll reports."""
        if self._reservations is not None:
            self._reservations.drop(request_id)
        with self._lock:
            seq = self._seqs.get(request_id)
            is_busy = request_id in self._busy
            if seq is not None:
                seq.is_cancelled = True
                if not is_busy:
                    self._detach(seq)
        if seq is not None:
            self._streams.finish(request_id, "abort", error)
            if not is_busy:
                self._free(seq)

    def take_abandoned(self) -> list[str]:
        """Requests this stage ended because nobody came for them (a reservation never
        started, a stream nobody polled for ``reader_timeout_s``: the ingress that drove them
        died), since the last call; the worker tells the scheduler, whose books still hold
        them."""
        with self._lock:
            ids, self._abandoned = self._abandoned, []
        return ids

    def stats(self) -> DecodeStats:
        with self._lock:
            waiting = list(self._waiting)
            num_running, num_prefilling = len(self._running), len(self._prefilling)
            local = [s for s in waiting if s.state is SeqState.WAITING_PAGES]
            queued_prefill = sum(
                s.prompt_len - s.num_computed for s in local + list(self._prefilling)
            )
            pending = self._reservations.pending() if self._reservations else []
            pending += [
                s.reservation
                for s in waiting
                if s.state is SeqState.WAITING_KV and not s.reservation.done()
            ]
        with self.cache_lock:
            num_free, num_used = self.allocator.num_free_pages, self.allocator.num_used_pages
            prefix = self._local.prefix_cache
            hashes = tuple(prefix.block_hashes()) if prefix is not None else ()
        return DecodeStats(
            num_free_pages=num_free,
            num_used_pages=num_used,
            num_total_pages=self.allocator.num_pages,
            num_reserved_unfilled_pages=sum(
                self.allocator.pages_needed(r.num_tokens) for r in pending
            ),
            num_running=num_running,
            num_waiting=len(waiting) + num_prefilling,
            num_queued_prefill_tokens=queued_prefill,
            num_transferring=len(pending),
            max_batch_size=self.config.max_batch_size,
            batch_size=self._batch_size,
            decode_step_s=self._step_time.value,
            prefill_tokens_per_s=self._local.throughput.rate,
            cached_block_hashes=hashes,
            num_steps=self._num_steps,
            num_generated_tokens=self._num_generated,
            num_finished=self._num_finished,
            num_prefill_tokens=self._local.num_prefill_tokens,
            num_cached_tokens=self._local.num_cached_tokens,
        )

    def state(self) -> StageState:
        """``stats()`` in the cluster's vocabulary (the ``Stage`` protocol)."""
        s = self.stats()
        return StageState(
            num_free_pages=s.num_free_pages,
            num_used_pages=s.num_used_pages,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_queued_tokens=s.num_queued_prefill_tokens,
            num_cached_blocks=len(s.cached_block_hashes),
            num_prompt_tokens=s.num_prefill_tokens,
            num_cached_tokens=s.num_cached_tokens,
            num_generated_tokens=s.num_generated_tokens,
            num_steps=s.num_steps,
            prefill_tokens_per_s=s.prefill_tokens_per_s,
            decode_step_s=s.decode_step_s,
            num_reserved_unfilled_pages=s.num_reserved_unfilled_pages,
            cached_block_hashes=s.cached_block_hashes,
        )

    def is_idle(self) -> bool:
        """No sequence running, waiting, or with KV still arriving."""
        s = self.stats()
        return s.num_running == 0 and s.num_waiting == 0 and s.num_transferring == 0

    def close(self) -> None:
        """Cancel every request and reservation and drop the prefix cache (shutdown, role
        change). Call it after the loop thread stopped stepping."""
        with self._lock:
            request_ids = list(self._seqs)
        if self._reservations is not None:
            request_ids += self._reservations.request_ids()
        for rid in request_ids:
            self.cancel(rid)
        self._local.clear()

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block until a step would do something (or ``timeout_s`` passes); for the loop thread
        after ``step()`` returned False. True if there is work."""
        with self._has_work:
            if not self._is_idle():
                return True
            self._has_work.wait(timeout_s)
            return not self._is_idle()

    # ---- the loop (one thread) --------------------------------------------------------------
    def step(self) -> bool:
        """Admit ready sequences, prefill local prompts (a token budget), decode one token for
        the batch. True if it did any work."""
        self._admit()
        did_prefill = self._prefill()
        did_decode = self._decode()
        now = time.monotonic()
        if now >= self._next_maintenance:
            self._next_maintenance = now + _MAINTENANCE_INTERVAL_S
            expired = self._reservations.expire() if self._reservations is not None else []
            self._streams.collect_garbage()
            unread = self._streams.unread_since(now - self.config.reader_timeout_s)
            for rid in unread:
                self.cancel(rid, f"no reader polled for {self.config.reader_timeout_s:g}s")
            with self._lock:
                self._abandoned += expired + unread
        return did_prefill or did_decode

    def _admit(self) -> None:
        """Waiting -> running (KV arrived) or -> prefilling (pages allocated), oldest first,
        up to ``max_batch_size`` sequences in all."""
        ended: list[DecodeSeq] = []
        with self._lock:
            is_blocked = False  # a local prompt waits for pages: later ones wait behind it
            for seq in list(self._waiting):
                if seq.state is SeqState.WAITING_KV:
                    over = self._check_transfer(seq)
                    ended += over
                    if seq in over:
                        continue
                num_free_slots = (
                    self.config.max_batch_size - len(self._running) - len(self._prefilling)
                )
                if num_free_slots <= 0:
                    continue  # no slot: still look for transfers that ended
                if seq.state is SeqState.READY:
                    seq.state = SeqState.RUNNING
                    self._waiting.remove(seq)
                    self._running.append(seq)
                elif seq.state is SeqState.WAITING_PAGES and not is_blocked:
                    try:
                        is_allocated = self._local.allocate(seq)
                    except Exception as e:  # e.g. the id already holds pages: fail, free nothing
                        self._detach(seq)
                        error = f"cannot allocate KV pages: {type(e).__name__}: {e}"
                        self._streams.finish(seq.request_id, "abort", error)
                        continue
                    if is_allocated:
                        seq.state = SeqState.PREFILLING
                        self._waiting.remove(seq)
                        self._prefilling.append(seq)
                    else:
                        is_blocked = True
        for seq in ended:
            self._free(seq)

    def _check_transfer(self, seq: DecodeSeq) -> list[DecodeSeq]:
        """If a WAITING_KV sequence's transfer ended, make it READY and stream its first token
        (its forks fork now), or end it with the transfer's error. Returns the sequences that
        are over (the caller frees them). Caller holds _lock."""
        if not seq.reservation.done():
            return []
        error = seq.reservation.future.exception()
        if error is not None:
            self._detach(seq)
            self._streams.finish(seq.request_id, "abort", f"KV transfer failed: {error}")
            return [seq]
        ended = self._settle_forks(seq)
        seq.state = SeqState.READY
        if self._emit(seq, seq.job.first_token_id, seq.job.first_logprob):
            self._detach(seq)
            ended.append(seq)
        return ended

    def _settle_forks(self, seq: DecodeSeq, logits: torch.Tensor | None = None) -> list[DecodeSeq]:
        """Choice 0's prompt KV is complete (transferred, or prefilled here with last-token
        ``logits`` [vocab]), or it ended without it: its FORKING choices fork or end.

        A fork copies the prompt's partially filled last page into its own page (the full pages
        it already shares: ``PageAllocator.fork``), takes its first token (the prefill
        instance's, or sampled from ``logits`` with its own sampling) and waits READY for a
        batch slot. Returns the choices that are over (the caller frees them). Caller holds
        _lock (and never an engine call for these sequences: they are not busy)."""
        forks, seq.forks = [f for f in seq.forks if f.state is SeqState.FORKING], []
        if not forks:
            return []
        ended: list[DecodeSeq] = []
        if logits is None and not self._has_prompt_kv(seq):
            error = seq.reservation.future.exception() if seq.reservation is not None else None
            why = f"KV transfer failed: {error}" if error else "choice 0 ended before its KV"
            for fork in forks:
                self._detach(fork)
                self._streams.finish(fork.request_id, "abort", why)
            return forks
        page_size = self.allocator.page_size
        num_shared = seq.prompt_len // page_size * page_size
        with self.cache_lock:
            for fork in forks:
                self.engine.cache.copy_tokens(
                    seq.request_id, fork.request_id, num_shared, seq.prompt_len
                )
        for fork in forks:
            fork.num_computed, fork.num_cached = seq.prompt_len, seq.num_cached
            if logits is None:
                first = fork.job.first_token_id, fork.job.first_logprob
            else:
                first = sample_with_logprob(logits, fork.job.sampling, 0)
            fork.state = SeqState.READY
            if self._emit(fork, *first):
                self._detach(fork)
                ended.append(fork)
            else:
                self._waiting.append(fork)
        return ended

    @staticmethod
    def _has_prompt_kv(seq: DecodeSeq) -> bool:
        """The prompt's KV is complete in this cache (transferred: verified; local: computed)."""
        if seq.reservation is not None:
            return seq.reservation.done() and seq.reservation.future.exception() is None
        return seq.prompt_len > 0 and seq.num_computed == seq.prompt_len

    def _prefill(self) -> bool:
        """Local prefill of up to ``prefill_token_budget`` prompt tokens, oldest prompt first."""
        budget = self.config.prefill_token_budget
        did_work = False
        while budget > 0:
            with self._lock:
                if not self._prefilling:
                    break
                seq = self._prefilling[0]
                self._busy.add(seq.request_id)
            num_before = seq.num_computed
            error, logits, forks_over = None, None, []
            try:
                logits = self._local.run_chunk(seq, budget)
            except Exception as e:  # a failed request is an answer, not a dead loop
                error = f"prefill failed: {type(e).__name__}: {e}"
            budget -= seq.num_computed - num_before
            did_work = True
            with self._lock:
                self._busy.discard(seq.request_id)
                is_done = error is not None or logits is not None or seq.is_cancelled
                if logits is not None:  # the prompt's KV is complete: its choices fork
                    forks_over = self._settle_forks(seq, logits)
                if is_done:
                    self._prefilling.remove(seq)
                    if error is None and not seq.is_cancelled:
                        seq.state = SeqState.RUNNING
                        self._running.append(seq)
            for fork in forks_over:
                self._free(fork)
            if error is not None or seq.is_cancelled:
                self._end(seq, error)
            elif logits is not None and self._emit(
                seq, *sample_with_logprob(logits, seq.job.sampling, 0)
            ):
                self._end(seq)
        return did_work

    def _decode(self) -> bool:
        """One decode step for every running sequence whose reader keeps up."""
        with self._lock:
            batch = select_batch(self._running, self.config.max_batch_size, self._is_backlogged)
            self._busy.update(seq.request_id for seq in batch)
        self._batch_size = len(batch)
        if not batch:
            return False
        error, token_ids, logprobs = None, [], []
        t0 = time.perf_counter()
        try:
            logits = self.engine.decode(
                [seq.request_id for seq in batch],
                [seq.last_token_id for seq in batch],
                [seq.position for seq in batch],
            )  # [B, vocab]
            token_ids, logprobs = self._sample(batch, logits)
        except Exception as e:
            error = f"decode failed: {type(e).__name__}: {e}"
        with self._lock:
            self._busy.difference_update(seq.request_id for seq in batch)
        self._step_time.add(time.perf_counter() - t0)
        self._num_steps += 1
        for i, seq in enumerate(batch):
            if error is not None or seq.is_cancelled:
                self._end(seq, error)
            elif self._emit(seq, token_ids[i], logprobs[i]):
                self._end(seq)
        return True

    def _sample(
        self, batch: list[DecodeSeq], logits: torch.Tensor
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token per row: greedy rows with one argmax, the rest with their own generator;
        logprobs only for the rows that ask (the default path stays one argmax)."""
        token_ids = logits.argmax(dim=-1).tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(batch)
        for i, seq in enumerate(batch):
            params = seq.job.sampling
            if not params.is_greedy:
                token_ids[i] = sample_token(logits[i], params, seq.num_output)
            if params.num_logprobs is not None:
                logprobs[i] = token_logprob(logits[i], token_ids[i], params.num_logprobs)
        return token_ids, logprobs

    # ---- sequence lifecycle -----------------------------------------------------------------
    def _emit(self, seq: DecodeSeq, token_id: int, logprob: TokenLogprob | None = None) -> bool:
        """Apply a sampled token: stream it (with its logprob, if the request asked), end the
        stream on a stop condition. True if the sequence finished."""
        is_emitted, finish_reason = seq.accept(token_id)
        if is_emitted:
            self._streams.push(seq.request_id, token_id, logprob)
            self._num_generated += 1
        if finish_reason is None:
            return False
        self._streams.finish(seq.request_id, finish_reason)
        return True

    def _end(self, seq: DecodeSeq, error: str | None = None) -> None:
        """Take a sequence out of the stage and free its pages (step thread, not busy)."""
        with self._lock:
            self._detach(seq)
        self._streams.finish(seq.request_id, "abort", error)  # no-op if already finished
        self._free(seq)

    def _detach(self, seq: DecodeSeq) -> None:
        """Remove from every container (caller holds _lock)."""
        if self._seqs.get(seq.request_id) is seq:
            del self._seqs[seq.request_id]
            self._num_finished += 1
        for queue in (self._waiting, self._prefilling):
            if seq in queue:
                queue.remove(seq)
        if seq in self._running:
            self._running.remove(seq)
        seq.state = SeqState.FINISHED
        for fork in self._settle_forks(seq):  # choices waiting on this one's prompt KV
            self._free(fork)  # a fork holds no reservation: no receiver call under _lock

    def _free(self, seq: DecodeSeq) -> None:
        """Return a detached sequence's pages; aborts its transfer if the KV is still coming."""
        if seq.reservation is not None and not seq.reservation.done():
            self.receiver.cancel(seq.request_id, "request ended before its KV arrived")
        with self.cache_lock:
            self.allocator.free(seq.request_id)

    # ---- helpers ----------------------------------------------------------------------------
    def _is_backlogged(self, seq: DecodeSeq) -> bool:
        return self._streams.num_unread(seq.request_id) >= self.config.max_unread_tokens

    def _is_idle(self) -> bool:
        """Nothing a step could do now (caller holds _lock)."""
        if self._prefilling or any(not self._is_backlogged(s) for s in self._running):
            return False
        return not any(
            s.state is not SeqState.WAITING_KV or s.reservation.done() for s in self._waiting
        )

    def _notify(self) -> None:
        with self._has_work:
            self._has_work.notify_all()
