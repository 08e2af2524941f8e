"""Drivers shared by the decode tests: run a stage's loop and read streams like the ingress."""

from __future__ import annotations

import random

from decode.jobs import TokenBatch


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
