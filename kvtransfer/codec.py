"""Converts packed latent records between KV formats (the FP8 latent codec of the transfer).

Records are the rows ``PagedLatentCache.export_layer`` returns (layout in model/kv_cache.py):
``fp32``/``bf16`` = c_kv ‖ k_pe in that dtype; ``fp8`` = e4m3 c_kv ‖ fp32 scale per 128
latent values ‖ bf16 k_pe. Only the latent is quantised; k_pe keeps its bf16 bits (from an
fp32 source it is rounded to bf16, as the fp8 cache format stores it).

Quantisation runs in ``model.kernels.fp8`` (Triton on GPU, the torch reference on CPU).
A prefill instance with a bf16 cache can send fp8 (0.57x the bytes at K2 size), and a decode
instance stores what arrives in its own cache format: fp8 as is, or dequantised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.kernels.fp8 import dequantize_latent_fp8, quantize_latent_fp8
from model.kv_cache import FP8_GROUP, KVFormat, bytes_per_token


@dataclass(frozen=True)
class KVLayout:
    """What a row of packed records holds: its format and the latent/rope widths."""

    fmt: KVFormat
    kv_lora_rank: int
    rope_dim: int

    @classmethod
    def of(cls, cache: object) -> KVLayout:
        """Layout of a ``PagedLatentCache``."""
        return cls(KVFormat(cache.fmt), cache.kv_lora_rank, cache.rope_dim)  # type: ignore[attr-defined]

    def with_format(self, fmt: KVFormat | str) -> KVLayout:
        return KVLayout(KVFormat(fmt), self.kv_lora_rank, self.rope_dim)

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.fmt, self.kv_lora_rank, self.rope_dim)


def _split_fp8(rec: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = r // FP8_GROUP
    q = rec[:, :r].contiguous().view(torch.float8_e4m3fn)  # [n, R]
    scale = rec[:, r : r + 4 * g].contiguous().view(torch.float32)  # [n, R/128]
    k_pe = rec[:, r + 4 * g :].contiguous().view(torch.bfloat16)  # [n, rope]
    return q, scale, k_pe


def convert_records(records: torch.Tensor, src: KVLayout, dst_fmt: KVFormat | str) -> torch.Tensor:
    """uint8 [n, src.bytes_per_token] -> uint8 [n, bytes_per_token(dst_fmt)].

    Same format returns ``records`` itself (no copy).
    """
    dst = src.with_format(dst_fmt)
    n, width = records.shape
    assert records.dtype == torch.uint8 and width == src.bytes_per_token, (
        f"records must be uint8 [n, {src.bytes_per_token}] ({src.fmt.value}), "
        f"got {records.dtype} {tuple(records.shape)}"
    )
    if dst.fmt is src.fmt:
        return records
    r = src.kv_lora_rank
    if src.fmt is KVFormat.FP8:  # dequantise
        q, scale, k_pe = _split_fp8(records, r)
        dt = dst.fmt.torch_dtype
        out = torch.cat([dequantize_latent_fp8(q, scale, dt), k_pe.to(dt)], dim=-1)
        return out.contiguous().view(torch.uint8)
    vals = records.contiguous().view(src.fmt.torch_dtype)  # [n, R + rope]
    if dst.fmt is KVFormat.FP8:  # quantise the latent, keep k_pe as bf16
        q, scale = quantize_latent_fp8(vals[:, :r])
        k_pe = vals[:, r:].to(torch.bfloat16)
        parts = (q.view(torch.uint8), scale.view(torch.uint8), k_pe.contiguous().view(torch.uint8))
        return torch.cat([p.reshape(n, -1) for p in parts], dim=-1)
    return vals.to(dst.fmt.torch_dtype).contiguous().view(torch.uint8)  # fp32 <-> bf16
