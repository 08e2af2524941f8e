"""One sequence's decode state, its stop conditions, and batch selection. Plain Python."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from decode.jobs import DecodeJob


class SeqState(str, Enum):
    WAITING_KV = "waiting_kv"  # its KV is arriving from a prefill instance
    WAITING_PAGES = "waiting_pages"  # decode-local prefill, no pages free yet
    FORKING = "forking"  # a further choice: waits for choice 0's prompt KV, then forks from it
    PREFILLING = "prefilling"  # decode-local prefill in progress
    READY = "ready"  # has KV and a next token, waiting for a batch slot
    RUNNING = "running"  # in the continuous batch
    FINISHED = "finished"


@dataclass
class DecodeSeq:
    """A request inside the decode stage.

    The next decode input is ``last_token_id`` at position ``prompt_len + num_output - 1``
    (output token ``i`` sits at position ``prompt_len + i``; its KV is written when it is fed).
    """

    job: DecodeJob
    stop_ids: frozenset[int]
    state: SeqState
    reservation: Any = None  # the KV receiver's reservation while the KV arrives
    num_computed: int = 0  # prompt tokens whose KV is in the cache
    num_cached: int = 0  # of those, shared from the prefix cache
    num_output: int = 0
    last_token_id: int = -1
    is_cancelled: bool = False
    block_hashes: list[int] | None = None  # of the prompt's full blocks (prefix cache only)
    forks: list[DecodeSeq] = field(default_factory=list)  # FORKING choices of this prompt

    @property
    def request_id(self) -> str:
        return self.job.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.job.prompt_ids)

    @property
    def position(self) -> int:
        return self.prompt_len + self.num_output - 1

    def accept(self, token_id: int) -> tuple[bool, str | None]:
        """Take a sampled token; returns (emit it?, finish reason or None).

        A stop token (EOS unless ignore_eos, or one of stop_token_ids) finishes with "stop" and
        is not emitted; reaching max_tokens finishes with "length".
        """
        if token_id in self.stop_ids:
            return False, "stop"
        self.num_output += 1
        self.last_token_id = token_id
        if self.num_output >= self.job.max_tokens:
            return True, "length"
        return True, None


def stop_ids_for(job: DecodeJob, eos_token_ids: Iterable[int]) -> frozenset[int]:
    """EOS ends a request unless ignore_eos; stop_token_ids always do."""
    ids = set(job.stop_token_ids)
    if not job.ignore_eos:
        ids.update(eos_token_ids)
    return frozenset(ids)


def select_batch(
    running: list[DecodeSeq], max_batch_size: int, is_blocked: Callable[[DecodeSeq], bool]
) -> list[DecodeSeq]:
    """The sequences of the next decode step: running ones whose reader keeps up, oldest first."""
    batch = []
    for seq in running:
        if len(batch) >= max_batch_size:
            break
        if not is_blocked(seq):
            batch.append(seq)
    return batch
