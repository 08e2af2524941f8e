"""Block-FP8 linear: ``y = x @ W^T`` with W kept as e4m3 codes and one fp32 scale per block.

``W[i, j] = q[i, j] * scale_inv[i // bo, j // bi]`` (DeepSeek-V3 / Kimi-K2 ship bo = bi = 128;
``model.weights.cat_weights`` may restate scales on a finer row grid, so any bo is accepted).

``fp8_linear`` checks its inputs and dispatches: CUDA tensors (or ``TIDAL_FORCE_TRITON=1``, with
``TRITON_INTERPRET=1`` in tests) run the Triton kernel in ``model/kernels/fp8_gemm_triton.py``,
which dequantises each weight tile in registers; anything else runs ``_fp8_linear_torch``, which
dequantises ``ROW_CHUNK`` output rows at a time, so its temporaries are ``ROW_CHUNK x in``, never
the whole matrix (the point of keeping the weights FP8). ``fp8_linear_reference`` dequantises
everything first: the plain-torch reference for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.kernels import use_triton
from model.weights import e4m3_to_float, scale_shape

ROW_CHUNK = 128  # output rows dequantised at a time on the torch path
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fp8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """x [..., in] (fp32/bf16/fp16), q e4m3 [out, in], scale_inv fp32 [ceil(out/bo), ceil(in/bi)]
    -> y [..., out] in x's dtype, accumulated in fp32 (Triton) or in x's dtype's matmul (torch)."""
    check_fp8_linear_inputs(x, q, scale_inv, block)
    if use_triton(x.device):
        from model.kernels.fp8_gemm_triton import fp8_linear_triton

        y = fp8_linear_triton(x.reshape(-1, x.shape[-1]), q, scale_inv, block)
        return y.view(*x.shape[:-1], q.shape[0])
    return _fp8_linear_torch(x, q, scale_inv, block)


def fp8_linear_reference(
    x: torch.Tensor,
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """Dequantise the whole weight to fp32, cast to x's dtype, then ``F.linear`` (tests only)."""
    from model.weights import dequantize_block_fp8

    return F.linear(x, dequantize_block_fp8(q, scale_inv, block).to(x.dtype))


def dequantize_rows(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], lo: int, hi: int
) -> torch.Tensor:
    """Rows [lo, hi) of the dequantised weight, fp32 [hi - lo, in]."""
    bo, bi = block
    scale = scale_inv.index_select(0, torch.arange(lo, hi, device=q.device) // bo)  # [r, cols]
    w = e4m3_to_float(q[lo:hi])  # [r, in]
    full = q.shape[1] // bi  # whole column blocks; a partial last one is scaled apart
    w[:, : full * bi].unflatten(1, (full, bi)).mul_(scale[:, :full, None])
    w[:, full * bi :].mul_(scale[:, full:])
    return w


def _fp8_linear_torch(
    x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """One ``ROW_CHUNK`` of output rows at a time: dequantise it, cast to x's dtype, multiply."""
    out = q.shape[0]
    if out <= ROW_CHUNK:
        return F.linear(x, dequantize_rows(q, scale_inv, block, 0, out).to(x.dtype))
    y = x.new_empty(*x.shape[:-1], out)
    for lo in range(0, out, ROW_CHUNK):
        hi = min(lo + ROW_CHUNK, out)
        y[..., lo:hi] = F.linear(x, dequantize_rows(q, scale_inv, block, lo, hi).to(x.dtype))
    return y


def check_fp8_linear_inputs(
    x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> None:
    """Raise ``ValueError`` naming the problem for anything ``fp8_linear`` cannot take."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be one of {_FLOAT_DTYPES}, got {x.dtype}")
    if q.dtype != torch.float8_e4m3fn or q.dim() != 2:
        raise ValueError(f"q must be float8_e4m3fn [out, in], got {q.dtype} {tuple(q.shape)}")
    if x.dim() < 1 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"x must be [..., {q.shape[1]}] to match q, got {tuple(x.shape)}")
    bo, bi = block
    if bo < 1 or bi < 16 or bi & (bi - 1):
        raise ValueError(f"block must be (bo >= 1, bi a power of two >= 16), got {block}")
    want = scale_shape(tuple(q.shape), block)
    if scale_inv.dtype != torch.float32 or tuple(scale_inv.shape) != want:
        raise ValueError(
            f"scale_inv must be float32 {list(want)} for q {list(q.shape)} and block {block}, "
            f"got {scale_inv.dtype} {list(scale_inv.shape)}"
        )
    if not x.device == q.device == scale_inv.device:
        raise ValueError(
            f"x, q and scale_inv must share a device, got {x.device}, {q.device}, "
            f"{scale_inv.device}"
        )
    if q.stride(-1) != 1 or (x.numel() and x.stride(-1) != 1):
        raise ValueError("x and q need a unit stride on the last dim; call .contiguous()")
