"""Multi-head latent attention (MLA) over the paged latent KV cache.

Per token: ``q = W_qb · norm(W_qa · x)`` (or ``W_q · x``) split per head into ``q_nope`` and
``q_pe``; ``[c_kv ‖ k_pe] = W_kva · x`` with ``c_kv`` normalised (the latent, ``R`` values) and
``k_pe`` one rope key shared by all heads. ``q_pe`` and ``k_pe`` are rotated; ``(c_kv, k_pe)``
is what the cache stores. ``W_kvb`` lifts the latent to per-head keys and values:
``k_nope[h] = W_UK[h] · c_kv``, ``v[h] = W_UV[h] · c_kv``.

- Prefill (a chunk of T tokens at positions [start, start+T)): write the chunk's latent, then
  walk [0, start+T) in blocks of ``KV_BLOCK`` cached tokens: read a block's latent back,
  decompress its K/V through ``kv_b`` and merge it into an online softmax (``OnlineSoftmax``).
  A chunk's temporary memory is O(T x KV_BLOCK), whatever the prefix length.
- Decode (one token per sequence): the absorbed form. ``q_lat[h] = W_UK[h]^T · q_nope[h]``, so
  ``score = q_lat · c_kv + q_pe · k_pe`` runs directly on cached records, and the latent
  output is lifted once by ``W_UV`` (``model.kernels.mla_decode``, paged over block tables).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

import torch

from model.config import ModelConfig
from model.kernels.mla_decode import paged_mla_decode
from model.kv_cache import PagedLatentCache
from model.layers import linear, rms_norm
from model.rope import RotaryEmbedding, apply_rope
from model.weights import Weight, cat_weights, dense_weight

ATTENTION_BLOCK = 256  # queries per score block in prefill attention
KV_BLOCK = 1024  # cached tokens expanded through kv_b at a time in prefill attention


class OnlineSoftmax:
    """Flash-style attention state of T queries, merged one key block at a time.

    Keeps the running row max ``m`` and sum ``l`` (fp32 [n, T]) and the unnormalised output
    ``acc`` (fp32 [n, T, dv]); a block's scores exist only while it is merged, so the memory of
    a chunk's attention does not depend on how many keys it sees.
    """

    def __init__(self, q: torch.Tensor, start: int, scale: float, d_v: int) -> None:
        """q [T, n, dq]: queries at positions [start, start+T)."""
        t, n, _ = q.shape
        self.qh = q.transpose(0, 1).contiguous()  # [n, T, dq]
        self.start, self.scale = start, scale
        self.m = q.new_full((n, t), float("-inf"), dtype=torch.float32)
        self.l = q.new_zeros(n, t, dtype=torch.float32)
        self.acc = q.new_zeros(n, t, d_v, dtype=torch.float32)

    def merge(self, k0: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Attend to keys at positions [k0, k0+kb): k [kb, n, dq], v [kb, n, dv].

        Query i (position start+i) sees key j iff j <= start+i; query rows that see none of the
        block are skipped, so every merged row has a finite max.
        """
        kb = k.shape[0]
        kh = k.transpose(0, 1)  # [n, kb, dq]
        vh = v.transpose(0, 1)  # [n, kb, dv]
        t = self.qh.shape[1]
        for lo in range(max(0, k0 - self.start), t, ATTENTION_BLOCK):
            hi = min(lo + ATTENTION_BLOCK, t)
            s = torch.bmm(self.qh[:, lo:hi], kh.transpose(1, 2)).float().mul_(self.scale)
            if k0 + kb - 1 > self.start + lo:  # some key lies after some query of this block
                q_pos = torch.arange(self.start + lo, self.start + hi, device=s.device)
                k_pos = torch.arange(k0, k0 + kb, device=s.device)
                s.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))  # [b, kb]
            m_old = self.m[:, lo:hi]
            m_new = torch.maximum(m_old, s.amax(dim=-1))  # [n, b]
            p = torch.exp(s - m_new[..., None])  # [n, b, kb]
            corr = torch.exp(m_old - m_new)  # 0 where nothing was merged yet
            self.l[:, lo:hi] = self.l[:, lo:hi] * corr + p.sum(dim=-1)
            pv = torch.bmm(p.to(vh.dtype), vh).float()  # [n, b, dv]
            self.acc[:, lo:hi] = self.acc[:, lo:hi] * corr[..., None] + pv
            self.m[:, lo:hi] = m_new

    def output(self, dtype: torch.dtype) -> torch.Tensor:
        """[T, n, dv]: the softmax-weighted values over every merged key."""
        return (self.acc / self.l[..., None]).to(dtype).transpose(0, 1)


class MLA:
    """One layer's MLA weights and its prefill / decode attention."""

    def __init__(
        self,
        config: ModelConfig,
        state: dict[str, Weight],
        prefix: str,
        rope: RotaryEmbedding,
    ) -> None:
        c = config
        self.n_heads = c.num_attention_heads
        self.d_nope, self.d_rope, self.d_v = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.rank = c.kv_lora_rank
        self.eps = c.rms_norm_eps
        self.scale = c.softmax_scale
        self.rope = rope
        kv_a = state[f"{prefix}.kv_a_proj_with_mqa.weight"]  # [R + rope, H]
        if c.q_lora_rank is None:
            self.q_lora = 0
            self.q_a_norm = None
            self.q_b = state[f"{prefix}.q_proj.weight"]  # [n*(dn+dr), H]
            self.in_proj = kv_a.contiguous()
        else:
            self.q_lora = c.q_lora_rank
            self.q_a_norm = state[f"{prefix}.q_a_layernorm.weight"]
            self.q_b = state[f"{prefix}.q_b_proj.weight"]  # [n*(dn+dr), q_lora]
            # q_a and kv_a read the same input: one GEMM  [q_lora + R + rope, H]
            self.in_proj = cat_weights([state[f"{prefix}.q_a_proj.weight"], kv_a])
        self.kv_a_norm = state[f"{prefix}.kv_a_layernorm.weight"]
        # kv_b is dequantised once here if the checkpoint is FP8: the absorbed decode slices it
        # per head (W_UK, W_UV), which block scales do not follow (head rows need not align to
        # 128), and it is small (K2: 8.4 M values per layer against 17 B in its experts).
        kv_b = dense_weight(state[f"{prefix}.kv_b_proj.weight"], self.kv_a_norm.dtype)
        self.kv_b = kv_b.contiguous()  # [n*(dn+dv), R]
        # W_UK and W_UV are views of kv_b, not copies: bmm reads the strided views as fast
        # (measured on CPU, fp32 and bf16) and the weight is held once.
        w = self.kv_b.view(self.n_heads, self.d_nope + self.d_v, self.rank)
        self.w_uk = w[:, : self.d_nope]  # [n, dn, R]
        self.w_uv_t = w[:, self.d_nope :].transpose(1, 2)  # [n, R, dv]
        self.o_proj = state[f"{prefix}.o_proj.weight"]  # [H, n*dv]

    def weights(self) -> Iterator[Weight]:
        yield from (self.in_proj, self.q_b, self.kv_a_norm, self.kv_b, self.o_proj)
        if self.q_a_norm is not None:
            yield self.q_a_norm

    # ---- shared projections --------------------------------------------------------------------
    def _project(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> q_nope [T, n, dn], q_pe [T, n, dr] (rotated), c_kv [T, R], k_pe [T, dr]."""
        t = x.shape[0]
        a = linear(x, self.in_proj)  # [T, q_lora + R + dr]
        if self.q_a_norm is None:
            q = linear(x, self.q_b)
            kv = a
        else:
            q = linear(rms_norm(a[:, : self.q_lora], self.q_a_norm, self.eps), self.q_b)
            kv = a[:, self.q_lora :]
        q = q.view(t, self.n_heads, self.d_nope + self.d_rope)
        q_nope, q_pe = q.split([self.d_nope, self.d_rope], dim=-1)
        c_kv = rms_norm(kv[:, : self.rank], self.kv_a_norm, self.eps)  # [T, R]
        cos, sin = self.rope.cos_sin(positions)
        q_pe = apply_rope(q_pe, cos, sin)  # [T, n, dr]
        k_pe = apply_rope(kv[:, self.rank :], cos, sin)  # [T, dr]
        return q_nope, q_pe, c_kv, k_pe

    # ---- prefill: decompressed K/V over the cached prefix plus the chunk -----------------------
    def prefill(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedLatentCache,
        layer: int,
        seq_id: Hashable,
        start: int,
    ) -> torch.Tensor:
        """x [T, H] at positions [start, start+T) -> attention output [T, H]; writes the KV."""
        t = x.shape[0]
        end = start + t
        q_nope, q_pe, c_kv, k_pe = self._project(x, positions)
        cache.write(seq_id, layer, start, c_kv, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1)  # [T, n, dn+dr]
        state = OnlineSoftmax(q, start, self.scale, self.d_v)
        # Keys come from the cache a block at a time (so chunking and the KV format act the same
        # for every token): the prefix is never decompressed whole.
        for k0 in range(0, end, KV_BLOCK):
            k, v = self._expand(cache, seq_id, layer, k0, min(k0 + KV_BLOCK, end), x.dtype)
            state.merge(k0, k, v)
        out = state.output(x.dtype)  # [T, n, dv]
        return linear(out.reshape(t, self.n_heads * self.d_v), self.o_proj)

    def _expand(
        self,
        cache: PagedLatentCache,
        seq_id: Hashable,
        layer: int,
        k0: int,
        k1: int,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached tokens [k0, k1) lifted by kv_b: k [kb, n, dn+dr], v [kb, n, dv]."""
        c_kv, k_pe = cache.read(seq_id, layer, k1, k0)  # fp32 [kb, R], [kb, dr]
        kb = k1 - k0
        kv = linear(c_kv.to(dtype), self.kv_b).view(kb, self.n_heads, self.d_nope + self.d_v)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)  # [kb, n, dn], [kb, n, dv]
        k_rope = k_pe.to(dtype)[:, None, :].expand(-1, self.n_heads, -1)
        return torch.cat([k_nope, k_rope], dim=-1), v

    # ---- decode: absorbed attention over pages ------------------------------------------------
    def decode(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedLatentCache,
        layer: int,
        slots: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, H], one token per sequence written at ``slots`` -> attention output [B, H]."""
        b = x.shape[0]
        q_nope, q_pe, c_kv, k_pe = self._project(x, positions)
        cache.pages[layer].view(-1, cache.bytes_per_token)[slots] = cache.pack(c_kv, k_pe)
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk)  # [n, B, dn] @ [n, dn, R] -> [n, B, R]
        out_lat = paged_mla_decode(
            q_lat.transpose(0, 1).contiguous(),
            q_pe.contiguous(),
            cache,
            layer,
            block_tables,
            seq_lens,
            self.scale,
            validate=False,
        )  # [B, n, R]
        out = torch.bmm(
            out_lat.transpose(0, 1), self.w_uv_t
        )  # [n, B, R] @ [n, R, dv] -> [n, B, dv]
        return linear(out.transpose(0, 1).reshape(b, self.n_heads * self.d_v), self.o_proj)
