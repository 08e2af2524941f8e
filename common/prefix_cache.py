"""Prefix cache of latent KV pages: ``common.prefix.BlockLRU`` plus the page references.

A block is one full page (``page_size`` tokens), named by its chained block hash, so equal hashes
mean equal prefixes. The cache holds one allocator reference per cached page: a new sequence with
a cached prefix gets those pages as ``shared_pages`` and computes only the suffix, and a cached
page outlives the sequence that wrote it. Eviction (LRU, leaves first) happens when the stage
needs free pages. Plain Python; callers hold the cache lock around every call.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.pages import PageAllocator
from common.prefix import BlockLRU, block_hashes


class PrefixCache:
    """Cached full KV pages of earlier prompts, keyed by chained block hash."""

    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size
        self._lru = BlockLRU(capacity=allocator.num_pages)

    @property
    def num_blocks(self) -> int:
        return len(self._lru)

    def block_hashes(self) -> frozenset[int]:
        return self._lru.hashes()

    @property
    def num_hit_blocks(self) -> int:
        return self._lru.num_hit_blocks

    def hashes_of(self, token_ids: Sequence[int]) -> list[int]:
        """Chained hashes of every full block of a prompt (compute once per prompt)."""
        return block_hashes(token_ids, self.page_size)

    def _cacheable(self, hashes: Sequence[int], prompt_len: int) -> Sequence[int]:
        # The last prompt token is always computed: the stage needs its logits.
        return hashes[: (prompt_len - 1) // self.page_size]

    def peek(self, hashes: Sequence[int], prompt_len: int) -> int:
        """Prompt tokens a prefill would take from the cache, touching nothing."""
        return self._lru.peek(self._cacheable(hashes, prompt_len)) * self.page_size

    def match(self, hashes: Sequence[int], prompt_len: int) -> list[int]:
        """Pages of the longest cached prefix (whole blocks; the last token stays uncached).
        The caller passes them as ``shared_pages`` to ``allocate``, which takes its own refs."""
        return self._lru.match(self._cacheable(hashes, prompt_len))

    def insert(self, hashes: Sequence[int], block_table: Sequence[int]) -> int:
        """Offer every full block of a prefilled sequence; returns the blocks newly cached."""
        result = self._lru.insert(hashes, list(block_table[: len(hashes)]))
        self.allocator.retain([page for _, page in result.added])
        self.allocator.release([page for _, page in result.evicted])
        return len(result.added)

    def ensure_free(self, num_pages: int) -> bool:
        """Evict LRU blocks until the allocator has ``num_pages`` free pages; False if it can't
        (the rest are held by running sequences)."""
        while self.allocator.num_free_pages < num_pages and len(self._lru):
            for _, page in self._lru.evict(1):
                self.allocator.release([page])
        return self.allocator.num_free_pages >= num_pages

    def clear(self) -> None:
        """Drop every block and its page reference (role change, shutdown)."""
        self.allocator.release([page for _, page in self._lru.clear()])


def allocate_sequence(
    allocator: PageAllocator,
    prefix_cache: PrefixCache | None,
    seq_id: str,
    num_tokens: int,
    prompt_len: int,
    hashes: Sequence[int] = (),
) -> int | None:
    """Reserve pages for ``num_tokens`` tokens of a sequence whose prompt (``prompt_len``
    tokens, full-block ``hashes``) comes first, sharing the cached prefix's pages; evicts cached
    blocks if pages are short.

    Returns the number of prompt tokens whose KV is already there (a multiple of the page size),
    or None when the pages are not free now (the caller retries later). Caller holds the lock.
    """
    shared = prefix_cache.match(hashes, prompt_len) if prefix_cache is not None else []
    need = allocator.pages_needed(num_tokens) - len(shared)
    if need > allocator.num_free_pages:
        if prefix_cache is None:
            return None
        allocator.retain(shared)  # evicting these blocks must not free the pages we share
        is_room = prefix_cache.ensure_free(need)
        if is_room:
            allocator.allocate(seq_id, num_tokens, shared_pages=shared)
        allocator.release(shared)
        return len(shared) * allocator.page_size if is_room else None
    allocator.allocate(seq_id, num_tokens, shared_pages=shared)
    return len(shared) * allocator.page_size
