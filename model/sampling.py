"""Sampling of one output token: greedy, temperature, top-k, top-p, reproducible wherever it runs.

A seeded request draws output token ``i`` from a generator seeded by ``(seed, i)``, not from one
generator advanced across the request. The first token is sampled on a prefill instance and the
rest on a decode instance (or all on one colocated instance, or in ``Engine.generate``), and all
give the same tokens for the same seed, whatever the batch.
"""

from __future__ import annotations

import torch

from common.sampling import SamplingParams

__all__ = ["SamplingParams", "sample", "sample_token", "token_generator"]

_GOLDEN = 0x9E3779B97F4A7C15  # odd constant: spreads consecutive indices over the seed space


def token_generator(
    params: SamplingParams, index: int, device: torch.device | str = "cpu"
) -> torch.Generator | None:
    """Generator for output token ``index`` of a request (None when the request is unseeded)."""
    if params.seed is None or params.is_greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((params.seed + index * _GOLDEN) % (1 << 63))
    return g


def sample_token(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """logits [vocab] -> output token ``index`` of a request."""
    return sample(logits, params, token_generator(params, index, logits.device))


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> int:
    """logits [vocab] -> one token id."""
    if params.is_greedy:
        return int(torch.argmax(logits))
    x = logits.float() / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, x.shape[-1])
        kth = torch.topk(x, k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the mass before it already reaches top_p (always keep the first)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
