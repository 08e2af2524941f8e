"""Bounded-memory prefill attention: the blockwise online softmax equals the full causal
softmax, and a long prompt prefilled in chunks equals the one-shot prefill on the logits."""

from __future__ import annotations

import pytest
import torch

import model.mla as mla
from model.engine import Engine
from model.mla import OnlineSoftmax


def full_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float
) -> torch.Tensor:
    """The previous prefill path: q [T, n, dq] against every key at once (k [S, n, dq],
    v [S, n, dv], S = start + T), one [n, T, S] score tensor, softmax in fp32."""
    t = q.shape[0]
    scores = torch.einsum("tnd,snd->nts", q, k).float() * scale
    q_pos = torch.arange(start, start + t)
    mask = torch.arange(k.shape[0])[None, :] > q_pos[:, None]
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1).to(q.dtype)
    return torch.einsum("nts,snd->tnd", probs, v)


def blockwise(q, k, v, start, scale, block):
    state = OnlineSoftmax(q, start, scale, v.shape[-1])
    for k0 in range(0, k.shape[0], block):
        state.merge(k0, k[k0 : k0 + block], v[k0 : k0 + block])
    return state.output(q.dtype)


@pytest.mark.parametrize(
    ("start", "t", "block"), [(0, 300, 64), (700, 300, 128), (1000, 17, 1000), (5, 600, 7)]
)
def test_blockwise_equals_full_softmax(start, t, block):
    g = torch.Generator().manual_seed(start + t)
    n, dq, dv = 3, 24, 16
    q = torch.randn(t, n, dq, generator=g)
    k = torch.randn(start + t, n, dq, generator=g) * 2  # peaked scores exercise the max shift
    v = torch.randn(start + t, n, dv, generator=g)
    want = full_causal_attention(q, k, v, start, 0.3)
    got = blockwise(q, k, v, start, 0.3, block)
    assert got.shape == (t, n, dv)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(tiny_model_dir, dtype=torch.float32, kv_format="fp32", max_num_tokens=4096)


def _prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 500, (length,), generator=g).tolist()


def test_chunked_long_prefill_equals_one_shot(engine, monkeypatch):
    """A 3K-token prompt, 128-token KV blocks: one chunk (every query in one pass) against
    chunks of 256 and 1000 tokens (queries of later chunks walk a long cached prefix)."""
    monkeypatch.setattr(mla, "KV_BLOCK", 128)
    prompt = _prompt(7, 3000)
    before = engine.chunk_size
    try:
        engine.chunk_size = len(prompt)
        one_shot = engine.prefill_logits(prompt)
        for chunk in (256, 1000):
            engine.chunk_size = chunk
            diff = (engine.prefill_logits(prompt) - one_shot).abs().max().item()
            assert diff <= 1e-4, f"chunk {chunk}: max logit difference {diff}"
    finally:
        engine.chunk_size = before
    assert engine.cache.allocator.num_used_pages == 0


def test_prefix_is_expanded_one_block_at_a_time(engine, monkeypatch):
    """The chunk's temporary K/V is one KV block, however long the cached prefix is."""
    monkeypatch.setattr(mla, "KV_BLOCK", 256)
    sizes: list[int] = []
    expand = mla.MLA._expand

    def spy(self, cache, seq_id, layer, k0, k1, dtype):
        k, v = expand(self, cache, seq_id, layer, k0, k1, dtype)
        sizes.append(k.shape[0])
        return k, v

    monkeypatch.setattr(mla.MLA, "_expand", spy)
    prompt = _prompt(8, 2100)
    alloc = engine.cache.allocator
    alloc.allocate("long", len(prompt))
    try:
        engine.prefill("long", prompt[:2000])
        sizes.clear()
        engine.prefill("long", prompt[2000:], start_pos=2000)  # 100 queries over a 2,100 prefix
    finally:
        alloc.free("long")
    num_layers = engine.config.num_hidden_layers
    assert max(sizes) == 256 and sum(sizes) == 2100 * num_layers
