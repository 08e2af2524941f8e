"""A long prompt does not block short ones: each prefill step spends a cost budget in which a
chunk's attention over its prefix counts, the least-left job goes first, and a job the budget
skipped goes first next, so the long one still advances. First tokens equal the engine's."""

from __future__ import annotations

import random

import pytest

from prefill.jobs import PrefillConfig, PrefillJob
from prefill.stage import PrefillStage


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 500) for _ in range(n)]


def test_chunks_shrink_with_the_prefix_and_fit_the_budget():
    cfg = PrefillConfig(token_budget=2048, attention_tokens=8192, min_chunk_tokens=64)
    sizes = [cfg.chunk_tokens(p, 2048) for p in (0, 8192, 65536, 131072, 262144)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 1500 and sizes[-1] == 64
    for p, t in zip((0, 8192, 65536, 131072), sizes, strict=False):
        assert cfg.chunk_cost(p, t) <= 2048 + 1e-3 < cfg.chunk_cost(p, t + 1)


@pytest.fixture
def stage(prefill_engine):
    """No transfers (kv_address None): the scheduling alone. Small budget and attention cost
    so a 1,200-token prompt is 'long' for the 96 x 16-token pages of the stage engine."""
    cfg = PrefillConfig(token_budget=64, attention_tokens=256, min_chunk_tokens=8)
    s = PrefillStage(prefill_engine, cfg)
    yield s
    s.close()
    assert prefill_engine.cache.allocator.num_used_pages == s.stats().num_cached_blocks


def test_short_prompt_is_not_blocked_by_a_long_one(stage, prefill_engine):
    short_prompt = _prompt(30, 2)
    expected_short, expected_long = (
        prefill_engine.generate([p], 1)[0][0] for p in (short_prompt, _prompt(1200, 1))
    )
    long = stage.submit(PrefillJob("long", _prompt(1200, 1)))
    while stage._tasks["long"].num_computed < 600:
        assert stage.step()
    short = stage.submit(PrefillJob("short", short_prompt))
    assert stage.step()  # one step: the short prompt first, the long one takes what is left
    assert short.done() and not long.done()
    assert short.result(0).first_token_id == expected_short
    while not long.done():
        assert stage.step()
    assert long.result(0).error is None and long.result(0).first_token_id == expected_long


def test_a_long_prompt_skipped_too_often_goes_first(prefill_engine):
    """Costs equal tokens here; a stream of 64-token prompts each fills a whole step, and the
    long prompt still advances every few steps (shorts skipped as often may go before it)."""
    cfg = PrefillConfig(
        token_budget=64, attention_tokens=10**9, min_chunk_tokens=1, max_skipped_steps=2
    )
    stage = PrefillStage(prefill_engine, cfg)
    try:
        stage.submit(PrefillJob("long", _prompt(400, 3)))
        assert stage.step()
        progress = [64]
        for i in range(9):
            stage.submit(PrefillJob(f"s{i}", _prompt(64, 10 + i)))
            stage.step()
            progress.append(stage._tasks["long"].num_computed)
        for i in range(len(progress) - 4):
            assert progress[i + 4] > progress[i], progress
        assert progress[2] == 64  # but short prompts go first until then
    finally:
        stage.close()


def test_kv_is_sized_per_role(tiny_model_dir):
    """Decode ranks hold one max_model_len context by default; each role can be sized alone."""
    from cluster.settings import ServeSettings

    engine = ServeSettings(model=str(tiny_model_dir)).to_config().engine
    assert engine.num_pages_for("decode") * engine.page_size == 262_144
    assert engine.num_pages_for("prefill") * engine.page_size == 262_144
    engine = (
        ServeSettings(model=str(tiny_model_dir), num_pages=100, prefill_kv_tokens=40_000)
        .to_config()
        .engine
    )
    assert engine.num_pages_for("prefill") == 625 and engine.num_pages_for("decode") == 100
    assert engine.num_pages_for("mixed") == 100
