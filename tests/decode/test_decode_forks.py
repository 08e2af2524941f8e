"""A request's ``n`` choices on one DecodeStage (decode-local prefill): the prompt is prefilled
once, the other choices fork from it (full prompt pages shared, the partial page copied), each
draws its own tokens, and every page comes back however the choices end."""

import pytest

from common.pages import pages_for_choices
from common.sampling import SamplingParams
from decode.jobs import DecodeConfig, DecodeJob, Fork, choice_id
from decode.mixed import MixedStage
from decode.stage import DecodeStage
from tests.decode.test_decode_stage import make_prompts, read_all, run_until_idle


@pytest.fixture
def stage(decode_engine):
    stage = DecodeStage(decode_engine, DecodeConfig(prefill_token_budget=24, max_batch_size=8))
    free_before = decode_engine.cache.allocator.num_free_pages
    yield stage
    stage.close()
    assert decode_engine.cache.allocator.num_free_pages == free_before, "pages leaked"


def forked_job(rid, prompt, max_tokens, samplings):
    forks = tuple(Fork(s) for s in samplings[1:])
    return DecodeJob(rid, prompt, None, samplings[0], max_tokens, ignore_eos=True, forks=forks)


def test_greedy_choices_prefill_once_share_pages_and_match_n_1(stage, decode_engine):
    alloc = decode_engine.cache.allocator
    (prompt,) = make_prompts(decode_engine.config.vocab_size, [70], seed=3)
    expected = decode_engine.generate([prompt], 5)[0]
    used_before = alloc.num_used_pages
    stage.start(forked_job("r", prompt, 5, [SamplingParams()] * 3))
    peak = 0
    while stage.step():
        peak = max(peak, alloc.num_used_pages - used_before)
    num_tokens = len(prompt) + 5
    assert peak == pages_for_choices(len(prompt), num_tokens, 3, alloc.page_size)
    assert peak < 3 * alloc.pages_needed(num_tokens)  # fewer than three separate requests
    for i in range(3):
        out = read_all(stage, choice_id("r", i))
        assert (out.token_ids, out.finish_reason, out.error) == (expected, "length", None)
    stats = stage.stats()
    assert stats.num_prefill_tokens == len(prompt)  # one prefill for three choices
    assert stats.num_generated_tokens == 15 and alloc.num_used_pages == used_before


def test_seeded_choices_draw_their_own_tokens_like_generate(stage, decode_engine):
    (prompt,) = make_prompts(decode_engine.config.vocab_size, [37], seed=4)
    samplings = [SamplingParams(temperature=1.0, seed=11 + i) for i in range(3)]
    stage.start(forked_job("s", prompt, 6, samplings))
    run_until_idle(stage)
    for i, sampling in enumerate(samplings):
        want = decode_engine.generate([prompt], 6, sampling)[0]
        assert read_all(stage, choice_id("s", i)).token_ids == want, f"choice {i}"


def test_cancelling_one_choice_frees_only_its_tail(stage, decode_engine):
    alloc = decode_engine.cache.allocator
    (prompt,) = make_prompts(decode_engine.config.vocab_size, [40], seed=5)
    used_before = alloc.num_used_pages
    stage.start(forked_job("c", prompt, 50, [SamplingParams()] * 3))
    for _ in range(5):
        stage.step()
    held = alloc.num_used_pages - used_before
    stage.cancel(choice_id("c", 0))  # choice 0 owned the prompt; its siblings keep it
    tail = alloc.pages_needed(len(prompt) + 50) - len(prompt) // alloc.page_size
    assert alloc.num_used_pages - used_before == held - tail
    run_until_idle(stage)
    assert read_all(stage, "c").finish_reason == "abort"
    for i in (1, 2):
        out = read_all(stage, choice_id("c", i))
        assert out.finish_reason == "length" and len(out.token_ids) == 50
    assert alloc.num_used_pages == used_before


def test_choice_0_cancelled_before_its_prompt_is_prefilled_ends_them_all(stage, decode_engine):
    (prompt,) = make_prompts(decode_engine.config.vocab_size, [70], seed=6)
    stage.start(forked_job("e", prompt, 4, [SamplingParams()] * 3))
    stage.step()  # one 24-token chunk of 70
    stage.cancel(choice_id("e", 2))  # a fork may leave before it forked
    stage.cancel("e")
    run_until_idle(stage)
    assert [read_all(stage, choice_id("e", i)).finish_reason for i in range(3)] == ["abort"] * 3
    assert "before its KV" in read_all(stage, choice_id("e", 1)).error


def test_colocated_choices_fork_after_one_prefill_into_the_prefix_cache(decode_engine):
    alloc = decode_engine.cache.allocator
    stage = MixedStage(decode_engine)
    used_before = alloc.num_used_pages
    (prompt,) = make_prompts(decode_engine.config.vocab_size, [50], seed=7)
    expected = decode_engine.generate([prompt], 4)[0]
    stage.start(forked_job("m", prompt, 4, [SamplingParams()] * 3))
    run_until_idle(stage)
    for i in range(3):
        assert read_all(stage, choice_id("m", i)).token_ids == expected
    assert stage.stats().num_prefill_tokens == len(prompt)
    # only the prompt's full blocks stay, held by the prefix cache
    assert alloc.num_used_pages - used_before == len(prompt) // alloc.page_size
    stage.close()
    assert alloc.num_used_pages == used_before
