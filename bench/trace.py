"""The Mooncake conversation trace, scaled to this machine, as token-id requests.

A trace row holds ``timestamp`` (ms since the trace start), ``input_length``,
``output_length`` and ``hash_ids`` (one id per 512-token block of the prompt; equal ids in two
rows mean the two prompts share that block and every block before it). ``build_requests``
turns rows into prompts of token ids that keep this sharing: hash id ``h`` always expands to
the same block of ``block_tokens`` ids drawn from a generator seeded by ``h``. Pure Python
(no torch, no Ray), so tests may use it too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from scheduler.sim.trace import TraceRow, load_trace  # noqa: F401 - the one reader of the trace

TRACE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake traces
NUM_REGULAR_TOKENS = 496  # ids >= 496 are the tiny tokenizer's special tokens


@dataclass(frozen=True)
class TraceScale:
    """How the trace is shrunk to fit the machine.

    ``length_scale`` multiplies prompt lengths (and the 512-token block of a hash id);
    ``output_scale`` multiplies output lengths, then clipped to [``min_output``,
    ``max_output``]; ``rate_scale`` multiplies the arrival rate (2.0: twice as fast);
    ``max_input`` caps a prompt (its last blocks are dropped).
    """

    length_scale: float = 1 / 8
    output_scale: float = 1 / 8
    rate_scale: float = 1.0
    min_output: int = 2
    max_output: int = 64
    max_input: int = 6144

    @property
    def block_tokens(self) -> int:
        return max(1, round(TRACE_BLOCK_TOKENS * self.length_scale))


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: when (seconds after the run starts), the prompt, the output size."""

    index: int
    arrival_s: float
    prompt_ids: list[int]
    max_tokens: int


def block_ids(hash_id: int, block_tokens: int) -> list[int]:
    """The fixed token ids of one hash block (same id, same tokens, in every run)."""
    rng = random.Random(hash_id * 1_000_003 + 17)
    return [rng.randrange(1, NUM_REGULAR_TOKENS) for _ in range(block_tokens)]


def build_requests(rows: list[TraceRow], scale: TraceScale) -> list[BenchRequest]:
    """Scaled requests, one per row, in trace order; arrivals relative to the first row."""
    if not rows:
        return []
    bt = scale.block_tokens
    t0 = rows[0].timestamp_ms
    cache: dict[int, list[int]] = {}
    out: list[BenchRequest] = []
    for i, row in enumerate(rows):
        n_in = max(1, min(round(row.input_length * scale.length_scale), scale.max_input))
        prompt: list[int] = []
        for h in row.hash_ids:
            if len(prompt) >= n_in:
                break
            if h not in cache:
                cache[h] = block_ids(h, bt)
            prompt += cache[h]
        if len(prompt) < n_in:  # fewer hash ids than the length says: pad with a unique tail
            prompt += block_ids(-(i + 1), n_in - len(prompt))
        n_out = round(row.output_length * scale.output_scale)
        n_out = min(max(n_out, scale.min_output), scale.max_output)
        arrival = (row.timestamp_ms - t0) / 1000.0 / scale.rate_scale
        out.append(BenchRequest(i, arrival, prompt[:n_in], n_out))
    return out
