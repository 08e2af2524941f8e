"""Sampling: greedy, temperature, top-k, top-p, seeds."""

import pytest
import torch

from model.sampling import SamplingParams, sample, token_generator


def _logits():
    return torch.tensor([0.1, 3.0, 2.9, -1.0, 0.5])


def test_greedy_and_top_k_one_pick_argmax():
    assert sample(_logits(), SamplingParams()) == 1
    assert sample(_logits(), SamplingParams(temperature=1.0, top_k=1)) == 1


def test_seed_reproduces_and_top_k_restricts():
    p = SamplingParams(temperature=1.5, top_k=2, seed=7)
    draws = [sample(_logits(), p, token_generator(p, 0)) for _ in range(5)]
    assert len(set(draws)) == 1  # same seed, fresh generator each time
    g = token_generator(p, 0)
    assert {sample(_logits(), p, g) for _ in range(200)} <= {1, 2}


def test_top_p_keeps_the_nucleus():
    p = SamplingParams(temperature=1.0, top_p=0.5, seed=0)
    g = token_generator(p, 0)
    # token 1 alone holds < 0.5 of the mass, so the nucleus is {1, 2}
    assert {sample(_logits(), p, g) for _ in range(200)} == {1, 2}


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}])
def test_invalid_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_token_logprob_is_the_model_distribution_whatever_the_sampling():
    import math

    from model.sampling import sample_with_logprob, token_logprob

    logits = _logits()
    lp = token_logprob(logits, 2, 3)
    expected = torch.log_softmax(logits, dim=-1)
    assert math.isclose(lp.logprob, float(expected[2]), rel_tol=1e-6)
    assert lp.top_ids == (1, 2, 4)
    assert token_logprob(logits, 2, 0).top_ids == ()
    token, plain = sample_with_logprob(logits, SamplingParams(), 0)
    assert token == 1 and plain is None
    hot = SamplingParams(temperature=0.3, top_k=2, seed=1, num_logprobs=2)
    token, lp = sample_with_logprob(logits, hot, 0)
    assert lp.logprob == float(expected[token])  # temperature and top-k change the draw only
    with pytest.raises(ValueError, match="num_logprobs"):
        SamplingParams(num_logprobs=21)
