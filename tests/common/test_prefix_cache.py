"""PrefixCache: page references, the last-token rule, eviction under page pressure."""

from common.pages import PageAllocator
from common.prefix_cache import PrefixCache, allocate_sequence

PAGE = 4


def allocate(alloc, cache, seq_id, prompt, num_tokens=None):
    hashes = cache.hashes_of(prompt)
    return allocate_sequence(alloc, cache, seq_id, num_tokens or len(prompt), len(prompt), hashes)


def prefill_and_cache(alloc, cache, seq_id, prompt):
    """What a stage does: allocate sharing the cached prefix, 'compute', insert, free."""
    num_cached = allocate(alloc, cache, seq_id, prompt)
    assert num_cached is not None
    cache.insert(cache.hashes_of(prompt), alloc.block_table(seq_id))
    alloc.free(seq_id)
    return num_cached


def peek(cache, prompt):
    return cache.peek(cache.hashes_of(prompt), len(prompt))


def test_shared_prefix_reuses_pages_and_keeps_last_token():
    alloc = PageAllocator(16, PAGE)
    cache = PrefixCache(alloc)
    a = list(range(10))  # 2 full blocks + 2 tokens
    assert prefill_and_cache(alloc, cache, "a", a) == 0
    assert cache.num_blocks == 2 and alloc.num_used_pages == 2  # only the cache holds them
    assert peek(cache, a[:8] + [99]) == 8
    assert peek(cache, a[:8]) == 4  # exactly two blocks long: the last token is recomputed
    assert peek(cache, [1] + a[1:]) == 0  # a different first block changes every hash
    b = a[:8] + [42, 43, 44]
    assert allocate(alloc, cache, "b", b, num_tokens=20) == 8
    shared = cache.match(cache.hashes_of(b), len(b))
    assert alloc.block_table("b")[:2] == shared and alloc.capacity("b") == 20
    assert all(alloc.ref_count(p) == 2 for p in shared)  # the cache and "b"
    alloc.free("b")
    assert all(alloc.ref_count(p) == 1 for p in shared)


def test_eviction_frees_least_recently_used_unshared_pages():
    alloc = PageAllocator(6, PAGE)
    cache = PrefixCache(alloc)
    prefill_and_cache(alloc, cache, "a", [1] * 9)  # 2 blocks cached
    prefill_and_cache(alloc, cache, "b", [2] * 9)  # 2 more
    assert alloc.num_free_pages == 2
    # 4 pages wanted, 2 free: the oldest chain ("a") goes
    assert allocate(alloc, cache, "c", [3] * 16) == 0
    assert peek(cache, [1] * 9) == 0 and peek(cache, [2] * 9) == 8
    alloc.free("c")
    # more than exists even after evicting everything: no allocation, nothing half-done
    assert allocate(alloc, cache, "d", [4] * 40) is None
    assert not alloc.has("d") and cache.num_blocks == 0
    assert alloc.num_free_pages == 6


def test_matched_pages_survive_eviction_while_shared():
    alloc = PageAllocator(4, PAGE)
    cache = PrefixCache(alloc)
    prefill_and_cache(alloc, cache, "a", [1] * 9)  # 2 pages cached; 2 free
    # shares the 2 cached pages and needs 2 more: the cache may evict, never the shared pages
    assert allocate(alloc, cache, "b", [1] * 8 + [5] * 8) == 8
    assert alloc.num_free_pages == 0
    alloc.free("b")
    cache.clear()
    assert alloc.num_free_pages == 4


def test_no_prefix_cache_allocates_or_waits():
    alloc = PageAllocator(2, PAGE)
    assert allocate_sequence(alloc, None, "a", 8, 8) == 0
    assert allocate_sequence(alloc, None, "b", 1, 1) is None
