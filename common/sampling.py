"""``SamplingParams``: how a request picks its tokens, and ``TokenLogprob``: what it reports
about each pick. Plain data (the ingress has no torch)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. ``temperature == 0`` is greedy (argmax).

    ``num_logprobs``: None reports nothing (the default, and the cheap path); ``k >= 0``
    reports each output token's log-probability and the ``k`` most likely tokens
    (``model.sampling.token_logprob``).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    num_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.num_logprobs is not None and not 0 <= self.num_logprobs <= MAX_LOGPROBS:
            raise ValueError(
                f"num_logprobs must be in [0, {MAX_LOGPROBS}] or None, got {self.num_logprobs}"
            )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class TokenLogprob:
    """One output token's log-probability under the model's distribution: the log-softmax of
    the logits the sampler was given, before temperature, top-k and top-p (vLLM's default, and
    what OpenAI's API reports), so the numbers do not depend on how the token was drawn.
    ``top_ids``/``top_logprobs``: the ``num_logprobs`` most likely tokens, most likely first."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
