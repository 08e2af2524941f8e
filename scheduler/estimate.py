"""The scheduler's estimates, as pure functions of instance snapshots (no bookkeeping here).

TTFT of a request on a prefill instance = queue wait + prefill of its uncached tokens + transfer
of its whole prompt's KV to the decode instance. The transfer term is added in full although the
KV is streamed per layer while prefill runs, so the estimate is an upper bound (conservative
admission); for colocated and decode-local prefill there is no transfer.

The request then needs a slot in the decode instance's batch (``max_batch_size``); when every
slot is taken it waits in the decode stage's queue, first token out but no second one. Admission
counts that wait (``slot_wait_s``): a disaggregated request decodes once both its first token and
a slot are there; a local (decode-local or mixed) prefill takes its slot before it starts, so the
wait comes before its queue. Without it, a full batch admits work by free pages alone, and the
decode queue grows to whatever the pages hold (seconds of backlog behind every new request).
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass

from scheduler.config import SchedulerConfig


@dataclass(frozen=True)
class TTFTEstimate:
    """Parts of one TTFT estimate, in seconds; ``num_cached_tokens`` is the expected prefix hit."""

    queue_s: float
    prefill_s: float
    transfer_s: float
    num_cached_tokens: int
    slot_wait_s: float = 0.0  # until a decode batch slot is free (overlaps the prefill)

    @property
    def total_s(self) -> float:
        """Until the request decodes: its first token, and a batch slot to continue in."""
        return max(self.queue_s + self.prefill_s + self.transfer_s, self.slot_wait_s)

    @property
    def no_queue_s(self) -> float:
        """What this request would take on an idle instance."""
        return self.prefill_s + self.transfer_s


def cached_prefix_tokens(
    block_hashes: Sequence[int], prompt_len: int, block_size: int, *cached: Container[int]
) -> int:
    """Prompt tokens expected from the prefix cache: the leading whole blocks found in any of
    ``cached``, never the block holding the last prompt token (its logits give the first
    token, so the prefill stage always computes it)."""
    max_blocks = max(prompt_len - 1, 0) // block_size
    num_blocks = 0
    for h in block_hashes[:max_blocks]:
        if not any(h in c for c in cached):
            break
        num_blocks += 1
    return num_blocks * block_size


def estimate_ttft(
    prompt_len: int,
    num_cached_tokens: int,
    num_queued_tokens: int,
    tokens_per_s: float,
    config: SchedulerConfig,
    *,
    with_transfer: bool,
    extra_queue_s: float = 0.0,
    slot_wait_s: float = 0.0,
) -> TTFTEstimate:
    """TTFT on one instance that prefills at ``tokens_per_s`` behind ``num_queued_tokens``
    (and ``extra_queue_s``); ``slot_wait_s`` until the decode instance has a batch slot."""
    assert tokens_per_s > 0, "prefill throughput must be positive"
    uncached = prompt_len - num_cached_tokens
    return TTFTEstimate(
        queue_s=num_queued_tokens / tokens_per_s + extra_queue_s,
        prefill_s=uncached / tokens_per_s,
        transfer_s=config.transfer_s(prompt_len) if with_transfer else 0.0,
        num_cached_tokens=num_cached_tokens,
        slot_wait_s=slot_wait_s,
    )


def ttft_budget_s(no_queue_s: float, config: SchedulerConfig) -> float:
    """The TTFT a request is admitted with: the SLO, or more for prompts that are long on
    their own (``long_prompt_slo_factor`` x their idle-instance TTFT)."""
    return max(config.ttft_slo_s, config.long_prompt_slo_factor * no_queue_s)


def decode_score(
    num_free_pages: int, num_total_pages: int, num_pages: int, num_running: int, max_batch: int
) -> float:
    """Higher is better: the free-page fraction left after reserving ``num_pages``, minus the
    batch load (a fuller batch means slower steps for everyone in it)."""
    free_after = (num_free_pages - num_pages) / max(num_total_pages, 1)
    return free_after - num_running / max(max_batch, 1)


def page_wait_s(num_pages_short: int, releases: Sequence[tuple[float, int]]) -> float | None:
    """Seconds until ``num_pages_short`` more pages are free, given the requests' estimated
    ``(seconds_until_finish, pages)`` (``Ledger.decode_timeline``); None if they never free
    enough."""
    if num_pages_short <= 0:
        return 0.0
    freed = 0
    for wait_s, pages in sorted(releases):
        freed += pages
        if freed >= num_pages_short:
            return max(wait_s, 0.0)
    return None
