"""Page accounting for the paged latent KV cache. Plain Python: no torch, no Ray.

A sequence owns a list of pages (its block table); token ``p`` of the sequence lives in page
``block_table[p // page_size]`` at offset ``p % page_size``. Pages are reference counted so the
prefix cache can share full pages between sequences, and the ``n`` choices of one request can
share their prompt's pages (``fork``): a page returns to the free list only when its last holder
releases it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


class OutOfPagesError(RuntimeError):
    """Not enough free pages for a reservation."""


def num_fork_pages(prompt_len: int, num_tokens: int, page_size: int) -> int:
    """Private pages of one forked choice: everything after the prompt's full pages (the
    partially filled last prompt page is copied, so each choice writes its own)."""
    return -(-num_tokens // page_size) - prompt_len // page_size


def pages_for_choices(prompt_len: int, num_tokens: int, num_choices: int, page_size: int) -> int:
    """Pages ``num_choices`` choices of one prompt hold when they share its full pages: one
    whole reservation of ``num_tokens`` plus a private tail per further choice."""
    tail = num_fork_pages(prompt_len, num_tokens, page_size)
    return -(-num_tokens // page_size) + (num_choices - 1) * tail


class PageAllocator:
    """Free list plus per-sequence block tables, with reference counts for shared pages."""

    def __init__(self, num_pages: int, page_size: int = 64) -> None:
        assert num_pages > 0 and page_size > 0, "num_pages and page_size must be positive"
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() gives page 0 first
        self._ref: list[int] = [0] * num_pages
        self._tables: dict[Hashable, list[int]] = {}

    # ---- queries ----------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_tokens: int, num_shared_pages: int = 0) -> bool:
        return self.pages_needed(num_tokens) - num_shared_pages <= len(self._free)

    def has(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self._tables[seq_id]

    def capacity(self, seq_id: Hashable) -> int:
        """Tokens the sequence's reservation can hold."""
        return len(self._tables[seq_id]) * self.page_size

    @property
    def seq_ids(self) -> list[Hashable]:
        return list(self._tables)

    # ---- allocation -------------------------------------------------------------------------
    def allocate(
        self, seq_id: Hashable, num_tokens: int, shared_pages: Sequence[int] = ()
    ) -> list[int]:
        """Reserve pages for ``num_tokens`` tokens; the first pages may be shared (prefix hit)."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already holds pages")
        num_new = self.pages_needed(num_tokens) - len(shared_pages)
        if num_new > len(self._free):
            raise OutOfPagesError(
                f"need {num_new} free pages for {num_tokens} tokens, have {len(self._free)}"
            )
        for p in shared_pages:
            assert self._ref[p] > 0, f"shared page {p} is not held by anyone"
            self._ref[p] += 1
        table = list(shared_pages) + [self._take() for _ in range(max(num_new, 0))]
        self._tables[seq_id] = table
        return table

    def can_append(self, seq_id: Hashable, num_tokens: int) -> bool:
        need = self.pages_needed(num_tokens) - len(self._tables[seq_id])
        return need <= len(self._free)

    def append(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Grow the reservation so it holds ``num_tokens`` tokens in all; returns new pages."""
        table = self._tables[seq_id]
        need = self.pages_needed(num_tokens) - len(table)
        if need > len(self._free):
            raise OutOfPagesError(f"need {need} more pages for {seq_id!r}, have {len(self._free)}")
        new = [self._take() for _ in range(max(need, 0))]
        table.extend(new)
        return new

    def free(self, seq_id: Hashable) -> int:
        """Release a sequence's pages; returns how many went back to the free list."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            return 0
        return self.release(table)

    def fork(
        self, seq_id: Hashable, child_id: Hashable, num_tokens: int, prompt_len: int
    ) -> list[int]:
        """Reserve ``num_tokens`` tokens for ``child_id``, another choice of ``seq_id``'s prompt:
        the prompt's full pages are shared (ref counted), every later page is the child's own.
        The prompt's partially filled last page is copy-on-write: the caller copies its rows
        into the child's page (``PagedLatentCache.copy_tokens``) before the child writes there.
        """
        shared = self._tables[seq_id][: prompt_len // self.page_size]
        return self.allocate(child_id, num_tokens, shared_pages=shared)

    # ---- sharing (prefix cache, forks) ------------------------------------------------------
    def retain(self, pages: Sequence[int]) -> None:
        for p in pages:
            assert self._ref[p] > 0, f"retain of unheld page {p}"
            self._ref[p] += 1

    def release(self, pages: Sequence[int]) -> int:
        """Drop one reference to each page; returns how many went back to the free list.

        Pages are pushed in reverse so the next ``allocate`` pops them in ascending order: a
        freed run of consecutive pages comes back as a run, which decode attention reads as a
        view of the pool instead of gathering it page by page.
        """
        freed = 0
        for p in reversed(pages):
            assert self._ref[p] > 0, f"release of unheld page {p}"
            self._ref[p] -= 1
            if self._ref[p] == 0:
                self._free.append(p)
                freed += 1
        return freed

    def ref_count(self, page: int) -> int:
        return self._ref[page]

    def _take(self) -> int:
        p = self._free.pop()
        self._ref[p] = 1
        return p
