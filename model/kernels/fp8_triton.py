"""Triton kernels of the FP8 latent codec (e4m3 values, one fp32 scale per 128 latent values).

Bit-exact with the torch reference in ``model.kv_cache``: the scale is ``amax / 448`` and the
scaled value ``x / scale``, both with IEEE round-to-nearest division (``div_rn``; plain ``/`` is
approximate on GPU), clamped to +-448 and rounded to e4m3 to nearest-even.

The e4m3 encoding is done with integer arithmetic on the fp32 bits rather than
``.to(tl.float8e4nv)``: Triton 3.9's interpreter rounds some values wrongly there (126.6 -> 64
instead of 128; carries out of the mantissa are lost), and the manual form is cheap and runs the
same everywhere. Decoding uses the native bitcast-and-upcast, which the interpreter gets right
for every finite code (the two NaN codes, which the quantiser never emits, decode as +-480 there).

Imported lazily by ``model.kernels.fp8`` (only when Triton runs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.kv_cache import FP8_GROUP, FP8_MAX

_BLOCK_M = 16  # tokens per program


@triton.jit
def encode_e4m3(y):
    """fp32 values already in [-448, 448] -> e4m3 codes (int32 in [0, 255]), nearest-even."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    mag_bits = bits & 0x7FFFFFFF
    # Normal range (|y| >= 2^-6): keep 3 mantissa bits with round-to-nearest-even on the bits, so
    # a mantissa carry moves into the exponent; then rebias the exponent from 127 to 7.
    rounded = mag_bits + 0x7FFFF + ((mag_bits >> 20) & 1)
    code_normal = (rounded >> 20) - (120 << 3)
    # Subnormal range: multiples of 2^-9; round |y| * 512 to nearest-even (m == 8 is 2^-6).
    v = mag_bits.to(tl.float32, bitcast=True) * 512.0
    whole = tl.floor(v)
    frac = v - whole
    odd = (whole.to(tl.int32) & 1) == 1
    round_up = (frac > 0.5) | ((frac == 0.5) & odd)
    code_sub = whole.to(tl.int32) + round_up.to(tl.int32)
    is_sub = mag_bits < 0x3C800000  # bits of 2^-6
    return tl.where(is_sub, code_sub, code_normal) | (sign << 7)


@triton.jit
def _quantize_kernel(
    x_ptr,  # [n, R] fp32/bf16/fp16
    q_ptr,  # uint8 [n, R] (e4m3 codes)
    scale_ptr,  # fp32 [n, R/GROUP]
    n,
    stride_x,
    stride_q,
    stride_s,
    GROUP: tl.constexpr,
    FP8_MAX_: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    mask = (rows < n)[:, None]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)  # [BLOCK_M, GROUP]
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX_), 1e-12)  # [BLOCK_M]
    y = tl.math.div_rn(x, scale[:, None])
    y = tl.minimum(tl.maximum(y, -FP8_MAX_), FP8_MAX_)
    code = encode_e4m3(y)
    tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], code.to(tl.uint8), mask=mask)
    tl.store(scale_ptr + rows * stride_s + g, scale, mask=rows < n)


@triton.jit
def _dequantize_kernel(
    q_ptr,  # uint8 [n, R] (e4m3 codes)
    scale_ptr,  # fp32 [n, R/GROUP]
    out_ptr,  # [n, R] out dtype
    n,
    stride_q,
    stride_s,
    stride_o,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    mask = (rows < n)[:, None]
    code = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=mask, other=0)
    scale = tl.load(scale_ptr + rows * stride_s + g, mask=rows < n, other=0.0)
    x = code.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_o + cols[None, :],
        x.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def quantize_latent_fp8_triton(c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_kv [n, R] -> (e4m3 [n, R], fp32 [n, R/128]); inputs checked by the caller."""
    n, r = c_kv.shape
    groups = r // FP8_GROUP
    q = torch.empty(n, r, dtype=torch.uint8, device=c_kv.device)
    scale = torch.empty(n, groups, dtype=torch.float32, device=c_kv.device)
    if n:
        _quantize_kernel[(triton.cdiv(n, _BLOCK_M), groups)](
            c_kv,
            q,
            scale,
            n,
            c_kv.stride(0),
            q.stride(0),
            scale.stride(0),
            GROUP=FP8_GROUP,
            FP8_MAX_=FP8_MAX,
            BLOCK_M=_BLOCK_M,
        )
    return q.view(torch.float8_e4m3fn), scale


def dequantize_latent_fp8_triton(
    q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """(e4m3 [n, R], fp32 [n, R/128]) -> [n, R] in out_dtype; inputs checked by the caller."""
    n, r = q.shape
    out = torch.empty(n, r, dtype=out_dtype, device=q.device)
    if n:
        _dequantize_kernel[(triton.cdiv(n, _BLOCK_M), r // FP8_GROUP)](
            q.view(torch.uint8),
            scale,
            out,
            n,
            q.stride(0),
            scale.stride(0),
            out.stride(0),
            GROUP=FP8_GROUP,
            BLOCK_M=_BLOCK_M,
        )
    return out
