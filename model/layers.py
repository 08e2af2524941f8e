"""Small building blocks: RMSNorm and the SwiGLU MLP (dense layers and shared experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        self.inter = gate.shape[0]
        self.gate_up = torch.cat([gate, up], dim=0).contiguous()  # [2I, H]
        self.down = down.contiguous()  # [H, I]

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str) -> MLP:
        return cls(
            state[f"{prefix}.gate_proj.weight"],
            state[f"{prefix}.up_proj.weight"],
            state[f"{prefix}.down_proj.weight"],
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, self.gate_up)  # [T, 2I]
        gate, up = gate_up.split(self.inter, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)  # [T, H]
