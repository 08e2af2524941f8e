"""Triton kernel of the block-FP8 linear ``y = x @ W^T``, W e4m3 [N, K] with fp32 block scales.

Grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``: each program owns a [BLOCK_M, BLOCK_N] tile of y
and walks K one scale column (``BLOCK_K`` = the block's ``bi``, 128) at a time: it loads the x
tile, the e4m3 weight tile (1 B per value: the bytes that make decode memory-bound) and the
tile's per-row block scales, decodes the codes in registers (bitcast to ``float8e4nv`` and
upcast, exact in the interpreter too), and accumulates in fp32.

The scale is applied to the partial dot product rather than to each weight: within one K step
every output column has one scale, so ``dot(x, q) * s == dot(x, q * s)`` up to fp32 rounding,
and the dot's operands stay exactly representable in tf32 (e4m3 values; bf16 and fp16
activations), so the tensor-core ``tf32`` dot is exact in its inputs for 16-bit activations.
fp32 activations use an IEEE dot. Everything is upcast to fp32 in the kernel (the interpreter
mishandles bf16 arithmetic and stores); a bf16 output is written as bf16 bits rounded to nearest
even by integer arithmetic.

Imported lazily by ``model.kernels.fp8_gemm`` (only when Triton runs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bf16_bits(x):
    """fp32 -> bf16 bit patterns (int16), round to nearest even; NaN/inf stay NaN/inf."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).to(tl.int16)


@triton.jit
def _fp8_gemm_kernel(
    x_ptr,  # [M, K] fp32 / fp16 / bf16, unit stride on K
    w_ptr,  # uint8 [N, K] e4m3 codes, unit stride on K
    s_ptr,  # fp32 [cdiv(N, BLOCK_OUT), cdiv(K, BLOCK_K)]
    y_ptr,  # [M, N] fp32 / fp16, or int16 holding bf16 bits (OUT_BF16)
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_sk,
    stride_ym,
    BLOCK_OUT: tl.constexpr,  # weight rows per scale
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # weight columns per scale
    OUT_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn  # [1, BLOCK_N]
    s_cols = s_ptr + (offs_n // BLOCK_OUT) * stride_sn  # [BLOCK_N]: each column's scale row
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + offs_k
        mask_k = k < K
        x = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        code = tl.load(w_cols + k[:, None], mask=mask_n[None, :] & mask_k[:, None], other=0)
        w = code.to(tl.float8e4nv, bitcast=True).to(tl.float32)  # [BLOCK_K, BLOCK_N], exact
        scale = tl.load(s_cols + kb * stride_sk, mask=mask_n, other=0.0)  # [BLOCK_N]
        part = tl.dot(x.to(tl.float32), w, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        acc += part * scale[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if OUT_BF16:
        tl.store(y_ptrs, _bf16_bits(acc), mask=mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _tiles(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): narrow tiles for decode-sized M, wider for prefill."""
    if m <= 16:
        return 16, 64, 4
    if m <= 32:
        return 32, 64, 4
    return 64, 128, 8


def fp8_linear_triton(
    x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """x [M, K], q e4m3 [N, K], scale_inv fp32 -> y [M, N] in x's dtype (inputs checked by the
    caller, ``model.kernels.fp8_gemm.fp8_linear``)."""
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    block_m, block_n, num_warps = _tiles(m)
    is_bf16 = x.dtype == torch.bfloat16
    _fp8_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x,
        q.view(torch.uint8),
        scale_inv,
        y.view(torch.int16) if is_bf16 else y,
        m,
        n,
        k,
        x.stride(0),
        q.stride(0),
        scale_inv.stride(0),
        scale_inv.stride(1),
        y.stride(0),
        BLOCK_OUT=block[0],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block[1],
        OUT_BF16=is_bf16,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=3,
    )
    return y
