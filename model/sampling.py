"""Sampling of one output token: greedy, temperature, top-k, top-p, reproducible wherever it runs.

A seeded request draws output token ``i`` from a generator seeded by ``(seed, i)``, not from one
generator advanced across the request. The first token is sampled on a prefill instance and the
rest on a decode instance (or all on one colocated instance, or in ``Engine.generate``), and all
give the same tokens for the same seed, whatever the batch.

``token_logprob`` reports a picked token's log-probability from the same logits the sampler got
(the model's own distribution: no temperature, top-k or top-p; see ``TokenLogprob``).
"""

from __future__ import annotations

import torch

from common.sampling import SamplingParams, TokenLogprob

__all__ = [
    "SamplingParams",
    "TokenLogprob",
    "sample",
    "sample_token",
    "token_generator",
    "sample_with_logprob",
    "token_logprob",
]

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


def token_logprob(logits: torch.Tensor, token_id: int, num_top: int) -> TokenLogprob:
    """logits [vocab] -> the log-probability of ``token_id`` and the ``num_top`` most likely
    tokens (log-softmax in fp32)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, min(num_top, logprobs.shape[-1])) if num_top > 0 else None
    return TokenLogprob(
        logprob=float(logprobs[token_id]),
        top_ids=tuple(top.indices.tolist()) if top is not None else (),
        top_logprobs=tuple(top.values.tolist()) if top is not None else (),
    )


def sample_with_logprob(
    logits: torch.Tensor, params: SamplingParams, index: int
) -> tuple[int, TokenLogprob | None]:
    """``sample_token`` plus its ``token_logprob`` when the request asked for logprobs."""
    token_id = sample_token(logits, params, index)
    if params.num_logprobs is None:
        return token_id, None
    return token_id, token_logprob(logits, token_id, params.num_logprobs)
