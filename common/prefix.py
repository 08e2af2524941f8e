"""Prefix block hashing and the LRU index of cached blocks. Plain Python: no torch, no Ray.

A prompt is cut into full blocks of ``block_size`` tokens (a trailing partial block is never
cached). Block ``i``'s hash covers its tokens *and* block ``i-1``'s hash, so equal hashes mean
equal prefixes up to and including that block, and two prompts share exactly the hashes of
their common full-block prefix. Hashes are blake2b over little-endian int64 bytes: the same in
every process and on every machine (Python's ``hash()`` is salted per process and is not used).

``BlockLRU`` maps block hash -> an opaque value (the prefill stage stores page ids) with LRU
eviction. It keeps the cached set *prefix-closed* (a block is cached only if its parent is):
every lookup and insert touches a whole chain from the root, deepest block first, so a parent is
always more recent than its children and LRU eviction only ever removes leaves.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_ROOT = b"tidal-prefix-v1"


def block_hashes(
    token_ids: Sequence[int], block_size: int, parent_hash: int | None = None
) -> list[int]:
    """64-bit chained hashes of every full ``block_size`` block of ``token_ids``.

    ``parent_hash`` continues a chain: ``block_hashes(b, n, parent_hash=block_hashes(a, n)[-1])``
    equals the tail of ``block_hashes(a + b, n)`` when ``len(a)`` is a multiple of ``n``.
    """
    assert block_size > 0, "block_size must be positive"
    hashes: list[int] = []
    parent = _ROOT if parent_hash is None else parent_hash.to_bytes(8, "little")
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        digest = hashlib.blake2b(parent, digest_size=8)
        digest.update(struct.pack(f"<{block_size}q", *block))
        parent = digest.digest()
        hashes.append(int.from_bytes(parent, "little"))
    return hashes


def prefix_hit_blocks(hashes: Sequence[int], cached: Any) -> int:
    """Number of leading ``hashes`` found in ``cached`` (anything supporting ``in``)."""
    n = 0
    for h in hashes:
        if h not in cached:
            break
        n += 1
    return n


@dataclass
class InsertResult:
    """What ``BlockLRU.insert`` did: the caller retains ``added`` values and frees ``evicted``."""

    added: list[tuple[int, Any]] = field(default_factory=list)
    evicted: list[tuple[int, Any]] = field(default_factory=list)


class BlockLRU:
    """block hash -> opaque value, at most ``capacity`` blocks, least recently used evicted first.

    Contract for the prefill stage (values are page ids held with ``PageAllocator.retain``):
    ``match(hashes)`` gives the values of the longest cached prefix; after prefill,
    ``insert(hashes, values)`` offers every full block of the prompt; retain each value in
    ``result.added`` and release each value in ``result.evicted``. Values offered for hashes that
    are already cached are not stored (the cached copy wins), so the caller keeps ownership.
    """

    def __init__(self, capacity: int) -> None:
        assert capacity >= 0, "capacity must be >= 0"
        self.capacity = capacity
        self._entries: OrderedDict[int, Any] = OrderedDict()  # oldest first
        self.num_lookup_blocks = 0
        self.num_hit_blocks = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._entries

    def hashes(self) -> frozenset[int]:
        """Snapshot of cached block hashes (what a prefill instance reports to the scheduler)."""
        return frozenset(self._entries)

    def peek(self, hashes: Sequence[int]) -> int:
        """Length in blocks of the cached prefix of ``hashes``, without touching anything."""
        return prefix_hit_blocks(hashes, self._entries)

    def match(self, hashes: Sequence[int]) -> list[Any]:
        """Values of the longest cached prefix of ``hashes`` (marked most recently used)."""
        n = self.peek(hashes)
        self.num_lookup_blocks += len(hashes)
        self.num_hit_blocks += n
        self._touch(hashes[:n])
        return [self._entries[h] for h in hashes[:n]]

    def insert(self, hashes: Sequence[int], values: Sequence[Any]) -> InsertResult:
        """Cache the chain ``hashes`` (from the root) with ``values``; evict LRU leaves to fit.

        At most ``capacity`` blocks of the chain are kept; blocks of this chain are never
        evicted to make room for its own tail.
        """
        assert len(hashes) == len(values), "one value per block hash"
        result = InsertResult()
        chain = list(hashes[: self.capacity])
        for h, v in zip(chain, values[: len(chain)], strict=True):
            if h not in self._entries:
                self._entries[h] = v
                result.added.append((h, v))
        self._touch(chain)
        protected = set(chain)
        while len(self._entries) > self.capacity:
            h, v = self._entries.popitem(last=False)
            assert h not in protected, "evicting the chain being inserted"
            result.evicted.append((h, v))
        return result

    def evict(self, num_blocks: int) -> list[tuple[int, Any]]:
        """Drop up to ``num_blocks`` least recently used blocks (leaves first); return them."""
        out = []
        while self._entries and len(out) < num_blocks:
            out.append(self._entries.popitem(last=False))
        return out

    def clear(self) -> list[tuple[int, Any]]:
        """Drop everything; returns every (hash, value) so the caller can free the values."""
        out = list(self._entries.items())
        self._entries.clear()
        return out

    def _touch(self, chain: Sequence[int]) -> None:
        # Deepest first, so every parent ends up more recent than its children.
        for h in reversed(chain):
            self._entries.move_to_end(h)
