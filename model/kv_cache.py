"""Paged, compressed MLA latent KV cache.

Per token per layer MLA caches the normalised latent ``c_kv`` (kv_lora_rank values) and the
rotated ``k_pe`` (qk_rope_head_dim values). Every layer's pool is one uint8 tensor
``[num_pages, page_size, bytes_per_token]`` holding *packed records*, the same bytes the
transfer sends, so export/import are a gather/scatter of rows:

- ``fp32`` / ``bf16``: ``c_kv ‖ k_pe`` in that dtype (576 values: 2,304 / 1,152 B at K2 size).
- ``fp8``: ``c_kv`` as e4m3 (kv_lora_rank B) ‖ one fp32 scale per 128 latent values
  (4 x kv_lora_rank/128 B) ‖ ``k_pe`` in bf16 (2 x rope B): 512 + 16 + 128 = 656 B at K2 size.

Compute reads typed views of the same storage (``latent_view``/``fp8_views``).
"""

from __future__ import annotations

from collections.abc import Hashable
from enum import Enum

import torch

from common.pages import PageAllocator

FP8_GROUP = 128  # latent values per fp32 scale
FP8_MAX = 448.0  # largest finite float8_e4m3fn


class KVFormat(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP8 = "fp8"

    @property
    def torch_dtype(self) -> torch.dtype:
        """dtype of the stored latent (k_pe is bf16 in the fp8 format)."""
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[
            self.value
        ]


# ``kv_format="auto"``: the KV cache keeps the model's own precision (fp32 runs match the
# reference within 1e-4 only with an fp32 cache); bf16 and fp8 are chosen by name.
AUTO_KV_FORMATS = {"float32": KVFormat.FP32, "bfloat16": KVFormat.BF16}


def resolve_kv_format(name: KVFormat | str, dtype_name: str) -> KVFormat:
    """``"auto"`` -> the format of the model dtype (``"float32"``, ``"bfloat16"``); any other
    name -> that format. Raises ValueError with the fix when there is none."""
    if name != "auto":
        return KVFormat(name)
    dtype_name = dtype_name.removeprefix("torch.")
    if dtype_name not in AUTO_KV_FORMATS:
        raise ValueError(
            f"kv_format auto: dtype {dtype_name} has no KV format of its own; "
            "set kv_format to bf16, fp8 or fp32"
        )
    return AUTO_KV_FORMATS[dtype_name]


def bytes_per_token(fmt: KVFormat | str, kv_lora_rank: int, rope_dim: int) -> int:
    """Bytes one token occupies in one layer's cache (and on the wire)."""
    fmt = KVFormat(fmt)
    if fmt is KVFormat.FP8:
        assert kv_lora_rank % FP8_GROUP == 0, "fp8 latent needs kv_lora_rank % 128 == 0"
        return kv_lora_rank + 4 * (kv_lora_rank // FP8_GROUP) + 2 * rope_dim
    return (kv_lora_rank + rope_dim) * (4 if fmt is KVFormat.FP32 else 2)


def quantize_latent_fp8(c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: c_kv [n, R] -> (e4m3 [n, R], fp32 scales [n, R/128]); x ~= q * scale."""
    n, r = c_kv.shape
    g = c_kv.float().view(n, r // FP8_GROUP, FP8_GROUP)
    scale = (g.abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-12)
    q = (g / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(n, r), scale


def dequantize_latent_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Torch reference: (e4m3 [n, R], fp32 [n, R/128]) -> fp32 [n, R]."""
    n, r = q.shape
    x = q.float().view(n, r // FP8_GROUP, FP8_GROUP) * scale.unsqueeze(-1)
    return x.view(n, r)


class PagedLatentCache:
    """Per-layer page pools of packed latent records plus the page accounting for them."""

    def __init__(
        self,
        num_layers: int,
        kv_lora_rank: int,
        rope_dim: int,
        num_pages: int,
        page_size: int = 64,
        fmt: KVFormat | str = KVFormat.BF16,
        device: torch.device | str = "cpu",
    ) -> None:
        self.fmt = KVFormat(fmt)
        self.num_layers = num_layers
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.page_size = page_size
        self.device = torch.device(device)
        self.bytes_per_token = bytes_per_token(self.fmt, kv_lora_rank, rope_dim)
        self.allocator = PageAllocator(num_pages, page_size)
        # uint8 [num_pages, page_size, bytes_per_token] per layer
        self.pages = [
            torch.zeros(
                num_pages, page_size, self.bytes_per_token, dtype=torch.uint8, device=device
            )
            for _ in range(num_layers)
        ]

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    # ---- typed views ------------------------------------------------------------------------
    def latent_view(self, layer: int) -> torch.Tensor:
        """fp32/bf16 formats: [num_pages, page_size, R + rope] in the cache dtype."""
        assert self.fmt is not KVFormat.FP8, "fp8 cache has no single typed view; use fp8_views"
        return self.pages[layer].view(self.fmt.torch_dtype)

    def fp8_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp8 format: (e4m3 [P, S, R], fp32 scales [P, S, R/128], bf16 k_pe [P, S, rope])."""
        assert self.fmt is KVFormat.FP8
        r, g = self.kv_lora_rank, self.kv_lora_rank // FP8_GROUP
        buf = self.pages[layer]
        q = buf[..., :r].view(torch.float8_e4m3fn)
        scale = buf[..., r : r + 4 * g].view(torch.float32)
        k_pe = buf[..., r + 4 * g :].view(torch.bfloat16)
        return q, scale, k_pe

    # ---- slot arithmetic --------------------------------------------------------------------
    def slots(self, seq_id: Hashable, start: int, end: int) -> torch.Tensor:
        """Flat slot indices (page * page_size + offset) of tokens [start, end) of a sequence."""
        table = self.allocator.block_table(seq_id)
        if end > len(table) * self.page_size:
            raise IndexError(
                f"tokens [{start}, {end}) exceed the {len(table) * self.page_size}-token "
                f"reservation of {seq_id!r}"
            )
        pos = torch.arange(start, end)
        pages = torch.tensor(table, dtype=torch.long)[pos // self.page_size]
        return (pages * self.page_size + pos % self.page_size).to(self.device)

    def _flat(self, layer: int) -> torch.Tensor:
        return self.pages[layer].view(-1, self.bytes_per_token)

    # ---- write / read (compute path) --------------------------------------------------------
    def pack(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """c_kv [n, R], k_pe [n, rope] (any float dtype) -> packed uint8 [n, bytes_per_token]."""
        n = c_kv.shape[0]
        if self.fmt is KVFormat.FP8:
            q, scale = quantize_latent_fp8(c_kv)
            parts = [
                q.view(torch.uint8),
                scale.view(torch.uint8),
                k_pe.to(torch.bfloat16).view(torch.uint8),
            ]
            return torch.cat([p.reshape(n, -1) for p in parts], dim=-1)
        dt = self.fmt.torch_dtype
        rec = torch.cat([c_kv.to(dt), k_pe.to(dt)], dim=-1).contiguous()
        return rec.view(torch.uint8)

    def unpack(self, rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed uint8 [n, bytes_per_token] -> (c_kv [n, R] fp32, k_pe [n, rope] fp32)."""
        r = self.kv_lora_rank
        if self.fmt is KVFormat.FP8:
            g = r // FP8_GROUP
            q = rec[:, :r].contiguous().view(torch.float8_e4m3fn)
            scale = rec[:, r : r + 4 * g].contiguous().view(torch.float32)
            k_pe = rec[:, r + 4 * g :].contiguous().view(torch.bfloat16)
            return dequantize_latent_fp8(q, scale), k_pe.float()
        vals = rec.contiguous().view(self.fmt.torch_dtype).float()
        return vals[:, :r], vals[:, r:]

    def write(
        self, seq_id: Hashable, layer: int, start: int, c_kv: torch.Tensor, k_pe: torch.Tensor
    ) -> None:
        """Store tokens [start, start + n) of one layer; c_kv [n, R], k_pe [n, rope]."""
        slots = self.slots(seq_id, start, start + c_kv.shape[0])
        self._flat(layer)[slots] = self.pack(c_kv, k_pe)

    def copy_tokens(self, src_id: Hashable, dst_id: Hashable, start: int, end: int) -> None:
        """Copy tokens [start, end) of ``src_id``'s KV, every layer, into the same positions of
        ``dst_id``: the copy-on-write of a forked choice's partially filled prompt page."""
        if end <= start:
            return
        src, dst = self.slots(src_id, start, end), self.slots(dst_id, start, end)
        for layer in range(self.num_layers):
            flat = self._flat(layer)
            flat[dst] = flat[src]

    def read(
        self, seq_id: Hashable, layer: int, end: int, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [start, end) of one layer as fp32 (c_kv [n, R], k_pe [n, rope])."""
        return self.unpack(self._flat(layer)[self.slots(seq_id, start, end)])
