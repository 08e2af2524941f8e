"""MixedStage (the colocated baseline) on the real k2-tiny engine."""

import random

import pytest

from decode.jobs import DecodeConfig, DecodeJob, TokenBatch
from decode.mixed import MixedStage


def make_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab_size) for _ in range(n)] for n in lengths]


def run_until_idle(stage, max_steps: int = 10_000) -> int:
    """Step until a step does nothing; returns the number of steps."""
    for n in range(max_steps):
        if not stage.step():
            return n
    raise AssertionError(f"stage still busy after {max_steps} steps")


def read_all(stage, request_id: str) -> TokenBatch:
    """Everything the stream holds (the request must have finished)."""
    batch = stage.poll(request_id, 0, timeout_s=0)
    assert batch.finished, f"{request_id} has not finished: {batch}"
    return batch


def test_mixed_matches_generate_and_reuses_prefixes(decode_engine):
    allocator = decode_engine.cache.allocator
    free_before = allocator.num_free_pages
    config = DecodeConfig(prefill_token_budget=32, enable_prefix_cache=True)
    stage = MixedStage(decode_engine, config)
    vocab = decode_engine.config.vocab_size
    shared = make_prompts(vocab, [48], seed=11)[0]  # three full 16-token pages
    prompts = make_prompts(vocab, [6, 70], seed=12) + [shared + [7, 8, 9], shared + [3]]
    expected = decode_engine.generate(prompts, 7)
    for i, p in enumerate(prompts[:3]):
        stage.start(DecodeJob(f"m{i}", p, None, max_tokens=7, ignore_eos=True))
    run_until_idle(stage)
    stage.start(DecodeJob("m3", prompts[3], None, max_tokens=7, ignore_eos=True))
    run_until_idle(stage)
    for i, want in enumerate(expected):
        assert read_all(stage, f"m{i}").token_ids == want
    assert stage.stats().num_cached_tokens == 48  # m3 reused the three pages m2 computed
    stage.close()
    assert allocator.num_free_pages == free_before


def test_mixed_refuses_transfers(decode_engine):
    stage = MixedStage(decode_engine)
    with pytest.raises(RuntimeError, match="no KV receiver"):
        stage.reserve("x", 10, 1.0)
    with pytest.raises(ValueError, match="first_token_id=None"):
        stage.start(DecodeJob("x", [1, 2], first_token_id=3, max_tokens=2))
