"""Decode stage: continuous batching, token streaming, decode-local prefill, colocated mode."""

from decode.jobs import DecodeConfig, DecodeJob, DecodeStats, TokenBatch

__all__ = ["DecodeConfig", "DecodeJob", "DecodeStats", "TokenBatch"]
