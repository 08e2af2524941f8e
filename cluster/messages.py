"""Typed messages between the cluster's actors (workers, pool manager, ingress).

Frozen dataclasses of plain values: they cross Ray actor boundaries and end up in the JSON of
``GET /admin/pools``. The stage messages themselves (``PrefillJob``, ``DecodeJob``,
``TokenBatch``, ...) live in prefill/ and decode/.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerError:
    """A worker refused or failed a call (errors are values across the actor boundary); the
    ingress sends the request to another instance (draining, out of pages, wrong role after a
    move) until it runs out of attempts."""

    message: str


@dataclass(frozen=True)
class WorkerInfo:
    """Where a rank runs and what it serves (answer of ``ready``)."""

    instance_id: str
    unit_id: str  # this rank in the scheduler (routes, reports, metrics)
    rank: int
    role: str
    node_id: str
    pid: int
    kv_address: str | None  # the KV receiver's "host:port" (decode role only)
    fingerprint: str  # model + KV format; prefill and decode must agree
    num_total_pages: int
    page_size: int
    max_model_len: int


@dataclass(frozen=True)
class WorkerStats:
    """One rank's state for the pool manager, the metrics, and ``GET /admin/pools``."""

    instance_id: str
    role: str
    is_draining: bool
    num_free_pages: int
    num_used_pages: int
    num_total_pages: int
    num_running: int = 0  # decode: sequences in the batch
    num_waiting: int = 0  # decode: waiting for KV/pages or prefilling locally
    num_queued: int = 0  # prefill: jobs queued or running
    num_queued_tokens: int = 0  # prefill: uncached prompt tokens still to compute
    num_cached_blocks: int = 0  # prefix cache size (blocks)
    num_prompt_tokens: int = 0  # lifetime prompt tokens prefilled here
    num_cached_tokens: int = 0  # of those, from the prefix cache
    num_generated_tokens: int = 0  # lifetime output tokens
    num_steps: int = 0
    prefill_tokens_per_s: float | None = None
    decode_step_s: float | None = None
    num_transfer_bytes: int = 0  # KV bytes sent (prefill)
    transfer_s: float = 0.0  # seconds those transfers took (prefill)
    busy_s: float = 0.0  # seconds the step loop spent in steps that did work (utilisation)
    num_reserved_unfilled_pages: int = 0  # decode: reserved for KV still arriving
    cached_block_hashes: tuple[int, ...] = field(default=(), repr=False)  # prefix cache

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["cached_block_hashes"]  # thousands of ints: not for JSON
        return d


@dataclass(frozen=True)
class InstanceView:
    """One instance as the pool manager sees it."""

    instance_id: str
    role: str
    state: str  # starting | serving | moving | draining | dead
    num_ranks: int
    node_ids: tuple[str, ...]
    stats: WorkerStats | None  # rank 0's
    rank_stats: tuple[WorkerStats | None, ...] = ()  # every rank's, rank 0 first

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["node_ids"] = list(self.node_ids)
        d["stats"] = self.stats.to_dict() if self.stats is not None else None
        d["rank_stats"] = [s.to_dict() if s is not None else None for s in self.rank_stats]
        return d


def unit_id(instance_id: str, rank: int, num_ranks: int) -> str:
    """A rank's id in the scheduler: each rank of an expert-parallel instance owns its
    sequences, pages and KV receiver (data-parallel attention), so the scheduler routes to ranks.
    A one-rank instance's only rank goes by the instance id."""
    return instance_id if num_ranks == 1 else f"{instance_id}.r{rank}"
