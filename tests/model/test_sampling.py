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
