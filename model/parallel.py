"""Expert parallelism: the ranks of one instance share the routed experts of every MoE layer.

Attention, dense layers and the shared expert are replicated: each rank runs them on its own
sequences (data-parallel attention). Routed expert ``e`` of ``E`` lives on rank
``e // (E / R)`` (contiguous blocks). An MoE layer sends each (token, expert) assignment to the
rank owning the expert, that rank runs its experts on everything it received, and the results
travel back (``dispatch`` / ``combine``: two ``all_to_all_single`` calls with variable splits,
after one that exchanges the split sizes).

Collectives must match across ranks, so the ranks run forward passes in lockstep ticks: every
forward starts with ``tick(has_work=True)`` (an all-reduce), and a rank with nothing to run
calls ``tick(has_work=False)`` in its idle loop; when any rank had work, the idle ones run an
empty forward (the MoE collectives with zero tokens). Nothing else is shared between ranks: a
step never waits on another rank's Python-side bookkeeping.

The model code receives an ``ExpertParallel`` object, never a module global, and knows no Ray:
the cluster publishes rank 0's rendezvous address and calls ``ExpertParallel.join``.

``comm_seconds`` / ``tick_seconds`` accumulate the wall time spent in the all-to-alls and in the
tick all-reduces (``reset_timers`` zeroes them), waiting for a slower peer included. The timing
is host-side: exact on gloo/CPU; on CUDA the collectives are asynchronous, so it counts launch
time and whatever the host waits for (time device work with CUDA events there).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


def experts_of_rank(rank: int, num_ranks: int, num_experts: int) -> list[int]:
    """The routed experts rank ``rank`` of ``num_ranks`` holds (a contiguous block)."""
    if num_experts % num_ranks:
        raise ValueError(
            f"{num_experts} routed experts do not split evenly over {num_ranks} ranks; "
            "use a rank count that divides the expert count"
        )
    per_rank = num_experts // num_ranks
    return list(range(rank * per_rank, (rank + 1) * per_rank))


def default_placement(num_experts: int, num_slots: int, num_ranks: int) -> list[int]:
    """The placement an instance starts with: slot -> logical expert, ``num_slots`` slots, slot
    s on rank s // (num_slots / num_ranks). Rank r holds the contiguous block r of the experts,
    then its redundant slots, each replicating an expert of the next ranks' blocks (so no rank
    holds two replicas of one expert)."""
    block = len(experts_of_rank(0, num_ranks, num_experts))
    if num_slots % num_ranks or num_slots < num_experts:
        raise ValueError(
            f"{num_slots} expert slots over {num_ranks} ranks: use a multiple of the rank count "
            f"that is at least the {num_experts} experts"
        )
    per_rank = num_slots // num_ranks
    placement: list[int] = []
    for r in range(num_ranks):
        placement += range(r * block, (r + 1) * block)
        placement += [((r + 1) * block + j) % num_experts for j in range(per_rank - block)]
    return placement


@dataclass
class ExpertParallel:
    """This rank's place in its instance's expert-parallel group (the default process group of
    the rank's process: one instance per process)."""

    rank: int
    num_ranks: int
    num_experts: int
    num_slots: int = 0  # expert slots over the instance (0: one per expert, no redundancy)
    comm_seconds: float = 0.0  # in dispatch/combine all-to-alls since the last reset_timers
    tick_seconds: float = 0.0  # in tick all-reduces since the last reset_timers
    num_rows_received: int = 0  # expert rows this rank computed (its real MoE load), ever

    @classmethod
    def join(
        cls,
        address: str,
        rank: int,
        num_ranks: int,
        num_experts: int,
        backend: str = "gloo",
        timeout_s: float = 60.0,
        num_slots: int = 0,
    ) -> ExpertParallel:
        """Join the group whose rank 0 listens at ``address`` ("host:port"); blocks until every
        rank joined. ``timeout_s`` bounds every collective, so a dead peer ends in an error."""
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}",
            rank=rank,
            world_size=num_ranks,
            timeout=timedelta(seconds=timeout_s),
        )
        return cls(rank, num_ranks, num_experts, num_slots)

    def __post_init__(self) -> None:
        self.num_slots = self.num_slots or self.num_experts
        default_placement(self.num_experts, self.num_slots, self.num_ranks)  # validates

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.num_ranks

    @property
    def local_slots(self) -> range:
        """This rank's slots (global slot ids)."""
        return range(self.rank * self.slots_per_rank, (self.rank + 1) * self.slots_per_rank)

    def initial_placement(self) -> list[int]:
        return default_placement(self.num_experts, self.num_slots, self.num_ranks)

    def reset_timers(self) -> None:
        self.comm_seconds = 0.0
        self.tick_seconds = 0.0

    @property
    def local_experts(self) -> list[int]:
        """The logical experts this rank's slots hold at start (sorted, distinct)."""
        placement = self.initial_placement()
        return sorted({placement[s] for s in self.local_slots})

    def owner(self, slots: torch.Tensor) -> torch.Tensor:
        """The rank holding each global slot (same shape)."""
        return slots // self.slots_per_rank

    def tick(self, has_work: bool, ready_version: int = 0) -> tuple[bool, int, int]:
        """Start a lockstep tick. ``ready_version``: the placement version this rank has fully
        staged (0: none). Returns (any rank runs a forward, the lowest and highest ready version
        over the ranks): every rank gets the same answer, so a swap decided on it happens on
        every rank at the same tick."""
        flags = torch.tensor([int(has_work), ready_version, -ready_version], dtype=torch.int64)
        start = time.perf_counter()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.tick_seconds += time.perf_counter() - start
        any_work, highest, neg_lowest = flags.tolist()
        return bool(any_work), -neg_lowest, highest

    def dispatch(
        self, rows: torch.Tensor, slots: torch.Tensor, send_counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Send ``rows`` [A, H] with their target global ``slots`` [A] (sorted by owner rank,
        ``send_counts`` [R] rows per rank); returns what this rank received: rows [A', H],
        slots [A'] and the rows per source rank."""
        recv_counts = torch.empty_like(send_counts)
        self._all_to_all(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        self.num_rows_received += sum(recv)
        wire_dtype = _wire_dtype(rows.dtype)
        recv_rows = torch.empty(sum(recv), rows.shape[1], dtype=wire_dtype)
        self._all_to_all(recv_rows, rows.to(wire_dtype).contiguous(), recv, send)
        recv_ids = torch.empty(sum(recv), dtype=torch.int64)
        self._all_to_all(recv_ids, slots.contiguous(), recv, send)
        return recv_rows.to(rows.dtype), recv_ids, recv

    def combine(
        self, results: torch.Tensor, recv_counts: list[int], send_counts: torch.Tensor
    ) -> torch.Tensor:
        """Send the experts' ``results`` [A', H] back to where their rows came from; returns
        this rank's rows [A, H] in the order they were dispatched."""
        send = send_counts.tolist()
        wire_dtype = _wire_dtype(results.dtype)
        out = torch.empty(sum(send), results.shape[1], dtype=wire_dtype)
        self._all_to_all(out, results.to(wire_dtype).contiguous(), send, recv_counts)
        return out.to(results.dtype)

    def _all_to_all(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: list[int] | None = None,
        in_splits: list[int] | None = None,
    ) -> None:
        start = time.perf_counter()
        dist.all_to_all_single(out, inp, out_splits, in_splits)
        self.comm_seconds += time.perf_counter() - start


def _wire_dtype(dtype: torch.dtype) -> torch.dtype:
    """gloo (CPU) has no bf16/fp16 reductions or all-to-all on every build: move 16-bit rows as
    fp32 there (exact); NCCL moves them as they are."""
    if dist.get_backend() == "gloo" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype
