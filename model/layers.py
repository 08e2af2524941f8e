"""Small building blocks: ``linear``, RMSNorm and the SwiGLU MLP (dense layers, shared experts)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from model.kernels.fp8_gemm import fp8_linear
from model.weights import Fp8Weight, Weight, cat_weights


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x [..., in] @ w^T -> [..., out] in x's dtype; w is a dense [out, in] tensor or an
    ``Fp8Weight`` (block-FP8, multiplied by the FP8 GEMM without widening it in memory)."""
    if isinstance(w, Fp8Weight):
        return fp8_linear(x, w.q, w.scale_inv, w.block)
    return F.linear(x, w)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., d] normalised in fp32 to unit RMS, cast back, then scaled by weight [d]."""
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


class RMSNorm:
    """RMSNorm with a learned per-channel scale."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight = weight
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP:
    """SwiGLU MLP: down(silu(gate(x)) * up(x)), with gate and up fused into one GEMM."""

    def __init__(self, gate: Weight, up: Weight, down: Weight) -> None:
        self.inter = gate.shape[0]
        self.gate_up = cat_weights([gate, up])  # [2I, H]
        self.down = down.contiguous()  # [H, I]

    @classmethod
    def from_state(cls, state: dict[str, Weight], prefix: str) -> MLP:
        return cls(
            state[f"{prefix}.gate_proj.weight"],
            state[f"{prefix}.up_proj.weight"],
            state[f"{prefix}.down_proj.weight"],
        )

    def weights(self) -> Iterator[Weight]:
        yield from (self.gate_up, self.down)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear(x, self.gate_up)  # [T, 2I]
        gate, up = gate_up.split(self.inter, dim=-1)
        return linear(F.silu(gate) * up, self.down)  # [T, H]
