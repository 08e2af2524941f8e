"""Typed messages of the scheduler: instance reports in, requests in, decisions out.

Workers report snapshots (``PrefillInstanceState``, ``DecodeInstanceState``); the ingress sends a
``RequestSpec`` and gets a ``RouteDecision`` or a ``Rejection`` back. All are frozen dataclasses
of plain Python values, so they cross the Ray actor boundary unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from common.pages import pages_for_choices
from common.prefix import block_hashes


class Role(str, Enum):
    """What an instance does. ``MIXED`` (colocated baseline) runs prefill and decode."""

    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"


@dataclass(frozen=True)
class PrefillInstanceState:
    """A prefill (or mixed) instance's report: its queue, speed, and prefix cache contents."""

    instance_id: str
    num_queued_tokens: int = 0  # uncached prompt tokens waiting or running
    prefill_tokens_per_s: float | None = None  # measured; None -> config default
    cached_block_hashes: frozenset[int] = frozenset()  # BlockLRU.hashes(); any iterable is frozen

    def __post_init__(self) -> None:
        _freeze_hashes(self)


@dataclass(frozen=True)
class DecodeInstanceState:
    """A decode (or mixed) instance's report: KV pages and batch load."""

    instance_id: str
    num_free_pages: int
    num_total_pages: int
    num_running: int = 0  # sequences in the continuous batch
    max_batch_size: int = 256
    decode_step_s: float | None = None  # measured step time at the current batch; None -> default
    num_reserved_unfilled_pages: int = 0  # reserved for requests whose KV has not arrived yet
    # Speed of decode-local prefill on this instance; None -> config default.
    prefill_tokens_per_s: float | None = None
    # Prefix cache used by decode-local prefill, if the instance keeps one.
    cached_block_hashes: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        _freeze_hashes(self)


def _freeze_hashes(state: PrefillInstanceState | DecodeInstanceState) -> None:
    # Workers may report a tuple or list; membership tests need a set.
    if not isinstance(state.cached_block_hashes, frozenset):
        object.__setattr__(state, "cached_block_hashes", frozenset(state.cached_block_hashes))


@dataclass(frozen=True)
class RequestSpec:
    """What the scheduler needs to know about one request (the prompt itself stays at ingress).

    ``num_choices``: the request's ``n`` choices share one prefill and the prompt's full KV
    pages on one decode instance; each further choice adds only its private tail of pages.
    """

    request_id: str
    prompt_len: int
    max_tokens: int
    block_hashes: tuple[int, ...] = ()  # prefix.block_hashes(prompt_ids, config.block_size)
    num_choices: int = 1

    @classmethod
    def from_token_ids(
        cls,
        request_id: str,
        prompt_ids: Sequence[int],
        max_tokens: int,
        block_size: int = 64,
        num_choices: int = 1,
    ) -> RequestSpec:
        hashes = tuple(block_hashes(prompt_ids, block_size))
        return cls(request_id, len(prompt_ids), max_tokens, hashes, num_choices)

    @property
    def num_tokens(self) -> int:
        """Prompt + max_tokens: the context of each choice."""
        return self.prompt_len + self.max_tokens

    def num_pages(self, page_size: int) -> int:
        """Decode KV pages the request holds: one prompt and ``num_choices`` tails."""
        return pages_for_choices(self.prompt_len, self.num_tokens, self.num_choices, page_size)


@dataclass(frozen=True)
class RouteDecision:
    """Where a request runs. Decode pages are already reserved in the scheduler's books.

    ``prefill_instance_id`` is None for decode-local prefill; equal to ``decode_instance_id``
    for a mixed (colocated) instance. In both cases ``is_local_prefill`` is True and the ingress
    submits the request to the decode worker with ``first_token_id=None``.
    """

    request_id: str
    prefill_instance_id: str | None
    decode_instance_id: str
    num_cached_tokens: int  # prefix-cache hit expected on the prefill instance
    num_reserved_pages: int  # prompt + max_tokens on the decode instance
    estimated_ttft_s: float

    @property
    def is_local_prefill(self) -> bool:
        return (
            self.prefill_instance_id is None or self.prefill_instance_id == self.decode_instance_id
        )


@dataclass(frozen=True)
class Rejection:
    """A request the scheduler will not run now; ``status`` is the HTTP status to return.

    400 too long (message has both numbers); 429 overloaded (``retry_after_s`` set); 503 no
    instance can serve it; 499 cancelled while queued; 500 internal error (a bug: see message).
    ``reason`` is a short metric label: too_long, slo, queue_full, queue_timeout, no_pages,
    no_instances, no_capacity, cancelled, instance_removed, internal.
    """

    request_id: str
    status: int
    reason: str
    message: str
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Queued:
    """Core-only answer: waiting in the scheduler's queue for decode pages to free up.

    The decision comes later from ``Scheduler.drain_queue()``; the Ray actor hides this by
    awaiting it, so callers of the actor only ever see ``RouteDecision`` or ``Rejection``.
    """

    request_id: str
    position: int
    estimated_wait_s: float
    deadline_s: float  # scheduler clock time after which it is rejected (queue_timeout)


@dataclass(frozen=True)
class SchedulerStats:
    """Metrics snapshot (exported as Prometheus gauges/counters by cluster/)."""

    num_queued: int
    num_active: int  # requests holding a reservation
    num_routed: int
    num_decode_local: int
    num_rejected: dict[str, int]  # by reason
    num_prompt_tokens: int  # routed
    num_prefix_hit_tokens: int  # expected hits among routed prompt tokens
    num_reserved_pages: dict[str, int]  # by decode instance
    num_prefill_instances: int
    num_decode_instances: int
    num_mixed_instances: int

    @property
    def prefix_hit_rate(self) -> float:
        return (
            self.num_prefix_hit_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0
        )


@dataclass(frozen=True)
class SchedulerError:
    """An exception turned into a value at the actor boundary (misuse, e.g. unknown instance)."""

    message: str
