"""The ``Stage`` protocol: what a worker's step loop and reporter need from any stage.

A rank worker runs one stage at a time (prefill, decode, or mixed, by role) and knows it only
through this protocol: it steps it on one thread, parks it when idle, reads its ``StageState``
for the scheduler and the metrics, and closes it on a role change or shutdown. Each stage
translates its own detailed stats into ``StageState`` (once, in ``state()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StageState:
    """One stage's state in the cluster's vocabulary (the worker adds who and where)."""

    num_free_pages: int
    num_used_pages: int
    num_running: int = 0  # decode: sequences in the batch
    num_waiting: int = 0  # decode: waiting for KV/pages or prefilling locally
    num_queued: int = 0  # prefill: jobs queued, running, or with a transfer draining
    num_queued_tokens: int = 0  # prompt tokens still to compute (cached prefix excluded)
    num_cached_blocks: int = 0  # prefix cache size (blocks)
    num_prompt_tokens: int = 0  # lifetime prompt tokens prefilled here
    num_cached_tokens: int = 0  # of those, from the prefix cache
    num_generated_tokens: int = 0  # lifetime output tokens
    num_steps: int = 0
    prefill_tokens_per_s: float | None = None
    decode_step_s: float | None = None
    num_transfer_bytes: int = 0  # KV bytes sent and confirmed by receivers (prefill)
    transfer_s: float = 0.0  # seconds those transfers took, open to verified close (prefill)
    num_reserved_unfilled_pages: int = 0  # decode: reserved for KV still arriving
    cached_block_hashes: tuple[int, ...] = ()  # the prefix cache, for prefix-aware routing


class Stage(Protocol):
    """A role's work loop. ``step``/``wait_for_work`` run on the worker's loop thread; ``state``
    and ``is_idle`` may be called from any thread; ``close`` after the loop stopped."""

    def step(self) -> bool:
        """Do one bounded unit of work (a prefill chunk budget, a decode step); True if any."""
        ...

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block until a step would do something, or ``timeout_s``; True if there is work."""
        ...

    def is_idle(self) -> bool:
        """No request is in flight here (queued, running, or with KV still moving)."""
        ...

    def state(self) -> StageState:
        """This stage's ``StageState`` now."""
        ...

    def close(self) -> None:
        """Cancel everything in flight and free every page."""
        ...
