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


@dataclass
class ExpertParallel:
    """This rank's place in its instance's expert-parallel group (the default process group of
    the rank's process: one instance per process)."""

    rank: int
    num_ranks: int
    num_experts: int
    comm_seconds: float = 0.0  # in dispatch/combine all-to-alls since the last reset_timers
    tick_seconds: float = 0.0  # in tick all-reduces since the last reset_timers

    @classmethod
    def join(
        cls,
        address: str,
        rank: int,
        num_ranks: int,
        num_experts: int,
        backend: str = "gloo",
        timeout_s: float = 60.0,
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
        return cls(rank, num_ranks, num_experts)

    def reset_timers(self) -> None:
        self.comm_seconds = 0.0
        self.tick_seconds = 0.0

    @property
    def local_experts(self) -> list[int]:
        return experts_of_rank(self.rank, self.num_ranks, self.num_experts)

    def owner(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """The rank holding each expert id (same shape)."""
        return expert_ids // (self.num_experts // self.num_ranks)

    def tick(self, has_work: bool) -> bool:
        """Start a lockstep tick; True if any rank runs a forward in it."""
        flag = torch.tensor([int(has_work)], dtype=torch.int64)
        start = time.perf_counter()
        dist.all_reduce(flag)
        self.tick_seconds += time.perf_counter() - start
        return bool(flag.item())

    def dispatch(
        self, rows: torch.Tensor, expert_ids: torch.Tensor, send_counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Send ``rows`` [A, H] with their ``expert_ids`` [A] (sorted by owner rank,
        ``send_counts`` [R] rows per rank); returns what this rank received: rows [A', H],
        expert ids [A'] and the rows per source rank."""
        recv_counts = torch.empty_like(send_counts)
        self._all_to_all(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        wire_dtype = _wire_dtype(rows.dtype)
        recv_rows = torch.empty(sum(recv), rows.shape[1], dtype=wire_dtype)
        self._all_to_all(recv_rows, rows.to(wire_dtype).contiguous(), recv, send)
        recv_ids = torch.empty(sum(recv), dtype=torch.int64)
        self._all_to_all(recv_ids, expert_ids.contiguous(), recv, send)
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
