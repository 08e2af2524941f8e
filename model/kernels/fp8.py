"""FP8 latent codec: c_kv -> e4m3 with one fp32 scale per 128 latent values, and back.

The cache's fp8 format and the fp8 transfer use the same records (``model.kv_cache``):
``e4m3 c_kv [R] ‖ fp32 scales [R/128] ‖ bf16 k_pe [rope]``; k_pe is never quantised.

Each function checks its inputs and dispatches: CUDA tensors (or ``TIDAL_FORCE_TRITON=1``,
with ``TRITON_INTERPRET=1`` in tests) run the Triton kernels in ``model/kernels/fp8_triton.py``;
anything else runs the torch reference in ``model.kv_cache``. Both produce identical bytes.
NaN/inf inputs are not checked (that would cost a host sync); their encoding is unspecified.
"""

from __future__ import annotations

import torch

from model import kv_cache
from model.kernels import use_triton
from model.kv_cache import FP8_GROUP

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantize_latent_fp8(c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_kv [n, R] (fp32/bf16/fp16, R % 128 == 0) -> (e4m3 [n, R], fp32 scales [n, R/128]).

    ``c_kv ~= q.float() * scale`` per group of 128 values; scale = group amax / 448.
    """
    _check_latent(c_kv, "c_kv")
    if c_kv.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"c_kv must be one of {_FLOAT_DTYPES}, got {c_kv.dtype}")
    if use_triton(c_kv.device):
        from model.kernels.fp8_triton import quantize_latent_fp8_triton

        return quantize_latent_fp8_triton(c_kv)
    return kv_cache.quantize_latent_fp8(c_kv.contiguous())


def dequantize_latent_fp8(
    q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(e4m3 [n, R], fp32 scales [n, R/128]) -> c_kv [n, R] in ``out_dtype`` (computed in fp32)."""
    _check_latent(q, "q")
    if q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"q must be torch.float8_e4m3fn, got {q.dtype}")
    n, r = q.shape
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n, r // FP8_GROUP):
        raise ValueError(
            f"scale must be float32 [{n}, {r // FP8_GROUP}], got {scale.dtype} {tuple(scale.shape)}"
        )
    if scale.device != q.device:
        raise ValueError(f"q is on {q.device} but scale is on {scale.device}")
    if n and scale.stride(-1) != 1:
        raise ValueError("scale needs a unit stride on the last dim; call .contiguous()")
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_FLOAT_DTYPES}, got {out_dtype}")
    if use_triton(q.device):
        from model.kernels.fp8_triton import dequantize_latent_fp8_triton

        return dequantize_latent_fp8_triton(q, scale, out_dtype)
    return kv_cache.dequantize_latent_fp8(q, scale).to(out_dtype)


def pack_fp8_records(c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """c_kv [n, R], k_pe [n, rope] -> uint8 records [n, R + 4R/128 + 2 rope] (the fp8 format)."""
    if k_pe.dim() != 2 or k_pe.shape[0] != c_kv.shape[0]:
        raise ValueError(
            f"k_pe must be [{c_kv.shape[0]}, rope] to match c_kv, got {tuple(k_pe.shape)}"
        )
    q, scale = quantize_latent_fp8(c_kv)
    n = q.shape[0]
    parts = (
        q.view(torch.uint8),
        scale.view(torch.uint8),
        k_pe.to(torch.bfloat16).view(torch.uint8),
    )
    return torch.cat([p.reshape(n, -1) for p in parts], dim=-1)


def unpack_fp8_records(
    records: torch.Tensor, kv_lora_rank: int, out_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 records [n, R + 4R/128 + 2 rope] -> (c_kv [n, R], k_pe [n, rope]) in ``out_dtype``."""
    r, groups = kv_lora_rank, kv_lora_rank // FP8_GROUP
    head = r + 4 * groups
    if (
        records.dtype != torch.uint8
        or records.dim() != 2
        or records.shape[1] <= head
        or (records.shape[1] - head) % 2
    ):
        raise ValueError(
            f"records must be uint8 [n, {head} + 2 * rope] for kv_lora_rank {r}, "
            f"got {records.dtype} {tuple(records.shape)}"
        )
    records = records.contiguous()
    q = records[:, :r].contiguous().view(torch.float8_e4m3fn)
    scale = records[:, r:head].contiguous().view(torch.float32)
    k_pe = records[:, head:].contiguous().view(torch.bfloat16)
    return dequantize_latent_fp8(q, scale, out_dtype), k_pe.to(out_dtype)


def _check_latent(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.shape[1] % FP8_GROUP or x.shape[1] == 0:
        raise ValueError(
            f"{name} must be [n, R] with R a positive multiple of {FP8_GROUP}, got {tuple(x.shape)}"
        )
    if x.shape[0] and x.stride(-1) != 1:
        raise ValueError(f"{name} needs a unit stride on the last dim; call .contiguous()")
