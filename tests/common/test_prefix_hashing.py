"""Prefix block hashes are deterministic and chained; BlockLRU evicts LRU leaves only."""

import json
import os
import subprocess
import sys

from common.prefix import BlockLRU, block_hashes


def test_hashes_cover_full_blocks_only_and_are_64_bit():
    hashes = block_hashes(list(range(200)), 64)
    assert len(hashes) == 3  # the last 8 tokens are a partial block
    assert all(0 <= h < 2**64 for h in hashes) and len(set(hashes)) == 3
    assert block_hashes(list(range(63)), 64) == []


def test_same_prefix_same_hashes_then_divergence():
    prefix = list(range(1000, 1128))  # 2 blocks of 64
    a = block_hashes(prefix + [1] * 64 + [7] * 64, 64)
    b = block_hashes(prefix + [2] * 64 + [7] * 64, 64)
    assert a[:2] == b[:2]
    # Block 3 has identical tokens in both, but its parent differs, so its hash differs too.
    assert a[2] != b[2] and a[3] != b[3]


def test_chain_depends_on_position_and_can_be_continued():
    block = [5] * 16
    hashes = block_hashes(block * 3, 16)
    assert len(set(hashes)) == 3  # same tokens, different parents
    head = block_hashes(list(range(32)), 16)
    tail = block_hashes(list(range(32, 64)), 16, parent_hash=head[-1])
    assert head + tail == block_hashes(list(range(64)), 16)


def test_hashes_are_identical_in_another_process():
    ids = [3, 141, 59, 26, 163_839] * 40
    code = (
        "import json, sys; from common.prefix import block_hashes; "
        f"print(json.dumps(block_hashes({ids!r}, 32)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str-hash salt
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert json.loads(out.stdout) == block_hashes(ids, 32)


def test_lru_match_returns_longest_cached_prefix():
    lru = BlockLRU(capacity=10)
    chain = block_hashes(list(range(256)), 64)  # 4 blocks
    result = lru.insert(chain[:3], ["p0", "p1", "p2"])
    assert [v for _, v in result.added] == ["p0", "p1", "p2"] and not result.evicted
    assert lru.match(chain) == ["p0", "p1", "p2"] and lru.peek(chain) == 3
    other = block_hashes([9] * 64 + list(range(64, 256)), 64)
    assert lru.match(other) == []
    assert lru.num_lookup_blocks == 8 and lru.num_hit_blocks == 3
    # Offering an already cached block keeps the cached value; only the new one is added.
    result = lru.insert(chain, ["x0", "x1", "x2", "p3"])
    assert result.added == [(chain[3], "p3")]
    assert lru.match(chain) == ["p0", "p1", "p2", "p3"]


def test_lru_evicts_least_recent_leaves_and_stays_prefix_closed():
    lru = BlockLRU(capacity=4)
    a = block_hashes([1] * 192, 64)  # 3 blocks
    b = block_hashes([2] * 128, 64)  # 2 blocks
    lru.insert(a, ["a0", "a1", "a2"])
    result = lru.insert(b, ["b0", "b1"])
    # a is older; its deepest block goes first, never its root.
    assert result.evicted == [(a[2], "a2")]
    assert lru.match(a) == ["a0", "a1"]  # touch a: now b is least recent
    result = lru.insert(block_hashes([3] * 64, 64), ["c0"])
    assert result.evicted == [(b[1], "b1")]
    assert lru.peek(a) == 2 and lru.peek(b) == 1
    # Prefix-closed: every cached block's parent is cached.
    for chain in (a, b):
        n = lru.peek(chain)
        assert all(h not in lru for h in chain[n:])
    freed = lru.clear()
    assert len(freed) == 4 and len(lru) == 0


def test_lru_keeps_at_most_capacity_blocks_of_a_long_chain():
    lru = BlockLRU(capacity=2)
    chain = block_hashes(list(range(320)), 64)
    result = lru.insert(chain, [f"p{i}" for i in range(5)])
    assert [v for _, v in result.added] == ["p0", "p1"] and not result.evicted
    assert lru.hashes() == frozenset(chain[:2])
    assert lru.evict(1) == [(chain[1], "p1")]
