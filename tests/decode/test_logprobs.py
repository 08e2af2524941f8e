"""Logprobs from the stages: only when asked, one per token, from the logits the sampler used."""

import math

from common.sampling import SamplingParams
from decode.jobs import DecodeConfig, DecodeJob
from decode.mixed import MixedStage
from prefill.jobs import PrefillJob
from prefill.stage import PrefillStage
from tests.decode.test_mixed_stage import make_prompts, read_all, run_until_idle


def _check(token_ids, logprobs, k, is_greedy):
    assert len(logprobs) == len(token_ids)
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        assert len(lp.top_ids) == len(lp.top_logprobs) == k
        assert list(lp.top_logprobs) == sorted(lp.top_logprobs, reverse=True)
        assert lp.logprob <= 0 and all(v <= 0 for v in lp.top_logprobs)
        assert math.fsum(math.exp(v) for v in lp.top_logprobs) <= 1 + 1e-5
        if is_greedy:  # the greedy token is the most likely one
            assert token_id == lp.top_ids[0] and lp.logprob == lp.top_logprobs[0]
        elif token_id in lp.top_ids:
            assert lp.logprob == lp.top_logprobs[lp.top_ids.index(token_id)]


def test_mixed_stage_logprobs_only_when_asked(decode_engine):
    stage = MixedStage(decode_engine, DecodeConfig(enable_prefix_cache=True))
    prompt = make_prompts(decode_engine.config.vocab_size, [20], seed=3)[0]
    cases = {
        "plain": SamplingParams(),
        "greedy": SamplingParams(num_logprobs=5),
        "only-chosen": SamplingParams(num_logprobs=0),
        "sampled": SamplingParams(temperature=1.0, seed=4, num_logprobs=3),
        "sampled-plain": SamplingParams(temperature=1.0, seed=4),
    }
    for rid, params in cases.items():
        stage.start(DecodeJob(rid, prompt, None, params, max_tokens=6, ignore_eos=True))
    run_until_idle(stage)
    out = {rid: read_all(stage, rid) for rid in cases}
    assert out["plain"].logprobs is None and out["sampled-plain"].logprobs is None
    assert out["greedy"].token_ids == out["plain"].token_ids == out["only-chosen"].token_ids
    assert out["sampled"].token_ids == out["sampled-plain"].token_ids  # asking changes no draw
    _check(out["greedy"].token_ids, out["greedy"].logprobs, 5, is_greedy=True)
    _check(out["sampled"].token_ids, out["sampled"].logprobs, 3, is_greedy=False)
    only = out["only-chosen"].logprobs
    assert [lp.logprob for lp in only] == [lp.logprob for lp in out["greedy"].logprobs]
    # a poll from a cursor gets the logprobs of exactly the tokens it gets
    later = stage.poll("greedy", 2, timeout_s=0)
    assert later.logprobs == out["greedy"].logprobs[2:]
    stage.close()


def test_prefill_reports_the_first_tokens_logprob(prefill_engine):
    stage = PrefillStage(prefill_engine)
    prompt = make_prompts(prefill_engine.config.vocab_size, [40], seed=5)[0]
    futures = [
        stage.submit(PrefillJob("a", prompt, SamplingParams(num_logprobs=4))),
        stage.submit(PrefillJob("b", prompt, SamplingParams())),
    ]
    while not all(f.done() for f in futures):
        stage.step()
    a, b = (f.result() for f in futures)
    assert b.first_logprob is None and a.first_token_id == b.first_token_id
    _check([a.first_token_id], [a.first_logprob], 4, is_greedy=True)
    stage.close()
