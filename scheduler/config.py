"""Scheduler configuration: one frozen dataclass, built once by the cluster from the deploy config.

Defaults describe Kimi-K2 with a bf16 latent KV transfer: 70,272 bytes of KV per token (576
values x 2 bytes x 61 layers), 64-token pages, and a 256K context.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    """Routing and admission knobs. Times in seconds, rates per second, sizes in tokens/bytes."""

    ttft_slo_s: float = 2.0
    # A long prompt cannot meet a short SLO even on an idle cluster; its budget is this factor
    # times its own no-queue TTFT, so the SLO bounds the *waiting*, not the work.
    long_prompt_slo_factor: float = 1.5
    max_queue_len: int = 256  # requests waiting for decode KV pages; full -> 429
    # Prompts with fewer uncached tokens *on the decode instance* (its own prefix cache, if it
    # reports one) than this are prefilled there: a transfer round trip costs more than
    # computing them. 0 disables decode-local prefill (except when no prefill instance exists).
    decode_local_threshold: int = 256
    page_size: int = 64  # decode KV page size (tokens), must match the decode cache
    block_size: int = 64  # prefix-hash block (tokens) = prefill cache page size
    max_model_len: int = 262_144
    kv_bytes_per_token: int = 70_272  # wire bytes of latent KV per token, all layers
    transfer_bytes_per_s: float = 5e9  # prefill -> decode KV bandwidth estimate
    # Used until an instance reports its own measurements.
    default_prefill_tokens_per_s: float = 8_000.0
    default_decode_step_s: float = 0.05
    min_retry_after_s: float = 1.0
    # A report arriving this long after a prefill finished was taken after it (the workers'
    # report interval plus the call's latency, with room to spare).
    report_lag_s: float = 1.0
    # An owner (ingress replica) renews its lease every owner_lease_s / 5; one silent this long
    # is dead, and the requests it routed (queued, prefilling, decoding) are let go.
    owner_lease_s: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "ttft_slo_s", "transfer_bytes_per_s", "default_prefill_tokens_per_s", "owner_lease_s"
        ):  # fmt: skip
            assert getattr(self, name) > 0, f"SchedulerConfig.{name} must be positive"
        assert self.page_size > 0 and self.block_size > 0, "page_size and block_size must be > 0"
        assert self.max_queue_len >= 0, "max_queue_len must be >= 0 (0 disables queueing)"
        assert self.long_prompt_slo_factor >= 1.0, "long_prompt_slo_factor must be >= 1"

    def pages_needed(self, num_tokens: int) -> int:
        """Decode KV pages that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.page_size)

    def transfer_s(self, num_tokens: int) -> float:
        """Estimated time to move ``num_tokens`` tokens of latent KV to a decode instance."""
        return num_tokens * self.kv_bytes_per_token / self.transfer_bytes_per_s
