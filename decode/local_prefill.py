"""Prefill on the decode instance itself: decode-local prefill and the colocated MixedStage.

Prompts are computed in chunks, a token budget per step, between decode steps, so sequences
already decoding keep their inter-token latency while a prompt is being prefilled. Pages for the
whole request (prompt + max_tokens) are allocated up front, the same reservation a transferred
request gets, so a running sequence never runs out of pages and nothing is ever preempted. A
request's further choices (``DecodeSeq.forks``) get theirs at the same moment, sharing the
prompt's full pages: the prompt is prefilled once and they fork from it.
"""

from __future__ import annotations

import threading
import time

import torch

from common.meter import RateMeter
from common.pages import num_fork_pages
from common.prefix_cache import PrefixCache, allocate_sequence
from decode.batch import DecodeSeq, SeqState


class LocalPrefill:
    """Page allocation and chunked prefill for sequences prefilled here (step thread only,
    except that allocator changes take ``cache_lock``)."""

    def __init__(
        self, engine, cache_lock: threading.RLock, prefix_cache: PrefixCache | None
    ) -> None:
        self.engine = engine
        self.allocator = engine.cache.allocator
        self.cache_lock = cache_lock
        self.prefix_cache = prefix_cache
        self.num_prefill_tokens = 0
        self.num_cached_tokens = 0
        self.throughput = RateMeter()

    def can_ever_fit(self, seq: DecodeSeq, num_forks: int = 0) -> bool:
        need = self.allocator.pages_needed(seq.job.num_tokens) + num_forks * self._fork_pages(seq)
        return need <= self.allocator.num_pages

    def allocate(self, seq: DecodeSeq) -> bool:
        """Reserve pages for the whole request and each of its forks, sharing a cached prefix;
        False (nothing held) if they are not all free now."""
        hashes = self._hashes(seq)  # outside the lock: the receiver's threads wait on it
        fork_ids = [f.request_id for f in seq.forks if f.state is SeqState.FORKING]
        with self.cache_lock:
            num_cached = allocate_sequence(
                self.allocator,
                self.prefix_cache,
                seq.request_id,
                seq.job.num_tokens,
                seq.prompt_len,
                hashes,
            )
            if num_cached is None:
                return False
            need = len(fork_ids) * self._fork_pages(seq)
            if need > self.allocator.num_free_pages and self.prefix_cache is not None:
                self.prefix_cache.ensure_free(need)
            if need > self.allocator.num_free_pages:
                self.allocator.free(seq.request_id)
                return False
            for fork_id in fork_ids:
                self.allocator.fork(seq.request_id, fork_id, seq.job.num_tokens, seq.prompt_len)
        seq.num_cached = seq.num_computed = num_cached
        return True

    def _fork_pages(self, seq: DecodeSeq) -> int:
        return num_fork_pages(seq.prompt_len, seq.job.num_tokens, self.allocator.page_size)

    def run_chunk(self, seq: DecodeSeq, max_tokens: int) -> torch.Tensor | None:
        """Compute up to ``max_tokens`` more prompt tokens; the last-token logits [vocab] when
        the prompt is complete, else None."""
        start = seq.num_computed
        end = min(seq.prompt_len, start + max_tokens)
        t0 = time.perf_counter()
        logits = self.engine.prefill(seq.request_id, seq.job.prompt_ids[start:end], start_pos=start)
        self.throughput.add(end - start, time.perf_counter() - t0)
        seq.num_computed = end
        if end < seq.prompt_len:
            return None
        self.num_prefill_tokens += seq.prompt_len
        self.num_cached_tokens += seq.num_cached
        if self.prefix_cache is not None:
            with self.cache_lock:
                table = self.allocator.block_table(seq.request_id)
                self.prefix_cache.insert(self._hashes(seq), table)
        return logits

    def _hashes(self, seq: DecodeSeq) -> list[int]:
        if self.prefix_cache is None:
            return []
        if seq.block_hashes is None:
            seq.block_hashes = self.prefix_cache.hashes_of(seq.job.prompt_ids)
        return seq.block_hashes

    def make_room(self, num_pages: int) -> None:
        """Evict cached prefix blocks so ``num_pages`` pages are free, if it can (before a
        transfer reserves pages)."""
        if self.prefix_cache is not None:
            with self.cache_lock:
                self.prefix_cache.ensure_free(num_pages)

    def clear(self) -> None:
        if self.prefix_cache is not None:
            with self.cache_lock:
                self.prefix_cache.clear()
