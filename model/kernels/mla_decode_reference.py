"""Plain-torch paged MLA decode: the reference for the Triton kernel and the CPU production path.

Same contract as ``model.kernels.mla_decode.paged_mla_decode`` (inputs are checked there).
Records are ``c_kv ‖ k_pe`` [T, R + rope], so one matmul with ``q_latent ‖ q_pe`` gives the
scores and the latent part of the same records is the value. Softmax and accumulation are
always fp32. The matmuls run in fp32, except when q and the cache are both bf16: then they take
the bf16 records in place (no upcast copy) with the scores and the output lifted to fp32 right
after each matmul, the numerics of a GPU MLA kernel (bf16 operands, fp32 softmax, P rounded to
bf16 for the PV product). Measured (one thread, batch 32 x 1K tokens, R 512, 4 heads, a CPU
with bf16 units): 6.5 ms per layer against 8.8 ms with the upcast.

Two strategies, picked by the mean context length (both are tested against dense attention):
- per sequence, when contexts are long: a sequence's pages usually form a few runs of
  consecutive page ids (decode KV is reserved up front), and a run is a *view* of the pool, so
  fp32 caches are read in place (bf16 is upcast, fp8 dequantised, once). A fragmented sequence
  falls back to gathering its pages. Measured (one thread, batch 32 x 1K tokens, R 512, 16
  heads): fp32 33 ms vs 89 ms gathered, bf16 36 vs 50 ms; a dense unpaged bmm takes 31 ms.
- batched, when contexts are short: gather whole pages for the batch at once, so many short
  sequences cost a handful of ops instead of a handful per sequence.
Both walk long contexts in chunks with an online softmax, so memory stays bounded.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from model.kv_cache import FP8_GROUP, KVFormat, PagedLatentCache

# Budget for one chunk's fp32 records (x2 for scores and temporaries). Small enough that the
# buffers stay below glibc's mmap threshold and get reused instead of page-faulted in: measured
# 20 MiB ~1.5x faster than 96 MiB at batch 32 x 1K tokens on the 2-core dev box.
_CHUNK_BYTES = 20 << 20
_PER_SEQUENCE_MIN_PAGES = 2  # mean pages per sequence from which the per-sequence walk wins

PageIds = slice | torch.Tensor  # a run of consecutive pages, or gathered page ids


def paged_mla_decode_reference(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    cache: PagedLatentCache,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """[B, H, R] decode attention in q's dtype; ``num_splits`` is accepted and ignored."""
    b, h, r = q_latent.shape
    q = torch.cat([q_latent, q_pe], dim=-1).to(_matmul_dtype(q_latent.dtype, cache))  # [B, H, D]
    if b == 0:
        return q_latent.new_empty(b, h, r)
    s = cache.page_size
    lens = seq_lens.tolist()
    pages_needed = [-(-n // s) for n in lens]
    if sum(pages_needed) >= _PER_SEQUENCE_MIN_PAGES * b:
        tables = block_tables[:, : max(pages_needed)].tolist()  # only the pages in use
        out = torch.stack(
            [
                _attend_one(
                    q[i], cache, layer, tables[i][: pages_needed[i]], lens[i], softmax_scale
                )
                for i in range(b)
            ]
        )
    else:
        out = _attend_batched(q, cache, layer, block_tables, seq_lens, softmax_scale)
    return out.to(q_latent.dtype)


def _matmul_dtype(q_dtype: torch.dtype, cache: PagedLatentCache) -> torch.dtype:
    """bf16 when q and the cache are both bf16 (records read in place), else fp32."""
    is_bf16 = q_dtype == torch.bfloat16 and cache.fmt is KVFormat.BF16
    return torch.bfloat16 if is_bf16 else torch.float32


# ---- per sequence ---------------------------------------------------------------------------
def _attend_one(
    q: torch.Tensor, cache: PagedLatentCache, layer: int, pages: list[int], n: int, scale: float
) -> torch.Tensor:
    """q [H, D] over the first ``n`` tokens on ``pages`` -> [H, R] fp32 (matmuls in q's dtype)."""
    r = cache.kv_lora_rank
    max_pages = max(1, _CHUNK_BYTES // (cache.page_size * q.shape[-1] * 8))
    m = denom = acc = None
    for ids, num_tokens in _segments(pages, n, cache.page_size, max_pages, q.device):
        rec = _records(cache, layer, ids, q.dtype)[:num_tokens]  # [t, D] in q's dtype
        scores = (q @ rec.T).float().mul_(scale)  # [H, t]
        m_seg = scores.amax(dim=-1)  # [H]
        m_new = m_seg if m is None else torch.maximum(m, m_seg)
        p = torch.exp(scores.sub_(m_new.unsqueeze(-1)))
        pv = (p.to(rec.dtype) @ rec[:, :r]).float()  # [H, R]
        if m is None:
            denom, acc = p.sum(dim=-1), pv
        else:
            alpha = torch.exp(m - m_new)
            denom = denom * alpha + p.sum(dim=-1)
            acc = acc.mul_(alpha.unsqueeze(-1)).add_(pv)
        m = m_new
    return acc / denom.unsqueeze(-1)


def _segments(
    pages: list[int], n: int, page_size: int, max_pages: int, device: torch.device
) -> Iterator[tuple[PageIds, int]]:
    """Cover a sequence's pages in order with (page ids, valid tokens) of <= max_pages pages.

    Runs of consecutive page ids become slices (views of the pool) unless the sequence is
    fragmented (more runs than a quarter of its pages), in which case chunks are gathered.
    Only the last page is partial, so each segment's valid tokens are a prefix of its records.
    """
    starts = [0] + [i for i in range(1, len(pages)) if pages[i] != pages[i - 1] + 1]
    use_views = len(starts) <= max(1, len(pages) // 4)
    bounds = [*starts, len(pages)] if use_views else [0, len(pages)]
    for run_start, run_end in itertools.pairwise(bounds):
        for a in range(run_start, run_end, max_pages):
            e = min(a + max_pages, run_end)
            tokens = min(n, e * page_size) - a * page_size
            if use_views:
                yield slice(pages[a], pages[e - 1] + 1), tokens
            else:
                yield torch.tensor(pages[a:e], dtype=torch.long, device=device), tokens


# ---- batched --------------------------------------------------------------------------------
def _attend_batched(
    q: torch.Tensor,
    cache: PagedLatentCache,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B, H, D] -> [B, H, R] fp32 (matmuls in q's dtype), gathering page chunks for the
    whole batch at once."""
    b, h, d = q.shape
    r, s = cache.kv_lora_rank, cache.page_size
    lens = seq_lens.long()
    pages_needed = (lens + s - 1) // s  # [B]
    max_pages = int(pages_needed.max())
    m = torch.full((b, h), float("-inf"), device=q.device)  # running max of scores
    denom = torch.zeros(b, h, device=q.device)
    acc = torch.zeros(b, h, r, device=q.device)
    chunk_pages = max(1, _CHUNK_BYTES // (b * s * d * 8))
    for p0 in range(0, max_pages, chunk_pages):
        p1 = min(p0 + chunk_pages, max_pages)
        rows = (pages_needed > p0).nonzero().squeeze(1)  # sequences with tokens in this chunk
        if rows.numel() == b:
            rows = None  # everyone: skip the row gathers
        ids = _take(block_tables[:, p0:p1], rows).long()  # [b', n]
        col = torch.arange(p0, p1, device=ids.device)
        ids = torch.where(col < _take(pages_needed, rows).unsqueeze(1), ids, 0)  # pad -> page 0
        rec = _records(cache, layer, ids.reshape(-1), q.dtype).view(ids.shape[0], -1, d)
        scores = torch.bmm(_take(q, rows), rec.transpose(1, 2)).float().mul_(scale)  # [b', H, T]
        pos = p0 * s + torch.arange((p1 - p0) * s, device=q.device)
        scores.masked_fill_((pos >= _take(lens, rows).unsqueeze(1)).unsqueeze(1), float("-inf"))
        m_old = _take(m, rows)
        m_new = torch.maximum(m_old, scores.amax(dim=-1))  # finite: every row has a token here
        p = torch.exp(scores.sub_(m_new.unsqueeze(-1)))  # [b', H, T]
        alpha = torch.exp(m_old - m_new)  # 0 on a sequence's first chunk
        new_denom = _take(denom, rows) * alpha + p.sum(dim=-1)
        pv = torch.bmm(p.to(rec.dtype), rec[..., :r]).float()  # [b', H, R]
        new_acc = (_take(acc, rows) * alpha.unsqueeze(-1)).add_(pv)
        if rows is None:
            m, denom, acc = m_new, new_denom, new_acc
        else:
            m[rows], denom[rows], acc[rows] = m_new, new_denom, new_acc
    return acc / denom.unsqueeze(-1)


def _take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


# ---- reading records ------------------------------------------------------------------------
def _records(cache: PagedLatentCache, layer: int, ids: PageIds, dtype: torch.dtype) -> torch.Tensor:
    """Pages ``ids`` of one layer -> records [num_pages * S, R + rope] (c_kv ‖ k_pe) in ``dtype``
    (``_matmul_dtype``: fp32, or bf16 for a bf16 cache).

    A slice of a cache already in ``dtype`` is a view (no copy); bf16 to fp32 costs one upcast;
    fp8 one dequantise.
    """
    r, s = cache.kv_lora_rank, cache.page_size

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t[ids] if isinstance(ids, slice) else t.index_select(0, ids)

    if cache.fmt is KVFormat.FP8:
        q8, scale, k_pe = (pick(t) for t in cache.fp8_views(layer))  # [k, S, ...]
        k = q8.shape[0]
        rec = torch.empty(k, s, r + cache.rope_dim, device=q8.device)
        rec[..., :r] = q8
        rec[..., r:] = k_pe
        rec[..., :r].view(k, s, r // FP8_GROUP, FP8_GROUP).mul_(scale.unsqueeze(-1))
        return rec.view(k * s, -1)
    rec = pick(cache.latent_view(layer))  # [k, S, D] in the cache dtype
    return rec.reshape(-1, rec.shape[-1]).to(dtype)
