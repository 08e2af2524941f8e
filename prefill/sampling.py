"""Sampling of one output token, reproducible wherever it runs.

A seeded request draws output token ``i`` from a generator seeded by ``(seed, i)``, not from one
generator advanced across the request. The first token is sampled on a prefill instance and the
rest on a decode instance (or all on one colocated instance), and both give the same tokens for
the same seed, whatever the batch.
"""

from __future__ import annotations

import torch

from model.sampling import SamplingParams, sample

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
