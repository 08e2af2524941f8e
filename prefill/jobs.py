"""Typed messages of the prefill stage: the job it takes, the result it returns, its config/stats.

These cross the Ray actor boundary (ingress -> prefill worker), so they are frozen dataclasses of
plain values; no tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.sampling import SamplingParams, TokenLogprob

WIRE_FORMATS = ("bf16", "fp8", "fp32")


@dataclass(frozen=True)
class PrefillJob:
    """Prefill one prompt and stream its KV to a decode receiver.

    ``kv_address`` is the decode receiver's "host:port" (from ``DecodeStage.reserve``); ``None``
    computes the KV without sending it (benchmarks, warm-up). ``kv_format`` is the wire format.
    ``fork_sampling``: the sampling of the request's choices 1..n-1 (``n`` > 1), whose first
    tokens are drawn from the same last-position logits as choice 0's (one prefill, one
    transfer for every choice).
    """

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    kv_address: str | None = None
    kv_format: str = "bf16"
    fork_sampling: tuple[SamplingParams, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_ids is empty; send >= 1 token")
        if self.kv_format not in WIRE_FORMATS:
            raise ValueError(
                f"request {self.request_id!r}: kv_format {self.kv_format!r} is not one of "
                f"{WIRE_FORMATS}"
            )


@dataclass(frozen=True)
class PrefillResult:
    """Outcome of a prefill. ``error`` set means the KV did not reach decode: re-route."""

    request_id: str
    first_token_id: int  # -1 when error is set
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    error: str | None = None
    queue_s: float = 0.0  # submitted -> pages allocated (waiting behind other prompts)
    compute_s: float = 0.0  # first chunk -> last chunk computed
    transfer_tail_s: float = 0.0  # last chunk computed -> the receiver verified the KV
    first_logprob: TokenLogprob | None = None  # when the job's sampling asks for logprobs
    # choices 1..n-1 (``PrefillJob.fork_sampling``): first token ids and logprobs, in order
    fork_first_token_ids: tuple[int, ...] = ()
    fork_first_logprobs: tuple[TokenLogprob | None, ...] = ()


@dataclass(frozen=True)
class PrefillConfig:
    """How one prefill instance schedules work.

    ``token_budget``: the cost of one ``step()`` in prompt tokens at an empty prefix (a long
    prompt spans several steps; several short prompts share one). A chunk of ``t`` tokens at
    prefix ``p`` costs ``t * (1 + (p + t) / attention_tokens)``: ``attention_tokens`` is the
    context length at which a token's attention costs as much as the rest of its layer, so a
    chunk deep in a 256K prompt is small and a step takes about as long at any depth (a short
    prompt queued behind it waits one such step). Every chunk has at least
    ``min_chunk_tokens``. Jobs with the least left go first; one skipped ``max_skipped_steps``
    steps in a row goes before them (a long prompt under a stream of short ones still
    advances). ``enable_prefix_cache``: keep full KV pages of finished prompts, keyed
    by chained block hashes, and reuse them for prompts that share the prefix. Transfer
    deadlines and sizes are ``kvtransfer.TransferConfig``.
    """

    token_budget: int = 2048
    attention_tokens: int = 8192
    min_chunk_tokens: int = 64
    max_skipped_steps: int = 8
    enable_prefix_cache: bool = True
    throughput_halflife_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("token_budget", "attention_tokens", "min_chunk_tokens", "max_skipped_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def chunk_cost(self, start: int, num_tokens: int) -> float:
        """Cost of prefilling tokens [start, start + num_tokens), in budget units."""
        return num_tokens * (1 + (start + num_tokens) / self.attention_tokens)

    def chunk_tokens(self, start: int, budget: float) -> int:
        """The most tokens a chunk at ``start`` may take within ``budget`` (at least
        ``min_chunk_tokens``): the positive root of ``chunk_cost(start, t) = budget``."""
        a = self.attention_tokens
        b = 1 + start / a
        t = int((math.sqrt(b * b + 4 * budget / a) - b) * a / 2)
        if self.chunk_cost(start, t + 1) <= budget + 1e-3:  # rounding (costs are in tokens)
            t += 1
        return max(self.min_chunk_tokens, t)


@dataclass(frozen=True)
class PrefillStats:
    """What the scheduler reads to route prompts to this instance."""

    num_queued: int  # jobs waiting or in progress
    num_sending: int  # computed jobs whose transfer is still draining
    num_queued_tokens: int  # prompt tokens still to compute (cached prefix excluded)
    num_cached_blocks: int
    cached_block_hashes: tuple[int, ...]  # chained hashes of the cached full blocks
    num_free_pages: int
    num_used_pages: int
    num_prompt_tokens: int  # lifetime totals
    num_cached_tokens: int
    num_completed: int
    num_failed: int
    tokens_per_s: float | None  # recent prompt tokens computed per busy second (None: no data)
