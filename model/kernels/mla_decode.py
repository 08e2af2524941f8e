"""Absorbed-MLA decode attention over the paged latent cache.

One decode step attends a single query token per sequence to its cached tokens. In the absorbed
form the query is already in latent space (``q_nope @ W_UK``), so keys and values are the cached
records themselves:

    score[b, h, t] = scale * (q_latent[b, h] . c_kv[b, t] + q_pe[b, h] . k_pe[b, t])
    out[b, h]      = sum_t softmax_t(score[b, h, :]) * c_kv[b, t]          # [R], lifted by W_UV later

``paged_mla_decode`` checks the inputs and dispatches: CUDA tensors (or ``TIDAL_FORCE_TRITON=1``,
used with ``TRITON_INTERPRET=1`` in tests) run the split-KV Triton kernel
(``model/kernels/mla_decode_triton.py``); anything else runs ``paged_mla_decode_reference``
(``model/kernels/mla_decode_reference.py``), plain torch, which is also the CPU production path.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from model.kernels import use_triton
from model.kernels.mla_decode_reference import paged_mla_decode_reference
from model.kv_cache import PagedLatentCache

__all__ = [
    "check_decode_inputs",
    "check_seq_lens",
    "make_block_tables",
    "paged_mla_decode",
    "paged_mla_decode_reference",
]

_Q_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def paged_mla_decode(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    cache: PagedLatentCache,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    *,
    num_splits: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over its pages of ``layer``.

    q_latent: [B, H, R] (q_nope already multiplied by W_UK); q_pe: [B, H, rope] (rotated);
    block_tables: int32 [B, max_pages] page ids (padding beyond a sequence's pages is ignored);
    seq_lens: int32 [B] tokens to attend to, including the current one (already in the cache).
    Returns out_latent [B, H, R] in q's dtype (accumulated in fp32).

    ``num_splits`` sets the Triton kernel's split-KV factor (None: a heuristic); the torch path
    ignores it. ``validate=False`` skips the value checks on ``seq_lens`` and the page ids they
    use (they need a host sync on GPU); shape/dtype/device/stride checks always run.
    """
    check_decode_inputs(q_latent, q_pe, cache, layer, block_tables, seq_lens, softmax_scale)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if validate:
        check_seq_lens(seq_lens, block_tables, cache.page_size, cache.num_pages)
    if use_triton(q_latent.device):
        from model.kernels.mla_decode_triton import paged_mla_decode_triton

        return paged_mla_decode_triton(
            q_latent, q_pe, cache, layer, block_tables, seq_lens, softmax_scale, num_splits
        )
    return paged_mla_decode_reference(
        q_latent, q_pe, cache, layer, block_tables, seq_lens, softmax_scale
    )


def make_block_tables(cache: PagedLatentCache, seq_ids: Sequence[Hashable]) -> torch.Tensor:
    """int32 [B, max_pages] block tables of ``seq_ids`` on the cache's device, padded with 0."""
    tables = [cache.allocator.block_table(seq_id) for seq_id in seq_ids]
    width = max((len(t) for t in tables), default=0)
    padded = torch.zeros(len(tables), max(1, width), dtype=torch.int32)
    for i, table in enumerate(tables):
        padded[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
    return padded.to(cache.device)


def check_decode_inputs(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    cache: PagedLatentCache,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
) -> None:
    """Raise ValueError with a fix-it message when shapes, dtypes, devices or strides are off."""
    r, rope = cache.kv_lora_rank, cache.rope_dim
    if q_latent.dim() != 3 or q_latent.shape[-1] != r:
        raise ValueError(
            f"q_latent must be [B, H, {r}] (kv_lora_rank), got {tuple(q_latent.shape)}"
        )
    b, h, _ = q_latent.shape
    if tuple(q_pe.shape) != (b, h, rope):
        raise ValueError(f"q_pe must be [{b}, {h}, {rope}] (B, H, rope), got {tuple(q_pe.shape)}")
    if q_latent.dtype not in _Q_DTYPES or q_pe.dtype != q_latent.dtype:
        raise ValueError(
            f"q_latent and q_pe must share one dtype of {_Q_DTYPES}, "
            f"got {q_latent.dtype} and {q_pe.dtype}"
        )
    if q_latent.stride(-1) != 1 or q_pe.stride(-1) != 1:
        raise ValueError("q_latent and q_pe need a unit stride on the last dim; call .contiguous()")
    if not 0 <= layer < cache.num_layers:
        raise ValueError(f"layer {layer} out of range for a {cache.num_layers}-layer cache")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or block_tables.dtype != torch.int32:
        raise ValueError(
            f"block_tables must be int32 [{b}, max_pages], "
            f"got {block_tables.dtype} {tuple(block_tables.shape)}"
        )
    if block_tables.shape[1] == 0:
        raise ValueError("block_tables has no columns: every sequence needs at least one page")
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables needs a unit stride on the last dim; call .contiguous()")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != b or seq_lens.dtype != torch.int32:
        raise ValueError(
            f"seq_lens must be int32 [{b}], got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    devices = {t.device for t in (q_latent, q_pe, block_tables, seq_lens, cache.pages[layer])}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on the cache's device {cache.device}, got {devices}")
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale}")


def check_seq_lens(
    seq_lens: torch.Tensor, block_tables: torch.Tensor, page_size: int, num_pages: int
) -> None:
    """Every sequence attends to >= 1 token, fits its block-table row, and its pages exist."""
    if seq_lens.numel() == 0:
        return
    lo, hi = int(seq_lens.min()), int(seq_lens.max())
    capacity = block_tables.shape[1] * page_size
    if lo < 1 or hi > capacity:
        raise ValueError(
            f"seq_lens must lie in [1, {capacity}] (block_tables width x page_size), "
            f"got min {lo} max {hi}"
        )
    pages_needed = (seq_lens.long() + page_size - 1) // page_size  # [B]
    used = torch.arange(block_tables.shape[1], device=block_tables.device) < pages_needed[:, None]
    bad = used & ((block_tables < 0) | (block_tables >= num_pages))
    if bool(bad.any()):
        b, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"block_tables[{b}, {col}] = {int(block_tables[b, col])} is not a page id in "
            f"[0, {num_pages}) but sequence {b} needs that page for its {int(seq_lens[b])} tokens"
        )
