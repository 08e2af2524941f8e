"""Typed messages of the decode stage: the job, the token batches it streams, config and stats.

These cross the Ray actor boundary (ingress -> decode worker), so they are frozen dataclasses of
plain values; no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from common.sampling import SamplingParams, TokenLogprob


def choice_id(request_id: str, index: int) -> str:
    """Choice ``index`` of a request on the decode instance: choice 0 is the request itself."""
    return request_id if index == 0 else f"{request_id}.c{index}"


@dataclass(frozen=True)
class Fork:
    """A further choice of a request (``n`` > 1): it shares the request's prompt KV and draws
    its own tokens with its own ``sampling``. ``first_token_id``/``first_logprob``: what the
    prefill instance sampled for it (None: the prompt is prefilled on the decode instance, and
    the first token is sampled there from the same logits)."""

    sampling: SamplingParams
    first_token_id: int | None = None
    first_logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class DecodeJob:
    """Generate the output of one request.

    ``first_token_id`` is the token the prefill instance sampled (its KV arrives by transfer into
    the pages ``reserve`` set aside); ``None`` means "prefill the prompt here first" (decode-local
    prefill, and every request of the colocated ``MixedStage``). The first token counts towards
    ``max_tokens`` and is the first token ``poll`` returns. ``first_logprob``: the prefill's
    logprob of the first token, when ``sampling.num_logprobs`` asks for logprobs.

    ``forks``: choices 1..n-1 of the request; each runs (and is polled and cancelled) as
    ``choice_id(request_id, i)`` once the prompt's KV is here, sharing its pages.
    """

    request_id: str
    prompt_ids: list[int]
    first_token_id: int | None = None
    sampling: SamplingParams = SamplingParams()
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    first_logprob: TokenLogprob | None = None
    forks: tuple[Fork, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_ids is empty; send >= 1 token")
        if self.max_tokens < 1:
            raise ValueError(f"request {self.request_id!r}: max_tokens must be >= 1")
        is_local = self.first_token_id is None
        if any((f.first_token_id is None) != is_local for f in self.forks):
            raise ValueError(
                f"request {self.request_id!r}: give every fork a first token when choice 0 has "
                "one (prefilled elsewhere), and none when it has none (prefilled here)"
            )

    @property
    def num_tokens(self) -> int:
        """KV positions the request can occupy: prompt plus every output token."""
        return len(self.prompt_ids) + self.max_tokens

    @property
    def num_choices(self) -> int:
        return 1 + len(self.forks)

    @property
    def choice_ids(self) -> list[str]:
        """Every choice's request id on the decode instance, choice 0 (this job) first."""
        return [choice_id(self.request_id, i) for i in range(self.num_choices)]

    def fork_job(self, index: int) -> DecodeJob:
        """The job of choice ``index`` >= 1: this job with the fork's id, sampling and first
        token, and no forks of its own."""
        fork = self.forks[index - 1]
        return replace(
            self,
            request_id=choice_id(self.request_id, index),
            sampling=fork.sampling,
            first_token_id=fork.first_token_id,
            first_logprob=fork.first_logprob,
            forks=(),
        )


@dataclass(frozen=True)
class TokenBatch:
    """Every token produced since the reader's cursor, in one message.

    ``cursor`` is the position to poll from next (tokens read so far). ``finish_reason``:
    "stop" (EOS or a stop token; the stop token itself is not returned), "length" (max_tokens)
    or "abort" (cancelled or failed; ``error`` says why when it failed). ``logprobs``: one per
    token when the request's sampling asked for them, else None.
    """

    token_ids: list[int]
    cursor: int
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class DecodeConfig:
    """How one decode (or mixed) instance schedules work.

    ``max_batch_size``: sequences per decode step. ``prefill_token_budget``: prompt tokens of
    local prefill computed per step, interleaved with the decode step so running sequences keep
    their inter-token latency. ``max_unread_tokens``: a sequence whose reader is this far behind
    sits out decode steps until the reader catches up (backpressure). ``finished_ttl_s``: how
    long a finished stream's tokens stay readable. ``reserve_grace_s``: a reservation not
    started within its lease plus this grace is released (the ingress gave up on it).
    ``reader_timeout_s``: a request whose reader has not polled for this long is cancelled and
    its pages freed (its ingress replica died, or lost it); readers long-poll every couple of
    seconds, so only a reader that is gone stays away this long.
    ``enable_prefix_cache``: reuse KV pages of earlier local prefills (MixedStage).
    """

    max_batch_size: int = 64
    prefill_token_budget: int = 512
    max_unread_tokens: int = 256
    finished_ttl_s: float = 60.0
    reserve_grace_s: float = 30.0
    reader_timeout_s: float = 60.0
    enable_prefix_cache: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.prefill_token_budget < 1 or self.max_unread_tokens < 1:
            raise ValueError(
                "max_batch_size, prefill_token_budget and max_unread_tokens must be >= 1, got "
                f"{self.max_batch_size}, {self.prefill_token_budget}, {self.max_unread_tokens}"
            )
        if not self.reader_timeout_s > 0:
            raise ValueError(f"reader_timeout_s must be positive, got {self.reader_timeout_s}")


@dataclass(frozen=True)
class DecodeStats:
    """What the scheduler (``DecodeInstanceState``) and the metrics read from one instance."""

    num_free_pages: int
    num_used_pages: int
    num_total_pages: int
    num_reserved_unfilled_pages: int  # reserved for KV that has not fully arrived yet
    num_running: int  # sequences in the continuous batch
    num_waiting: int  # waiting for their transfer, for a slot or pages, or prefilling locally
    num_queued_prefill_tokens: int  # prompt tokens still to prefill locally
    num_transferring: int  # reservations whose KV is still arriving
    max_batch_size: int
    batch_size: int  # sequences in the last decode step
    decode_step_s: float | None  # moving average of one decode step (None: no step yet)
    prefill_tokens_per_s: float | None  # local prefill speed (None: none done yet)
    cached_block_hashes: tuple[int, ...]  # local prefix cache (MixedStage)
    num_steps: int
    num_generated_tokens: int
    num_finished: int
    num_prefill_tokens: int  # prompt tokens prefilled locally
    num_cached_tokens: int  # of those, taken from the prefix cache
