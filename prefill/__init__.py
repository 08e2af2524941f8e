"""Prefill stage: chunked prefill, prefix cache of latent KV pages, per-layer KV send."""

from prefill.jobs import PrefillConfig, PrefillJob, PrefillResult, PrefillStats

__all__ = ["PrefillConfig", "PrefillJob", "PrefillResult", "PrefillStats"]
