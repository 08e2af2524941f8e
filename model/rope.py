"""YaRN rotary position embedding for the MLA rope dims, as DeepSeek-V3 / Kimi-K2 apply it.

Inverse frequencies blend interpolation (``1 / (factor * base^(2i/d))``) and extrapolation
(``1 / base^(2i/d)``) with a linear ramp over the dims whose number of rotations within the
original context lies between ``beta_slow`` and ``beta_fast``. cos/sin carry YaRN's attention
factor ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` (1 for K2, whose
``mscale == mscale_all_dim``; the rest of the temperature lives in ``config.softmax_scale``).

The checkpoint's rope dims come in interleaved pairs ``(x0, x1), (x2, x3), ...``; each pair
rotates by one frequency and the result is written de-interleaved (all rotated evens, then all
rotated odds). Queries and keys use the same layout, so their dot products are the paper's.
"""

from __future__ import annotations

import math

import torch

from model.config import ModelConfig, yarn_get_mscale


def yarn_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq fp32 [rope/2], attention factor) for ``config``'s rope dims."""
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [dim/2]
    rs = config.rope_scaling
    if rs is None or not rs.is_yarn:
        return 1.0 / pos_freqs, 1.0
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rs.factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        # the dim whose wavelength fits num_rotations times into the original context
        orig = rs.original_max_position_embeddings
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # 1: keep the original frequency, 0: fully interpolated
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    if rs.mscale and rs.mscale_all_dim:
        factor = yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(
            rs.factor, rs.mscale_all_dim
        )
    else:
        factor = yarn_get_mscale(rs.factor, 1.0)
    return inv_freq, float(factor)


class RotaryEmbedding:
    """cos/sin tables (fp32, grown on demand) and the pairwise rotation of rope dims."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.inv_freq, self.attention_factor = yarn_inv_freq(config)
        self.inv_freq = self.inv_freq.to(self.device)
        self._cos = torch.empty(0, config.qk_rope_head_dim // 2, device=self.device)
        self._sin = torch.empty_like(self._cos)

    def _grow(self, num_positions: int) -> None:
        n = max(num_positions, 2 * self._cos.shape[0], 256)
        pos = torch.arange(n, device=self.device).float()
        freqs = pos[:, None] * self.inv_freq[None, :]  # [n, rope/2]
        self._cos = freqs.cos() * self.attention_factor
        self._sin = freqs.sin() * self.attention_factor

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions long [n] -> (cos, sin) fp32 [n, rope/2]."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self._cos.shape[0]:
            self._grow(need)
        return self._cos[positions], self._sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [n, ..., rope] by cos/sin [n, rope/2]; de-interleaved out."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos = cos.to(x.dtype).view(shape)
    sin = sin.to(x.dtype).view(shape)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # pair members
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
