"""KV bytes per token match DESIGN §1, in the formula and in the tensors the cache allocates."""

from __future__ import annotations

import pytest
import torch

from model.kv_cache import PagedLatentCache, bytes_per_token

K2_RANK, K2_ROPE, K2_LAYERS = 512, 64, 61


@pytest.mark.parametrize(("fmt", "expected"), [("fp8", 656), ("bf16", 1152), ("fp32", 2304)])
def test_bytes_per_token_at_k2_size(fmt, expected):
    assert bytes_per_token(fmt, K2_RANK, K2_ROPE) == expected
    cache = PagedLatentCache(2, K2_RANK, K2_ROPE, num_pages=3, page_size=64, fmt=fmt)
    assert cache.bytes_per_token == expected
    for pool in cache.pages:  # the allocation really is that many bytes per token slot
        assert pool.dtype == torch.uint8 and pool.numel() == 3 * 64 * expected


def test_k2_totals_from_design():
    # 70,272 B/token over 61 layers in bf16; 18.4 GB (decimal) at 262,144 tokens; fp8 10.5 GB
    assert bytes_per_token("bf16", K2_RANK, K2_ROPE) * K2_LAYERS == 70_272
    assert round(70_272 * 262_144 / 1e9, 1) == 18.4
    assert round(656 * K2_LAYERS * 262_144 / 1e9, 1) == 10.5


def test_engine_cache_matches_its_config(tiny_model_dir):
    from model.engine import Engine

    eng = Engine.load(tiny_model_dir, kv_format="fp8", page_size=16, max_num_tokens=100)
    c = eng.config
    assert eng.cache.num_layers == c.num_hidden_layers
    assert eng.cache.num_pages == 7  # ceil(100 / 16)
    assert eng.cache.bytes_per_token == bytes_per_token("fp8", c.kv_lora_rank, c.qk_rope_head_dim)
    assert all(p.shape == (7, 16, eng.cache.bytes_per_token) for p in eng.cache.pages)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
def test_copy_tokens_gives_a_fork_its_own_copy_of_the_partial_page(fmt):
    torch.manual_seed(0)
    cache = PagedLatentCache(2, kv_lora_rank=128, rope_dim=16, num_pages=8, page_size=4, fmt=fmt)
    cache.allocator.allocate("p", 10)  # prompt of 6 tokens: one full page, 2 in the second
    c_kv, k_pe = torch.randn(6, 128), torch.randn(6, 16)
    for layer in range(2):
        cache.write("p", layer, 0, c_kv * (layer + 1), k_pe)
    cache.allocator.fork("p", "c", 10, prompt_len=6)
    cache.copy_tokens("p", "c", 4, 6)  # the partial page's filled rows
    for layer in range(2):
        child, parent = cache.read("c", layer, 6), cache.read("p", layer, 6)
        assert torch.equal(child[0], parent[0]) and torch.equal(child[1], parent[1])
    # the child writes its own token 6 without touching the parent's page
    before = cache.read("p", 0, 6)
    cache.write("c", 0, 6, torch.ones(1, 128), torch.ones(1, 16))
    assert cache.allocator.block_table("c")[1] != cache.allocator.block_table("p")[1]
    after = cache.read("p", 0, 6)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
