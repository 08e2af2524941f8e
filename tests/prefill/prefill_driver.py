"""Drivers shared by the prefill tests."""

from __future__ import annotations

import random


def make_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab_size) for _ in range(n)] for n in lengths]


def step_until_done(stage, future, max_steps: int = 10_000):
    for _ in range(max_steps):
        if future.done():
            return future.result()
        stage.step()
    raise AssertionError(f"prefill not done after {max_steps} steps")


def drain(stage, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not stage.step():
            return
    raise AssertionError(f"decode stage still busy after {max_steps} steps")
